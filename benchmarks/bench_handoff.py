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

3. **Throughput** (``--wrk``): wrk against bare Starlette and the gateway middleware in front of it (one uvicorn
   worker, the page-view request of the middleware benchmark): no destinations; Plausible + GA4 delivered in
   process; and the same two destinations in deliverer mode, with ``gateway deliver`` beside the worker (its CPU is
   reported, not counted against the worker). Ratios to bare Starlette, interleaved runs, medians.

Each row runs in a fresh subprocess of this module so that caches, threads and the allocator of one row do not
help or hurt another. ``--compiled`` runs every row a second time in the mypyc-compiled copy, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dispatch import _event as dispatch_event
from benchmarks.common import REQUEST_HEADERS
from benchmarks.compiled import compiled_build_if_asked, loaded_extension_modules, subprocess_env
from benchmarks.macro import start_uvicorn
from gateway.config import Settings, load_settings
from gateway.delivery.books import read_host_stats
from gateway.delivery.dispatcher import Dispatcher
from gateway.delivery.handoff import Handoff
from gateway.events import Event
from gateway.sinks.factory import build_sinks

__all__ = ["run"]

RATE_BATCH: Final = 20  # events per 10 ms: 2,000 events/s
TICK: Final = 0.01
GA4_VISITORS: Final = 200
_USER_AGENT: Final = dict(REQUEST_HEADERS)["User-Agent"]
WORKER_ROWS: Final = ("none", "in_process", "handoff_plausible", "handoff_both")
DELIVERER_ROWS: Final = ("deliver_plausible", "deliver_ga4")


def _event(index: int, visitors: int = 0) -> Event:
    """bench_dispatch's page view, analytics granted; ``visitors`` > 0: that many distinct browsers (GA4 clients)."""
    event = dispatch_event(index)
    event.granted = frozenset({"analytics"})
    if visitors:
        event.user_agent = f"{_USER_AGENT} v{index % visitors}"
    return event


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


THROUGHPUT_LABELS: Final = {
    "starlette": "bare Starlette",
    "nodest": "gateway, no destinations",
    "in_process": "gateway, Plausible + GA4 delivered in process",
    "handoff": "gateway, Plausible + GA4 handed to the deliverer",
}


def run_throughput(
    wrk: str, builds: dict[str, Path], *, runs: int, seconds: float, warmup: float
) -> dict[str, dict[str, Any]]:
    """Middleware throughput per configuration and build (see the module docstring); medians over ``runs``."""
    from benchmarks.common import (
        PAGE_PATH,
        PAGE_QUERY,
        build_geo_database,
        cookie_header,
        gateway_settings,
        load,
        to_toml,
        write_wrk_script,
    )
    from benchmarks.macro import Config, Service, interleave

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-handoff-wrk-") as tmp:
        directory = Path(tmp)
        geo = build_geo_database(directory)
        services: list[Service] = []
        try:
            collector = start_uvicorn("collector", "benchmarks.apps:collector_app", directory, ready_path="/_count")
            services.append(collector)
            configs: list[Config] = []
            spools: dict[str, str] = {}
            reference = start_uvicorn("starlette", "benchmarks.apps:starlette_app", directory, ready_path=PAGE_PATH)
            services.append(reference)
            reference_script: Path | None = None
            for build, root in builds.items():
                for kind in ("nodest", "in_process", "handoff"):
                    name = f"{kind} ({build})"
                    sub = directory / f"{kind}-{build.replace(' ', '-')}"
                    sub.mkdir()
                    table = gateway_settings(
                        sub,
                        geo,
                        collector_url=None if kind == "nodest" else collector.url,
                        spool=kind != "in_process",
                        queue_size=1000 if kind == "in_process" else None,
                    )
                    if kind == "handoff":
                        # A bounded spool: what the deliverer cannot send during a run is counted as dropped_overflow,
                        # and the rest is drained (waited for) before the next run starts.
                        table["dispatch"] = {"mode": "deliverer"}
                        table["spool"]["max_rows"] = 20_000
                    config_path = sub / "gateway.toml"
                    config_path.write_text(to_toml(table), encoding="utf-8")
                    script = write_wrk_script(sub / "wrk.lua", cookie_header(load(config_path)))
                    reference_script = reference_script or script
                    env = {"BENCH_GATEWAY_CONFIG": str(config_path), "PYTHONPATH": str(root)}
                    server = start_uvicorn(
                        name, "benchmarks.apps:gateway_app", directory, env=env, ready_path=PAGE_PATH, cwd=root
                    )
                    services.append(server)
                    measured: tuple[Service, ...] = (server, collector)
                    if kind == "handoff":
                        deliverer = _start_deliverer(name, config_path, directory, root)
                        services.append(deliverer)
                        measured = (server, deliverer, collector)
                        spools[name] = str(table["spool"]["path"])
                    after = functools.partial(_drain, spools[name]) if kind == "handoff" else None
                    url = f"{server.url}{PAGE_PATH}?{PAGE_QUERY}"
                    configs.append(Config(name, THROUGHPUT_LABELS[kind], url, script, measured, after_run=after))
            assert reference_script is not None
            url = f"{reference.url}{PAGE_PATH}?{PAGE_QUERY}"
            configs.insert(0, Config("starlette", THROUGHPUT_LABELS["starlette"], url, reference_script, (reference,)))
            summaries = interleave(
                wrk, configs, runs=runs, seconds=seconds, warmup=warmup, progress=lambda t: print(t, file=sys.stderr)
            )
        finally:
            for service in reversed(services):
                service.stop()
    bare = summaries["starlette"].rps
    for name, summary in summaries.items():
        helpers = {
            key: statistics.median(run.cpu_s.get(key, 0.0) for run in summary.runs) for key in summary.runs[0].cpu_s
        }
        requests = statistics.median(run.requests for run in summary.runs)
        results[name] = {
            "rps": summary.rps,
            "ratio": summary.rps / bare,
            "cpu_us_per_request": {key: 1e6 * value / max(1, requests) for key, value in helpers.items()},
        }
    return results


def _start_deliverer(name: str, config: Path, directory: Path, root: Path) -> Any:
    from benchmarks.macro import Service

    log = directory / f"deliverer-{name.replace(' ', '-')}.log"
    env = subprocess_env({"PYTHONPATH": str(root)})
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "deliver", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root,
        )  # fmt: skip
    service = Service(f"deliverer {name}", process, 0, log)
    time.sleep(1.0)
    service.refresh_tree()
    return service


def _drain(path: str, timeout: float = 60.0) -> dict[str, float]:
    """After a run: wait until the deliverer has settled every row, so it steals no CPU from the next run."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while time.monotonic() < deadline:
        books = read_host_stats(path, ["plausible", "ga4"])
        if all(row["pending"] == 0 for row in books.values()):
            break
        time.sleep(0.2)
    totals = {f"{name}_{key}": row[key] for name, row in books.items() for key in ("delivered", "dropped_overflow")}
    return {"drain_seconds": time.monotonic() - started, **totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--row", choices=(*WORKER_ROWS, *DELIVERER_ROWS))
    parser.add_argument("--collector")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="also measure the mypyc-compiled build")
    parser.add_argument("--compiled-dir", type=Path, help="build the compiled copy here and reuse it next time")
    parser.add_argument("--wrk", action="store_true", help="also the middleware throughput (needs wrk)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
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
        throughput: dict[str, dict[str, Any]] = {}
        if args.wrk:
            from benchmarks.macro import ensure_tools

            tools = ensure_tools()
            if tools.wrk is None:
                sys.exit(f"wrk is required: {tools.note}")
            throughput = run_throughput(tools.wrk, builds, runs=args.runs, seconds=args.duration, warmup=2.0)
    if args.json:
        print(json.dumps({"rows": results, "throughput": throughput}))
        return
    for name, row in throughput.items():
        cpu = ", ".join(f"{key} {value:.0f} µs" for key, value in row["cpu_us_per_request"].items())
        print(f"{name:<26} {row['rps']:9,.0f} req/s  {row['ratio']:.3f} of bare Starlette  CPU/request: {cpu}")
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
