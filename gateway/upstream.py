"""A small keep-alive HTTP/1.1 client for exactly one upstream origin: the reverse proxy's data path.

Why not httpx or aiohttp: the proxy must reach a quarter of nginx ``proxy_pass`` throughput (GitHub issue 3).
Measured on the project machine, a shared ``httpx.AsyncClient`` costs ~0.8 ms of CPU per request (0.012 of
nginx) and aiohttp reaches 0.13-0.18, while a minimal client on ``httptools`` reached ~0.2. This one keeps the
per-request work to one ``transport.write`` of a pre-joined head, one llhttp parse and a handful of callbacks,
using asyncio Protocols rather than streams (no StreamReader buffer copies, no extra tasks).

What it does and does not do, on purpose:

- One origin (scheme, host, port) fixed at construction, so it cannot be steered to another host (no open proxy).
- No cookie jar, no redirects, no proxies from the environment, no content decoding: bytes are relayed raw.
- A bounded LIFO stack of idle keep-alive connections (``max_idle``, like nginx ``keepalive N``); concurrency
  itself is not limited, surplus connections are closed when they are released.
- Request bodies: ``bytes`` (sent with ``Content-Length``) or an async iterable streamed with flow control, with
  ``Content-Length`` when the caller knows it and chunked otherwise (RFC 9112 §6, §7.1).
- Response bodies are streamed with a bounded buffer: reading from the socket pauses above ``_BODY_HIGH_WATER``.
- Interim 1xx responses are swallowed (RFC 9110 §15.2); ``101 Switching Protocols`` was never asked for, so it is a
  protocol error (h2c smuggling, security.md T4).
- A request sent on a reused idle connection that the server closed before answering is retried once on a fresh
  connection, only when the method is idempotent (RFC 9110 §9.2.2) and the body can be replayed (RFC 9112 §9.3.1).

Errors are :class:`UpstreamError` subclasses with constant messages (no request data in them): timeouts are
:class:`UpstreamTimeout`, everything else means the upstream did not deliver a usable response.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import typing
from collections.abc import AsyncIterable, Sequence
from typing import Final
from urllib.parse import urlsplit

import httptools

__all__ = [
    "IDEMPOTENT_METHODS",
    "ConnectError",
    "ConnectTimeout",
    "ProtocolError",
    "ReadTimeout",
    "RemoteClosed",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "WriteTimeout",
]


class UpstreamError(Exception):
    """The upstream did not deliver a complete, well-formed response."""


class ConnectError(UpstreamError):
    """No TCP (or TLS) connection could be made: refused, unreachable, unresolvable, handshake failed."""


class UpstreamTimeout(UpstreamError):
    """A connect, read or write deadline passed."""


class ConnectTimeout(UpstreamTimeout):
    pass


class ReadTimeout(UpstreamTimeout):
    pass


class WriteTimeout(UpstreamTimeout):
    pass


class ProtocolError(UpstreamError):
    """The upstream's bytes are not an acceptable HTTP/1.1 response (garbage, bad framing, too large, 101...)."""


class RemoteClosed(UpstreamError):
    """The upstream closed or reset the connection before the response was complete."""


# RFC 9110 §9.2.2. Only these may be replayed after a stale keep-alive connection swallowed the first attempt.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Methods whose requests carry content by definition: send "content-length: 0" when there is none, since some
# servers answer 411 Length Required otherwise (RFC 9110 §8.6: a user agent SHOULD send it).
_CONTENT_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

# Largest response head (status line + header fields, and likewise trailers) accepted. nginx's default
# proxy_buffer_size is 4-8 KiB, Node's --max-http-header-size 16 KiB; 64 KiB leaves room for fat Set-Cookie
# and CSP headers while keeping a hostile upstream from growing memory without bound.
DEFAULT_MAX_HEAD_BYTES = 64 * 1024
# Response body bytes buffered per connection before the socket stops being read (back-pressure).
_BODY_HIGH_WATER = 256 * 1024
# Request bodies up to this size are written together with the head in one send.
_COALESCE_LIMIT = 16 * 1024
# An idle connection older than this is not reused. Common upstream keep-alive timeouts are 5 s (uvicorn,
# Apache, Node) or 2 s (gunicorn); staying under them avoids most races with a server that is closing the socket.
DEFAULT_IDLE_TIMEOUT = 4.0

_BYTES_TYPES = (bytes, bytearray, memoryview)
# Whitespace and controls cannot appear in a request line's method or target (RFC 9112 §3). Checked with
# bytes.translate (deleting them must not shorten the value): a C loop without the ~150 ns a regex call costs.
_NOT_IN_REQUEST_LINE: Final = bytes(range(0x21)) + b"\x7f"
# Methods already known to be tokens, so the common ones skip the check above.
_TOKEN_METHODS: Final = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"TRACE"})
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})

# Response header names as servers commonly spell them, mapped to one shared lower-case object each. Looking a
# name up here costs less than bytes.lower() (a method call and an allocation), and the shared objects carry a
# cached hash, so the proxy's later set and dict lookups on them do not hash the name again. Names not listed
# are lower-cased and learned (bounded: a hostile upstream cannot grow this without limit).
_COMMON_RESPONSE_FIELDS: Final = (
    b"accept-ranges", b"access-control-allow-credentials", b"access-control-allow-headers",
    b"access-control-allow-methods", b"access-control-allow-origin", b"access-control-expose-headers",
    b"access-control-max-age", b"age", b"alt-svc", b"cache-control", b"connection", b"content-disposition",
    b"content-encoding", b"content-language", b"content-length", b"content-location", b"content-range",
    b"content-security-policy", b"content-security-policy-report-only", b"content-type",
    b"cross-origin-embedder-policy", b"cross-origin-opener-policy", b"cross-origin-resource-policy", b"date",
    b"etag", b"expires", b"keep-alive", b"last-modified", b"link", b"location", b"permissions-policy", b"pragma",
    b"proxy-authenticate", b"proxy-connection", b"referrer-policy", b"retry-after", b"server", b"server-timing",
    b"set-cookie", b"strict-transport-security", b"timing-allow-origin", b"trailer", b"transfer-encoding",
    b"upgrade", b"vary", b"via", b"www-authenticate", b"x-content-type-options", b"x-frame-options",
    b"x-powered-by", b"x-request-id", b"x-xss-protection",
)  # fmt: skip


def _field_name_table() -> dict[bytes, bytes]:
    table: dict[bytes, bytes] = {}
    for name in _COMMON_RESPONSE_FIELDS:
        table[name] = name
        table[b"-".join(part.capitalize() for part in name.split(b"-"))] = name  # Content-Type
    table.update({b"ETag": b"etag", b"WWW-Authenticate": b"www-authenticate", b"X-XSS-Protection": b"x-xss-protection"})
    return table


_FIELD_NAMES: dict[bytes, bytes] = _field_name_table()
# Bounds for learning names that are not in the table above.
_FIELD_NAMES_LIMIT: Final = 1024
_LEARNED_NAME_MAX: Final = 64

_MSG_REFUSED = "could not connect to the upstream"
_MSG_CONNECT_TIMEOUT = "timed out connecting to the upstream"
_MSG_READ_TIMEOUT = "timed out waiting for the upstream response"
_MSG_WRITE_TIMEOUT = "timed out sending the request to the upstream"
_MSG_MALFORMED = "malformed response from the upstream"
_MSG_HEAD_TOO_LARGE = "upstream response head too large"
_MSG_SWITCHED = "upstream switched protocols (101) without being asked to"
_MSG_CLOSED = "upstream closed the connection before the response was complete"
_MSG_SHUTDOWN = "upstream client is closed"


class _StopParsing(Exception):
    """Raised inside a parser callback to make httptools stop; the reason is kept on the connection."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the state of the response currently being read from it.

    All parsing happens in ``data_received``; the coroutine side (``UpstreamClient.request`` and
    ``UpstreamResponse.read``) only inspects the state and sleeps on ``_waiter`` until something changes.
    """

    __slots__ = (
        "_body",
        "_body_size",
        "_client",
        "_deadline",
        "_error",
        "_head_bytes",
        "_head_done",
        "_headers",
        "_interim",
        "_keep_alive",
        "_loop",
        "_max_head_bytes",
        "_message_done",
        "_nonbody_bytes",
        "_parser",
        "_read_paused",
        "_skip_body",
        "_stop_reason",
        "_waiter",
        "active",
        "closed",
        "headers",
        "idle_since",
        "received_any",
        "requests_sent",
        "reusable",
        "status",
        "transport",
        "write_paused",
    )

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client
        self._loop = client.loop
        self._max_head_bytes = client.max_head_bytes
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.active = False  # a request is in flight
        self.write_paused = False
        self.idle_since = 0.0
        self.requests_sent = 0
        self._waiter: asyncio.Future[bool] | None = None
        self._deadline = 0.0
        self._read_paused = False
        # State of the response in flight. A connection that saw an error is never reused, and a released one
        # has an empty body buffer, so _begin() only resets what a clean response changes.
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # the final response's header fields
        self._headers: list[tuple[bytes, bytes]] = []  # fields being parsed (then trailers, which are dropped)
        self.received_any = False
        self._skip_body = False  # a HEAD request: no body follows, whatever the headers say
        self._head_bytes = 0
        self._nonbody_bytes = 0
        self._interim = False
        self._head_done = False
        self._message_done = False
        self._keep_alive = True
        self._body: list[bytes] = []
        self._body_size = 0
        self._error: UpstreamError | None = None
        self._stop_reason: UpstreamError | None = None

    def _begin(self, *, skip_body: bool) -> None:
        self.active = True
        self.requests_sent += 1
        self._skip_body = skip_body
        self.received_any = False
        self._head_bytes = 0
        self._nonbody_bytes = 0
        self._head_done = False
        self._message_done = False
        self._headers = []

    # -- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = typing.cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self._client._forget(self)
        if self.active and not self._message_done and self._error is None:
            if exc is None and self._body_ends_at_close():
                # RFC 9112 §6.3 rule 8: without Content-Length or chunked framing the body ends at close.
                self._message_done = True
            else:
                self._error = RemoteClosed(_MSG_CLOSED)
        self._wake()

    def _body_ends_at_close(self) -> bool:
        # RFC 9112 §6.3: a response with neither Content-Length nor Transfer-Encoding (and a status that has
        # a body) is delimited by the connection closing. Decided here, on the rare path, not per header.
        return (
            self._head_done
            and self.status != 204
            and self.status != 304
            and not any(name in _FRAMING_HEADERS for name, _ in self.headers)
        )

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes on an idle connection answer nothing we asked: the stream is out of sync, never reuse it.
            self._discard()
            return
        self.received_any = True
        self._nonbody_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._message_done:
                # The response is complete (a HEAD response stopped on purpose, or bytes trailing a complete
                # response): keep what we have, but the connection is no longer in a known state.
                self.reusable = False
            else:
                self._fail(self._stop_reason or ProtocolError(_MSG_MALFORMED))
        except httptools.HttpParserUpgrade:  # 101 with an Upgrade header, if on_headers_complete let it pass
            self._fail(ProtocolError(_MSG_SWITCHED))
        # Bytes that produced no body (head, chunk-size lines and extensions, trailers, 1xx responses) are
        # bounded, so a hostile upstream cannot make httptools accumulate an endless header value.
        if self._nonbody_bytes > self._max_head_bytes and not self._message_done and self._error is None:
            self._fail(ProtocolError(_MSG_HEAD_TOO_LARGE))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    # -- httptools callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._message_done:
            raise _StopParsing  # more bytes after a complete response; data_received marks us unusable

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called once per field (header, or trailer after the head: those land in a list nobody reads, since
        # trailers cannot be forwarded after the body has gone out; RFC 9112 §7.1.2).
        size = self._head_bytes + len(name) + len(value) + 4
        self._head_bytes = size
        if size > self._max_head_bytes:
            self._stop_reason = ProtocolError(_MSG_HEAD_TOO_LARGE)
            raise _StopParsing
        lowered = _FIELD_NAMES.get(name)
        if lowered is None:
            lowered = name.lower()
            if len(name) <= _LEARNED_NAME_MAX and len(_FIELD_NAMES) < _FIELD_NAMES_LIMIT:
                _FIELD_NAMES[name] = lowered
        self._headers.append((lowered, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                self._stop_reason = ProtocolError(_MSG_SWITCHED)
                raise _StopParsing
            # 1xx interim responses (100 Continue, 103 Early Hints) are never relayed; the final one follows.
            self._interim = True
            self._headers = []
            return
        if status > 599:
            # llhttp accepts any three digits; RFC 9110 §15 defines 1xx-5xx only and ASGI servers reject the rest.
            self._stop_reason = ProtocolError(_MSG_MALFORMED)
            raise _StopParsing
        self.status = status
        self.headers = self._headers
        self._headers = []
        self._head_done = True
        self._keep_alive = self._parser.should_keep_alive()
        if self._skip_body:
            # A HEAD response has no body even with Content-Length (RFC 9110 §9.3.2). httptools cannot be told
            # to skip it, so parsing stops here and the connection is not reused.
            self._message_done = True
            self.reusable = False
            raise _StopParsing

    def on_body(self, body: bytes) -> None:
        self._nonbody_bytes = 0
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > _BODY_HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._message_done = True

    # -- helpers used by the client and the response ----------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _arm(self, timeout: float) -> asyncio.Future[bool]:
        """A future the protocol resolves with True on progress, or the sweep with False after ``timeout``.

        Callers ``await`` it directly (no helper coroutine per wait). The deadline is enforced by the client's
        periodic sweep rather than a timer per wait: arming and cancelling a timer costs ~2 µs, a tenth of this
        client's whole per-request budget. A resolved or cancelled waiter may stay in ``_waiter``; every user
        checks ``done()`` first.
        """
        loop = self._loop
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        self._deadline = loop.time() + timeout
        client = self._client
        if client._sweep_handle is None:
            client._ensure_sweep()
        return waiter

    def _waiting(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _expire_if_due(self, now: float) -> None:
        waiter = self._waiter
        if waiter is not None and self._deadline <= now and not waiter.done():
            waiter.set_result(False)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._discard()

    def _discard(self) -> None:
        self.reusable = False
        transport = self.transport
        if transport is not None and not self.closed:
            if transport.get_write_buffer_size():
                # Request bytes still queued belong to an exchange that is over (the upstream answered early, or
                # the request was abandoned): drop them. close() would keep the connection, and the event loop,
                # busy delivering them, and a client shut down meanwhile would leave the transport half-closed.
                transport.abort()
            else:
                transport.close()

    def _take_body(self) -> bytes:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._body_size = 0
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return data


class UpstreamResponse:
    """Status, headers and a streamed body. Read it to the end, or ``close()`` it; both free the connection.

    ``headers`` are the response's header fields in order, names lower-cased, values as received (latin-1
    bytes). Trailer fields are not included.
    """

    __slots__ = ("_client", "_conn", "headers", "status")

    def __init__(self, client: UpstreamClient, conn: _Connection) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = conn.headers

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be waiting in the buffer for ``read()``)."""
        conn = self._conn
        return conn is None or conn._message_done

    @property
    def failed(self) -> bool:
        """The upstream already broke the response (e.g. bad framing right after the head); ``read()`` will raise."""
        conn = self._conn
        return conn is not None and conn._error is not None

    @property
    def finished(self) -> bool:
        """The body has been read to its end and the connection was released."""
        return self._conn is None

    def read_complete(self) -> bytes:
        """The whole body of a ``complete`` response, without waiting; frees the connection."""
        conn = self._conn
        if conn is None:
            return b""
        if not conn._message_done:
            raise RuntimeError("read_complete() called before the response was complete")
        data = conn._take_body() if conn._body else b""
        self._release(conn)
        return data

    async def read(self) -> bytes:
        """Return the next piece of the body; ``b""`` once it has ended. Raises :class:`UpstreamError`."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            if conn._body:
                data = conn._take_body()
                if conn._message_done:
                    self._release(conn)
                return data
            if conn._message_done:
                self._release(conn)
                return b""
            if conn._error is not None:
                self.close()
                raise conn._error
            try:
                if not await conn._arm(self._client.read_timeout):
                    raise ReadTimeout(_MSG_READ_TIMEOUT)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Abandon the response. The connection is closed unless the body had been read completely."""
        conn = self._conn
        if conn is not None:
            if conn._message_done and not conn._body:
                self._release(conn)
            else:
                self._conn = None
                conn.active = False
                conn._discard()

    def _release(self, conn: _Connection) -> None:
        self._conn = None
        conn.active = False
        if not conn._keep_alive:
            conn.reusable = False
        self._client._release(conn)


class UpstreamClient:
    """Keep-alive HTTP/1.1 client for the single origin in ``url`` (``http`` or ``https``; path is ignored).

    ``max_idle`` bounds the idle connections kept for reuse. Timeouts are in seconds: ``connect_timeout`` for
    TCP+TLS setup, ``read_timeout`` for each wait for response bytes, ``write_timeout`` for each wait for the
    socket to accept more request bytes.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        write_timeout: float,
        max_idle: int,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port], got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        if ":" in self.host:
            host_text = f"[{self.host}]"
        elif self.host.isascii():
            host_text = self.host
        else:
            host_text = self.host.encode("idna").decode("ascii")
        default_port = 443 if parts.scheme == "https" else 80
        # The Host header for requests to this origin (RFC 9110 §7.2): no default port, IPv6 in brackets.
        self.authority = (host_text if self.port == default_port else f"{host_text}:{self.port}").encode("ascii")
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])  # never negotiate h2: this client speaks HTTP/1.1 only
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_head_bytes = max_head_bytes
        self._idle: list[_Connection] = []
        self._connections: set[_Connection] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        # Deadlines are checked this often, so a timeout fires up to this much late (and never early).
        self._sweep_interval = min(0.5, max(0.01, min(read_timeout, write_timeout) / 10))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        host: bytes | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived.

        ``target`` is the origin-form request target (``/path?query``). ``headers`` must not contain Host or
        framing headers: Host is ``host`` (default: the origin's authority) and Content-Length or
        Transfer-Encoding are derived from ``body`` (``content_length`` declares an iterable body's size).
        Raises ``ValueError`` for a request that cannot be written safely (CR, LF or NUL anywhere in it).
        """
        if self._closed:
            raise ConnectError(_MSG_SHUTDOWN)
        if (
            not target.startswith(b"/")
            or len(target.translate(None, _NOT_IN_REQUEST_LINE)) != len(target)
            or (method not in _TOKEN_METHODS and len(method.translate(None, _NOT_IN_REQUEST_LINE)) != len(method))
        ):
            raise ValueError("request target must be origin-form and method a token")
        head, chunked = self._build_head(method, target, headers, host or self.authority, body, content_length)
        skip_body = method == b"HEAD"

        conn = self._take_idle()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        while True:
            try:
                # Written synchronously when the body is in memory (no coroutine for the common GET).
                stream = self._write(conn, head, body, skip_body)
                if stream is not None:
                    await self._send_stream(conn, stream, chunked, content_length)
                elif conn.write_paused:
                    await self._drain(conn)
                while not conn._head_done:
                    if conn._error is not None:
                        raise conn._error
                    if not await conn._arm(self.read_timeout):
                        raise ReadTimeout(_MSG_READ_TIMEOUT)
            except RemoteClosed:
                conn.active = False
                conn._discard()
                # RFC 9112 §9.3.1: a client MAY retry an idempotent request when the connection closed before
                # any of the response arrived; a reused keep-alive connection the server had just timed out
                # is the usual case. Once, on a fresh connection.
                replayable = method in IDEMPOTENT_METHODS and (body is None or isinstance(body, _BYTES_TYPES))
                if reused and replayable and not conn.received_any:
                    reused = False
                    conn = await self._connect()
                    continue
                raise
            except BaseException:
                conn.active = False
                conn._discard()
                raise
            return UpstreamResponse(self, conn)

    async def probe(self) -> bool:
        """Whether a new connection to the upstream can be opened right now (used for readiness checks)."""
        try:
            conn = await self._connect()
        except UpstreamError:
            return False
        conn._discard()
        return True

    async def aclose(self) -> None:
        """Close every connection, idle or in use; later requests fail with :class:`ConnectError`."""
        self._closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        self._idle.clear()
        for conn in list(self._connections):
            conn._discard()
        self._connections.clear()
        # Let the transports run their close callbacks (no "unclosed transport" warnings at interpreter exit).
        await asyncio.sleep(0)

    # -- internals --------------------------------------------------------------------------------------------

    def _build_head(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        host: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> tuple[bytes, bool]:
        # From index 4 on, even entries are the caller's bytes (Host, then each name and value) and odd ones the
        # separators written here, so parts[4::2] is exactly what must be free of CR, LF and NUL.
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
        if isinstance(headers, list):
            fields: list[tuple[bytes, bytes]] = headers  # the usual case: native list iteration when compiled
        else:
            fields = list(headers)
        # Four appends per field rather than "parts += (...)": no tuple to build and free for each one.
        for name, value in fields:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        # Header injection guard (RFC 9110 §5.5, RFC 9112 §2.2): three memchr scans of the caller's bytes joined
        # together, instead of a regex per field. Testing for an int (13 in ...) is a memchr; testing for a bytes
        # needle (b"\r" in ...) first fails an int conversion, which costs more than the scan.
        supplied = b"".join(parts[4::2])
        if 13 in supplied or 10 in supplied or 0 in supplied:
            raise ValueError("CR, LF or NUL in the request head")
        chunked = False
        if body is None:
            if method in _CONTENT_METHODS:
                parts.append(b"content-length: 0\r\n")
        elif isinstance(body, _BYTES_TYPES):
            parts.append(b"content-length: %d\r\n" % len(body))
        elif content_length is not None:
            parts.append(b"content-length: %d\r\n" % content_length)
        else:
            parts.append(b"transfer-encoding: chunked\r\n")
            chunked = True
        parts.append(b"\r\n")
        head = b"".join(parts)
        return head, chunked

    def _ensure_sweep(self) -> None:
        if self._sweep_handle is None and not self._closed:
            self._sweep_handle = self.loop.call_later(self._sweep_interval, self._sweep)

    def _sweep(self) -> None:
        self._sweep_handle = None
        now = self.loop.time()
        waiting = False
        for conn in list(self._connections):
            if conn._waiting():
                conn._expire_if_due(now)
                waiting = True
        if waiting:
            self._ensure_sweep()

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        now = idle[-1]._loop.time()
        while idle:
            conn = idle.pop()  # LIFO: the most recently used connection is the least likely to be stale
            transport = conn.transport
            # is_closing(): the server's FIN was processed but connection_lost has not run yet. Writing there
            # would be dropped silently, and a POST could then only fail.
            if conn.closed or not conn.reusable or transport is None or transport.is_closing():
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn._discard()
                continue
            return conn
        return None

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and not conn.closed and not self._closed and len(self._idle) < self.max_idle:
            conn.idle_since = conn._loop.time()
            self._idle.append(conn)
        else:
            conn._discard()

    def _forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if not conn.active:
            with contextlib.suppress(ValueError):  # not idle: it was in use or already taken
                self._idle.remove(conn)

    async def _connect(self) -> _Connection:
        conn = _Connection(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectTimeout(_MSG_CONNECT_TIMEOUT) from None
        except OSError:  # refused, unreachable, DNS failure (socket.gaierror), TLS failure (ssl.SSLError)
            raise ConnectError(_MSG_REFUSED) from None
        if self._closed:
            conn._discard()
            raise ConnectError(_MSG_SHUTDOWN)
        self._connections.add(conn)
        return conn

    @staticmethod
    def _write(
        conn: _Connection, head: bytes, body: bytes | AsyncIterable[bytes] | None, skip_body: bool
    ) -> AsyncIterable[bytes] | None:
        """Write the head, and the body if it is in memory; return a body that still has to be streamed."""
        transport = conn.transport
        if transport is None or conn.closed:
            raise RemoteClosed(_MSG_CLOSED)
        conn._begin(skip_body=skip_body)
        if body is None:
            transport.write(head)
        elif isinstance(body, _BYTES_TYPES):
            if len(body) <= _COALESCE_LIMIT:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        else:
            transport.write(head)
            return body
        return None

    async def _send_stream(
        self,
        conn: _Connection,
        body: AsyncIterable[bytes],
        chunked: bool,
        content_length: int | None,
    ) -> None:
        transport = conn.transport
        assert transport is not None  # checked by _write
        sent = 0
        async for chunk in body:
            if conn._message_done or conn._error is not None or conn.closed:
                # The upstream answered (typically 413) or failed before taking the whole body: stop sending;
                # the connection is mid-request and must not be reused.
                conn.reusable = False
                if conn._error is not None:
                    raise conn._error
                return
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                sent += len(chunk)
                if content_length is not None and sent > content_length:
                    raise ValueError("request body longer than its declared Content-Length")
                transport.write(chunk)
            if conn.write_paused:
                await self._drain(conn)
        if chunked:
            transport.write(b"0\r\n\r\n")
        elif content_length is not None and sent != content_length:
            raise ValueError("request body shorter than its declared Content-Length")

    async def _drain(self, conn: _Connection) -> None:
        while conn.write_paused and not conn._message_done and conn._error is None and not conn.closed:
            if not await conn._arm(self.write_timeout):
                raise WriteTimeout(_MSG_WRITE_TIMEOUT)
