"""Deliverer mode (issue 13): what a request worker pays per event, and what the deliverer pays per delivered event.

    python -m benchmarks.bench_handoff [--events 10000] [--compiled] [--json]

1. **Request worker.** Page-view events are submitted at a steady 2,000 events/s (20 every 10 ms, as a busy
   worker would) and this process's CPU time (every thread: the loop and the handoff's writer) is measured until
   all of them are written. Rows: the in-process :class:`~gateway.delivery.dispatcher.Dispatcher` delivering to a local
   collector (today's single-process mode), the :class:`~gateway.delivery.handoff.Handoff` to the host spool with
   Plausible, and with Plausible + GA4, and the same producer with no destinations at all (a submit that does
   nothing). CPU added per event = a row's CPU per event minus the no-destination row's.
2. **Deliverer.** The host spool is filled by a handoff (not measured), then a host-mode Dispatcher delivers every
   row to a local collector (``benchmarks.apps:collector_app`` under uvicorn, its own process); CPU per delivered
   event = this process's CPU time / events. Plausible (one event per request) and GA4 (200 visitors, 25 events
   each, so requests carry up to 25 events: the Measurement Protocol's batch).

Each row runs in a fresh subprocess of this module so that caches, threads and the allocator of one row do not
help or hurt another. ``--compiled`` runs every row a second time in the mypyc-compiled copy, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CLIENT_ADDRESS, REQUEST_HEADERS
from benchmarks.compiled import compiled_build_if_asked, loaded_extension_modules, subprocess_env
from benchmarks.macro import start_uvicorn
from gateway.config import Settings, load_settings
from gateway.delivery.books import read_host_stats
from gateway.delivery.dispatcher import Dispatcher
from gateway.delivery.handoff import Handoff
from gateway.events import PAGEVIEW, Event
from gateway.sinks.factory import build_sinks

__all__ = ["run"]

RATE_BATCH: Final = 20  # events per 10 ms: 2,000 events/s
TICK: Final = 0.01
GA4_VISITORS: Final = 200
_USER_AGENT: Final = dict(REQUEST_HEADERS)["User-Agent"]
WORKER_ROWS: Final = ("none", "in_process", "handoff_plausible", "handoff_both")
DELIVERER_ROWS: Final = ("deliver_plausible", "deliver_ga4")


def _event(index: int, visitors: int = 0) -> Event:
    """A page view as the middleware builds it; ``visitors`` > 0: that many distinct browsers (GA4 clients)."""
    agent = f"{_USER_AGENT} v{index % visitors}" if visitors else _USER_AGENT
    return Event(
        name=PAGEVIEW,
        url=f"https://bench.example/downloads/release/python-3{index % 100}/?utm_source=bench&email=x%40y.org",
        referrer="https://www.google.com/",
        title="Download Python | Python.org",
        language="en-gb",
        user_agent=agent,
        country="GB",
        ip=CLIENT_ADDRESS.rsplit(".", 1)[0] + ".0",
        granted=frozenset({"analytics"}),
    )


def _settings(directory: Path, collector: str, destinations: tuple[str, ...], mode: str) -> Settings:
    tables: dict[str, Any] = {
        "plausible": {
            "kind": "plausible", "endpoint": f"{collector}/api/event", "domain": "bench.example", "requires": [],
        },
        "ga4": {
            "kind": "ga4", "endpoint": f"{collector}/mp/collect", "measurement_id": "G-BENCH0001",
            "api_secret": "bench-secret-not-real", "requires": ["analytics"], "client_id": "pseudonym",
        },
    }  # fmt: skip
    return load_settings(
        environ={},
        overrides={
            "consent": {"receipts": "", "secret_keys": ["bench-handoff-key-" + "h" * 32]},
            "spool": {"path": str(directory / "spool.sqlite3"), "max_rows": 1_000_000, "max_bytes": 2**31},
            "dispatch": {"mode": mode},
            "destinations": {name: tables[name] for name in destinations},
        },
    )


async def _produce(submit: Any, events: int) -> None:
    """``events`` page views at 2,000/s; the Event objects are built here (the request path's share, in both)."""
    sent = 0
    while sent < events:
        for _ in range(min(RATE_BATCH, events - sent)):
            submit(_event(sent))
            sent += 1
        await asyncio.sleep(TICK)


async def _worker_row(row: str, directory: Path, collector: str, events: int) -> dict[str, Any]:
    destinations = {"none": (), "in_process": ("plausible",), "handoff_plausible": ("plausible",)}.get(
        row, ("plausible", "ga4")
    )
    settings = _settings(
        directory, collector, destinations, "in_process" if row in ("none", "in_process") else "deliverer"
    )
    sinks = build_sinks(settings)
    delivery: Dispatcher | Handoff
    delivery = (
        Handoff(sinks, settings)
        if settings.dispatch.mode == "deliverer"
        else Dispatcher(sinks, settings.dispatch, settings.spool)
    )
    await delivery.start()
    await _produce(delivery.submit, 200)  # warm-up: connections, caches
    if isinstance(delivery, Dispatcher):
        await delivery.wait_idle(10.0)
    else:
        await asyncio.sleep(0.1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await _produce(delivery.submit, events)
    if isinstance(delivery, Dispatcher):
        await delivery.wait_idle(30.0)
        done = delivery.stats()["plausible"]["delivered"] - 200 if destinations else events
    else:
        await delivery.stop()  # writes what is left
        done = events
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if isinstance(delivery, Dispatcher):
        await delivery.stop()
    return {"row": row, "events": events, "done": done, "cpu_us_per_event": 1e6 * cpu / events, "seconds": wall}


async def _deliverer_row(row: str, directory: Path, collector: str, events: int) -> dict[str, Any]:
    destination = "plausible" if row == "deliver_plausible" else "ga4"
    settings = _settings(directory, collector, (destination,), "deliverer")
    visitors = GA4_VISITORS if destination == "ga4" else 0
    handoff = Handoff(build_sinks(settings), settings)
    await handoff.start()
    for index in range(events):
        handoff.submit(_event(index, visitors))
    await handoff.stop()
    dispatcher = Dispatcher(build_sinks(settings), settings.dispatch, settings.spool, host=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await dispatcher.start()
    while dispatcher.stats()[destination]["spool_rows"] > 0:  # cheap: the books' count from the last tick
        await asyncio.sleep(0.02)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await dispatcher.stop()
    stats = read_host_stats(settings.spool.path, [destination])[destination]
    return {
        "row": row,
        "events": events,
        "done": int(stats["delivered"]),
        "cpu_us_per_event": 1e6 * cpu / max(1, stats["delivered"]),
        "events_per_s": stats["delivered"] / wall,
        "seconds": wall,
    }


def _one(row: str, collector: str, events: int) -> dict[str, Any]:
    import uvloop

    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as tmp:
        directory = Path(tmp)
        if row in WORKER_ROWS:
            result = uvloop.run(_worker_row(row, directory, collector, events))
        else:
            result = uvloop.run(_deliverer_row(row, directory, collector, events))
    result["compiled_modules"] = loaded_extension_modules()
    return result


def run(events: int, builds: dict[str, Path]) -> list[dict[str, Any]]:
    """Every row for every build (name -> checkout), each in a fresh process, against one collector; the builds
    alternate row by row, so a change in the machine's load hits both alike."""
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-handoff-collector-") as tmp:
        collector = start_uvicorn("collector", "benchmarks.apps:collector_app", Path(tmp), ready_path="/_count")
        try:
            for row in (*WORKER_ROWS, *DELIVERER_ROWS):
                for build, root in builds.items():
                    command = [sys.executable, "-m", "benchmarks.bench_handoff", "--row", row, "--collector",
                               collector.url, "--events", str(events)]  # fmt: skip
                    env = subprocess_env({"PYTHONPATH": str(root)})
                    done = subprocess.run(
                        command, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False
                    )
                    if done.returncode != 0:
                        raise RuntimeError(f"{row} ({build}) failed:\n{done.stdout}\n{done.stderr}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result["build"] = build
                    results.append(result)
        finally:
            collector.stop()
    for build in builds:
        none = next(r for r in results if r["row"] == "none" and r["build"] == build)["cpu_us_per_event"]
        for result in results:
            if result["row"] in WORKER_ROWS and result["build"] == build:
                result["added_us_per_event"] = result["cpu_us_per_event"] - none
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--row", choices=(*WORKER_ROWS, *DELIVERER_ROWS))
    parser.add_argument("--collector")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="also measure the mypyc-compiled build")
    parser.add_argument("--compiled-dir", type=Path, help="build the compiled copy here and reuse it next time")
    args = parser.parse_args()
    if args.row:
        print(json.dumps(_one(args.row, args.collector, args.events)))
        return
    with contextlib.ExitStack() as stack:
        compiled = compiled_build_if_asked(
            stack, args.compiled, args.compiled_dir, lambda text: print(text, file=sys.stderr)
        )
        builds = {"pure Python": Path(__file__).resolve().parents[1]}
        if compiled is not None and compiled.root is not None:
            builds["compiled"] = compiled.root
        results = run(args.events, builds)
    if args.json:
        print(json.dumps(results))
        return
    for result in results:
        added = result.get("added_us_per_event")
        extra = f"  (+{added:.1f} µs over no destinations)" if added is not None else ""
        rate = f"  {result['events_per_s']:,.0f} events/s" if "events_per_s" in result else ""
        print(
            f"{result['build']:<12} {result['row']:<18} {result['cpu_us_per_event']:7.1f} µs CPU/event{extra}{rate}"
            f"  done {result['done']}"
        )


if __name__ == "__main__":
    main()
