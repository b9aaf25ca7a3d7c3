"""Run every benchmark in one go and write benchmarks/results.md (GitHub issue 7).

    python -m benchmarks            # full run, ~7 minutes
    python -m benchmarks --quick    # ~1 minute smoke run (too short for trustworthy figures)
    python benchmarks/run.py [--output PATH] [--skip-macro] [--no-install]

Sections: in-process micro benchmarks (:mod:`benchmarks.micro`), middleware mode under load
(:func:`benchmarks.macro.run_middleware`), proxy mode under load (:func:`benchmarks.bench_proxy.run`) and the
dispatcher's delivery rate (:mod:`benchmarks.bench_dispatch`, in a fresh process so its memory figures are its own).
wrk and nginx come from Debian: when missing they are installed with ``apt-get install -y`` if running as root;
otherwise (or offline) the load sections are skipped with a note in the results. Every figure in results.md is
measured by this run; nothing is copied in. With ``--update-readme`` the goals table in benchmarks/README.md (between
the ``results:start``/``results:end`` markers) is replaced by this run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "gateway" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_proxy, macro, micro
from benchmarks.macro import Summary

__all__ = ["main"]

HERE: Final = Path(__file__).resolve().parent
REPO: Final = HERE.parent
README: Final = HERE / "README.md"
MARK_START: Final = "<!-- results:start -->"
MARK_END: Final = "<!-- results:end -->"

# Goals of GitHub issue 7 (ratios in one run, one worker).
MIDDLEWARE_THROUGHPUT_GOAL: Final = 0.90
MIDDLEWARE_P99_GOAL: Final = 1.2
PAGEVIEW_ADDED_US_GOAL: Final = 10.0
PROXY_VS_NGINX_GOAL: Final = 0.25
PROXY_VS_NAIVE_GOAL: Final = 10.0
DISPATCH_EVENTS_GOAL: Final = 1000.0
# "Bounded memory": RSS flat over the second half of the run, and far fewer memory blocks retained than a leak of
# one object per event would leave (1,000 per 1,000 events; bounded caches filling up account for a few).
BOUNDED_RSS_GROWTH_MB: Final = 2.0
BOUNDED_BLOCKS_PER_1000_EVENTS: Final = 100.0


@dataclasses.dataclass(frozen=True, slots=True)
class Mode:
    name: str
    micro_quick: bool
    middleware_runs: int
    middleware_seconds: float
    proxy_runs: int
    proxy_seconds: float
    warmup: float
    dispatch_seconds: float


FULL: Final = Mode("full", False, 5, 8.0, 3, 10.0, 2.0, 15.0)
QUICK: Final = Mode("quick", True, 1, 2.0, 1, 2.0, 1.0, 3.0)


@dataclasses.dataclass(frozen=True, slots=True)
class GoalRow:
    area: str
    figure: str
    value: str
    reference: str
    ratio: str
    goal: str
    met: bool | None  # None: reported, no goal


# --------------------------------------------------------------------------------------------------------------
# machine and versions
# --------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GB"
    except OSError:
        pass
    return "unknown"


def _python_build() -> str:
    flags = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    parts = [
        "PGO" if "--enable-optimizations" in flags else "no PGO",
        "LTO" if "--with-lto" in flags else "no LTO",
    ]
    return f"{platform.python_implementation()} {platform.python_version()} ({', '.join(parts)})"


def _git() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine_section(tools: macro.ToolStatus | None, started: str, finished: str, loads: Sequence[str]) -> list[str]:
    from gateway import __version__

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = [
        ("CPU", f"{_cpu_model()}, {os.cpu_count()} logical CPUs ({affinity} usable)"),
        ("Memory", _memory_gb()),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", _python_build()),
        ("Run", f"{started} → {finished}"),
        ("Load average (1/5/15 min)", "; ".join(loads)),
    ]
    lines = ["## Machine", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    versions = [("privacy-gateway", f"{__version__}, git {_git()}")]
    for name in ("uvicorn", "starlette", "httpx", "httpcore", "anyio", "httptools", "uvloop", "maxminddb"):
        versions.append((name, _version(name)))
    for name in ("itsdangerous", "crawlerdetect"):
        versions.append((name, _version(name)))
    if tools is not None:
        versions.append(("wrk", macro.tool_version(tools.wrk, "-v")))
        versions.append(("nginx", macro.tool_version(tools.nginx, "-v")))
    lines += ["## Versions", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in versions), ""]
    return lines


# --------------------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------------------


def _rps(value: float) -> str:
    return f"{value:,.0f} req/s"


def _met(value: bool | None) -> str:
    return "—" if value is None else ("**yes**" if value else "**no**")


def _goal_table(rows: Sequence[GoalRow]) -> list[str]:
    lines = ["| area | figure | measured | reference | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.area} | {r.figure} | {r.value} | {r.reference} | {r.ratio} | {r.goal} | {_met(r.met)} |")
    return lines


def _summary_table(results: dict[str, Summary], reference: str, helpers: Sequence[str]) -> list[str]:
    ref = results[reference]
    header = "| configuration | req/s (median; min–max) | vs ref | p50 ms | p99 ms | p99 vs ref | server CPU |"
    header += " server CPU µs/req |"
    header += "".join(f" {h} CPU |" for h in helpers) + " wrk CPU | errors |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for summary in results.values():
        low, high = summary.rps_range
        row = (
            f"| {summary.label} | {summary.rps:,.0f} ({low:,.0f}–{high:,.0f}) | {summary.rps / ref.rps:.3f} "
            f"| {summary.p50_ms:.2f} | {summary.p99_ms:.2f} | {summary.p99_ms / ref.p99_ms:.2f}× "
            f"| {summary.cpu_pct(summary.server):.0f}% | {summary.cpu_us_per_request(summary.server):.0f} |"
        )
        for helper in helpers:
            has = any(helper in r.cpu_s for r in summary.runs)
            row += f" {summary.cpu_pct(helper):.0f}% |" if has else " — |"
        row += f" {summary.wrk_cpu_pct:.0f}% | {summary.errors} |"
        lines.append(row)
    return lines


# --------------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------------


def micro_section(figures: Sequence[micro.MicroFigure]) -> tuple[list[str], list[GoalRow]]:
    lines = [
        "## Micro benchmarks (in process)",
        "",
        "Median per call (CPU clock, timeit with warm-up; whole-middleware rows: wall clock, bare app and gateway",
        "interleaved). Rows without a budget are reported for profiling, not judged.",
        "",
        "| group | what | median | budget | met | note |",
        "|---|---|---|---|---|---|",
    ]
    goals: list[GoalRow] = []
    for f in figures:
        met = None if f.budget_ns is None else f.ns <= f.budget_ns
        budget = "—" if f.budget_ns is None else f"≤ {f.budget_ns / 1000:.0f} µs"
        lines.append(f"| {f.group} | {f.label} | {f.ns / 1000:.2f} µs | {budget} | {_met(met)} | {f.note} |")
        if f.group == "middleware" and f.label.startswith("added per request: IP + geo + truncate only"):
            goals.append(  # issue 2's budget for the client-IP core
                GoalRow(
                    "Middleware",
                    "added per request, IP core only (resolve, geo, truncate), in process (median)",
                    f"{f.ns / 1000:.1f} µs",
                    f.note,
                    "—",
                    "≤ 8 µs",
                    f.budget_ns is not None and f.ns <= f.budget_ns,
                )
            )
        if f.group == "middleware" and f.label.startswith("added per request: full page view"):
            goals.append(
                GoalRow(
                    "Middleware",
                    "added per page view, in process (median)",
                    f"{f.ns / 1000:.1f} µs",
                    f.note,
                    "—",
                    f"≤ {PAGEVIEW_ADDED_US_GOAL:.0f} µs",
                    f.ns / 1000 <= PAGEVIEW_ADDED_US_GOAL,
                )
            )
    return [*lines, ""], goals


def middleware_section(results: dict[str, Summary], mode: Mode) -> tuple[list[str], list[GoalRow]]:
    ref = results["starlette"]
    goals: list[GoalRow] = []
    for name, what in (("gateway", "delivering to a collector"), ("gateway-nodest", "no destinations")):
        gw = results[name]
        ratio = gw.rps / ref.rps
        p99 = gw.p99_ms / ref.p99_ms
        goals.append(
            GoalRow(
                "Middleware",
                f"throughput, gateway {what}",
                _rps(gw.rps),
                f"bare Starlette {_rps(ref.rps)}",
                f"{ratio:.3f}",
                f"≥ {MIDDLEWARE_THROUGHPUT_GOAL:.2f}",
                ratio >= MIDDLEWARE_THROUGHPUT_GOAL,
            )
        )
        goals.append(
            GoalRow(
                "Middleware",
                f"p99 latency, gateway {what}",
                f"{gw.p99_ms:.2f} ms",
                f"bare Starlette {ref.p99_ms:.2f} ms",
                f"{p99:.2f}×",
                f"≤ {MIDDLEWARE_P99_GOAL:.1f}×",
                p99 <= MIDDLEWARE_P99_GOAL,
            )
        )
    for name, what in (("gateway", "delivering"), ("gateway-nodest", "no destinations")):
        gw = results[name]
        goals.append(
            GoalRow(
                "Middleware",
                f"server CPU per request, gateway {what}",
                f"{gw.cpu_us_per_request(gw.server):.0f} µs",
                f"bare Starlette {ref.cpu_us_per_request(ref.server):.0f} µs",
                f"{ref.cpu_us_per_request(ref.server) / gw.cpu_us_per_request(gw.server):.3f}",
                "reported (CPU-bound throughput ratio)",
                None,
            )
        )
    delivered = results["gateway"]
    events_per_s = [
        e.get("events_delivered", 0.0) / r.seconds for e, r in zip(delivered.extras, delivered.runs, strict=True)
    ]
    pageviews = delivered.rps
    lines = [
        "## Middleware mode (loopback load)",
        "",
        f"wrk `-t{macro.WRK_THREADS} -c{macro.WRK_CONNECTIONS} -d{mode.middleware_seconds:g}s --latency`, "
        f"{mode.middleware_runs} interleaved runs per configuration after a {mode.warmup:g} s warm-up each; medians. "
        "uvicorn, 1 worker, `--http httptools --loop uvloop --no-access-log --no-proxy-headers`. Every request is "
        "a page view of a 10 KB HTML page from a browser behind a trusted proxy (127.0.0.1, `X-Forwarded-For`) with a "
        "valid consent cookie (analytics granted) and client-id cookie: the gateway resolves, geo-locates and "
        "truncates the address, verifies both cookies, sniffs the `<title>`, injects the banner's settings link and "
        "enqueues the page-view event. *Delivering*: Plausible + GA4 destinations (`dry_run = false`) deliver to a "
        "local collector process during the run (its CPU is the collector column). Every request being a page view, "
        "that offers two events per request, far beyond what one worker delivers, so this configuration runs with "
        f"`[dispatch] queue_size = {macro.DELIVERING_QUEUE_SIZE}` and the spool off: the excess is dropped and "
        "counted, and the backlog left after each run is delivered (waited for) before the next run starts, so it "
        "never steals CPU from another configuration. *No destinations*: the event is built and handed to a "
        "dispatcher without lanes, which isolates the request path from delivery.",
        "",
        *_summary_table(results, "starlette", ["collector"]),
        "",
        f"Delivering configuration: {_fmt_median(events_per_s)} events/s reached the collector during the runs "
        f"(one Plausible + one GA4 event per page view: {2 * pageviews:,.0f} events/s offered); the backlog took "
        f"{_fmt_median([e.get('drain_seconds', 0.0) for e in delivered.extras], 1)} s to drain after a run. "
        + _dispatch_totals(delivered.totals),
        "",
    ]
    return lines, goals


def _dispatch_totals(totals: Mapping[str, float]) -> str:
    if not totals.get("accepted"):
        return ""
    accepted = totals["accepted"]
    parts = [
        f"{key.replace('_', ' ')} {totals.get(key, 0.0):,.0f} ({100 * totals.get(key, 0.0) / accepted:.0f}%)"
        for key in ("delivered", "dropped_overflow", "dropped_policy")
    ]
    return f"The gateway's own counters over the whole section: accepted {accepted:,.0f}; " + ", ".join(parts) + "."


def _fmt_median(values: Sequence[float], digits: int = 0) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):,.{digits}f}"


def proxy_section(results: dict[str, Summary], mode: Mode) -> tuple[list[str], list[GoalRow]]:
    gw, ref, naive, direct = results["gateway"], results["nginx-proxy"], results["naive"], results["direct"]
    goals = [
        GoalRow(
            "Proxy",
            "throughput, `gateway serve`",
            _rps(gw.rps),
            f"nginx proxy_pass {_rps(ref.rps)}",
            f"{gw.rps / ref.rps:.3f}",
            f"≥ {PROXY_VS_NGINX_GOAL:.2f}",
            gw.rps / ref.rps >= PROXY_VS_NGINX_GOAL,
        ),
        GoalRow(
            "Proxy",
            "throughput, `gateway serve`",
            _rps(gw.rps),
            f"naive httpx proxy {_rps(naive.rps)}",
            f"{gw.rps / naive.rps:.1f}×",
            f"≥ {PROXY_VS_NAIVE_GOAL:.0f}×",
            gw.rps / naive.rps >= PROXY_VS_NAIVE_GOAL,
        ),
        GoalRow(
            "Proxy",
            "p99 latency, `gateway serve`",
            f"{gw.p99_ms:.2f} ms",
            f"nginx proxy_pass {ref.p99_ms:.2f} ms",
            f"{gw.p99_ms / ref.p99_ms:.2f}×",
            "reported",
            None,
        ),
    ]
    lines = [
        "## Proxy mode (loopback load)",
        "",
        f"wrk `-t{macro.WRK_THREADS} -c{macro.WRK_CONNECTIONS} -d{mode.proxy_seconds:g}s --latency`, "
        f"{mode.proxy_runs} interleaved runs per configuration after a {mode.warmup:g} s warm-up each; medians. "
        "Upstream: nginx (1 worker) serving the 10 KB page as a static file. *nginx proxy_pass*: a second nginx "
        "(1 worker, `keepalive 64` upstream pool, HTTP/1.1). *gateway serve*: `python -m gateway serve --config X` "
        "(1 worker: privacy middleware with geo database, consent key and banner, plus the reverse proxy; access log "
        "off; **no destinations**, so page-view events are built but not delivered). *naive*: Starlette + one shared "
        "`httpx.AsyncClient`, streaming (`benchmarks/apps.py:naive_proxy_app`) under uvicorn. Same request "
        f"headers and cookies as middleware mode. Upstream direct is {gw.rps / direct.rps:.3f} of the ceiling.",
        "",
        *_summary_table(results, "nginx-proxy", ["nginx-upstream"]),
        "",
    ]
    return lines, goals


def run_dispatch(seconds: float, spool: bool) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "benchmarks.bench_dispatch", "--duration", str(seconds), "--spool",
        "on" if spool else "off", "--json",
    ]  # fmt: skip
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench_dispatch failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def dispatch_section(results: Sequence[dict[str, Any]], mode: Mode) -> tuple[list[str], list[GoalRow]]:
    goals: list[GoalRow] = []
    lines = [
        "## Dispatcher (delivery to a local collector)",
        "",
        f"One Dispatcher with the real Plausible sink (1 event per request, default `[dispatch]` settings: "
        f"max_connections = {results[0]['senders']}, its default transport) delivering to a raw ASGI collector "
        f"(uvicorn, separate process, answers 202) for {mode.dispatch_seconds:g} s of offered load, the queue "
        f"kept topped up to {results[0]['queue_depth_target']} events; uvloop; a fresh process per row. "
        "CPU per event = this process's CPU time / delivered events (dispatcher, HTTP client, payload building, "
        "and ~3 µs of event construction by the producer).",
        "",
        "| spool | delivered | events/s | CPU µs/event | CPU use | collector CPU µs/event | peak RSS | "
        "RSS growth, 2nd half | blocks retained / 1,000 events | traced heap peak | not delivered |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {'on' if r['spool'] else 'off'} | {r['delivered']:,} | {r['events_per_s']:,.0f} | "
            f"{r['cpu_us_per_event']:,.0f} | {r['cpu_pct']:.0f}% | {r['collector_cpu_us_per_event']:,.0f} | "
            f"{r['peak_rss_mb']:.1f} MB | {r['rss_growth_second_half_mb']:+.2f} MB | "
            f"{r['blocks_growth_per_1000_events']:+.0f} | {r['traced_peak_mb']:.2f} MB | {r['not_delivered']} |"
        )
    for r in results:
        spool = "spool on" if r["spool"] else "spool off"
        goals.append(
            GoalRow(
                "Dispatcher",
                f"delivered events/s per worker ({spool})",
                f"{r['events_per_s']:,.0f} /s",
                "—",
                "—",
                f"≥ {DISPATCH_EVENTS_GOAL:,.0f} /s",
                r["events_per_s"] >= DISPATCH_EVENTS_GOAL,
            )
        )
        goals.append(
            GoalRow(
                "Dispatcher",
                f"CPU per delivered event ({spool})",
                f"{r['cpu_us_per_event']:,.0f} µs",
                "—",
                "—",
                "reported",
                None,
            )
        )
        bounded = (
            r["rss_growth_second_half_mb"] <= BOUNDED_RSS_GROWTH_MB
            and r["blocks_growth_per_1000_events"] <= BOUNDED_BLOCKS_PER_1000_EVENTS
        )
        goals.append(
            GoalRow(
                "Dispatcher",
                f"bounded memory ({spool})",
                f"RSS {r['rss_growth_second_half_mb']:+.2f} MB; "
                f"{r['blocks_growth_per_1000_events']:+.0f} blocks retained / 1,000 events",
                f"peak RSS {r['peak_rss_mb']:.0f} MB",
                "—",
                f"≤ {BOUNDED_RSS_GROWTH_MB:g} MB, ≤ {BOUNDED_BLOCKS_PER_1000_EVENTS:g} blocks",
                bounded,
            )
        )
    return [*lines, ""], goals


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def _update_readme(goals_block: list[str]) -> bool:
    try:
        text = README.read_text(encoding="utf-8")
    except OSError:
        return False
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start == -1 or end < start:
        return False
    new = text[: start + len(MARK_START)] + "\n" + "\n".join(goals_block) + "\n" + text[end:]
    README.write_text(new, encoding="utf-8")
    return True


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run (figures too short to trust)")
    parser.add_argument("--output", type=Path, default=HERE / "results.md")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-macro", action="store_true", help="skip the wrk/nginx load runs")
    parser.add_argument("--skip-dispatch", action="store_true")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk/nginx")
    parser.add_argument("--update-readme", action="store_true", help="copy the goals table into benchmarks/README.md")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    log: Callable[[str], None] = lambda text: print(text, flush=True)  # noqa: E731

    started_at = time.monotonic()
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    loads = [f"start {_load()}"]
    notes: list[str] = []

    # Sections and goal rows by area, assembled in this order whatever ran first.
    order = ("middleware", "proxy", "dispatcher", "micro")
    sections: dict[str, list[str]] = {}
    goal_rows: dict[str, list[GoalRow]] = {}

    tools: macro.ToolStatus | None = None
    if not args.skip_macro:
        tools = macro.ensure_tools(install=not args.no_install)
        if tools.note:
            notes.append(tools.note + ".")
            log(f"tools: {tools.note}")

    if not args.skip_micro:
        log("micro benchmarks ...")
        figures = micro.run(quick=mode.micro_quick, progress=log)
        sections["micro"], goal_rows["micro"] = micro_section(figures)
        loads.append(f"after micro {_load()}")

    if args.skip_macro:
        notes.append("Load benchmarks skipped (--skip-macro).")
    elif tools is None or tools.wrk is None:
        notes.append("Middleware and proxy load benchmarks skipped: wrk is not available.")
    else:
        log("middleware mode under load ...")
        middleware = macro.run_middleware(
            tools.wrk, runs=mode.middleware_runs, seconds=mode.middleware_seconds, warmup=mode.warmup, progress=log
        )
        sections["middleware"], goal_rows["middleware"] = middleware_section(middleware, mode)
        loads.append(f"after middleware {_load()}")
        if tools.nginx is None:
            notes.append("Proxy-mode load benchmark skipped: nginx is not available.")
        else:
            log("proxy mode under load ...")
            proxy = bench_proxy.run(
                tools.wrk,
                tools.nginx,
                runs=mode.proxy_runs,
                seconds=mode.proxy_seconds,
                warmup=mode.warmup,
                progress=log,
            )
            sections["proxy"], goal_rows["proxy"] = proxy_section(proxy, mode)
            loads.append(f"after proxy {_load()}")

    if not args.skip_dispatch:
        log("dispatcher ...")
        dispatched = []
        for spool in (True, False):
            result = run_dispatch(mode.dispatch_seconds, spool)
            log(
                f"  spool {'on ' if spool else 'off'}: {result['events_per_s']:,.0f} events/s, "
                f"{result['cpu_us_per_event']:,.0f} µs CPU/event, peak RSS {result['peak_rss_mb']:.1f} MB"
            )
            dispatched.append(result)
        sections["dispatcher"], goal_rows["dispatcher"] = dispatch_section(dispatched, mode)
    loads.append(f"end {_load()}")
    goals = [row for area in ("middleware", "micro", "proxy", "dispatcher") for row in goal_rows.get(area, [])]

    finished = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    minutes = (time.monotonic() - started_at) / 60
    title = "# Benchmark results" + (" (QUICK smoke run: too short to trust)" if args.quick else "")
    goals_block = [
        f"Measured {finished} ({mode.name} run, {minutes:.1f} min) on: {_cpu_model()}, {os.cpu_count()} CPUs, "
        f"{_python_build()}; load average {loads[0].removeprefix('start ')} at the start.",
        "",
        *_goal_table(goals),
    ]
    text = [
        title,
        "",
        "Generated by `python -m benchmarks" + (" --quick" if args.quick else "") + "` (benchmarks/run.py); "
        "see benchmarks/README.md for what each figure means and how to reproduce it. Ratios compare "
        "configurations measured in the same run on the same machine; absolute numbers move with the machine "
        "and the interpreter.",
        "",
        "## Goals (GitHub issue 7)",
        "",
        *goals_block,
        "",
        *(["Notes: " + " ".join(notes), ""] if notes else []),
        *machine_section(tools, started, finished, loads),
        *(line for area in order for line in sections.get(area, [])),
    ]
    args.output.write_text("\n".join(text).rstrip() + "\n", encoding="utf-8")
    log(f"wrote {args.output} ({minutes:.1f} min)")
    if args.update_readme:
        log("updated benchmarks/README.md" if _update_readme(goals_block) else "README markers not found; not updated")
    print("\n".join(_goal_table(goals)))


if __name__ == "__main__":
    main()
