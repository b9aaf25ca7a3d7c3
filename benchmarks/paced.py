"""Latency at a fixed request rate below saturation: an open-loop client, run as its own process.

wrk keeps 64 requests in flight as fast as the server answers, so its latency at saturation is mostly queueing
(64 / throughput): a server half as fast shows about twice the p99 whatever each request costs. This client
instead sends at a fixed rate the server can sustain and measures each request from the moment it was *scheduled*
(not from when it was sent), so a stalled server cannot hide its stall by delaying the next requests ("coordinated
omission"). The rate is spread over several keep-alive connections, each sending its share on a fixed timetable;
``late`` counts requests whose slot had already passed because the previous answer on that connection was slow.

    python -m benchmarks.paced --url http://127.0.0.1:8000/path --rate 2000 --seconds 4 --header "Cookie: a=b"

prints one JSON object: requests, errors, late, p50/p90/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import urllib.parse
from collections.abc import Sequence
from typing import Final

DEFAULT_CONNECTIONS: Final = 16
_START_DELAY: Final = 0.2  # every connection opened before the first slot


async def _connection(
    host: str,
    port: int,
    request: bytes,
    first_slot: float,
    interval: float,
    end: float,
    latencies: list[float],
    counters: dict[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        slot = first_slot
        while slot < end:
            now = time.perf_counter()
            if slot > now:
                await asyncio.sleep(slot - now)
            else:
                counters["late"] += 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = -1
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length < 0:  # a chunked or close-delimited body would be misread: fail rather than measure wrong
                raise RuntimeError(f"no Content-Length in the answer: {head[:200]!r}")
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - slot)
            if status >= 400:
                counters["errors"] += 1
            slot += interval
    finally:
        writer.close()


async def paced_load(
    url: str, headers: Sequence[tuple[str, str]], rate: float, seconds: float, connections: int
) -> dict[str, float]:
    """Send ``rate`` GET requests per second to ``url`` for ``seconds``; latency percentiles from scheduled times."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", *(f"{name}: {value}" for name, value in headers)]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    interval = connections / rate  # each connection's period; connections are staggered across it
    start = time.perf_counter() + _START_DELAY
    end = start + seconds
    latencies: list[float] = []
    counters = {"late": 0, "errors": 0}
    await asyncio.gather(
        *(
            _connection(host, port, request, start + i * interval / connections, interval, end, latencies, counters)
            for i in range(connections)
        )
    )
    ordered = sorted(latencies)
    if not ordered:
        raise RuntimeError("no request completed")

    def percentile(fraction: float) -> float:
        return 1000.0 * ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]

    return {
        "requests": float(len(ordered)),
        "errors": float(counters["errors"]),
        "late": float(counters["late"]),
        "p50_ms": 1000.0 * statistics.median(ordered),
        "p90_ms": percentile(0.90),
        "p99_ms": percentile(0.99),
        "max_ms": 1000.0 * ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second, all connections together")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS)
    parser.add_argument("--header", action="append", default=[], help='"Name: value", repeatable')
    args = parser.parse_args()
    headers = [(name.strip(), value.strip()) for name, _, value in (h.partition(":") for h in args.header)]
    load = paced_load(args.url, headers, args.rate, args.seconds, args.connections)
    try:
        import uvloop  # the client's own overhead is in every figure: keep it small (and equal for all)
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        result = asyncio.run(load)
    else:
        result = uvloop.run(load)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
