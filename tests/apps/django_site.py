"""A small Django site behind the gateway's middleware, for gunicorn: ``tests.apps.django_site:application``.

python.org is a Django site. This is how its operators would mount the gateway: the public API
``PrivacyGateway(app, load_settings(path))`` around Django's ASGI application, the settings file named by
``GATEWAY_CONFIG_FILE``. Pages at ``/p/<name>/`` are HTML with a title, like the load test's site.
"""

from __future__ import annotations

import os

import django
from django.conf import settings as django_settings
from django.http import HttpRequest, HttpResponse
from django.urls import path

from gateway import PrivacyGateway, load_settings

PAGE = (
    "<!doctype html><html lang=en><head><meta charset=utf-8><title>{name} | Python.org</title></head>"
    "<body><h1>{name}</h1>" + "<p>Some ordinary page content.</p>" * 40 + "</body></html>"
)


def page(request: HttpRequest, name: str) -> HttpResponse:
    return HttpResponse(PAGE.format(name=name), content_type="text/html; charset=utf-8")


urlpatterns = [path("p/<str:name>/", page), path("p/<str:name>", page)]

if not django_settings.configured:
    django_settings.configure(
        DEBUG=False,
        SECRET_KEY="test-only-not-secret",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        USE_TZ=True,
        APPEND_SLASH=False,
    )
    django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402 - after settings

application = PrivacyGateway(get_asgi_application(), load_settings(os.environ["GATEWAY_CONFIG_FILE"]))
