"""Dispatcher throughput: delivered events/s to a local Plausible-style collector, CPU per event, memory.

    python -m benchmarks.bench_dispatch [--duration 15] [--spool on|off] [--max-connections N] [--json]

One :class:`gateway.delivery.dispatcher.Dispatcher` with the real :class:`~gateway.sinks.plausible.PlausibleSink`
(one event per request, the default ``[dispatch]`` settings and the dispatcher's default transport) delivers to
:func:`benchmarks.apps.collector_app` (a raw ASGI app under uvicorn that reads each body and answers ``202``),
running as a separate process. The loop is uvloop, as under ``gateway serve``.

A producer keeps the queue topped up to a small depth (every sender busy, no event waiting long enough to be
spooled), so the figure is the dispatcher's sustained delivery rate, not a burst into memory. Reported:

- delivered events/s over the measured window (after a warm-up that opens the connections);
- CPU per delivered event: ``time.process_time()`` of this process (dispatcher, HTTP client, payload building, and the
  producer's Event construction, ~3 µs) divided by the events delivered; and the collector's CPU per event;
- memory: peak RSS (``ru_maxrss``); RSS growth over the second half of the measured pass; interpreter memory
  blocks (``sys.getallocatedblocks()``) still allocated after the measured pass minus before it, both with every
  event settled, per 1,000 events (a leak of one object per event shows as >= 1,000; bounded is ~0); and the peak
  Python heap from a short extra pass under ``tracemalloc``.

Run it in a fresh process (``python -m benchmarks`` does) so the RSS figures belong to this benchmark alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "gateway" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CLIENT_ADDRESS, REQUEST_HEADERS
from benchmarks.compiled import loaded_extension_modules
from benchmarks.macro import Service, start_uvicorn
from gateway.config import load_settings
from gateway.delivery.dispatcher import Dispatcher
from gateway.events import PAGEVIEW, Event
from gateway.sinks.factory import build_sinks

__all__ = ["run"]

DESTINATION: Final = "plausible"
_PAGE_SIZE: Final = resource.getpagesize()
_USER_AGENT: Final = dict(REQUEST_HEADERS)["User-Agent"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def _event(index: int) -> Event:
    """A page view as the middleware builds it.

    100 distinct URLs: the policy's URL scrubbing really runs, and its bounded caches (``urlsplit``, ``re``) are
    warm after the warm-up, so they do not show up as growth in the memory passes.
    """
    return Event(
        name=PAGEVIEW,
        url=f"https://bench.example/downloads/release/python-3{index % 100}/?utm_source=bench&email=x%40y.org",
        referrer="https://www.google.com/",
        title="Download Python | Python.org",
        language="en-gb",
        user_agent=_USER_AGENT,
        country="GB",
        ip=CLIENT_ADDRESS.rsplit(".", 1)[0] + ".0",
    )


async def _deliver(
    dispatcher: Dispatcher, seconds: float, depth: int, on_sample: Callable[[int], None] | None = None
) -> int:
    """Submit events for ``seconds``, keeping at most ``depth`` queued; return once all of them are settled.

    Returns how many were delivered. The producer polls every 5 ms; at the rates measured here that refills
    the queue long before the senders drain it.
    """
    stats = dispatcher.stats
    start = stats()[DESTINATION]
    settled_before = start["accepted"] - start["pending"]
    delivered_before = start["delivered"]
    submitted = 0
    deadline = time.perf_counter() + seconds
    while True:
        row = stats()[DESTINATION]
        queued = int(row["queue_depth"])
        producing = time.perf_counter() < deadline
        while producing and queued < depth:
            dispatcher.submit(_event(submitted))
            submitted += 1
            queued += 1
        settled = row["accepted"] - row["pending"] - settled_before
        if on_sample is not None:
            on_sample(int(row["delivered"] - delivered_before))
        if not producing and settled >= submitted:
            return int(row["delivered"] - delivered_before)
        await asyncio.sleep(0.005)


async def _measure(
    collector: Service, directory: Path, seconds: float, spool: bool, max_connections: int | None
) -> dict[str, Any]:
    dispatch = {"max_connections": max_connections} if max_connections else {}
    settings = load_settings(
        environ={},
        overrides={
            "dispatch": dispatch,
            "consent": {"receipts": "", "secret_keys": ["bench-dispatch-key-" + "d" * 32]},
            "spool": {"enabled": spool, "path": str(directory / "spool.sqlite3")},
            "destinations": {
                DESTINATION: {
                    "kind": "plausible",
                    "endpoint": f"{collector.url}/api/event",
                    "domain": "bench.example",
                    "fields": ["name", "url", "referrer", "country", "user_agent", "ip"],
                }
            },
        },
    )
    dispatcher = Dispatcher(build_sinks(settings), settings.dispatch, settings.spool)
    await dispatcher.start()
    # Enough queued work for every sender, yet far less than the ~0.15 s an event may wait before it is spooled.
    depth = max(64, 2 * settings.dispatch.max_connections)
    try:
        await _deliver(dispatcher, min(1.0, seconds / 5), depth)  # warm-up: connections, caches
        await _deliver(dispatcher, seconds / 4, depth)  # a pass whose settled state is the memory baseline
        gc.collect()
        blocks_before = sys.getallocatedblocks()
        rss: list[tuple[int, int]] = []  # (delivered so far, RSS bytes)
        next_sample = 0.0

        def sample(delivered: int) -> None:
            nonlocal next_sample
            now = time.perf_counter()
            if now >= next_sample:
                rss.append((delivered, _rss_bytes()))
                next_sample = now + 0.1

        cpu0, wall0, collector0 = time.process_time(), time.perf_counter(), collector.cpu_seconds()
        delivered = await _deliver(dispatcher, seconds, depth, sample)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        collector_cpu = collector.cpu_seconds() - collector0
        rss.append((delivered, _rss_bytes()))
        half = [r for d, r in rss if d >= delivered // 2]
        # Both baselines are taken with everything settled: interpreter memory blocks still allocated after the
        # measured pass that were not before it grew with the number of events (a leak shows >= 1 per event).
        gc.collect()
        blocks_growth = (sys.getallocatedblocks() - blocks_before) / max(1, delivered) * 1000

        # A short pass under tracemalloc (slow, so timed figures come from the pass above): the peak Python heap.
        tracemalloc.start()
        await _deliver(dispatcher, seconds / 4, depth)
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        stats = dispatcher.stats()[DESTINATION]
        dispatcher.check_invariant()
    finally:
        await dispatcher.stop()
    return {
        "delivered": delivered,
        "spool": spool,
        "senders": settings.dispatch.max_connections,
        "queue_depth_target": depth,
        "seconds": wall,
        "events_per_s": delivered / wall,
        "cpu_s": cpu,
        "cpu_us_per_event": 1e6 * cpu / max(1, delivered),
        "cpu_pct": 100 * cpu / wall,
        "collector_cpu_us_per_event": 1e6 * collector_cpu / max(1, delivered),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_second_half_mb": (half[-1] - half[0]) / 2**20 if len(half) > 1 else 0.0,
        "traced_peak_mb": traced_peak / 2**20,
        "blocks_growth_per_1000_events": blocks_growth,
        "not_delivered": int(stats["accepted"] - stats["delivered"]),
        "spool_rows": int(stats["spool_rows"]),
    }


def run(seconds: float, spool: bool, max_connections: int | None = None) -> dict[str, Any]:
    import uvloop

    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        directory = Path(tmp)
        collector = start_uvicorn("collector", "benchmarks.apps:collector_app", directory, ready_path="/_count")
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(_measure(collector, directory, seconds, spool, max_connections))
        finally:
            collector.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of offered load (measured pass)")
    parser.add_argument("--spool", choices=("on", "off"), default="on")
    parser.add_argument("--max-connections", type=int, help="override [dispatch] max_connections (default 20)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.duration, args.spool == "on", args.max_connections)
    if args.json:  # with the compiled gateway modules that ran, so the caller can tell which build it measured
        print(json.dumps({**result, "compiled_modules": loaded_extension_modules()}))
        return
    for key, value in result.items():
        print(f"{key:<38} {value:.2f}" if isinstance(value, float) else f"{key:<38} {value}")


if __name__ == "__main__":
    main()
