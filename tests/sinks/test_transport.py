"""UpstreamTransport against a real local server: the bytes on the wire, keep-alive, answers and failures.

The destination is a raw asyncio server on 127.0.0.1 (port 0) that records every request byte for byte and answers
what each test scripts; the dispatcher tests run the real sinks and the real Dispatcher on its default transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from gateway import upstream
from gateway.config import DispatchSettings, SpoolSettings
from gateway.delivery.dispatcher import Dispatcher
from gateway.events import Event
from gateway.sinks import Outcome, Sink
from gateway.sinks.factory import build_sinks
from gateway.sinks.transport import MAX_RESPONSE_BYTES, UpstreamTransport, _httpx_error
from tests.sinks import CHROME_UA, GA4_SECRET, GA_CLIENT_ID, TRUNCATED_IP, make_event, python_org_settings, sink_named

pytestmark = pytest.mark.anyio

ACCEPTED = b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\nok"
Answer = Callable[[bytes], bytes | None]  # request bytes -> response bytes; None: never answer; b"": close


class RawDestination:
    """Records each request (head + Content-Length body) as received, and answers with ``answer(request)``."""

    def __init__(self, answer: Answer = lambda _: ACCEPTED) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.close_after_answer = False
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                reply = self.answer(request)
                if reply is None:
                    await asyncio.sleep(3600)  # a destination that never answers; cancelled on close
                if not reply:
                    return
                writer.write(reply)
                await writer.drain()
                if self.close_after_answer:
                    return
        finally:
            self._tasks.discard(task)
            writer.close()


@contextlib.asynccontextmanager
async def raw_destination(
    answer: Answer = lambda _: ACCEPTED, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[RawDestination]:
    destination = RawDestination(answer)
    server = await asyncio.start_server(destination.handle, "127.0.0.1", 0, ssl=ssl_context)
    destination.port = server.sockets[0].getsockname()[1]
    try:
        yield destination
    finally:
        server.close()
        for task in list(destination._tasks):
            task.cancel()
        for writer in destination._writers:
            writer.close()
        await server.wait_closed()
        await asyncio.sleep(0)


def transport(**changes: float) -> UpstreamTransport:
    settings = {"connect_timeout": 1.0, "read_timeout": 1.0, "write_timeout": 1.0, "max_idle": 4, **changes}
    return UpstreamTransport(
        connect_timeout=settings["connect_timeout"],
        read_timeout=settings["read_timeout"],
        write_timeout=settings["write_timeout"],
        max_idle=int(settings["max_idle"]),
    )


def sinks_for(url: str, **kwargs: object) -> dict[str, Sink]:
    settings = python_org_settings(
        plausible={"endpoint": f"{url}/api/event", **kwargs},
        ga4={"endpoint": f"{url}/mp/collect", "fields": ["name", "url", "referrer", "title", "ip", "user_agent"]},
    )
    sinks = build_sinks(settings)
    return {name: sink_named(sinks, name) for name in ("plausible", "ga4")}


def consented() -> Event:
    return make_event(granted=frozenset({"analytics"}), client_id=GA_CLIENT_ID)


def fresh_event(**changes: object) -> Event:
    """An event the dispatcher will not find expired (make_event's timestamp is from 2023)."""
    return make_event(timestamp=time.time(), **changes)


# ------------------------------------------------------------------------------------------------------------
# Bytes on the wire
# ------------------------------------------------------------------------------------------------------------


async def test_plausible_request_bytes_are_exactly_what_the_sink_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy and a CA bundle in the environment must change nothing: the request goes straight to the server.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent.pem")
    async with raw_destination() as dest:
        sink = sinks_for(dest.url)["plausible"]
        payload = sink.build(make_event())
        request = sink.request([payload])
        t = transport()
        try:
            response = await t.handle_async_request(request)
        finally:
            await t.aclose()
    body = json.dumps(payload.body, separators=(",", ":")).encode()
    expected = (
        b"POST /api/event HTTP/1.1\r\n"
        + f"host: 127.0.0.1:{dest.port}\r\n".encode()
        + b"content-type: application/json\r\n"
        + f"user-agent: {CHROME_UA}\r\n".encode()
        + f"x-forwarded-for: {TRUNCATED_IP}\r\n".encode()
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert dest.requests == [expected]
    assert response.status_code == 202
    assert response.content == b"ok"
    assert sink.classify(response).outcome is Outcome.DELIVERED


async def test_ga4_request_carries_path_query_and_nothing_else() -> None:
    async with raw_destination(lambda _: b"HTTP/1.1 204 No Content\r\n\r\n") as dest:
        sink = sinks_for(dest.url)["ga4"]
        request = sink.request([sink.build(consented())])
        t = transport()
        try:
            response = await t.handle_async_request(request)
        finally:
            await t.aclose()
    (raw,) = dest.requests
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == f"POST /mp/collect?measurement_id=G-PYORG123&api_secret={GA4_SECRET} HTTP/1.1".encode()
    assert lines[1:] == [
        f"host: 127.0.0.1:{dest.port}".encode(),
        b"content-type: application/json",
        f"content-length: {len(body)}".encode(),
    ]
    assert json.loads(body)["client_id"] == GA_CLIENT_ID
    assert response.status_code == 204
    assert sink.classify(response).outcome is Outcome.DELIVERED


async def deliver(sink: Sink, settings: DispatchSettings, events: list[Event]) -> Dispatcher:
    """Run a dispatcher (no spool) with ``sink`` until ``events`` are all finished one way or another; stopped."""
    dispatcher = Dispatcher([sink], settings, SpoolSettings(enabled=False))
    await dispatcher.start()
    try:
        for event in events:
            dispatcher.submit(event)
        assert await dispatcher.wait_idle(5.0)
    finally:
        await dispatcher.stop()
    return dispatcher


async def test_cookies_set_by_a_destination_are_never_sent_back() -> None:
    answer = b"HTTP/1.1 202 Accepted\r\nset-cookie: track=me; Path=/\r\ncontent-length: 0\r\n\r\n"
    async with raw_destination(lambda _: answer) as dest:
        dispatcher = await deliver(
            sinks_for(dest.url)["plausible"],
            DispatchSettings(flush_interval=0.02),
            [fresh_event(event_id=f"ev-{index}") for index in range(3)],
        )
    assert len(dest.requests) == 3
    assert all(b"cookie" not in request.lower().split(b"\r\n\r\n")[0] for request in dest.requests)
    assert dispatcher.stats()["plausible"]["delivered"] == 3


async def test_get_without_body_has_no_content_length() -> None:
    async with raw_destination(lambda _: b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi!") as dest:
        t = transport()
        try:
            response = await t.handle_async_request(httpx.Request("GET", f"{dest.url}/health?x=1"))
        finally:
            await t.aclose()
    assert dest.requests == [f"GET /health?x=1 HTTP/1.1\r\nhost: 127.0.0.1:{dest.port}\r\n\r\n".encode()]
    assert response.content == b"hi!"


# ------------------------------------------------------------------------------------------------------------
# Keep-alive and response bodies
# ------------------------------------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection() -> None:
    async with raw_destination() as dest:
        sink = sinks_for(dest.url)["plausible"]
        t = transport()
        try:
            for index in range(5):
                response = await t.handle_async_request(sink.request([sink.build(make_event(event_id=f"e{index}"))]))
                assert response.status_code == 202
            assert t.open_connections == 1
        finally:
            await t.aclose()
    assert len(dest.requests) == 5
    assert dest.connections == 1


async def test_connection_close_answer_is_not_reused() -> None:
    answer = b"HTTP/1.1 202 Accepted\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    async with raw_destination(lambda _: answer) as dest:
        sink = sinks_for(dest.url)["plausible"]
        t = transport()
        try:
            for _ in range(2):
                assert (await t.handle_async_request(sink.request([sink.build(make_event())]))).status_code == 202
        finally:
            await t.aclose()
    assert dest.connections == 2


async def test_large_answer_is_capped_and_its_connection_dropped() -> None:
    size = MAX_RESPONSE_BYTES * 3
    answer = f"HTTP/1.1 400 Bad Request\r\ncontent-length: {size}\r\n\r\n".encode() + b"x" * size
    async with raw_destination(lambda _: answer) as dest:
        sink = sinks_for(dest.url)["plausible"]
        t = transport()
        try:
            response = await t.handle_async_request(sink.request([sink.build(make_event())]))
            await asyncio.sleep(0.01)  # the dropped connection's close callback
            assert t.open_connections == 0
        finally:
            await t.aclose()
    assert response.status_code == 400
    assert response.content == b"x" * MAX_RESPONSE_BYTES


async def test_chunked_answer_is_read_completely() -> None:
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    async with raw_destination(lambda _: answer) as dest:
        t = transport()
        try:
            response = await t.handle_async_request(httpx.Request("POST", dest.url, content=b"{}"))
            second = await t.handle_async_request(httpx.Request("POST", dest.url, content=b"{}"))
        finally:
            await t.aclose()
    assert response.content == second.content == b"abcde"
    assert dest.connections == 1


# ------------------------------------------------------------------------------------------------------------
# Answers -> verdicts, through the real sinks
# ------------------------------------------------------------------------------------------------------------


def answer_of(status: str, *headers: str, body: bytes = b"") -> bytes:
    fields = "".join(f"{h}\r\n" for h in (*headers, f"content-length: {len(body)}"))
    return f"HTTP/1.1 {status}\r\n{fields}\r\n".encode() + body


VERDICTS = [
    ("plausible", answer_of("202 Accepted", body=b"ok"), Outcome.DELIVERED, "", None),
    ("plausible", answer_of("202 Accepted", "x-plausible-dropped: 1"), Outcome.DROPPED_BY_DESTINATION, "", None),
    (
        "plausible",
        answer_of("400 Bad Request", "content-type: application/json", body=b'{"errors":{"url":["is invalid"]}}'),
        Outcome.REJECTED,
        "url: is invalid",
        None,
    ),
    ("plausible", answer_of("429 Too Many Requests", "retry-after: 7"), Outcome.RETRY, "http 429", 7.0),
    ("plausible", answer_of("500 Internal Server Error"), Outcome.RETRY, "http 500", None),
    (
        "plausible",
        answer_of("301 Moved Permanently", "location: http://elsewhere.invalid/"),
        Outcome.REJECTED,
        "",
        None,
    ),
    ("ga4", answer_of("204 No Content"), Outcome.DELIVERED, "", None),
    ("ga4", answer_of("400 Bad Request"), Outcome.REJECTED, "http 400", None),
    ("ga4", answer_of("503 Service Unavailable", "retry-after: 2"), Outcome.RETRY, "http 503", 2.0),
]


@pytest.mark.parametrize(("destination", "answer", "outcome", "reason", "retry_after"), VERDICTS)
async def test_answers_map_to_verdicts(
    destination: str, answer: bytes, outcome: Outcome, reason: str, retry_after: float | None
) -> None:
    async with raw_destination(lambda _: answer) as dest:
        sink = sinks_for(dest.url)[destination]
        t = transport()
        try:
            response = await t.handle_async_request(sink.request([sink.build(consented())]))
        finally:
            await t.aclose()
    verdict = sink.classify(response)
    assert verdict.outcome is outcome
    if reason:
        assert verdict.reason == reason
    assert verdict.retry_after == retry_after
    assert len(dest.requests) == 1  # a redirect is an answer, never followed


# ------------------------------------------------------------------------------------------------------------
# Failures -> httpx exceptions
# ------------------------------------------------------------------------------------------------------------


async def closed_port_url() -> str:
    async with raw_destination() as dest:
        url = dest.url
    return url  # nothing listens there any more


async def test_connect_refused_is_connect_error() -> None:
    url = await closed_port_url()
    t = transport()
    try:
        with pytest.raises(httpx.ConnectError) as info:
            await t.handle_async_request(httpx.Request("POST", f"{url}/api/event", content=b"{}"))
    finally:
        await t.aclose()
    assert info.value.request.url == f"{url}/api/event"


async def test_destination_that_never_answers_is_read_timeout() -> None:
    async with raw_destination(lambda _: None) as dest:
        t = transport(read_timeout=0.1)
        try:
            with pytest.raises(httpx.ReadTimeout):
                await t.handle_async_request(httpx.Request("POST", dest.url, content=b"{}"))
            await asyncio.sleep(0.01)  # the dropped connection's close callback
            assert t.open_connections == 0
        finally:
            await t.aclose()
    assert len(dest.requests) == 1  # it was sent: the outcome is ambiguous


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 202 Accepted\r\ncontent-length: 10\r\n\r\nshort",  # closed mid-body
        b"",  # closed after reading the request, no answer at all
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
    ],
    ids=["garbage", "cut-off-body", "closed", "101"],
)
async def test_malformed_or_missing_answer_is_remote_protocol_error(answer: bytes) -> None:
    async with raw_destination(lambda _: answer) as dest:
        dest.close_after_answer = True
        t = transport()
        try:
            with pytest.raises(httpx.RemoteProtocolError):
                await t.handle_async_request(httpx.Request("POST", dest.url, content=b"{}"))
        finally:
            await t.aclose()
    assert len(dest.requests) == 1


async def test_header_injection_is_refused_before_anything_is_sent() -> None:
    async with raw_destination() as dest:
        t = transport()
        try:
            bad = httpx.Request("POST", dest.url, headers={"user-agent": "x\r\nx-injected: 1"}, content=b"{}")
            with pytest.raises(httpx.LocalProtocolError):
                await t.handle_async_request(bad)
            bad_name = httpx.Request("POST", dest.url, headers={"bad name": "1"}, content=b"{}")
            with pytest.raises(httpx.LocalProtocolError):
                await t.handle_async_request(bad_name)
        finally:
            await t.aclose()
    assert dest.requests == []


async def test_closed_transport_refuses_requests() -> None:
    t = transport()
    await t.aclose()
    with pytest.raises(httpx.ConnectError):
        await t.handle_async_request(httpx.Request("POST", "http://127.0.0.1:9/", content=b"{}"))


def test_unsupported_scheme() -> None:
    t = transport()
    with pytest.raises(httpx.UnsupportedProtocol):
        asyncio.run(t.handle_async_request(httpx.Request("GET", "ftp://example.org/")))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (upstream.ConnectError("x"), httpx.ConnectError),
        (upstream.ConnectTimeout("x"), httpx.ConnectTimeout),
        (upstream.WriteTimeout("x"), httpx.WriteTimeout),
        (upstream.ReadTimeout("x"), httpx.ReadTimeout),
        (upstream.ProtocolError("x"), httpx.RemoteProtocolError),
        (upstream.RemoteClosed("x"), httpx.RemoteProtocolError),
    ],
)
def test_error_mapping(error: upstream.UpstreamError, expected: type[httpx.TransportError]) -> None:
    request = httpx.Request("POST", "http://127.0.0.1:9/")
    mapped = _httpx_error(error, request)
    assert type(mapped) is expected
    assert mapped.request is request


# ------------------------------------------------------------------------------------------------------------
# Through the dispatcher (its default transport)
# ------------------------------------------------------------------------------------------------------------


def fast_settings(**changes: float) -> DispatchSettings:
    base: dict[str, float] = {
        "connect_timeout": 0.5,
        "read_timeout": 0.2,
        "write_timeout": 0.5,
        "pool_timeout": 0.1,
        "backoff_base": 0.01,
        "backoff_cap": 0.02,
        "flush_interval": 0.02,
        "max_connections": 4,
        **changes,
    }
    return DispatchSettings(
        connect_timeout=base["connect_timeout"],
        read_timeout=base["read_timeout"],
        write_timeout=base["write_timeout"],
        pool_timeout=base["pool_timeout"],
        backoff_base=base["backoff_base"],
        backoff_cap=base["backoff_cap"],
        flush_interval=base["flush_interval"],
        max_connections=int(base["max_connections"]),
        max_attempts=int(changes.get("max_attempts", 3)),
        circuit_threshold=1000,
    )


async def test_dispatcher_delivers_over_keep_alive() -> None:
    async with raw_destination() as dest:
        dispatcher = await deliver(
            sinks_for(dest.url)["plausible"],
            fast_settings(max_connections=1),
            [fresh_event(event_id=f"ev-{index}") for index in range(20)],
        )
    stats = dispatcher.stats()["plausible"]
    assert stats["delivered"] == 20
    assert len(dest.requests) == 20
    assert dest.connections == 1
    dispatcher.check_invariant()


async def test_dispatcher_retries_a_refused_connection() -> None:
    url = await closed_port_url()
    dispatcher = await deliver(sinks_for(url)["plausible"], fast_settings(max_attempts=3), [fresh_event()])
    stats = dispatcher.stats()["plausible"]
    assert stats["retried"] == 2  # attempts 1 and 2 were retried; the third exhausted them
    assert stats["dead_lettered"] == 1
    assert stats["ambiguous"] == 0
    dispatcher.check_invariant()


async def test_dispatcher_counts_a_silent_destination_as_ambiguous() -> None:
    async with raw_destination(lambda _: None) as dest:
        dispatcher = await deliver(sinks_for(dest.url)["plausible"], fast_settings(), [fresh_event()])
    stats = dispatcher.stats()["plausible"]
    assert stats["ambiguous"] == 1
    assert stats["retried"] == 0  # at most once by default
    assert len(dest.requests) == 1
    dispatcher.check_invariant()


async def test_dispatcher_honours_429_then_delivers() -> None:
    answers = [answer_of("429 Too Many Requests", "retry-after: 0"), ACCEPTED]

    def reply(_: bytes) -> bytes:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    async with raw_destination(reply) as dest:
        dispatcher = await deliver(sinks_for(dest.url)["plausible"], fast_settings(), [fresh_event()])
    stats = dispatcher.stats()["plausible"]
    assert (stats["retried"], stats["delivered"]) == (1, 1)
    assert len(dest.requests) == 2
    assert dest.requests[0] == dest.requests[1]  # the retry is the same request, byte for byte


# ------------------------------------------------------------------------------------------------------------
# https (only where the openssl tool can make a throwaway certificate)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_https_with_a_trusted_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    async with raw_destination(ssl_context=server_context) as dest:
        url = f"https://127.0.0.1:{dest.port}/api/event"
        trusting = UpstreamTransport(
            connect_timeout=2.0,
            read_timeout=2.0,
            write_timeout=2.0,
            max_idle=2,
            ssl_context=ssl.create_default_context(cafile=str(cert)),
        )
        default = transport()  # certifi's roots do not include our certificate
        try:
            response = await trusting.handle_async_request(httpx.Request("POST", url, content=b"{}"))
            with pytest.raises(httpx.ConnectError):
                await default.handle_async_request(httpx.Request("POST", url, content=b"{}"))
        finally:
            await trusting.aclose()
            await default.aclose()
    assert response.status_code == 202
    assert dest.requests[0].startswith(f"POST /api/event HTTP/1.1\r\nhost: 127.0.0.1:{dest.port}\r\n".encode())
