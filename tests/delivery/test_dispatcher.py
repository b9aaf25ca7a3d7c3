from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.config import DispatchSettings, SpoolSettings
from gateway.delivery.dispatcher import CIRCUIT_CLOSED, CIRCUIT_OPEN, Dispatcher
from gateway.events import Event
from gateway.sinks import Outcome, Payload, PolicyDrop, Verdict
from gateway.spool import Spool

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in tests/delivery/)
START = 1_000_000.0

# ---------------------------------------------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSink:
    """Implements the Sink protocol. Props steer misbehaviour: drop=<reason>, explode=build|request|classify."""

    kind = "fake"
    dry_run = False

    def __init__(self, name: str, *, requires: Sequence[str] = (), max_batch: int = 1) -> None:
        self.name = name
        self.requires = frozenset(requires)
        self.max_batch = max_batch
        self.endpoint = f"https://{name}.example/api/event?secret=do-not-log"
        self.built = 0

    def build(self, event: Event) -> Payload:
        self.built += 1
        if "drop" in event.props:
            raise PolicyDrop(event.props["drop"])
        if event.props.get("explode") == "build":
            raise RuntimeError("build failed")
        body = {"id": event.event_id, "url": event.url, "explode": event.props.get("explode", "")}
        return Payload(
            destination=self.name,
            event_id=event.event_id,
            body=body,
            headers=(("x-forwarded-for", event.ip),) if event.ip else (),
            batch_key=event.client_id if self.max_batch > 1 else "",
            created_at=event.timestamp,
        )

    def request(self, payloads: Sequence[Payload]) -> httpx.Request:
        assert 1 <= len(payloads) <= self.max_batch
        if any(p.body["explode"] == "request" for p in payloads):
            raise ValueError("cannot build request")
        headers = [("content-type", "application/json"), *payloads[0].headers]
        body = json.dumps({"events": [p.body for p in payloads]}).encode()
        return httpx.Request("POST", self.endpoint, headers=headers, content=body)

    def classify(self, response: httpx.Response) -> Verdict:
        if json.loads(response.request.content)["events"][0]["explode"] == "classify":
            raise KeyError("classify failed")
        status = response.status_code
        if 200 <= status < 300:
            if "x-plausible-dropped" in response.headers:
                return Verdict(Outcome.DROPPED_BY_DESTINATION, "x-plausible-dropped")
            return Verdict(Outcome.DELIVERED)
        if status == 429 or status >= 500:
            return Verdict(Outcome.RETRY, f"http {status}")  # Retry-After is left to the dispatcher
        return Verdict(Outcome.REJECTED, f"http {status}")


class FakeDestination:
    """A scripted destination behind httpx.MockTransport that records the event ids of every request."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.script: deque[str] = deque()
        self.default = "ok"
        self.delay = 0.1  # the "slow" action's answer time, seconds
        self.clock = clock
        self.requests: list[list[str]] = []  # every attempt
        self.delivered: list[str] = []  # ids of requests answered 2xx
        self.delivered_at: dict[str, float] = {}
        self.cookies_seen: list[str] = []
        self.transport = httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        ids = [event["id"] for event in json.loads(request.content)["events"]]
        self.requests.append(ids)
        self.cookies_seen.append(request.headers.get("cookie", ""))
        action = self.script.popleft() if self.script else self.default
        if action == "slow":
            await asyncio.sleep(self.delay)
            action = "ok"
        if action in ("ok", "cookie"):
            self.delivered.extend(ids)
            for event_id in ids:
                self.delivered_at.setdefault(event_id, self.clock())
            headers = {"set-cookie": "tracker=1; Path=/"} if action == "cookie" else {}
            return httpx.Response(202, headers=headers, text="ok")
        if action == "dropped":
            return httpx.Response(202, headers={"x-plausible-dropped": "1"})
        if action == "500":
            return httpx.Response(500)
        if action == "429":
            return httpx.Response(429, headers={"retry-after": "30"})
        if action == "400":
            return httpx.Response(400, json={"errors": {"url": ["is invalid"]}})
        if action == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if action == "read_timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if action == "boom":
            raise RuntimeError("transport bug")
        if action == "hang":
            await asyncio.Event().wait()
        raise AssertionError(f"unknown action {action}")

    def attempts(self) -> Counter[str]:
        return Counter(event_id for ids in self.requests for event_id in ids)


FAST = DispatchSettings(
    queue_size=100,
    max_attempts=50,
    backoff_base=1.0,
    backoff_cap=1.0,  # every delay is uniform(0, 1): advancing a fake clock by 1.01 makes any retry due
    connect_timeout=0.05,
    read_timeout=0.1,
    write_timeout=0.05,
    pool_timeout=0.05,  # request deadline 0.25 s
    max_connections=2,
    circuit_threshold=1000,
    circuit_reset_seconds=5.0,
    flush_interval=0.02,
    shutdown_timeout=0.5,
)


def dispatch_settings(**changes: Any) -> DispatchSettings:
    import dataclasses

    return dataclasses.replace(FAST, **changes)


def event(n: int | str, clock: Callable[[], float] = time.time, **fields: Any) -> Event:
    return Event(name="pageview", url=f"https://www.python.org/page/{n}", timestamp=clock(), **fields)


async def until(dispatcher: Dispatcher, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition``, checking the books on every step."""
    deadline = time.monotonic() + timeout
    while True:
        dispatcher.check_invariant()
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; stats: {dict(dispatcher.stats())}")
        await asyncio.sleep(0.003)


async def quiet(dispatcher: Dispatcher, seconds: float = 0.08) -> None:
    """Let the tasks run for a while (several ticks), checking the books."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dispatcher.check_invariant()
        await asyncio.sleep(0.005)


def spool_ids(path: str, destination: str = "p") -> set[str]:
    """A destination's event ids committed to the spool file, read through an independent connection: what would
    survive a crash."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    try:
        return {row[0] for row in conn.execute("SELECT event_id FROM payloads WHERE destination = ?", (destination,))}
    finally:
        conn.close()


@pytest.fixture
def spool_path(tmp_path: Path) -> str:
    return str(tmp_path / "spool.sqlite3")


@contextlib.asynccontextmanager
async def running(dispatcher: Dispatcher) -> AsyncIterator[Dispatcher]:
    await dispatcher.start()
    try:
        yield dispatcher
    finally:
        await dispatcher.stop()
        dispatcher.check_invariant()


# ---------------------------------------------------------------------------------------------------------------
# happy path, hot path, policy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("spool_on", [True, False])
async def test_delivers_everything_once(spool_path: str, spool_on: bool) -> None:
    dest = FakeDestination()
    sinks = [FakeSink("plausible"), FakeSink("other")]
    # queue_size 100: with the spool on, the burst's last 50 go through the overflow buffer and the spool.
    settings = dispatch_settings(queue_size=100 if spool_on else 1000)
    d = Dispatcher(sinks, settings, SpoolSettings(enabled=spool_on, path=spool_path), transport=dest.transport)
    async with running(d):
        events = [event(i) for i in range(150)]
        for e in events:
            d.submit(e)
            d.check_invariant()
        await until(d, lambda: all(s["delivered"] == 150 for s in d.stats().values()))
        stats = d.stats()["plausible"]
        assert stats["accepted"] == 150 and stats["pending"] == 0 and stats["dropped_overflow"] == 0
    ids = [e.event_id for e in events]
    assert len(set(ids)) == 150 and all(ids)
    assert sorted(dest.delivered) == sorted(ids * 2)  # once per destination, never twice
    assert max(dest.attempts().values()) == 2


@pytest.mark.anyio
async def test_consent_is_checked_on_the_hot_path_without_building(spool_path: str) -> None:
    dest = FakeDestination()
    ga = FakeSink("ga4", requires=["analytics"])
    pl = FakeSink("plausible")
    d = Dispatcher([ga, pl], FAST, SpoolSettings(path=spool_path), transport=dest.transport)
    async with running(d):
        d.submit(event(1))
        d.submit(event(2, granted=frozenset({"analytics"})))
        await until(d, lambda: d.stats()["plausible"]["delivered"] == 2 and d.stats()["ga4"]["delivered"] == 1)
        ga_stats = d.stats()["ga4"]
        assert (ga_stats["accepted"], ga_stats["dropped_policy"], ga_stats["dropped_policy:consent"]) == (2, 1, 1)
    assert ga.built == 1  # the refused event was never built


@pytest.mark.anyio
async def test_policy_drops_and_build_errors_are_counted(spool_path: str) -> None:
    dest = FakeDestination()
    d = Dispatcher([FakeSink("p")], FAST, SpoolSettings(path=spool_path), transport=dest.transport)
    async with running(d):
        d.submit(event(1, props={"drop": "limits"}))
        d.submit(event(2, props={"explode": "build"}))
        d.submit(event(3))
        await until(d, lambda: d.stats()["p"]["pending"] == 0)
        stats = d.stats()["p"]
        assert stats["dropped_policy:limits"] == 1 and stats["dead_lettered"] == 1 and stats["delivered"] == 1
    spool = Spool(SpoolSettings(path=spool_path))
    spool.open()
    try:
        ((_, destination, reason),) = spool.dead_letters()
        assert (destination, reason) == ("p", "internal:RuntimeError")
    finally:
        spool.close()


@pytest.mark.anyio
async def test_event_ids_are_assigned_and_kept() -> None:
    d = Dispatcher([FakeSink("p")], FAST, SpoolSettings(enabled=False))
    given = event(1)
    given.event_id = "caller-chosen"
    fresh = [event(n) for n in range(3)]
    d.submit(given)
    for e in fresh:
        d.submit(e)
    assert given.event_id == "caller-chosen"
    assert len({e.event_id for e in fresh}) == 3 and all(e.event_id for e in fresh)
    d.check_invariant()  # queued before start: pending
    assert d.stats()["p"]["pending"] == 4


def test_submit_is_synchronous_and_cheap() -> None:
    """No event loop needed, nothing awaited: the request path only appends to deques."""
    d = Dispatcher(
        [FakeSink(f"d{i}") for i in range(2)], dispatch_settings(queue_size=100_000), SpoolSettings(enabled=False)
    )
    events = [event(i) for i in range(20_000)]
    started = time.perf_counter()
    for e in events:
        d.submit(e)
    per_event = (time.perf_counter() - started) / len(events)
    print(f"\nsubmit(): {per_event * 1e6:.2f} µs per event for 2 destinations")
    d.check_invariant()
    assert d.stats()["d0"]["queue_depth"] == 20_000


# ---------------------------------------------------------------------------------------------------------------
# the scripted failure sequence
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("spool_on", [True, False])
async def test_scripted_failures(spool_path: str, spool_on: bool) -> None:
    clock = FakeClock()
    dest = FakeDestination(clock)
    dest.script.extend(["500", "429", "connect", "read_timeout", "hang", "400"])
    d = Dispatcher([FakeSink("p")], FAST, SpoolSettings(enabled=spool_on, path=spool_path),
                   transport=dest.transport, clock=clock)  # fmt: skip

    def stat(key: str) -> float:
        return d.stats()["p"][key]

    async with running(d):
        first = event(1, clock)
        d.submit(first)
        # 500: retried (attempts, not an outcome), still pending.
        await until(d, lambda: len(dest.requests) == 1 and stat("retried") == 1)
        assert stat("pending") == 1 and stat("delivered") == 0
        clock.advance(1.01)
        # 429 with Retry-After: 30 -> retried, and not tried again before 30 s have passed.
        await until(d, lambda: len(dest.requests) == 2 and stat("retried") == 2)
        clock.advance(10)
        await quiet(d)
        assert len(dest.requests) == 2
        clock.advance(20.5)
        # Connect error: the request never left, retried.
        await until(d, lambda: len(dest.requests) == 3 and stat("retried") == 3)
        clock.advance(1.01)
        # Read timeout after the body was sent: ambiguous, not retried (at most once).
        await until(d, lambda: len(dest.requests) == 4 and stat("ambiguous") == 1)
        assert stat("pending") == 0 and stat("retried") == 3
        clock.advance(5)
        await quiet(d)
        assert len(dest.requests) == 4
        # A hang: the request deadline (0.25 s here) fires; ambiguous as well.
        d.submit(event(2, clock))
        await until(d, lambda: stat("ambiguous") == 2)
        # 400: dead-lettered with the reason, never retried.
        d.submit(event(3, clock))
        await until(d, lambda: stat("dead_lettered") == 1)
        # Healthy again: everything delivered exactly once.
        later = [event(n, clock) for n in range(4, 24)]
        for e in later:
            d.submit(e)
        await until(d, lambda: stat("delivered") == 20)
        stats = d.stats()["p"]
        assert stats["accepted"] == 23 and stats["pending"] == 0 and stats["dropped_expired"] == 0
    attempts = dest.attempts()
    assert attempts[first.event_id] == 4
    assert all(attempts[e.event_id] == 1 for e in later)
    assert sorted(dest.delivered) == sorted(e.event_id for e in later)
    if spool_on:
        spool = Spool(SpoolSettings(path=spool_path))
        spool.open()
        try:
            assert [reason for _, _, reason in spool.dead_letters()] == ["http 400"]
            assert spool.rows == 0
        finally:
            spool.close()


@pytest.mark.anyio
async def test_ambiguous_retry_when_configured(spool_path: str) -> None:
    clock = FakeClock()
    dest = FakeDestination(clock)
    dest.script.append("read_timeout")
    d = Dispatcher([FakeSink("p")], dispatch_settings(retry_ambiguous=True), SpoolSettings(path=spool_path),
                   transport=dest.transport, clock=clock)  # fmt: skip
    async with running(d):
        e = event(1, clock)
        d.submit(e)
        await until(d, lambda: d.stats()["p"]["ambiguous_retried"] == 1)
        clock.advance(1.01)
        await until(d, lambda: d.stats()["p"]["delivered"] == 1)
        assert d.stats()["p"]["ambiguous"] == 0
    assert dest.requests == [[e.event_id], [e.event_id]]  # at least once: the first may have counted too


@pytest.mark.anyio
async def test_retries_are_capped_by_max_attempts(spool_path: str) -> None:
    clock = FakeClock()
    dest = FakeDestination(clock)
    dest.default = "500"
    d = Dispatcher([FakeSink("p")], dispatch_settings(max_attempts=3), SpoolSettings(path=spool_path),
                   transport=dest.transport, clock=clock)  # fmt: skip
    async with running(d):
        d.submit(event(1, clock))
        for attempt in (1, 2):
            await until(d, lambda attempt=attempt: len(dest.requests) == attempt)  # type: ignore[misc]
            clock.advance(1.01)
        await until(d, lambda: d.stats()["p"]["dead_lettered"] == 1)
        assert d.stats()["p"]["retried"] == 2 and len(dest.requests) == 3
    spool = Spool(SpoolSettings(path=spool_path))
    spool.open()
    try:
        assert [reason for _, _, reason in spool.dead_letters()] == ["retries exhausted: http 500"]
    finally:
        spool.close()


@pytest.mark.anyio
@pytest.mark.parametrize("spool_on", [True, False])
async def test_ttl_expires_undeliverable_events(spool_path: str, spool_on: bool) -> None:
    clock = FakeClock()
    dest = FakeDestination(clock)
    dest.default = "500"
    d = Dispatcher([FakeSink("p")], FAST, SpoolSettings(enabled=spool_on, path=spool_path),
                   transport=dest.transport, clock=clock, ttls={"p": 10.0})  # fmt: skip
    async with running(d):
        for n in range(5):
            d.submit(event(n, clock))
        await until(d, lambda: len(dest.requests) >= 5)
        await quiet(d)
        clock.advance(10.5)
        dest.default = "ok"
        await until(d, lambda: d.stats()["p"]["dropped_expired"] == 5)
        assert d.stats()["p"]["pending"] == 0 and dest.delivered == []
    if spool_on:
        assert spool_ids(spool_path) == set()


@pytest.mark.anyio
async def test_spool_purges_expired_rows_while_the_circuit_is_open(spool_path: str) -> None:
    clock = FakeClock()
    dest = FakeDestination(clock)
    dest.default = "connect"
    settings = dispatch_settings(circuit_threshold=1, circuit_reset_seconds=10_000.0)
    d = Dispatcher([FakeSink("p")], settings, SpoolSettings(path=spool_path), transport=dest.transport,
                   clock=clock, ttls={"p": 60.0})  # fmt: skip
    async with running(d):
        for n in range(10):
            d.submit(event(n, clock))
        await until(d, lambda: d.stats()["p"]["spool_rows"] == 10 and d.stats()["p"]["circuit_state"] == CIRCUIT_OPEN)
        clock.advance(30)
        d.submit(event("young", clock))
        await until(d, lambda: d.stats()["p"]["spool_rows"] == 11)
        clock.advance(31)  # the first ten are 61 s old, "young" 31 s
        await until(d, lambda: d.stats()["p"]["dropped_expired"] == 10)
        assert len(spool_ids(spool_path)) == 1
        assert d.stats()["p"]["spool_oldest_age_seconds"] == pytest.approx(31, abs=0.01)
    assert len(dest.requests) == 1


@pytest.mark.anyio
async def test_destination_drops_are_counted(spool_path: str) -> None:
    dest = FakeDestination()
    dest.default = "dropped"
    d = Dispatcher([FakeSink("p")], FAST, SpoolSettings(path=spool_path), transport=dest.transport)
    async with running(d):
        d.submit(event(1))
        await until(d, lambda: d.stats()["p"]["dropped_destination"] == 1)


@pytest.mark.anyio
async def test_sink_and_transport_exceptions_never_kill_a_sender(spool_path: str) -> None:
    dest = FakeDestination()
    dest.script.extend(["boom"])
    settings = dispatch_settings(max_connections=1)  # one sender: it must survive every failure
    d = Dispatcher([FakeSink("p")], settings, SpoolSettings(path=spool_path), transport=dest.transport)
    async with running(d):
        d.submit(event(0))  # transport raises RuntimeError
        d.submit(event(1, props={"explode": "request"}))
        d.submit(event(2, props={"explode": "classify"}))
        d.submit(event(3))
        await until(d, lambda: d.stats()["p"]["pending"] == 0)
        stats = d.stats()["p"]
        assert (stats["dead_lettered"], stats["delivered"]) == (3, 1)
    spool = Spool(SpoolSettings(path=spool_path))
    spool.open()
    try:
        assert sorted(reason for _, _, reason in spool.dead_letters()) == [
            "internal:KeyError", "internal:RuntimeError", "internal:ValueError",
        ]  # fmt: skip
    finally:
        spool.close()


# ---------------------------------------------------------------------------------------------------------------
# circuit breaker
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_circuit_opens_spools_and_probes(spool_path: str) -> None:
    clock = FakeClock()
    dest = FakeDestination(clock)
    dest.default = "connect"
    settings = dispatch_settings(circuit_threshold=3, circuit_reset_seconds=5.0)
    d = Dispatcher([FakeSink("p")], settings, SpoolSettings(path=spool_path), transport=dest.transport, clock=clock)

    def stat(key: str) -> float:
        return d.stats()["p"][key]

    async with running(d):
        for n in range(3):
            d.submit(event(n, clock))
        await until(d, lambda: len(dest.requests) == 3 and stat("circuit_state") == CIRCUIT_OPEN)
        clock.advance(2.0)  # the retries are due, the circuit is still open
        later = [event(n, clock) for n in range(3, 23)]
        for e in later:
            d.submit(e)
        # Open: nothing is sent, and within a flush interval everything is in the spool.
        await until(d, lambda: stat("spool_rows") == 23 and stat("queue_depth") == 0, timeout=FAST.flush_interval * 3)
        await quiet(d)
        assert len(dest.requests) == 3
        assert {e.event_id for e in later} <= spool_ids(spool_path)
        # Half-open after circuit_reset_seconds: one probe; it fails and the circuit opens again.
        clock.advance(3.5)
        await until(d, lambda: len(dest.requests) == 4 and stat("circuit_state") == CIRCUIT_OPEN)
        await quiet(d)
        assert len(dest.requests) == 4
        # Destination back: the next probe succeeds, the circuit closes and the backlog drains once.
        dest.default = "ok"
        clock.advance(5.5)
        await until(d, lambda: stat("delivered") == 23)
        assert stat("circuit_state") == CIRCUIT_CLOSED and stat("spool_rows") == 0
    assert len(dest.delivered) == len(set(dest.delivered)) == 23


# ---------------------------------------------------------------------------------------------------------------
# batching, cookies, logs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_batches_group_equal_batch_keys(spool_path: str) -> None:
    dest = FakeDestination()
    sink = FakeSink("ga4", max_batch=25)
    d = Dispatcher(
        [sink], dispatch_settings(max_connections=1), SpoolSettings(path=spool_path), transport=dest.transport
    )
    events = [event(n, client_id="a" if n % 4 else "b") for n in range(60)]
    for e in events:  # queued before start, so the sender finds full batches
        d.submit(e)
    async with running(d):
        await until(d, lambda: d.stats()["ga4"]["delivered"] == 60)
    client_of = {e.event_id: e.client_id for e in events}
    assert all(1 <= len(ids) <= 25 and len({client_of[i] for i in ids}) == 1 for ids in dest.requests)
    assert len(dest.requests) < 10
    assert sorted(dest.delivered) == sorted(client_of)


@pytest.mark.anyio
async def test_shared_client_keeps_no_cookies(spool_path: str) -> None:
    dest = FakeDestination()
    dest.default = "cookie"
    d = Dispatcher([FakeSink("p")], dispatch_settings(max_connections=1), SpoolSettings(enabled=False),
                   transport=dest.transport)  # fmt: skip
    async with running(d):
        for n in range(3):
            d.submit(event(n))
            await until(d, lambda n=n: d.stats()["p"]["delivered"] == n + 1)  # type: ignore[misc]
    assert dest.cookies_seen == ["", "", ""]


@pytest.mark.anyio
async def test_logs_name_destination_and_reason_only(spool_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.dispatch")
    clock = FakeClock()
    dest = FakeDestination(clock)
    dest.script.extend(["500", "read_timeout", "400", "connect"])
    d = Dispatcher([FakeSink("plausible")], FAST, SpoolSettings(path=spool_path), transport=dest.transport, clock=clock)
    canary_url = "https://www.python.org/reset/alice@example.com/token-5f2b9c1e8d7a6b5c4d3e2f1a"
    async with running(d):
        for n in range(3):
            d.submit(Event("pageview", canary_url + str(n), ip="203.0.113.0", timestamp=clock()))
        await until(d, lambda: d.stats()["plausible"]["retried"] == 1 and d.stats()["plausible"]["pending"] == 1)
        for _ in range(2):  # the retry: connect error, then delivered
            clock.advance(1.01)
            await quiet(d)
        await until(d, lambda: d.stats()["plausible"]["delivered"] == 1)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "plausible" in text and "http 400" in text and "ReadTimeout" in text and "ConnectError" in text
    for secret in ("alice", "example.com", "203.0.113", "token-", "secret=", "python.org", "{"):
        assert secret not in text


# ---------------------------------------------------------------------------------------------------------------
# overload, hangs and memory
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_destination_hangs(spool_path: str) -> None:
    """1,000 events while every destination hangs: submit() returns at once, memory stays bounded
    (independent of the number of events), and the overflow lands in the spool."""
    dest = FakeDestination()
    dest.default = "hang"
    settings = dispatch_settings(queue_size=100, read_timeout=60.0, max_connections=4, shutdown_timeout=0.1)
    d = Dispatcher([FakeSink("plausible"), FakeSink("ga4", max_batch=25)], settings, SpoolSettings(path=spool_path),
                   transport=dest.transport)  # fmt: skip
    durations: list[float] = []

    async def burst(start: int, count: int) -> None:
        for n in range(start, start + count):
            e = event(n, ip="203.0.113.0", client_id=f"c{n % 7}")
            t0 = time.perf_counter()
            d.submit(e)
            durations.append(time.perf_counter() - t0)
            if n % 10 == 9:
                await asyncio.sleep(0.005)  # ~2,000 requests/s arriving over time, as through a server

    sinks = [FakeSink("plausible"), FakeSink("ga4", max_batch=25)]
    async with running(d):
        await quiet(d, 0.02)
        tracemalloc.start()
        try:
            # What keeping 1,000 events and their payloads would cost: the unbounded design this must beat.
            base = tracemalloc.get_traced_memory()[0]
            kept = [event(n, ip="203.0.113.0", client_id=f"c{n % 7}") for n in range(1000)]
            kept_payloads = [sink.build(e) for e in kept for sink in sinks]
            retained = tracemalloc.get_traced_memory()[0] - base
            del kept, kept_payloads
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            await burst(0, 1000)
            await until(d, lambda: all(s["queue_depth"] == 0 and s["memory_pending"] == 0 for s in d.stats().values()))
            first_peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.reset_peak()
            await burst(1000, 1000)
            await until(d, lambda: all(s["queue_depth"] == 0 and s["memory_pending"] == 0 for s in d.stats().values()))
            second_peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        for stats in d.stats().values():
            assert stats["accepted"] == 2000
            assert stats["dropped_overflow"] == 0
            # Everything is in the spool, including the in-flight requests (leased rows).
            assert stats["spool_rows"] == 2000
        assert len(spool_ids(spool_path, "plausible")) == len(spool_ids(spool_path, "ga4")) == 2000
    durations.sort()
    print(
        f"\nsubmit() under hang: median {durations[len(durations) // 2] * 1e6:.1f} µs, max {durations[-1] * 1e3:.2f} ms"
    )
    print(
        f"tracemalloc peak: {first_peak / 1024:.0f} KiB for 1,000 events, {second_peak / 1024:.0f} KiB for 1,000 more;"
        f" keeping 1,000 events with their payloads takes {retained / 1024:.0f} KiB"
    )
    # Never waits: a slow append would be milliseconds (generous for CI under tracemalloc).
    assert durations[-1] < 0.05
    # Bounded: memory holds at most queue_size queued events, the overflow waiting for the next spool write and one
    # spool batch per destination, whatever the number of events. So the peak stays below what keeping the first
    # 1,000 events would take, and does not grow with the second 1,000.
    assert first_peak < retained
    assert second_peak < 1.5 * first_peak + 256 * 1024
    # At stop the hanging requests are cut off: ambiguous (they may have arrived), not re-sent.
    assert all(s["pending"] + s["ambiguous"] == 2000 for s in d.stats().values())


@pytest.mark.anyio
async def test_overflow_without_spool_is_dropped_and_counted() -> None:
    dest = FakeDestination()
    dest.default = "hang"
    settings = dispatch_settings(queue_size=10, read_timeout=60.0, max_connections=1, shutdown_timeout=0.05)
    d = Dispatcher([FakeSink("p")], settings, SpoolSettings(enabled=False), transport=dest.transport)
    async with running(d):
        d.submit(event(0))
        await until(d, lambda: len(dest.requests) == 1)  # the sender is stuck on it
        for n in range(1, 50):
            d.submit(event(n))
        d.check_invariant()
        stats = d.stats()["p"]
        assert (stats["queue_depth"], stats["in_flight"], stats["dropped_overflow"]) == (10, 1, 39)
    stats = d.stats()["p"]
    # Shutdown: the in-flight one is ambiguous, the queued ones are lost (no spool) and counted.
    assert (stats["ambiguous"], stats["dropped_overflow"], stats["pending"]) == (1, 49, 0)


# ---------------------------------------------------------------------------------------------------------------
# durability: within one flush interval, across shutdown and restart, and after SIGKILL
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["connect", "500", "hang"])
async def test_failing_destination_spools_within_a_flush_interval(spool_path: str, failure: str) -> None:
    dest = FakeDestination()
    dest.default = failure
    settings = dispatch_settings(flush_interval=0.2, read_timeout=60.0, circuit_threshold=5)
    d = Dispatcher([FakeSink("p")], settings, SpoolSettings(path=spool_path), transport=dest.transport)
    accepted: list[tuple[float, str]] = []
    async with running(d):
        for n in range(60):
            e = event(n)
            d.submit(e)
            accepted.append((time.monotonic(), e.event_id))
            await asyncio.sleep(0.005)
            d.check_invariant()
            cutoff = time.monotonic() - settings.flush_interval
            stored = spool_ids(spool_path)
            missing = [event_id for at, event_id in accepted if at < cutoff and event_id not in stored]
            assert not missing, f"accepted more than a flush interval ago but not in the spool: {missing}"


@pytest.mark.anyio
async def test_shutdown_spools_the_rest_and_restart_replays(spool_path: str) -> None:
    dest = FakeDestination()
    dest.default = "connect"
    settings = dispatch_settings(circuit_threshold=2)
    first = Dispatcher([FakeSink("p")], settings, SpoolSettings(path=spool_path), transport=dest.transport)
    await first.start()
    events = [event(n) for n in range(30)]
    for e in events:
        first.submit(e)
    await first.stop()
    first.check_invariant()
    assert first.stats()["p"]["spool_rows"] == first.stats()["p"]["pending"] == 30
    first.submit(event("late"))
    assert first.stats()["p"]["refused"] == 1 and first.stats()["p"]["accepted"] == 30
    assert spool_ids(spool_path) == {e.event_id for e in events}

    dest.default = "ok"
    second = Dispatcher([FakeSink("p")], settings, SpoolSettings(path=spool_path), transport=dest.transport)
    async with running(second):
        stats = second.stats()["p"]
        assert (stats["accepted"], stats["replayed"], stats["spool_rows"]) == (30, 30, 30)
        await until(second, lambda: second.stats()["p"]["delivered"] == 30)
    assert sorted(dest.delivered) == sorted(e.event_id for e in events)


@pytest.mark.anyio
async def test_graceful_stop_delivers_what_it_can(spool_path: str) -> None:
    dest = FakeDestination()
    d = Dispatcher([FakeSink("p")], FAST, SpoolSettings(path=spool_path), transport=dest.transport)
    await d.start()
    for n in range(40):
        d.submit(event(n))
    await d.stop()
    d.check_invariant()
    assert d.stats()["p"]["delivered"] == 40
    assert spool_ids(spool_path) == set()


@pytest.mark.anyio
async def test_stop_starts_no_request_it_cannot_finish(spool_path: str) -> None:
    """A slow destination and more queued than the drain can send: the senders stop starting requests once one
    would outlast shutdown_timeout, so none is cut off on the wire (ambiguous: the destination may have it); the
    rest is spooled and sent once after the restart."""
    dest = FakeDestination()
    dest.default = "slow"
    dest.delay = 0.1
    # A long flush interval: the keeper spools nothing by age, so the queue is still in memory at stop().
    settings = dispatch_settings(max_connections=1, shutdown_timeout=0.45, read_timeout=5.0, flush_interval=20.0)
    d = Dispatcher([FakeSink("p")], settings, SpoolSettings(path=spool_path), transport=dest.transport)
    await d.start()
    for n in range(30):
        d.submit(event(n))
    await until(d, lambda: d.stats()["p"]["delivered"] >= 1)  # a latency measured, as in any running gateway
    started = time.monotonic()
    await d.stop()
    took = time.monotonic() - started
    d.check_invariant()
    stats = d.stats()["p"]
    spooled = spool_ids(spool_path)
    assert stats["ambiguous"] == 0, stats
    assert 2 <= stats["delivered"] < 30, stats
    assert len(dest.requests) == len(dest.delivered) == stats["delivered"]  # every request started was answered
    assert len(spooled) == 30 - stats["delivered"] and not spooled & set(dest.delivered)
    # It also stops waiting once nothing more can be sent in time, rather than sleeping out the deadline.
    assert took < settings.shutdown_timeout, took


@pytest.mark.anyio
async def test_unusable_spool_degrades_to_memory(spool_path: str, caplog: pytest.LogCaptureFixture) -> None:
    holder = Spool(SpoolSettings(path=spool_path))
    holder.open()  # another process owns the file
    try:
        dest = FakeDestination()
        d = Dispatcher([FakeSink("p")], FAST, SpoolSettings(path=spool_path), transport=dest.transport)
        async with running(d):
            d.submit(event(1))
            await until(d, lambda: d.stats()["p"]["delivered"] == 1)
            assert d.stats()["p"]["spool_available"] == 0
        assert "spool unavailable" in caplog.text
    finally:
        holder.close()


CRASH_CHILD = """
import asyncio, json, sys, time
import httpx
from gateway.config import DispatchSettings, SpoolSettings
from gateway.delivery.dispatcher import Dispatcher
from gateway.events import Event
from gateway.sinks import Outcome, Payload, Verdict

class Sink:
    kind = "fake"; dry_run = False; max_batch = 1; requires = frozenset()
    def __init__(self, name): self.name = name
    def build(self, e): return Payload(self.name, e.event_id, {{"u": e.url}}, created_at=e.timestamp)
    def request(self, ps): return httpx.Request("POST", "https://x.example/", json=ps[0].body)
    def classify(self, r): return Verdict(Outcome.RETRY, "http %d" % r.status_code)

async def handler(request):
    if {failure!r} == "hang":
        await asyncio.Event().wait()
    raise httpx.ConnectError("refused", request=request)

async def main():
    settings = DispatchSettings(flush_interval={flush}, read_timeout=60.0)
    d = Dispatcher([Sink("plausible"), Sink("ga4")], settings, SpoolSettings(path={spool!r}),
                   transport=httpx.MockTransport(handler))
    await d.start()
    with open({log!r}, "a") as out:
        n = 0
        while True:
            e = Event("pageview", "https://www.python.org/%d" % n)
            d.submit(e)
            out.write("%s %r\\n" % (e.event_id, time.monotonic()))
            out.flush()
            n += 1
            await asyncio.sleep(0.005)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["connect", "hang"])
def test_sigkill_loses_nothing_older_than_a_flush_interval(tmp_path: Path, failure: str) -> None:
    flush = 0.2
    spool, log_path = str(tmp_path / "spool.sqlite3"), str(tmp_path / "accepted.log")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CRASH_CHILD.format(failure=failure, flush=flush, spool=spool, log=log_path)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.path.exists(log_path) and Path(log_path).read_text().count("\n") > 150:
                break
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            time.sleep(0.05)
        killed_at = time.monotonic()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stderr:
            child.stderr.close()
    accepted = []
    for line in Path(log_path).read_text().splitlines():
        event_id, at = line.split()
        accepted.append((float(at), event_id))
    old = {event_id for at, event_id in accepted if at < killed_at - flush}
    assert len(old) > 100
    stored = Spool(SpoolSettings(path=spool))
    stored.open()  # also: the spool survives the crash and opens cleanly
    try:
        rows = stored.rows_by_destination()
        by_destination = {d: {r.event_id for r in stored.rows_for(d)} for d in ("plausible", "ga4")}
    finally:
        stored.close()
    for destination, ids in by_destination.items():
        missing = old - ids
        assert not missing, f"{destination}: {len(missing)} of {len(old)} lost, e.g. {sorted(missing)[:3]}"
        assert rows[destination] == len(ids)


# ---------------------------------------------------------------------------------------------------------------
# stateful: dispatcher + spool + fake clock
# ---------------------------------------------------------------------------------------------------------------

MACHINE_TTL = 40.0


class DispatcherMachine(RuleBasedStateMachine):
    """Submit, fail, succeed, expire (advance the clock past the TTL) and restart, with the books checked after every
    step. Invariants: nothing is delivered twice, nothing is delivered after its TTL, and at the end every event was
    delivered or expired (none lost)."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.dir = tempfile.mkdtemp(prefix="dispatch-machine-")
        self.spool = SpoolSettings(path=os.path.join(self.dir, "spool.sqlite3"), max_rows=10_000)
        self.clock = FakeClock()
        self.dest = FakeDestination(self.clock)
        self.settings = dispatch_settings(circuit_threshold=3, circuit_reset_seconds=5.0, flush_interval=0.02)
        self.accepted_at: dict[str, float] = {}
        self.expired_total = 0
        self.delivered_total = 0
        self.counter = 0
        self.dispatcher = self._new()
        self.runner.run(self.dispatcher.start())

    def _new(self) -> Dispatcher:
        return Dispatcher([FakeSink("p")], self.settings, self.spool, transport=self.dest.transport,
                          clock=self.clock, ttls={"p": MACHINE_TTL})  # fmt: skip

    def _settle(self) -> None:
        assert self.runner.run(self.dispatcher.wait_idle(3.0)), dict(self.dispatcher.stats())
        # Nothing outlives its TTL: once idle, no unleased row older than the TTL is left in the file.
        conn = sqlite3.connect(f"file:{self.spool.path}?mode=ro", uri=True, timeout=1)
        try:
            (stale,) = conn.execute(
                "SELECT count(*) FROM payloads WHERE leased = 0 AND accepted_at < ?", (self.clock() - MACHINE_TTL,)
            ).fetchone()
        finally:
            conn.close()
        assert stale == 0, f"{stale} spooled payloads outlived the TTL"

    def teardown(self) -> None:
        try:
            self.dest.default = "ok"
            for _ in range(3):
                self.clock.advance(self.settings.circuit_reset_seconds + 1.1)
                self._settle()
            self.runner.run(self.dispatcher.stop())
            self.dispatcher.check_invariant()
            self._add_totals()
            self.check_deliveries()
            lost = len(self.accepted_at) - self.delivered_total - self.expired_total
            assert lost == 0, f"{lost} events neither delivered nor expired; {dict(self.dispatcher.stats())}"
            for event_id in set(self.accepted_at) - set(self.dest.delivered):
                assert self.clock() - self.accepted_at[event_id] > MACHINE_TTL, f"{event_id} undelivered, not expired"
        finally:
            self.runner.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _add_totals(self) -> None:
        stats = self.dispatcher.stats()["p"]
        self.expired_total += int(stats["dropped_expired"])
        self.delivered_total += int(stats["delivered"])
        assert stats["dead_lettered"] == stats["ambiguous"] == stats["dropped_overflow"] == 0

    @rule(count=st.integers(1, 8))
    def submit(self, count: int) -> None:
        for _ in range(count):
            self.counter += 1
            e = event(self.counter, self.clock)
            self.dispatcher.submit(e)
            self.accepted_at[e.event_id] = e.timestamp
        self._settle()

    @rule(mode=st.sampled_from(["ok", "500", "connect"]))
    def set_mode(self, mode: str) -> None:
        self.dest.default = mode
        self._settle()

    @rule(seconds=st.sampled_from([0.5, 1.1, 5.5, MACHINE_TTL + 1]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._settle()

    @rule()
    def restart(self) -> None:
        self.runner.run(self.dispatcher.stop())
        self.dispatcher.check_invariant()
        rows = int(self.dispatcher.stats()["p"]["spool_rows"])
        assert self.dispatcher.stats()["p"]["pending"] == rows
        self._add_totals()
        self.dispatcher = self._new()
        self.runner.run(self.dispatcher.start())
        assert self.dispatcher.stats()["p"]["replayed"] == rows
        self._settle()

    @invariant()
    def books_balance(self) -> None:
        self.dispatcher.check_invariant()

    @invariant()
    def check_deliveries(self) -> None:
        delivered = self.dest.delivered
        assert len(delivered) == len(set(delivered)), "an event was delivered twice"
        for event_id, at in self.dest.delivered_at.items():
            assert at - self.accepted_at[event_id] <= MACHINE_TTL, "delivered after its TTL"


TestDispatcherMachine = DispatcherMachine.TestCase
TestDispatcherMachine.settings = hypothesis_settings(max_examples=20, stateful_step_count=12, deadline=None)


# ---------------------------------------------------------------------------------------------------------------
# information only
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_throughput_micro_check(spool_path: str) -> None:
    """Not a timing assertion: prints events/s delivered to a MockTransport, for information."""
    delivered = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal delivered
        delivered += 1
        return httpx.Response(202)

    settings = dispatch_settings(queue_size=10_000, max_connections=20)
    d = Dispatcher([FakeSink("p")], settings, SpoolSettings(path=spool_path), transport=httpx.MockTransport(handler))
    count = 5000
    async with running(d):
        started = time.perf_counter()
        for n in range(count):
            d.submit(event(n))
            if n % 100 == 99:
                await asyncio.sleep(0)
        while d.stats()["p"]["delivered"] < count:
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - started
    print(f"\nthroughput: {count / elapsed:,.0f} events/s to a MockTransport ({elapsed:.2f} s for {count})")
    assert delivered == count
