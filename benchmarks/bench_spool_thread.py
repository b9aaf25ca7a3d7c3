"""The in-process dispatcher's spool calls on their thread, with the event loop's thread idle and busy.

    python -m benchmarks.bench_spool_thread [--calls 20] [--json]

The dispatcher runs every spool call on one thread so that SQLite never blocks a page (gateway/delivery/
spool_bridge.py). That thread shares the GIL with the event loop, and the sqlite3 module releases the GIL around each
step of a statement; when the loop is busy serving pages, getting it back can take up to the switch interval (5 ms).
A call's wall time on the thread is then set by how many trips into SQLite it makes, not by its work, which is why
the spool makes a constant number of them per call (tests/test_spool.py pins that). This prints, per call, the
median wall time with the main thread idle and with it running Python code without pause (a saturated loop).

What it shows is the spool thread's capacity under load: rows a second it can take off the dispatcher's overflow
while a destination is down, or lease and settle while a backlog drains.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import SpoolSettings
from gateway.sinks import Payload
from gateway.spool import Spool, SpoolRow

BODY = {"name": "pageview", "url": "https://www.python.org/downloads/", "domain": "www.python.org", "referrer": ""}


class Rows:
    def __init__(self) -> None:
        self.count = 0

    def make(self, count: int) -> list[SpoolRow]:
        rows = []
        for _ in range(count):
            self.count += 1
            now = time.time()
            payload = Payload("plausible", f"bench-{self.count}", BODY, (("user-agent", "Mozilla/5.0"),), "", now)
            rows.append(SpoolRow(payload, accepted_at=now, next_at=now))
        return rows


def calls(spool: Spool, rows: Rows) -> dict[str, Callable[[], object]]:
    leased: list[SpoolRow] = []

    def lease() -> None:
        leased[:] = spool.lease_due("plausible", time.time() + 1, 64)

    def lease_per_row() -> None:  # as a spool without few_trips reads (the deliverer's, which runs no thread)
        spool.few_trips = False
        try:
            leased[:] = spool.lease_due("plausible", time.time() + 1, 64)
        finally:
            spool.few_trips = True

    return {
        "put 128 rows (overflow to the spool)": lambda: spool.put(rows.make(128)),
        "put 1 row": lambda: spool.put(rows.make(1)),
        "lease 64 rows": lease,
        "release 64 rows (retry later)": lambda: spool.release(leased),
        "delete 64 rows (delivered)": lambda: spool.delete("plausible", [row.event_id for row in leased]),
        "lease 64 rows, a fetch per row": lease_per_row,
    }


def measure(spool: Spool, rows: Rows, repeats: int, busy: bool) -> dict[str, float]:
    stop = threading.Event()

    def spin() -> None:  # an event loop that always has a ready callback: never waits, never releases the GIL
        total = 0
        while not stop.is_set():
            for number in range(1000):
                total += number

    spinner = threading.Thread(target=spin) if busy else None
    results: dict[str, float] = {}
    if spinner:
        spinner.start()
    try:
        for name, call in calls(spool, rows).items():
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            results[name] = statistics.median(times) * 1000
    finally:
        stop.set()
        if spinner:
            spinner.join()
    return results


def run(repeats: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as directory:
        settings = SpoolSettings(path=f"{directory}/spool.sqlite3", max_rows=10**7, max_bytes=10**10)
        spool = Spool(settings, few_trips=True)  # as the in-process dispatcher opens it
        spool.open()
        try:
            rows = Rows()
            spool.put(rows.make(1000))  # a backlog to lease from
            idle = measure(spool, rows, repeats, busy=False)
            busy = measure(spool, rows, repeats, busy=True)
        finally:
            spool.close()
    return {name: {"idle_ms": idle[name], "busy_ms": busy[name]} for name in idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls of each kind per setting (median reported)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.calls)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'spool call on the spool thread':<40} {'loop idle':>10} {'loop busy':>10}  (median wall ms)")
    for name, row in results.items():
        print(f"{name:<40} {row['idle_ms']:10.2f} {row['busy_ms']:10.2f}")


if __name__ == "__main__":
    main()
