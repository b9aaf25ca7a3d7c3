"""The CI load test (issue 7, item 2): ``gateway serve`` as a real process, a fixed request count, 127.0.0.1 only.

Processes: the peers (local upstream site + Plausible and GA4 collectors, :mod:`tests.load.collectors`), the gateway
(``python -m gateway serve --config FILE``) and this test, which sends the seeded traffic mix
(:mod:`tests.load.traffic`) and samples the gateway's RSS meanwhile. Afterwards it waits until the gateway's books
show an outcome for every accepted event, reads its counters, stops it with SIGTERM (it must exit 0), and fails on:
any 5xx or connection error, any payload a collector rejected, any canary (full client IP, e-mail, token, session,
bearer) in a collector's records, the upstream's headers or the gateway's log, any accounting mismatch, or RSS
that keeps growing after warm-up. Throughput and latency are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.load.checker import (
    RssSample,
    accounting_rows,
    check_accounting,
    check_canaries,
    check_collector_problems,
    check_log,
    check_memory,
    check_statuses,
    format_report,
    latency_summary,
    outcomes_settled,
    parse_metrics,
)
from tests.load.collectors import PeerRecords
from tests.load.traffic import ALLOWED_PROPS, CUSTOM_EVENTS, Destination, Progress, TrafficRun, run_traffic
from tests.servers import free_port, run_server, wait_for_port

REQUESTS = 4000  # fixed request count
CONCURRENCY = 32
LOAD_SECONDS = 60.0  # hard bound on the load phase; whatever is not sent by then is not sent
DRAIN_STALL_SECONDS = 5.0  # give up waiting for the books to settle when nothing moved for this long
DRAIN_MAX_SECONDS = 45.0
RSS_INTERVAL = 0.1
DOMAIN = "load.example"
MEASUREMENT_ID = "G-LOADTEST1"
GA4_SECRET = "load-test-api-secret-not-real"
CONSENT_KEY = "load-test-consent-key-0123456789abcdefghij"  # 40 characters

CONFIG = """\
[server]
host = "127.0.0.1"
access_log = true
shutdown_timeout = 10.0

[upstream]
url = "http://127.0.0.1:{upstream_port}"

[client_ip]
trusted_proxies = ["127.0.0.1/32", "::1/128"]
headers = ["x-forwarded-for"]

[consent]
secret_keys = ["${{LOAD_CONSENT_KEY}}"]
receipts = "{tmp}/consent-receipts.sqlite3"

[site]
origins = ["http://127.0.0.1:{gateway_port}"]

[analytics]
custom_events = {custom_events}
allowed_props = {allowed_props}

[urls]
allowed_query_params = ["utm_source", "utm_medium", "utm_campaign"]

[destinations.plausible]
kind = "plausible"
endpoint = "http://127.0.0.1:{collector_port}/api/event"
domain = "{domain}"
requires = []
fields = ["name", "url", "referrer", "country", "user_agent", "ip", "props"]

[destinations.ga4]
kind = "ga4"
endpoint = "http://127.0.0.1:{collector_port}/mp/collect"
measurement_id = "{measurement_id}"
api_secret = "${{LOAD_GA4_SECRET}}"
requires = ["analytics"]
fields = ["name", "url", "referrer", "title", "country", "language", "user_agent", "ip", "props"]

[dispatch]
flush_interval = 0.1
shutdown_timeout = 5.0

[spool]
path = "{tmp}/spool.sqlite3"

[logging]
level = "info"
"""

DESTINATIONS = (
    Destination("plausible", frozenset()),
    Destination("ga4", frozenset({"analytics"}), needs_client_id=True),
)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, progress: Progress) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.progress = progress
        self.samples: list[RssSample] = []
        self.done = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.done.wait(RSS_INTERVAL):
            try:
                rss = rss_bytes(self.pid)
            except (OSError, RuntimeError):
                return  # the process is gone; the test reports it
            self.samples.append(RssSample(time.monotonic() - started, rss, self.progress.completed))


def settled_metrics(base_url: str) -> tuple[dict[str, dict[str, float]], float]:
    """The gateway's counters once every accepted event has an outcome, and how many events were still pending when
    the traffic stopped (delivery runs behind the pages, by design). Waits while the backlog shrinks; stops when it
    has not moved for DRAIN_STALL_SECONDS (the accounting check then reports what is stuck)."""
    started = time.monotonic()
    backlog = last_pending = -1.0
    last_progress = started
    with httpx.Client(base_url=base_url, trust_env=False, timeout=5.0) as client:
        while True:
            response = client.get("/_privacy/metrics")
            assert response.status_code == 200, response.text
            metrics = parse_metrics(response.text)
            pending = sum(row.get("pending", 0.0) for row in metrics.values())
            now = time.monotonic()
            if backlog < 0:
                backlog = pending
            if pending != last_pending:
                last_pending, last_progress = pending, now
            if (
                outcomes_settled(metrics)
                or now - last_progress > DRAIN_STALL_SECONDS
                or now - started > DRAIN_MAX_SECONDS
            ):
                return metrics, backlog
            time.sleep(0.1)


@pytest.mark.slow
def test_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    collector_port, upstream_port, gateway_port = free_port(), free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        CONFIG.format(
            upstream_port=upstream_port,
            gateway_port=gateway_port,
            collector_port=collector_port,
            tmp=tmp_path,
            domain=DOMAIN,
            measurement_id=MEASUREMENT_ID,
            custom_events=json.dumps(list(CUSTOM_EVENTS)),
            allowed_props=json.dumps(list(ALLOWED_PROPS)),
        )
    )
    peers_args = ["tests.load.collectors", "--collector-port", str(collector_port), "--upstream-port",
                  str(upstream_port), "--domain", DOMAIN, "--measurement-id", MEASUREMENT_ID,
                  "--api-secret-env", "LOAD_GA4_SECRET"]  # fmt: skip
    gateway_args = ["gateway", "serve", "--config", str(config), "--port", str(gateway_port)]
    env = {"LOAD_GA4_SECRET": GA4_SECRET, "LOAD_CONSENT_KEY": CONSENT_KEY}

    phases: dict[str, float] = {}
    clock = time.monotonic()
    with run_server(peers_args, collector_port, tmp_path / "peers.log", env=env) as peers:
        wait_for_port(upstream_port, peers.process)
        with run_server(gateway_args, gateway_port, tmp_path / "gateway.log", env=env) as gateway:
            phases["start"], clock = time.monotonic() - clock, time.monotonic()
            progress = Progress()
            sampler = RssSampler(gateway.process.pid, progress)
            sampler.start()
            try:
                run: TrafficRun = asyncio.run(
                    run_traffic(
                        gateway.url,
                        DESTINATIONS,
                        requests=REQUESTS,
                        concurrency=CONCURRENCY,
                        deadline=LOAD_SECONDS,
                        domain=DOMAIN,
                        progress=progress,
                    )
                )
            finally:
                sampler.done.set()
                sampler.join()
            phases["load"], clock = time.monotonic() - clock, time.monotonic()
            metrics, backlog = settled_metrics(gateway.url)
            phases["drain"], clock = time.monotonic() - clock, time.monotonic()
            exit_code = gateway.stop()
            phases["stop"], clock = time.monotonic() - clock, time.monotonic()
            gateway_log = gateway.output()
        records: PeerRecords = httpx.get(f"http://127.0.0.1:{collector_port}/_records", trust_env=False).json()
        peers_log = peers.output()

    canaries = run.canaries.strings()
    collector = records["collector"]
    problems = [
        *check_statuses(run.results),
        *check_collector_problems(collector),
        *check_canaries(collector, canaries),
        *check_canaries(records["upstream"], run.canaries.ip_strings()),
        *check_log(gateway_log, canaries),
        *check_accounting(run.expected, collector, metrics),
        *check_memory(sampler.samples),
    ]
    if exit_code != 0:
        problems.append(f"gateway exited with {exit_code} after SIGTERM (expected 0)")
    if "Traceback" in peers_log:
        problems.append(f"the peers process failed:\n{peers_log[-2000:]}")
    rows = accounting_rows(run.expected, collector, metrics)
    report = format_report(
        latency_summary(run.results, run.seconds), rows, sampler.samples, problems, planned=run.planned
    )
    report += "\nphases: " + "   ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
    report += f"   (events pending in the gateway when the traffic stopped: {backlog:g})"
    # Warnings and errors the gateway logged: not failures by themselves, but the first place to look when one occurs.
    notable = [line for line in gateway_log.splitlines() if line.startswith(("WARNING", "ERROR")) or
               '"level":"warning"' in line or '"level":"error"' in line]  # fmt: skip
    if notable:
        report += f"\n\ngateway log: {len(notable)} warning/error line(s), the first:\n" + "\n".join(notable[:10])
    with capsys.disabled():
        print(report)
    assert not problems, report
