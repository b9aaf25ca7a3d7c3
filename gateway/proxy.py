"""The standalone mode's reverse proxy: a raw ASGI app that relays requests to one configured upstream.

It sits behind the privacy middleware, so ``scope["client"][0]`` is already the truncated address; that is the
only client address the upstream ever sees. The rules (security.md T4-T6):

- **No open proxy.** The upstream origin is fixed by configuration. The request target must be origin-form
  (``/path``, never ``//host`` or ``http://host/``), ``CONNECT`` and ``OPTIONS *`` are refused, and only the
  methods in :data:`ALLOWED_METHODS` pass. The visitor's ``Host`` only ever becomes ``X-Forwarded-Host``.
- **Forwarding headers are ours alone.** Every inbound ``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``,
  ``Fastly-Client-IP`` and similar header is dropped, then ``X-Forwarded-For`` (the truncated IP),
  ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are set.
- **Hop-by-hop headers are stripped both ways** (RFC 9110 §7.6.1), including every header named in
  ``Connection``; message framing is recomputed, so a CL+TE request cannot desync the upstream (RFC 9112 §6.1).
  ``Upgrade`` never travels and ``101`` never comes back (h2c smuggling). ``Sec-GPC: 1`` always travels: the GPC
  spec says intermediaries MUST NOT remove it.
- **Streaming both ways** with bounded buffers; response bytes are relayed untouched (``Content-Encoding`` too).
- **No cookie jar**: nothing from one visitor's response can be attached to another visitor's request.
- **Faults are short and generic**: 502 "Bad Gateway" / 504 "Gateway Timeout" before the response started; after
  it started, the response is left incomplete so the server closes the connection and the visitor sees a
  truncated transfer, never a silently shortened "complete" one.

Speaks raw ASGI on purpose: Starlette's ``StreamingResponse`` alone costs ~270 µs per response (issue 3).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Final, TypeAlias, cast
from urllib.parse import quote, urlsplit

from starlette.types import Message, Receive, Scope, Send

from gateway.clientip import FORWARDING_HEADERS as CLIENT_ADDRESS_HEADERS
from gateway.config import ConfigError, UpstreamSettings
from gateway.upstream import UpstreamClient, UpstreamError, UpstreamResponse, UpstreamTimeout

__all__ = ["ALLOWED_METHODS", "ReverseProxy"]

logger = logging.getLogger("gateway.proxy")

# Methods relayed to the upstream. CONNECT would open a tunnel and TRACE reflects the request (with cookies);
# neither has a place in front of a website.
ALLOWED_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_METHOD_BYTES: Final = {method: method.encode("ascii") for method in ALLOWED_METHODS}

# Hop-by-hop fields (RFC 9110 §7.6.1, RFC 9113 §8.2.2 for HTTP2-Settings) and the proxy-auth pair, which belong
# to the connection between a client and this proxy, not to the upstream (and vice versa).
HOP_BY_HOP_HEADERS: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Headers that carry (or claim to carry) a client address: one list, gateway.clientip's. Only the gateway sets
# X-Forwarded-For; anything a visitor sends could be spoofed or hold the full IP. Any "x-forwarded-*" name is
# dropped as well.
# X-Forwarded-* are dropped by prefix below, and the proxy sets its own X-Forwarded-For/-Proto/-Host.
FORWARDING_HEADERS: Final = frozenset(n for n in CLIENT_ADDRESS_HEADERS if not n.startswith(b"x-forwarded"))
# Never dropped because Connection names them: "HTTP intermediaries MUST NOT remove a Sec-GPC header set to 1"
# (https://privacycg.github.io/gpc-spec/#the-sec-gpc-header-field-for-http-requests).
_PROTECTED_HEADERS: Final = frozenset({b"sec-gpc"})

# A header field as the proxy passes it along. Typed as a variable-length tuple on purpose: compiled, a
# ``tuple[bytes, bytes]`` is unpacked into a C struct, and appending it to another list would allocate a new tuple
# for every field; a ``tuple[bytes, ...]`` stays the very object the server (or the upstream client) made.
_Field: TypeAlias = tuple[bytes, ...]


# How each request header name is treated; names seen at runtime are memoised (bounded) in _REQUEST_KIND.
_FORWARD, _DROP, _HOST, _CONNECTION, _CONTENT_LENGTH, _TRANSFER_ENCODING = range(6)
_REQUEST_KIND: dict[bytes, int] = {name: _DROP for name in HOP_BY_HOP_HEADERS | FORWARDING_HEADERS}
_REQUEST_KIND.update(
    {
        b"host": _HOST,
        b"connection": _CONNECTION,
        b"content-length": _CONTENT_LENGTH,
        b"transfer-encoding": _TRANSFER_ENCODING,
        # The ASGI server answers "100 Continue" itself when the body is read; the upstream gets the body anyway.
        b"expect": _DROP,
    }
)
_REQUEST_KIND_LIMIT = 4096
_RESPONSE_KIND: dict[bytes, int] = {name: _DROP for name in HOP_BY_HOP_HEADERS}
_RESPONSE_KIND.update({b"connection": _CONNECTION, b"content-length": _CONTENT_LENGTH})
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})

# Characters left as they are when a path is percent-encoded (RFC 3986 pchar plus "/"); "%" only for the
# configured base path, which is already in its encoded form.
_PATH_SAFE_DECODED: Final = "/!$&'()*+,;=:@-._~"
_PATH_SAFE: Final = _PATH_SAFE_DECODED + "%"
_CLIENT_ADDRESS = re.compile(r"[0-9A-Fa-f.:]{2,45}")
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_STREAMED_VERSIONS: Final = frozenset({"1.0", "1.1"})

_FORWARDED_PROTO: Final[dict[str, _Field]] = {
    "http": (b"x-forwarded-proto", b"http"),
    "https": (b"x-forwarded-proto", b"https"),
}

_MSG_BROKEN_BODY: Final = "malformed response body from the upstream"
_TEXT_HEADERS: Final = (b"content-type", b"text/plain; charset=utf-8")
_NO_STORE: Final = (b"cache-control", b"no-store")


def _kind(name: bytes) -> int:
    kind = _REQUEST_KIND.get(name)
    if kind is None:
        kind = _DROP if name.startswith(b"x-forwarded") else _FORWARD
        if len(_REQUEST_KIND) < _REQUEST_KIND_LIMIT:
            _REQUEST_KIND[name] = kind
    return kind


_ADDRESS_CACHE: dict[str, _Field | None] = {}


def _forwarded_for(address: str) -> _Field | None:
    """The X-Forwarded-For field for a (truncated) client address; None if it does not look like an IP.

    Memoised (the whole field, so nothing is allocated): truncated addresses repeat constantly, and this runs on
    every request.
    """
    try:
        return _ADDRESS_CACHE[address]
    except KeyError:
        pass
    value: _Field | None = (b"x-forwarded-for", address.encode("ascii")) if _CLIENT_ADDRESS.fullmatch(address) else None
    if len(_ADDRESS_CACHE) >= _REQUEST_KIND_LIMIT:
        _ADDRESS_CACHE.clear()
    _ADDRESS_CACHE[address] = value
    return value


def _connection_tokens(values: list[bytes]) -> set[bytes]:
    """Header names listed in Connection that still need removing (hop-by-hop ones are removed anyway)."""
    tokens = {token.strip().lower() for value in values for token in value.split(b",")}
    return tokens - HOP_BY_HOP_HEADERS - _PROTECTED_HEADERS


class _Refused(Exception):
    """The request is answered here (``messages``) instead of being relayed."""

    def __init__(self, messages: tuple[Message, Message]) -> None:
        super().__init__()
        self.messages = messages


class _ClientDisconnected(Exception):
    """The visitor went away while the request body was being relayed."""


class _RequestBody:
    """The rest of the ASGI request body as an async iterator (the first message was read already)."""

    __slots__ = ("_done", "_first", "_receive")

    def __init__(self, first: bytes, receive: Receive) -> None:
        self._first: bytes | None = first
        self._receive = receive
        self._done = False

    def __aiter__(self) -> _RequestBody:
        return self

    async def __anext__(self) -> bytes:
        first = self._first
        if first is not None:
            self._first = None
            return first
        if self._done:
            raise StopAsyncIteration
        message = await self._receive()
        if message["type"] != "http.request":
            raise _ClientDisconnected
        if not message.get("more_body", False):
            self._done = True
        body: bytes = message.get("body", b"")
        return body


async def _close_on_disconnect(receive: Receive, response: UpstreamResponse) -> None:
    """Abandon the upstream response as soon as the visitor disconnects (long downloads, event streams)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: S110 - a broken receive channel means the visitor is gone as well
        pass
    response.close()


def _error_messages(status: int, text: bytes) -> tuple[Message, Message]:
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [_TEXT_HEADERS, (b"content-length", str(len(text)).encode("ascii")), _NO_STORE],
    }
    return start, {"type": "http.response.body", "body": text}


_BAD_GATEWAY: Final = _error_messages(502, b"Bad Gateway\n")
_GATEWAY_TIMEOUT: Final = _error_messages(504, b"Gateway Timeout\n")
_BAD_METHOD: Final = _error_messages(400, b"Bad Request: method not allowed\n")
_BAD_TARGET: Final = _error_messages(400, b"Bad Request: the request target must be a path\n")
_BAD_FRAMING: Final = _error_messages(400, b"Bad Request: invalid message framing\n")
_BAD_REQUEST: Final = _error_messages(400, b"Bad Request\n")


async def _answer(send: Send, messages: tuple[Message, Message]) -> None:
    await send(messages[0])
    await send(messages[1])


class ReverseProxy:
    """ASGI app relaying ``http`` requests to ``settings.url``; ``websocket`` is refused, ``lifespan`` handled.

    The upstream URL is the configured base plus the request's raw path and query, nothing else. Call
    :meth:`startup` / :meth:`shutdown` (or let the ASGI lifespan do it); :meth:`ready` tells whether the
    upstream accepts connections now.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        if not settings.url:
            raise ConfigError("upstream.url", settings.url, "is required to run the reverse proxy")
        parts = urlsplit(settings.url)
        if parts.query or parts.fragment:
            raise ConfigError("upstream.url", settings.url, "must not have a query or fragment")
        self._settings = settings
        # "https://origin/app/" + "/x" -> "/app/x": the base path is a prefix, never a second slash.
        self._prefix = quote(parts.path.rstrip("/"), safe=_PATH_SAFE).encode("ascii")
        self._preserve_host = settings.preserve_host
        try:
            self._client = self._new_client()
        except ValueError as exc:
            raise ConfigError("upstream.url", settings.url, "is not an http(s) URL") from exc
        self._upstream_host = self._client.authority

    def _new_client(self) -> UpstreamClient:
        s = self._settings
        return UpstreamClient(
            s.url,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            write_timeout=s.write_timeout,
            max_idle=s.pool_size,
        )

    @property
    def client(self) -> UpstreamClient:
        """The upstream connection pool (exposed for metrics and tests)."""
        return self._client

    async def startup(self) -> None:
        """Prepare the pool. Connections are opened lazily on first use."""
        if self._client.closed:
            self._client = self._new_client()

    async def shutdown(self) -> None:
        """Close every upstream connection."""
        await self._client.aclose()

    async def ready(self) -> bool:
        """Whether a TCP (and TLS) connection to the upstream can be made right now."""
        return await self._client.probe()

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "websocket":
            # Nothing upstream is reachable over WebSocket; closing before accepting makes the server answer 403.
            await receive()
            await send({"type": "websocket.close", "code": 1008})
        elif scope_type == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The http path is inline (not a helper coroutine): every awaited frame costs on each request. What does
        # not await runs in plain functions instead, whose locals (compiled) are C variables rather than fields of
        # the coroutine object.
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        try:
            method, target, fields, host, content_length, has_body = self._outbound(
                scope if isinstance(scope, dict) else dict(scope)
            )
        except _Refused as refused:
            await _answer(send, refused.messages)
            return
        body: bytes | _RequestBody | None = None
        if has_body:
            message = await receive()
            if message["type"] != "http.request":
                return  # the visitor is gone
            first: bytes = message.get("body", b"")
            body = _RequestBody(first, receive) if message.get("more_body", False) else first

        try:
            response = await self._client.request(
                method,
                target,
                cast("list[tuple[bytes, bytes]]", fields),
                host=host,
                body=body,
                content_length=content_length,
            )
        # Distinct names per handler: compiled, one name has one type, so a shared "exc" would be typed
        # UpstreamTimeout and the second handler would fail with a TypeError on any other UpstreamError.
        except UpstreamTimeout as timeout:
            logger.warning("upstream timeout: %s", timeout)
            await _answer(send, _GATEWAY_TIMEOUT)
            return
        except UpstreamError as error:
            logger.warning("upstream error: %s", error)
            await _answer(send, _BAD_GATEWAY)
            return
        except _ClientDisconnected:
            return
        except ValueError:
            # A CR/LF/NUL in the head, or a body that does not match its declared length.
            await _answer(send, _BAD_REQUEST)
            return

        try:
            if response.complete:
                # Common case: the whole (small) response arrived with its head. One body message, and a
                # Content-Length instead of chunked framing when the upstream had chunked it.
                start, last = _complete_response(response, method == b"HEAD")
                await send(start)
                await send(last)
            elif response.failed:
                # Broken in the same packet as the head: nothing was sent yet, so the visitor still gets a 502.
                logger.warning("upstream error: %s", _MSG_BROKEN_BODY)
                await _answer(send, _BAD_GATEWAY)
            else:
                headers, _ = _response_headers(response.headers)
                await send({"type": "http.response.start", "status": response.status, "headers": headers})
                await _stream_body(response, receive, send)
        finally:
            response.close()

    def _outbound(self, scope: dict[str, Any]) -> tuple[bytes, bytes, list[_Field], bytes, int | None, bool]:
        """What to send upstream: method, target, header fields, Host, declared body length, whether a body follows.

        Raises :class:`_Refused` for a request that must not be relayed. A plain tuple rather than an object:
        compiled, it is returned as a C struct, without an allocation.
        """
        method = _METHOD_BYTES.get(scope["method"])
        if method is None:
            raise _Refused(_BAD_METHOD)
        raw_path: bytes | None = scope.get("raw_path")
        if raw_path is None:
            raw_path = quote(scope["path"], safe=_PATH_SAFE_DECODED).encode("ascii")
        # Origin-form only (RFC 9112 §3.2.1). "OPTIONS *" (asterisk-form), an absolute-form target (h11 passes it
        # through as the path, security.md P5) and "//host/x" (a scheme-relative URL to naive URL joiners) stop here.
        if not raw_path.startswith(b"/") or raw_path.startswith(b"//"):
            raise _Refused(_BAD_TARGET)
        target = self._prefix + raw_path if self._prefix else raw_path
        query: bytes = scope["query_string"]
        if query:
            target = b"".join((target, b"?", query))

        raw_fields = scope["headers"]
        try:
            fields, host, connection, content_length, transfer_encoding = _split_fields(raw_fields)
        except TypeError:
            # Not a list of (bytes, bytes) tuples: ASGI allows any iterable of pairs, and compiled code checks types.
            pairs: list[_Field] = [(bytes(name), bytes(value)) for name, value in raw_fields]
            fields, host, connection, content_length, transfer_encoding = _split_fields(pairs)
        if connection is not None:
            named = _connection_tokens(connection)
            if named:
                fields = [field for field in fields if field[0] not in named]

        client = scope.get("client")
        if client:
            forwarded_for = _forwarded_for(client[0])
            if forwarded_for is not None:
                fields.append(forwarded_for)
        proto = _FORWARDED_PROTO.get(scope.get("scheme", "http"))
        if proto is not None:
            fields.append(proto)
        if host is not None:
            fields.append((b"x-forwarded-host", host))

        declared_length: int | None = None
        has_body = (
            content_length is not None
            or transfer_encoding is not None
            or scope.get("http_version", "1.1") not in _STREAMED_VERSIONS
        )
        if content_length is not None:
            # RFC 9112 §6.1: CL together with TE "ought to be handled as an error"; h11 would let TE win.
            if transfer_encoding is not None or not content_length.isdigit():
                raise _Refused(_BAD_FRAMING)
            declared_length = int(content_length)
        upstream_host = host if self._preserve_host and host is not None else self._upstream_host
        return method, target, fields, upstream_host, declared_length, has_body


def _split_fields(
    raw: list[_Field],
) -> tuple[list[_Field], bytes | None, list[bytes] | None, bytes | None, bytes | None]:
    """One pass over the request's header fields: (fields to forward, Host, Connection values, CL, TE)."""
    fields: list[_Field] = []
    host: bytes | None = None
    connection: list[bytes] | None = None
    content_length: bytes | None = None
    transfer_encoding: bytes | None = None
    kinds = _REQUEST_KIND
    for field in raw:
        name = field[0]
        kind = kinds.get(name)
        if kind is None:
            kind = _kind(name)
        if kind == _FORWARD:
            fields.append(field)
        elif kind == _DROP:
            pass
        elif kind == _HOST:
            host = field[1]
        elif kind == _CONNECTION:
            if connection is None:
                connection = [field[1]]
            else:
                connection.append(field[1])
        elif kind == _CONTENT_LENGTH:
            content_length = field[1]
        elif kind == _TRANSFER_ENCODING:
            transfer_encoding = field[1]
    return fields, host, connection, content_length, transfer_encoding


def _complete_response(response: UpstreamResponse, head_request: bool) -> tuple[Message, Message]:
    """The two ASGI messages for a response whose body has arrived completely; frees the upstream connection."""
    status = response.status
    headers, has_length = _response_headers(response.headers)
    body = response.read_complete()
    if not has_length and not head_request and status not in _NO_BODY_STATUSES:
        headers.append((b"content-length", str(len(body)).encode("ascii")))
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


def _response_headers(upstream_headers: list[tuple[bytes, bytes]]) -> tuple[list[_Field], bool]:
    """The upstream's header fields minus hop-by-hop ones, and whether Content-Length is among them."""
    headers: list[_Field] = []
    connection: list[bytes] | None = None
    has_length = False
    kinds = _RESPONSE_KIND
    for field in cast("list[_Field]", upstream_headers):  # the tuples themselves, see _Field
        kind = kinds.get(field[0])
        if kind is None:
            headers.append(field)
        elif kind == _CONTENT_LENGTH:
            has_length = True
            headers.append(field)
        elif kind == _CONNECTION:
            if connection is None:
                connection = [field[1]]
            else:
                connection.append(field[1])
    # "Connection: keep-alive" (or close) names only hop-by-hop headers; skip the token parsing for it.
    if connection is not None and (len(connection) > 1 or connection[0].lower() not in _PLAIN_CONNECTION):
        named = _connection_tokens(connection)
        if named:
            headers = [field for field in headers if field[0] not in named]
    return headers, has_length


async def _stream_body(response: UpstreamResponse, receive: Receive, send: Send) -> None:
    """Relay a body that is still arriving, piece by piece, until it ends, fails, or the visitor leaves."""
    watcher = asyncio.ensure_future(_close_on_disconnect(receive, response))
    try:
        while True:
            body = await response.read()
            if response.finished:
                await send({"type": "http.response.body", "body": body})
                return
            if body:
                await send({"type": "http.response.body", "body": body, "more_body": True})
    except UpstreamError as exc:
        if not watcher.done():
            logger.warning("upstream failed mid-response: %s", exc)
        # Returning without the final body message leaves the response incomplete: the server closes the
        # connection, so the visitor (and any cache) sees a truncated transfer rather than a complete one.
    except OSError:
        pass  # the visitor disconnected (servers may raise on send after a disconnect, ASGI spec 2.4)
    finally:
        watcher.cancel()
