"""Proof of consent: an append-only, hash-chained SQLite log of every change of choice.

GDPR Art 7(1) puts the burden of proof on the controller ("shall be able to demonstrate that the data subject has
consented"); the CNIL asks that consent be provable at any time (security.md §3). Each receipt records *what* was
chosen, under *which* policy revision, *when* and *how* (banner form, JSON API, withdrawal), keyed by the random
consent id that is also in the visitor's cookie. It never records an IP address, a user agent or anything else
about the visitor: the consent id is the only link, and only the visitor's own browser holds it.

Tamper evidence: row *n* stores ``hash_n = sha256(hash_{n-1} || canonical_json(record_n))`` (hex; ``hash_0`` is 64
zeros), so editing, inserting or deleting a row breaks every later link and :meth:`ReceiptLog.verify` reports the
first bad row. SQLite triggers also refuse UPDATE and DELETE so nobody changes a row by accident. Someone with
write access to the file can still rewrite the whole chain; anchor :meth:`ReceiptLog.head` somewhere else (logs,
a ticket, a timestamping service) now and then if that matters.

Writes are small WAL transactions, run by the API handler in a worker thread (``anyio.to_thread``): an append
itself is tens of microseconds, but a WAL checkpoint or fsync on a slow disk can take milliseconds or more, and that
must never stall other requests on the event loop. ``BEGIN IMMEDIATE`` reads the previous hash and inserts in one
transaction, so several worker processes can share one file without forking the chain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TextIO

from gateway.consent import ConsentChoice

__all__ = [
    "GENESIS_HASH",
    "METHODS",
    "Receipt",
    "ReceiptLog",
    "ReceiptStore",
    "VerifyResult",
    "canonical_json",
    "chain_hash",
    "check_chain",
    "open_receipt_log",
    "valid_record",
]

GENESIS_HASH: Final = "0" * 64
METHODS: Final = ("banner", "api", "withdraw", "gpc")
Method = Literal["banner", "api", "withdraw", "gpc"]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS receipts (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    record    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS receipts_no_update BEFORE UPDATE ON receipts
BEGIN SELECT RAISE(ABORT, 'consent receipts are append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts
BEGIN SELECT RAISE(ABORT, 'consent receipts are append-only'); END;
"""
_PAGE_ROWS: Final = 1000
_RECORD_KEYS: Final = frozenset({"cid", "choices", "revision", "ts", "method", "gpc"})


@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    """One change of choice. Deliberately nothing about the visitor beyond the random consent id."""

    consent_id: str
    choices: Mapping[str, bool]
    revision: str
    issued_at: int  # unix seconds
    method: Method  # "banner" (no-JS form), "api" (JSON), "withdraw" (DELETE), "gpc" (signal-driven change)
    gpc: bool  # an opt-out signal was sent with the request that made the choice

    @classmethod
    def from_choice(cls, choice: ConsentChoice, method: Method) -> Receipt:
        return cls(choice.consent_id, choice.choices, choice.revision, choice.issued_at, method, choice.gpc)

    def record(self) -> dict[str, Any]:
        return {
            "cid": self.consent_id,
            "choices": dict(self.choices),
            "revision": self.revision,
            "ts": self.issued_at,
            "method": self.method,
            "gpc": self.gpc,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    count: int  # rows checked (up to the first bad one)
    first_bad_row: int | None = None  # the `seq` of the first row that fails, None when ok
    reason: str = ""


def canonical_json(record: Mapping[str, Any]) -> str:
    """The exact text that is hashed and stored: sorted keys, no spaces, ASCII only."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def chain_hash(prev_hash: str, record_json: str) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + record_json.encode("ascii")).hexdigest()


def check_chain(rows: Iterable[tuple[int, Any, Any, Any]]) -> VerifyResult:
    """Walk ``(seq, record_json, prev_hash, hash)`` rows in order from seq 1; the first row that does not check out.

    Shared by every backend (SQLite here, PostgreSQL in gateway.receipts_pg): the same rule proves both logs.
    """
    expected_prev = GENESIS_HASH
    count = 0
    expected_seq = 1
    for seq, record_json, prev_hash, digest in rows:
        reason = ""
        bad_row = seq
        if seq != expected_seq:
            reason, bad_row = f"row {expected_seq} is missing", expected_seq
        elif prev_hash != expected_prev:
            reason = "prev_hash does not match the previous row's hash"
        elif not isinstance(record_json, str) or chain_hash(prev_hash, record_json) != digest:
            reason = "hash does not match the record"
        else:
            try:
                record = json.loads(record_json)
            except ValueError:
                record = None
            if not valid_record(record) or canonical_json(record) != record_json:
                reason = "record is not a canonical receipt"
        if reason:
            return VerifyResult(False, count, bad_row, reason)
        count += 1
        expected_seq = seq + 1
        expected_prev = digest
    return VerifyResult(True, count)


def valid_record(record: object) -> bool:
    return (
        isinstance(record, dict)
        and record.keys() == _RECORD_KEYS
        and isinstance(record["cid"], str)
        and isinstance(record["revision"], str)
        and isinstance(record["ts"], int)
        and record["method"] in METHODS
        and isinstance(record["gpc"], bool)
        and isinstance(record["choices"], dict)
        and all(isinstance(v, bool) for v in record["choices"].values())
    )


class ReceiptLog:
    """Append-only, hash-chained receipt log in one SQLite file. Thread-safe; share one instance per process."""

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("ReceiptLog needs a path (an empty consent.receipts disables the log)")
        self.path = path
        if path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if not os.path.exists(path):
                # Consent ids are pseudonymous data: readable by the service user only.
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves. check_same_thread=False: appends run in worker
        # threads (anyio.to_thread); the lock serialises them.
        self._db: sqlite3.Connection | None = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=5.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before append() returns, and the cookie is only sent after that, so even a power
        # cut cannot leave a visitor with a choice the log cannot prove. (NORMAL is ~8x faster per append, but an
        # append runs in a worker thread on a rare request, so the extra fsync costs the event loop nothing.)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError("the receipt log is closed")
        return self._db

    def append(self, receipt: Receipt) -> str:
        """Append one receipt; return its chain hash. Raises sqlite3.Error/OSError when the disk fails."""
        record = receipt.record()
        if not valid_record(record):
            raise ValueError("malformed consent receipt")
        record_json = canonical_json(record)
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")  # take the write lock before reading the head: no forked chain
            try:
                row = db.execute("SELECT hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
                prev_hash = row[0] if row else GENESIS_HASH
                digest = chain_hash(prev_hash, record_json)
                db.execute(
                    "INSERT INTO receipts (record, prev_hash, hash) VALUES (?, ?, ?)", (record_json, prev_hash, digest)
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return digest

    def head(self) -> tuple[int, str]:
        """``(count, last hash)``: publish it elsewhere to make a wholesale rewrite of the file detectable."""
        with self._lock:
            db = self._connection()
            row = db.execute("SELECT seq, hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
            count = db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
        return (int(count), str(row[1])) if row else (0, GENESIS_HASH)

    def export(self, out: TextIO) -> int:
        """Write every receipt as one JSON line ``{"seq", "record", "prev_hash", "hash"}``; return the count.

        Anyone can re-check an export: ``hash == sha256(prev_hash + canonical_json(record))`` line by line.
        """
        count = 0
        for seq, record_json, prev_hash, digest in self._rows():
            try:
                record: Any = json.loads(record_json)
            except ValueError:
                record = record_json  # exported as found; verify() reports it
            line = {"seq": seq, "record": record, "prev_hash": prev_hash, "hash": digest}
            out.write(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n")
            count += 1
        return count

    def verify(self) -> VerifyResult:
        """Walk the chain from the first row; report the first row whose content or link does not check out."""
        result = check_chain(self._rows())
        if not result.ok:
            return result
        count = result.count
        # AUTOINCREMENT remembers the highest seq ever used, so deleting the newest rows shows up too.
        with self._lock:
            row = self._connection().execute("SELECT seq FROM sqlite_sequence WHERE name = 'receipts'").fetchone()
        highest = int(row[0]) if row else 0
        if highest != count:
            return VerifyResult(False, count, count + 1, f"rows after {count} are missing (highest seq {highest})")
        return VerifyResult(True, count)

    def rows(self) -> Iterator[tuple[int, Any, Any, Any]]:
        """Every row ``(seq, record_json, prev_hash, hash)`` in order (``gateway consent migrate`` copies them)."""
        return self._rows()

    def _rows(self) -> Iterator[tuple[int, Any, Any, Any]]:
        # Pages, each under the lock, so a long export or verify never holds up appends for long.
        after = 0
        while True:
            with self._lock:
                page = (
                    self._connection()
                    .execute(
                        "SELECT seq, record, prev_hash, hash FROM receipts WHERE seq > ? ORDER BY seq LIMIT ?",
                        (after, _PAGE_ROWS),
                    )
                    .fetchall()
                )
            if not page:
                return
            for seq, record_json, prev_hash, digest in page:
                yield int(seq), record_json, prev_hash, digest
            after = int(page[-1][0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class ReceiptStore(Protocol):
    """What the consent API and the command line need of a receipt log (SQLite or PostgreSQL)."""

    def append(self, receipt: Receipt) -> str: ...
    def head(self) -> tuple[int, str]: ...
    def export(self, out: TextIO) -> int: ...
    def verify(self) -> VerifyResult: ...
    def close(self) -> None: ...


def open_receipt_log(
    path: str, queue_path: str = "", *, queue_max: int = 100_000, drain: bool = True
) -> ReceiptStore | None:
    """The receipt log ``consent.receipts`` names: None when empty (disabled), PostgreSQL for a ``postgresql://``
    URL (with ``queue_path`` as its durable local queue; ``drain=False`` only reads), else a SQLite file."""
    if not path:
        return None
    if path.startswith(("postgresql://", "postgres://")):
        from gateway.receipts_pg import PostgresReceiptLog  # psycopg only when a fleet log is configured

        return PostgresReceiptLog(path, queue_path, queue_max=queue_max, drain=drain)
    return ReceiptLog(path)
