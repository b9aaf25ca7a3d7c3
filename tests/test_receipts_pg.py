"""The consent receipt log in a real PostgreSQL server: one chain for a fleet, append-only, never in the way.

The server is Debian's ``postgresql`` package, started by the fixture in a temp dir on 127.0.0.1 (tests/postgres.py).
Without its binaries the tests skip, except under CI, where .ci/run installs the package and a skip would hide a
missing install step.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from gateway.receipts import GENESIS_HASH, Receipt, ReceiptLog, chain_hash, open_receipt_log
from gateway.receipts_pg import PostgresReceiptLog
from tests.postgres import APP_PASSWORD, APP_ROLE, PostgresServer, postgres_bindir, running_postgres
from tests.servers import REPO, Server, free_port, run_server

if postgres_bindir() is None:
    if os.environ.get("CI"):
        raise RuntimeError("PostgreSQL binaries are missing: .ci/run must install Debian's postgresql package")
    pytest.skip("PostgreSQL server binaries not installed (Debian package: postgresql)", allow_module_level=True)

CONSENT_KEY = "pg-test-consent-key-0123456789abcdefghij"


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        server.admin(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}'")
        yield server


_databases = iter(range(1, 1000))


@pytest.fixture
def database(pg: PostgresServer) -> str:
    """A fresh database with the schema made by its owner and the gateway's role granted INSERT and SELECT only."""
    name = f"receipts_{next(_databases)}"
    pg.admin(f"CREATE DATABASE {name}")
    owner = PostgresReceiptLog(pg.url(database=name), "", drain=False)
    owner.import_rows([])  # creates the schema, as the owner
    pg.admin(f"GRANT SELECT, INSERT ON consent_receipts TO {APP_ROLE}", name)
    pg.admin(f"GRANT SELECT ON gateway_schema_version TO {APP_ROLE}", name)
    return name


def app_url(pg: PostgresServer, database: str) -> str:
    return pg.url(APP_ROLE, APP_PASSWORD, database)


def receipt(n: int, granted: bool = True) -> Receipt:
    return Receipt(f"cid-{n:04d}", {"analytics": granted}, "rev-1", 1_700_000_000 + n, "api", False)


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_appends_reach_postgres_as_one_chain_like_sqlites(pg: PostgresServer, database: str, tmp_path: Path) -> None:
    log = PostgresReceiptLog(app_url(pg, database), str(tmp_path / "queue.sqlite3"))
    sqlite = ReceiptLog(str(tmp_path / "same.sqlite3"))
    try:
        for n in range(25):
            log.append(receipt(n))
            sqlite.append(receipt(n))
        wait_for(lambda: log.backlog() == 0)
        assert log.verify().ok and log.verify().count == 25
        assert log.head() == sqlite.head()  # the same records give the same chain in both backends
        out = io.StringIO()
        assert log.export(out) == 25
        previous = GENESIS_HASH
        for line in out.getvalue().splitlines():  # anyone can re-check an export
            row = json.loads(line)
            record = json.dumps(row["record"], sort_keys=True, separators=(",", ":"))
            assert row["prev_hash"] == previous and row["hash"] == chain_hash(previous, record)
            previous = row["hash"]
    finally:
        log.close()
        sqlite.close()


def test_the_gateways_role_cannot_change_or_remove_a_receipt(pg: PostgresServer, database: str, tmp_path: Path) -> None:
    log = PostgresReceiptLog(app_url(pg, database), str(tmp_path / "queue.sqlite3"))
    for n in range(3):
        log.append(receipt(n))
    wait_for(lambda: log.backlog() == 0)
    log.close()
    with psycopg.connect(app_url(pg, database), autocommit=True) as conn:
        for statement in (
            "UPDATE consent_receipts SET record = '{}' WHERE seq = 1",
            "DELETE FROM consent_receipts WHERE seq = 3",
            "TRUNCATE consent_receipts",
            "DROP TABLE consent_receipts",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement.encode())
    # The owner is refused too: append-only is the table's own rule, not only a matter of grants.
    for statement in ("UPDATE consent_receipts SET record = '{}' WHERE seq = 1", "DELETE FROM consent_receipts"):
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            pg.admin(statement, database)
    assert pg.admin("SELECT count(*) FROM consent_receipts", database) == [(3,)]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )


def pg_config(tmp_path: Path, pg: PostgresServer, database: str, name: str = "gateway.toml") -> Path:
    config = tmp_path / name
    url = app_url(pg, database).replace(APP_PASSWORD, "${PG_TEST_PASSWORD}")
    config.write_text(
        f'[consent]\nsecret_keys = ["{CONSENT_KEY}"]\nreceipts = "{url}"\n'
        f'receipts_queue = "{tmp_path / name}.queue"\n[spool]\nenabled = false\n'
        '[site]\norigins = ["http://127.0.0.1"]\n'
    )
    return config


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        ("UPDATE consent_receipts SET record = replace(record, 'cid-0003', 'cid-9999') WHERE seq = 4", 4, "hash does"),
        ("DELETE FROM consent_receipts WHERE seq = 3", 3, "row 3 is missing"),
        ("UPDATE consent_receipts SET prev_hash = repeat('1', 64) WHERE seq = 2", 2, "prev_hash"),
    ],
)
def test_verify_reports_a_tampered_row_at_its_sequence_number(
    pg: PostgresServer, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tamper: str, first_bad: int,
    reason: str,
) -> None:  # fmt: skip
    log = PostgresReceiptLog(app_url(pg, database), str(tmp_path / "queue.sqlite3"))
    for n in range(6):
        log.append(receipt(n))
    wait_for(lambda: log.backlog() == 0)
    log.close()
    monkeypatch.setenv("PG_TEST_PASSWORD", APP_PASSWORD)
    config = pg_config(tmp_path, pg, database)
    intact = run_cli("consent", "verify", "--config", str(config))
    assert (intact.returncode, intact.stdout.strip()) == (0, "ok: 6 receipts, hash chain intact"), intact.stderr
    # Someone with the owner's rights switches the rule off to edit the log; verify still finds it.
    pg.admin(f"ALTER TABLE consent_receipts DISABLE TRIGGER USER; {tamper}", database)
    pg.admin("ALTER TABLE consent_receipts ENABLE TRIGGER USER", database)
    broken = run_cli("consent", "verify", "--config", str(config))
    assert broken.returncode == 1
    assert broken.stdout.startswith(f"TAMPERED: row {first_bad}: {reason}"), broken.stdout
    exported = run_cli("consent", "export", "--config", str(config))
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == (5 if "DELETE" in tamper else 6)


def test_database_down_loses_nothing_across_a_restart(pg: PostgresServer, database: str, tmp_path: Path) -> None:
    queue = str(tmp_path / "queue.sqlite3")
    log = PostgresReceiptLog(app_url(pg, database), queue)
    log.append(receipt(0))
    wait_for(lambda: log.backlog() == 0)
    pg.stop()
    try:
        started = time.monotonic()
        for n in range(1, 6):
            log.append(receipt(n))  # the choice is recorded on this host at once, database or not
        assert time.monotonic() - started < 1.0
        assert log.backlog() == 5
        log.close()  # the process ends while the database is away
        log = PostgresReceiptLog(app_url(pg, database), queue)
        assert log.backlog() == 5
        log.append(receipt(6))
    finally:
        pg.start()
    wait_for(lambda: log.backlog() == 0)
    log.close()
    rows = pg.admin("SELECT seq, record FROM consent_receipts ORDER BY seq", database)
    records = [json.loads(str(record)) for _, record in rows]
    assert [r["cid"] for r in records] == [f"cid-{n:04d}" for n in range(7)]  # every one, once, in order
    assert [r["ts"] for r in records] == [1_700_000_000 + n for n in range(7)]  # with their original time
    assert PostgresReceiptLog(app_url(pg, database), "", drain=False).verify().ok


def test_a_full_local_queue_refuses_instead_of_growing(pg: PostgresServer, database: str, tmp_path: Path) -> None:
    pg.stop()
    try:
        log = PostgresReceiptLog(app_url(pg, database), str(tmp_path / "q.sqlite3"), queue_max=3)
        for n in range(3):
            log.append(receipt(n))
        with pytest.raises(OSError, match="queue is full"):
            log.append(receipt(3))
        log.close()
    finally:
        pg.start()


def test_migrate_from_sqlite_keeps_the_chain_and_can_run_again(
    pg: PostgresServer, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "old.sqlite3"
    old = ReceiptLog(str(source))
    for n in range(12):
        old.append(receipt(n, granted=n % 2 == 0))
    head = old.head()
    old.close()
    monkeypatch.setenv("PG_TEST_PASSWORD", APP_PASSWORD)
    config = pg_config(tmp_path, pg, database)
    for _ in range(2):  # an interrupted or repeated migration adds nothing twice
        result = run_cli("consent", "migrate", "--config", str(config), "--from", f"sqlite:{source}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == (
            f"ok: 12 receipts from {source} verified and migrated; 12 receipts, hash chain intact"
        )
    assert PostgresReceiptLog(app_url(pg, database), "", drain=False).head() == head  # the same chain, hash for hash
    tampered = tmp_path / "tampered.sqlite3"
    bad = ReceiptLog(str(tampered))
    bad.append(receipt(1))
    bad.close()
    with sqlite3.connect(tampered) as db:
        db.execute("DROP TRIGGER receipts_no_update")
        db.execute("UPDATE receipts SET record = replace(record, 'cid', 'xid')")
    refused = run_cli("consent", "migrate", "--config", str(config), "--from", f"sqlite:{tampered}")
    assert refused.returncode == 1 and refused.stdout.startswith("TAMPERED: source row 1")


def test_open_receipt_log_picks_the_backend(pg: PostgresServer, database: str, tmp_path: Path) -> None:
    assert open_receipt_log("") is None
    sqlite = open_receipt_log(str(tmp_path / "r.sqlite3"))
    assert isinstance(sqlite, ReceiptLog)
    sqlite.close()
    fleet = open_receipt_log(app_url(pg, database), str(tmp_path / "q.sqlite3"))
    assert isinstance(fleet, PostgresReceiptLog)
    assert APP_PASSWORD not in repr(fleet)
    fleet.close()


# ----------------------------------------------------------------------------------------------------------------
# Three hosts, as real processes
# ----------------------------------------------------------------------------------------------------------------


def post_choices(server: Server, start: int, count: int) -> list[str]:
    """``count`` visitors choose through one gateway; their consent ids, read back from the signed cookie."""
    ids = []
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        for n in range(start, start + count):
            began = time.monotonic()
            response = client.post(
                "/_privacy/consent",
                json={"categories": {"analytics": n % 3 != 0}},
                headers={"sec-fetch-site": "same-origin"},
            )
            assert response.status_code == 204, response.text
            assert time.monotonic() - began < 2.0  # never waits on the database
            state = client.get("/_privacy/consent", headers={"cookie": response.headers["set-cookie"].split(";")[0]})
            ids.append(state.json()["consent_id"])
    return ids


def backlog(server: Server) -> float:
    text = httpx.get(f"{server.url}/_privacy/metrics", trust_env=False, timeout=5).text
    for line in text.splitlines():
        if line.startswith("gateway_consent_receipts_backlog "):
            return float(line.split()[1])
    raise AssertionError("no backlog gauge in /metrics")


def test_three_gateways_one_chain_through_a_database_outage(pg: PostgresServer, database: str, tmp_path: Path) -> None:
    upstream_port = free_port()
    env = {"PG_TEST_PASSWORD": APP_PASSWORD}
    configs, ports = [], []
    for host in range(3):
        config = pg_config(tmp_path, pg, database, f"host{host}.toml")
        config.write_text(config.read_text() + f'[upstream]\nurl = "http://127.0.0.1:{upstream_port}"\n')
        configs.append(config)
        ports.append(free_port())

    def start(host: int) -> contextlib.AbstractContextManager[Server]:
        args = ["gateway", "serve", "--config", str(configs[host]), "--port", str(ports[host])]
        return run_server(args, ports[host], tmp_path / f"host{host}.log", env=env)

    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(start(host)) for host in range(3)]
        expected: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            for ids in pool.map(post_choices, servers, (0, 100, 200), (15, 15, 15)):
                expected += ids
            pg.stop()  # the database goes away mid-run: choices still take effect
            try:
                for ids in pool.map(post_choices, servers, (300, 400, 500), (10, 10, 10)):
                    expected += ids
                assert all(backlog(server) > 0 for server in servers)
                servers[1].stop(signal.SIGTERM)  # a host restarts while its receipts wait
            finally:
                pg.start()
            servers[1] = stack.enter_context(start(1))
            for ids in pool.map(post_choices, servers, (600, 700, 800), (10, 10, 10)):
                expected += ids
        wait_for(lambda: all(backlog(server) == 0 for server in servers), timeout=30)
    log = PostgresReceiptLog(app_url(pg, database), "", drain=False)
    result = log.verify()
    assert result.ok and result.count == len(expected) == 105
    out = io.StringIO()
    log.export(out)
    stored = [json.loads(line)["record"]["cid"] for line in out.getvalue().splitlines()]
    assert sorted(stored) == sorted(expected)  # every receipt, exactly once, in one chain
    for host in range(3):
        assert APP_PASSWORD not in (tmp_path / f"host{host}.log").read_text()


def test_the_schema_is_made_at_startup_and_versioned(pg: PostgresServer, tmp_path: Path) -> None:
    pg.admin("CREATE DATABASE fresh_startup")
    log = PostgresReceiptLog(pg.url(database="fresh_startup"), str(tmp_path / "q.sqlite3"))
    try:
        wait_for(lambda: pg.admin("SELECT to_regclass('consent_receipts') IS NOT NULL", "fresh_startup") == [(True,)])
        assert pg.admin("SELECT component, version FROM gateway_schema_version", "fresh_startup") == [
            ("consent_receipts", 1)
        ]
    finally:
        log.close()
