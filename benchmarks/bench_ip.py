"""Per-call cost of the client-IP privacy core: resolve, truncate, country lookup.

    python benchmarks/bench_ip.py [--repeat 7] [--number 50000] [--wall]

Prints the median nanoseconds per call over ``repeat`` timeit runs (after a warm-up run). Timing only, no asserts:
absolute numbers move 10-30% between interpreters and machines; compare runs on the same machine. By default the
timer is this process's CPU time, which other busy processes on a shared machine disturb far less than the wall
clock (``--wall`` uses ``time.perf_counter``).
The geo fixture is a small .mmdb built with mmdb-writer (a test dependency) in a temporary directory.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdb_writer import MMDBWriter
from netaddr import IPSet

from gateway.anonymize import Truncator
from gateway.clientip import ClientIPResolver
from gateway.geo import MaxMindGeo

# Fastly's public ranges (api.fastly.com/public-ip-list) plus a load balancer: a realistic trust list.
FASTLY = [
    "23.235.32.0/20",
    "43.249.72.0/22",
    "103.244.50.0/24",
    "103.245.222.0/23",
    "103.245.224.0/24",
    "104.156.80.0/20",
    "140.248.64.0/18",
    "140.248.128.0/17",
    "146.75.0.0/17",
    "151.101.0.0/16",
    "157.52.64.0/18",
    "167.82.0.0/17",
    "167.82.128.0/20",
    "167.82.160.0/20",
    "167.82.224.0/20",
    "172.111.64.0/18",
    "185.31.16.0/22",
    "199.27.72.0/21",
    "199.232.0.0/16",
    "2a04:4e40::/32",
    "2a04:4e42::/32",
    "10.0.0.0/8",
]

BROWSER_HEADERS = [
    (b"host", b"www.python.org"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"accept-language", b"en-GB,en;q=0.5"),
    (b"accept-encoding", b"gzip, deflate, br, zstd"),
    (b"referer", b"https://www.python.org/downloads/"),
    (b"cookie", b"__Host-consent=eyJ2IjoxfQ.abc.def"),
    (b"sec-fetch-dest", b"document"),
    (b"sec-fetch-mode", b"navigate"),
    (b"upgrade-insecure-requests", b"1"),
]
XFF_3_HOPS = [*BROWSER_HEADERS, (b"x-forwarded-for", b"6.6.6.6, 81.2.69.160, 151.101.1.1, 10.0.0.2")]
XFF_V6 = [*BROWSER_HEADERS, (b"x-forwarded-for", b"2001:db8:85a3:1:2::3, 2a04:4e42:200::1")]
FASTLY_HEADER = [*BROWSER_HEADERS, (b"fastly-client-ip", b"81.2.69.160"), (b"x-forwarded-for", b"81.2.69.160")]
FORWARDED_3_HOPS = [
    *BROWSER_HEADERS,
    (b"forwarded", b'for=6.6.6.6, for="[2001:db8:85a3::3]:4711";proto=https, for=151.101.1.1, for=10.0.0.2'),
]


def build_fixture(directory: Path) -> str:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
    record = {"country": {"iso_code": "GB", "names": {"en": "United Kingdom", "de": "Vereinigtes Königreich"}}}
    writer.insert_network(IPSet(["81.2.0.0/16"]), record)  # wide: cacheable per /24
    writer.insert_network(IPSet(["198.51.100.16/28"]), {**record, "country": {"iso_code": "DE"}})  # narrow: never
    writer.insert_network(IPSet(["2001:db8::/32"]), {**record, "country": {"iso_code": "JP"}})
    path = directory / "bench.mmdb"
    writer.to_db_file(str(path))
    return str(path)


def measure(label: str, call: Callable[[], object], number: int, repeat: int, clock: Callable[[], float]) -> float:
    timer = timeit.Timer(call, timer=clock)
    timer.timeit(number=max(1, number // 10))  # warm-up: caches, branch predictors, lazy imports
    runs = timer.repeat(repeat=repeat, number=number)
    median_ns = statistics.median(runs) / number * 1e9
    print(f"  {label:<58} {median_ns:9.0f} ns  ({median_ns / 1000:6.2f} µs)")
    return median_ns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=50_000)
    parser.add_argument("--wall", action="store_true", help="time with the wall clock instead of CPU time")
    args = parser.parse_args()
    n, r = args.number, args.repeat
    clock = time.perf_counter if args.wall else time.process_time

    def bench(label: str, call: Callable[[], object]) -> float:
        return measure(label, call, n, r, clock)

    untrusting = ClientIPResolver(())
    resolver = ClientIPResolver(FASTLY)
    truncate = Truncator(24, 48)
    clock_name = "wall clock" if args.wall else "process CPU time"
    print(f"Python {sys.version.split()[0]}; median of {r} runs x {n} calls; {clock_name}\n")

    print("resolve")
    bench("untrusted peer, no trusted proxies", lambda: untrusting.resolve("81.2.69.160", BROWSER_HEADERS))
    bench("untrusted peer, Fastly list configured", lambda: resolver.resolve("81.2.69.160", XFF_3_HOPS))
    bench("untrusted IPv6 peer", lambda: resolver.resolve("2001:db8:85a3:1:2::3", XFF_3_HOPS))
    bench("trusted peer + 3-hop X-Forwarded-For", lambda: resolver.resolve("10.0.0.1", XFF_3_HOPS))
    bench("trusted peer + Fastly-Client-IP", lambda: resolver.resolve("151.101.1.1", FASTLY_HEADER))
    bench("trusted IPv6 peer + IPv6 X-Forwarded-For", lambda: resolver.resolve("2a04:4e42::9", XFF_V6))
    forwarded = ClientIPResolver(FASTLY, ("forwarded",))
    bench("trusted peer + 3-hop Forwarded", lambda: forwarded.resolve("10.0.0.1", FORWARDED_3_HOPS))
    cold_peers = itertools.cycle([f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1" for i in range(50_000)])
    bench("cold cache: distinct IPv6 peers", lambda: resolver.resolve(next(cold_peers), BROWSER_HEADERS))

    print("truncate")
    bench("IPv4 (cached)", lambda: truncate("81.2.69.160"))
    bench("IPv6 (cached)", lambda: truncate("2001:db8:85a3:1:2::3"))
    cold_v4 = itertools.cycle([f"81.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(50_000)])
    cold_v6 = itertools.cycle([f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1" for i in range(50_000)])
    bench("IPv4 (cold cache)", lambda: truncate(next(cold_v4)))
    bench("IPv6 (cold cache)", lambda: truncate(next(cold_v6)))

    with tempfile.TemporaryDirectory() as directory:
        geo = MaxMindGeo(build_fixture(Path(directory)))
        print(f"geo country (C extension: {geo.uses_c_extension})")
        bench("IPv4 in a /16 record (cached per /24)", lambda: geo.country("81.2.69.160", "81.2.69.0"))
        bench("IPv6 in a /32 record (cached per /48)", lambda: geo.country("2001:db8:85a3::3", "2001:db8:85a3::"))
        bench("IPv4 in a /28 record (narrow-network cache hit)", lambda: geo.country("198.51.100.20", "198.51.100.0"))

        def uncached(target: MaxMindGeo, ip: str, truncated: str) -> Callable[[], str]:
            def call() -> str:
                target._cache.clear()
                return target.country(ip, truncated)

            return call

        bench("IPv4 in a /16 record, cache cleared before each call", uncached(geo, "81.2.69.160", "81.2.69.0"))
        shared = Path(__file__).resolve().parents[2] / "shared" / "geoip"
        for name in ("GeoIP2-Country-Test.mmdb", "GeoIP2-City-Test.mmdb"):
            if (shared / name).is_file():
                # Real records carry names in eight languages; decoding them is most of an uncached lookup.
                real = MaxMindGeo(str(shared / name))
                bench(f"{name}, cache cleared before each call", uncached(real, "81.2.69.160", "81.2.69.0"))
                real.close()

        print("whole core: resolve + truncate + country")

        def core(peer: str, headers: list[tuple[bytes, bytes]]) -> str:
            full = resolver.resolve(peer, headers)
            if full is None:
                return ""
            ip = truncate(full)
            return geo.country(full, ip) + ip

        bench("untrusted IPv4 peer (warm caches)", lambda: core("81.2.69.160", BROWSER_HEADERS))
        bench("trusted peer + 3-hop XFF (warm caches)", lambda: core("10.0.0.1", XFF_3_HOPS))
        bench("trusted IPv6 peer + IPv6 XFF (warm caches)", lambda: core("2a04:4e42::9", XFF_V6))
        bench("cold resolve + truncate: distinct IPv6 peers", lambda: core(next(cold_peers), BROWSER_HEADERS))

        def all_cold() -> str:
            geo._cache.clear()
            return core(next(cold_v4), BROWSER_HEADERS)

        bench("cold everything: distinct IPv4 peers, geo cache cleared", all_cold)
        geo.close()


if __name__ == "__main__":
    main()
