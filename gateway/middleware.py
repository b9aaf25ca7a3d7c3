"""The privacy gateway as pure ASGI middleware.

Per request, before the wrapped app sees anything::

    resolve the client IP (trusted proxies only) -> country lookup on the full address, in memory
    -> truncate -> rewrite scope["client"], drop every forwarding header -> read consent (signed cookie, Sec-GPC)
    -> gateway endpoint? answer it : call the app, watching the response for a page view and injecting the banner

The full address lives only in local variables of :meth:`PrivacyGateway._http`; nothing per-request is kept on
``self``. Building the page-view event and handing it to the dispatcher is in-memory work; delivery happens in the
dispatcher's background tasks, so a slow or dead analytics destination cannot slow a page.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.anonymize import Truncator
from gateway.banner import Banner
from gateway.banner.inject import wrap_send
from gateway.clientid import ClientIdCookie
from gateway.clientip import FORWARDING_HEADERS, ClientIPResolver, TrustedProxies, normalize_ip
from gateway.config import Settings, load_settings
from gateway.consent import ConsentManager
from gateway.context import STATE_KEY, PrivacyContext
from gateway.dispatch import Dispatcher
from gateway.endpoints import Endpoints
from gateway.events import PAGEVIEW, Event
from gateway.geo import Geo, open_geo
from gateway.logs import AccessLog
from gateway.pageview import PageviewDetector, TitleSniffer, page_url, primary_language
from gateway.sinks.dryrun import DryRunTransport
from gateway.sinks.factory import build_sinks

__all__ = ["PrivacyGateway"]

logger = logging.getLogger("gateway")

ReadinessCheck = Callable[[], Awaitable[bool]]


class PrivacyGateway:
    """``app = PrivacyGateway(app, load_settings("config/gateway.toml"))``.

    The host server must not rewrite the client address itself (uvicorn: ``proxy_headers=False``): the gateway is
    the single place that trusts forwarding headers.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings | None = None,
        *,
        dispatcher: Dispatcher | None = None,
        geo: Geo | None = None,
        readiness: ReadinessCheck | None = None,
        access_log: bool = False,
    ) -> None:
        self.app = app
        self.settings = settings = settings if settings is not None else load_settings()
        self._resolver = ClientIPResolver(settings.client_ip.trusted_proxies, settings.client_ip.headers)
        self._truncate = Truncator(settings.anonymize.ipv4_prefix, settings.anonymize.ipv6_prefix)
        self.geo = (
            geo
            if geo is not None
            else open_geo(settings.geo.database, settings.anonymize.ipv4_prefix, settings.anonymize.ipv6_prefix)
        )
        self.consent = ConsentManager(settings)
        self._client_ids = ClientIdCookie(settings)
        self._pageviews = PageviewDetector(settings)
        self._banner = Banner(settings) if settings.banner.enabled else None
        if dispatcher is None:
            sinks = build_sinks(settings)
            transports = {s.name: DryRunTransport(s.name) for s in sinks if s.dry_run}
            ttls = {name: dest.ttl_seconds for name, dest in settings.destinations.items()}
            dispatcher = Dispatcher(sinks, settings.dispatch, settings.spool, transports=transports, ttls=ttls)
        self.dispatcher = dispatcher
        # Destinations that identify a client by the first-party id cookie, and the consent each needs.
        self._client_id_requirements = tuple(
            frozenset(d.requires) for d in settings.destinations.values() if d.kind == "ga4" and d.client_id == "cookie"
        )
        self._metrics_peers = TrustedProxies(settings.metrics.allow)
        self._endpoints = Endpoints(self, readiness=readiness)
        self._prefix = settings.prefix
        self._prefix_slash = settings.prefix.rstrip("/") + "/"
        self._beacon_path = settings.analytics.beacon_path
        self._access_log = AccessLog() if access_log else None
        self._started = False

    # ----------------------------------------------------------------------------------------------------------
    # lifecycle
    # ----------------------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        if not self._started:
            self._started = True
            await self.dispatcher.start()
            if self._access_log is not None:
                self._access_log.start()

    async def shutdown(self) -> None:
        if self._started:
            self._started = False
            await self.dispatcher.stop()
            if self._access_log is not None:
                await self._access_log.stop()
        if self._endpoints.receipts is not None:
            self._endpoints.receipts.close()
        self.geo.close()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        await self.app(scope, lifespan_receive, send)

    # ----------------------------------------------------------------------------------------------------------
    # requests
    # ----------------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._started:
            # The host server may not run lifespan (e.g. Django's ASGI handler rejects it): start on first use.
            await self.startup()
        started = time.perf_counter() if self._access_log is not None else 0.0
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        client = scope.get("client")
        peer = client[0] if client else None

        full_ip = self._resolver.resolve(peer, headers)
        if full_ip is not None:
            ip = self._truncate(full_ip)
            country = self.geo.country(full_ip, ip)
        else:
            ip = ""
            country = ""
        del full_ip  # from here on only the truncated address exists

        forwarding = FORWARDING_HEADERS
        for name, _ in headers:
            if name in forwarding:
                headers = [h for h in headers if h[0] not in forwarding]
                scope["headers"] = headers
                break
        scope["client"] = (ip, 0) if ip else None

        decision = self.consent.decide(headers)
        granted = decision.granted
        client_id = ""
        if granted and self._client_id_requirements:
            client_id = self._client_ids.read(headers)
        choice = decision.choice
        context = PrivacyContext(
            ip=ip,
            country=country,
            granted=granted,
            choice_made=choice is not None,
            gpc=decision.gpc,
            consent_id=choice.consent_id if choice is not None else "",
            client_id=client_id,
        )
        state = scope.get("state")
        if state is None:
            scope["state"] = {STATE_KEY: context}
        else:
            state[STATE_KEY] = context

        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        path: str = scope["path"]
        if path.startswith(self._prefix_slash) or path == self._beacon_path or path == "/.well-known/gpc.json":
            peer_ok = peer is not None and self._peer_allowed_for_metrics(peer)
            if await self._endpoints.handle(scope, receive, send, peer_allowed=peer_ok):
                return
        del peer

        counts = self._pageviews.request_may_count(scope)
        banner = self._banner
        inject = banner is not None and scope["method"] != "HEAD"
        if not counts and not inject:
            await self._call_app(scope, receive, send, started)
            return

        # One pass over the headers for everything the page-view path reads.
        accept_language = referer = user_agent = None
        for name, value in headers:
            if name == b"accept-language":
                accept_language = value
            elif name == b"referer":
                referer = value
            elif name == b"user-agent":
                user_agent = value

        if inject:
            assert banner is not None
            language = banner.choose_language(accept_language)
            snippet = banner.snippet(language, path, choice is None)
            send = wrap_send(send, snippet, vary=banner.vary)
            extensions = scope.get("extensions")
            if extensions and "http.response.pathsend" in extensions:
                # A file sent by path cannot be edited on the way out; ask the app for a normal body instead.
                scope["extensions"] = {k: v for k, v in extensions.items() if k != "http.response.pathsend"}

        if counts:
            set_cookie: bytes | None = None
            if not client_id and self._needs_client_id(granted):
                client_id, set_cookie = self._client_ids.new()
            event = Event(
                name=PAGEVIEW,
                url=page_url(scope),
                referrer=referer.decode("latin-1") if referer else "",
                language=primary_language(accept_language.decode("latin-1")) if accept_language else "",
                user_agent=user_agent.decode("latin-1") if user_agent else "",
                country=country,
                ip=ip,
                granted=granted,
                gpc=decision.gpc,
                client_id=client_id,
            )
            send = self._watch_pageview(send, event, set_cookie)
        await self._call_app(scope, receive, send, started)

    async def _call_app(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        access_log = self._access_log
        if access_log is None:
            await self.app(scope, receive, send)
            return
        status = 0

        async def logging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            client = scope.get("client")
            # Recorded now, formatted and written in a batch by a background task (gateway.logs.AccessLog).
            access_log.record(
                scope["method"],
                scope["path"],
                status or 500,
                client[0] if client else "-",
                (time.perf_counter() - started) * 1000.0,
            )

    def _needs_client_id(self, granted: frozenset[str]) -> bool:
        return any(required <= granted for required in self._client_id_requirements)

    def _peer_allowed_for_metrics(self, peer: str) -> bool:
        normalized = normalize_ip(peer)
        return normalized is not None and normalized in self._metrics_peers

    def _watch_pageview(self, send: Send, event: Event, set_cookie: bytes | None) -> Send:
        """Wrap ``send``: count the page view if the answer is a 200 HTML page, with its <title>."""
        submit = self.dispatcher.submit
        sniffer: TitleSniffer | None = None
        response_counts = PageviewDetector.response_counts

        async def pageview_send(message: Message) -> None:
            nonlocal sniffer
            kind = message["type"]
            if kind == "http.response.start":
                if response_counts(message["status"], message.get("headers", ())):
                    sniffer = TitleSniffer()
                    if set_cookie is not None:
                        message = dict(message)
                        message["headers"] = [*message.get("headers", ()), (b"set-cookie", set_cookie)]
            elif kind == "http.response.body" and sniffer is not None:
                more = message.get("more_body", False)
                if not sniffer.done:
                    sniffer.feed(message.get("body", b""))
                if sniffer.done or not more:
                    event.title = sniffer.title
                    sniffer = None
                    submit(event)
            await send(message)

        return pageview_send
