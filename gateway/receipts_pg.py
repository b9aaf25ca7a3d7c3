"""Proof of consent for a fleet: the hash-chained receipt log in PostgreSQL, one chain across every host.

Same receipts, same chain rule and the same export/verify as :mod:`gateway.receipts` (SQLite, one file per host),
so an auditor checks one log for the whole site. Set ``consent.receipts`` to a ``postgresql://`` URL (the password
as ``${VAR}``).

Three rules shape this module:

* **One chain, never forked.** Every append runs in a transaction that first takes a transaction-level advisory
  lock (``pg_advisory_xact_lock``), then reads the head and inserts ``seq = head + 1`` with
  ``hash = sha256(prev_hash || record)``. Appends from all hosts and workers are therefore serialised in the
  database itself; ``seq`` is the primary key, so a second writer could not reuse a number even without the lock.
  No head row is updated, so the gateway's role needs only INSERT and SELECT.
* **Append-only in the database.** A trigger refuses UPDATE, DELETE and TRUNCATE for everyone, the table's owner
  included; the gateway's role should also be granted INSERT and SELECT only (README, fleet setup).
* **The site never waits on the database.** :meth:`PostgresReceiptLog.append` only writes the receipt to a small
  durable local queue (SQLite, ``consent.receipts_queue``, fsynced) and returns: the visitor's choice takes effect
  at once, provably recorded on this host. A background thread moves queued receipts to PostgreSQL in order, with
  their original time, and keeps them queued while the database is slow or down (retrying with backoff), across
  restarts too. Each queued receipt has a random id stored with it in PostgreSQL (unique), so a receipt whose
  transaction committed just before a crash is not written twice. The queue is bounded
  (``consent.receipts_queue_max``): when it is full, an append fails and a grant is refused, as with a failing
  SQLite log; ``backlog()`` is exported as a metric.

Driver: psycopg 3. Measured (benchmarks/bench_receipts.py) it appends through the advisory lock as fast as asyncpg
(~1,800-2,300/s from 3 processes, within noise), and a synchronous driver fits a background thread and the command
line without an event loop of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import psycopg

from gateway.receipts import (
    GENESIS_HASH,
    Receipt,
    VerifyResult,
    canonical_json,
    chain_hash,
    check_chain,
    valid_record,
)

__all__ = ["SCHEMA_VERSION", "PostgresReceiptLog", "ReceiptQueue", "is_postgres_url"]

logger = logging.getLogger("gateway.receipts")

SCHEMA_VERSION: Final = 1
# Keys of pg_advisory_xact_lock: one serialises appends (the chain head), one schema creation.
_APPEND_LOCK: Final = 0x636F6E73656E74  # "consent"
_SCHEMA_LOCK: Final = 0x736368656D61  # "schema"
_BATCH: Final = 100  # receipts moved per transaction
_PAGE_ROWS: Final = 1000
_CONNECT_TIMEOUT: Final = 3  # seconds

# Version 1. Later versions add statements and raise gateway_schema_version; startup applies what is missing.
_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE IF NOT EXISTS gateway_schema_version (
        component text PRIMARY KEY,
        version   integer NOT NULL
    );
    CREATE TABLE IF NOT EXISTS consent_receipts (
        seq        bigint PRIMARY KEY CHECK (seq > 0),
        receipt_id text NOT NULL UNIQUE,
        record     text NOT NULL,
        prev_hash  text NOT NULL,
        hash       text NOT NULL,
        written_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE OR REPLACE FUNCTION consent_receipts_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'consent receipts are append-only';
    END
    $$;
    DROP TRIGGER IF EXISTS consent_receipts_no_change ON consent_receipts;
    CREATE TRIGGER consent_receipts_no_change BEFORE UPDATE OR DELETE ON consent_receipts
        FOR EACH ROW EXECUTE FUNCTION consent_receipts_append_only();
    DROP TRIGGER IF EXISTS consent_receipts_no_truncate ON consent_receipts;
    CREATE TRIGGER consent_receipts_no_truncate BEFORE TRUNCATE ON consent_receipts
        FOR EACH STATEMENT EXECUTE FUNCTION consent_receipts_append_only();
    """,
)


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def describe_url(url: str) -> str:
    """``host:port/database`` of a PostgreSQL URL: what a log line may say about it (never the password)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or 'localhost'}{port}{parts.path or '/'}"


class ReceiptQueue:
    """The durable local queue in front of PostgreSQL: receipts in arrival order, each with its random id.

    Several worker processes of one host may share the file (SQLite locking); a receipt is removed only after its
    PostgreSQL transaction committed.
    """

    def __init__(self, path: str, max_rows: int) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if not os.path.exists(path):
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # consent ids: the service user's only
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # queued = on disk before the visitor's cookie is sent
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS queued (n INTEGER PRIMARY KEY AUTOINCREMENT, receipt_id TEXT NOT NULL UNIQUE,"
            " record TEXT NOT NULL)"
        )

    def put(self, record_json: str) -> str:
        receipt_id = secrets.token_hex(16)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # From the primary key's ends, not COUNT(*): no scan of a long queue on every consent choice.
                # Rows leave oldest first, so the span is the number queued (an upper bound if a batch is held up).
                low, high = self._db.execute("SELECT MIN(n), MAX(n) FROM queued").fetchone()
                queued = 0 if low is None else int(high) - int(low) + 1
                if queued >= self.max_rows:
                    raise OSError(f"the local consent receipt queue is full ({queued} receipts)")
                self._db.execute("INSERT INTO queued (receipt_id, record) VALUES (?, ?)", (receipt_id, record_json))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return receipt_id

    def oldest(self, limit: int) -> list[tuple[str, str]]:
        with self._lock:
            rows = self._db.execute("SELECT receipt_id, record FROM queued ORDER BY n LIMIT ?", (limit,)).fetchall()
        return [(str(receipt_id), str(record)) for receipt_id, record in rows]

    def remove(self, receipt_ids: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM queued WHERE receipt_id = ?", [(i,) for i in receipt_ids])

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM queued").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create or migrate the tables; nothing is executed when the schema is current (a role with only INSERT and
    SELECT can then run the gateway)."""
    with conn.transaction():
        current = _schema_version(conn)
    if current >= SCHEMA_VERSION:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        current = _schema_version(conn)  # another process may have migrated while we waited
        for version in range(current + 1, SCHEMA_VERSION + 1):
            conn.execute(_MIGRATIONS[version - 1].encode())
            conn.execute(
                "INSERT INTO gateway_schema_version (component, version) VALUES ('consent_receipts', %s)"
                " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                (version,),
            )


def _schema_version(conn: psycopg.Connection[Any]) -> int:
    exists = conn.execute("SELECT to_regclass('gateway_schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT version FROM gateway_schema_version WHERE component = 'consent_receipts'").fetchone()
    return int(row[0]) if row else 0


def _append_rows(conn: psycopg.Connection[Any], rows: list[tuple[str, str]]) -> None:
    """Append ``(receipt_id, record_json)`` rows in order, in one transaction, skipping ids already written."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_APPEND_LOCK,))
        head = conn.execute("SELECT seq, hash FROM consent_receipts ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev_hash = (int(head[0]), str(head[1])) if head else (0, GENESIS_HASH)
        ids = [receipt_id for receipt_id, _ in rows]
        written = {
            str(r[0])
            for r in conn.execute("SELECT receipt_id FROM consent_receipts WHERE receipt_id = ANY(%s)", (ids,))
        }
        for receipt_id, record_json in rows:
            if receipt_id in written:
                continue  # committed before a crash, still queued: never twice
            digest = chain_hash(prev_hash, record_json)
            seq += 1
            conn.execute(
                "INSERT INTO consent_receipts (seq, receipt_id, record, prev_hash, hash) VALUES (%s, %s, %s, %s, %s)",
                (seq, receipt_id, record_json, prev_hash, digest),
            )
            prev_hash = digest


class PostgresReceiptLog:
    """The receipt log in PostgreSQL behind a durable local queue; the methods of :class:`gateway.receipts.ReceiptLog`.

    ``drain=False`` (the command line) reads PostgreSQL only and never moves queued receipts.
    """

    def __init__(self, url: str, queue_path: str, *, queue_max: int = 100_000, drain: bool = True) -> None:
        if not is_postgres_url(url):
            raise ValueError("PostgresReceiptLog needs a postgresql:// URL")
        self.url = url
        self.where = describe_url(url)
        self._queue = ReceiptQueue(queue_path, queue_max) if drain else None
        self._conn: psycopg.Connection[Any] | None = None
        self._conn_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retry_delay = 0.0
        self._thread: threading.Thread | None = None
        if self._queue is not None:
            self._thread = threading.Thread(target=self._drain_loop, name="consent-receipts", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return f"PostgresReceiptLog({self.where!r})"

    # -------------------------------------------------------------------------------------------- request side

    def append(self, receipt: Receipt) -> str:
        """Queue one receipt durably on this host; return its id. Raises OSError/sqlite3.Error when it cannot."""
        if self._queue is None:
            raise ValueError("this receipt log is read-only (drain=False)")
        record = receipt.record()
        if not valid_record(record):
            raise ValueError("malformed consent receipt")
        receipt_id = self._queue.put(canonical_json(record))
        self._wake.set()
        return receipt_id

    def backlog(self) -> int:
        """Receipts queued on this host, not yet in PostgreSQL."""
        return self._queue.count() if self._queue is not None else 0

    # ------------------------------------------------------------------------------------------------ delivery

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.url, connect_timeout=_CONNECT_TIMEOUT, application_name="privacy-gateway")
            try:
                _ensure_schema(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def flush(self) -> int:
        """Move queued receipts to PostgreSQL, oldest first, until the queue is empty; return how many moved.

        Raises psycopg.Error when the database fails (the rest stays queued).
        """
        assert self._queue is not None
        moved = 0
        with self._conn_lock:
            while True:
                rows = self._queue.oldest(_BATCH)
                if not rows:
                    return moved
                try:
                    _append_rows(self._connection(), rows)
                except psycopg.Error:
                    self._drop_connection()
                    raise
                self._queue.remove(receipt_id for receipt_id, _ in rows)
                moved += len(rows)

    def _drain_loop(self) -> None:
        # Connect at startup, so the schema is created or migrated then (and a wrong URL or grant shows in the log
        # at once), not at the first choice a visitor makes.
        try:
            with self._conn_lock:
                self._connection()
        except psycopg.Error as exc:
            logger.warning(
                "consent receipts: PostgreSQL at %s is not reachable at startup (%s); receipts wait in the local queue",
                self.where,
                type(exc).__name__,
            )
            self._retry_delay = 0.5
        self._wake.set()  # receipts left queued by an earlier run go first
        while not self._stop.is_set():
            self._wake.wait(timeout=max(self._retry_delay, 0.5))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
                self._retry_delay = 0.0
            except (psycopg.Error, OSError, sqlite3.Error) as exc:
                if self._retry_delay == 0.0:
                    logger.warning(
                        "consent receipts wait in the local queue: PostgreSQL at %s failed (%s); retrying",
                        self.where,
                        type(exc).__name__,
                    )
                self._retry_delay = min(max(self._retry_delay * 2, 0.5), 10.0)

    # --------------------------------------------------------------------------------------------- reading

    def _rows(self) -> Iterator[tuple[int, Any, Any, Any]]:
        after = 0
        with psycopg.connect(self.url, connect_timeout=_CONNECT_TIMEOUT) as conn:
            while True:
                page = conn.execute(
                    "SELECT seq, record, prev_hash, hash FROM consent_receipts WHERE seq > %s ORDER BY seq LIMIT %s",
                    (after, _PAGE_ROWS),
                ).fetchall()
                if not page:
                    return
                for seq, record_json, prev_hash, digest in page:
                    yield int(seq), record_json, prev_hash, digest
                after = int(page[-1][0])

    def head(self) -> tuple[int, str]:
        with psycopg.connect(self.url, connect_timeout=_CONNECT_TIMEOUT) as conn:
            row = conn.execute("SELECT seq, hash FROM consent_receipts ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)

    def export(self, out: TextIO) -> int:
        count = 0
        for seq, record_json, prev_hash, digest in self._rows():
            try:
                record: Any = json.loads(record_json)
            except ValueError:
                record = record_json
            line = {"seq": seq, "record": record, "prev_hash": prev_hash, "hash": digest}
            out.write(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n")
            count += 1
        return count

    def verify(self) -> VerifyResult:
        # seq is assigned under the append lock as head + 1, so the rows must be exactly 1..n: a gap is a deletion.
        return check_chain(self._rows())

    def import_rows(self, rows: Iterable[tuple[str, str]]) -> int:
        """Append ``(receipt_id, record_json)`` rows directly (``gateway consent migrate``); ids already present are
        skipped, so an interrupted migration can run again."""
        batch: list[tuple[str, str]] = []
        count = 0
        with psycopg.connect(self.url, connect_timeout=_CONNECT_TIMEOUT) as conn:
            _ensure_schema(conn)
            for row in rows:
                batch.append(row)
                if len(batch) >= _PAGE_ROWS:
                    _append_rows(conn, batch)
                    count += len(batch)
                    batch = []
            if batch:
                _append_rows(conn, batch)
                count += len(batch)
        return count

    def close(self, timeout: float = 2.0) -> None:
        """Stop the background thread after one last attempt to move what is queued (the rest stays queued)."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None
            if self._queue is not None and self._retry_delay == 0.0:
                with contextlib.suppress(psycopg.Error, OSError, sqlite3.Error):
                    self.flush()
        with self._conn_lock:
            self._drop_connection()
        if self._queue is not None:
            self._queue.close()
            self._queue = None
