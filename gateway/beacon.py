"""First-party, Plausible-compatible beacon endpoint (``POST analytics.beacon_path``, default ``/api/event``).

It accepts exactly what Plausible's official tracker sends (protocols.md §1.2, §1.6), so a site can load the
unmodified tracker with ``plausible.init({endpoint: "/api/event"})`` and keep every request first-party:

* ``fetch(endpoint, {method: "POST", headers: {"Content-Type": "text/plain"}, body: JSON.stringify(payload)})``;
  ``application/json`` is accepted too, both with an optional ``;charset=utf-8``;
* ``{n, u, d, r, p, i, h, v}`` and the long names ``name``/``url``/``domain``/``referrer``/``props``; props may
  also come as legacy ``m``/``meta``, and as an object or a string holding JSON; engagement events add ``sd``/``e``.

What becomes of a valid beacon (always ``202 ok``, without waiting for any destination; ``x-plausible-dropped: 1``
marks the ones not forwarded, as Plausible itself does):

* ``pageview`` is forwarded only with ``analytics.pageviews = "beacon"``. With ``"server"`` the gateway already
  counted the page view when it served the HTML, so the tracker's copy is dropped (no double count); with ``"off"``
  nothing counts page views.
* ``engagement`` (and the older ``pageleave``) is validated like Plausible does, then dropped: the gateway does not
  forward engagement (scroll depth, time on page).
* any other name is a custom event, forwarded only if listed in ``analytics.custom_events``.
* props keep only keys listed in ``analytics.allowed_props`` and scalar values, as strings.
* a user agent that crawlerdetect classifies as a bot (or none at all) is dropped.

What is refused (security.md T10): another method 405 (``OPTIONS`` 204, with no CORS grant: same-origin only); any
``Content-Encoding`` or another content type 415 (no decompression bombs, no form parsing); more than
``analytics.beacon_max_bytes`` 413 (``Content-Length`` first, then counted while streaming, never reading more
than the cap plus one chunk); a body not arriving within 5 s 408; bad UTF-8, bad JSON, ``NaN``/``Infinity``,
nesting deeper than 8, a non-object, a missing or non-http(s) URL, a URL over 2000 bytes, or a URL whose host is
not this site's 400. The last one keeps anyone else from using the gateway as a relay into our analytics accounts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit, urlunsplit

import anyio
from starlette.types import Receive, Scope, Send

from gateway.config import Settings
from gateway.context import STATE_KEY, PrivacyContext
from gateway.events import PAGEVIEW, Event
from gateway.pageview import is_bot, primary_language, request_hostname

__all__ = ["BODY_TIMEOUT_SECONDS", "MAX_JSON_DEPTH", "BeaconEndpoint"]

logger = logging.getLogger("gateway.beacon")

BODY_TIMEOUT_SECONDS: Final = 5.0
# The tracker's payload is an object holding at most one more object (props, revenue); 8 leaves room.
MAX_JSON_DEPTH: Final = 8
# Plausible's limits (protocols.md §1.2): url <= 2000 bytes, name <= 120 characters, referrer cut to 2000
# characters, at most 30 props with values <= 2000 bytes.
MAX_URL_BYTES: Final = 2000
MAX_NAME_CHARS: Final = 120
MAX_REFERRER_CHARS: Final = 2000
MAX_PROPS: Final = 30
MAX_PROP_VALUE_BYTES: Final = 2000
ENGAGEMENT_NAMES: Final = frozenset(("engagement", "pageleave"))
_MAX_ENGAGEMENT_MS: Final = 30 * 24 * 3600 * 1000  # Plausible treats longer as missing

_MEDIA_TYPES: Final = frozenset((b"text/plain", b"application/json"))
_INTEGER: Final = re.compile(r"-?[0-9]{1,15}")
# Browsers serialise location.href and document.referrer with control characters and spaces percent-encoded; raw
# ones (and lone UTF-16 surrogates, which JSON "\\ud800" escapes can produce) are forged.
_URL_FORBIDDEN: Final = re.compile(r"[\x00-\x20\x7f\ud800-\udfff]")  # re escapes: no surrogate in the literal
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")

_OK: Final = b"ok"
_ALLOW: Final = (b"allow", b"POST, OPTIONS")


class _Reject(Exception):
    """Answer the request with this status and short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Disconnected(Exception):
    """The client went away while sending the body; there is nobody to answer."""


def _bad(reason: str) -> NoReturn:
    raise _Reject(400, reason)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # json.loads would otherwise accept NaN, Infinity and -Infinity


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError("number out of range")
    return value


def _too_deep(value: object) -> bool:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# One decoder for every request: json.loads(..., parse_constant=...) would build a decoder and scanner per call.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _loads(text: str) -> object:
    """Strict JSON: no NaN/Infinity, no out-of-range numbers, bounded nesting. Raises ``_Reject(400)``."""
    problem = ""
    try:
        # The C decoder guards its own recursion (RecursionError near the interpreter's limit, ~1000 levels).
        value = _DECODER.decode(text)
    except RecursionError:
        problem = "JSON nested too deeply"
    except ValueError:  # JSONDecodeError, NaN/Infinity, numbers beyond range or int digit limits
        problem = "malformed JSON"
    # Raised outside the except blocks, so the 400 does not drag the decoder's exception and frames along.
    if problem:
        _bad(problem)
    if _too_deep(value):
        _bad("JSON nested too deeply")
    return value


def _field(body: dict[str, Any], short: str, long: str) -> Any:
    # Plausible reads `body["n"] || body["name"]`: Elixir's || only skips nil and false.
    value = body.get(short)
    if value is None or value is False:
        value = body.get(long)
    return value


def _integer(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return None


def _origin_hostname(origin: str) -> str:
    return (urlsplit(origin).hostname or "").rstrip(".")


class BeaconEndpoint:
    """ASGI endpoint for the beacon; ``submit`` must not block (it hands the event to the dispatcher)."""

    __slots__ = (
        "_allowed_props",
        "_body_timeout",
        "_count_pageviews",
        "_custom_events",
        "_max_bytes",
        "_site_hosts",
        "_submit",
    )

    def __init__(
        self,
        settings: Settings,
        submit: Callable[[Event], None],
        *,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        analytics = settings.analytics
        self._submit = submit
        self._max_bytes = analytics.beacon_max_bytes
        self._body_timeout = body_timeout
        self._count_pageviews = analytics.pageviews == "beacon"
        self._custom_events = frozenset(analytics.custom_events)
        self._allowed_props = frozenset(analytics.allowed_props)
        # Empty: the site is whatever host the request was addressed to.
        self._site_hosts = frozenset(h for h in map(_origin_hostname, settings.site.origins) if h)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # nothing else is routed here; a websocket gets closed by the server when we return
        method = scope.get("method")
        if method == "OPTIONS":
            # A CORS preflight gets no Access-Control-Allow-* headers: the browser then refuses cross-origin use.
            await _respond(send, 204, b"", (_ALLOW,))
            return
        if method != "POST":
            await _respond(send, 405, b"method not allowed", (_ALLOW,))
            return
        try:
            dropped = await self._handle(scope, receive)
        except _Disconnected:
            return
        except _Reject as reject:
            logger.debug("beacon rejected: %d %s", reject.status, reject.reason)
            # After an early 413/408 the rest of the body is still on the wire: don't keep the connection.
            close = ((b"connection", b"close"),) if reject.status in (408, 413) else ()
            await _respond(send, reject.status, reject.reason.encode("ascii"), close)
            return
        except Exception:  # never a 500 for a beacon; the log line names no request data
            logger.exception("beacon handling failed")
            await _respond(send, 400, b"bad request")
            return
        await _respond(send, 202, _OK, ((b"x-plausible-dropped", b"1"),) if dropped else ())

    async def _handle(self, scope: Scope, receive: Receive) -> bool:
        """Validate and submit one beacon; return True when it was accepted but not forwarded."""
        content_type = content_length = user_agent = accept_language = None
        gpc = False
        headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
        for name, value in headers:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                if content_length is not None and value != content_length:
                    _bad("conflicting content-length")
                content_length = value
            elif name == b"content-encoding":
                raise _Reject(415, "content-encoding not supported")
            elif name == b"user-agent":
                user_agent = value.decode("latin-1")
            elif name == b"accept-language":
                accept_language = value.decode("latin-1")
            elif name == b"sec-gpc":
                gpc = value.strip() == b"1"
        if content_type is None or not _acceptable_content_type(content_type):
            raise _Reject(415, "content type must be text/plain or application/json")
        if content_length is not None:
            text = content_length.strip()
            if not text.isdigit() or len(text) > 18:
                _bad("bad content-length")
            if int(text) > self._max_bytes:
                raise _Reject(413, "body too large")

        body = await self._read_body(receive)
        event = self._event(scope, _decode_object(body), user_agent or "", accept_language or "", gpc)
        if event is None:
            return True
        try:
            self._submit(event)
        except Exception:  # the dispatcher's problem, not the visitor's: acknowledge, count as dropped
            logger.exception("beacon event could not be submitted")
            return True
        return False

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self._max_bytes
        body = bytearray()
        try:
            with anyio.fail_after(self._body_timeout):
                while True:
                    message = await receive()
                    kind = message["type"]
                    if kind == "http.disconnect":
                        raise _Disconnected
                    if kind != "http.request":
                        continue
                    chunk = message.get("body", b"")
                    if chunk:
                        if len(body) + len(chunk) > limit:  # stop here: at most the cap plus this chunk was read
                            raise _Reject(413, "body too large")
                        body += chunk
                    if not message.get("more_body", False):
                        return bytes(body)
        except TimeoutError:
            raise _Reject(408, "body not received in time") from None

    def _event(
        self, scope: Scope, body: dict[str, Any], user_agent: str, accept_language: str, gpc: bool
    ) -> Event | None:
        """The event to forward, ``None`` when valid but not forwarded; raises ``_Reject(400)`` when invalid."""
        name = _field(body, "n", "name")
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)  # Plausible casts integers (404 tracking sends status codes as names)
        if not isinstance(name, str) or not name.strip():
            _bad("name is required")
        if _SURROGATE.search(name):
            _bad("name is not valid")
        if len(name) > MAX_NAME_CHARS:
            _bad("name is too long")
        url = self._url(scope, _field(body, "u", "url"))
        props = self._props(body)
        referrer = _field(body, "r", "referrer")
        if not isinstance(referrer, str) or _URL_FORBIDDEN.search(referrer):
            referrer = ""  # optional: a malformed referrer is dropped rather than failing the event
        referrer = referrer[:MAX_REFERRER_CHARS]

        if name in ENGAGEMENT_NAMES:
            _check_engagement(body)
            return None
        if name == PAGEVIEW:
            if not self._count_pageviews:
                return None
        elif name not in self._custom_events:
            return None
        if is_bot(user_agent):
            return None

        state = scope.get("state")
        context = state.get(STATE_KEY) if isinstance(state, dict) else None
        if not isinstance(context, PrivacyContext):
            # Mounted without the middleware: no address and no consent is known, so the event carries none.
            context = PrivacyContext(ip="", country="", gpc=gpc)
        return Event(
            name=name,
            url=url,
            referrer=referrer,
            language=primary_language(accept_language),
            user_agent=user_agent,
            country=context.country,
            ip=context.ip,
            granted=context.granted,
            gpc=context.gpc,
            client_id=context.client_id,
            props=props,
            source="beacon",
        )

    def _url(self, scope: Scope, url: object) -> str:
        if not isinstance(url, str) or not url:
            _bad("url is required")
        if len(url.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES:
            _bad("url is too long")
        if _URL_FORBIDDEN.search(url):
            _bad("url is not valid")
        try:
            parts = urlsplit(url)
            hostname = parts.hostname
            port = parts.port  # raises ValueError for a non-numeric or out-of-range port
        except ValueError:
            _bad("url is not valid")
        if parts.scheme not in ("http", "https") or not hostname:
            _bad("url must be http(s)")
        if "\\" in parts.netloc:
            # WHATWG URL parsing treats "\\" like "/" in http(s) URLs: a browser reads "https://evil\\@site/" as host
            # "evil" where urlsplit sees "site" (https://url.spec.whatwg.org/#authority-state). Refuse the ambiguity.
            _bad("url is not valid")
        hostname = hostname.rstrip(".")
        site_hosts = self._site_hosts or frozenset((request_hostname(scope),))
        if hostname not in site_hosts:
            _bad("url not on this site")
        if "@" in parts.netloc:
            # Credentials typed into the address bar show up in location.href; they never leave the gateway.
            netloc = f"[{hostname}]" if ":" in hostname else hostname
            if port is not None:
                netloc = f"{netloc}:{port}"
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return url

    def _props(self, body: dict[str, Any]) -> dict[str, str]:
        raw: Any = None
        for key in ("m", "meta", "p", "props"):  # Plausible's precedence, legacy names first
            raw = body.get(key)
            if raw is not None and raw is not False:
                break
        if isinstance(raw, str):  # historic trackers (and "m") send the props as a JSON string
            try:
                raw = _loads(raw)
            except _Reject:
                return {}
        if not isinstance(raw, dict) or not self._allowed_props:
            return {}
        props: dict[str, str] = {}
        for key, value in raw.items():
            if key not in self._allowed_props:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str | int | float):
                text = str(value)
            else:
                continue  # lists, objects and null are dropped, as Plausible does
            if not text.strip() or _SURROGATE.search(text):
                continue
            if len(text.encode("utf-8", "surrogatepass")) > MAX_PROP_VALUE_BYTES:
                _bad("prop values must be at most 2000 bytes")
            props[key] = text
            if len(props) == MAX_PROPS:
                break
        return props


def _acceptable_content_type(value: bytes) -> bool:
    media_type, _, parameters = value.partition(b";")
    if media_type.strip().lower() not in _MEDIA_TYPES:
        return False
    for parameter in parameters.split(b";"):
        key, _, param_value = parameter.partition(b"=")
        if key.strip().lower() == b"charset" and param_value.strip().strip(b'"').lower() not in (b"utf-8", b"utf8"):
            return False  # the body is decoded as UTF-8 and nothing else
    return True


def _decode_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        _bad("body is not UTF-8")
    value = _loads(text)
    if not isinstance(value, dict):
        _bad("body must be a JSON object")
    return value


def _check_engagement(body: dict[str, Any]) -> None:
    # Plausible answers 400 unless sd (0..100, clamped) or e (0 <= ms < 30 days) is a valid integer.
    scroll_depth = _integer(body.get("sd"))
    engaged_ms = _integer(body.get("e"))
    if not (scroll_depth is not None and scroll_depth >= 0) and not (
        engaged_ms is not None and 0 <= engaged_ms < _MAX_ENGAGEMENT_MS
    ):
        _bad("engagement event requires a valid integer value for at least one of 'sd' or 'e'")


async def _respond(send: Send, status: int, body: bytes, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    if status == 204:
        headers = [(b"cache-control", b"no-store"), *extra_headers]  # RFC 9110 §8.6: no Content-Length on 204
    else:
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            *extra_headers,
        ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
