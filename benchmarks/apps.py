"""The ASGI apps the load benchmarks serve, as ``uvicorn --factory`` targets; each runs in its own process.

- :func:`raw_app`: the 10 KB page from a raw ASGI callable (the floor: uvicorn's own cost).
- :func:`starlette_app`: the same page from a one-route Starlette app (the middleware-mode reference).
- :func:`gateway_app`: that Starlette app inside ``PrivacyGateway``; settings file from ``BENCH_GATEWAY_CONFIG``.
- :func:`collector_app`: a Plausible/GA4-style collector that reads each body and answers ``202``, counting events.
- :func:`naive_proxy_app`: the naive proxy design the issue measured: Starlette, one shared ``httpx.AsyncClient``,
  ``StreamingResponse`` over ``aiter_raw()``; upstream from ``BENCH_UPSTREAM_URL``.
"""

from __future__ import annotations

import contextlib
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
from starlette.types import ASGIApp, Receive, Scope, Send

from benchmarks.common import PAGE, PAGE_PATH

__all__ = [
    "CONFIG_ENV",
    "UPSTREAM_ENV",
    "collector_app",
    "gateway_app",
    "naive_proxy_app",
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
