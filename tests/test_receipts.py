"""The proof-of-consent log: append-only, hash-chained, tamper-evident, nothing about the visitor but a random id."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.consent import ConsentManager
from gateway.receipts import GENESIS_HASH, Receipt, ReceiptLog, VerifyResult, open_receipt_log


def receipt(n: int, *, granted: bool = True, method: str = "api") -> Receipt:
    return Receipt(
        consent_id=f"consent-id-{n:012d}",
        choices={"analytics": granted},
        revision="2025-01-15",
        issued_at=1_700_000_000 + n,
        method=method,  # type: ignore[arg-type]
        gpc=n % 2 == 0,
    )


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "receipts.sqlite3"


@pytest.fixture
def log(log_path: Path) -> Iterator[ReceiptLog]:
    receipts = ReceiptLog(str(log_path))
    yield receipts
    receipts.close()


def fill(log: ReceiptLog, count: int) -> None:
    for n in range(1, count + 1):
        log.append(receipt(n, granted=n % 3 != 0, method=("api", "banner", "withdraw")[n % 3]))


def raw(path: Path) -> sqlite3.Connection:
    """A second, hostile connection that edits the file behind the log's back (after dropping the guards)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TRIGGER IF EXISTS receipts_no_update")
    db.execute("DROP TRIGGER IF EXISTS receipts_no_delete")
    return db


def test_every_append_is_stored_and_the_chain_verifies(log: ReceiptLog) -> None:
    assert log.verify() == VerifyResult(True, 0)
    fill(log, 10)
    assert log.verify() == VerifyResult(True, 10)
    count, head = log.head()
    assert count == 10 and len(head) == 64 and head != GENESIS_HASH


def test_export_is_independently_verifiable(log: ReceiptLog) -> None:
    fill(log, 5)
    out = io.StringIO()
    assert log.export(out) == 5
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
    # Re-derive the chain from the spec alone: sha256(prev_hash + canonical JSON of the record).
    previous = "0" * 64
    for n, line in enumerate(lines, start=1):
        canonical = json.dumps(line["record"], sort_keys=True, separators=(",", ":"))
        assert line["prev_hash"] == previous
        assert line["hash"] == hashlib.sha256((previous + canonical).encode()).hexdigest()
        previous = line["hash"]
        expected = receipt(n, granted=n % 3 != 0, method=("api", "banner", "withdraw")[n % 3])
        assert line["record"] == {
            "cid": expected.consent_id,
            "choices": {"analytics": expected.choices["analytics"]},
            "revision": "2025-01-15",
            "ts": expected.issued_at,
            "method": expected.method,
            "gpc": expected.gpc,
        }
    assert log.head() == (5, previous)


def test_receipt_from_a_choice_copies_the_choice() -> None:
    manager = ConsentManager(load_settings(overrides={"consent": {"secret_keys": ["k" * 32], "receipts": ""}}))
    choice = manager.make_choice({"analytics": True}, gpc=True)
    made = Receipt.from_choice(choice, "banner")
    assert made == Receipt(choice.consent_id, choice.choices, choice.revision, choice.issued_at, "banner", True)


def test_the_chain_continues_after_reopening(log_path: Path) -> None:
    first = ReceiptLog(str(log_path))
    fill(first, 3)
    first.close()
    second = ReceiptLog(str(log_path))
    second.append(receipt(4))
    assert second.verify() == VerifyResult(True, 4)
    second.close()


def test_update_and_delete_are_refused_by_the_database(log: ReceiptLog, log_path: Path) -> None:
    fill(log, 2)
    db = sqlite3.connect(log_path, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE receipts SET record = '{}' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM receipts WHERE seq = 2")
    db.close()
    assert log.verify().ok


def _edit_record(db: sqlite3.Connection, seq: int) -> None:
    record = json.loads(db.execute("SELECT record FROM receipts WHERE seq = ?", (seq,)).fetchone()[0])
    record["choices"]["analytics"] = not record["choices"]["analytics"]
    forged = json.dumps(record, sort_keys=True, separators=(",", ":"))
    db.execute("UPDATE receipts SET record = ? WHERE seq = ?", (forged, seq))


def _edit_and_rehash(db: sqlite3.Connection, seq: int) -> None:
    # A smarter forger recomputes this row's hash, which breaks the next row's link instead.
    _edit_record(db, seq)
    prev, record = db.execute("SELECT prev_hash, record FROM receipts WHERE seq = ?", (seq,)).fetchone()
    digest = hashlib.sha256((prev + record).encode()).hexdigest()
    db.execute("UPDATE receipts SET hash = ? WHERE seq = ?", (digest, seq))


def _insert_forged(db: sqlite3.Connection, seq: int) -> None:
    db.execute(
        "INSERT INTO receipts (record, prev_hash, hash) VALUES (?, ?, ?)",
        ('{"cid":"forged"}', GENESIS_HASH, hashlib.sha256(b"x").hexdigest()),
    )


def _reformat_record(db: sqlite3.Connection, seq: int) -> None:
    # Same meaning, different bytes, hash recomputed: the stored text must be the canonical form.
    prev, record = db.execute("SELECT prev_hash, record FROM receipts WHERE seq = ?", (seq,)).fetchone()
    pretty = json.dumps(json.loads(record), indent=1)
    db.execute(
        "UPDATE receipts SET record = ?, hash = ? WHERE seq = ?",
        (pretty, hashlib.sha256((prev + pretty).encode()).hexdigest(), seq),
    )


def _delete_row(db: sqlite3.Connection, seq: int) -> None:
    db.execute("DELETE FROM receipts WHERE seq = ?", (seq,))


def _delete_newest(db: sqlite3.Connection, seq: int) -> None:
    db.execute("DELETE FROM receipts WHERE seq > ?", (seq + 1,))


def _edit_link(db: sqlite3.Connection, seq: int) -> None:
    db.execute("UPDATE receipts SET prev_hash = hash WHERE seq = ?", (seq,))


Tamper = Callable[[sqlite3.Connection, int], None]


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        pytest.param(_edit_record, 3, "hash does not match", id="record-edited"),
        pytest.param(_edit_and_rehash, 4, "prev_hash", id="record-edited-and-rehashed"),
        pytest.param(_delete_row, 3, "missing", id="row-deleted"),
        pytest.param(_delete_newest, 5, "missing", id="newest-rows-deleted"),
        pytest.param(_insert_forged, 6, "prev_hash", id="row-appended-outside-the-log"),
        pytest.param(_edit_link, 3, "prev_hash", id="link-edited"),
        pytest.param(_reformat_record, 3, "canonical", id="record-reformatted"),
    ],
)
def test_tampering_in_sqlite_is_detected(
    log: ReceiptLog, log_path: Path, tamper: Tamper, first_bad: int, reason: str
) -> None:
    fill(log, 5)
    db = raw(log_path)
    tamper(db, 3)
    db.close()
    result = log.verify()
    assert not result.ok
    assert result.first_bad_row == first_bad
    assert result.count == first_bad - 1
    assert reason in result.reason


def test_parent_directories_are_created_and_the_file_is_private(log: ReceiptLog, log_path: Path) -> None:
    fill(log, 1)
    assert log_path.is_file()
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600


def test_concurrent_appends_from_threads_and_processes_keep_one_chain(log_path: Path) -> None:
    # Two ReceiptLog instances on one file stand in for two worker processes.
    logs = [ReceiptLog(str(log_path)), ReceiptLog(str(log_path))]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for n in range(25):
                logs[index % 2].append(receipt(index * 100 + n))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert logs[0].verify() == VerifyResult(True, 100)
    for receipts in logs:
        receipts.close()


def test_malformed_receipts_are_refused(log: ReceiptLog) -> None:
    bad = Receipt("id-000000000000000", {"analytics": "yes"}, "r", 1, "api", False)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="malformed"):
        log.append(bad)
    with pytest.raises(ValueError, match="malformed"):
        log.append(Receipt("id-000000000000000", {}, "r", 1, "sms", False))  # type: ignore[arg-type]
    assert log.verify() == VerifyResult(True, 0)


def test_empty_path_disables_the_log(tmp_path: Path) -> None:
    assert open_receipt_log("") is None
    with pytest.raises(ValueError):
        ReceiptLog("")
    opened = open_receipt_log(str(tmp_path / "r.sqlite3"))
    assert isinstance(opened, ReceiptLog)
    opened.close()


def test_closed_log_refuses_appends(log: ReceiptLog) -> None:
    log.close()
    log.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        log.append(receipt(1))


def test_receipts_hold_only_the_documented_fields(log: ReceiptLog, log_path: Path) -> None:
    log.append(receipt(1))
    columns = [row[1] for row in sqlite3.connect(log_path).execute("PRAGMA table_info(receipts)")]
    assert columns == ["seq", "record", "prev_hash", "hash"]
    out = io.StringIO()
    log.export(out)
    assert set(json.loads(out.getvalue())["record"]) == {"cid", "choices", "revision", "ts", "method", "gpc"}
