"""Protocol tests for gateway.upstream, the hand-written HTTP/1.1 client.

Every case runs against a real asyncio server on 127.0.0.1 whose replies are scripted byte for byte, so framing,
keep-alive and failure behaviour are exercised on real sockets, not mocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.upstream import (
    ConnectError,
    ConnectTimeout,
    ProtocolError,
    ReadTimeout,
    RemoteClosed,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    WriteTimeout,
)

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# ----------------------------------------------------------------------------------------------------------------
# A scripted server and helpers
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Request:
    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        lines = self.head.split(b"\r\n")[1:]
        return [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines if line)]

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, f"{name!r} sent {len(values)} times"
        return values[0] if values else None


@dataclass
class Server:
    port: int
    connections: int = 0
    requests: list[Request] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request (head + body, CL or chunked) from the stream, or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request = Request(head[:-4], b"")
    length = request.header(b"content-length")
    if request.header(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the empty line
            pass
        request.body = bytes(body)
    elif length is not None:
        request.body = await reader.readexactly(int(length))
    return request


@asynccontextmanager
async def serve(
    handler: Handler, *, record: Server | None = None, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    """Run ``handler(reader, writer)`` for each connection; handlers still running at the end are cancelled."""
    state = record if record is not None else Server(0)
    tasks: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Swallowed on purpose: asyncio 3.11's start_server callback calls task.exception() on the handler
            # task and would log a cancelled one as an error.
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_context)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def responder(*responses: bytes, record: Server | None = None, keep_open: bool = True) -> Handler:
    """A handler that answers the n-th request on a connection with ``responses[n]``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            request = await read_request(reader)
            if request is None:
                return
            if record is not None:
                record.requests.append(request)
            writer.write(response)
            await writer.drain()
        if keep_open:
            await reader.read()  # until the client closes

    return handle


def client_for(
    server: Server,
    *,
    read_timeout: float = 5.0,
    write_timeout: float = 5.0,
    max_idle: int = 8,
    idle_timeout: float = 4.0,
    max_head_bytes: int = 64 * 1024,
) -> UpstreamClient:
    return UpstreamClient(
        server.url,
        connect_timeout=2.0,
        read_timeout=read_timeout,
        write_timeout=write_timeout,
        max_idle=max_idle,
        idle_timeout=idle_timeout,
        max_head_bytes=max_head_bytes,
    )


async def read_all(response: UpstreamResponse) -> bytes:
    parts = []
    while not response.finished:
        parts.append(await response.read())
    return b"".join(parts)


async def fetch(
    client: UpstreamClient,
    method: bytes = b"GET",
    target: bytes = b"/",
    *,
    body: bytes | AsyncIterable[bytes] | None = None,
    content_length: int | None = None,
) -> tuple[UpstreamResponse, bytes]:
    response = await client.request(method, target, [(b"accept", b"*/*")], body=body, content_length=content_length)
    try:
        return response, await read_all(response)
    finally:
        response.close()


@pytest.fixture
async def closing() -> AsyncIterator[list[UpstreamClient]]:
    """Clients appended here are closed after the test."""
    clients: list[UpstreamClient] = []
    yield clients
    for client in clients:
        await client.aclose()


OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


# ----------------------------------------------------------------------------------------------------------------
# Response framing
# ----------------------------------------------------------------------------------------------------------------


async def test_content_length_body(closing: list[UpstreamClient]) -> None:
    async with serve(responder(OK_HELLO)) as server:
        client = client_for(server)
        closing.append(client)
        response, body = await fetch(client)
    assert (response.status, body) == (200, b"hello")
    assert response.headers == [(b"content-length", b"5"), (b"content-type", b"text/plain")]


async def test_chunked_body_with_extensions_and_trailers(closing: list[UpstreamClient]) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5;name=value\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    async with serve(responder(chunked, OK_HELLO)) as server:
        client = client_for(server)
        closing.append(client)
        response, body = await fetch(client)
        assert body == b"hello world!"
        assert (b"x-checksum", b"abc") not in response.headers  # trailers are not headers
        _, second = await fetch(client)  # the connection is still in sync after the trailer
    assert second == b"hello"
    assert server.connections == 1


async def test_body_delimited_by_close(closing: list[UpstreamClient]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for part in (b"read ", b"until ", b"close"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)

    async with serve(handle) as server:
        client = client_for(server)
        closing.append(client)
        _, body = await fetch(client)
        assert body == b"read until close"
        _, again = await fetch(client)
    assert again == b"read until close"
    assert server.connections == 2  # a close-delimited body ends the connection


@pytest.mark.parametrize(
    ("method", "response"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"GET", b'HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\nETag: "x"\r\n\r\n'),
    ],
    ids=["head-cl", "head-chunked", "204", "304-with-cl"],
)
async def test_responses_without_body(closing: list[UpstreamClient], method: bytes, response: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            writer.write(response if request.request_line.startswith(method + b" /special") else OK_HELLO)

    async with serve(handle) as server:
        client = client_for(server, read_timeout=2.0)
        closing.append(client)
        started = time.monotonic()
        first, body = await fetch(client, method, b"/special")
        assert body == b""
        assert time.monotonic() - started < 1.0  # did not wait for the 100 bytes the headers mention
        assert first.status in (200, 204, 304)
        _, after = await fetch(client)  # the next request still works
    assert after == b"hello"


# ----------------------------------------------------------------------------------------------------------------
# Keep-alive and the pool
# ----------------------------------------------------------------------------------------------------------------


async def test_keep_alive_reuses_the_connection(closing: list[UpstreamClient]) -> None:
    async with serve(responder(OK_HELLO, OK_HELLO, OK_HELLO)) as server:
        client = client_for(server)
        closing.append(client)
        for _ in range(3):
            _, body = await fetch(client)
            assert body == b"hello"
        assert client.open_connections == 1
        assert client.idle_connections == 1
    assert server.connections == 1


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["connection-close", "http10"],
)
async def test_server_ending_keep_alive_is_respected(closing: list[UpstreamClient], response: bytes) -> None:
    async with serve(responder(response, keep_open=True)) as server:
        client = client_for(server)
        closing.append(client)
        for _ in range(2):
            _, body = await fetch(client)
            assert body == b"hello"
    assert server.connections == 2


async def test_idle_connection_closed_by_server_is_dropped(closing: list[UpstreamClient]) -> None:
    async with serve(responder(OK_HELLO, keep_open=False)) as server:
        client = client_for(server)
        closing.append(client)
        await fetch(client)
        for _ in range(100):  # the server closes right after answering; the pool notices
            if client.idle_connections == 0:
                break
            await asyncio.sleep(0.01)
        assert client.idle_connections == 0
        # Not idempotent, so it could not be retried: it must go out on a fresh connection.
        response, body = await fetch(client, b"POST", body=b"data")
    assert (response.status, body) == (200, b"hello")
    assert server.connections == 2


def _stale_after_first(record: Server) -> Handler:
    """On the first connection: answer one request, then read the next and close without a byte (a server
    timing out an idle keep-alive connection just as the request arrives). Later connections answer normally."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if record.connections == 1:
            request = await read_request(reader)
            assert request is not None
            record.requests.append(request)
            writer.write(OK_HELLO)
            await writer.drain()
            await read_request(reader)
            return  # close without answering
        await responder(OK_HELLO, record=record)(reader, writer)

    return handle


async def test_stale_pooled_connection_is_retried_for_idempotent_requests(closing: list[UpstreamClient]) -> None:
    record = Server(0)
    async with serve(_stale_after_first(record), record=record) as server:
        client = client_for(server)
        closing.append(client)
        await fetch(client)
        response, body = await fetch(client, b"GET", b"/again")
    assert (response.status, body) == (200, b"hello")
    assert server.connections == 2
    assert [r.request_line for r in server.requests] == [b"GET / HTTP/1.1", b"GET /again HTTP/1.1"]


async def test_stale_pooled_connection_is_not_retried_for_post(closing: list[UpstreamClient]) -> None:
    record = Server(0)
    async with serve(_stale_after_first(record), record=record) as server:
        client = client_for(server)
        closing.append(client)
        await fetch(client)
        with pytest.raises(RemoteClosed):
            await fetch(client, b"POST", b"/order", body=b"pay once")
        await asyncio.sleep(0.05)
    assert server.connections == 1  # no second attempt anywhere


async def test_streamed_put_is_not_retried(closing: list[UpstreamClient]) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"cannot be replayed"

    record = Server(0)
    async with serve(_stale_after_first(record), record=record) as server:
        client = client_for(server)
        closing.append(client)
        await fetch(client)
        with pytest.raises(RemoteClosed):
            await fetch(client, b"PUT", b"/x", body=body())
        await asyncio.sleep(0.05)
    assert server.connections == 1


async def test_idle_connections_are_bounded(closing: list[UpstreamClient]) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await asyncio.sleep(0.05)  # keeps the five requests in flight together
            writer.write(OK_HELLO)

    async with serve(slow) as server:
        client = client_for(server, max_idle=2)
        closing.append(client)
        results = await asyncio.gather(*(fetch(client) for _ in range(5)))
        assert [body for _, body in results] == [b"hello"] * 5
        assert server.connections == 5
        await asyncio.sleep(0.02)
        assert client.idle_connections == 2
        assert client.open_connections == 2


async def test_old_idle_connection_is_not_reused(closing: list[UpstreamClient]) -> None:
    async with serve(responder(OK_HELLO, OK_HELLO)) as server:
        client = client_for(server, idle_timeout=0.05)
        closing.append(client)
        await fetch(client)
        await asyncio.sleep(0.1)
        await fetch(client)
    assert server.connections == 2


async def test_unsolicited_bytes_on_idle_connection(closing: list[UpstreamClient]) -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_HELLO)
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfake")  # an answer to nothing
        await reader.read()

    async with serve(chatty) as server:
        client = client_for(server)
        closing.append(client)
        await fetch(client)
        await asyncio.sleep(0.1)
        _, body = await fetch(client)
    assert body == b"hello"  # the fake answer was not taken for the second response
    assert server.connections == 2


async def test_bytes_after_a_complete_response_end_the_connection(closing: list[UpstreamClient]) -> None:
    async with serve(responder(OK_HELLO + b"HTTP/1.1 200 OK\r\n", OK_HELLO)) as server:
        client = client_for(server)
        closing.append(client)
        _, first = await fetch(client)
        _, second = await fetch(client)
    assert first == second == b"hello"
    assert server.connections == 2


# ----------------------------------------------------------------------------------------------------------------
# Interim responses and malformed responses
# ----------------------------------------------------------------------------------------------------------------


async def test_interim_responses_are_skipped(closing: list[UpstreamClient]) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    async with serve(responder(interim, OK_HELLO)) as server:
        client = client_for(server)
        closing.append(client)
        response, body = await fetch(client, b"POST", body=b"x")
        assert (response.status, body) == (201, b"ok")
        assert response.headers == [(b"content-length", b"2")]  # nothing from the 103
        _, after = await fetch(client)
    assert after == b"hello"
    assert server.connections == 1


MALFORMED = {
    "garbage-status-line": b"HTTX/1.1 200 OK\r\n\r\n",
    "not-http-at-all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    "bad-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    "conflicting-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "nul-in-header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "bare-lf-in-header": b"HTTP/1.1 200 OK\r\nX-A: a\nInjected: 1\r\nContent-Length: 0\r\n\r\n",
    "bare-cr-in-header": b"HTTP/1.1 200 OK\r\nX-A: a\rInjected: 1\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nX-A : a\r\nContent-Length: 0\r\n\r\n",
    "status-above-599": b"HTTP/1.1 999 Whatever\r\nContent-Length: 0\r\n\r\n",
    "switching-protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n\x00\x00",
    "headers-too-large": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)),
    "trailers-too-large": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
    + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_response_is_a_clean_error(closing: list[UpstreamClient], raw: bytes) -> None:
    async with serve(responder(raw)) as server:
        client = client_for(server, read_timeout=5.0)
        closing.append(client)
        started = time.monotonic()
        with pytest.raises(ProtocolError):
            await fetch(client)
        assert time.monotonic() - started < 2.0  # detected, not timed out
        assert client.idle_connections == 0  # never pooled


async def test_endless_header_line_is_cut_off(closing: list[UpstreamClient]) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(1000):  # up to 16 MiB without a line end, until the client hangs up
            writer.write(b"a" * 16384)
            await writer.drain()

    async with serve(endless) as server:
        client = client_for(server, max_head_bytes=32 * 1024)
        closing.append(client)
        with pytest.raises(ProtocolError, match="too large"):
            await fetch(client)


async def test_reset_mid_body(closing: list[UpstreamClient]) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.02)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        writer.transport.abort()

    async with serve(reset) as server:
        client = client_for(server)
        closing.append(client)
        response = await client.request(b"GET", b"/", [])
        assert response.status == 200
        assert await response.read() == b"partial"
        with pytest.raises(RemoteClosed):
            await read_all(response)
        assert client.idle_connections == 0


async def test_close_mid_chunked_body(closing: list[UpstreamClient]) -> None:
    truncated = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with serve(responder(truncated, keep_open=False)) as server:
        client = client_for(server)
        closing.append(client)
        with pytest.raises(RemoteClosed):
            await fetch(client)


# ----------------------------------------------------------------------------------------------------------------
# Timeouts and connection failures
# ----------------------------------------------------------------------------------------------------------------


async def test_connection_refused(closing: list[UpstreamClient]) -> None:
    with socket.socket() as sock:  # a port that was just free, with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = UpstreamClient(f"http://127.0.0.1:{port}", connect_timeout=2, read_timeout=2, write_timeout=2, max_idle=1)
    closing.append(client)
    with pytest.raises(ConnectError):
        await fetch(client)
    assert await client.probe() is False


async def test_connect_timeout(closing: list[UpstreamClient]) -> None:
    # A listener with a full accept queue: Linux drops further SYNs, so connect() hangs like a dead host.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = [socket.create_connection(listener.getsockname(), timeout=1)]
        try:
            for _ in range(3):
                extra = socket.socket()
                extra.setblocking(False)
                extra.connect_ex(listener.getsockname())
                fillers.append(extra)
            port = listener.getsockname()[1]
            client = UpstreamClient(
                f"http://127.0.0.1:{port}", connect_timeout=0.3, read_timeout=5, write_timeout=5, max_idle=1
            )
            closing.append(client)
            started = time.monotonic()
            with pytest.raises(ConnectTimeout):
                await fetch(client)
            assert 0.25 < time.monotonic() - started < 1.5
        finally:
            for sock in fillers:
                sock.close()


async def test_read_timeout_waiting_for_head(closing: list[UpstreamClient]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serve(silent) as server:
        client = client_for(server, read_timeout=0.3)
        closing.append(client)
        started = time.monotonic()
        with pytest.raises(ReadTimeout):
            await fetch(client)
        assert 0.29 < time.monotonic() - started < 1.5


async def test_read_timeout_mid_body(closing: list[UpstreamClient]) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()

    async with serve(stall) as server:
        client = client_for(server, read_timeout=0.3)
        closing.append(client)
        response = await client.request(b"GET", b"/", [])
        assert await response.read() == b"abc"
        with pytest.raises(ReadTimeout):
            await response.read()
        assert client.idle_connections == 0


async def test_write_timeout(closing: list[UpstreamClient]) -> None:
    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def endless_body() -> AsyncIterator[bytes]:
        chunk = b"x" * (1 << 20)
        for _ in range(512):
            yield chunk

    async with serve(never_reads) as server:
        client = client_for(server, write_timeout=0.3)
        closing.append(client)
        with pytest.raises(WriteTimeout):
            await fetch(client, b"POST", body=endless_body())


# ----------------------------------------------------------------------------------------------------------------
# Requests: framing, headers, safety
# ----------------------------------------------------------------------------------------------------------------


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize(
    ("method", "make_body", "length", "framing", "received"),
    [
        (b"GET", lambda: None, None, (None, None), b""),
        (b"POST", lambda: None, None, (b"0", None), b""),
        (b"POST", lambda: b"hello world", None, (b"11", None), b"hello world"),
        (b"PUT", lambda: _chunks(b"hello", b"", b" world"), 11, (b"11", None), b"hello world"),
        (b"PATCH", lambda: _chunks(b"hello", b" world"), None, (None, b"chunked"), b"hello world"),
    ],
    ids=["get", "post-empty", "bytes", "stream-with-length", "stream-chunked"],
)
async def test_request_framing(
    closing: list[UpstreamClient],
    method: bytes,
    make_body: Callable[[], bytes | AsyncIterable[bytes] | None],
    length: int | None,
    framing: tuple[bytes | None, bytes | None],
    received: bytes,
) -> None:
    record = Server(0)
    async with serve(responder(OK_HELLO, record=record)) as server:
        client = client_for(server)
        closing.append(client)
        await fetch(client, method, b"/p?q=1", body=make_body(), content_length=length)
    (request,) = record.requests
    assert request.request_line == method + b" /p?q=1 HTTP/1.1"
    assert (request.header(b"content-length"), request.header(b"transfer-encoding")) == framing
    assert request.body == received
    assert request.header(b"host") == f"127.0.0.1:{server.port}".encode()


async def test_declared_length_must_match(closing: list[UpstreamClient]) -> None:
    async with serve(responder(OK_HELLO)) as server:
        client = client_for(server)
        closing.append(client)
        with pytest.raises(ValueError, match="shorter"):
            await fetch(client, b"PUT", body=_chunks(b"abc"), content_length=5)
        with pytest.raises(ValueError, match="longer"):
            await fetch(client, b"PUT", body=_chunks(b"abcdef"), content_length=5)


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/ok", [(b"x-a", b"v\r\nInjected: 1")]),
        (b"/ok", [(b"x-a", b"v\nInjected: 1")]),
        (b"/ok", [(b"x-a", b"v\x00")]),
        (b"/ok", [(b"x-a\r\nInjected", b"1")]),
        (b"/a b", []),
        (b"/a\r\nInjected: 1", []),
        (b"http://elsewhere/", []),
        (b"*", []),
    ],
)
async def test_unsafe_requests_are_refused_before_sending(
    closing: list[UpstreamClient], target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    async with serve(responder(OK_HELLO)) as server:
        client = client_for(server)
        closing.append(client)
        with pytest.raises(ValueError):
            await client.request(b"GET", target, headers)
    assert server.connections == 0


@pytest.mark.parametrize("host", [b"evil\r\nInjected: 1", b"evil\nx", b"evil\rx", b"ev\x00il"])
async def test_unsafe_host_is_refused_before_sending(closing: list[UpstreamClient], host: bytes) -> None:
    async with serve(responder(OK_HELLO)) as server:
        client = client_for(server)
        closing.append(client)
        with pytest.raises(ValueError):
            await client.request(b"GET", b"/", [(b"x-a", b"fine")], host=host)
    assert server.connections == 0


async def test_field_values_travel_byte_for_byte(closing: list[UpstreamClient]) -> None:
    """Only CR, LF and NUL are refused: HTAB, obs-text and every other byte of a field value pass untouched."""
    record = Server(0)
    values = [b"caf\xe9\tau lait", bytes(range(0x80, 0x100)), b"a \t b", b"\x7f\x01\x1f"]
    headers = [(b"x-%d" % i, value) for i, value in enumerate(values)]
    async with serve(responder(OK_HELLO, record=record)) as server:
        client = client_for(server)
        closing.append(client)
        await read_all(await client.request(b"GET", b"/", headers))
    (request,) = record.requests
    lines = request.head.split(b"\r\n")[2:]  # after the request line and Host
    assert lines == [b"x-%d: %s" % (i, value) for i, value in enumerate(values)]


async def test_response_field_names_are_lower_cased(closing: list[UpstreamClient]) -> None:
    # Common names (looked up), unusual ones (lower-cased, then remembered) and odd spellings of common ones.
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Unusual-Header: 1\r\nCONTENT-LANGUAGE: de\r\n"
        b'etag: "x"\r\nx-unusual-header: 2\r\nContent-Length: 2\r\n\r\nok'
    )
    expected = [
        (b"content-type", b"text/plain"),
        (b"x-unusual-header", b"1"),
        (b"content-language", b"de"),
        (b"etag", b'"x"'),
        (b"x-unusual-header", b"2"),
        (b"content-length", b"2"),
    ]
    async with serve(responder(raw, raw)) as server:
        client = client_for(server)
        closing.append(client)
        for _ in range(2):  # the second time the unusual name is a remembered one
            response, body = await fetch(client)
            assert (response.headers, body) == (expected, b"ok")


async def test_remembered_field_names_are_bounded(closing: list[UpstreamClient]) -> None:
    from gateway import upstream as module

    names = [b"X-Bounded-%04d" % i for i in range(1500)]
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(name + b": v\r\n" for name in names) + b"Content-Length: 0\r\n\r\n"
    async with serve(responder(raw)) as server:
        client = client_for(server)
        closing.append(client)
        response, _ = await fetch(client)
    assert [name for name, _ in response.headers[:-1]] == [name.lower() for name in names]
    assert len(module._FIELD_NAMES) <= module._FIELD_NAMES_LIMIT


async def test_custom_host_header(closing: list[UpstreamClient]) -> None:
    record = Server(0)
    async with serve(responder(OK_HELLO, record=record)) as server:
        client = client_for(server)
        closing.append(client)
        response = await client.request(b"GET", b"/", [], host=b"www.example.org")
        await read_all(response)
    assert record.requests[0].header(b"host") == b"www.example.org"


@pytest.mark.parametrize(
    ("url", "authority"),
    [
        ("http://example.org", b"example.org"),
        ("http://example.org:80/base", b"example.org"),
        ("https://example.org:443", b"example.org"),
        ("http://example.org:8080", b"example.org:8080"),
        ("https://[2001:db8::1]:8443", b"[2001:db8::1]:8443"),
        ("http://bücher.example", b"xn--bcher-kva.example"),
    ],
)
def test_authority(url: str, authority: bytes) -> None:
    client = UpstreamClient(url, connect_timeout=1, read_timeout=1, write_timeout=1, max_idle=1)
    assert client.authority == authority


@pytest.mark.parametrize("url", ["ftp://example.org", "example.org", "http://", "unix:///tmp/sock"])
def test_rejects_non_http_urls(url: str) -> None:
    with pytest.raises(ValueError):
        UpstreamClient(url, connect_timeout=1, read_timeout=1, write_timeout=1, max_idle=1)


async def test_early_response_stops_the_upload(closing: list[UpstreamClient]) -> None:
    received = 0

    async def rejects(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n")
        await writer.drain()
        while data := await reader.read(65536):  # keep draining so nothing is reset
            received += len(data)

    sent = 0

    async def big_body() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"x" * 65536
        for _ in range(1024):  # 64 MiB offered
            sent += len(chunk)
            yield chunk
            await asyncio.sleep(0)

    async with serve(rejects) as server:
        client = client_for(server)
        closing.append(client)
        response, body = await fetch(client, b"POST", body=big_body())
        assert (response.status, body) == (413, b"too big\n")
        assert sent < 32 * 1024 * 1024  # stopped well before the end
        assert client.idle_connections == 0  # mid-request: never reused


async def test_abandoned_upload_does_not_linger(closing: list[UpstreamClient]) -> None:
    """Request bytes still queued when the exchange ends are dropped, not kept for a peer that will never read."""

    async def answers_without_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)  # meanwhile the client fills the socket buffers and has to queue the rest
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n")
        await writer.drain()
        await asyncio.sleep(10)

    async def big_body() -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        for _ in range(1024):
            yield chunk

    async with serve(answers_without_reading) as server:
        client = client_for(server)
        closing.append(client)
        response, body = await fetch(client, b"POST", body=big_body())
        assert (response.status, body) == (413, b"too big\n")
        for _ in range(100):
            if client.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        assert client.open_connections == 0


async def test_download_is_buffered_boundedly(closing: list[UpstreamClient]) -> None:
    size = 16 * 1024 * 1024
    block = os.urandom(65536)
    digest = hashlib.sha256(block * (size // len(block))).hexdigest()

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await reader.read()

    async with serve(big) as server:
        client = client_for(server)
        closing.append(client)
        tracemalloc.start()
        try:
            response = await client.request(b"GET", b"/big", [])
            await asyncio.sleep(0.3)  # the server pushes while nobody reads
            hasher = hashlib.sha256()
            total = 0
            while not response.finished:
                data = await response.read()
                hasher.update(data)
                total += len(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert total == size
    assert hasher.hexdigest() == digest
    assert peak < 3 * 1024 * 1024, f"peak {peak} bytes for a {size}-byte body"


async def test_closed_client_refuses_requests(closing: list[UpstreamClient]) -> None:
    async with serve(responder(OK_HELLO)) as server:
        client = client_for(server)
        await fetch(client)
        assert client.open_connections == 1
        await client.aclose()
        assert client.open_connections == 0
        with pytest.raises(ConnectError):
            await fetch(client)


async def test_probe(closing: list[UpstreamClient]) -> None:
    async with serve(responder()) as server:
        client = client_for(server)
        closing.append(client)
        assert await client.probe() is True
        assert client.idle_connections == 0


# ----------------------------------------------------------------------------------------------------------------
# TLS
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    yield cert, key


async def test_https_upstream(closing: list[UpstreamClient], certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    record = Server(0)
    async with serve(responder(OK_HELLO, OK_HELLO, record=record), record=record, ssl_context=server_context):
        port = record.port
        trusting = ssl.create_default_context(cafile=str(cert))
        client = UpstreamClient(
            f"https://localhost:{port}", connect_timeout=2, read_timeout=2, write_timeout=2, max_idle=2,
            ssl_context=trusting,
        )  # fmt: skip
        closing.append(client)
        for _ in range(2):
            response, body = await fetch(client)
            assert (response.status, body) == (200, b"hello")
        assert client.open_connections == 1
        assert record.requests[0].header(b"host") == f"localhost:{port}".encode()

        # The default context does not trust a self-signed certificate: a connect error, not a response.
        untrusting = UpstreamClient(
            f"https://localhost:{port}", connect_timeout=2, read_timeout=2, write_timeout=2, max_idle=2
        )
        closing.append(untrusting)
        with pytest.raises(ConnectError):
            await fetch(untrusting)


# ----------------------------------------------------------------------------------------------------------------
# Property: any split of the response bytes parses to the same body
# ----------------------------------------------------------------------------------------------------------------


def _frame(body: bytes, chunked: bool, pieces: list[int]) -> bytes:
    if not chunked:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    start = 0
    for size in [*pieces, len(body)]:
        part = body[start : start + size]
        if part:
            out.append(b"%x\r\n%s\r\n" % (len(part), part))
        start += len(part)
    out.append(b"0\r\n\r\n")
    return b"".join(out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=3000),
    chunked=st.booleans(),
    chunk_sizes=st.lists(st.integers(1, 700), max_size=6),
    write_sizes=st.lists(st.integers(1, 900), min_size=1, max_size=8),
)
def test_any_segmentation_gives_the_same_body(
    body: bytes, chunked: bool, chunk_sizes: list[int], write_sizes: list[int]
) -> None:
    raw = _frame(body, chunked, chunk_sizes)

    async def segmented(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            position, index = 0, 0
            while position < len(raw):  # the same bytes, written in arbitrary segments
                size = write_sizes[index % len(write_sizes)]
                writer.write(raw[position : position + size])
                await writer.drain()
                await asyncio.sleep(0)
                position += size
                index += 1
        await reader.read()

    async def scenario() -> None:
        async with serve(segmented) as server:
            client = client_for(server)
            try:
                for _ in range(2):  # and the connection stays in sync for the next response
                    response, received = await fetch(client)
                    assert received == body
                    assert response.status == 200
                assert server.connections == 1
            finally:
                await client.aclose()

    asyncio.run(scenario())


def test_errors_are_upstream_errors() -> None:
    for error in (ConnectError, ConnectTimeout, ReadTimeout, WriteTimeout, ProtocolError, RemoteClosed):
        assert issubclass(error, UpstreamError)
