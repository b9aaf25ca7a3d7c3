"""Median µs per request: the gateway around a no-op ASGI app versus the bare app, in process (no sockets).

    python benchmarks/bench_middleware.py [--json]

Scenarios (each measured interleaved with the bare app, so machine noise hits both alike):
- ``core``: IP resolution + truncation + country lookup only (no consent cookie, no banner, no destinations) —
  issue 2's budget: < 8 µs added at the median.
- ``core-xff-v6``: the same behind a trusted proxy with a 3-hop X-Forwarded-For chain and an IPv6 client.
- ``pageview``: the full gateway on a 10 KB HTML page: IP, consent cookie (cached verify), GPC check, page-view
  detection, <title> sniffing, event built and handed to the dispatcher, banner settings link injected —
  issue 5/7's budget: <= 10 µs added per page view at the median.
Timings are informational (printed, never asserted); ratios matter more than absolute numbers.

The package measured is the one this script's checkout holds: run from a compiled copy
(:mod:`benchmarks.compiled`), it measures the mypyc build; ``--json`` lists the compiled gateway modules it ran
(``compiled_modules``, empty for pure Python) so the caller can check.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.types import Message, Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compiled import loaded_extension_modules
from gateway import PrivacyGateway, load_settings
from gateway.consent import ConsentManager
from gateway.delivery.dispatcher import Dispatcher
from gateway.sinks.factory import build_sinks

PAGE = (
    b"<!doctype html><html><head><meta charset=utf-8><title>Download Python | Python.org</title></head><body>"
    + b"<p>"
    + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 170
    + b"</p></body></html>"
)
KEY = "benchmark-key-" + "x" * 32
BROWSER = b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"


async def html_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", b"%d" % len(PAGE))],
        }
    )
    await send({"type": "http.response.body", "body": PAGE})


async def noop_send(message: Message) -> None:
    return None


async def empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def scope_for(peer: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": "/downloads/release/python-3130/",
        "raw_path": b"/downloads/release/python-3130/",
        "query_string": b"utm_source=bench",
        "root_path": "",
        "headers": headers,
        "client": (peer, 51234),
        "server": ("127.0.0.1", 8000),
    }


async def measure(app: Any, make_scope: Any, n: int) -> list[float]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        scope = make_scope()
        t0 = clock()
        await app(scope, empty_receive, noop_send)
        samples.append((clock() - t0) / 1000.0)
    return samples


def geo_fixture(directory: str) -> str:
    """A small country database (mmdb-writer) so the lookup is real; /16 networks, like real data often is."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-Country", ipv4_compatible=True)
    writer.insert_network(IPSet(["198.51.0.0/16"]), {"country": {"iso_code": "GB"}})
    writer.insert_network(IPSet(["2001:db8::/32"]), {"country": {"iso_code": "DE"}})
    path = str(Path(directory) / "bench.mmdb")
    writer.to_db_file(path)
    return path


async def run(rounds: int, per_round: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        database = geo_fixture(tmp)
        base = {
            "consent": {"receipts": "", "secret_keys": [KEY]},
            "spool": {"enabled": False},
            "geo": {"database": database},
        }
        core_settings = load_settings(
            environ={},
            overrides={
                **base,
                "banner": {"enabled": False},
                "analytics": {"pageviews": "off"},
                "client_ip": {"trusted_proxies": ["10.0.0.0/8"]},
            },
        )
        full_settings = load_settings(
            environ={},
            overrides={
                **base,
                # Room for every event of the run, so each round times the enqueue path, not the queue-full drop.
                "dispatch": {"queue_size": 1_000_000},
                "client_ip": {"trusted_proxies": ["10.0.0.0/8"]},
                "destinations": {
                    "plausible": {
                        "kind": "plausible",
                        "endpoint": "https://plausible.test/api/event",
                        "domain": "bench",
                        "fields": ["name", "url", "referrer", "country", "user_agent", "ip"],
                    },
                    "ga4": {
                        "kind": "ga4",
                        "endpoint": "https://ga.test/mp/collect",
                        "measurement_id": "G-BENCH001",
                        "api_secret": "bench",
                        "requires": ["analytics"],
                        "fields": ["name", "url", "referrer", "title", "country", "language"],
                    },
                },
            },
        )
        token = ConsentManager(full_settings).dumps(
            ConsentManager(full_settings).make_choice({"analytics": False}, False)
        )
        cookie = f"__Host-consent={token}; other=1".encode()

        def transport() -> httpx.MockTransport:
            return httpx.MockTransport(lambda request: httpx.Response(202))

        core = PrivacyGateway(
            html_app, core_settings, dispatcher=Dispatcher([], core_settings.dispatch, core_settings.spool)
        )
        full_dispatcher = Dispatcher(
            build_sinks(full_settings), full_settings.dispatch, full_settings.spool, transport=transport()
        )
        full = PrivacyGateway(html_app, full_settings, dispatcher=full_dispatcher)
        await core.startup()
        await full.startup()

        common = [
            (b"host", b"www.python.org"),
            (b"user-agent", BROWSER),
            (b"accept", b"text/html"),
            (b"accept-language", b"en-GB,en;q=0.9"),
            (b"accept-encoding", b"gzip, br"),
        ]
        scenarios = {
            "core": (core, lambda: scope_for("198.51.100.77", list(common))),
            "core-xff-v6": (
                core,
                lambda: scope_for(
                    "10.0.0.5", [*common, (b"x-forwarded-for", b"2001:db8:1234:5678::9, 10.1.1.1, 10.2.2.2")]
                ),
            ),
            "pageview": (
                full,
                lambda: scope_for(
                    "198.51.100.77", [*common, (b"cookie", cookie), (b"referer", b"https://www.google.com/")]
                ),
            ),
        }
        gc.collect()
        for name, (app, make_scope) in scenarios.items():
            bare_medians, gw_medians = [], []
            await measure(app, make_scope, per_round)  # warm-up: caches, code paths
            await measure(html_app, make_scope, per_round)
            for _ in range(rounds):  # interleave A B A B so noise hits both
                bare_medians.append(statistics.median(await measure(html_app, make_scope, per_round)))
                gw_medians.append(statistics.median(await measure(app, make_scope, per_round)))
                await asyncio.sleep(0)  # let the dispatcher deliver between rounds
            bare, gateway = statistics.median(bare_medians), statistics.median(gw_medians)
            results[name] = {
                "bare_us": round(bare, 2),
                "gateway_us": round(gateway, 2),
                "added_us": round(gateway - bare, 2),
            }
        await full.shutdown()
        await core.shutdown()
        results["pageview"]["events_accepted"] = sum(row.get("accepted", 0) for row in full_dispatcher.stats().values())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(args.rounds, args.per_round))
    if args.json:
        print(json.dumps({**results, "compiled_modules": loaded_extension_modules()}))
        return
    print(f"{'scenario':<14} {'bare µs':>9} {'gateway µs':>11} {'added µs':>9}")
    for name, row in results.items():
        print(f"{name:<14} {row['bare_us']:>9.2f} {row['gateway_us']:>11.2f} {row['added_us']:>9.2f}")


if __name__ == "__main__":
    main()
