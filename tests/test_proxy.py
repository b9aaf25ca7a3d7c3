"""Tests for gateway.proxy.ReverseProxy against a real upstream on 127.0.0.1.

The upstream is a raw asyncio server (in a background thread) that records every request it receives byte for
byte and answers according to the path, including deliberately broken answers. A second one on 127.0.0.2 is a
decoy that must never be contacted. The proxy is driven two ways: in-process through ``httpx.ASGITransport``
(with the truncated client address the privacy middleware would leave), and behind a real uvicorn with raw
sockets, for both of uvicorn's HTTP parsers where the parser matters.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httptools
import httpx
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import ConfigError, UpstreamSettings
from gateway.proxy import FORWARDING_HEADERS, HOP_BY_HOP_HEADERS, ReverseProxy

T = TypeVar("T")
pytestmark = pytest.mark.anyio

VISITOR_IP = "203.0.113.0"  # what the privacy middleware leaves in scope["client"]
BLOCK = bytes(range(256)) * 256  # 64 KiB of a recognisable pattern
GZIPPED = gzip.compress(b"<!doctype html><title>compressed</title>" + b"<p>squeeze me</p>" * 200, mtime=0)


# ----------------------------------------------------------------------------------------------------------------
# Background event loop and the recording upstream
# ----------------------------------------------------------------------------------------------------------------


class BackgroundLoop:
    """An asyncio loop in a daemon thread, so servers keep running while the test thread blocks on sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Seen:
    """One request as the upstream received it."""

    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body_length: int = 0
    body_sha256: str = ""
    body: bytes = b""  # the first 64 KiB

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, f"{name!r} reached the upstream {len(values)} times"
        return values[0] if values else None

    @property
    def names(self) -> set[bytes]:
        return {n for n, _ in self.headers}


@dataclass
class Upstream:
    host: str
    port: int = 0
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)
    endless_stopped: threading.Event = field(default_factory=threading.Event)
    handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def authority(self) -> bytes:
        return f"{self.host}:{self.port}".encode()

    def reset(self) -> None:
        self.connections = 0
        self.seen.clear()
        self.endless_stopped.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        task = asyncio.current_task()
        assert task is not None
        self.handlers[task] = writer
        try:
            while await self._one(connection, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # not re-raised: asyncio 3.11's start_server callback would log a cancelled handler as an error
        finally:
            writer.close()
            del self.handlers[task]

    async def stop_handlers(self) -> None:
        """Abort every open connection and wait for its handler, so nothing is left for the loop to destroy."""
        for task, writer in list(self.handlers.items()):
            writer.transport.abort()
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _one(self, connection: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        line, *lines = head[:-4].split(b"\r\n")
        method, target, _ = line.split(b" ")
        headers = [(n.strip().lower(), v.strip()) for n, _, v in (h.partition(b":") for h in lines)]
        seen = Seen(connection, method, target, headers)
        path = target.split(b"?")[0]
        if path == b"/early-413":
            self.seen.append(seen)
            writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
            await writer.drain()
            while await reader.read(65536):  # drain, so closing does not reset the response away
                pass
            return False
        await self._read_body(seen, reader)
        self.seen.append(seen)
        return await self._answer(path, seen, reader, writer)

    async def _read_body(self, seen: Seen, reader: asyncio.StreamReader) -> None:
        hasher = hashlib.sha256()
        kept = bytearray()

        def take(data: bytes) -> None:
            hasher.update(data)
            seen.body_length += len(data)
            if len(kept) < 65536:
                kept.extend(data[: 65536 - len(kept)])

        if seen.header(b"transfer-encoding") == b"chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                take((await reader.readexactly(size + 2))[:-2])
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
        elif (length := seen.header(b"content-length")) is not None:
            remaining = int(length)
            while remaining:
                data = await reader.read(min(remaining, 65536))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                take(data)
                remaining -= len(data)
        seen.body_sha256 = hasher.hexdigest()
        seen.body = bytes(kept)

    async def _answer(
        self, path: bytes, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Write the response for ``path``; return whether the connection stays open."""
        write = writer.write
        if path == b"/gzip":
            write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(GZIPPED), GZIPPED)
            )
        elif path.startswith(b"/cookie/"):
            write(
                b"HTTP/1.1 200 OK\r\nSet-Cookie: session=%s; Path=/; HttpOnly\r\nContent-Length: 2\r\n\r\nok" % path[8:]
            )
        elif path == b"/chunked":
            write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        elif path == b"/hop":
            write(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Upstream-Secret\r\nX-Upstream-Secret: s3cr3t\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\n"
                b"Upgrade: h2c\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n"
                b"2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n"
            )
        elif path.startswith(b"/download/"):
            size = int(path[10:])
            write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(BLOCK)):
                write(BLOCK)
                await writer.drain()
        elif path == b"/endless":
            write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                while True:
                    write(b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK))
                    await writer.drain()
                    await asyncio.sleep(0.001)
            except ConnectionError:
                self.endless_stopped.set()
                return False
        elif path == b"/interim":
            write(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
            )
        elif path in BROKEN:
            write(BROKEN[path])
            await writer.drain()
            return False
        elif path == b"/switch":
            write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n\x00\x00\x12")
            await writer.drain()
            await asyncio.sleep(0.2)
            return False
        elif path == b"/silent":
            await reader.read()  # never answers
            return False
        elif path == b"/reset-mid-body":
            write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()
            return False
        elif path == b"/json":
            body = json.dumps({"length": seen.body_length, "sha256": seen.body_sha256}).encode()
            write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        else:
            write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 16\r\n\r\nok from upstream")
        await writer.drain()
        return True


BROKEN = {
    b"/garbage": b"HTTX/1.1 200 OK\r\n\r\n",
    b"/nul-header": b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    b"/lf-header": b"HTTP/1.1 200 OK\r\nX-Bad: a\nSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok",
    b"/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"/huge-head": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(100)) + b"\r\n",
    b"/status999": b"HTTP/1.1 999 Nope\r\nContent-Length: 0\r\n\r\n",
}


class Servers:
    def __init__(self) -> None:
        self.background = BackgroundLoop()
        self.upstream = Upstream("127.0.0.1")
        self.decoy = Upstream("127.0.0.2")
        self._servers = [self.background.run(self._start(u)) for u in (self.upstream, self.decoy)]

    @staticmethod
    async def _start(upstream: Upstream) -> asyncio.AbstractServer:
        server = await asyncio.start_server(upstream.handle, upstream.host, 0)
        upstream.port = server.sockets[0].getsockname()[1]
        return server

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            for upstream in (self.upstream, self.decoy):
                await upstream.stop_handlers()
            for server in self._servers:
                await server.wait_closed()
            await asyncio.sleep(0)  # let the aborted transports run their connection_lost callbacks

        self.background.run(stop())
        self.background.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    started = Servers()
    yield started
    started.close()


@pytest.fixture
def upstream(servers: Servers) -> Upstream:
    servers.upstream.reset()
    servers.decoy.reset()
    return servers.upstream


@pytest.fixture
def decoy(servers: Servers) -> Upstream:
    return servers.decoy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ----------------------------------------------------------------------------------------------------------------
# In-process proxy through httpx.ASGITransport
# ----------------------------------------------------------------------------------------------------------------

ProxyFactory = Callable[..., Coroutine[Any, Any, tuple[ReverseProxy, httpx.AsyncClient]]]


@pytest.fixture
async def make_proxy(upstream: Upstream) -> AsyncIterator[ProxyFactory]:
    opened: list[tuple[ReverseProxy, httpx.AsyncClient]] = []

    async def make(url: str | None = None, **options: Any) -> tuple[ReverseProxy, httpx.AsyncClient]:
        settings = UpstreamSettings(url=url or upstream.url, **{"read_timeout": 2.0, **options})
        proxy = ReverseProxy(settings)
        await proxy.startup()
        transport = httpx.ASGITransport(app=proxy, client=(VISITOR_IP, 1234))
        client = httpx.AsyncClient(transport=transport, base_url="http://www.example.org")
        opened.append((proxy, client))
        return proxy, client

    yield make
    for proxy, client in opened:
        await client.aclose()
        await proxy.shutdown()


@pytest.fixture
async def client(make_proxy: ProxyFactory) -> httpx.AsyncClient:
    _, client = await make_proxy()
    return client


async def call(proxy: ReverseProxy, **overrides: Any) -> tuple[int, bytes, list[Message]]:
    """Call the proxy directly with a hand-made scope (for targets no HTTP client would send)."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"www.example.org")],
        "client": (VISITOR_IP, 1234),
        "server": ("127.0.0.1", 8000),
        **overrides,
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await proxy(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body, sent


async def test_request_arrives_intact(client: httpx.AsyncClient, upstream: Upstream) -> None:
    headers = {
        "user-agent": "Mozilla/5.0 test",
        "accept-language": "de-CH",
        "cookie": "consent=yes",
        "authorization": "Bearer abc",
        "x-custom": "value with spaces",
        "sec-gpc": "1",
    }
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        content = b"" if method in ("GET", "OPTIONS") else b"payload \x00\xff bytes"
        response = await client.request(
            method, "/a%2Fb/c%20d;p=1?q=%C3%A9&x=1&x=2", headers=headers, content=content or None
        )
        assert response.status_code == 200
        assert response.text == "ok from upstream"
        seen = upstream.seen[-1]
        assert seen.method == method.encode()
        assert seen.target == b"/a%2Fb/c%20d;p=1?q=%C3%A9&x=1&x=2"
        assert seen.body == content
        for name, value in headers.items():
            assert seen.header(name.encode()) == value.encode()
        assert seen.header(b"host") == upstream.authority
        assert seen.header(b"x-forwarded-for") == VISITOR_IP.encode()
        assert seen.header(b"x-forwarded-proto") == b"http"
        assert seen.header(b"x-forwarded-host") == b"www.example.org"
    assert upstream.connections == 1  # one kept-alive upstream connection served them all


async def test_inbound_forwarding_headers_never_reach_the_upstream(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    spoofed = [(name, b"198.51.100.77") for name in sorted(FORWARDING_HEADERS)] + [
        (b"x-forwarded-for", b"198.51.100.77, 10.0.0.1"),
        (b"x-forwarded-port", b"443"),
        (b"x-forwarded-prefix", b"/admin"),
        (b"x-forwarded-server", b"evil"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"evil.example"),
        (b"forwarded", b"for=198.51.100.77;proto=https"),
    ]
    response = await client.get("/", headers=spoofed)
    assert response.status_code == 200
    seen = upstream.seen[-1]
    assert not any(b"198.51.100.77" in value or b"evil" in value for _, value in seen.headers)
    assert seen.names.isdisjoint(FORWARDING_HEADERS)
    assert {n for n in seen.names if n.startswith(b"x-forwarded")} == {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
    assert seen.header(b"x-forwarded-for") == VISITOR_IP.encode()
    assert seen.header(b"x-forwarded-proto") == b"http"
    assert seen.header(b"x-forwarded-host") == b"www.example.org"


async def test_hop_by_hop_request_headers_are_stripped(client: httpx.AsyncClient, upstream: Upstream) -> None:
    response = await client.get(
        "/",
        headers=[
            (b"connection", b"close, X-Secret, Sec-GPC"),
            (b"x-secret", b"named in Connection"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"trailer", b"X-Sum"),
            (b"upgrade", b"h2c"),
            (b"http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
            (b"proxy-authorization", b"Basic Zm9vOmJhcg=="),
            (b"proxy-connection", b"keep-alive"),
            (b"expect", b"100-continue"),
            (b"sec-gpc", b"1"),
            (b"x-kept", b"yes"),
        ],
    )
    assert response.status_code == 200
    seen = upstream.seen[-1]
    assert seen.names.isdisjoint(HOP_BY_HOP_HEADERS | {b"x-secret", b"expect"})
    assert seen.header(b"x-kept") == b"yes"
    # GPC: "HTTP intermediaries MUST NOT remove a Sec-GPC header set to 1", even when Connection names it.
    assert seen.header(b"sec-gpc") == b"1"


async def test_hop_by_hop_response_headers_are_stripped(client: httpx.AsyncClient) -> None:
    response = await client.get("/hop")
    assert response.status_code == 200
    assert response.content == b"ok"
    names = {name.lower() for name in response.headers}
    assert names.isdisjoint(
        {"connection", "keep-alive", "proxy-authenticate", "proxy-connection", "upgrade", "trailer",
         "transfer-encoding", "x-upstream-secret", "x-sum"}
    )  # fmt: skip
    assert response.headers["x-kept"] == "yes"
    assert response.headers["content-length"] == "2"  # the complete chunked body was re-framed


async def test_interim_responses_are_not_relayed(client: httpx.AsyncClient) -> None:
    response = await client.get("/interim")
    assert (response.status_code, response.content) == (200, b"final")
    assert "link" not in response.headers


async def test_preserve_host(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    _, client = await make_proxy(preserve_host=True)
    await client.get("/", headers={"host": "www.python.org"})
    assert upstream.seen[-1].header(b"host") == b"www.python.org"
    assert upstream.seen[-1].header(b"x-forwarded-host") == b"www.python.org"


@pytest.mark.parametrize(
    ("base", "prefix"), [("/base/", b"/base"), ("/", b""), ("", b""), ("/a%20b/ü", b"/a%20b/%C3%BC")]
)
async def test_upstream_base_path_is_a_prefix(
    make_proxy: ProxyFactory, upstream: Upstream, base: str, prefix: bytes
) -> None:
    _, client = await make_proxy(f"{upstream.url}{base}")
    await client.get("/x/y?z=1")
    assert upstream.seen[-1].target == prefix + b"/x/y?z=1"


@pytest.mark.parametrize("shape", [list, tuple], ids=["lists", "tuples-in-a-tuple"])
async def test_headers_as_any_iterable_of_pairs(
    make_proxy: ProxyFactory, upstream: Upstream, shape: Callable[[list[bytes]], Any]
) -> None:
    """ASGI allows any iterable of [name, value] pairs; the compiled proxy's fast path expects a list of tuples."""
    proxy, _ = await make_proxy()
    raw = [[b"host", b"www.example.org"], [b"x-kept", b"yes"], [b"x-forwarded-for", b"198.51.100.77"]]
    status, body, _ = await call(proxy, headers=shape([shape(pair) for pair in raw]))
    assert (status, body) == (200, b"ok from upstream")
    seen = upstream.seen[-1]
    assert seen.header(b"x-kept") == b"yes"
    assert seen.header(b"x-forwarded-for") == VISITOR_IP.encode()
    assert seen.header(b"x-forwarded-host") == b"www.example.org"


async def test_scope_without_raw_path(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    proxy, _ = await make_proxy()
    status, _, _ = await call(proxy, raw_path=None, path="/caf\u00e9 menu/a%b")
    assert status == 200
    assert upstream.seen[-1].target == b"/caf%C3%A9%20menu/a%25b"


async def test_gzip_is_relayed_byte_for_byte(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/gzip", headers={"accept-encoding": "gzip"}) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert raw == GZIPPED
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(len(GZIPPED))
    assert response.headers["vary"] == "Accept-Encoding"


async def test_cookie_leakage(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    """GHSA-7vwr-g6pm-9hc8: a shared client with a cookie jar sent one visitor's cookies on another's request."""
    proxy, _ = await make_proxy()
    visitors = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy, client=(ip, 1)), base_url="http://www.example.org")
        for ip in ("203.0.113.0", "198.51.100.0")
    ]
    try:
        alice, bob = visitors
        first = await alice.get("/cookie/alice-secret")
        assert first.headers["set-cookie"].startswith("session=alice-secret")
        await bob.get("/page")
        await bob.get("/cookie/bob")
        await bob.get("/page")
    finally:
        for visitor in visitors:
            await visitor.aclose()
    assert upstream.seen[0].header(b"cookie") is None
    assert upstream.seen[1].header(b"cookie") is None  # bob never carries alice's cookie...
    assert upstream.seen[3].header(b"cookie") == b"session=bob"  # ...only his own, from his own client
    assert {seen.connection for seen in upstream.seen} == {1}  # even over the same upstream connection


async def test_streamed_request_body(client: httpx.AsyncClient, upstream: Upstream) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(50):
            yield BLOCK[: 1000 + i]

    response = await client.post("/json", content=parts())
    expected = b"".join(BLOCK[: 1000 + i] for i in range(50))
    assert response.json() == {"length": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}
    assert upstream.seen[-1].header(b"transfer-encoding") == b"chunked"
    assert upstream.seen[-1].header(b"content-length") is None


async def test_chunked_response_is_relayed(client: httpx.AsyncClient) -> None:
    response = await client.get("/chunked")
    assert response.content == b"hello world"


async def test_head_request(client: httpx.AsyncClient, upstream: Upstream) -> None:
    response = await client.head("/")
    assert response.status_code == 200
    assert response.headers["content-length"] == "16"  # the upstream's, for the GET it describes
    assert upstream.seen[-1].method == b"HEAD"


# -- no open proxy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "CONNECT", "raw_path": b"a:443", "path": "a:443"},
        {"method": "TRACE"},
        {"method": "PROPFIND"},
        {"method": "get"},
        {"method": "OPTIONS", "raw_path": b"*", "path": "*"},
        {"raw_path": b"http://127.0.0.2:9/x", "path": "http://127.0.0.2:9/x"},
        {"raw_path": b"//127.0.0.2/x", "path": "//127.0.0.2/x"},
        {"raw_path": b"//evil/x", "path": "//evil/x"},
        {"raw_path": b"", "path": ""},
        {"raw_path": b"/a\r\nHost: evil", "path": "/a\r\nHost: evil"},
        {"raw_path": b"/a b", "path": "/a b"},
        {"headers": [(b"host", b"x"), (b"content-length", b"3"), (b"transfer-encoding", b"chunked")]},
        {"headers": [(b"content-length", b"-1")]},
        {"headers": [(b"x-a", b"v\r\nInjected: 1")]},
    ],
    ids=lambda overrides: repr(overrides)[:60],
)
async def test_bad_requests_are_refused_without_contacting_anyone(
    make_proxy: ProxyFactory, upstream: Upstream, decoy: Upstream, overrides: dict[str, Any]
) -> None:
    proxy, _ = await make_proxy()
    status, body, _ = await call(proxy, **overrides)
    assert status == 400
    assert body.startswith(b"Bad Request") and len(body) < 80
    assert upstream.seen == [] and upstream.connections == 0
    assert decoy.connections == 0


async def test_host_header_does_not_route(client: httpx.AsyncClient, upstream: Upstream, decoy: Upstream) -> None:
    response = await client.get("/", headers={"host": decoy.authority.decode()})
    assert response.status_code == 200
    assert upstream.seen[-1].header(b"host") == upstream.authority
    assert upstream.seen[-1].header(b"x-forwarded-host") == decoy.authority
    assert decoy.connections == 0


@settings(max_examples=60, deadline=None)
@given(
    raw_path=st.binary(min_size=0, max_size=40).map(lambda b: b"/" + b),
    query=st.binary(max_size=20).filter(lambda q: b"#" not in q),
)
def test_upstream_target_is_base_plus_path_and_query(servers: Servers, raw_path: bytes, query: bytes) -> None:
    upstream, decoy = servers.upstream, servers.decoy
    upstream.reset()
    decoy.reset()

    async def scenario() -> tuple[int, bytes]:
        proxy = ReverseProxy(UpstreamSettings(url=upstream.url + "/base", read_timeout=2.0))
        try:
            status, body, _ = await call(proxy, raw_path=raw_path, path=raw_path.decode("latin-1"), query_string=query)
        finally:
            await proxy.shutdown()
        return status, body

    status, _ = asyncio.run(scenario())
    target = b"/base" + raw_path + (b"?" + query if query else b"")
    unsafe = raw_path.startswith(b"//") or any(byte <= 0x20 or byte == 0x7F for byte in target)
    if unsafe:
        assert status == 400
        assert upstream.seen == []
    else:
        assert status == 200
        assert [(s.target, s.header(b"host")) for s in upstream.seen] == [(target, upstream.authority)]
    assert decoy.connections == 0


# -- other scopes ------------------------------------------------------------------------------------------------


async def test_websocket_is_refused(make_proxy: ProxyFactory) -> None:
    proxy, _ = await make_proxy()
    sent: list[Message] = []
    messages = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await proxy({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    assert [m["type"] for m in sent] == ["websocket.close"]


async def test_lifespan(upstream: Upstream) -> None:
    proxy = ReverseProxy(UpstreamSettings(url=upstream.url))
    queue = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> Message:
        return queue.pop(0)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    await proxy({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert proxy.client.closed
    await proxy.startup()  # a restart after shutdown gets a fresh pool
    assert not proxy.client.closed
    status, _, _ = await call(proxy)
    assert status == 200
    await proxy.shutdown()


async def test_ready(make_proxy: ProxyFactory) -> None:
    up, _ = await make_proxy()
    down, _ = await make_proxy(f"http://127.0.0.1:{free_port()}")
    assert await up.ready() is True
    assert await down.ready() is False


@pytest.mark.parametrize("url", ["", "ftp://x", "http://example.org/?q=1"])
def test_bad_upstream_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"upstream\.url"):
        ReverseProxy(UpstreamSettings(url=url))


# -- faults ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*[p.decode() for p in BROKEN], "/switch"])
async def test_malformed_upstream_response_is_502(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert (response.status_code, response.content) == (502, b"Bad Gateway\n")
    assert "x-bad" not in response.headers and "set-cookie" not in response.headers
    assert "upgrade" not in response.headers
    after = await client.get("/")
    assert (after.status_code, after.content) == (200, b"ok from upstream")


async def test_upstream_down_is_502_quickly(make_proxy: ProxyFactory) -> None:
    _, client = await make_proxy(f"http://127.0.0.1:{free_port()}", connect_timeout=1.0)
    started = time.monotonic()
    response = await client.get("/")
    assert (response.status_code, response.content) == (502, b"Bad Gateway\n")
    assert time.monotonic() - started < 1.0


async def test_connect_timeout_is_504(make_proxy: ProxyFactory) -> None:
    with socket.socket() as listener:  # full accept queue: SYNs are dropped, the connect hangs
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = [socket.create_connection(listener.getsockname())]
        for _ in range(3):
            extra = socket.socket()
            extra.setblocking(False)
            extra.connect_ex(listener.getsockname())
            fillers.append(extra)
        try:
            _, client = await make_proxy(f"http://127.0.0.1:{listener.getsockname()[1]}", connect_timeout=0.3)
            started = time.monotonic()
            response = await client.get("/")
            assert (response.status_code, response.content) == (504, b"Gateway Timeout\n")
            assert time.monotonic() - started < 1.5
        finally:
            for sock in fillers:
                sock.close()


async def test_silent_upstream_is_504_within_read_timeout(make_proxy: ProxyFactory) -> None:
    _, client = await make_proxy(read_timeout=0.3)
    started = time.monotonic()
    response = await client.get("/silent")
    assert (response.status_code, response.content) == (504, b"Gateway Timeout\n")
    assert 0.29 < time.monotonic() - started < 1.5
    assert (await client.get("/")).status_code == 200


async def test_upstream_errors_are_logged_without_request_data(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    await client.get("/garbage?email=visitor@example.org")
    messages = [record.getMessage() for record in caplog.records if record.name == "gateway.proxy"]
    assert messages and all("visitor" not in m and VISITOR_IP not in m and "garbage" not in m for m in messages)


async def test_early_upstream_answer_to_an_upload(client: httpx.AsyncClient) -> None:
    async def big() -> AsyncIterator[bytes]:
        for _ in range(200):
            yield BLOCK

    response = await client.post("/early-413", content=big())
    assert (response.status_code, response.content) == (413, b"too large")
    assert (await client.get("/")).status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Behind a real uvicorn, with raw sockets
# ----------------------------------------------------------------------------------------------------------------


def behind_privacy_middleware(app: ASGIApp) -> ASGIApp:
    """Stands in for PrivacyMiddleware: the proxy only ever sees the truncated address."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": (VISITOR_IP, 0)}
        await app(scope, receive, send)

    return wrapped


class UvicornThread:
    def __init__(self, app: ASGIApp, http: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, http=http, loop="asyncio", ws="none", lifespan="on", log_config=None, access_log=False,
            proxy_headers=False, timeout_graceful_shutdown=1,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module", params=["h11", "httptools"])
def gateway(request: pytest.FixtureRequest, servers: Servers) -> Iterator[int]:
    """Port of a uvicorn serving the proxy (behind the stand-in middleware), for each HTTP parser."""
    settings = UpstreamSettings(url=servers.upstream.url, connect_timeout=1.0, read_timeout=1.0)
    thread = UvicornThread(behind_privacy_middleware(ReverseProxy(settings)), request.param)
    yield thread.port
    thread.stop()


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        return values[-1] if values else None


class _Collector:
    def __init__(self) -> None:
        self.responses: list[RawResponse] = []
        self.current: RawResponse | None = None
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = RawResponse(0, [], b"", False)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.complete = True
        self.responses.append(self.current)
        self.current = None


def exchange(port: int, data: bytes, *, expect: int = 1, timeout: float = 3.0) -> list[RawResponse]:
    """Send raw bytes; return the responses read until ``expect`` arrived, the peer closed, or a quiet second.

    An incomplete last response (the connection closed mid-body) is returned with ``complete=False``.
    """
    collector = _Collector()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.settimeout(1.0)
        while len(collector.responses) < expect:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            collector.parser.feed_data(chunk)
    if collector.current is not None:
        collector.responses.append(collector.current)
    return collector.responses


def request_bytes(target: str = "/", *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: www.example.org", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def test_absolute_form_target_never_reaches_another_host(gateway: int, upstream: Upstream, decoy: Upstream) -> None:
    (response,) = exchange(gateway, request_bytes(f"http://{decoy.authority.decode()}/x"))
    # h11 hands the absolute URL to the app (-> 400); httptools keeps only its path (-> routed to our upstream).
    assert response.status in (400, 200)
    if response.status == 200:
        assert [(s.target, s.header(b"host")) for s in upstream.seen] == [(b"/x", upstream.authority)]
    else:
        assert upstream.seen == []
    assert decoy.connections == 0


@pytest.mark.parametrize(
    "raw",
    [
        request_bytes("//evil/x"),
        request_bytes("//127.0.0.2/x"),
        b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHost: 127.0.0.2:443\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: www.example.org\r\n\r\n",
        request_bytes("/", method="TRACE"),
    ],
    ids=["scheme-relative", "scheme-relative-ip", "connect", "options-asterisk", "trace"],
)
def test_open_proxy_attempts_are_400(gateway: int, upstream: Upstream, decoy: Upstream, raw: bytes) -> None:
    responses = exchange(gateway, raw)
    assert responses and responses[0].status == 400
    assert upstream.seen == []
    assert decoy.connections == 0


def test_host_header_pointing_elsewhere(gateway: int, upstream: Upstream, decoy: Upstream) -> None:
    raw = f"GET /page HTTP/1.1\r\nHost: {decoy.authority.decode()}\r\n\r\n".encode()
    (response,) = exchange(gateway, raw)
    assert response.status == 200
    assert upstream.seen[-1].header(b"host") == upstream.authority
    assert decoy.connections == 0


def test_connection_named_headers_over_the_wire(gateway: int, upstream: Upstream) -> None:
    raw = request_bytes("/", "Connection: close, X-Secret", "X-Secret: do-not-forward", "Sec-GPC: 1")
    (response,) = exchange(gateway, raw)
    assert response.status == 200
    assert upstream.seen[-1].header(b"x-secret") is None
    assert upstream.seen[-1].header(b"connection") is None
    assert upstream.seen[-1].header(b"sec-gpc") == b"1"


def test_h2c_upgrade_is_not_relayed(gateway: int, upstream: Upstream) -> None:
    raw = request_bytes(
        "/", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"
    )
    responses = exchange(gateway, raw)
    assert all(response.status != 101 for response in responses)
    for seen in upstream.seen:
        assert seen.names.isdisjoint({b"upgrade", b"http2-settings", b"connection"})


def test_upstream_101_is_never_relayed(gateway: int) -> None:
    (response,) = exchange(gateway, request_bytes("/switch"))
    assert (response.status, response.body) == (502, b"Bad Gateway\n")


def test_gzip_over_the_wire_is_byte_identical(gateway: int) -> None:
    (response,) = exchange(gateway, request_bytes("/gzip", "Accept-Encoding: gzip"))
    assert response.body == GZIPPED
    assert response.header(b"content-encoding") == b"gzip"
    assert response.header(b"content-length") == str(len(GZIPPED)).encode()
    assert response.header(b"transfer-encoding") is None


SMUGGLING = {
    "cl-te": ("Content-Length: 4", "Transfer-Encoding: chunked"),
    "te-cl": ("Transfer-Encoding: chunked", "Content-Length: 4"),
    "cl-cl": ("Content-Length: 4", "Content-Length: 40"),
    "te-xchunked": ("Transfer-Encoding: xchunked",),
    "te-chunked-identity": ("Transfer-Encoding: chunked, identity",),
    "te-obs-fold": ("Transfer-Encoding:\r\n chunked",),
}


@pytest.mark.parametrize("framing", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_request_smuggling_attempts(gateway: int, upstream: Upstream, framing: tuple[str, ...]) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: www.example.org\r\n\r\n"
    raw = request_bytes("/front", *framing, method="POST", body=b"0\r\n\r\n" + smuggled)
    responses = exchange(gateway, raw, expect=2)
    assert responses
    # Either refused (by uvicorn's parser or the proxy), or the server settled on one framing and the upstream
    # received that message re-framed: never a second request hidden inside the first one's body.
    if responses[0].status in (400, 501):
        assert all(seen.target != b"/front" for seen in upstream.seen)
    assert all(b"/smuggled" not in seen.body for seen in upstream.seen)
    for seen in upstream.seen:
        assert seen.header(b"transfer-encoding") in (None, b"chunked")
        assert seen.header(b"transfer-encoding") is None or seen.header(b"content-length") is None
    # Every request the upstream saw was answered to the client: both sides agree on the message boundaries.
    assert len(upstream.seen) == sum(1 for response in responses if response.status == 200)


def test_upstream_reset_mid_body_then_next_request_works(gateway: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway}") as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/reset-mid-body")
        response = client.get("/")
    assert (response.status_code, response.text) == (200, "ok from upstream")


def test_every_fault_leaves_the_gateway_serving(gateway: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway}", timeout=5) as client:
        for path in ["/garbage", "/nul-header", "/bad-chunk", "/huge-head", "/switch", "/silent", "/status999"]:
            response = client.get(path)
            assert response.status_code in (502, 504), path
            assert client.get("/").status_code == 200, f"after {path}"


def test_visitor_disconnect_closes_the_upstream_stream(gateway: int, upstream: Upstream) -> None:
    with socket.create_connection(("127.0.0.1", gateway), timeout=3) as sock:
        sock.sendall(request_bytes("/endless"))
        received = 0
        while received < 1024 * 1024:
            received += len(sock.recv(65536))
    # Without a disconnect watch the proxy would keep pulling the endless body from the upstream.
    assert upstream.endless_stopped.wait(5)


# -- bounded memory: the proxy runs in this process, so tracemalloc sees its buffers -------------------------------


SIZE = 32 * 1024 * 1024


def test_large_download_streams_with_bounded_memory(gateway: int) -> None:
    buffer = bytearray(65536)
    view = memoryview(buffer)
    hasher = hashlib.sha256()
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", gateway), timeout=10) as sock:
            sock.sendall(request_bytes(f"/download/{SIZE}"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200")
            assert f"content-length: {SIZE}".encode() in head.lower()
            received = 0
            while received < SIZE:
                n = sock.recv_into(buffer)
                assert n, "connection closed early"
                hasher.update(view[:n])
                received += n
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == SIZE
    assert hasher.hexdigest() == hashlib.sha256(BLOCK * (SIZE // len(BLOCK))).hexdigest()
    assert peak < SIZE // 8, f"peak {peak} bytes while relaying {SIZE} bytes"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_upload_streams_with_bounded_memory(gateway: int, upstream: Upstream, framing: str) -> None:
    chunk = b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK) if framing == "chunked" else BLOCK
    header = "Transfer-Encoding: chunked" if framing == "chunked" else f"Content-Length: {SIZE}"
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", gateway), timeout=10) as sock:
            sock.sendall(request_bytes("/json", header, method="PUT"))
            for _ in range(SIZE // len(BLOCK)):
                sock.sendall(chunk)
            if framing == "chunked":
                sock.sendall(b"0\r\n\r\n")
            collector = _Collector()
            while not collector.responses:
                data = sock.recv(65536)
                assert data
                collector.parser.feed_data(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (response,) = collector.responses
    assert json.loads(response.body) == {
        "length": SIZE,
        "sha256": hashlib.sha256(BLOCK * (SIZE // len(BLOCK))).hexdigest(),
    }
    assert peak < SIZE // 8, f"peak {peak} bytes while relaying {SIZE} bytes"
