"""The privacy gateway as pure ASGI middleware.

Per request, before the wrapped app sees anything::

    read every header any stage needs, in one pass -> resolve the client IP (trusted proxies only)
    -> country lookup on the full address, in memory -> truncate -> rewrite scope["client"], drop every
    forwarding header -> read consent (signed cookie, Sec-GPC) -> gateway endpoint? answer it : call the app,
    watching the response for a page view and injecting the banner (one send wrapper does both)

The full address lives only in local variables of :meth:`PrivacyGateway.__call__`; nothing per-request is kept on
``self``. Building the page-view event and handing it to the dispatcher is in-memory work; delivery happens in the
dispatcher's background tasks, so a slow or dead analytics destination cannot slow a page.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from collections.abc import Awaitable, Callable
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.anonymize import Truncator
from gateway.banner import Banner
from gateway.banner.inject import _WAITING_FOR_START, BannerInjector
from gateway.clientid import ClientIdCookie
from gateway.clientip import FORWARDING_HEADERS, SOURCES, ClientIPResolver, TrustedProxies
from gateway.config import Settings, load_settings
from gateway.consent import ConsentManager, dnt_is_on, sec_gpc_is_on
from gateway.context import STATE_KEY, PrivacyContext
from gateway.cookies import CookieGuard, OwnedCookies
from gateway.delivery import Delivery
from gateway.delivery.dispatcher import Dispatcher
from gateway.delivery.handoff import Handoff
from gateway.endpoints import Endpoints
from gateway.events import Event
from gateway.geo import Geo, open_geo
from gateway.logs import AccessLog
from gateway.pageview import (
    PREFETCH_HEADERS,
    PageviewDetector,
    TitleSniffer,
    is_prefetch,
    page_request,
    primary_language_of,
    quick_title,
)
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
        dispatcher: Delivery | None = None,
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
        # With one banner language there is nothing to choose (Banner.choose_language would return it anyway).
        self._only_language = (
            self._banner.default_language if self._banner is not None and len(self._banner.languages) == 1 else None
        )
        if dispatcher is None:
            sinks = build_sinks(settings)
            if settings.dispatch.mode == "deliverer":
                # Several workers per host: hand payloads to the host spool; `gateway deliver` sends them.
                dispatcher = Handoff(sinks, settings)
            else:
                transports = {s.name: DryRunTransport(s.name) for s in sinks if s.dry_run}
                ttls = {name: dest.ttl_seconds for name, dest in settings.destinations.items()}
                dispatcher = Dispatcher(sinks, settings.dispatch, settings.spool, transports=transports, ttls=ttls)
        self.dispatcher: Delivery = dispatcher
        # Destinations that identify a client by the first-party id cookie, and the consent each needs.
        self._client_id_requirements = tuple(
            frozenset(d.requires) for d in settings.destinations.values() if d.kind == "ga4" and d.client_id == "cookie"
        )
        # Clients allowed on allowlisted endpoints without a token (metrics), judged by the resolved address.
        self._allowlisted_clients = TrustedProxies(settings.metrics.allow)
        self._endpoints = Endpoints(self, readiness=readiness)
        self._prefix = settings.prefix
        self._prefix_slash = settings.prefix.rstrip("/") + "/"
        self._beacon_path = settings.analytics.beacon_path
        self._access_log = AccessLog() if access_log else None
        # Only the gateway sets its cookies: an app's Set-Cookie for these names never reaches the browser.
        self._owned_cookies = OwnedCookies((settings.consent.cookie, settings.analytics.client_id_cookie))
        self._pixel = self._banner.pixel if self._banner is not None else b""
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
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        # An HTTP request or a websocket handshake, handled right here rather than in a helper coroutine: every
        # await layer is a frame per request.
        if not self._started:
            # The host server may not run lifespan (e.g. Django's ASGI handler rejects it): start on first use.
            await self.startup()
        started = time.perf_counter() if self._access_log is not None else 0.0
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        client = scope.get("client")
        peer = client[0] if client else None

        # One pass over the headers for everything any later stage reads; nothing below walks the list again.
        host = user_agent = accept_language = referer = None
        cookies: tuple[bytes, ...] = ()
        forwarding: list[tuple[bytes, bytes]] | None = None
        gpc = dnt = prefetch = False
        kinds = _REQUEST_HEADER_KINDS
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                continue
            if kind == _COOKIE:
                cookies = (*cookies, value) if cookies else (value,)
            elif kind == _USER_AGENT:
                user_agent = value
            elif kind == _ACCEPT_LANGUAGE:
                accept_language = value
            elif kind == _REFERER:
                referer = value
            elif kind == _HOST:
                if host is None:  # the first one, as request_host() reads it
                    host = value
            elif kind == _FORWARDING:
                if forwarding is None:
                    forwarding = [(name, value)]
                else:
                    forwarding.append((name, value))
            elif kind == _SEC_GPC:
                gpc = gpc or sec_gpc_is_on(value)
            elif kind == _DNT:
                dnt = dnt or dnt_is_on(value)
            else:  # _PREFETCH
                prefetch = prefetch or is_prefetch(value)

        # The resolver reads only forwarding headers (every client-IP source is one): hand it just those, in order.
        full_ip = self._resolver.resolve(peer, (forwarding or ()) if _SOURCES_ARE_FORWARDING else headers)
        if full_ip is not None:
            ip = self._truncate(full_ip)
            country = self.geo.country(full_ip, ip)
        else:
            ip = ""
            country = ""
        path: str = scope["path"]
        ours = (
            path.startswith(self._prefix_slash)
            or path == self._beacon_path
            or path == "/.well-known/gpc.json"
            or path == _FASTLY_CHALLENGE
        )
        # Allowlisted endpoints (metrics) judge the client, never the proxy that forwarded it: decided here, while
        # the full address still exists.
        client_allowed = ours and self._client_allowlisted(full_ip, peer, forwarding is not None)
        del full_ip  # from here on only the truncated address exists

        if forwarding is not None:
            stripped = FORWARDING_HEADERS
            headers = [h for h in headers if h[0] not in stripped]
            scope["headers"] = headers
        scope["client"] = (ip, 0) if ip else None

        now = time.time()
        decision = self.consent.decide_cookies(cookies, gpc, dnt, now)
        granted = decision.granted
        client_id = ""
        if granted and cookies and self._client_id_requirements:
            client_id = self._client_ids.read_cookies(cookies, now)
        choice = decision.choice
        context = _new_context(
            ip,
            country,
            granted,
            choice is not None,
            decision.gpc,
            choice.consent_id if choice is not None else "",
            client_id,
        )
        state = scope.get("state")
        if state is None:
            scope["state"] = {STATE_KEY: context}
        else:
            state[STATE_KEY] = context

        if scope["type"] == "websocket":
            await self.app(scope, receive, CookieGuard(send, self._owned_cookies))  # websocket.accept headers
            return

        if ours and await self._endpoints.handle(scope, receive, send, client_allowed=client_allowed):
            return
        del peer

        method: str = scope["method"]
        user_agent_text = user_agent.decode("latin-1") if user_agent else ""
        counts = self._pageviews.request_counts(method, path, user_agent_text, prefetch=prefetch)
        banner = self._banner
        inject = banner is not None and method != "HEAD"
        if not counts and not inject:
            if self._access_log is None:
                await self.app(scope, receive, CookieGuard(send, self._owned_cookies))
            else:
                await self._call_app_logged(scope, receive, send, started)
            return

        snippet = b""
        vary: tuple[bytes, ...] = ()
        if inject:
            assert banner is not None
            language = self._only_language or banner.choose_language(accept_language)
            snippet = banner.snippet(language, path, choice is None)
            vary = banner.vary
            extensions = scope.get("extensions")
            if extensions and "http.response.pathsend" in extensions:
                # A file sent by path cannot be edited on the way out; ask the app for a normal body instead.
                scope["extensions"] = {k: v for k, v in extensions.items() if k != "http.response.pathsend"}

        if not counts:
            if self._access_log is None:
                injector = BannerInjector(send, snippet, vary, self._owned_cookies, self._pixel)
                await self.app(scope, receive, injector)
            else:
                await self._call_app_logged(scope, receive, send, started, snippet, vary)
            return
        set_cookie: bytes | None = None
        if not client_id and self._needs_client_id(granted):
            client_id, set_cookie = self._client_ids.new()
        # The URL is worked out off the request path, when a destination's policy first reads the event
        # (gateway.pageview.complete_pageview): here only the few scope values it comes from are kept.
        event = Event.server_pageview(
            "",
            referer.decode("latin-1") if referer else "",
            primary_language_of(accept_language) if accept_language else "",
            user_agent_text,
            country,
            ip,
            granted,
            decision.gpc,
            client_id,
            now,
            page_request(scope, host),
        )
        watcher = _ResponseWatcher(send, snippet, vary, event, set_cookie, self.dispatcher.submit, self._owned_cookies)
        if self._access_log is None:
            await self.app(scope, receive, watcher)
        else:
            await self._call_app_logged(scope, receive, watcher, started)

    async def _call_app_logged(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        started: float,
        snippet: bytes = b"",
        vary: tuple[bytes, ...] = (),
    ) -> None:
        """Run the app and record the request in the access log.

        ``send`` is the server's, or already a :class:`_ResponseWatcher` (a page view); otherwise one is made here,
        injecting ``snippet`` if given. One object watches the response for everything (banner, page view, status
        for the log), so each message the app sends costs a single extra await.
        """
        access_log = self._access_log
        assert access_log is not None
        watcher = (
            send
            if isinstance(send, _ResponseWatcher)
            else _ResponseWatcher(send, snippet, vary, None, None, None, self._owned_cookies, self._pixel)
        )
        try:
            await self.app(scope, receive, watcher)
        finally:
            client = scope.get("client")
            # Recorded now, formatted and written in a batch by a background task (gateway.logs.AccessLog).
            access_log.record(
                scope["method"],
                scope["path"],
                watcher.status or 500,
                client[0] if client else "-",
                (time.perf_counter() - started) * 1000.0,
            )

    def _needs_client_id(self, granted: frozenset[str]) -> bool:
        for required in self._client_id_requirements:  # noqa: SIM110 (any() with a generator costs more)
            if required <= granted:
                return True
        return False

    def _client_allowlisted(self, full_ip: str | None, peer: str | None, forwarded: bool) -> bool:
        """Is the *client* of this request inside ``metrics.allow``?

        The resolved (full, normalised) client address decides, not the TCP peer: behind a proxy on the same host
        the peer is 127.0.0.1 for every visitor on the internet. A request that carries forwarding headers from a
        peer that is not a trusted proxy was forwarded on behalf of someone the gateway cannot name, so it is never
        allowlisted by address (the bearer token still works).
        """
        if full_ip is None or full_ip not in self._allowlisted_clients:
            return False
        return not forwarded or (peer is not None and peer in self._resolver.trusted)


_FASTLY_CHALLENGE: Final = "/.well-known/fastly/logging/challenge"  # gateway.intake.CHALLENGE_PATH
# What the one pass in PrivacyGateway.__call__ does with each request header (ASGI names are lower case).
_COOKIE, _USER_AGENT, _ACCEPT_LANGUAGE, _REFERER, _HOST, _FORWARDING, _SEC_GPC, _DNT, _PREFETCH = range(9)
_REQUEST_HEADER_KINDS: Final[dict[bytes, int]] = {
    b"cookie": _COOKIE,
    b"user-agent": _USER_AGENT,
    b"accept-language": _ACCEPT_LANGUAGE,
    b"referer": _REFERER,
    b"host": _HOST,
    b"sec-gpc": _SEC_GPC,
    b"dnt": _DNT,
    **dict.fromkeys(PREFETCH_HEADERS, _PREFETCH),
    **dict.fromkeys(FORWARDING_HEADERS, _FORWARDING),
}

# True while every header ClientIPResolver can read is one of the forwarding headers the pass above collects.
_SOURCES_ARE_FORWARDING: Final = {source.encode("latin-1") for source in SOURCES} <= FORWARDING_HEADERS
_response_counts = PageviewDetector.response_counts
_REUSABLE_HEADERS: Final = (list, tuple)


class _ResponseWatcher(BannerInjector):
    """The one ``send`` wrapper of a request: banner injection, page-view counting and the status for the log.

    Page view: when the response start says 200 ``text/html``, the <title> is read from the body as it streams
    (usually all in the first chunk) and the event is handed to the dispatcher as soon as the title is known or
    the body ends, before that message goes on. ``set_cookie`` (a new analytics id) is added to such a response.
    """

    __slots__ = ("_count_in_begin", "_counting", "_event", "_set_cookie", "_sniffer", "_submit", "status")

    _observes = True

    def __init__(
        self,
        send: Send,
        snippet: bytes,
        vary: tuple[bytes, ...],
        event: Event | None,
        set_cookie: bytes | None,
        submit: Callable[[Event], None] | None,
        owned: OwnedCookies,
        pixel: bytes = b"",
    ) -> None:
        # BannerInjector.__init__'s assignments, inlined: the super() call would cost as much as all of them, and
        # this runs once per page view.
        self._send = send
        self._snippet = snippet
        self._vary = vary
        self._owned = owned
        self._pixel = pixel
        self._state = _WAITING_FOR_START
        self._start = self._original_start = None
        self._held = b""
        self._anchored = False
        self._event = event
        self._set_cookie = set_cookie
        self._submit = submit
        self._counting = False  # a counted response whose title is not known yet
        self._count_in_begin = False  # _observe left the page-view check of this start message to _begin
        self._sniffer: TitleSniffer | None = None  # only when the title is not wholly in the first chunk
        self.status = 0

    def _observe(self, message: Message) -> Message:
        kind = message["type"]
        if kind == "http.response.start":
            status = self.status = message["status"]
            if self._event is not None:
                if (
                    self._state == _WAITING_FOR_START
                    and self._set_cookie is None
                    and isinstance(message.get("headers"), _REUSABLE_HEADERS)
                ):
                    # The usual case: decided in _begin, from what the injector makes of the same headers. Not
                    # when the message must change (a new id cookie), nor for a later start message, nor for
                    # headers that are not a list or tuple (an iterator can be walked once only): those go the
                    # general way below, exactly as before the injector sees the message.
                    self._count_in_begin = True
                elif _response_counts(status, message.get("headers", ())):
                    self._counting = True
                    self._sniffer = None
                    if self._set_cookie is not None:
                        message = dict(message)
                        message["headers"] = [*message.get("headers", ()), (b"set-cookie", self._set_cookie)]
        elif kind == "http.response.body" and self._counting:
            body = message.get("body", b"")
            sniffer = self._sniffer
            # Usually the whole <title> is in the first chunk: no TitleSniffer needed at all.
            title = quick_title(body) if sniffer is None and body else None
            if title is None:
                if sniffer is None:
                    sniffer = self._sniffer = TitleSniffer()
                if not sniffer.done:
                    sniffer.feed(body)
                if sniffer.done or not message.get("more_body", False):
                    title = sniffer.title
            if title is not None:
                event = self._event
                assert event is not None and self._submit is not None
                event.title = title
                self._counting = False
                self._sniffer = None
                self._submit(event)
        return message

    def _begin(self, message: Message) -> Message | None:
        start = BannerInjector._begin(self, message)  # the injector's own decision, then the page-view one
        if self._count_in_begin:
            self._count_in_begin = False
            # A start the injector accepted has exactly one Content-Type and it is text/html: then it is a page
            # view exactly when the status is 200, and the header list need not be walked again.
            if start is not None:
                counts = self.status == 200
            else:
                counts = _response_counts(self.status, message.get("headers", ()))
            if counts:
                self._counting = True
                self._sniffer = None
        return start


# PrivacyContext is a frozen dataclass: its generated __init__ sets each field through object.__setattr__ and costs
# about twice as much as setting the slots directly, on every request (compiled with mypyc it is still that Python
# __init__, on a native class). Build it the cheap way while it is a slotted (or native) dataclass with exactly the
# fields listed here (same object, same values: the result compares equal); if context.py ever changes that (other
# fields, a __post_init__), the real constructor is used instead.
_CONTEXT_FIELDS: Final = ("ip", "country", "granted", "choice_made", "gpc", "consent_id", "client_id")
# Slots of a pure-Python class; attributes of a class compiled by mypyc.
_FIELD_DESCRIPTORS: Final = (types.MemberDescriptorType, types.GetSetDescriptorType)
ContextFactory = Callable[[str, str, frozenset[str], bool, bool, str, str], PrivacyContext]


def _context_factory() -> ContextFactory:
    namespace = vars(PrivacyContext)
    plain = (
        tuple(f.name for f in dataclasses.fields(PrivacyContext)) == _CONTEXT_FIELDS
        and "__post_init__" not in namespace
        and all(isinstance(namespace.get(name), _FIELD_DESCRIPTORS) for name in _CONTEXT_FIELDS)
    )
    if not plain:  # pragma: no cover - only if gateway.context changes
        return PrivacyContext
    new = PrivacyContext.__new__  # object.__new__ refuses a native (compiled) class
    set_ip, set_country, set_granted, set_choice_made, set_gpc, set_consent_id, set_client_id = (
        namespace[name].__set__ for name in _CONTEXT_FIELDS
    )

    def new_context(
        ip: str, country: str, granted: frozenset[str], choice_made: bool, gpc: bool, consent_id: str, client_id: str
    ) -> PrivacyContext:
        context = new(PrivacyContext)
        set_ip(context, ip)
        set_country(context, country)
        set_granted(context, granted)
        set_choice_made(context, choice_made)
        set_gpc(context, gpc)
        set_consent_id(context, consent_id)
        set_client_id(context, client_id)
        return context

    return new_context


_new_context = _context_factory()
