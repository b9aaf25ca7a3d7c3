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

# Built from constants only (no input reaches these strings).
_LEASE_SQL: Final = (
    "UPDATE payloads SET leased = 1 WHERE destination = ?1 AND event_id IN ("  # noqa: S608
    " SELECT event_id FROM payloads WHERE destination = ?1 AND leased = 0 AND next_at <= ?2"
    f" ORDER BY next_at LIMIT ?3) RETURNING {_ROW_COLUMNS}"
)
# Batching destinations (GA4: up to 25 events of one client per request): the earliest due rows' keys (a window of
# ?3 rows, so the cost stays bounded whatever the backlog), grouped in Python (Spool._lease_groups), then the chosen
# rows leased by id. One window query over the index did the grouping too, at ~2x the CPU per leased row.
_DUE_KEYS_SQL: Final = (
    "SELECT event_id, batch_key FROM payloads WHERE destination = ?1 AND leased = 0 AND next_at <= ?2"
    " ORDER BY next_at LIMIT ?3"
)
_LEASE_IDS_SQL: Final = (
    "UPDATE payloads SET leased = 1 WHERE destination = ?1 AND leased = 0"  # noqa: S608
    f" AND event_id IN (SELECT value FROM json_each(?2)) RETURNING {_ROW_COLUMNS}"
)
_SELECT_ROWS_SQL: Final = f"SELECT {_ROW_COLUMNS} FROM payloads"  # noqa: S608
_INSERT_SQL: Final = (
    "INSERT OR IGNORE INTO payloads (event_id, destination, body, headers, batch_key, created_at,"
    " accepted_at, attempts, next_at, leased, last_error, size)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


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
    event_id, destination, body, headers, batch_key, created_at, accepted_at, attempts, next_at, last_error = record
    payload = Payload(
        destination=destination,
        event_id=event_id,
        body=json.loads(body),
        headers=tuple((str(name), str(value)) for name, value in json.loads(headers)),
        batch_key=batch_key,
        created_at=created_at,
        body_json=body,
    )
    return SpoolRow(payload, accepted_at=accepted_at, attempts=attempts, next_at=next_at, last_error=last_error)


def _settle(conn: sqlite3.Connection, destination: str, outcomes: Mapping[str, Sequence[str]]) -> int:
    deleted = 0
    counts: dict[str, int] = {}
    for outcome, event_ids in outcomes.items():
        records = conn.executemany(
            "DELETE FROM payloads WHERE destination = ? AND event_id = ?",
            [(destination, event_id) for event_id in event_ids],
        )
        counts[outcome] = max(records.rowcount, 0)
        deleted += counts[outcome]
    books.add_counts(conn, destination, counts)
    return deleted


class Spool:
    """The SQLite spool. Call :meth:`open` first; every method runs one short transaction."""

    def __init__(self, settings: SpoolSettings, *, host: bool = False, owner: bool = True) -> None:
        self.settings = settings
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
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._db
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
        """Insert rows that fit under the caps; an existing (destination, event_id) is left as is (INSERT OR IGNORE)."""
        inserted: list[str] = []
        duplicates: list[str] = []
        rejected: list[str] = []
        invalid: list[str] = []
        limit_rows, limit_bytes = self.settings.max_rows, self.settings.max_bytes
        with self._transaction() as conn:
            for row in rows:
                try:
                    body, headers, size = _encode(row)
                except (TypeError, ValueError):
                    invalid.append(row.event_id)
                    continue
                if self._rows + 1 > limit_rows or self._bytes + size > limit_bytes:
                    rejected.append(row.event_id)
                    continue
                payload = row.payload
                cursor = conn.execute(
                    _INSERT_SQL,
                    (payload.event_id, payload.destination, body, headers, payload.batch_key, payload.created_at,
                     row.accepted_at, row.attempts, row.next_at, int(leased), row.last_error, size),
                )  # fmt: skip
                if cursor.rowcount == 1:
                    inserted.append(row.event_id)
                    self._count(payload.destination, 1, size)
                else:
                    duplicates.append(row.event_id)
        return PutResult(tuple(inserted), tuple(duplicates), tuple(rejected), tuple(invalid))

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
                added = max(conn.executemany(_INSERT_SQL, records).rowcount, 0)
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
        of a key (see _lease_groups) so requests fill up, rather than a time slice across many clients.
        """
        if limit <= 0:
            return []
        with self._transaction() as conn:
            if batch > 1:
                records = self._lease_groups(conn, destination, now, limit, batch)
            else:
                records = conn.execute(_LEASE_SQL, (destination, now, limit)).fetchall()
        rows = [_decode(record) for record in records]
        rows.sort(key=lambda row: row.next_at)  # RETURNING has no defined order
        return rows

    @staticmethod
    def _lease_groups(conn: sqlite3.Connection, destination: str, now: float, limit: int, batch: int) -> list[Any]:
        """Among the earliest 4 x ``limit`` due rows: whole groups of one batch key (at most ``batch`` rows each,
        earliest first), the key with the oldest row first, at most ``limit`` rows in all; leased in one statement."""
        groups: dict[str, list[str]] = {}
        for event_id, key in conn.execute(_DUE_KEYS_SQL, (destination, now, 4 * limit)):
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
        if not chosen:
            return []
        return conn.execute(_LEASE_IDS_SQL, (destination, json.dumps(chosen))).fetchall()

    def release(self, rows: Iterable[SpoolRow], retried: int = 0) -> int:
        """Give leased rows back with their new schedule (attempts, next_at, last_error); missing rows are ignored.

        ``retried``: retry attempts this release schedules, counted in the host books.
        """
        rows = list(rows)
        with self._transaction() as conn:
            cursor = conn.executemany(
                "UPDATE payloads SET leased = 0, attempts = ?, next_at = ?, last_error = ?"
                " WHERE destination = ? AND event_id = ?",
                [(row.attempts, row.next_at, row.last_error, row.destination, row.event_id) for row in rows],
            )
            if self.host and retried and rows:
                books.add_counts(conn, rows[0].destination, {"retried": retried})
            return max(cursor.rowcount, 0)

    def delete(self, destination: str, event_ids: Iterable[str]) -> int:
        deleted = 0
        with self._transaction() as conn:
            for event_id in event_ids:
                record = conn.execute(
                    "DELETE FROM payloads WHERE destination = ? AND event_id = ? RETURNING size",
                    (destination, event_id),
                ).fetchone()
                if record is not None:
                    self._count(destination, -1, -record[0])
                    deleted += 1
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
                conn.executemany(
                    "UPDATE payloads SET leased = 2 WHERE destination = ? AND event_id = ?",
                    [(destination, event_id) for event_id in event_ids],
                )

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
        with self._transaction() as conn:
            records = conn.execute(
                "DELETE FROM payloads WHERE destination = ? AND accepted_at < ? AND leased = 0 RETURNING size",
                (destination, cutoff),
            ).fetchall()
            if self.host:
                books.add_counts(conn, destination, {"dropped_expired": len(records)})
        self._count(destination, -len(records), -sum(size for (size,) in records))
        return len(records)

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
        oldest_sql = "SELECT min(accepted_at) FROM payloads WHERE destination = ?"
        due_sql = "SELECT min(next_at) FROM payloads WHERE destination = ? AND leased = 0"
        oldest = conn.execute(oldest_sql, (destination,)).fetchone()[0]
        next_due = conn.execute(due_sql, (destination,)).fetchone()[0]
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
        with self._transaction() as conn:
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
                conn.execute(
                    "INSERT OR REPLACE INTO dead_letters (event_id, destination, reason, body, headers, batch_key,"
                    " created_at, accepted_at, attempts, failed_at, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (letter.event_id, letter.destination, letter.reason, body, headers, batch_key, created_at,
                     letter.accepted_at, letter.attempts, letter.failed_at, size),
                )  # fmt: skip
                record = conn.execute(
                    "DELETE FROM payloads WHERE destination = ? AND event_id = ? RETURNING size",
                    (letter.destination, letter.event_id),
                ).fetchone()
                if record is not None:
                    self._count(letter.destination, -1, -record[0])
                    if self.host:
                        books.add_counts(conn, letter.destination, {"dead_lettered": 1})
            conn.execute(
                "DELETE FROM dead_letters WHERE rowid IN ("
                " SELECT rowid FROM dead_letters ORDER BY failed_at DESC LIMIT -1 OFFSET ?)",
                (MAX_DEAD_LETTERS,),
            )

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
