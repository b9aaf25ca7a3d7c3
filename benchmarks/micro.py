"""In-process costs of the per-request building blocks and of the whole middleware (no sockets).

Each figure is the median of 7 timeit runs (3 with ``--quick``) of ~0.2 s each, after a calibration run that
doubles as warm-up, timed with this process's CPU clock (``time.process_time``), which other busy processes on a
shared machine disturb far less than the wall clock. The whole-middleware figures come from
``benchmarks/bench_middleware.py --json`` in its own process (bare app and gateway interleaved, median of
per-request wall-clock medians).

The gateway measured is the one this checkout holds: ``python -m benchmarks`` also runs this module in a
mypyc-compiled copy (:mod:`benchmarks.compiled`), and with ``build=`` :func:`run` checks that this process and
bench_middleware.py's really ran that build. ``--json`` prints the figures as JSON (progress on stderr).

    python -m benchmarks.micro [--quick] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "gateway" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ip import BROWSER_HEADERS, FASTLY, XFF_3_HOPS, XFF_V6
from benchmarks.common import CONSENT_KEY, PAGE_PATH, build_geo_database
from benchmarks.compiled import COMPILED, PURE, BuildKind, loaded_extension_modules, require_build
from gateway.anonymize import Truncator
from gateway.clientip import ClientIPResolver
from gateway.config import Settings, load_settings
from gateway.consent import ConsentManager
from gateway.events import PAGEVIEW, Event
from gateway.geo import MaxMindGeo
from gateway.pageview import is_bot, page_url, primary_language
from gateway.sinks import Payload
from gateway.sinks.ga4 import GA4Sink
from gateway.sinks.plausible import PlausibleSink

__all__ = ["MicroFigure", "check_build", "run"]

# Distinct inputs for "cold cache" rows: far more than any gateway cache holds (they are 4-16k entries and
# cleared when full), so every call misses.
COLD_POOL = 50_000


@dataclasses.dataclass(frozen=True, slots=True)
class MicroFigure:
    group: str
    label: str
    ns: float  # median nanoseconds per call
    budget_ns: float | None = None  # the budget for this figure, if it has one
    note: str = ""


def _median_ns(call: Callable[[], object], target_seconds: float, repeat: int) -> float:
    """Median ns per call over ``repeat`` runs of about ``target_seconds`` each, after a warm-up run."""
    timer = timeit.Timer(call, timer=time.process_time)
    number = 1
    while True:  # calibrate (this doubles as the warm-up: caches, lazy imports, specialisation)
        elapsed = timer.timeit(number)
        if elapsed >= target_seconds / 4 or number >= 1 << 22:
            break
        number *= 2
    number = max(1, int(number * target_seconds / max(elapsed, 1e-9)))
    runs = timer.repeat(repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e9


def _settings(database: str) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "consent": {"secret_keys": [CONSENT_KEY], "receipts": ""},
            "spool": {"enabled": False},
            "geo": {"database": database},
            "client_ip": {"trusted_proxies": FASTLY},
            "destinations": {
                "plausible": {
                    "kind": "plausible",
                    "endpoint": "http://127.0.0.1:9/api/event",
                    "domain": "bench.example",
                    "fields": ["name", "url", "referrer", "country", "user_agent", "ip"],
                },
                "ga4": {
                    "kind": "ga4",
                    "endpoint": "http://127.0.0.1:9/mp/collect",
                    "measurement_id": "G-BENCH0001",
                    "api_secret": "bench-secret-not-real",
                    "requires": ["analytics"],
                    "fields": ["name", "url", "referrer", "title", "country", "language"],
                },
            },
        },
    )


def _page_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "scheme": "https",
        "path": PAGE_PATH,
        "raw_path": PAGE_PATH.encode(),
        "query_string": b"utm_source=bench&email=someone%40example.org",
        "headers": [(b"host", b"www.python.org"), *BROWSER_HEADERS[1:]],
        "server": ("127.0.0.1", 8000),
    }


def _event(scope: dict[str, Any], granted: frozenset[str]) -> Event:
    """What the middleware builds for a page view (gateway.middleware.PrivacyGateway._http)."""
    return Event(
        name=PAGEVIEW,
        url=page_url(scope),
        referrer="https://www.python.org/downloads/",
        language=primary_language("en-GB,en;q=0.5"),
        user_agent="Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        country="GB",
        ip="81.2.69.0",
        granted=granted,
        client_id="1234567890.1700000000",
        title="Download Python | Python.org",
    )


def check_build(build: BuildKind) -> None:
    """Raise unless this process runs ``build``: compiled means every gateway module it imported that has a
    compiled extension module beside its source was loaded from it (and there is at least one)."""
    from gateway.native import compiled_modules

    essential = [name for name in compiled_modules() if name in sys.modules]
    if build == COMPILED and not essential:
        raise RuntimeError("micro benchmarks: measured as compiled, but the gateway package has no compiled modules")
    require_build(build, loaded_extension_modules(), essential, "micro benchmarks (in process)")


def run(
    *, quick: bool = False, progress: Callable[[str], None] = print, build: BuildKind | None = None
) -> list[MicroFigure]:
    """Every micro figure; with ``build``, check that this process and bench_middleware.py run that build."""
    if build is not None:
        check_build(build)
    target, repeat = (0.02, 3) if quick else (0.2, 7)
    figures: list[MicroFigure] = []

    def bench(
        group: str,
        label: str,
        call: Callable[[], object],
        budget_ns: float | None = None,
        note: str = "",
        calls_per_call: int = 1,
    ) -> None:
        figure = MicroFigure(group, label, _median_ns(call, target, repeat) / calls_per_call, budget_ns, note)
        progress(f"  {group:<12} {label:<60} {figure.ns / 1000:8.2f} µs")
        figures.append(figure)

    resolver = ClientIPResolver(FASTLY)
    untrusting = ClientIPResolver(())
    truncate = Truncator(24, 48)

    def resolve_truncate(peer: str, headers: list[tuple[bytes, bytes]]) -> str:
        full = resolver.resolve(peer, headers)
        return truncate(full) if full is not None else ""

    bench(
        "ip",
        "IPv4: trusted peer + 3-hop X-Forwarded-For, truncate /24",
        lambda: resolve_truncate("10.0.0.1", XFF_3_HOPS),
    )
    bench(
        "ip",
        "IPv6: trusted peer + IPv6 X-Forwarded-For, truncate /48",
        lambda: resolve_truncate("2a04:4e42::9", XFF_V6),
    )
    bench(
        "ip",
        "IPv4: direct peer, no trusted proxies, truncate /24",
        lambda: truncate(untrusting.resolve("81.2.69.160", BROWSER_HEADERS) or ""),
    )
    cold_v6 = itertools.cycle([f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1" for i in range(COLD_POOL)])
    bench(
        "ip",
        "IPv6: distinct direct peers (cold caches), truncate /48",
        lambda: resolve_truncate(next(cold_v6), BROWSER_HEADERS),
    )
    cold_v4 = itertools.cycle([f"81.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(COLD_POOL)])
    bench(
        "ip",
        "IPv4: distinct direct peers (cold caches), truncate /24",
        lambda: resolve_truncate(next(cold_v4), BROWSER_HEADERS),
    )

    with tempfile.TemporaryDirectory(prefix="bench-micro-") as directory:
        database = build_geo_database(Path(directory))
        settings = _settings(database)

        consent = ConsentManager(settings)
        token = consent.dumps(consent.make_choice({"analytics": True}, gpc=False))
        no_cookie = [header for header in BROWSER_HEADERS if header[0] != b"cookie"]
        cookie_headers = [*no_cookie, (b"cookie", f"_ga=GA1.2.3; {settings.consent.cookie}={token}; x=1".encode())]
        bench("consent", "decide(): signed cookie found, verified token cached", lambda: consent.decide(cookie_headers))

        def verify_uncached() -> object:
            consent._cache.clear()
            return consent.decide(cookie_headers)

        bench("consent", "decide(): cache cleared, full HMAC-SHA256 + JSON verify", verify_uncached)
        bench("consent", "decide(): no consent cookie", lambda: consent.decide(no_cookie))

        geo = MaxMindGeo(database)
        note = "C extension" if geo.uses_c_extension else "PURE-PYTHON reader (slow)"
        bench(
            "geo", "country(), IPv4 (cached per /24)", lambda: geo.country("198.51.100.77", "198.51.100.0"), note=note
        )
        bench(
            "geo",
            "country(), IPv6 (cached per /48)",
            lambda: geo.country("2001:db8:85a3::3", "2001:db8:85a3::"),
            note=note,
        )

        def geo_uncached() -> str:
            geo._cache.clear()
            return geo.country("198.51.100.77", "198.51.100.0")

        bench("geo", "country(), IPv4, cache cleared (mmdb lookup)", geo_uncached, note=note)

        scope = _page_scope()
        granted = frozenset({"analytics"})
        bench("event", "page-view Event (page_url, language, fields)", lambda: _event(scope, granted))
        browser = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.{} Safari/537.36"
        agents = itertools.cycle([browser.format(i) for i in range(COLD_POOL)])
        bench("event", "bot check, user agent seen before (cached)", lambda: is_bot(browser))
        bench("event", "bot check, new user agent (crawlerdetect regex)", lambda: is_bot(next(agents)))

        plausible = PlausibleSink(settings.destinations["plausible"], settings)
        ga4 = GA4Sink(settings.destinations["ga4"], settings)
        event = _event(scope, granted)
        event.event_id = "bench-1"
        bench("payload", "Plausible build() (policy, URL scrub, JSON-ready body)", lambda: plausible.build(event))
        plausible_payload = plausible.build(event)
        bench("payload", "Plausible request() (httpx.Request, 1 event)", lambda: plausible.request([plausible_payload]))
        bench("payload", "GA4 build() (policy, client/session id, batch key)", lambda: ga4.build(event))
        ga4_batch: list[Payload] = [ga4.build(event) for _ in range(25)]
        bench("payload", "GA4 request() per event, in a batch of 25", lambda: ga4.request(ga4_batch), calls_per_call=25)
        geo.close()

    rounds, per_round = (3, 500) if quick else (9, 2000)
    progress(f"  middleware   bench_middleware.py --rounds {rounds} --per-round {per_round} (own process) ...")
    script = Path(__file__).resolve().with_name("bench_middleware.py")
    command = [sys.executable, str(script), "--json", "--rounds", str(rounds), "--per-round", str(per_round)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    whole: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if build is not None:
        require_build(build, whole["compiled_modules"], ["gateway.middleware"], "bench_middleware.py")
    labels = {
        "core": ("IP + geo + truncate only (no consent, banner, events)", 8_000.0),
        "core-xff-v6": ("the same, IPv6 client behind a 3-hop X-Forwarded-For", 8_000.0),
        "pageview": ("full page view (consent, title, banner link, event enqueued)", 10_000.0),
    }
    for name, (label, budget) in labels.items():
        row = whole[name]
        note = f"bare {row['bare_us']:.2f} µs, gateway {row['gateway_us']:.2f} µs"
        figure = MicroFigure("middleware", f"added per request: {label}", row["added_us"] * 1000, budget, note)
        progress(f"  middleware   {figure.label:<60} {figure.ns / 1000:8.2f} µs")
        figures.append(figure)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="figures as JSON on stdout, progress on stderr")
    parser.add_argument("--build", choices=("pure", "compiled"), help="fail unless this build is what runs")
    args = parser.parse_args()
    build: BuildKind | None = None if args.build is None else (COMPILED if args.build == "compiled" else PURE)
    if not args.json:
        run(quick=args.quick, build=build)
        return
    figures = run(quick=args.quick, build=build, progress=lambda text: print(text, file=sys.stderr, flush=True))
    output = {"figures": [dataclasses.asdict(f) for f in figures], "compiled_modules": loaded_extension_modules()}
    print(json.dumps(output))


if __name__ == "__main__":
    main()
