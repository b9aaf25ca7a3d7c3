"""The ASGI apps the load benchmarks serve, as ``uvicorn --factory`` targets; each runs in its own process.

- :func:`raw_app`: the 10 KB page from a raw ASGI callable (the floor: uvicorn's own cost).
- :func:`starlette_app`: the same page from a one-route Starlette app (the middleware-mode reference).
- :func:`gateway_app`: that Starlette app inside ``PrivacyGateway``; settings file from ``BENCH_GATEWAY_CONFIG``.
- :func:`passthrough_app`: that Starlette app inside a pure-ASGI middleware that wraps ``send`` and does nothing else:
  the floor for any middleware that watches responses.
- :func:`naive_cached_app`: that Starlette app inside the issue's reference privacy middleware, the faster of its
  two naive designs ("verified cookies cached per token and geo cached per /24"), to calibrate this machine
  against the issue's table; geo database and consent key from the ``BENCH_GATEWAY_CONFIG`` settings file.
- :func:`django_app`: a Django ASGI site whose page renders a template of ~10 KB (a downloads table in a base
  layout, as python.org's pages are made), the realistic reference: a page costs what a real app's page costs.
- :func:`django_gateway_app`: that Django site inside ``PrivacyGateway`` (settings from ``BENCH_GATEWAY_CONFIG``).
- :func:`collector_app`: a Plausible/GA4-style collector that reads each body and answers ``202``, counting events.
- :func:`naive_proxy_app`: the naive proxy design the issue measured: Starlette, one shared ``httpx.AsyncClient``,
  ``StreamingResponse`` over ``aiter_raw()``; upstream from ``BENCH_UPSTREAM_URL``.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import os
from collections.abc import AsyncIterator
from typing import Any, Final

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from benchmarks.common import PAGE, PAGE_PATH

__all__ = [
    "CONFIG_ENV",
    "UPSTREAM_ENV",
    "collector_app",
    "django_app",
    "django_gateway_app",
    "gateway_app",
    "naive_cached_app",
    "naive_proxy_app",
    "passthrough_app",
    "raw_app",
    "starlette_app",
]

CONFIG_ENV: Final = "BENCH_GATEWAY_CONFIG"
UPSTREAM_ENV: Final = "BENCH_UPSTREAM_URL"
COUNT_PATH: Final = "/_count"

_PAGE_HEADERS: Final = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", b"%d" % len(PAGE))]


async def _raw(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _PAGE_HEADERS})
    await send({"type": "http.response.body", "body": PAGE})


def raw_app() -> ASGIApp:
    return _raw


async def _page(request: Request) -> Response:
    return Response(PAGE, media_type="text/html")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route(PAGE_PATH, _page)])


def gateway_app() -> ASGIApp:
    from gateway.config import load_settings
    from gateway.logs import configure_logging
    from gateway.middleware import PrivacyGateway

    settings = load_settings(os.environ[CONFIG_ENV])
    configure_logging(settings.logging.level)
    return PrivacyGateway(starlette_app(), settings)


_DJANGO_TEMPLATE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} | Python.org</title>
<link rel="stylesheet" href="/static/styles/style.css"></head>
<body><header><nav>{% for item in menu %}<a href="{{ item.url }}">{{ item.name }}</a> {% endfor %}</nav></header>
<main><h1>{{ title }}</h1>
<table class="releases">{% for release in releases %}
<tr><td><a href="/downloads/release/python-{{ release.slug }}/">Python {{ release.version }}</a></td>
<td>{{ release.date|date:"M j, Y" }}</td><td>{{ release.notes|truncatechars:60 }}</td>
<td>{% if release.security %}security{% else %}bugfix{% endif %}</td></tr>{% endfor %}
</table></main>
<footer>{% for item in menu %}<a href="{{ item.url }}">{{ item.name|upper }}</a> {% endfor %}</footer></body></html>
"""


def _django_site() -> ASGIApp:
    """Django configured in process (no project on disk), one view rendering the template through the engine."""
    import datetime

    import django
    from django.conf import settings as django_settings

    if not django_settings.configured:
        django_settings.configure(
            DEBUG=False,
            SECRET_KEY="benchmark-only-not-secret",
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["*"],
            MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
            INSTALLED_APPS=[],
            USE_TZ=True,
            TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": [], "OPTIONS": {}}],
        )
        django.setup()
    from django.core.asgi import get_asgi_application

    global _django_context, _django_template
    from django.template import engines

    _django_template = engines["django"].from_string(_DJANGO_TEMPLATE)
    menu = [
        {"name": name, "url": f"/{name.lower()}/"} for name in ("About", "Downloads", "Docs", "Community", "Events")
    ]
    releases = [
        {
            "version": f"3.{minor}.{patch}",
            "slug": f"3{minor}{patch}",
            "date": datetime.date(2020 + minor % 6, 1 + patch % 12, 1 + (minor * patch) % 28),
            "notes": "Release notes: bug fixes, security fixes and improvements across the standard library.",
            "security": patch % 3 == 0,
        }
        for minor in range(8, 14)
        for patch in range(9)
    ]
    _django_context = {"title": "Download Python", "menu": menu, "releases": releases}
    return get_asgi_application()  # type: ignore[no-any-return]


_django_template: Any = None
_django_context: dict[str, Any] = {}


def _django_page(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse(_django_template.render(_django_context, request))


def __getattr__(name: str) -> Any:  # Django reads ROOT_URLCONF's urlpatterns lazily
    if name == "urlpatterns":
        from django.urls import path

        return [path(PAGE_PATH.strip("/") + "/", _django_page)]
    raise AttributeError(name)


def django_app() -> ASGIApp:
    return _django_site()


def django_gateway_app() -> ASGIApp:
    from gateway.config import load_settings
    from gateway.logs import configure_logging
    from gateway.middleware import PrivacyGateway

    settings = load_settings(os.environ[CONFIG_ENV])
    configure_logging(settings.logging.level)
    return PrivacyGateway(_django_site(), settings)


class PassThrough:
    """Pure ASGI, wraps ``send`` for every request and does nothing: what merely watching a response costs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def watched_send(message: Message) -> None:
            await send(message)

        await self.app(scope, receive, watched_send)


def passthrough_app() -> ASGIApp:
    return PassThrough(starlette_app())


class NaiveCachedPrivacy:
    """The issue's reference design, written the obvious way: ``ipaddress`` for the client address (the last
    ``X-Forwarded-For`` entry when the peer is the trusted proxy), /24 (IPv4) or /48 (IPv6) truncation, a maxminddb
    country cached per truncated network (which the issue notes can give a neighbour the wrong country), the consent
    cookie verified with itsdangerous once per token, and a page-view dict appended to a bounded queue.

    No banner, no ``<title>``, no client-id cookie, no GPC, no bot or prefetch check: fewer features than the gateway.
    """

    def __init__(self, app: ASGIApp, geo_database: str, secret_key: str, cookie_name: str) -> None:
        import maxminddb
        from itsdangerous import URLSafeTimedSerializer

        from gateway.consent import COOKIE_SALT, SIGNER_KWARGS

        self.app = app
        self.reader = maxminddb.open_database(geo_database)
        self.serializer = URLSafeTimedSerializer(secret_key, salt=COOKIE_SALT, signer_kwargs=SIGNER_KWARGS)
        self.cookie_prefix = cookie_name + "="
        self.consent_by_token: dict[str, bool] = {}
        self.country_by_network: dict[str, str] = {}
        self.queue: collections.deque[dict[str, object]] = collections.deque(maxlen=10_000)

    def _analytics_granted(self, token: str) -> bool:
        granted = self.consent_by_token.get(token)
        if granted is None:
            try:
                data = self.serializer.loads(token, max_age=400 * 86400)
            except Exception:
                granted = False
            else:
                granted = isinstance(data, dict) and bool(data.get("c", {}).get("analytics"))
            if len(self.consent_by_token) < 10_000:
                self.consent_by_token[token] = granted
        return granted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        client = scope.get("client")
        text = client[0] if client else "0.0.0.0"
        forwarded = headers.get(b"x-forwarded-for")
        if forwarded and text == "127.0.0.1":
            text = forwarded.decode("latin-1").split(",")[-1].strip()
        address = ipaddress.ip_address(text)
        prefix = 24 if address.version == 4 else 48
        network = str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)
        country = self.country_by_network.get(network)
        if country is None:
            record: Any = self.reader.get(str(address))
            country = str(record.get("country", {}).get("iso_code", "")) if isinstance(record, dict) else ""
            self.country_by_network[network] = country
        granted = False
        for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
            part = part.strip()
            if part.startswith(self.cookie_prefix):
                granted = self._analytics_granted(part[len(self.cookie_prefix) :])
        scope = dict(scope)
        scope["client"] = (network, 0)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"x-forwarded-for"]
        if scope["method"] == "GET" and granted:
            self.queue.append(
                {
                    "url": scope["path"],
                    "referrer": headers.get(b"referer", b"").decode("latin-1"),
                    "user_agent": headers.get(b"user-agent", b"").decode("latin-1"),
                    "country": country,
                    "ip": network,
                }
            )
        await self.app(scope, receive, send)


def naive_cached_app() -> ASGIApp:
    from gateway.config import load_settings

    settings = load_settings(os.environ[CONFIG_ENV])
    return NaiveCachedPrivacy(
        starlette_app(), settings.geo.database, str(settings.consent.secret_keys[0]), settings.consent.cookie
    )


class Collector:
    """Answers every POST with ``202`` after reading the body; ``GET /_count`` returns the counts as JSON.

    Plausible requests carry one event each; GA4 requests carry a JSON ``events`` list (batches of up to 25).
    """

    def __init__(self) -> None:
        self.requests = 0
        self.events = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == COUNT_PATH:
            body = json.dumps({"requests": self.requests, "events": self.events}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        self.requests += 1
        if scope["path"].endswith("/collect"):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                self.events += len(json.loads(b"".join(chunks))["events"])
        else:
            self.events += 1
        await send({"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


def collector_app() -> ASGIApp:
    return Collector()


# Request headers a proxy must not forward (RFC 9110 §7.6.1); the naive design strips these and nothing else.
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


def naive_proxy_app() -> Starlette:
    """The design the issue benchmarked at ~0.012 of nginx: a catch-all route relaying through httpx."""
    upstream = os.environ[UPSTREAM_ENV].rstrip("/")
    client: httpx.AsyncClient | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal client
        client = httpx.AsyncClient(base_url=upstream, trust_env=False, timeout=30.0)
        yield
        await client.aclose()

    async def relay(request: Request) -> Response:
        assert client is not None
        headers = [(k, v) for k, v in request.headers.items() if k not in _HOP_BY_HOP]
        outbound = client.build_request(
            request.method,
            request.url.path,
            params=request.url.query,
            headers=headers,
            content=request.stream(),
        )
        response = await client.send(outbound, stream=True)
        out_headers: dict[str, Any] = {
            k: v for k, v in response.headers.items() if k not in _HOP_BY_HOP and k != "content-length"
        }
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers=out_headers,
            background=BackgroundTask(response.aclose),
        )

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", relay, methods=methods)], lifespan=lifespan)
