from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.config import SpoolSettings
from gateway.delivery import books
from gateway.sinks import Payload
from gateway.spool import ROW_OVERHEAD_BYTES, DeadLetter, Spool, SpoolError, SpoolRow, _encode


def make_row(event_id: str, *, destination: str = "plausible", accepted_at: float = 1000.0, next_at: float = 0.0,
             attempts: int = 0, body: dict[str, object] | None = None, batch_key: str = "",
             created_at: float | None = None) -> SpoolRow:  # fmt: skip
    payload = Payload(
        destination=destination,
        event_id=event_id,
        body=body if body is not None else {"name": "pageview", "url": f"https://example.org/{event_id}"},
        headers=(("user-agent", "Mozilla/5.0"), ("x-forwarded-for", "203.0.113.0")),
        batch_key=batch_key,
        created_at=accepted_at if created_at is None else created_at,
    )
    return SpoolRow(payload, accepted_at=accepted_at, attempts=attempts, next_at=next_at)


@pytest.fixture
def spool_settings(tmp_path: Path) -> SpoolSettings:
    return SpoolSettings(path=str(tmp_path / "var" / "spool.sqlite3"), max_rows=1000, max_bytes=1_000_000)


@pytest.fixture(params=[False, True], ids=["per-row reads", "few trips"])
def spool(spool_settings: SpoolSettings, request: pytest.FixtureRequest) -> Iterator[Spool]:
    s = Spool(spool_settings, few_trips=request.param)
    s.open()
    yield s
    s.close()


@contextlib.contextmanager
def raw(path: str) -> Iterator[sqlite3.Connection]:
    """A second, independent connection (what another process would see)."""
    conn = sqlite3.connect(path, timeout=1, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# opening: pragmas, permissions, locking, schema
# ---------------------------------------------------------------------------------------------------------------


def test_wal_mode_and_pragmas(spool: Spool, spool_settings: SpoolSettings) -> None:
    assert spool.journal_mode() == "wal"
    conn = spool._db  # the spool's own connection: per-connection pragmas
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    # WAL is persistent: another connection sees it too.
    with raw(spool_settings.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_file_is_owner_only(spool: Spool, spool_settings: SpoolSettings) -> None:
    mode = stat.S_IMODE(os.stat(spool_settings.path).st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_second_process_cannot_open_the_same_file(spool: Spool, spool_settings: SpoolSettings) -> None:
    other = Spool(spool_settings)
    with pytest.raises(SpoolError, match="in use by another process"):
        other.open()
    spool.close()
    other.open()  # released on close
    other.close()


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SpoolError, match="cannot use spool"):
        Spool(SpoolSettings(path=str(path))).open()


def test_unknown_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with raw(str(path)) as conn:
        conn.execute("PRAGMA user_version = 7")
    with pytest.raises(SpoolError, match="schema version 7"):
        Spool(SpoolSettings(path=str(path))).open()


def test_unopened_spool_raises_spool_error(spool_settings: SpoolSettings) -> None:
    with pytest.raises(SpoolError, match="not open"):
        Spool(spool_settings).put([make_row("a")])


# ---------------------------------------------------------------------------------------------------------------
# payloads
# ---------------------------------------------------------------------------------------------------------------


def test_round_trip_keeps_the_payload(spool: Spool) -> None:
    row = make_row("e1", body={"name": "pageview", "props": {"lang": "de", "n": 3}, "u": "ü"}, attempts=2)
    assert spool.put([row]).inserted == ("e1",)
    (leased,) = spool.lease_due("plausible", now=1.0, limit=10)
    assert leased == row


def test_insert_or_ignore_keeps_the_first_row(spool: Spool) -> None:
    assert spool.put([make_row("e1", attempts=1)]).inserted == ("e1",)
    result = spool.put([make_row("e1", attempts=5), make_row("e2")])
    assert result.inserted == ("e2",)
    assert result.duplicates == ("e1",)
    assert {r.event_id: r.attempts for r in spool.rows_for()} == {"e1": 1, "e2": 0}
    assert spool.rows == 2


def test_one_event_id_per_destination(spool: Spool) -> None:
    """The same event goes to several destinations; each keeps its own row."""
    result = spool.put([make_row("e1"), make_row("e1", destination="ga4")])
    assert result.inserted == ("e1", "e1") and not result.duplicates
    assert spool.delete("ga4", ["e1"]) == 1
    assert [(r.destination, r.event_id) for r in spool.rows_for()] == [("plausible", "e1")]
    (row,) = spool.lease_due("plausible", now=1.0, limit=5)
    spool.dead_letter([DeadLetter("e1", "plausible", "http 400", row.payload, 1.0, 1, 2.0)])
    spool.dead_letter([DeadLetter("e1", "ga4", "http 400", None, 1.0, 1, 2.0)])
    assert spool.rows == 0 and len(spool.dead_letters()) == 2


def test_unserialisable_body_is_invalid_not_stored(spool: Spool) -> None:
    result = spool.put([make_row("bad", body={"x": object()}), make_row("nan", body={"x": float("nan")})])
    assert set(result.invalid) == {"bad", "nan"}
    assert spool.rows == 0


def test_row_cap(spool_settings: SpoolSettings) -> None:
    s = Spool(SpoolSettings(path=spool_settings.path, max_rows=3, max_bytes=10**9))
    s.open()
    result = s.put([make_row(f"e{i}") for i in range(5)])
    assert result.inserted == ("e0", "e1", "e2")
    assert result.rejected == ("e3", "e4")
    s.delete("plausible", ["e0"])
    assert s.put([make_row("e5")]).inserted == ("e5",)
    assert s.rows == 3
    s.close()


def test_byte_cap(spool_settings: SpoolSettings) -> None:
    one = make_row("e0")
    s = Spool(SpoolSettings(path=spool_settings.path, max_rows=1000, max_bytes=1))
    s.open()
    assert s.put([one]).rejected == ("e0",)
    s.close()
    # Find one row's accounted size, then allow exactly two rows.
    s = Spool(SpoolSettings(path=spool_settings.path, max_rows=1000, max_bytes=10**9))
    s.open()
    s.put([one])
    size = s.bytes
    assert size > ROW_OVERHEAD_BYTES
    s.delete("plausible", ["e0"])
    assert s.bytes == 0
    s.close()
    s = Spool(SpoolSettings(path=spool_settings.path, max_rows=1000, max_bytes=2 * size))
    s.open()
    result = s.put([make_row(f"e{i}") for i in range(3)])  # same-length ids: same size
    assert result.inserted == ("e0", "e1")
    assert result.rejected == ("e2",)
    with raw(spool_settings.path) as conn:
        assert conn.execute("SELECT sum(size) FROM payloads").fetchone()[0] == s.bytes == 2 * size
    s.close()


def test_lease_only_due_unleased_rows_in_order(spool: Spool) -> None:
    spool.put([make_row("late", next_at=50.0), make_row("b", next_at=20.0), make_row("a", next_at=10.0)])
    spool.put([make_row("other", destination="ga4", next_at=0.0)])
    assert [r.event_id for r in spool.lease_due("plausible", now=30.0, limit=10)] == ["a", "b"]
    assert spool.lease_due("plausible", now=30.0, limit=10) == []  # already leased
    assert [r.event_id for r in spool.lease_due("plausible", now=60.0, limit=1)] == ["late"]
    assert spool.leased_ids() == {"a", "b", "late"}


def test_batched_lease_takes_whole_groups_of_a_key_oldest_first(spool: Spool) -> None:
    keys = ["a", "b", "a", "c", "a", "b"]
    spool.put([make_row(f"r{n}", destination="ga4", next_at=float(n), batch_key=key) for n, key in enumerate(keys)])
    # At most 2 of a key, the key with the oldest row first, 4 rows in all: a's r0 r2, then b's r1 r5.
    assert [r.event_id for r in spool.lease_due("ga4", now=10.0, limit=4, batch=2)] == ["r0", "r1", "r2", "r5"]
    assert [r.event_id for r in spool.lease_due("ga4", now=10.0, limit=4, batch=2)] == ["r3", "r4"]
    assert spool.lease_due("ga4", now=10.0, limit=4, batch=2) == []
    assert spool.leased_ids() == {f"r{n}" for n in range(6)}


def test_release_reschedules_and_unleases(spool: Spool) -> None:
    spool.put([make_row("a")])
    (row,) = spool.lease_due("plausible", now=1.0, limit=1)
    spool.release([SpoolRow(row.payload, row.accepted_at, attempts=3, next_at=99.0, last_error="http 500")])
    assert spool.lease_due("plausible", now=98.0, limit=1) == []
    (again,) = spool.lease_due("plausible", now=99.0, limit=1)
    assert (again.attempts, again.next_at, again.last_error) == (3, 99.0, "http 500")


def test_purge_expired_spares_leased_rows(spool: Spool) -> None:
    spool.put([make_row("leased", accepted_at=10.0, next_at=1.0), make_row("old", accepted_at=10.0, next_at=2.0)])
    spool.put(
        [make_row("new", accepted_at=500.0, next_at=5.0), make_row("ga4-old", destination="ga4", accepted_at=10.0)]
    )
    assert [r.event_id for r in spool.lease_due("plausible", now=1.0, limit=1)] == ["leased"]
    assert spool.purge_expired("plausible", cutoff=100.0) == 1
    assert {r.event_id for r in spool.rows_for()} == {"leased", "new", "ga4-old"}
    assert spool.rows == 3


def test_restart_replays_rows_and_clears_leases(spool_settings: SpoolSettings) -> None:
    s = Spool(spool_settings)
    s.open()
    s.put([make_row("a"), make_row("b"), make_row("c", destination="ga4")])
    s.lease_due("plausible", now=1.0, limit=1)  # "a" is in flight when the process dies
    s.close()
    s = Spool(spool_settings)
    s.open()
    assert s.recovered_leases == 1
    assert s.leased_ids() == set()
    assert s.rows_by_destination() == {"plausible": 2, "ga4": 1}
    assert {r.event_id for r in s.lease_due("plausible", now=1.0, limit=10)} == {"a", "b"}
    s.close()


def test_summary(spool: Spool) -> None:
    assert spool.summary("plausible").rows == 0
    spool.put([make_row("a", accepted_at=5.0, next_at=30.0), make_row("b", accepted_at=7.0, next_at=20.0)])
    spool.lease_due("plausible", now=25.0, limit=1)  # leases "b"
    summary = spool.summary("plausible")
    assert (summary.rows, summary.oldest_accepted_at, summary.next_due) == (2, 5.0, 30.0)


def test_dead_letters(spool: Spool) -> None:
    row = make_row("a")
    spool.put([row, make_row("b")])
    spool.dead_letter(
        [
            DeadLetter("a", "plausible", "http 400", row.payload, row.accepted_at, 1, failed_at=2000.0),
            DeadLetter("z", "plausible", "internal:ValueError", None, 1000.0, 0, failed_at=3000.0),
        ]
    )
    assert spool.dead_letters() == [("a", "plausible", "http 400"), ("z", "plausible", "internal:ValueError")]
    assert [r.event_id for r in spool.rows_for()] == ["b"]
    assert spool.rows == 1
    assert spool.purge_dead_letters("plausible", cutoff=2500.0) == 1
    assert spool.dead_letters() == [("z", "plausible", "internal:ValueError")]


# ---------------------------------------------------------------------------------------------------------------
# Trips into SQLite: a constant number per call, whatever the rows (each one is a GIL round trip on the spool thread;
# a spool without few_trips may read leased rows one fetch each: the deliverer calls it inline, no thread)
# ---------------------------------------------------------------------------------------------------------------


class CountingCursor:
    def __init__(self, owner: CountingConnection, cursor: sqlite3.Cursor) -> None:
        self._owner = owner
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def fetchone(self) -> Any:
        self._owner.trips += 1
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        rows = self._cursor.fetchall()
        self._owner.trips += max(1, len(rows))
        return rows

    def __iter__(self) -> Iterator[Any]:
        for row in self._cursor:
            self._owner.trips += 1
            yield row


class CountingConnection:
    """Stands in for the spool's connection and counts its trips into SQLite: every statement run, every row read."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.trips = 0

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> CountingCursor:
        self.trips += 1
        return CountingCursor(self, self._conn.execute(sql, parameters))

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        records = list(seq)
        self.trips += len(records)
        return self._conn.executemany(sql, records)


def trips_for(spool: Spool, call: Callable[[], object]) -> int:
    real = spool._conn
    assert real is not None
    counting = CountingConnection(real)
    spool._conn = counting  # type: ignore[assignment]
    try:
        call()
    finally:
        spool._conn = real
    return counting.trips


SPOOL_CALLS: dict[str, Callable[[Spool, list[str]], object]] = {
    "put": lambda s, ids: s.put([make_row(f"new-{i}") for i in ids]),
    "lease_due": lambda s, ids: s.lease_due("plausible", now=1.0, limit=len(ids)),
    "lease_due batched": lambda s, ids: s.lease_due("ga4", now=1.0, limit=len(ids), batch=25),
    "release": lambda s, ids: s.release([make_row(i, attempts=1, next_at=5.0) for i in ids]),
    "delete": lambda s, ids: s.delete("plausible", ids),
    "purge_expired": lambda s, ids: s.purge_expired("plausible", cutoff=2000.0),
    "settle": lambda s, ids: s.settle("plausible", {"delivered": ids[::2], "dropped_destination": ids[1::2]}),
    "mark_sending": lambda s, ids: s.mark_sending("plausible", ids, {"delivered": ids}),
    "hand_off": lambda s, ids: s.hand_off([make_row(f"new-{i}") for i in ids], {"plausible": {"accepted": len(ids)}}),
    "dead_letter": lambda s, ids: s.dead_letter(
        [DeadLetter(i, "plausible", "http 400", make_row(i).payload, 1000.0, 1, 2000.0) for i in ids]
    ),
}


@pytest.mark.parametrize("name", list(SPOOL_CALLS))
def test_trips_into_sqlite_do_not_grow_with_rows(name: str, tmp_path: Path) -> None:
    def trips(rows: int) -> int:
        spool = Spool(SpoolSettings(path=str(tmp_path / f"{rows}" / "spool.sqlite3")), host=True, few_trips=True)
        spool.open()
        try:
            ids = [f"e{i:03}" for i in range(rows)]
            spool.put([make_row(i) for i in ids])
            spool.put([make_row(i, destination="ga4", batch_key=f"client-{i[-1]}") for i in ids])
            return trips_for(spool, lambda: SPOOL_CALLS[name](spool, ids))
        finally:
            spool.close()

    one, many = trips(1), trips(100)
    # 100 rows may take more statements only where rows go in as multi-row VALUES (64 + 32 + 4).
    assert many <= one + 2, (one, many)


def test_books_add_every_counter_in_one_statement(tmp_path: Path) -> None:
    spool = Spool(SpoolSettings(path=str(tmp_path / "spool.sqlite3")), host=True)
    spool.open()
    try:
        counts = {"accepted": 5, "delivered": 3, "dropped_policy:consent": 1, "retried": 2, "ambiguous": 0}
        for _ in range(2):
            assert trips_for(spool, lambda: books.add_counts(spool._db, "plausible", counts)) == 1
        stored = dict(spool._db.execute("SELECT counter, value FROM books WHERE destination = 'plausible'"))
        assert stored == {"accepted": 10, "delivered": 6, "dropped_policy:consent": 2, "retried": 4}
    finally:
        spool.close()


def test_one_batch_commits_several_calls_and_rolls_back_all_of_them(spool: Spool) -> None:
    assert trips_for(spool, lambda: spool.put([make_row("a")])) >= 3  # BEGIN, statements, COMMIT
    with spool.batch():
        spool.put([make_row("a"), make_row("b")])
        spool.delete("plausible", ["a"])
        assert spool.lease_due("plausible", now=1.0, limit=5)[0].event_id == "b"
    assert [r.event_id for r in spool.rows_for()] == ["b"] and spool.leased_ids() == {"b"}
    with pytest.raises(RuntimeError), spool.batch():
        spool.put([make_row("c"), make_row("d")])
        spool.delete("plausible", ["b"])
        assert spool.rows == 2
        raise RuntimeError("the trip fails half-way")
    # Nothing of the failed batch stays, on disk or in the spool's counts.
    assert [r.event_id for r in spool.rows_for()] == ["b"]
    assert (spool.rows, spool.rows_by_destination()) == (1, {"plausible": 1})
    assert spool.bytes == _encode(spool.rows_for()[0])[2]


def test_duplicates_within_one_put_keep_the_first(spool: Spool) -> None:
    result = spool.put([make_row("a", attempts=1), make_row("a", attempts=2), make_row("b")])
    assert (result.inserted, result.duplicates) == (("a", "b"), ("a",))
    assert {r.event_id: r.attempts for r in spool.rows_for()} == {"a": 1, "b": 0}
    assert spool.rows == 2


def test_duplicates_across_groups_are_told_apart_exactly(spool_settings: SpoolSettings) -> None:
    """put() inserts first and looks up which rows were new only when a group falls short (see _insert_payloads):
    duplicates anywhere in a long put, whole groups of them, and the counts and bytes, all exact."""
    spool = Spool(dataclasses.replace(spool_settings, max_rows=10_000, max_bytes=10**8))
    spool.open()
    try:
        old = [f"e{n:04}" for n in range(0, 600, 7)] + [f"e{n:04}" for n in range(256, 384)]  # a whole group of 128
        spool.put([make_row(i) for i in old])
        spool.delete("plausible", [old[0]])  # the newest rowids are not the only ones
        ids = [f"e{n:04}" for n in range(600)]
        result = spool.put([make_row(i) for i in ids])
        there = set(old[1:])
        assert result.duplicates == tuple(i for i in ids if i in there)
        assert result.inserted == tuple(i for i in ids if i not in there)
        assert not result.rejected and not result.invalid
        assert spool.rows == 600 == len(spool.rows_for())
        with raw(spool_settings.path) as conn:
            assert conn.execute("SELECT sum(size) FROM payloads").fetchone()[0] == spool.bytes
    finally:
        spool.close()


def test_release_of_many_rows_gives_each_its_own_schedule(spool: Spool) -> None:
    ids = [f"e{i:03}" for i in range(300)]  # five multi-row statements: 128 + 128 + 32 + 8 + 4
    spool.put([make_row(i) for i in ids] + [make_row("not-leased")])
    assert len(spool.lease_due("plausible", now=1.0, limit=300)) == 300
    released = [make_row(i, attempts=n, next_at=10.0 + n) for n, i in enumerate(ids)]
    assert spool.release([*released, make_row("gone", attempts=9)]) == 300
    assert spool.leased_ids() == set()
    by_id = {r.event_id: (r.attempts, r.next_at) for r in spool.rows_for()}
    assert by_id == {**{i: (n, 10.0 + n) for n, i in enumerate(ids)}, "not-leased": (0, 0.0)}


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(created_at=finite, accepted_at=finite, next_at=st.floats(max_value=1e300, allow_nan=False))
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_leased_rows_keep_every_double_exactly(
    spool: Spool, created_at: float, accepted_at: float, next_at: float
) -> None:
    """Leased rows come back through SQLite's text form of a REAL (see _LEASED_JSON): not one bit may change (but
    the sign of a zero, which SQLite does not store: -0.0 + 0.0 is 0.0)."""
    row = make_row("x", accepted_at=accepted_at, next_at=next_at, created_at=created_at)
    spool.delete("plausible", ["x"])
    assert spool.put([row]).inserted == ("x",)
    (leased,) = spool.lease_due("plausible", now=1e301, limit=1)
    as_bits = [struct.pack("<d", value + 0.0) for value in (created_at, accepted_at, next_at)]
    assert [struct.pack("<d", value) for value in (leased.payload.created_at, leased.accepted_at, leased.next_at)] == (
        as_bits
    )
    assert leased == row


@pytest.mark.parametrize("value", [-0.0, 5e-324, 1.7976931348623157e308, 1.1678098003678219e204, 1796388966.97528])
def test_leased_rows_keep_doubles_hypothesis_might_miss(spool: Spool, value: float) -> None:
    # 1.1678098003678219e204 comes back one unit off through 17 significant digits (printf '%!.17g').
    row = make_row("x", accepted_at=value, next_at=-value, created_at=value)
    spool.put([row])
    (leased,) = spool.lease_due("plausible", now=2e308, limit=1)
    assert (leased.payload.created_at, leased.accepted_at, leased.next_at) == (value, value, -value)
    assert str(leased.accepted_at) == str(value + 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Stateful: enqueue / lease / fail / succeed / expire / restart
# ---------------------------------------------------------------------------------------------------------------

TTL = 100.0
DESTINATIONS = ("plausible", "ga4")


class SpoolMachine(RuleBasedStateMachine):
    """The spool against a dict model. Invariants: rows equal the model, no delivered id ever comes back,
    attempts only grow, leases never overlap, nothing unleased outlives its TTL after a purge, caps hold."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="spool-machine-")
        self.settings = SpoolSettings(path=os.path.join(self.dir, "spool.sqlite3"), max_rows=25, max_bytes=6000)
        self.spool = Spool(self.settings)
        self.spool.open()
        self.now = 1000.0
        self.counter = 0
        # id -> (destination, accepted_at, attempts, next_at)
        self.model: dict[str, tuple[str, float, int, float]] = {}
        self.leased: set[str] = set()
        self.delivered: set[str] = set()
        self.expired: set[str] = set()
        self.max_attempts: dict[str, int] = {}

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(count=st.integers(1, 6), age=st.floats(0, 2 * TTL), destination=st.sampled_from(DESTINATIONS),
          delay=st.floats(0, 30))  # fmt: skip
    def enqueue(self, count: int, age: float, destination: str, delay: float) -> None:
        rows = []
        for _ in range(count):
            self.counter += 1
            rows.append(make_row(f"id{self.counter}", destination=destination, accepted_at=self.now - age,
                                 next_at=self.now + delay))  # fmt: skip
        result = self.spool.put(rows)
        assert not result.duplicates and not result.invalid
        assert set(result.inserted) | set(result.rejected) == {r.event_id for r in rows}
        for row in rows:  # rejected only when a cap would be exceeded (rows are put in order)
            if row.event_id in result.rejected:
                size = _encode(row)[2]
                assert self.spool.rows + 1 > self.settings.max_rows or self.spool.bytes + size > self.settings.max_bytes
        for row in rows:
            if row.event_id in result.inserted:
                self.model[row.event_id] = (destination, row.accepted_at, 0, row.next_at)
                self.max_attempts[row.event_id] = 0

    @rule(limit=st.integers(1, 8), destination=st.sampled_from(DESTINATIONS))
    def lease(self, limit: int, destination: str) -> None:
        due = sorted(
            (next_at, event_id)
            for event_id, (dest, _, _, next_at) in self.model.items()
            if dest == destination and event_id not in self.leased and next_at <= self.now
        )
        rows = self.spool.lease_due(destination, self.now, limit)
        ids = [r.event_id for r in rows]
        assert len(ids) == min(limit, len(due))
        for row in rows:
            assert row.event_id not in self.delivered, "a delivered id came back"
            assert row.event_id not in self.leased, "leased twice"
            assert row.destination == destination and row.next_at <= self.now
        assert [r.next_at for r in rows] == sorted(r.next_at for r in rows)
        self.leased.update(ids)

    @precondition(lambda self: bool(self.leased))
    @rule(data=st.data(), delay=st.floats(0, 50))
    def fail(self, data: st.DataObject, delay: float) -> None:
        event_id = data.draw(st.sampled_from(sorted(self.leased)))
        destination, accepted_at, attempts, _ = self.model[event_id]
        (row,) = [r for r in self.spool.rows_for(destination) if r.event_id == event_id]
        self.spool.release([SpoolRow(row.payload, accepted_at, attempts + 1, self.now + delay, "http 500")])
        self.model[event_id] = (destination, accepted_at, attempts + 1, self.now + delay)
        self.leased.discard(event_id)

    @precondition(lambda self: bool(self.leased))
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        event_id = data.draw(st.sampled_from(sorted(self.leased)))
        destination = self.model[event_id][0]
        assert event_id not in self.delivered
        assert self.spool.delete(destination, [event_id]) == 1
        self.delivered.add(event_id)
        self.leased.discard(event_id)
        del self.model[event_id]

    @rule(seconds=st.floats(0, 3 * TTL))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(destination=st.sampled_from(DESTINATIONS))
    def expire(self, destination: str) -> None:
        cutoff = self.now - TTL
        doomed = {
            event_id
            for event_id, (dest, accepted_at, _, _) in self.model.items()
            if dest == destination and accepted_at < cutoff and event_id not in self.leased
        }
        assert self.spool.purge_expired(destination, cutoff) == len(doomed)
        for event_id in doomed:
            del self.model[event_id]
        self.expired |= doomed
        # Nothing unleased outlives its TTL.
        for row in self.spool.rows_for(destination):
            assert row.accepted_at >= cutoff or row.event_id in self.leased

    @rule()
    def restart(self) -> None:
        in_flight = len(self.leased)
        self.spool.close()
        self.spool = Spool(self.settings)
        self.spool.open()
        assert self.spool.recovered_leases == in_flight
        self.leased.clear()

    @invariant()
    def rows_match_the_model(self) -> None:
        rows = {r.event_id: r for r in self.spool.rows_for()}
        assert set(rows) == set(self.model)
        for event_id, (destination, accepted_at, attempts, next_at) in self.model.items():
            row = rows[event_id]
            assert (row.destination, row.accepted_at, row.attempts, row.next_at) == (
                destination, accepted_at, attempts, next_at,
            )  # fmt: skip
            assert row.attempts >= self.max_attempts[event_id], "attempts went down"
            self.max_attempts[event_id] = row.attempts
        assert self.spool.leased_ids() == self.leased
        assert not (set(rows) & (self.delivered | self.expired))

    @invariant()
    def books_match_the_file(self) -> None:
        with raw(self.settings.path) as conn:
            count, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM payloads").fetchone()
        assert self.spool.rows == count == len(self.model)
        assert self.spool.bytes == size
        assert count <= self.settings.max_rows and size <= self.settings.max_bytes
        expected = {d: sum(1 for v in self.model.values() if v[0] == d) for d in DESTINATIONS}
        assert self.spool.rows_by_destination() == {d: n for d, n in expected.items() if n}


TestSpoolMachine = SpoolMachine.TestCase
TestSpoolMachine.settings = hypothesis_settings(max_examples=40, stateful_step_count=30, deadline=None)
