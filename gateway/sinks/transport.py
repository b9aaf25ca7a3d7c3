"""The dispatcher's destination transport: httpx requests over :class:`gateway.upstream.UpstreamClient` connections.

Why: GitHub issue 7 asks for 1,000 delivered events/s per worker. httpx's default transport (httpcore, anyio) cost
~0.5-2 ms of CPU per request on the project machine, most of it in the connection pool checking every idle
connection for readability on every request; the keep-alive client the reverse proxy uses costs a few tens of µs.
This transport keeps httpx's request and response types, so sinks, the dispatcher's error handling and the tests'
``MockTransport``\\ s stay as they are, and puts only the wire work on ``UpstreamClient``.

What goes on the wire, and nothing else (security.md: destinations get only what the sink built):

- the request line ``METHOD /path?query HTTP/1.1``;
- ``host`` (the request's Host header, which httpx derives from the URL);
- the request's own header fields, in order, except Host and framing headers;
- ``content-length`` for the body (``content-length: 0`` for a POST without one), never chunked for in-memory bodies.

No cookie jar, no redirects (a 3xx is just an answer), no proxy or certificate settings from the environment
(``HTTP_PROXY``, ``SSL_CERT_FILE`` are ignored), no ``Accept-Encoding``. Timeouts are fixed at construction (the
``[dispatch]`` connect/read/write timeouts); httpx's per-request ``timeout`` extension is ignored. Response bodies
are read completely up to :data:`MAX_RESPONSE_BYTES` (destinations answer a few bytes; anything beyond is dropped
together with the connection).

Errors map onto the httpx exceptions the dispatcher already sorts into "not sent, retry" and "ambiguous":

=====================================  ======================================================================
``upstream.ConnectError``              :class:`httpx.ConnectError` (refused, unreachable, DNS, TLS; not sent)
``upstream.ConnectTimeout``            :class:`httpx.ConnectTimeout` (not sent)
``upstream.WriteTimeout``              :class:`httpx.WriteTimeout` (not completely sent)
``upstream.ReadTimeout``               :class:`httpx.ReadTimeout` (sent; the destination may have counted it)
``upstream.ProtocolError``,            :class:`httpx.RemoteProtocolError` (sent; malformed or cut-off answer)
``upstream.RemoteClosed``
CR/LF/NUL in the head, bad header      :class:`httpx.LocalProtocolError` (a request we must never write)
=====================================  ======================================================================
"""

from __future__ import annotations

import re
import ssl
from typing import Final

import httpx

from gateway import upstream
from gateway.config import DispatchSettings

__all__ = ["MAX_ORIGINS", "MAX_RESPONSE_BYTES", "UpstreamTransport"]

# Destination answers are tiny ("ok", "{}", a short JSON error); more than this is not worth memory.
MAX_RESPONSE_BYTES: Final = 64 * 1024
# One keep-alive pool per origin. The dispatcher only talks to the configured endpoints, so a handful; the bound
# keeps a misuse from growing memory without limit.
MAX_ORIGINS: Final = 64

# RFC 9110 §5.1: a field name is a token.
_FIELD_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Written by UpstreamClient itself from the body and the Host argument.
_SKIPPED_HEADERS: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})
_ERRORS: Final[tuple[tuple[type[upstream.UpstreamError], type[httpx.TransportError]], ...]] = (
    # Subclasses before their bases.
    (upstream.ConnectTimeout, httpx.ConnectTimeout),
    (upstream.ReadTimeout, httpx.ReadTimeout),
    (upstream.WriteTimeout, httpx.WriteTimeout),
    (upstream.ConnectError, httpx.ConnectError),
    (upstream.ProtocolError, httpx.RemoteProtocolError),
    (upstream.RemoteClosed, httpx.RemoteProtocolError),
)


def _httpx_error(error: upstream.UpstreamError, request: httpx.Request) -> httpx.TransportError:
    for upstream_type, httpx_type in _ERRORS:
        if isinstance(error, upstream_type):
            return httpx_type(str(error), request=request)
    return httpx.RemoteProtocolError(str(error), request=request)  # pragma: no cover - every subclass is listed


class UpstreamTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` with one keep-alive :class:`~gateway.upstream.UpstreamClient` per origin.

    ``max_idle`` bounds the idle connections kept per origin; concurrency is bounded by the caller (the
    dispatcher's senders). Use on one event loop; :meth:`aclose` closes every connection.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        write_timeout: float,
        max_idle: int,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._max_idle = max_idle
        self._ssl_context = ssl_context
        self._max_response_bytes = max_response_bytes
        self._clients: dict[tuple[str, bytes, int | None], upstream.UpstreamClient] = {}
        self._closed = False

    @classmethod
    def from_settings(
        cls, settings: DispatchSettings, *, ssl_context: ssl.SSLContext | None = None
    ) -> UpstreamTransport:
        """The transport the dispatcher uses: ``[dispatch]`` timeouts, ``max_connections`` idle connections."""
        return cls(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            write_timeout=settings.write_timeout,
            max_idle=settings.max_connections,
            ssl_context=ssl_context,
        )

    def __repr__(self) -> str:
        return f"UpstreamTransport(origins={len(self._clients)}, closed={self._closed})"

    @property
    def open_connections(self) -> int:
        return sum(client.open_connections for client in self._clients.values())

    def _client_for(self, request: httpx.Request) -> upstream.UpstreamClient:
        url = request.url
        key = (url.scheme, url.raw_host, url.port)
        client = self._clients.get(key)
        if client is not None:
            return client
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise httpx.UnsupportedProtocol(f"only http(s) URLs with a host are supported, got {url.scheme!r}")
        if len(self._clients) >= MAX_ORIGINS:
            raise httpx.ConnectError("too many destination origins", request=request)
        host = url.raw_host.decode("ascii")
        if ":" in host:
            host = f"[{host}]"
        port = f":{url.port}" if url.port is not None else ""
        ssl_context = self._ssl_context
        if url.scheme == "https" and ssl_context is None:
            # httpx's own default (certifi), as the AsyncClient it replaces used; trust_env=False: no SSL_CERT_FILE.
            ssl_context = self._ssl_context = httpx.create_ssl_context(trust_env=False)
        client = upstream.UpstreamClient(
            f"{url.scheme}://{host}{port}",
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            write_timeout=self._write_timeout,
            max_idle=self._max_idle,
            ssl_context=ssl_context,
        )
        self._clients[key] = client
        return client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("transport is closed", request=request)
        client = self._client_for(request)
        host = b""
        headers: list[tuple[bytes, bytes]] = []
        for name, value in request.headers.raw:
            lower = name.lower()
            if lower in _SKIPPED_HEADERS:
                if lower == b"host":
                    host = value
                continue
            if not _FIELD_NAME.fullmatch(name):
                raise httpx.LocalProtocolError("invalid header field name", request=request)
            headers.append((name, value))
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        try:
            answer = await client.request(
                request.method.encode("ascii"),
                request.url.raw_path,
                headers,
                host=host or None,
                body=body or None,
            )
            if answer.complete:
                content = answer.read_complete()  # the usual case: the whole answer came with its head
                if len(content) > self._max_response_bytes:
                    content = content[: self._max_response_bytes]
            else:
                content = await self._read_body(answer)
        except upstream.UpstreamError as error:
            raise _httpx_error(error, request) from None
        except (ValueError, UnicodeEncodeError):  # CR, LF or NUL in the head, a non-ASCII method
            raise httpx.LocalProtocolError("request cannot be written safely", request=request) from None
        response = httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=httpx.ByteStream(content),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )
        response.read()  # content-decoding like httpx.AsyncClient; DecodingError is the dispatcher's "ambiguous"
        return response

    async def _read_body(self, answer: upstream.UpstreamResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        limit = self._max_response_bytes
        while True:
            data = await answer.read()
            if not data:
                return b"".join(chunks)
            if size + len(data) > limit:
                chunks.append(data[: limit - size])
                answer.close()  # the rest is not read; the connection is dropped rather than drained
                return b"".join(chunks)
            size += len(data)
            chunks.append(data)

    async def aclose(self) -> None:
        self._closed = True
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await client.aclose()
