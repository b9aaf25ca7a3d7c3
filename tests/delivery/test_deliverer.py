"""The host's deliverer: sends what the workers handed off, settles and counts each row in one commit, survives
being killed without sending anything twice."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import pytest

from gateway.config import Settings
from gateway.delivery.books import read_host_stats
from gateway.delivery.deliverer import _deliver_until_signalled, adopt_worker_spools, build_deliverer
from gateway.delivery.dispatcher import Dispatcher
from gateway.delivery.handoff import Handoff
from gateway.sinks.factory import build_sinks
from gateway.spool import Spool, SpoolRow
from tests.delivery.test_handoff import host_settings, page_view

OUTCOMES = ("delivered", "dropped_destination", "dropped_overflow", "dropped_expired", "dead_lettered", "ambiguous")


class Collector:
    def __init__(self, status: int = 202) -> None:
        self.urls: list[str] = []
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "url" in body:
            self.urls.append(body["url"])
        return httpx.Response(self.status)


def deliverer(settings: Settings, collector: Collector) -> Dispatcher:
    sinks = build_sinks(settings)
    return Dispatcher(sinks, settings.dispatch, settings.spool, transport=httpx.MockTransport(collector), host=True)


def balanced(row: dict[str, float]) -> bool:
    settled = sum(row[key] for key in OUTCOMES) + row["dropped_policy"]
    return row["accepted"] == settled + row["pending"] and row["pending"] == row["spool_rows"]


async def hand_off(settings: Settings, count: int, start: int = 0) -> None:
    handoff = Handoff(build_sinks(settings), settings)
    await handoff.start()
    for index in range(start, start + count):
        handoff.submit(page_view(index))
    await handoff.stop()


@pytest.mark.anyio
async def test_delivers_what_workers_handed_off_and_the_books_add_up_across_restarts(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    collector = Collector()
    await hand_off(settings, 20)
    first = deliverer(settings, collector)
    await first.start()
    assert await first.wait_idle(5.0)
    await first.stop()
    await hand_off(settings, 15, start=20)
    second = deliverer(settings, collector)  # a new process: the books are in the spool, not in memory
    await second.start()
    assert await second.wait_idle(5.0)
    await second.stop()
    row = read_host_stats(settings.spool.path, ["plausible", "ga4"])["plausible"]
    assert row["accepted"] == row["delivered"] == len(collector.urls) == len(set(collector.urls)) == 35, row
    assert balanced(row) and row["deliverer_heartbeat_age_seconds"] >= 0


@pytest.mark.anyio
async def test_rejections_and_retries_are_counted_in_the_host_books(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    await hand_off(settings, 5)
    rejecting = deliverer(settings, Collector(status=400))
    await rejecting.start()
    assert await rejecting.wait_idle(5.0)
    await rejecting.stop()
    row = read_host_stats(settings.spool.path, ["plausible"])["plausible"]
    assert row["dead_lettered"] == 5 and row["pending"] == 0 and balanced(row), row


@pytest.mark.anyio
@pytest.mark.parametrize("retry_ambiguous", [False, True])
async def test_rows_on_the_wire_when_the_deliverer_died_are_never_sent_twice_silently(
    tmp_path: Path, retry_ambiguous: bool
) -> None:
    settings = host_settings(tmp_path)
    await hand_off(settings, 10)
    # What a deliverer killed mid-request leaves behind: rows leased and marked as on the wire.
    spool = Spool(settings.spool, host=True)
    spool.open()
    leased = spool.lease_due("plausible", now=1e12, limit=4)
    spool.mark_sending("plausible", [row.event_id for row in leased])
    spool.close()

    dispatch = dataclasses.replace(settings.dispatch, retry_ambiguous=retry_ambiguous)
    collector = Collector()
    restarted = Dispatcher(
        build_sinks(settings), dispatch, settings.spool, transport=httpx.MockTransport(collector), host=True
    )
    await restarted.start()
    assert await restarted.wait_idle(5.0)
    await restarted.stop()
    row = read_host_stats(settings.spool.path, ["plausible"])["plausible"]
    if retry_ambiguous:
        assert row["ambiguous_retried"] == 4 and row["ambiguous"] == 0
        assert row["delivered"] == len(collector.urls) == 10
    else:
        assert row["ambiguous"] == 4 and row["delivered"] == len(collector.urls) == 6
    assert balanced(row), row


@pytest.mark.anyio
async def test_one_deliverer_per_host_spool(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    running = build_deliverer(settings)
    await running.start()
    try:
        assert await asyncio.wait_for(_deliver_until_signalled(settings), 10.0) == 1
    finally:
        await running.stop()


def test_a_spool_without_books_reads_as_zeros(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    sqlite3.connect(path).close()
    row = read_host_stats(str(path), ["plausible"])["plausible"]
    assert row["accepted"] == row["pending"] == 0
    assert read_host_stats(str(tmp_path / "missing.sqlite3"), ["plausible"])["plausible"]["accepted"] == 0


@pytest.mark.anyio
async def test_per_worker_spools_from_before_are_moved_into_the_host_spool(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    (sink, _) = build_sinks(settings)
    for slot, count in ((0, 3), (1, 2)):
        old = Spool(dataclasses.replace(settings.spool, path=f"{settings.spool.path}.w{slot}"))
        old.open()
        rows = []
        for index in range(count):
            event = page_view(index)
            event.event_id = f"w{slot}-{index}"
            rows.append(SpoolRow(sink.build(event), event.timestamp, 0, event.timestamp))
        old.put(rows)
        old.close()
    assert adopt_worker_spools(settings) == 5
    assert not list(tmp_path.glob("spool.sqlite3.w*"))
    row = read_host_stats(settings.spool.path, ["plausible"])["plausible"]
    assert row["accepted"] == row["replayed"] == row["pending"] == 5
    collector = Collector()
    running = deliverer(settings, collector)
    await running.start()
    assert await running.wait_idle(5.0)
    await running.stop()
    assert len(collector.urls) == 5
    assert balanced(read_host_stats(settings.spool.path, ["plausible"])["plausible"])


@pytest.mark.anyio
async def test_a_failed_mark_sends_nothing_and_loses_no_settled_row(tmp_path: Path) -> None:
    """The commit that marks rows as on the wire also carries the rows settled since the last one: when it fails,
    nothing is sent, and those settled rows are settled (and counted) with a later commit."""
    settings = host_settings(tmp_path)
    await hand_off(settings, 30)
    collector = Collector()
    running = deliverer(settings, collector)
    failures = {"left": 3}
    original = Spool.mark_sending_many

    def flaky(self: Spool, marks: Mapping[str, tuple[Sequence[str], Mapping[str, Sequence[str]]]]) -> None:
        carries_settled = any(settled for _, settled in marks.values())
        if len(collector.urls) >= 5 and failures["left"] and carries_settled:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        original(self, marks)

    Spool.mark_sending_many = flaky  # type: ignore[method-assign]
    try:
        await running.start()
        assert await running.wait_idle(10.0)
        await running.stop()
    finally:
        Spool.mark_sending_many = original  # type: ignore[method-assign]
    assert failures["left"] == 0  # the failures happened
    row = read_host_stats(settings.spool.path, ["plausible"])["plausible"]
    assert len(collector.urls) == len(set(collector.urls)) == row["delivered"] == 30, row
    assert row["pending"] == row["spool_rows"] == 0 and balanced(row), row


def test_supervisor_keeps_trying_when_the_deliverer_cannot_be_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deliverer dies and the next start fails (no such program, out of PIDs): the supervisor keeps trying with
    its backoff instead of its thread dying, and runs a deliverer again once a start works."""
    from gateway.delivery import deliverer as module

    monkeypatch.setattr(module, "RESTART_DELAY_MIN", 0.05)
    monkeypatch.setattr(module, "RESTART_DELAY_MAX", 0.1)
    supervisor = module.DelivererSupervisor(str(tmp_path / "unused.toml"))
    alive = tmp_path / "alive"
    supervisor._command = [sys.executable, "-c", "import sys; sys.exit(3)"]  # starts, then dies at once
    supervisor.start()
    try:
        deadline = time.monotonic() + 10
        while supervisor.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        supervisor._command = [str(tmp_path / "no-such-program")]  # every start fails now
        failed_from = supervisor.restarts
        while supervisor.restarts < failed_from + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert supervisor.restarts >= failed_from + 3, "the supervisor stopped trying"
        assert supervisor._thread is not None and supervisor._thread.is_alive()
        script = f"import pathlib, time; pathlib.Path({str(alive)!r}).touch(); time.sleep(60)"
        supervisor._command = [sys.executable, "-c", script]
        while not alive.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert alive.exists(), "no deliverer was started once starting worked again"
        assert supervisor.pid is not None
    finally:
        code = supervisor.stop(timeout=5.0)
    assert code == -signal.SIGTERM


@pytest.mark.anyio
async def test_host_stats_count_rows_on_the_wire_and_the_oldest_row_per_destination(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    before = time.time()
    await hand_off(settings, 10)
    spool = Spool(settings.spool, host=True)
    spool.open()
    try:
        leased = spool.lease_due("plausible", time.time() + 1, 4)
        spool.mark_sending("plausible", [row.event_id for row in leased[:3]])
    finally:
        spool.close()
    stats = read_host_stats(settings.spool.path, ["plausible"])  # ga4 is found through its books
    plausible, ga4 = stats["plausible"], stats["ga4"]
    assert (plausible["spool_rows"], plausible["in_flight"], plausible["pending"]) == (10, 3, 10)
    assert 0 <= plausible["spool_oldest_age_seconds"] <= time.time() - before + 0.5
    assert (ga4["accepted"], ga4["spool_rows"], ga4["in_flight"], ga4["spool_oldest_age_seconds"]) == (10, 0, 0, 0)
    assert balanced(plausible) and balanced(ga4)
