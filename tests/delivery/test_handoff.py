"""The request side of deliverer mode: what reaches the host spool, what is counted, what never rests on disk."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import load_settings
from gateway.config import Settings
from gateway.delivery.books import read_host_stats
from gateway.delivery.handoff import Handoff
from gateway.events import PAGEVIEW, Event
from gateway.sinks.factory import build_sinks

KEY = "handoff-test-consent-key-0123456789abcdef"
FULL_IP = "203.0.113.77"
TRUNCATED_IP = "203.0.113.0"
EMAIL = "jane.doe@example.com"
TOKEN = "tok_3f9a8b7c6d5e4f3a2b1c"


def host_settings(tmp_path: Path, **spool: Any) -> Settings:
    return load_settings(
        None,
        overrides={
            "consent": {"secret_keys": [KEY]},
            "site": {"origins": ["https://www.python.org"]},
            "spool": {"path": str(tmp_path / "spool.sqlite3"), **spool},
            "dispatch": {"mode": "deliverer", "handoff_interval": 0.005, "queue_size": 50},
            "destinations": {
                "plausible": {
                    "kind": "plausible",
                    "endpoint": "https://plausible.io/api/event",
                    "domain": "python.org",
                    "requires": [],
                },
                "ga4": {
                    "kind": "ga4",
                    "endpoint": "https://region1.google-analytics.com/mp/collect",
                    "measurement_id": "G-ABCDEF1234",
                    "api_secret": "s" * 22,
                    "requires": ["analytics"],
                    "client_id": "pseudonym",
                },
            },
        },
    )


def page_view(index: int, *, granted: frozenset[str] = frozenset(), url: str = "") -> Event:
    return Event(
        name=PAGEVIEW,
        url=url or f"https://www.python.org/downloads/release-{index}/",
        user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
        ip=TRUNCATED_IP,
        granted=granted,
        title="Download Python",
        language="en-us",
        country="NL",
    )


def spool_bytes(tmp_path: Path) -> bytes:
    return b"".join(path.read_bytes() for path in tmp_path.glob("spool.sqlite3*") if path.is_file())


@pytest.mark.anyio
async def test_payloads_and_books_reach_the_host_spool_in_one_commit(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    handoff = Handoff(build_sinks(settings), settings)
    await handoff.start()
    for index in range(30):
        handoff.submit(page_view(index, granted=frozenset({"analytics"}) if index % 3 == 0 else frozenset()))
    await handoff.stop()  # writes what is buffered
    stats = read_host_stats(settings.spool.path, ["plausible", "ga4"])
    assert stats["plausible"]["accepted"] == stats["plausible"]["pending"] == stats["plausible"]["spool_rows"] == 30
    assert stats["ga4"]["accepted"] == 30
    assert stats["ga4"]["dropped_policy:consent"] == 20
    assert stats["ga4"]["pending"] == stats["ga4"]["spool_rows"] == 10
    assert handoff.stats()["handed_off"] == 30
    with sqlite3.connect(settings.spool.path) as conn:
        assert conn.execute("SELECT rows FROM totals").fetchone()[0] == 40
        assert {row[0] for row in conn.execute("SELECT DISTINCT leased FROM payloads")} == {0}


@pytest.mark.anyio
async def test_submit_after_stop_is_refused_and_counted(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    handoff = Handoff(build_sinks(settings), settings)
    await handoff.start()
    await handoff.stop()
    handoff.submit(page_view(1))
    assert handoff.stats()["refused"] == 1


@pytest.mark.anyio
async def test_a_full_buffer_or_a_full_spool_drops_and_counts_never_silently(tmp_path: Path) -> None:
    settings = host_settings(tmp_path, max_rows=5)
    handoff = Handoff(build_sinks(settings), settings)
    for index in range(80):  # before start(): nothing is written yet, the buffer holds queue_size = 50
        handoff.submit(page_view(index))
    await handoff.start()
    await handoff.stop()
    row = read_host_stats(settings.spool.path, ["plausible", "ga4"])["plausible"]
    assert row["accepted"] == 80
    assert row["spool_rows"] == row["pending"] == 5  # spool.max_rows
    assert row["dropped_overflow"] == 30 + 45  # 30 never buffered, 45 over the spool cap
    ga4 = read_host_stats(settings.spool.path, ["plausible", "ga4"])["ga4"]
    assert ga4["accepted"] == 80 and ga4["dropped_policy:consent"] == 50 and ga4["dropped_overflow"] == 30


@pytest.mark.anyio
async def test_worker_slots_are_distinct_and_given_back(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    first, second = Handoff(build_sinks(settings), settings), Handoff(build_sinks(settings), settings)
    await first.start()
    await second.start()
    assert {first.worker, second.worker} == {"0", "1"}
    await first.stop()
    again = Handoff(build_sinks(settings), settings)
    await again.start()
    assert again.worker == first.worker  # a restarted worker gets its label back
    await again.stop()
    await second.stop()


CANARY_URLS = st.sampled_from(
    [
        f"https://www.python.org/account/?email={EMAIL}&token={TOKEN}",
        f"https://www.python.org/users/{EMAIL}/",
        f"https://www.python.org/reset/{TOKEN}/?from={FULL_IP}",
        f"https://www.python.org/search/?q={FULL_IP}&session={TOKEN}",
    ]
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=CANARY_URLS, referrer=CANARY_URLS, analytics=st.booleans())
@pytest.mark.anyio
async def test_no_canary_ever_rests_on_disk(tmp_path: Path, url: str, referrer: str, analytics: bool) -> None:
    for path in tmp_path.glob("spool.sqlite3*"):
        path.unlink()
    settings = host_settings(tmp_path)
    handoff = Handoff(build_sinks(settings), settings)
    await handoff.start()
    event = page_view(0, url=url, granted=frozenset({"analytics"}) if analytics else frozenset())
    event.referrer = referrer
    event.title = f"Welcome {EMAIL}"
    event.props = {"next": url}
    handoff.submit(event)
    await handoff.stop()
    on_disk = spool_bytes(tmp_path)
    assert b"python.org" in on_disk  # the payloads are there...
    for canary in (FULL_IP, EMAIL, TOKEN, "jane.doe"):
        assert canary.encode() not in on_disk  # ...without anything the policies remove


@pytest.mark.anyio
async def test_a_failed_write_keeps_the_events_and_writes_them_later(tmp_path: Path) -> None:
    settings = host_settings(tmp_path)
    handoff = Handoff(build_sinks(settings), settings)
    original = handoff._spool.hand_off
    failures = {"left": 2}

    def flaky(rows: Any, counts: Any) -> int:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        return original(rows, counts)

    handoff._spool.hand_off = flaky  # type: ignore[method-assign]
    await handoff.start()
    for index in range(10):
        handoff.submit(page_view(index))
    for _ in range(200):  # the writer tries again every interval (5 ms here)
        if not failures["left"] and not handoff.stats()["buffered"]:
            break
        await anyio.sleep(0.01)
    assert handoff.stats()["buffered"] == 0  # written by the writer thread, not only at stop()
    await handoff.stop()
    assert failures["left"] == 0 and handoff.stats()["write_errors"] == 2
    row = read_host_stats(settings.spool.path, ["plausible"])["plausible"]
    assert row["accepted"] == row["spool_rows"] == 10 and row["dropped_overflow"] == 0, row
