"""python.org is a Django site: Django takes REMOTE_ADDR from scope["client"], so it must see the truncated IP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

django = pytest.importorskip("django")

from django.conf import settings as django_settings  # noqa: E402


@pytest.fixture(scope="module")
def django_app() -> Iterator[object]:
    if not django_settings.configured:
        django_settings.configure(
            DEBUG=False,
            SECRET_KEY="test-only-not-secret",
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["testserver", "127.0.0.1"],
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    from django.core.asgi import get_asgi_application

    yield get_asgi_application()


def whoami(request: object) -> object:
    from django.http import JsonResponse

    meta = request.META  # type: ignore[attr-defined]
    forwarded = {k: v for k, v in meta.items() if "FORWARD" in k or k.endswith("CLIENT_IP") or k == "HTTP_X_REAL_IP"}
    return JsonResponse({"remote_addr": meta.get("REMOTE_ADDR"), "forwarded": forwarded})


def _urlpatterns() -> list[object]:
    from django.urls import path

    return [path("whoami", whoami)]


def __getattr__(name: str) -> object:  # Django imports ROOT_URLCONF lazily and reads `urlpatterns`.
    if name == "urlpatterns":
        return _urlpatterns()
    raise AttributeError(name)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("198.51.100.77", {}, "198.51.100.0"),
        ("127.0.0.1", {"x-forwarded-for": "198.51.100.77", "x-real-ip": "198.51.100.77"}, "198.51.100.0"),
        ("127.0.0.1", {"fastly-client-ip": "2001:db8:aaaa:bbbb::1"}, "2001:db8:aaaa::"),
        ("198.51.100.77", {"x-forwarded-for": "1.2.3.4"}, "198.51.100.0"),  # untrusted peer: spoof ignored
    ],
)
async def test_django_sees_only_truncated_address(
    django_app: object, peer: str, headers: dict[str, str], expected: str
) -> None:
    from gateway import PrivacyGateway, load_settings

    settings = load_settings(
        environ={},
        overrides={
            "client_ip": {"trusted_proxies": ["127.0.0.1/32"]},
            "consent": {"receipts": ""},
            "spool": {"enabled": False},
            "banner": {"enabled": False},
        },
    )
    app = PrivacyGateway(django_app, settings)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, client=(peer, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/whoami", headers=headers)
    await app.shutdown()
    assert response.status_code == 200
    report = json.loads(response.text)
    assert report["remote_addr"] == expected
    assert report["forwarded"] == {}
    assert "198.51.100.77" not in response.text
