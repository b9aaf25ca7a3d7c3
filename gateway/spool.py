"""Durable spool: a small SQLite queue of already-filtered destination payloads, owned by one process.

The spool holds :class:`~gateway.sinks.Payload` objects (what a destination's policy allows it to receive), never
raw :class:`~gateway.events.Event` objects, so nothing the policy removed is ever written to disk. It is used for
queue overflow, for payloads waiting for a retry, while a destination's circuit is open, and for whatever is still
queued at shutdown; :class:`~gateway.delivery.dispatcher.Dispatcher` replays it on start.

Layout (``PRAGMA user_version = 1``)::

    payloads(destination, event_id, body JSON, headers JSON, batch_key, created_at, accepted_at,
             attempts, next_at, leased, last_error, size)               PRIMARY KEY (destination, event_id)
    dead_letters(destination, event_id, reason, body JSON, headers JSON, batch_key, created_at,
                 accepted_at, attempts, failed_at, size)                PRIMARY KEY (destination, event_id)

One event goes to several destinations, each with its own payload, so an event id is unique per destination.

- ``accepted_at`` is when the gateway accepted the event; a destination's TTL counts from it.
- ``leased = 1`` marks a row this process holds in memory (about to be sent, or in flight). Leases only live as long
  as the process: :meth:`Spool.open` clears them, so a row that was in flight when the process died is sent again.
  That re-send of at most the in-flight batches is the one way a crash can duplicate a delivery.
- ``size`` is the row's payload bytes (JSON body and headers plus ids); ``max_bytes`` caps their sum. The file itself
  is larger by SQLite's page overhead and the WAL, which ``journal_size_limit`` truncates after checkpoints.

Durability: WAL mode with ``synchronous=NORMAL`` makes every commit survive a process crash (SIGKILL); only a power
loss or OS crash can roll back the last few commits (https://www.sqlite.org/pragma.html#pragma_synchronous).
``secure_delete=FAST`` zeroes deleted payloads on their b-tree pages, so delivered data does not linger in the file.

:class:`Spool` is synchronous and not thread-safe: the dispatcher calls it from one dedicated worker thread, so
SQLite never blocks the event loop and operations run in the order they were submitted. The spool file must belong
to one process (one file per worker): :meth:`Spool.open` takes an exclusive ``flock`` on ``<path>.lock`` and fails
with :class:`SpoolError` when another process holds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

from gateway.config import SpoolSettings
from gateway.delivery import books
from gateway.sinks import Payload

__all__ = [
    "DeadLetter",
    "PutResult",
    "Spool",
    "SpoolError",
    "SpoolRow",
    "SpoolSummary",
]

SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT_MS: Final = 5000
# Fixed per-row overhead counted towards max_bytes on top of the JSON text (keys, numbers, index entries).
ROW_OVERHEAD_BYTES: Final = 64
# At most this many dead letters are kept (oldest go first); each also expires with its destination's TTL.
MAX_DEAD_LETTERS: Final = 10_000
WAL_SIZE_LIMIT_BYTES: Final = 4 * 1024 * 1024

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS payloads (
    destination TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    body        TEXT NOT NULL,
    headers     TEXT NOT NULL,
    batch_key   TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    accepted_at REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,
    leased      INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT NOT NULL DEFAULT '',
    size        INTEGER NOT NULL,
    PRIMARY KEY (destination, event_id)
);
CREATE INDEX IF NOT EXISTS payloads_due ON payloads (destination, leased, next_at);
CREATE INDEX IF NOT EXISTS payloads_age ON payloads (destination, accepted_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    destination TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    body        TEXT,
    headers     TEXT,
    batch_key   TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    accepted_at REAL NOT NULL,
    attempts    INTEGER NOT NULL,
    failed_at   REAL NOT NULL,
    size        INTEGER NOT NULL,
    PRIMARY KEY (destination, event_id)
);
CREATE INDEX IF NOT EXISTS dead_letters_age ON dead_letters (destination, failed_at);
CREATE INDEX IF NOT EXISTS dead_letters_failed ON dead_letters (failed_at);
"""

_ROW_COLUMNS: Final = (
    "event_id, destination, body, headers, batch_key, created_at, accepted_at, attempts, next_at, last_error"
)

_SELECT_ROWS_SQL: Final = f"SELECT {_ROW_COLUMNS} FROM payloads"  # noqa: S608
# Statements over many rows run as one sqlite3_step each, never one per row. The dispatcher's spool thread shares the
# GIL with a busy event loop, and the sqlite3 module releases the GIL around every step: getting it back can take the
# whole switch interval (5 ms, https://docs.python.org/3/library/sys.html#sys.setswitchinterval) while the loop
# serves pages, so a 128-row insert of one statement per row took ~700 ms instead of ~1.4 ms, and the overflow of a
# hung destination piled up in memory meanwhile (benchmarks/bench_spool_thread.py measures both; docs/delivery.md).
# Ids go in as one JSON array (json_each); rows with their numbers go in as multi-row VALUES, bound as parameters
# (SQLite's JSON parser does not round-trip every float exactly), in groups of 2^k rows so a few prepared statements
# serve every batch size.
_INSERT_GROUP_MAX: Final = 128  # x 12 columns: 1,536 parameters; SQLite 3.32+ allows 32,766 (RETURNING needs 3.35)
_IN_IDS: Final = "event_id IN (SELECT value FROM json_each(?2))"
_COUNT_IDS_SQL: Final = f"SELECT count(*), coalesce(sum(size), 0) FROM payloads WHERE destination = ?1 AND {_IN_IDS}"  # noqa: S608
_NEWEST_KEYS_SQL: Final = "SELECT json_group_array(json_array(destination, event_id)) FROM payloads WHERE rowid > ?"
_DELETE_IDS_SQL: Final = f"DELETE FROM payloads WHERE destination = ?1 AND {_IN_IDS}"  # noqa: S608
_MARK_SENDING_SQL: Final = f"UPDATE payloads SET leased = 2 WHERE destination = ?1 AND {_IN_IDS}"  # noqa: S608


# Multi-row statements: "{values}" becomes that many "(?, ...)" rows.
_INSERT_ROWS_SQL: Final = (
    "INSERT OR IGNORE INTO payloads (event_id, destination, body, headers, batch_key, created_at, accepted_at,"
    " attempts, next_at, leased, last_error, size) VALUES {values}"
)
_RELEASE_ROWS_SQL: Final = (
    "UPDATE payloads SET leased = 0, attempts = v.column3, next_at = v.column4, last_error = v.column5"
    " FROM (VALUES {values}) AS v WHERE payloads.destination = v.column1 AND payloads.event_id = v.column2"
)
_DEAD_LETTER_ROWS_SQL: Final = (
    "INSERT OR REPLACE INTO dead_letters (event_id, destination, reason, body, headers, batch_key, created_at,"
    " accepted_at, attempts, failed_at, size) VALUES {values}"
)


@functools.cache
def _rows_sql(statement: str, columns: int, rows: int) -> str:
    return statement.format(values=", ".join([f"({', '.join('?' * columns)})"] * rows))


def _run_groups(
    conn: sqlite3.Connection, statement: str, records: Sequence[tuple[Any, ...]]
) -> Iterator[tuple[Sequence[tuple[Any, ...]], sqlite3.Cursor]]:
    """Run a multi-row ``statement`` over ``records`` in groups of 2^k rows (at most _INSERT_GROUP_MAX), so that a
    few prepared statements serve every batch size; yield each group with its cursor."""
    start = 0
    while start < len(records):
        size = min(_INSERT_GROUP_MAX, 1 << ((len(records) - start).bit_length() - 1))
        group = records[start : start + size]
        params = [value for record in group for value in record]
        yield group, conn.execute(_rows_sql(statement, len(group[0]), size), params)
        start += size


def _run_rows(conn: sqlite3.Connection, statement: str, records: Sequence[tuple[Any, ...]]) -> int:
    """:func:`_run_groups`, returning the rows changed."""
    return sum(max(cursor.rowcount, 0) for _, cursor in _run_groups(conn, statement, records))


def _insert_payloads(conn: sqlite3.Connection, records: Sequence[tuple[Any, ...]]) -> set[tuple[str, str]]:
    """INSERT OR IGNORE payload ``records``; return the (destination, event_id) of those already there.

    The common case is one statement per group of rows. Only a group that inserts fewer rows than it holds has its
    new rows looked up: a rowid table gives each new row the largest rowid so far plus one
    (https://www.sqlite.org/autoinc.html), so the rows one statement inserted are those above its last rowid minus
    its count."""
    existing: set[tuple[str, str]] = set()
    for group, cursor in _run_groups(conn, _INSERT_ROWS_SQL, records):
        changed = max(cursor.rowcount, 0)
        if changed < len(group):
            new: set[tuple[str, str]] = set()
            if changed and cursor.lastrowid is not None:
                (found,) = conn.execute(_NEWEST_KEYS_SQL, (cursor.lastrowid - changed,)).fetchone()
                new = {(destination, event_id) for destination, event_id in json.loads(found)}
            existing.update(key for key in ((record[1], record[0]) for record in group) if key not in new)
    return existing


def _ids_json(event_ids: Iterable[str]) -> str:
    return json.dumps(list(event_ids))


def _delete_ids(conn: sqlite3.Connection, destination: str, event_ids: Iterable[str]) -> tuple[int, int]:
    """Delete the destination's rows with these ids; return how many there were and their size."""
    ids = _ids_json(event_ids)
    deleted, size = conn.execute(_COUNT_IDS_SQL, (destination, ids)).fetchone()
    if deleted:
        conn.execute(_DELETE_IDS_SQL, (destination, ids))
    return int(deleted), int(size)


# Built from constants only (no input reaches these strings).
_LEASE_SQL: Final = (
    "UPDATE payloads SET leased = 1 WHERE destination = ?1 AND event_id IN ("  # noqa: S608
    " SELECT event_id FROM payloads WHERE destination = ?1 AND leased = 0 AND next_at <= ?2"
    f" ORDER BY next_at LIMIT ?3) RETURNING {_ROW_COLUMNS}"
)
# With few_trips (calls on a thread beside a busy loop), leased rows come back as one JSON array in one row instead:
# a fetch per row would be a GIL round trip per row (see _INSERT_GROUP_MAX), at ~5 us less CPU per row
# (benchmarks/bench_floors.py). REALs travel as text with 21 significant digits, which Python reads back to the
# same double (https://www.sqlite.org/printf.html: "!" asks for SQLite's extended precision; its JSON and quote()
# write 15-17 digits, from which a few doubles in a thousand come back one unit off; tests/test_spool.py checks
# every finite double with hypothesis).
_REAL_TEXT: Final = "'%!.20e'"
_LEASED_JSON: Final = (
    "json_group_array(json_array(event_id, destination, body, headers, batch_key,"
    f" printf({_REAL_TEXT}, created_at), printf({_REAL_TEXT}, accepted_at), attempts, printf({_REAL_TEXT}, next_at),"
    " last_error))"
)
_DUE_ROWS_SQL: Final = (
    f"SELECT {_LEASED_JSON} FROM (SELECT * FROM payloads"  # noqa: S608
    " WHERE destination = ?1 AND leased = 0 AND next_at <= ?2 ORDER BY next_at LIMIT ?3)"
)
# Batching destinations (GA4: up to 25 events of one client per request): the earliest due rows' keys (a window of
# ?3 rows, so the cost stays bounded whatever the backlog), grouped in Python (Spool._due_groups), then the chosen
# rows read by id. One window query over the index did the grouping too, at ~2x the CPU per leased row.
_DUE_KEYS_SQL: Final = (
    "SELECT json_group_array(json_array(event_id, batch_key)) FROM (SELECT event_id, batch_key FROM payloads"
    " WHERE destination = ?1 AND leased = 0 AND next_at <= ?2 ORDER BY next_at LIMIT ?3)"
)
_ROWS_BY_ID_SQL: Final = f"SELECT {_LEASED_JSON} FROM payloads WHERE destination = ?1 AND {_IN_IDS}"  # noqa: S608
_LEASE_IDS_SQL: Final = f"UPDATE payloads SET leased = 1 WHERE destination = ?1 AND {_IN_IDS}"  # noqa: S608
_LEASE_IDS_RETURNING_SQL: Final = f"{_LEASE_IDS_SQL} AND leased = 0 RETURNING {_ROW_COLUMNS}"


class SpoolError(Exception):
    """The spool cannot be opened or used (locked by another process, unknown schema, not a database)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SpoolRow:
    """A payload with its delivery schedule, as stored."""

    payload: Payload
    accepted_at: float
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""

    @property
    def event_id(self) -> str:
        return self.payload.event_id

    @property
    def destination(self) -> str:
        return self.payload.destination


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """An undeliverable event. ``payload`` is None when no payload could be built (the raw event is never stored)."""

    event_id: str
    destination: str
    reason: str
    payload: Payload | None
    accepted_at: float
    attempts: int
    failed_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class PutResult:
    inserted: tuple[str, ...] = ()
    duplicates: tuple[str, ...] = ()  # a row with this event_id already exists (INSERT OR IGNORE)
    rejected: tuple[str, ...] = ()  # over max_rows or max_bytes
    invalid: tuple[str, ...] = ()  # the body or headers are not JSON-serialisable


@dataclasses.dataclass(frozen=True, slots=True)
class SpoolSummary:
    rows: int
    oldest_accepted_at: float | None  # of all rows, leased or not
    next_due: float | None  # earliest next_at of the rows not leased


# Built once: json.dumps() with options builds a new encoder on every call.
_BODY_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_HEADERS_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _encode(row: SpoolRow) -> tuple[str, str, int]:
    payload = row.payload
    body = payload.body_json or _BODY_JSON.encode(payload.body)
    headers = _HEADERS_JSON.encode([list(pair) for pair in payload.headers])
    size = len(body.encode()) + len(headers.encode()) + len(payload.event_id) + len(payload.batch_key)
    return body, headers, size + ROW_OVERHEAD_BYTES


def _decode(record: Sequence[Any]) -> SpoolRow:
    """A row as selected (_ROW_COLUMNS) or as an element of _LEASED_JSON, whose REALs arrive as text; float() also
    turns a REAL that SQLite hands back as an integer (0.0 stored as 0) into a float."""
    event_id, destination, body, headers, batch_key, created_at, accepted_at, attempts, next_at, last_error = record
    payload = Payload(
        destination=destination,
        event_id=event_id,
        body=json.loads(body),
        headers=tuple((str(name), str(value)) for name, value in json.loads(headers)),
        batch_key=batch_key,
        created_at=float(created_at),
        body_json=body,
    )
    return SpoolRow(
        payload, accepted_at=float(accepted_at), attempts=attempts, next_at=float(next_at), last_error=last_error
    )


def _settle(conn: sqlite3.Connection, destination: str, outcomes: Mapping[str, Sequence[str]]) -> int:
    deleted = 0
    counts: dict[str, int] = {}
    for outcome, event_ids in outcomes.items():
        counts[outcome] = max(conn.execute(_DELETE_IDS_SQL, (destination, _ids_json(event_ids))).rowcount, 0)
        deleted += counts[outcome]
    books.add_counts(conn, destination, counts)
    return deleted


class Spool:
    """The SQLite spool. Call :meth:`open` first; every method runs one short transaction (or joins :meth:`batch`'s)."""

    def __init__(
        self, settings: SpoolSettings, *, host: bool = False, owner: bool = True, few_trips: bool = False
    ) -> None:
        self.settings = settings
        # Calls run on a thread beside a busy event loop (the in-process dispatcher): read leased rows in one fetch,
        # not one per row, even at some CPU (see _LEASED_JSON).
        self.few_trips = few_trips
        # Deliverer mode: the host's one spool, written by every request worker; each change is counted in the
        # host books (gateway.delivery.books) within its own transaction.
        self.host = host
        # The owner (the in-process dispatcher, or the deliverer) holds the file's lock; request workers that only
        # hand payloads off (hand_off) do not.
        self.owner = owner
        self.path = Path(settings.path)
        self._conn: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._rows = 0
        self._bytes = 0
        self._rows_by_destination: dict[str, int] = {}
        self._in_batch = False
        self.recovered_leases = 0  # rows that were in flight when the previous process stopped

    def __repr__(self) -> str:
        return f"Spool(path={os.fspath(self.path)!r}, rows={self._rows}, bytes={self._bytes})"

    # ----------------------------------------------------------------------------------------------------------
    # lifecycle
    # ----------------------------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._conn is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.owner:
                self._lock()
            # Create the file owner-only before SQLite does: it holds (minimised) visitor data, and SQLite gives
            # the -wal and -shm files the same permissions as the database file.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except OSError as exc:
            self._unlock()
            raise SpoolError(f"cannot open spool {os.fspath(self.path)!r}: {exc.strerror or exc}") from exc
        try:
            self._configure(conn)
        except sqlite3.Error as exc:
            conn.close()
            self._unlock()
            raise SpoolError(f"cannot use spool {os.fspath(self.path)!r}: {exc}") from exc
        except SpoolError:
            conn.close()
            self._unlock()
            raise
        self._conn = conn

    def _lock(self) -> None:
        lock_file = open(f"{self.path}.lock", "ab")  # noqa: SIM115 - held open for the spool's lifetime
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise SpoolError(f"spool {os.fspath(self.path)!r} is in use by another process") from None
        self._lock_file = lock_file

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def _configure(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"spool {os.fspath(self.path)!r} cannot use WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA secure_delete=FAST")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise SpoolError(f"spool {os.fspath(self.path)!r} has schema version {version}, expected {SCHEMA_VERSION}")
        if version == 0:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if self.host:
            conn.executescript(books.SCHEMA)
        if not self.owner:
            return  # leases and in-memory totals are the owner's business
        # Leases belong to the process that took them; that process is gone. In host mode rows marked as on the
        # wire (leased = 2) stay for recover_sending(): they may have arrived, so sending them again could count twice.
        held = "leased = 1" if self.host else "leased != 0"
        self.recovered_leases = conn.execute(f"UPDATE payloads SET leased = 0 WHERE {held}").rowcount  # noqa: S608
        self._load_totals(conn)

    def _load_totals(self, conn: sqlite3.Connection) -> None:
        self._rows, self._bytes = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM payloads").fetchone()
        self._rows_by_destination = dict(
            conn.execute("SELECT destination, count(*) FROM payloads GROUP BY destination").fetchall()
        )

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # the last connection to close checkpoints the WAL and removes it
        self._unlock()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def bytes(self) -> int:
        return self._bytes

    def rows_by_destination(self) -> Mapping[str, int]:
        return dict(self._rows_by_destination)

    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError("the spool is not open")
        return self._conn

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Run several calls in one transaction: one BEGIN and one COMMIT for all of them, since on the spool thread
        each statement costs a GIL round trip (see _INSERT_GROUP_MAX). If any call fails, all of them roll back."""
        try:
            with self._transaction():
                self._in_batch = True
                try:
                    yield
                finally:
                    self._in_batch = False
        except BaseException:
            if self.owner:  # the calls counted rows that are not there after the rollback
                with contextlib.suppress(sqlite3.Error, SpoolError):
                    self._load_totals(self._db)
            raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._db
        if self._in_batch:  # batch()'s transaction commits or rolls back this call's changes with the others
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _count(self, destination: str, rows: int, size: int) -> None:
        self._rows += rows
        self._bytes += size
        left = self._rows_by_destination.get(destination, 0) + rows
        if left:
            self._rows_by_destination[destination] = left
        else:
            self._rows_by_destination.pop(destination, None)

    # ----------------------------------------------------------------------------------------------------------
    # payloads
    # ----------------------------------------------------------------------------------------------------------

    def put(self, rows: Iterable[SpoolRow], *, leased: bool = False) -> PutResult:
        """Insert rows that fit under the caps; an existing (destination, event_id) is left as is (a duplicate).

        The caps are checked before the insert tells duplicates apart, so a duplicate (which the dispatcher never
        puts: each event is spooled once) takes room from the rows after it within the same call."""
        inserted: list[SpoolRow] = []
        duplicates: list[str] = []
        rejected: list[str] = []
        invalid: list[str] = []
        records: list[tuple[Any, ...]] = []
        sizes: dict[tuple[str, str], int] = {}
        limit_rows, limit_bytes = self.settings.max_rows, self.settings.max_bytes
        total_rows, total_bytes = self._rows, self._bytes
        for row in rows:
            payload = row.payload
            key = (payload.destination, payload.event_id)
            if key in sizes:
                duplicates.append(row.event_id)
                continue
            try:
                body, headers, size = _encode(row)
            except (TypeError, ValueError):
                invalid.append(row.event_id)
                continue
            if total_rows + 1 > limit_rows or total_bytes + size > limit_bytes:
                rejected.append(row.event_id)
                continue
            sizes[key] = size
            total_rows += 1
            total_bytes += size
            records.append(
                (payload.event_id, payload.destination, body, headers, payload.batch_key, payload.created_at,
                 row.accepted_at, row.attempts, row.next_at, int(leased), row.last_error, size)
            )  # fmt: skip
            inserted.append(row)
        with self._transaction() as conn:
            existing = _insert_payloads(conn, records)
        if existing:
            duplicates.extend(row.event_id for row in inserted if (row.destination, row.event_id) in existing)
            inserted = [row for row in inserted if (row.destination, row.event_id) not in existing]
        for row in inserted:
            self._count(row.destination, 1, sizes[(row.destination, row.event_id)])
        return PutResult(tuple(row.event_id for row in inserted), tuple(duplicates), tuple(rejected), tuple(invalid))

    def hand_off(self, rows: Sequence[SpoolRow], counts: Mapping[str, Mapping[str, int]]) -> int:
        """Host mode, request workers: insert built payloads and add their books in one commit; return rows inserted.

        ``counts`` per destination: what the caller decided (``accepted``, ``dropped_policy:consent``, ...). Rows
        over the caps (max_rows, max_bytes across the host) are not inserted and counted as ``dropped_overflow``.
        """
        limit_rows, limit_bytes = self.settings.max_rows, self.settings.max_bytes
        extra: dict[str, dict[str, int]] = {}
        with self._transaction() as conn:
            total_rows, total_bytes = conn.execute("SELECT rows, bytes FROM totals WHERE id = 1").fetchone()
            by_destination: dict[str, list[tuple[Any, ...]]] = {}
            for row in rows:
                payload = row.payload
                try:
                    body, headers, size = _encode(row)
                except (TypeError, ValueError):
                    reason = "dropped_policy:unserialisable"
                    extra.setdefault(payload.destination, {})[reason] = (
                        extra.get(payload.destination, {}).get(reason, 0) + 1
                    )
                    continue
                if total_rows + 1 > limit_rows or total_bytes + size > limit_bytes:
                    counts_for = extra.setdefault(payload.destination, {})
                    counts_for["dropped_overflow"] = counts_for.get("dropped_overflow", 0) + 1
                    continue
                total_rows += 1
                total_bytes += size
                by_destination.setdefault(payload.destination, []).append(
                    (payload.event_id, payload.destination, body, headers, payload.batch_key, payload.created_at,
                     row.accepted_at, row.attempts, row.next_at, 0, row.last_error, size)
                )  # fmt: skip
            inserted = 0
            for destination, records in by_destination.items():
                added = _run_rows(conn, _INSERT_ROWS_SQL, records)
                inserted += added
                if added < len(records):  # an event id seen before: the first copy counts
                    counts_for = extra.setdefault(destination, {})
                    counts_for["dropped_policy:duplicate"] = len(records) - added
            for destination in {*counts, *extra}:
                merged = dict(counts.get(destination, {}))
                for name, value in extra.get(destination, {}).items():
                    merged[name] = merged.get(name, 0) + value
                books.add_counts(conn, destination, merged)
        return inserted

    def heartbeat(self, pid: int, state: Mapping[str, Mapping[str, float]]) -> None:
        """Host mode: the deliverer's tick, with each destination's circuit state, for the workers' metrics."""
        with self._transaction() as conn:
            books.write_heartbeat(conn, pid, state)

    def lease_due(self, destination: str, now: float, limit: int, batch: int = 1) -> list[SpoolRow]:
        """Lease up to ``limit`` unleased rows due at ``now``, earliest first.

        ``batch`` > 1: the destination takes that many payloads of one batch key per request; lease whole groups
        of a key (see _due_groups) so requests fill up, rather than a time slice across many clients.
        """
        if limit <= 0:
            return []
        with self._transaction() as conn:
            params: tuple[Any, ...] = (destination, now, limit)
            if batch > 1:
                params = (destination, _ids_json(self._due_groups(conn, destination, now, limit, batch)))
            if not self.few_trips:  # one fetch per row, the least CPU
                records = conn.execute(_LEASE_IDS_RETURNING_SQL if batch > 1 else _LEASE_SQL, params).fetchall()
                rows = [_decode(record) for record in records]
            else:  # every row in one fetch (_LEASED_JSON), then leased by id
                (found,) = conn.execute(_ROWS_BY_ID_SQL if batch > 1 else _DUE_ROWS_SQL, params).fetchone()
                rows = [_decode(record) for record in json.loads(found)]
                if rows:
                    conn.execute(_LEASE_IDS_SQL, (destination, _ids_json(row.event_id for row in rows)))
        rows.sort(key=lambda row: row.next_at)  # neither RETURNING nor json_group_array has a defined order
        return rows

    @staticmethod
    def _due_groups(conn: sqlite3.Connection, destination: str, now: float, limit: int, batch: int) -> list[str]:
        """Among the earliest 4 x ``limit`` due rows: whole groups of one batch key (at most ``batch`` rows each,
        earliest first), the key with the oldest row first, at most ``limit`` rows in all."""
        groups: dict[str, list[str]] = {}
        (due,) = conn.execute(_DUE_KEYS_SQL, (destination, now, 4 * limit)).fetchone()
        for event_id, key in json.loads(due):
            group = groups.get(key)
            if group is None:
                groups[key] = [event_id]
            elif len(group) < batch:
                group.append(event_id)
        chosen: list[str] = []
        for group in groups.values():  # in the order of each key's earliest row
            chosen.extend(group[: limit - len(chosen)])
            if len(chosen) >= limit:
                break
        return chosen

    def release(self, rows: Iterable[SpoolRow], retried: int = 0) -> int:
        """Give leased rows back with their new schedule (attempts, next_at, last_error); missing rows are ignored.

        ``retried``: retry attempts this release schedules, counted in the host books.
        """
        rows = list(rows)
        records = [(row.destination, row.event_id, row.attempts, row.next_at, row.last_error) for row in rows]
        with self._transaction() as conn:
            released = _run_rows(conn, _RELEASE_ROWS_SQL, records)
            if self.host and retried and rows:
                books.add_counts(conn, rows[0].destination, {"retried": retried})
            return released

    def delete(self, destination: str, event_ids: Iterable[str]) -> int:
        with self._transaction() as conn:
            deleted, size = _delete_ids(conn, destination, event_ids)
        self._count(destination, -deleted, -size)
        return deleted

    def settle(self, destination: str, outcomes: Mapping[str, Sequence[str]]) -> int:
        """Host mode: delete rows by outcome (``{"delivered": [event ids]}``) and count them, in one commit."""
        with self._transaction() as conn:
            return _settle(conn, destination, outcomes)

    def mark_sending(
        self, destination: str, event_ids: Sequence[str], settled: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        """Host mode: these leased rows are about to go on the wire (``leased = 2``), durably, before they do.

        ``settled``: rows to settle as :meth:`settle` does, in the same commit (one commit per request, not two).
        """
        self.mark_sending_many({destination: (event_ids, settled or {})})

    def mark_sending_many(self, marks: Mapping[str, tuple[Sequence[str], Mapping[str, Sequence[str]]]]) -> None:
        """:meth:`mark_sending` for several destinations, in one commit: ``{destination: (event ids, settled)}``."""
        with self._transaction() as conn:
            for destination, (event_ids, settled) in marks.items():
                if settled:
                    _settle(conn, destination, settled)
                conn.execute(_MARK_SENDING_SQL, (destination, _ids_json(event_ids)))

    def recover_sending(self, *, retry: bool) -> dict[str, int]:
        """Host mode, at start: rows that were on the wire when the last deliverer died, per destination.

        They may have arrived. With ``retry`` (dispatch.retry_ambiguous) they are sent again and counted as
        ``ambiguous_retried``; otherwise they are settled as ``ambiguous`` (at most once, like a read timeout).
        """
        with self._transaction() as conn:
            found = dict(
                conn.execute("SELECT destination, count(*) FROM payloads WHERE leased = 2 GROUP BY destination")
            )
            if retry:
                conn.execute("UPDATE payloads SET leased = 0 WHERE leased = 2")
            else:
                for destination, size in conn.execute(
                    "DELETE FROM payloads WHERE leased = 2 RETURNING destination, size"
                ).fetchall():
                    self._count(destination, -1, -size)
            for destination, count in found.items():
                books.add_counts(conn, destination, {"ambiguous_retried" if retry else "ambiguous": count})
        return found

    def purge_expired(self, destination: str, cutoff: float) -> int:
        """Delete the destination's unleased rows accepted before ``cutoff``; return how many."""
        where = "destination = ? AND accepted_at < ? AND leased = 0"
        with self._transaction() as conn:
            purged, size = conn.execute(
                f"SELECT count(*), coalesce(sum(size), 0) FROM payloads WHERE {where}",  # noqa: S608
                (destination, cutoff),
            ).fetchone()
            if purged:
                conn.execute(f"DELETE FROM payloads WHERE {where}", (destination, cutoff))  # noqa: S608
            if self.host:
                books.add_counts(conn, destination, {"dropped_expired": purged})
        self._count(destination, -purged, -size)
        return int(purged)

    def purge_destinations(self, keep: Iterable[str], cutoff: float) -> int:
        """Delete rows of destinations not in ``keep`` accepted before ``cutoff`` (a removed destination)."""
        keep_set = set(keep)
        purged = 0
        for destination in [d for d in self._rows_by_destination if d not in keep_set]:
            purged += self.purge_expired(destination, cutoff)
        return purged

    def summary(self, destination: str) -> SpoolSummary:
        conn = self._db
        # Both are single index lookups (payloads_age, payloads_due), cheap enough to run on every tick.
        oldest, next_due = conn.execute(
            "SELECT (SELECT min(accepted_at) FROM payloads WHERE destination = ?1),"
            " (SELECT min(next_at) FROM payloads WHERE destination = ?1 AND leased = 0)",
            (destination,),
        ).fetchone()
        if self.host:  # other processes add rows: the books know how many are pending
            pending = books.pending_by_destination(conn).get(destination, 0)
            return SpoolSummary(pending, oldest, next_due)
        return SpoolSummary(self._rows_by_destination.get(destination, 0), oldest, next_due)

    def rows_for(self, destination: str | None = None) -> list[SpoolRow]:
        """Every stored row (for tests and inspection; not for the delivery path)."""
        sql = _SELECT_ROWS_SQL
        params: tuple[str, ...] = ()
        if destination is not None:
            sql += " WHERE destination = ?"
            params = (destination,)
        return [_decode(record) for record in self._db.execute(sql + " ORDER BY next_at", params).fetchall()]

    def leased_ids(self) -> set[str]:
        """Event ids of leased rows, any destination (tests and inspection)."""
        return {event_id for (event_id,) in self._db.execute("SELECT event_id FROM payloads WHERE leased = 1")}

    # ----------------------------------------------------------------------------------------------------------
    # dead letters
    # ----------------------------------------------------------------------------------------------------------

    def dead_letter(self, letters: Iterable[DeadLetter]) -> None:
        """Record undeliverable events and delete their payload rows, if any."""
        records: list[tuple[Any, ...]] = []
        ids: dict[str, list[str]] = {}
        for letter in letters:
            body = headers = None
            batch_key = ""
            created_at = letter.accepted_at
            size = ROW_OVERHEAD_BYTES
            if letter.payload is not None:
                row = SpoolRow(letter.payload, letter.accepted_at)
                try:
                    body, headers, size = _encode(row)
                except (TypeError, ValueError):
                    body = headers = None
                batch_key = letter.payload.batch_key
                created_at = letter.payload.created_at
            records.append(
                (letter.event_id, letter.destination, letter.reason, body, headers, batch_key, created_at,
                 letter.accepted_at, letter.attempts, letter.failed_at, size)
            )  # fmt: skip
            ids.setdefault(letter.destination, []).append(letter.event_id)
        removed: dict[str, tuple[int, int]] = {}
        with self._transaction() as conn:
            _run_rows(conn, _DEAD_LETTER_ROWS_SQL, records)
            for destination, event_ids in ids.items():
                removed[destination] = _delete_ids(conn, destination, event_ids)
                if self.host:
                    books.add_counts(conn, destination, {"dead_lettered": removed[destination][0]})
            conn.execute(
                "DELETE FROM dead_letters WHERE rowid IN ("
                " SELECT rowid FROM dead_letters ORDER BY failed_at DESC LIMIT -1 OFFSET ?)",
                (MAX_DEAD_LETTERS,),
            )
        for destination, (count, size) in removed.items():
            self._count(destination, -count, -size)

    def purge_dead_letters(self, destination: str, cutoff: float) -> int:
        with self._transaction() as conn:
            return conn.execute(
                "DELETE FROM dead_letters WHERE destination = ? AND failed_at < ?", (destination, cutoff)
            ).rowcount

    def dead_letters(self, destination: str | None = None) -> list[tuple[str, str, str]]:
        """``(event_id, destination, reason)`` of the kept dead letters, oldest first (inspection and tests)."""
        sql = "SELECT event_id, destination, reason FROM dead_letters"
        params: tuple[str, ...] = ()
        if destination is not None:
            sql += " WHERE destination = ?"
            params = (destination,)
        return [(str(a), str(b), str(c)) for a, b, c in self._db.execute(sql + " ORDER BY failed_at", params)]
