"""Many workers, one deliverer, one set of books (issue 13), with real processes.

``gateway serve --workers 3`` in front of a local site, delivering to a recording Plausible collector:

1. A burst of page views spread over the workers: every scrape of ``/metrics`` (whichever worker answers) and
   ``gateway status`` show the same host totals, equal to what the collector received.
2. SIGKILL one request worker mid-burst, then (separately) the deliverer mid-burst: after the restarts every accepted
   event is delivered exactly once or counted as ambiguous, none twice, and the books balance.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.delivery.books import read_host_stats
from tests.load.checker import parse_metrics
from tests.load.collectors import CollectorRecord
from tests.servers import REPO, Server, free_port, run_server
from tests.test_delivery_e2e import BROWSER, DOMAIN, Ports, peer, write_config

WORKERS: Final = 3
BURST: Final = 150
CONCURRENCY: Final = 6
OUTCOMES: Final = (
    "delivered", "dropped_policy", "dropped_destination", "dropped_overflow", "dropped_expired", "dead_lettered",
    "ambiguous",
)  # fmt: skip
# A killed request worker loses what it had not yet handed off: the page views of its last handoff interval
# (10 ms) that it was still holding. CONCURRENCY requests are in flight at most, a third of them on that worker.
LOST_TO_A_WORKER_KILL: Final = CONCURRENCY
# The collector records a request as soon as it has read it, then holds it this long before it answers: a kill right
# after the test saw a record always catches that request on the wire.
COLLECTOR_DELAY: Final = 0.3


def scrape(server: Server) -> tuple[dict[str, float], str]:
    """The host's plausible row and the worker that answered (a new connection each time, so any worker may)."""
    response = httpx.get(f"{server.url}/_privacy/metrics", trust_env=False, timeout=5.0)
    assert response.status_code == 200, response.text
    workers = {
        line.split('worker="', 1)[1].split('"', 1)[0]
        for line in response.text.splitlines()
        if line.startswith("gateway_handoff_handed_off_total{")
    }
    assert len(workers) == 1, workers
    return parse_metrics(response.text)["plausible"], workers.pop()


def collected(collector: Server) -> collections.Counter[str]:
    records: list[CollectorRecord] = httpx.get(f"{collector.url}/_records", trust_env=False, timeout=5.0).json()[
        "collector"
    ]
    plausible = [record for record in records if record["destination"] == "plausible"]
    assert not [record["problems"] for record in plausible if record["problems"]]
    return collections.Counter(urlsplit(json.loads(record["body"])["url"]).path for record in plausible)


def balanced(row: dict[str, float]) -> bool:
    outcomes = sum(row.get(key, 0.0) for key in OUTCOMES)
    policy = sum(value for key, value in row.items() if key.startswith("dropped_policy["))
    return row["accepted"] == outcomes + policy + row["pending"]


def burst(server: Server, paths: Sequence[str], during: Callable[[], None] | None = None) -> set[str]:
    """GET every path (a new connection each, so the kernel spreads them over the workers); the paths answered 200.

    ``during`` runs once a third of the paths were answered (the kill).
    """
    answered: set[str] = set()
    lock = threading.Lock()
    fired = threading.Event()

    def get(path: str) -> None:
        try:
            response = httpx.get(f"{server.url}{path}", headers={"user-agent": BROWSER}, trust_env=False, timeout=10.0)
        except httpx.HTTPError:
            return  # cut off by the kill
        if response.status_code == 200:
            with lock:
                answered.add(path)
                ready = len(answered) >= len(paths) // 3 and not fired.is_set()
                if ready:
                    fired.set()
            if ready and during is not None:
                during()

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(get, paths))
    return answered


def settle(server: Server, timeout: float = 30.0) -> dict[str, float]:
    """Scrape until nothing is pending and the totals stopped moving for a second."""
    deadline = time.monotonic() + timeout
    last: dict[str, float] | None = None
    while time.monotonic() < deadline:
        row, _ = scrape(server)
        if row["pending"] == 0 and row == last:
            return row
        last = row if row["pending"] == 0 else None
        time.sleep(0.5)
    raise AssertionError(f"the books did not settle: {last}")


def children(pid: int) -> dict[int, str]:
    """Child process id -> command line."""
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    result: dict[int, str] = {}
    for line in out.stdout.splitlines():
        child, _, args = line.strip().partition(" ")
        result[int(child)] = args
    return result


def deliverer_pid(server: Server) -> int:
    (pid,) = [pid for pid, args in children(server.process.pid).items() if "gateway deliver" in args]
    return pid


def worker_pids(server: Server) -> list[int]:
    return [pid for pid, args in children(server.process.pid).items() if "spawn_main" in args]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: Callable[[], object] = str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what()}"
        time.sleep(0.1)


@pytest.mark.slow
def test_workers_share_one_deliverer_and_one_set_of_books(tmp_path: Path) -> None:
    ports = Ports(free_port(), free_port(), free_port())
    config = write_config(tmp_path, ports)
    args = ["gateway", "serve", "--config", str(config), "--port", str(ports.gateway), "--workers", str(WORKERS)]
    slow = {"COLLECTOR_DELAY_SECONDS": str(COLLECTOR_DELAY)}
    with (
        peer("upstream_app", ports.upstream, tmp_path / "upstream.log"),
        peer("collector_app", ports.collector, tmp_path / "collector.log", env=slow) as collector,
        run_server(args, ports.gateway, tmp_path / "gateway.log") as gateway,
    ):
        wait_for(lambda: len(worker_pids(gateway)) == WORKERS, what=lambda: children(gateway.process.pid))
        deliverer = deliverer_pid(gateway)

        # 1. One burst, one set of books whichever worker answers.
        first = burst(gateway, [f"/p/first-{i}" for i in range(BURST)])
        assert len(first) == BURST
        row = settle(gateway)
        paths = collected(collector)
        assert set(paths) == first and max(paths.values()) == 1
        seen: set[str] = set()
        for _ in range(20):
            again, worker = scrape(gateway)
            seen.add(worker)
            assert again == row
        assert len(seen) >= 2, f"every scrape went to one worker: {seen}"  # the scrapes did spread
        assert row["accepted"] == row["delivered"] == BURST and balanced(row), row
        status = subprocess.run(
            [sys.executable, "-m", "gateway", "status", "--url", gateway.url],
            capture_output=True, text=True, check=True, cwd=REPO,
        )  # fmt: skip
        delivered_line = [line.split() for line in status.stdout.splitlines() if line.startswith("delivered ")]
        assert delivered_line == [["delivered", str(BURST)]], status.stdout

        # 2. SIGKILL a request worker mid-burst; uvicorn starts a new one.
        victim = worker_pids(gateway)[0]
        second = burst(gateway, [f"/p/second-{i}" for i in range(BURST)], lambda: os.kill(victim, signal.SIGKILL))
        wait_for(lambda: victim not in worker_pids(gateway) and len(worker_pids(gateway)) == WORKERS)
        row = settle(gateway)
        paths = collected(collector)
        assert max(paths.values()) == 1, "an event was delivered twice"
        new = {path for path in paths if path.startswith("/p/second-")}
        assert new <= second
        assert len(second - new) <= LOST_TO_A_WORKER_KILL, sorted(second - new)
        assert row["delivered"] == sum(paths.values()) == row["accepted"] - row["ambiguous"] and balanced(row), row
        assert row["ambiguous"] == 0, row  # the deliverer was not touched

        # 3. SIGKILL the deliverer mid-burst, while it is sending; the supervisor starts a new one.
        second_row = row
        with concurrent.futures.ThreadPoolExecutor(1) as background:
            sending = background.submit(burst, gateway, [f"/p/third-{i}" for i in range(BURST)])
            wait_for(lambda: sum(1 for path in collected(collector) if path.startswith("/p/third-")) >= 10)
            os.kill(deliverer, signal.SIGKILL)
            third = sending.result()
        wait_for(lambda: deliverer_pid(gateway) != deliverer)
        row = settle(gateway)
        paths = collected(collector)
        assert max(paths.values()) == 1, "an event was delivered twice"
        new = {path for path in paths if path.startswith("/p/third-")}
        assert new <= third
        accepted = row["accepted"] - second_row["accepted"]
        assert accepted == len(third), row  # the workers lost nothing: they only wrote to the spool
        ambiguous = row["ambiguous"]
        assert ambiguous >= 1, row  # it died with requests on the wire: counted, not sent again
        # Every accepted event arrived exactly once, or was on the wire when the deliverer died (ambiguous: it may
        # have arrived, and is not sent again).
        assert len(third - new) <= ambiguous, (sorted(third - new), row)
        assert row["delivered"] + ambiguous >= sum(paths.values()) >= row["delivered"], row
        assert balanced(row), row

        # A clean stop: exit code 0, the workers and the deliverer gone, nothing left behind in the spool.
        last_deliverer = deliverer_pid(gateway)
        assert gateway.stop() == 0
        assert not _alive(last_deliverer)
    assert read_host_stats(str(tmp_path / "spool.sqlite3"), ["plausible"])["plausible"]["spool_rows"] == 0
    assert "deliverer exited with -9; restarting" in gateway.output()
    assert "Traceback" not in gateway.output()


@pytest.mark.slow
def test_django_under_gunicorn_with_the_deliverer_as_a_sidecar(tmp_path: Path) -> None:
    """The middleware in someone else's server: gunicorn, two uvicorn workers, ``gateway deliver`` beside them."""
    ports = Ports(free_port(), free_port(), free_port())
    config = write_config(tmp_path, ports)
    text = config.read_text().replace("[dispatch]\n", '[dispatch]\nmode = "deliverer"\n', 1)
    config.write_text(text)
    env = {"GATEWAY_CONFIG_FILE": str(config), "COLLECTOR_DOMAIN": DOMAIN}
    gunicorn = [
        sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "2",
        "-b", f"127.0.0.1:{ports.gateway}", "--graceful-timeout", "10", "tests.apps.django_site:application",
    ]  # fmt: skip
    deliver = ["gateway", "deliver", "--config", str(config)]
    with (
        peer(
            "collector_app",
            ports.collector,
            tmp_path / "collector.log",
            env={"COLLECTOR_DELAY_SECONDS": str(COLLECTOR_DELAY)},
        ) as collector,
        run_server(gunicorn, ports.gateway, tmp_path / "gunicorn.log", env=env, python_module=False) as site,
    ):
        sidecar_log = tmp_path / "deliver-1.log"
        sidecar = start_sidecar(deliver, sidecar_log)
        try:
            wait_for(lambda: len(children(site.process.pid)) == 2)

            first = burst(site, [f"/p/first-{i}/" for i in range(BURST)])
            assert len(first) == BURST
            row = settle(site)
            paths = collected(collector)
            assert set(paths) == first and max(paths.values()) == 1
            seen: set[str] = set()
            for _ in range(20):
                again, worker = scrape(site)
                seen.add(worker)
                assert again == row
            assert len(seen) == 2, seen
            assert row["accepted"] == row["delivered"] == BURST and balanced(row), row

            # SIGKILL a gunicorn worker mid-burst; the arbiter starts another.
            victim = sorted(children(site.process.pid))[0]
            second = burst(site, [f"/p/second-{i}/" for i in range(BURST)], lambda: os.kill(victim, signal.SIGKILL))
            wait_for(lambda: victim not in children(site.process.pid) and len(children(site.process.pid)) == 2)
            row = settle(site)
            paths = collected(collector)
            assert max(paths.values()) == 1, "an event was delivered twice"
            new = {path for path in paths if path.startswith("/p/second-")}
            assert new <= second and len(second - new) <= LOST_TO_A_WORKER_KILL, sorted(second - new)
            assert row["delivered"] == sum(paths.values()) == row["accepted"] and balanced(row), row

            # SIGKILL the sidecar while it sends; start it again (what systemd's Restart=always does).
            before = row
            with concurrent.futures.ThreadPoolExecutor(1) as background:
                sending = background.submit(burst, site, [f"/p/third-{i}/" for i in range(BURST)])
                wait_for(lambda: sum(1 for path in collected(collector) if path.startswith("/p/third-")) >= 10)
                sidecar.kill()
                sidecar.wait()
                third = sending.result()
            sidecar_log = tmp_path / "deliver-2.log"
            sidecar = start_sidecar(deliver, sidecar_log)
            row = settle(site)
            paths = collected(collector)
            assert max(paths.values()) == 1, "an event was delivered twice"
            new = {path for path in paths if path.startswith("/p/third-")}
            assert row["accepted"] - before["accepted"] == len(third) and new <= third
            assert row["ambiguous"] >= 1 and len(third - new) <= row["ambiguous"], row
            assert row["delivered"] + row["ambiguous"] >= sum(paths.values()) >= row["delivered"], row
            assert balanced(row), row
        finally:
            sidecar.send_signal(signal.SIGTERM)
            assert sidecar.wait(20) == 0
    assert "Traceback" not in site.output() + sidecar_log.read_text()


def start_sidecar(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=REPO,
        )  # fmt: skip
