"""The page-view pixel (``GET {prefix}/p.gif``, with ``analytics.pageviews = "pixel"``).

Behind a caching CDN a page served from the edge never reaches the gateway, so counting HTML responses at the origin
counts cache misses only. In pixel mode the gateway puts ``<img src="{prefix}/p.gif">`` into every page it rewrites
(where the banner goes; pages a CDN caches carry it too) and counts the page view when the browser loads the image:
no script, so it works with JavaScript off. The image is answered ``Cache-Control: no-store``, so every view
reaches the origin through any CDN.

The page is the ``Referer`` (same origin only: another site embedding the image counts nothing); the visitor's
address, user agent, language, consent and GPC are this request's, already resolved and truncated by the
middleware. The page-view rules are the middleware's own (gateway.pageview: excluded paths and extensions, bots,
prefetches). Not known here: the page's title and its own referrer (a pixel request cannot see them).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

from starlette.types import Receive, Scope, Send

from gateway.clientid import ClientIdCookie
from gateway.context import STATE_KEY, PrivacyContext
from gateway.events import Event
from gateway.pageview import PREFETCH_HEADERS, PageviewDetector, is_prefetch, primary_language_of, request_hostname

__all__ = ["GIF", "PixelEndpoint"]

# The smallest transparent 1x1 GIF (43 bytes).
GIF: Final = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_HEADERS: Final = (
    (b"content-type", b"image/gif"),
    (b"content-length", str(len(GIF)).encode()),
    # Every view must reach the origin, through the browser's cache and any CDN's.
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
)


class PixelEndpoint:
    def __init__(
        self,
        detector: PageviewDetector,
        own_hosts: frozenset[str],
        submit: Callable[[Event], None],
        client_ids: ClientIdCookie,
        needs_client_id: Callable[[frozenset[str]], bool],
    ) -> None:
        self._detector = detector
        self._own_hosts = own_hosts  # hosts of site.origins; the request's own Host is always accepted
        self._submit = submit
        self._client_ids = client_ids
        self._needs_client_id = needs_client_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if method not in ("GET", "HEAD"):
            body = b"method not allowed"
            headers = [(b"allow", b"GET, HEAD"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 405, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        set_cookie = self._count(scope) if method == "GET" else None
        headers = list(_HEADERS)
        if set_cookie is not None:
            headers.append((b"set-cookie", set_cookie))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else GIF})

    def _count(self, scope: Scope) -> bytes | None:
        """Submit the page view this pixel stands for, if it is one; the new analytics id cookie, if one is due."""
        referer = user_agent = accept_language = b""
        prefetch = False
        for name, value in scope.get("headers", ()):
            if name == b"referer":
                referer = value
            elif name == b"user-agent":
                user_agent = value
            elif name == b"accept-language":
                accept_language = value
            elif name in PREFETCH_HEADERS:
                prefetch = prefetch or is_prefetch(value)
        page = referer.decode("latin-1")
        try:
            parts = urlsplit(page)
            page_host = (parts.hostname or "").lower()
        except ValueError:
            return None
        if parts.scheme not in ("http", "https") or not page_host:
            return None
        if page_host != request_hostname(scope).lower() and page_host not in self._own_hosts:
            return None  # embedded elsewhere: not a view of this site
        agent = user_agent.decode("latin-1")
        if not self._detector.path_counts(parts.path or "/", agent, prefetch=prefetch):
            return None
        context: PrivacyContext | None = scope.get("state", {}).get(STATE_KEY)
        if context is None:
            return None
        client_id, set_cookie = context.client_id, None
        if not client_id and self._needs_client_id(context.granted):
            client_id, set_cookie = self._client_ids.new()
        self._submit(
            Event.server_pageview(
                page,
                "",  # the page's own referrer is not visible to an image request
                primary_language_of(accept_language) if accept_language else "",
                agent,
                context.country,
                context.ip,
                context.granted,
                context.gpc,
                client_id,
                time.time(),
            )
        )
        return set_cookie
