"""Run every benchmark in one go and write benchmarks/results.md (GitHub issue 7).

    python -m benchmarks            # full run, both builds, ~12 minutes
    python -m benchmarks --quick    # smoke run (too short for trustworthy figures): ~1 minute + the build
    python benchmarks/run.py [--output PATH] [--skip-macro] [--no-install] [--no-compiled] [--compiled-dir DIR]

Sections: in-process micro benchmarks (:mod:`benchmarks.micro`), middleware mode under load
(:func:`benchmarks.macro.run_middleware`), proxy mode under load (:func:`benchmarks.bench_proxy.run`) and the
dispatcher's delivery rate (:mod:`benchmarks.bench_dispatch`, in a fresh process so its memory figures are its own).

Two builds, side by side in the same run against the same references: the pure-Python package of this checkout,
and the opt-in mypyc-compiled build, made first in a scratch copy of the current working tree
(:mod:`benchmarks.compiled`; ``--no-compiled`` skips it, ``--compiled-dir DIR`` keeps and reuses it). Its load
configurations run in the same interleaved rounds as the pure-Python ones; its in-process and dispatcher figures
run in processes started in the compiled copy. If the build fails (no compiler, no build dependencies), the
compiled rows are left out with a note in the results.
wrk and nginx come from Debian: when missing they are installed with ``apt-get install -y`` if running as root;
otherwise (or offline) the load sections are skipped with a note in the results. Every figure in results.md is
measured by this run; nothing is copied in. With ``--update-readme`` the goals table in benchmarks/README.md and in
the project's README.md (between the ``results:start``/``results:end`` markers) is replaced by this run's.
"""

from __future__ import annotations

import argparse
import contextlib
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
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "gateway" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_proxy, macro, micro, paced
from benchmarks.compiled import (
    COMPILED,
    PURE,
    BuildKind,
    CompiledBuild,
    compiled_build,
    require_build,
    subprocess_env,
)
from benchmarks.macro import Summary

__all__ = ["main"]

HERE: Final = Path(__file__).resolve().parent
REPO: Final = HERE.parent
# The READMEs holding the goals table between the markers (--update-readme): benchmarks/ and the project's.
READMES: Final = (HERE / "README.md", REPO / "README.md")
MARK_START: Final = "<!-- results:start -->"
MARK_END: Final = "<!-- results:end -->"

# Goals of GitHub issue 7 (ratios in one run, one worker), as issue 17 revised them: issue 7's 0.90 of a bare
# Starlette "hello page" is retired (a send-only pass-through middleware reaches 0.99; 0.90 would leave ~4 µs).
# Middleware with no destinations / bare Starlette, and the CPU it adds per request, per build.
MIDDLEWARE_THROUGHPUT_GOALS: Final = {"pure Python": 0.55, "compiled": 0.65}
MIDDLEWARE_ADDED_CPU_US_GOALS: Final = {"pure Python": 32.0, "compiled": 22.0}
# Issue 17: a returning visitor with a choice made. That is the visitor of the rows above (the banner stays closed;
# only the footer's "Privacy settings" link is injected, on every page), judged again against this goal; a first
# visit (the banner injected) is reported beside it.
RETURNING_VISITOR_GOALS: Final = {"compiled": 0.75}
# Issue 17: a Django page (a template rendering ~10 KB, like python.org's) behind the gateway vs the bare page.
DJANGO_THROUGHPUT_GOAL: Final = 0.97
MIDDLEWARE_P99_GOAL: Final = 1.2
PAGEVIEW_ADDED_US_GOAL: Final = 10.0
IP_CORE_ADDED_US_GOAL: Final = 8.0  # issue 2's budget for the client-IP core
PROXY_VS_NGINX_GOALS: Final = {"pure Python": 0.25, "compiled": 0.33}  # issue 17
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
    build: str  # PURE or COMPILED
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


def machine_section(
    tools: macro.ToolStatus | None,
    started: str,
    finished: str,
    loads: Sequence[str],
    *,
    compiled: CompiledBuild | None = None,
    skipped: str = "",
) -> list[str]:
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
    versions.append(
        (
            "compiled build",
            compiled.describe() if compiled is not None and compiled.available else f"not measured: {skipped}",
        )
    )
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
    lines = [
        "| area | build | figure | measured | reference | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.area} | {r.build} | {r.figure} | {r.value} | {r.reference} | {r.ratio} | {r.goal} | {_met(r.met)} |"
        )
    return lines


def _summary_table(
    results: dict[str, Summary], reference: str, helpers: Sequence[str], *, paired: bool = False
) -> list[str]:
    """One row per configuration; *vs ref* is the ratio of medians, or with ``paired`` the median of per-round
    ratios (:func:`benchmarks.macro.paired_ratio`)."""
    ref = results[reference]
    header = "| configuration | req/s (median; min–max) | vs ref | p50 ms | p99 ms | p99 vs ref | server CPU |"
    header += " server CPU µs/req |"
    header += "".join(f" {h} CPU |" for h in helpers) + " wrk CPU | errors |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for summary in results.values():
        low, high = summary.rps_range
        row = (
            f"| {summary.label} | {summary.rps:,.0f} ({low:,.0f}–{high:,.0f}) "
            f"| {macro.paired_ratio(ref, summary) if paired else summary.rps / ref.rps:.3f} "
            f"| {summary.p50_ms:.2f} | {summary.p99_ms:.2f} | {summary.p99_ms / ref.p99_ms:.2f}× "
            f"| {summary.cpu_pct(summary.server):.0f}% | {summary.cpu_us_per_request(summary.server):.0f} |"
        )
        for helper in helpers:
            has = any(helper in r.cpu_s for r in summary.runs)
            row += f" {summary.cpu_pct(helper):.0f}% |" if has else " — |"
        row += f" {summary.wrk_cpu_pct:.0f}% | {summary.errors} |"
        lines.append(row)
    return lines


def _builds(results: Mapping[str, object], name: str) -> list[tuple[str, str]]:
    """(build, configuration name) of the pure-Python configuration ``name`` and its compiled twin, if measured."""
    return [(PURE, name), *([(COMPILED, f"{name}-compiled")] if f"{name}-compiled" in results else [])]


# --------------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------------

# The in-process middleware figures that have a goal: (label prefix, goal row figure, budget in µs).
_MICRO_GOALS: Final = (
    (
        "added per request: IP + geo + truncate only",
        "added per request, IP core only (resolve, geo, truncate), in process (median)",
        IP_CORE_ADDED_US_GOAL,
    ),
    ("added per request: full page view", "added per page view, in process (median)", PAGEVIEW_ADDED_US_GOAL),
)


def micro_section(
    figures_by_build: Mapping[str, Sequence[micro.MicroFigure]],
) -> tuple[list[str], list[GoalRow]]:
    builds = list(figures_by_build)
    lines = [
        "## Micro benchmarks (in process)",
        "",
        "Median per call (CPU clock, timeit with warm-up; whole-middleware rows: wall clock, bare app and gateway",
        "interleaved). Rows without a budget are reported for profiling, not judged. "
        + (
            "The compiled column is the same benchmark run in the compiled copy (its own process, "
            "`python -m benchmarks.micro --json --build compiled`)."
            if COMPILED in figures_by_build
            else ""
        ),
        "",
        "| group | what | "
        + " | ".join(f"median, {b}" for b in builds)
        + " | budget | "
        + ("met (" + " / ".join(builds) + ")" if len(builds) > 1 else "met")
        + " | note |",
        "|---|---|" + "---|" * len(builds) + "---|---|---|",
    ]
    by_key = {b: {(f.group, f.label): f for f in figures} for b, figures in figures_by_build.items()}
    goals: list[GoalRow] = []
    for f in figures_by_build[PURE]:
        row = [by_key[b].get((f.group, f.label)) for b in builds]
        medians = " | ".join("—" if g is None else f"{g.ns / 1000:.2f} µs" for g in row)
        budget = "—" if f.budget_ns is None else f"≤ {f.budget_ns / 1000:.0f} µs"
        met = "—" if f.budget_ns is None else " / ".join(_met(None if g is None else g.ns <= f.budget_ns) for g in row)
        notes = [g.note for g in row if g is not None and g.note]
        if len(set(notes)) > 1:
            notes = [f"{b}: {g.note}" for b, g in zip(builds, row, strict=True) if g is not None and g.note]
        lines.append(f"| {f.group} | {f.label} | {medians} | {budget} | {met} | {'; '.join(dict.fromkeys(notes))} |")
    for prefix, figure, budget_us in _MICRO_GOALS:
        for build in builds:
            found = next(
                (g for g in figures_by_build[build] if g.group == "middleware" and g.label.startswith(prefix)), None
            )
            if found is not None:
                goals.append(
                    GoalRow(
                        "Middleware",
                        build,
                        figure,
                        f"{found.ns / 1000:.1f} µs",
                        found.note,
                        "—",
                        f"≤ {budget_us:.0f} µs",
                        found.ns / 1000 <= budget_us,
                    )
                )
    return [*lines, ""], goals


def middleware_section(results: dict[str, Summary], mode: Mode) -> tuple[list[str], list[GoalRow]]:
    ref = results["starlette"]
    goals: list[GoalRow] = []
    for name, what in (("gateway", "delivering to a collector"), ("gateway-nodest", "no destinations")):
        for build, key in _builds(results, name):
            gw = results[key]
            ratio = gw.rps / ref.rps
            goal = MIDDLEWARE_THROUGHPUT_GOALS[build] if name == "gateway-nodest" else None
            goals.append(
                GoalRow(
                    "Middleware",
                    build,
                    f"throughput, gateway {what}",
                    _rps(gw.rps),
                    f"bare Starlette {_rps(ref.rps)}",
                    f"{ratio:.3f}",
                    f"≥ {goal:.2f}" if goal is not None else "reported (delivery: issue 13, docs/delivery.md)",
                    ratio >= goal if goal is not None else None,
                )
            )
        if name == "gateway-nodest":
            for build, key in _builds(results, name):
                gw = results[key]
                ratio = gw.rps / ref.rps
                returning_goal = RETURNING_VISITOR_GOALS.get(build)
                goals.append(
                    GoalRow(
                        "Middleware",
                        build,
                        "throughput, returning visitor with a choice made (banner closed, settings link injected), "
                        "no destinations: the row above",
                        _rps(gw.rps),
                        f"bare Starlette {_rps(ref.rps)}",
                        f"{ratio:.3f}",
                        f"≥ {returning_goal:.2f}" if returning_goal is not None else "reported",
                        ratio >= returning_goal if returning_goal is not None else None,
                    )
                )
            for build, key in _builds(results, "gateway-first"):
                if key not in results:
                    continue
                gw = results[key]
                goals.append(
                    GoalRow(
                        "Middleware",
                        build,
                        "throughput, first visit (no choice yet: the banner injected), no destinations",
                        _rps(gw.rps),
                        f"bare Starlette {_rps(ref.rps)}",
                        f"{gw.rps / ref.rps:.3f}",
                        "reported",
                        None,
                    )
                )
            for build, key in _builds(results, name):
                gw = results[key]
                added = gw.cpu_us_per_request(gw.server) - ref.cpu_us_per_request(ref.server)
                goal_us = MIDDLEWARE_ADDED_CPU_US_GOALS[build]
                goals.append(
                    GoalRow(
                        "Middleware",
                        build,
                        "server CPU added per request, gateway no destinations",
                        f"{added:.0f} µs",
                        f"bare Starlette {ref.cpu_us_per_request(ref.server):.0f} µs",
                        "—",
                        f"≤ {goal_us:.0f} µs",
                        added <= goal_us,
                    )
                )
        for build, key in _builds(results, name):
            gw = results[key]
            p99 = gw.p99_ms / ref.p99_ms
            goals.append(
                GoalRow(
                    "Middleware",
                    build,
                    f"p99 latency, gateway {what}",
                    f"{gw.p99_ms:.2f} ms",
                    f"bare Starlette {ref.p99_ms:.2f} ms",
                    f"{p99:.2f}×",
                    f"≤ {MIDDLEWARE_P99_GOAL:.1f}×",
                    p99 <= MIDDLEWARE_P99_GOAL,
                )
            )
    # The realistic row (issue 17): a Django page with and without the gateway, the server on one core, one request
    # in flight, many short alternating rounds; judged by the median of each round's throughput ratio (see
    # benchmarks/macro.py: left to the scheduler, the same Django page swung by 1.7x from one second to the next).
    if "django" in results:
        django = results["django"]
        bare_cpu = django.cpu_us_per_request(django.server)
        for build, key in _builds(results, "django-gateway"):
            gw = results[key]
            ratio = macro.paired_ratio(django, gw)
            goals.append(
                GoalRow(
                    "Middleware",
                    build,
                    f"Django page (~10 KB template) + gateway, no destinations: throughput, one request at a time "
                    f"(median of {len(gw.runs)} paired rounds)",
                    _rps(gw.rps),
                    f"bare Django {_rps(django.rps)}",
                    f"{ratio:.3f}",
                    f"≥ {DJANGO_THROUGHPUT_GOAL:.2f}",
                    ratio >= DJANGO_THROUGHPUT_GOAL,
                )
            )
            cpu = gw.cpu_us_per_request(gw.server)
            goals.append(
                GoalRow(
                    "Middleware",
                    build,
                    "Django page + gateway: server CPU per page",
                    f"{cpu:,.0f} µs",
                    f"bare Django {bare_cpu:,.0f} µs",
                    f"{bare_cpu / cpu:.3f}" if cpu else "—",
                    "reported",
                    None,
                )
            )
    # Calibration rows: the same load through a do-nothing send wrapper, and through the issue's reference design
    # (its table measured 0.70-0.78 for it on the issue's machine).
    for name, what, goal in (
        (
            "passthrough",
            "pass-through middleware (wraps send, nothing else)",
            "reported (floor of any such middleware)",
        ),
        (
            "naive-cached",
            "the issue's reference privacy middleware, cached (fewer features)",
            "reported (issue's machine: 0.70–0.78)",
        ),
    ):
        if name in results:
            ratio = results[name].rps / ref.rps
            goals.append(
                GoalRow(
                    "Middleware",
                    PURE,
                    f"throughput, {what}",
                    _rps(results[name].rps),
                    f"bare Starlette {_rps(ref.rps)}",
                    f"{ratio:.3f}",
                    goal,
                    None,
                )
            )
    for name, what in (("gateway", "delivering"), ("gateway-nodest", "no destinations")):
        for build, key in _builds(results, name):
            gw = results[key]
            if not gw.paced or not ref.paced:
                continue
            goals.append(
                GoalRow(
                    "Middleware",
                    build,
                    f"p99 latency at a fixed {gw.paced_rate:,.0f} req/s (below saturation), gateway {what}",
                    f"{gw.paced_p99_ms:.2f} ms",
                    f"bare Starlette {ref.paced_p99_ms:.2f} ms",
                    f"{gw.paced_p99_ms / ref.paced_p99_ms:.2f}×",
                    "reported (the goal above is at saturation)",
                    None,
                )
            )
    for name, what in (("gateway", "delivering"), ("gateway-nodest", "no destinations")):
        for build, key in _builds(results, name):
            gw = results[key]
            goals.append(
                GoalRow(
                    "Middleware",
                    build,
                    f"server CPU per request, gateway {what}",
                    f"{gw.cpu_us_per_request(gw.server):.0f} µs",
                    f"bare Starlette {ref.cpu_us_per_request(ref.server):.0f} µs",
                    f"{ref.cpu_us_per_request(ref.server) / gw.cpu_us_per_request(gw.server):.3f}",
                    "reported (CPU-bound throughput ratio)",
                    None,
                )
            )
    compiled = len(_builds(results, "gateway")) > 1
    starlette_rows = {k: v for k, v in results.items() if not k.startswith("django")}
    django_rows = {k: v for k, v in results.items() if k.startswith("django")}
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
        "dispatcher without lanes, which isolates the request path from delivery."
        + (
            " *(compiled)*: the same configuration served from the mypyc-compiled copy, in the same rounds "
            "(its server process checked to have loaded the compiled modules)."
            if compiled
            else ""
        ),
        "",
        *_summary_table(starlette_rows, "starlette", ["collector"]),
        "",
        *_paced_table(starlette_rows, "starlette", mode),
    ]
    if "django" in results:
        rounds = len(results["django"].runs)
        lines += [
            "The Django rows: the same request to a Django site whose view renders a ~10 KB page from a template "
            "(`benchmarks/apps.py`), bare and inside the gateway (no destinations). A Django worker runs a sync view "
            "in a thread beside its event loop; left to the scheduler the two threads wander between cores and the "
            "same page measured 130–230 req/s from one second to the next, so here each server is pinned to one core "
            "and wrk to the other"
            + ("" if macro.pinning_available() else " (not on this machine: no `taskset` or fewer than two cores)")
            + f", wrk keeps {macro.DJANGO_CONNECTIONS} request in flight (the page's own cost, no queue), and "
            f"{rounds} rounds of {macro.DJANGO_SECONDS:g} s alternate the configurations. *vs ref*: the median of "
            "each round's ratio to the bare Django page in the same round.",
            "",
            *_summary_table(django_rows, "django", [], paired=True),
            "",
        ]
    for build, key in _builds(results, "gateway"):
        delivered = results[key]
        events_per_s = [
            e.get("events_delivered", 0.0) / r.seconds for e, r in zip(delivered.extras, delivered.runs, strict=True)
        ]
        lines += [
            f"Delivering configuration ({build}): {_fmt_median(events_per_s)} events/s reached the collector during "
            f"the runs (one Plausible + one GA4 event per page view: {2 * delivered.rps:,.0f} events/s offered); the "
            f"backlog took {_fmt_median([e.get('drain_seconds', 0.0) for e in delivered.extras], 1)} s to drain "
            "after a run. " + _dispatch_totals(delivered.totals),
            "",
        ]
    return lines, goals


# The reference's round-to-round throughput spread above which the stage section says the machine was not steady.
STEADY_SPREAD: Final = 0.10


def stages_section(results: dict[str, Summary]) -> list[str]:
    """Server CPU per request with the gateway's stages switched on one at a time (issue 17's cost map)."""
    bare = results["stage-bare"]
    bare_cpu = bare.cpu_us_per_request(bare.server)
    pin = macro.pinning_available()
    lines = [
        "## Per-stage breakdown (loopback load)",
        "",
        f"The middleware-mode request (returning visitor, no destinations) through bare Starlette and through the "
        f"gateway with its stages switched on one at a time by configuration (`[banner] enabled`, `[analytics] "
        f"pageviews`); wrk `-c{macro.WRK_CONNECTIONS}`, {macro.STAGE_ROUNDS} interleaved rounds of "
        f"{macro.STAGE_SECONDS:g} s, medians"
        + ("; each server pinned to one core and wrk to the other." if pin else ".")
        + " *added*: the median of each round's server CPU per request beyond bare Starlette's in the same round; "
        "*ratio*: the median of each round's throughput ratio to bare Starlette (paired, so a dip of the machine "
        "during one round moves both sides of that round's figures). Under load every microsecond of Python costs "
        "about two to three times what it costs in a tight in-process loop (the micro benchmarks): the server's "
        "other work (kernel, uvloop, httptools) between two requests leaves caches and branch predictors cold.",
        "",
        "| build | configuration | req/s | ratio | server CPU µs/req | added µs/req |",
        "|---|---|---|---|---|---|",
        f"| — | bare Starlette | {bare.rps:,.0f} | 1.000 | {bare_cpu:.1f} | — |",
    ]
    moved = macro.spread(bare)
    note = f"Bare Starlette's throughput moved by {moved:.0%} between rounds" + (
        f": more than {STEADY_SPREAD:.0%}, so the machine was not steady; read these figures with care."
        if moved > STEADY_SPREAD
        else " (steady)."
    )
    for build, suffix in ((PURE, ""), (COMPILED, "-compiled")):
        for stage in macro.STAGES:
            summary = results.get(f"stage-{stage}{suffix}")
            if summary is None:
                continue
            cpu = summary.cpu_us_per_request(summary.server)
            added = macro.paired_added_cpu(bare, summary)
            lines.append(
                f"| {build} | {macro.STAGE_LABELS[stage]} | {summary.rps:,.0f} "
                f"| {macro.paired_ratio(bare, summary):.3f} | {cpu:.1f} | {added:+.1f} |"
            )
    return [*lines, "", note, ""]


def _paced_table(results: dict[str, Summary], reference: str, mode: Mode) -> list[str]:
    """Latency at one fixed rate below saturation (benchmarks/paced.py), every configuration at the same rate."""
    ref = results[reference]
    if not ref.paced:
        return []
    runs = len(ref.paced)
    lines = [
        f"Latency at a fixed rate: {ref.paced_rate:,.0f} requests/s ({macro.PACED_FRACTION:g} of the slowest "
        f"configuration's wrk throughput, rounded down to a hundred) from `benchmarks/paced.py` on "
        f"{paced.DEFAULT_CONNECTIONS} keep-alive connections, {runs} interleaved run{'s' if runs != 1 else ''} of "
        f"{macro.paced_seconds(mode.middleware_seconds):g} s per "
        "configuration, medians. wrk's latency above is taken at saturation, where it is mostly the length of "
        "wrk's own queue (64 requests in flight: a server half as fast shows about twice the latency); here every "
        "configuration has capacity to spare, and each request is timed from the moment it was scheduled, so a "
        "stall cannot hide by delaying the requests behind it. *late*: requests whose slot had passed before their "
        "connection was free (a sign of saturation, of the server or of the client).",
        "",
        "| configuration | p50 ms | p99 ms | p99 vs ref | late | errors |",
        "|---|---|---|---|---|---|",
    ]
    for summary in results.values():
        if not summary.paced:
            continue
        lines.append(
            f"| {summary.label} | {summary.paced_p50_ms:.2f} | {summary.paced_p99_ms:.2f} "
            f"| {summary.paced_p99_ms / ref.paced_p99_ms:.2f}× | {summary.paced_late_pct:.1f}% "
            f"| {summary.paced_errors} |"
        )
    return [*lines, ""]


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
    ref, naive, direct = results["nginx-proxy"], results["naive"], results["direct"]
    builds = _builds(results, "gateway")
    goals = [
        GoalRow(
            "Proxy",
            build,
            "throughput, `gateway serve`",
            _rps(results[key].rps),
            f"nginx proxy_pass {_rps(ref.rps)}",
            f"{results[key].rps / ref.rps:.3f}",
            f"≥ {PROXY_VS_NGINX_GOALS[build]:.2f}",
            results[key].rps / ref.rps >= PROXY_VS_NGINX_GOALS[build],
        )
        for build, key in builds
    ]
    goals += [
        GoalRow(
            "Proxy",
            build,
            "throughput, `gateway serve`",
            _rps(results[key].rps),
            f"naive httpx proxy {_rps(naive.rps)}",
            f"{results[key].rps / naive.rps:.1f}×",
            f"≥ {PROXY_VS_NAIVE_GOAL:.0f}×",
            results[key].rps / naive.rps >= PROXY_VS_NAIVE_GOAL,
        )
        for build, key in builds
    ]
    goals += [
        GoalRow(
            "Proxy",
            build,
            "p99 latency, `gateway serve`",
            f"{results[key].p99_ms:.2f} ms",
            f"nginx proxy_pass {ref.p99_ms:.2f} ms",
            f"{results[key].p99_ms / ref.p99_ms:.2f}×",
            "reported",
            None,
        )
        for build, key in builds
    ]
    of_direct = "; ".join(f"{build} {results[key].rps / direct.rps:.3f}" for build, key in builds)
    lines = [
        "## Proxy mode (loopback load)",
        "",
        f"wrk `-t{macro.WRK_THREADS} -c{macro.WRK_CONNECTIONS} -d{mode.proxy_seconds:g}s --latency`, "
        f"{mode.proxy_runs} interleaved runs per configuration after a {mode.warmup:g} s warm-up each; medians. "
        "Upstream: nginx (1 worker) serving the 10 KB page as a static file. *nginx proxy_pass*: a second nginx "
        "(1 worker, `keepalive 64` upstream pool, HTTP/1.1). *gateway serve*: `python -m gateway serve --config X` "
        "(1 worker: privacy middleware with geo database, consent key and banner, plus the reverse proxy; access log "
        "off; **no destinations**, so page-view events are built but not delivered)"
        + (
            "; *(compiled)*: the same, started in the mypyc-compiled copy (checked to have loaded the compiled modules)"
            if len(builds) > 1
            else ""
        )
        + ". *naive*: Starlette + one shared `httpx.AsyncClient`, streaming (`benchmarks/apps.py:naive_proxy_app`) "
        "under uvicorn. Same request headers and cookies as middleware mode. `gateway serve` reaches this share of "
        f"the upstream's direct throughput: {of_direct}.",
        "",
        *_summary_table(results, "nginx-proxy", ["nginx-upstream"]),
        "",
    ]
    return lines, goals


def run_dispatch(seconds: float, spool: bool, cwd: Path = REPO) -> dict[str, Any]:
    """bench_dispatch.py in a fresh process in the checkout ``cwd`` (this repository or a compiled copy)."""
    command = [
        sys.executable, "-m", "benchmarks.bench_dispatch", "--duration", str(seconds), "--spool",
        "on" if spool else "off", "--json",
    ]  # fmt: skip
    env = subprocess_env({"PYTHONPATH": str(cwd)})
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench_dispatch failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def dispatch_section(results: Sequence[dict[str, Any]], mode: Mode) -> tuple[list[str], list[GoalRow]]:
    """``results``: bench_dispatch's JSON per row, each with a ``build`` key added."""
    goals: list[GoalRow] = []
    lines = [
        "## Dispatcher (delivery to a local collector)",
        "",
        f"One Dispatcher with the real Plausible sink (1 event per request, default `[dispatch]` settings: "
        f"max_connections = {results[0]['senders']}, its default transport) delivering to a raw ASGI collector "
        f"(uvicorn, separate process, answers 202) for {mode.dispatch_seconds:g} s of offered load, the queue "
        f"kept topped up to {results[0]['queue_depth_target']} events; uvloop; a fresh process per row (for the "
        "compiled build: in the compiled copy). CPU per event = this process's CPU time / delivered events "
        "(dispatcher, HTTP client, payload building, and ~3 µs of event construction by the producer).",
        "",
        "| build | spool | delivered | events/s | CPU µs/event | CPU use | collector CPU µs/event | peak RSS | "
        "RSS growth, 2nd half | blocks retained / 1,000 events | traced heap peak | not delivered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['build']} | {'on' if r['spool'] else 'off'} | {r['delivered']:,} | {r['events_per_s']:,.0f} | "
            f"{r['cpu_us_per_event']:,.0f} | {r['cpu_pct']:.0f}% | {r['collector_cpu_us_per_event']:,.0f} | "
            f"{r['peak_rss_mb']:.1f} MB | {r['rss_growth_second_half_mb']:+.2f} MB | "
            f"{r['blocks_growth_per_1000_events']:+.0f} | {r['traced_peak_mb']:.2f} MB | {r['not_delivered']} |"
        )
    # Goal rows: per spool setting and figure, the builds next to each other.
    for spool in (True, False):
        rows = [r for r in results if r["spool"] == spool]
        label = "spool on" if spool else "spool off"
        goals += [
            GoalRow(
                "Dispatcher",
                r["build"],
                f"delivered events/s per worker ({label})",
                f"{r['events_per_s']:,.0f} /s",
                "—",
                "—",
                f"≥ {DISPATCH_EVENTS_GOAL:,.0f} /s",
                r["events_per_s"] >= DISPATCH_EVENTS_GOAL,
            )
            for r in rows
        ]
        goals += [
            GoalRow(
                "Dispatcher",
                r["build"],
                f"CPU per delivered event ({label})",
                f"{r['cpu_us_per_event']:,.0f} µs",
                "—",
                "—",
                "reported",
                None,
            )
            for r in rows
        ]
        goals += [
            GoalRow(
                "Dispatcher",
                r["build"],
                f"bounded memory ({label})",
                f"RSS {r['rss_growth_second_half_mb']:+.2f} MB; "
                f"{r['blocks_growth_per_1000_events']:+.0f} blocks retained / 1,000 events",
                f"peak RSS {r['peak_rss_mb']:.0f} MB",
                "—",
                f"≤ {BOUNDED_RSS_GROWTH_MB:g} MB, ≤ {BOUNDED_BLOCKS_PER_1000_EVENTS:g} blocks",
                r["rss_growth_second_half_mb"] <= BOUNDED_RSS_GROWTH_MB
                and r["blocks_growth_per_1000_events"] <= BOUNDED_BLOCKS_PER_1000_EVENTS,
            )
            for r in rows
        ]
    return [*lines, ""], goals


def run_micro_compiled(
    compiled: CompiledBuild, quick: bool, progress: Callable[[str], None]
) -> list[micro.MicroFigure]:
    """The micro benchmarks in the compiled copy (this process already imported the pure-Python gateway)."""
    assert compiled.root is not None
    command = [sys.executable, "-m", "benchmarks.micro", "--json", "--build", "compiled"]
    command += ["--quick"] if quick else []
    with tempfile.TemporaryFile() as stdout:
        process = subprocess.Popen(
            command,
            cwd=compiled.root,
            env=subprocess_env(compiled.env()),
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert process.stderr is not None
        errors: list[str] = []
        for line in process.stderr:  # progress lines, and the traceback if it fails
            errors.append(line.rstrip())
            if line.startswith("  "):
                progress(f"  [compiled]{line.rstrip()[1:]}")
        if process.wait(timeout=900) != 0:
            raise RuntimeError(f"exit {process.returncode}: {errors[-1] if errors else 'no output'}")
        stdout.seek(0)
        output = json.loads(stdout.read().decode().strip().splitlines()[-1])
    return [micro.MicroFigure(**figure) for figure in output["figures"]]


def check_dispatch_build(result: Mapping[str, Any], build: BuildKind, compiled: CompiledBuild | None) -> None:
    module = "gateway.delivery.dispatcher"
    essential = [module] if compiled is not None and module in compiled.modules else []
    require_build(build, result.get("compiled_modules", []), essential, f"bench_dispatch ({build})")


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def _update_readme(readme: Path, goals_block: list[str]) -> bool:
    """Replace the goals table between the markers of ``readme``; False when it has none."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return False
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start == -1 or end < start:
        return False
    new = text[: start + len(MARK_START)] + "\n" + "\n".join(goals_block) + "\n" + text[end:]
    readme.write_text(new, encoding="utf-8")
    return True


def _builds_line(compiled: CompiledBuild | None, skipped: str) -> str:
    if compiled is None or not compiled.available:
        return f"Build: **pure Python** only; the compiled build was not measured ({skipped})."
    return (
        "Builds: **pure Python** (the default wheel) and **compiled** (the opt-in mypyc build, "
        f"`HATCH_BUILD_HOOKS_ENABLE=1`, {len(compiled.modules)} request-path modules compiled), measured in the same "
        "run against the same references."
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run (figures too short to trust)")
    parser.add_argument("--output", type=Path, default=HERE / "results.md")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-macro", action="store_true", help="skip the wrk/nginx load runs")
    parser.add_argument("--skip-dispatch", action="store_true")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk/nginx")
    parser.add_argument("--no-compiled", action="store_true", help="measure the pure-Python build only")
    parser.add_argument(
        "--compiled-dir",
        type=Path,
        help="build the compiled copy in this directory and keep it; reused when the sources are unchanged "
        "(default: a temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--update-readme", action="store_true", help="copy the goals table into benchmarks/README.md and README.md"
    )
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    log: Callable[[str], None] = lambda text: print(text, flush=True)  # noqa: E731

    started_at = time.monotonic()
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    loads = [f"start {_load()}"]
    notes: list[str] = []

    # Sections and goal rows by area, assembled in this order whatever ran first.
    order = ("middleware", "stages", "proxy", "dispatcher", "micro")
    sections: dict[str, list[str]] = {}
    goal_rows: dict[str, list[GoalRow]] = {}

    tools: macro.ToolStatus | None = None
    if not args.skip_macro:
        tools = macro.ensure_tools(install=not args.no_install)
        if tools.note:
            notes.append(tools.note + ".")
            log(f"tools: {tools.note}")

    with contextlib.ExitStack() as stack:
        # The compiled copy first, so its CPU-heavy build overlaps no measurement.
        compiled: CompiledBuild | None = None
        skipped = "--no-compiled"
        if not args.no_compiled:
            log("compiled build (mypyc) ...")
            compiled = stack.enter_context(compiled_build(args.compiled_dir, progress=log))
            log(f"  {compiled.describe()}")
            if not compiled.available:
                skipped = compiled.note
                notes.append(f"Compiled build skipped, only pure Python measured: {compiled.note}.")
                compiled = None
            loads.append(f"after the compiled build {_load()}")

        def compiled_failed(what: str, exc: BaseException) -> None:
            log(f"  {what} failed for the compiled build: {exc}")
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            notes.append(f"{what}: the compiled build failed ({reason}); its rows are missing.")

        def with_pure_fallback(
            what: str, measure: Callable[[CompiledBuild | None], dict[str, Summary]]
        ) -> dict[str, Summary]:
            """Both builds; if the compiled one fails, the section is measured for the pure build all the same."""
            try:
                return measure(compiled)
            except (OSError, RuntimeError, TimeoutError) as exc:
                if compiled is None:
                    raise
                compiled_failed(what, exc)
                return measure(None)

        if not args.skip_micro:
            log("micro benchmarks ...")
            figures = {PURE: micro.run(quick=mode.micro_quick, progress=log, build=PURE)}
            if compiled is not None:
                log("micro benchmarks, compiled build (own process in the compiled copy) ...")
                try:
                    figures[COMPILED] = run_micro_compiled(compiled, mode.micro_quick, log)
                except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as exc:
                    compiled_failed("Micro benchmarks", exc)
            sections["micro"], goal_rows["micro"] = micro_section(figures)
            loads.append(f"after micro {_load()}")

        if args.skip_macro:
            notes.append("Load benchmarks skipped (--skip-macro).")
        elif tools is None or tools.wrk is None:
            notes.append("Middleware and proxy load benchmarks skipped: wrk is not available.")
        else:
            wrk = tools.wrk
            log("middleware mode under load ...")

            def middleware(with_compiled: CompiledBuild | None) -> dict[str, Summary]:
                return macro.run_middleware(
                    wrk,
                    runs=mode.middleware_runs,
                    seconds=mode.middleware_seconds,
                    warmup=mode.warmup,
                    compiled=with_compiled,
                    progress=log,
                )

            middleware_results = with_pure_fallback("Middleware mode", middleware)
            sections["middleware"], goal_rows["middleware"] = middleware_section(middleware_results, mode)
            loads.append(f"after middleware {_load()}")
            log("per-stage breakdown under load ...")

            def stages(with_compiled: CompiledBuild | None) -> dict[str, Summary]:
                return macro.run_stages(wrk, warmup=mode.warmup, compiled=with_compiled, progress=log)

            sections["stages"] = stages_section(with_pure_fallback("Per-stage breakdown", stages))
            loads.append(f"after the stage breakdown {_load()}")
            if tools.nginx is None:
                notes.append("Proxy-mode load benchmark skipped: nginx is not available.")
            else:
                nginx = tools.nginx
                log("proxy mode under load ...")

                def proxy(with_compiled: CompiledBuild | None) -> dict[str, Summary]:
                    return bench_proxy.run(
                        wrk,
                        nginx,
                        runs=mode.proxy_runs,
                        seconds=mode.proxy_seconds,
                        warmup=mode.warmup,
                        compiled=with_compiled,
                        progress=log,
                    )

                proxy_results = with_pure_fallback("Proxy mode", proxy)
                sections["proxy"], goal_rows["proxy"] = proxy_section(proxy_results, mode)
                loads.append(f"after proxy {_load()}")

        if not args.skip_dispatch:
            log("dispatcher ...")
            dispatched = []
            builds: list[tuple[BuildKind, Path]] = [(PURE, REPO)]
            if compiled is not None and compiled.root is not None:
                builds.append((COMPILED, compiled.root))
            for build, checkout in builds:
                try:
                    rows = []
                    for spool in (True, False):
                        result = run_dispatch(mode.dispatch_seconds, spool, checkout)
                        check_dispatch_build(result, build, compiled)
                        log(
                            f"  {build:<11} spool {'on ' if spool else 'off'}: {result['events_per_s']:,.0f} events/s, "
                            f"{result['cpu_us_per_event']:,.0f} µs CPU/event, peak RSS {result['peak_rss_mb']:.1f} MB"
                        )
                        rows.append({**result, "build": build})
                except (OSError, RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as exc:
                    if build == PURE:
                        raise
                    compiled_failed("Dispatcher", exc)
                else:
                    dispatched += rows
            sections["dispatcher"], goal_rows["dispatcher"] = dispatch_section(dispatched, mode)
    loads.append(f"end {_load()}")
    goals = [row for area in ("middleware", "micro", "proxy", "dispatcher") for row in goal_rows.get(area, [])]

    finished = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = machine_section(tools, started, finished, loads, compiled=compiled, skipped=skipped)
    minutes = (time.monotonic() - started_at) / 60
    title = "# Benchmark results" + (" (QUICK smoke run: too short to trust)" if args.quick else "")
    goals_block = [
        f"Measured {finished} ({mode.name} run, {minutes:.1f} min) on: {_cpu_model()}, {os.cpu_count()} CPUs, "
        f"{_python_build()}; load average {loads[0].removeprefix('start ')} at the start.",
        "",
        _builds_line(compiled, skipped),
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
        "## Goals (GitHub issues 7 and 17)",
        "",
        *goals_block,
        "",
        *(["Notes: " + " ".join(notes), ""] if notes else []),
        *machine,
        *(line for area in order for line in sections.get(area, [])),
    ]
    args.output.write_text("\n".join(text).rstrip() + "\n", encoding="utf-8")
    log(f"wrote {args.output} ({minutes:.1f} min)")
    if args.update_readme:
        for readme in READMES:
            name = readme.relative_to(REPO)
            log(
                f"updated {name}" if _update_readme(readme, goals_block) else f"{name}: no results markers; not updated"
            )
    print("\n".join(_goal_table(goals)))


if __name__ == "__main__":
    main()
