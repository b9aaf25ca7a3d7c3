"""The books: an in-process dispatcher's counters per lane, and one set of books per host kept in the host spool.

In process (one worker), :func:`lane_stats` reads the lanes' counters and :func:`check_lanes` checks that they
balance (see :mod:`gateway.delivery.dispatcher`).

In deliverer mode (``dispatch.mode = "deliverer"``) every change to a destination's events happens in one SQLite
transaction together with its count: a request worker inserts payload rows and adds ``accepted`` (and the
consent/policy drops) in the same commit; the deliverer deletes a delivered row and adds ``delivered`` in the same
commit, and so on. So the books survive any process being killed, and in every read snapshot::

    accepted = delivered + dropped_policy + dropped_destination + dropped_overflow + dropped_expired
               + dead_lettered + ambiguous + pending

where ``pending`` is the number of the destination's rows in the spool. :func:`read_host_stats` reads one snapshot
for ``/metrics`` and ``gateway status``, whichever worker answers.

Tables (created on first use, alongside the spool's own)::

    books(destination, counter, value)      counters; "dropped_policy:<reason>" per reason
    totals(id = 1, rows, bytes)             all payload rows and their size (for the spool caps), kept by triggers
    deliverer(id = 1, pid, heartbeat, state JSON)   the deliverer's last tick: circuit state per destination
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    # Types only: gateway.spool imports this module for the host books, and gateway.delivery.lanes imports
    # gateway.spool, so a runtime import here would make `import gateway.spool` circular.
    from gateway.delivery.lanes import Item, Lane

__all__ = [
    "OUTCOMES",
    "SCHEMA",
    "add_counts",
    "check_lanes",
    "lane_stats",
    "pending_by_destination",
    "read_host_stats",
    "write_heartbeat",
]

# Counters whose sum with `pending` equals `accepted` (dropped_policy is stored per reason).
OUTCOMES: Final = (
    "delivered",
    "dropped_destination",
    "dropped_overflow",
    "dropped_expired",
    "dead_lettered",
    "ambiguous",
)
_POLICY: Final = "dropped_policy:"

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS books (
    destination TEXT NOT NULL,
    counter     TEXT NOT NULL,
    value       INTEGER NOT NULL,
    PRIMARY KEY (destination, counter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    rows  INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, rows, bytes)
    SELECT 1, count(*), coalesce(sum(size), 0) FROM payloads;
CREATE TRIGGER IF NOT EXISTS payloads_count_insert AFTER INSERT ON payloads BEGIN
    UPDATE totals SET rows = rows + 1, bytes = bytes + NEW.size WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS payloads_count_delete AFTER DELETE ON payloads BEGIN
    UPDATE totals SET rows = rows - 1, bytes = bytes - OLD.size WHERE id = 1;
END;
CREATE TABLE IF NOT EXISTS deliverer (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    pid       INTEGER NOT NULL,
    heartbeat REAL NOT NULL,
    state     TEXT NOT NULL
);
"""

# Every counter of one change in one statement (a JSON object of counter: amount), as the spool's other statements
# (gateway/spool.py, _INSERT_GROUP_MAX: each statement costs a thread beside a busy loop a GIL round trip). "WHERE
# true" keeps the upsert's ON CONFLICT from parsing as a join constraint (https://sqlite.org/lang_upsert.html).
_ADD_SQL: Final = (
    "INSERT INTO books (destination, counter, value) SELECT ?1, key, value FROM json_each(?2) WHERE true"
    " ON CONFLICT (destination, counter) DO UPDATE SET value = value + excluded.value"
)


def add_counts(conn: sqlite3.Connection, destination: str, counts: Mapping[str, int]) -> None:
    """Add to a destination's counters; call inside the transaction that made the change being counted."""
    changed = {name: value for name, value in counts.items() if value}
    if changed:
        conn.execute(_ADD_SQL, (destination, json.dumps(changed)))


def pending_by_destination(conn: sqlite3.Connection) -> dict[str, int]:
    """``accepted`` minus every outcome, per destination: the rows the books say are still in the spool."""
    pending: dict[str, int] = {}
    for destination, counter, value in conn.execute("SELECT destination, counter, value FROM books"):
        if counter == "accepted":
            pending[destination] = pending.get(destination, 0) + value
        elif counter in OUTCOMES or counter.startswith(_POLICY):
            pending[destination] = pending.get(destination, 0) - value
    return pending


def write_heartbeat(conn: sqlite3.Connection, pid: int, state: Mapping[str, Mapping[str, float]]) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO deliverer (id, pid, heartbeat, state) VALUES (1, ?, ?, ?)",
        (pid, time.time(), json.dumps(state, separators=(",", ":"))),
    )


_DESTINATION_ROWS_SQL: Final = (
    "SELECT (SELECT count(*) FROM payloads WHERE destination = ?1),"
    " (SELECT count(*) FROM payloads WHERE destination = ?1 AND leased = 2),"
    " (SELECT min(accepted_at) FROM payloads WHERE destination = ?1)"
)


def read_host_stats(path: str, destinations: Iterable[str]) -> dict[str, dict[str, float]]:
    """The host's books per destination, in the shape of :meth:`Dispatcher.stats`, from one read snapshot.

    Opens the spool read-only (a scrape never writes); a spool that does not exist yet reads as all zeros.
    """
    names = list(destinations)
    counters: dict[str, dict[str, int]] = {name: {} for name in names}
    rows: dict[str, int] = {}
    in_flight: dict[str, int] = {}
    oldest: dict[str, float] = {}
    state: dict[str, dict[str, float]] = {}
    heartbeat: float | None = None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, isolation_level=None)
    except sqlite3.Error:
        conn = None
    if conn is not None:
        try:
            conn.execute("BEGIN")  # one snapshot for every read below (WAL readers see a fixed state)
            for destination, counter, value in conn.execute("SELECT destination, counter, value FROM books"):
                counters.setdefault(destination, {})[counter] = value
            # Per destination and through the indexes (payloads_due, payloads_age), not one scan of every row: a
            # scrape stays cheap while a destination that is down for hours lets the spool grow to its cap. Every
            # destination with rows is in the books (a row and its "accepted" are written in one commit).
            for destination in dict.fromkeys([*names, *counters]):
                count, leased, first = conn.execute(_DESTINATION_ROWS_SQL, (destination,)).fetchone()
                if count:
                    rows[destination] = count
                    in_flight[destination] = leased
                    oldest[destination] = first
            record = conn.execute("SELECT heartbeat, state FROM deliverer WHERE id = 1").fetchone()
            if record is not None:
                heartbeat = float(record[0])
                state = json.loads(record[1])
            conn.execute("COMMIT")
        except sqlite3.Error:
            pass  # a spool from before deliverer mode: no books yet
        finally:
            conn.close()
    now = time.time()
    result: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys([*names, *counters]):
        books = counters.get(name, {})
        policy = {key[len(_POLICY) :]: value for key, value in books.items() if key.startswith(_POLICY)}
        settled = sum(books.get(key, 0) for key in OUTCOMES) + sum(policy.values())
        lane_state = state.get(name, {})
        stats: dict[str, float] = {
            "accepted": books.get("accepted", 0),
            "replayed": books.get("replayed", 0),
            "refused": 0,
            **{key: books.get(key, 0) for key in OUTCOMES},
            "dropped_policy": sum(policy.values()),
            "retried": books.get("retried", 0),
            "ambiguous_retried": books.get("ambiguous_retried", 0),
            "pending": books.get("accepted", 0) - settled,
            "queue_depth": 0,
            "in_flight": in_flight.get(name, 0),
            "memory_pending": 0,
            "spool_rows": rows.get(name, 0),
            "spool_oldest_age_seconds": max(0.0, now - oldest[name]) if name in oldest else 0.0,
            "circuit_state": lane_state.get("circuit_state", 0),
            "consecutive_failures": lane_state.get("consecutive_failures", 0),
            "spool_available": 1.0,
            "deliverer_heartbeat_age_seconds": now - heartbeat if heartbeat is not None else -1.0,
        }
        for reason, count in sorted(policy.items()):
            stats[f"dropped_policy:{reason}"] = count
        result[name] = stats
    return result


def lane_stats(lanes: Sequence[Lane], now: float, spool_available: bool) -> dict[str, dict[str, float]]:
    """An in-process dispatcher's books: per destination, counters (monotonic within a process) and gauges."""
    result: dict[str, dict[str, float]] = {}
    for lane in lanes:
        policy = dict(lane.dropped_policy)
        if lane.dropped_consent:
            policy["consent"] = policy.get("consent", 0) + lane.dropped_consent
        oldest_age = 0.0
        if lane.spool_rows and lane.spool_oldest is not None:
            oldest_age = max(0.0, now - lane.spool_oldest)
        stats: dict[str, float] = {
            "accepted": lane.accepted,
            "replayed": lane.replayed,
            "refused": lane.refused,
            "delivered": lane.delivered,
            "dropped_policy": sum(policy.values()),
            "dropped_destination": lane.dropped_destination,
            "dropped_overflow": lane.dropped_overflow,
            "dropped_expired": lane.dropped_expired,
            "dead_lettered": lane.dead_lettered,
            "ambiguous": lane.ambiguous,
            "retried": lane.retried,
            "ambiguous_retried": lane.ambiguous_retried,
            "pending": lane.pending(),
            "queue_depth": len(lane.queue) + len(lane.overflow),
            "in_flight": lane.in_flight_count(),
            "memory_pending": lane.mem_pending,
            "spool_rows": lane.spool_rows,
            "spool_oldest_age_seconds": oldest_age,
            "circuit_state": lane.circuit,
            "consecutive_failures": lane.failures,
            "spool_available": 1.0 if spool_available else 0.0,
        }
        for reason, count in sorted(policy.items()):
            stats[f"dropped_policy:{reason}"] = count
        result[lane.name] = stats
    return result


def check_lanes(lanes: Sequence[Lane]) -> None:
    """Raise AssertionError with details unless every lane's books balance (see gateway.delivery.dispatcher)."""
    from gateway.delivery.lanes import MEM, RELEASING, SPILLING

    problems: list[str] = []
    for lane in lanes:
        policy = sum(lane.dropped_policy.values()) + lane.dropped_consent
        outcomes = {
            "delivered": lane.delivered,
            "dropped_policy": policy,
            "dropped_destination": lane.dropped_destination,
            "dropped_overflow": lane.dropped_overflow,
            "dropped_expired": lane.dropped_expired,
            "dead_lettered": lane.dead_lettered,
            "ambiguous": lane.ambiguous,
            "pending": lane.pending(),
        }
        total = sum(outcomes.values())
        if total != lane.accepted:
            detail = ", ".join(f"{k}={v}" for k, v in outcomes.items())
            problems.append(f"{lane.name}: accepted={lane.accepted} != {total} ({detail})")
        negative = {
            k: v for k, v in {**outcomes, "spool_rows": lane.spool_rows, "mem": lane.mem_pending}.items() if v < 0
        }
        if negative:
            problems.append(f"{lane.name}: negative counts {negative}")
        # The books' count of payloads in memory must match what memory actually holds.
        held: dict[int, Item] = {}
        for item in lane.retry:
            held[id(item)] = item
        for flight in lane.inflight:
            for item in flight.items:
                if item.in_flight:
                    held[id(item)] = item
        for batch in lane.spilling:
            for item in batch:
                held[id(item)] = item
        in_memory = sum(1 for item in held.values() if item.state in (MEM, SPILLING, RELEASING))
        if in_memory != lane.mem_pending:
            problems.append(f"{lane.name}: {in_memory} payloads in memory but the books say {lane.mem_pending}")
        if lane.dequeued > lane.enqueued:
            problems.append(f"{lane.name}: dequeued {lane.dequeued} > enqueued {lane.enqueued}")
    if problems:
        raise AssertionError("dispatcher books do not balance: " + "; ".join(problems))
