"""Loopback load with wrk: processes, nginx, CPU accounting, interleaved runs; and the middleware-mode benchmark.

Method (docs/testing.md): every server runs as its own process on 127.0.0.1 (uvicorn: one worker, httptools,
uvloop, no access log, no proxy headers; nginx: one worker process, access log off). All servers of a group stay up
for the whole group and wrk (``-t1 -c64 --latency``) visits them in rotating order (A B C, B C A, ...), so machine
noise hits every configuration alike; each figure is the median over the runs. For every run the CPU seconds of
wrk (``wait4`` rusage) and of each server process tree (``/proc/<pid>/stat`` utime+stime) are recorded, so a
saturated load generator or a busy helper process (collector, upstream) is visible next to the numbers.

Middleware mode (:func:`run_middleware`): ``raw`` ASGI app (floor), bare ``starlette`` app (the 1.00 reference),
the same app inside ``PrivacyGateway`` with Plausible + GA4 destinations really delivering to a local collector
(``gateway``), and with no destinations (``gateway-nodest``: events built and handed to a dispatcher without
lanes), which isolates the request-path cost from the delivery cost. Given a compiled build
(:mod:`benchmarks.compiled`), both gateway configurations also run from the mypyc-compiled copy
(``gateway-compiled``, ``gateway-nodest-compiled``) in the same rounds; every gateway server is checked (by its
memory maps) to run the build it is labelled with.

The realistic row (issue 17): a Django site rendering a ~10 KB page from a template (``django``, its own reference)
and the same site inside ``PrivacyGateway`` with no destinations (``django-gateway``, and ``-compiled``): the share
of a real app's CPU that the gateway takes. A Django worker runs its sync view in a thread beside the event loop;
left to the scheduler, the two threads wander between the two cores and the same page measured 130-230 req/s from
one second to the next. So these servers are pinned to one core and wrk to the other, wrk keeps one request in
flight (the page's own cost, no queue), and many short rounds alternate the configurations: the figure is the
median of each round's ratio to the bare page (:func:`paired_ratio`).

    python -m benchmarks.macro [--duration 10] [--runs 5] [--compiled [--compiled-dir DIR]]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "gateway" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.apps import CONFIG_ENV
from benchmarks.common import (
    PAGE_PATH,
    PAGE_QUERY,
    REQUEST_HEADERS,
    build_geo_database,
    cookie_header,
    gateway_settings,
    load,
    to_toml,
    write_wrk_script,
)
from benchmarks.compiled import COMPILED, PURE, BuildKind, CompiledBuild, check_process, compiled_build_if_asked

__all__ = [
    "Config",
    "RunResult",
    "Service",
    "Summary",
    "ToolStatus",
    "ensure_tools",
    "free_port",
    "interleave",
    "paired_ratio",
    "run_middleware",
    "run_stages",
    "start_nginx",
    "start_process",
    "start_uvicorn",
]

REPO: Final = Path(__file__).resolve().parents[1]
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
WRK_CONNECTIONS: Final = 64
WRK_THREADS: Final = 1
# The Django rows: server on one core, wrk on the other (when both exist and `taskset` is there), one connection,
# many short rounds (see the module docstring).
SERVER_CPU: Final = "1"
CLIENT_CPU: Final = "0"
DJANGO_CONNECTIONS: Final = 1
DJANGO_ROUNDS: Final = 15
DJANGO_SECONDS: Final = 2.0


def pinning_available() -> bool:
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2


def pinned(command: Sequence[str], cpu: str | None) -> list[str]:
    """``command`` run on one core (``taskset -c``), or as it is when ``cpu`` is None."""
    return ["taskset", "-c", cpu, *command] if cpu is not None else list(command)


# The paced latency runs send at this fraction of the slowest compared configuration's wrk throughput (rounded down
# to a hundred), the same rate to every configuration: below every one's saturation, so latency there is the cost
# of a request, not the length of wrk's queue.
PACED_FRACTION: Final = 0.25


def paced_seconds(wrk_seconds: float) -> float:
    """How long each paced run lasts: half a wrk run (latency percentiles settle sooner than throughput)."""
    return max(1.0, wrk_seconds / 2)


# A first visit's Cookie header: one of the site's own cookies, no consent or analytics id yet.
FIRST_VISIT_COOKIE: Final = "theme=dark"
BANNER_MARKER: Final = b'id="pg-banner"'  # in the banner's markup (gateway/banner/banner.html), not in the footer's
# [dispatch] queue_size of the delivering gateway in middleware mode (see run_middleware).
DELIVERING_QUEUE_SIZE: Final = 1000
MIDDLEWARE_LABELS: Final = {
    "raw": "raw ASGI app (uvicorn floor)",
    "starlette": "Starlette app, bare (reference)",
    "gateway": "Starlette + gateway, Plausible + GA4 delivering to a local collector",
    "gateway-nodest": "Starlette + gateway, no destinations",
    "passthrough": "Starlette + pass-through pure-ASGI middleware (wraps send, nothing else)",
    "naive-cached": "Starlette + the issue's reference privacy middleware (cached; fewer features)",
    "gateway-compiled": "Starlette + gateway (compiled), Plausible + GA4 delivering to a local collector",
    "gateway-nodest-compiled": "Starlette + gateway (compiled), no destinations",
    "gateway-first": "Starlette + gateway, no destinations, first visit (no choice yet: the banner is injected)",
    "gateway-first-compiled": "Starlette + gateway (compiled), no destinations, first visit (banner injected)",
    "django": "Django app, bare (a template rendering a ~10 KB page)",
    "django-gateway": "Django app + gateway, no destinations",
    "django-gateway-compiled": "Django app + gateway (compiled), no destinations",
}

# --------------------------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ToolStatus:
    wrk: str | None  # path, or None when unavailable
    nginx: str | None
    note: str  # what was installed or why something is missing


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.is_file()), None
    )


def ensure_tools(install: bool = True) -> ToolStatus:
    """wrk and nginx from Debian; installed with apt-get only when missing, allowed, and running as root."""
    missing = [name for name in ("wrk", "nginx") if _find(name) is None]
    note = ""
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        try:
            done = subprocess.run(command, env=env, capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            note = f"apt-get install {' '.join(missing)} failed: {exc}"
        else:
            note = (
                f"installed {' '.join(missing)} with apt-get"
                if done.returncode == 0
                else f"apt-get install {' '.join(missing)} failed (exit {done.returncode}; offline?)"
            )
    elif missing:
        note = f"{' and '.join(missing)} not installed (apt-get install {' '.join(missing)} needs root)"
    return ToolStatus(_find("wrk"), _find("nginx"), note)


def tool_version(path: str | None, flag: str) -> str:
    if path is None:
        return "not installed"
    try:
        done = subprocess.run([path, flag], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


# --------------------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()  # fields after the command name; utime is field 14 overall
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class Service:
    """A server process (and its children, e.g. nginx workers) started for a benchmark, stopped by PID."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log = log
        self._tree: list[int] = [process.pid]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def refresh_tree(self) -> None:
        self._tree = [self.process.pid, *_children(self.process.pid)]

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self._tree)

    def stop(self) -> None:
        if self.process.poll() is None:
            # nginx: SIGQUIT is the graceful stop; everything else stops on SIGTERM.
            self.process.send_signal(signal.SIGQUIT if self.name.startswith("nginx") else signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_http(service: Service, path: str, timeout: float = 30.0) -> None:
    """Poll until ``path`` answers (any HTTP status); raise with the log tail if the process dies or times out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with code {service.process.returncode}:\n{service.tail()}")
        try:
            with urllib.request.urlopen(f"{service.url}{path}", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{service.name} did not answer on {service.url}{path} within {timeout}s ({last})")


def start_process(
    name: str,
    command: Sequence[str],
    port: int,
    directory: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/",
    cwd: Path = REPO,
) -> Service:
    """Start ``command`` in ``cwd`` (which is also its ``PYTHONPATH``) and wait until ``ready_path`` answers.

    ``cwd``: the checkout whose ``gateway`` and ``benchmarks`` packages the process imports: this repository
    (pure Python) or a compiled copy (:mod:`benchmarks.compiled`); ``python -m`` puts it first on ``sys.path``.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(cwd)})
    full_env.update(env or {})
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env, cwd=cwd
        )
    service = Service(name, process, port, log)
    try:
        _wait_http(service, ready_path)
    except BaseException:
        service.stop()
        raise
    service.refresh_tree()
    return service


def start_uvicorn(
    name: str,
    factory: str,
    directory: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/",
    cwd: Path = REPO,
    cpu: str | None = None,
) -> Service:
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port),
        "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--no-proxy-headers", "--log-level", "warning",
    ]  # fmt: skip
    return start_process(name, pinned(command, cpu), port, directory, env=env, ready_path=ready_path, cwd=cwd)


def start_nginx(name: str, nginx: str, directory: Path, server_block: str, *, ready_path: str = "/") -> Service:
    """One unprivileged-style nginx (``-p DIR``, ``daemon off``, one worker) with the given ``server { }`` body.

    ``{port}`` in ``server_block`` is replaced by the port it listens on.
    """
    root = directory / name
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    temp = {kind: root / f"{kind}_temp" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
        path.chmod(0o777)  # workers run as "nobody" when started by root
    conf = root / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {root / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/html;
    types {{ text/html html; }}
    keepalive_requests 1000000;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
{server_block.replace("{port}", str(port))}
}}
""",
        encoding="utf-8",
    )
    return start_process(name, [nginx, "-c", str(conf), "-p", str(root)], port, directory, ready_path=ready_path)


# --------------------------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RunResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors + non-2xx/3xx answers
    seconds: float  # wall clock of the wrk run
    wrk_cpu_s: float
    cpu_s: Mapping[str, float]  # per measured service


_UNITS: Final = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_PERCENTILE = re.compile(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_TOTAL = re.compile(r"(\d+) requests in ")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(text: str) -> tuple[float, float, float, int, int]:
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    percentiles = {m.group(1): float(m.group(2)) * _UNITS[m.group(3)] for m in _PERCENTILE.finditer(text)}
    if rps is None or total is None or set(percentiles) != {"50", "99"}:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    socket_errors = _SOCKET_ERRORS.search(text)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    non_2xx = _NON_2XX.search(text)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return float(rps.group(1)), percentiles["50"], percentiles["99"], int(total.group(1)), errors


@dataclasses.dataclass(frozen=True, slots=True)
class _ClientRun:
    output: str
    seconds: float  # wall clock of the client process
    client_cpu_s: float
    cpu_s: Mapping[str, float]  # per measured service


def _run_client(what: str, command: Sequence[str], measured: Sequence[Service], cwd: Path | None = None) -> _ClientRun:
    """Run a load generator to completion; its output, its own CPU and each measured service's CPU meanwhile."""
    before = {service.name: service.cpu_seconds() for service in measured}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert process.stdout is not None
    output = process.stdout.read().decode(errors="replace")
    process.stdout.close()
    # wait4 reaps the client and returns its own rusage: the load generator's CPU, separate from everything else.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    after = {service.name: service.cpu_seconds() for service in measured}
    if process.returncode != 0:
        raise RuntimeError(f"{what} exited with {process.returncode}:\n{output}")
    return _ClientRun(output, wall, usage.ru_utime + usage.ru_stime, {k: after[k] - before[k] for k in after})


def run_wrk(
    wrk: str,
    url: str,
    script: Path,
    seconds: float,
    measured: Sequence[Service],
    *,
    connections: int = WRK_CONNECTIONS,
    cpu: str | None = None,
) -> RunResult:
    command = [
        wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script),
        url,
    ]  # fmt: skip
    run = _run_client("wrk", pinned(command, cpu), measured)
    rps, p50, p99, total, errors = parse_wrk(run.output)
    return RunResult(rps, p50, p99, total, errors, run.seconds, run.client_cpu_s, run.cpu_s)


@dataclasses.dataclass(frozen=True, slots=True)
class PacedResult:
    """One run of :mod:`benchmarks.paced` (latency at a fixed rate, from scheduled send times)."""

    rate: float
    requests: int
    errors: int
    late: int  # slots already past when the connection was free (the server or the client fell behind)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    seconds: float  # wall clock of the client process
    client_cpu_s: float
    cpu_s: Mapping[str, float]  # per measured service


def run_paced(
    url: str, headers: Sequence[tuple[str, str]], rate: float, seconds: float, measured: Sequence[Service]
) -> PacedResult:
    """One paced run: the client in its own process (its CPU from wait4, like wrk's), JSON figures on stdout."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.paced",
        "--url",
        url,
        "--rate",
        f"{rate:g}",
        "--seconds",
        f"{seconds:g}",
    ]
    for name, value in headers:
        command += ["--header", f"{name}: {value}"]
    run = _run_client("the paced client", command, measured, cwd=REPO)
    figures = json.loads(run.output)
    return PacedResult(
        rate,
        int(figures["requests"]),
        int(figures["errors"]),
        int(figures["late"]),
        figures["p50_ms"],
        figures["p90_ms"],
        figures["p99_ms"],
        figures["max_ms"],
        run.seconds,
        run.client_cpu_s,
        run.cpu_s,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    name: str
    label: str
    url: str  # the full URL wrk requests
    script: Path
    measured: tuple[Service, ...]  # the server under test first, then helpers (collector, upstream)
    before_run: Callable[[], None] | None = None  # called right before each run (e.g. to read counters)
    after_run: Callable[[], Mapping[str, float]] | None = None  # extra counters read after each run
    headers: tuple[tuple[str, str], ...] = ()  # the request headers of the wrk script, for the paced client
    connections: int = WRK_CONNECTIONS
    client_cpu: str | None = None  # wrk pinned to this core (the server is pinned to another)


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    name: str
    label: str
    server: str  # the measured service under test (the others in RunResult.cpu_s are helpers)
    runs: tuple[RunResult, ...]
    extras: tuple[Mapping[str, float], ...]
    totals: Mapping[str, float] = dataclasses.field(default_factory=dict)  # counters read once after all runs
    paced: tuple[PacedResult, ...] = ()  # latency at a fixed rate below saturation (middleware mode)

    @property
    def paced_rate(self) -> float:
        return self.paced[0].rate if self.paced else 0.0

    @property
    def paced_p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.paced)

    @property
    def paced_p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.paced)

    def paced_cpu_us_per_request(self, service: str) -> float:
        """CPU per request of ``service`` at the paced rate (below saturation), median over the paced runs."""
        return statistics.median(1e6 * r.cpu_s.get(service, 0.0) / max(1, r.requests) for r in self.paced)

    @property
    def paced_errors(self) -> int:
        return sum(r.errors for r in self.paced)

    @property
    def paced_late_pct(self) -> float:
        return statistics.median(100.0 * r.late / max(1, r.requests) for r in self.paced)

    @property
    def rps(self) -> float:
        return statistics.median(r.requests_per_s for r in self.runs)

    @property
    def rps_range(self) -> tuple[float, float]:
        return min(r.requests_per_s for r in self.runs), max(r.requests_per_s for r in self.runs)

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def wrk_cpu_pct(self) -> float:
        return statistics.median(100 * r.wrk_cpu_s / r.seconds for r in self.runs)

    def cpu_pct(self, service: str) -> float:
        return statistics.median(100 * r.cpu_s.get(service, 0.0) / r.seconds for r in self.runs)

    def cpu_us_per_request(self, service: str) -> float:
        return statistics.median(1e6 * r.cpu_s.get(service, 0.0) / max(1, r.requests) for r in self.runs)

    def extra(self, key: str) -> float:
        values = [e[key] for e in self.extras if key in e]
        return statistics.median(values) if values else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "label": self.label,
            "server": self.server,
            "rps": self.rps,
            "rps_range": self.rps_range,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": self.errors,
            "wrk_cpu_pct": self.wrk_cpu_pct,
            "runs": [dataclasses.asdict(r) for r in self.runs],
            "extras": [dict(e) for e in self.extras],
            "totals": dict(self.totals),
            "paced": [dataclasses.asdict(r) for r in self.paced],
        }


def interleave(
    wrk: str,
    configs: Sequence[Config],
    *,
    runs: int,
    seconds: float,
    warmup: float,
    progress: Callable[[str], None] = print,
) -> dict[str, Summary]:
    """Warm every config up once, then ``runs`` rounds in rotating order; a Summary per config name."""
    for config in configs:
        if config.before_run is not None:
            config.before_run()
        run_wrk(
            wrk, config.url, config.script, warmup, config.measured,
            connections=config.connections, cpu=config.client_cpu,
        )  # fmt: skip
        if config.after_run is not None:
            config.after_run()
    results: dict[str, list[RunResult]] = {c.name: [] for c in configs}
    extras: dict[str, list[Mapping[str, float]]] = {c.name: [] for c in configs}
    for round_index in range(runs):
        shift = round_index % len(configs)
        for config in [*configs[shift:], *configs[:shift]]:
            if config.before_run is not None:
                config.before_run()
            result = run_wrk(
                wrk, config.url, config.script, seconds, config.measured,
                connections=config.connections, cpu=config.client_cpu,
            )  # fmt: skip
            results[config.name].append(result)
            if config.after_run is not None:
                extras[config.name].append(config.after_run())
            server = config.measured[0].name
            progress(
                f"  round {round_index + 1}/{runs} {config.name:<25} {result.requests_per_s:9.0f} req/s  "
                f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                f"{server} CPU {100 * result.cpu_s[server] / result.seconds:4.0f}%  "
                f"wrk CPU {100 * result.wrk_cpu_s / result.seconds:4.0f}%"
                + (f"  errors {result.errors}" if result.errors else "")
            )
    return {
        c.name: Summary(c.name, c.label, c.measured[0].name, tuple(results[c.name]), tuple(extras[c.name]))
        for c in configs
    }


def paired_ratio(reference: Summary, other: Summary) -> float:
    """Median over rounds of ``other``'s throughput / ``reference``'s in the same round (interleaved runs)."""
    return statistics.median(
        o.requests_per_s / r.requests_per_s for r, o in zip(reference.runs, other.runs, strict=True)
    )


def paired_added_cpu(reference: Summary, other: Summary) -> float:
    """Median over rounds of ``other``'s server CPU per request minus ``reference``'s in the same round: a dip of the
    machine in one round moves both sides of that round's difference, not the comparison of two medians."""
    return statistics.median(
        1e6
        * (
            o.cpu_s.get(other.server, 0.0) / max(1, o.requests)
            - r.cpu_s.get(reference.server, 0.0) / max(1, r.requests)
        )
        for r, o in zip(reference.runs, other.runs, strict=True)
    )


def spread(summary: Summary) -> float:
    """How far the throughput moved between rounds: (max - min) / median of the rounds' req/s."""
    rates = [run.requests_per_s for run in summary.runs]
    return (max(rates) - min(rates)) / statistics.median(rates) if rates else 0.0


def paced_rounds(
    configs: Sequence[Config],
    rate: float,
    *,
    runs: int,
    seconds: float,
    progress: Callable[[str], None] = print,
) -> dict[str, tuple[PacedResult, ...]]:
    """``runs`` rounds of paced runs at ``rate``, in rotating order like :func:`interleave`."""
    results: dict[str, list[PacedResult]] = {c.name: [] for c in configs}
    for round_index in range(runs):
        shift = round_index % len(configs)
        for config in [*configs[shift:], *configs[:shift]]:
            if config.before_run is not None:
                config.before_run()
            result = run_paced(config.url, config.headers, rate, seconds, config.measured)
            results[config.name].append(result)
            if config.after_run is not None:
                config.after_run()  # e.g. wait until a delivering gateway's backlog is delivered
            progress(
                f"  paced {round_index + 1}/{runs} {config.name:<25} {rate:6.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                f"p99 {result.p99_ms:6.2f} ms  max {result.max_ms:6.1f} ms  late {result.late}"
                + (f"  errors {result.errors}" if result.errors else "")
            )
    return {name: tuple(values) for name, values in results.items()}


def fetch(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def gateway_dispatch_totals(gateway: Service) -> dict[str, float]:
    """The gateway's dispatch counters from ``/_privacy/metrics`` (loopback is allowed), summed over destinations."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = fetch(f"{gateway.url}/_privacy/metrics")
    if status != 200:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("gateway_dispatch_") and sample.name.endswith("_total"):
                key = sample.name.removeprefix("gateway_dispatch_").removesuffix("_total")
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def collector_counts(collector: Service) -> dict[str, float]:
    _, body = fetch(f"{collector.url}/_count")
    counts: dict[str, float] = json.loads(body)
    return counts


# --------------------------------------------------------------------------------------------------------------
# middleware mode
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _services() -> Iterator[list[Service]]:
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in reversed(started):
            service.stop()


def _wait_delivered(collector: Service, events: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while collector_counts(collector)["events"] < events:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not deliver {events} events to the collector within {timeout}s")
        time.sleep(0.05)


def _wait_drained(collector: Service, quiet: float = 0.5, timeout: float = 60.0) -> float:
    """Wait until the collector has received nothing for ``quiet`` seconds; return how long that took."""
    started = time.monotonic()
    count = collector_counts(collector)["requests"]
    quiet_since = started
    while time.monotonic() - started < timeout:
        time.sleep(0.1)
        now = collector_counts(collector)["requests"]
        if now != count:
            count, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet:
            break
    return time.monotonic() - started - quiet


def _check_page(
    url: str, cookie: str, *, must_contain: Sequence[bytes], must_not_contain: Sequence[bytes] = ()
) -> None:
    status, body = fetch(url, {**dict(REQUEST_HEADERS), "Cookie": cookie})
    missing = [m for m in must_contain if m not in body]
    unwanted = [m for m in must_not_contain if m in body]
    if status != 200 or missing or unwanted:
        raise RuntimeError(f"{url}: sanity check failed: HTTP {status}, missing {missing}, unwanted {unwanted}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Server:
    """One middleware-mode configuration's server: what it serves, from which checkout, measured as which build."""

    name: str
    factory: str
    config: Path | None = None  # the gateway's settings file
    script: Path | None = None  # its wrk script (cookies signed with its key); None: the reference's
    build: BuildKind | None = None  # None: not a gateway (raw, bare Starlette), always from this checkout
    cwd: Path = REPO
    delivering: bool = False
    settings_file: Path | None = None  # a settings file for a non-gateway app (the reference middleware)
    cookie: str | None = None  # the Cookie header its requests send; None: a returning visitor's (cookie_header)


def run_middleware(
    wrk: str,
    *,
    runs: int,
    seconds: float,
    warmup: float,
    include_raw: bool = True,
    include_references: bool = True,
    compiled: CompiledBuild | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Summary]:
    """Middleware mode: every configuration up at once, interleaved runs, one Summary per configuration name.

    With a ``compiled`` build, the two gateway configurations run a second time from the compiled copy
    (``gateway-compiled``, ``gateway-nodest-compiled``) in the same rounds, against the same bare-Starlette reference.
    ``include_references``: also the pass-through middleware and the issue's reference privacy middleware
    (benchmarks/apps.py), to calibrate this machine against the issue's table. After the wrk rounds, every
    configuration gets the same paced runs (:mod:`benchmarks.paced`) at one rate below saturation.
    """
    with tempfile.TemporaryDirectory(prefix="bench-mw-") as tmp, _services() as services:
        directory = Path(tmp)
        geo = build_geo_database(directory)
        collector = start_uvicorn("collector", "benchmarks.apps:collector_app", directory, ready_path="/_count")
        services.append(collector)

        def gateway_server(
            name: str, delivering: bool, build: BuildKind, cwd: Path, *, first_visit: bool = False
        ) -> _Server:
            sub = directory / name
            sub.mkdir()
            # Delivering: every request is a page view, two events each, far more than one worker can deliver.
            # A small queue and no spool bound the backlog (the rest is dropped and counted), so what is left
            # after a run drains in seconds and does not steal CPU from the next configuration's run.
            table = gateway_settings(
                sub,
                geo,
                collector_url=collector.url if delivering else None,
                spool=not delivering,
                queue_size=DELIVERING_QUEUE_SIZE if delivering else None,
            )
            config_path = sub / "gateway.toml"
            config_path.write_text(to_toml(table), encoding="utf-8")
            # A first visit: no consent or analytics-id cookie yet (only one of the site's own), so the banner opens.
            cookie = FIRST_VISIT_COOKIE if first_visit else cookie_header(load(config_path))
            script = write_wrk_script(sub / "wrk.lua", cookie)
            factory = (
                "benchmarks.apps:django_gateway_app" if name.startswith("django") else "benchmarks.apps:gateway_app"
            )
            return _Server(
                name,
                factory,
                config_path,
                script,
                build,
                cwd,
                delivering,
                cookie=FIRST_VISIT_COOKIE if first_visit else None,
            )

        servers_wanted = [
            *([_Server("raw", "benchmarks.apps:raw_app")] if include_raw else []),
            _Server("starlette", "benchmarks.apps:starlette_app"),
            gateway_server("gateway", True, PURE, REPO),
            gateway_server("gateway-nodest", False, PURE, REPO),
            gateway_server("gateway-first", False, PURE, REPO, first_visit=True),
        ]
        if include_references:
            # Calibration: the floor of any response-watching middleware, and the issue's own reference design.
            nodest_settings = next(s.config for s in servers_wanted if s.name == "gateway-nodest")
            servers_wanted += [
                _Server("passthrough", "benchmarks.apps:passthrough_app"),
                _Server("naive-cached", "benchmarks.apps:naive_cached_app", settings_file=nodest_settings),
            ]
        # The realistic row (issue 17): a Django page that costs what a real app's page costs, with and without the
        # gateway (no destinations, so the figure is the request path's share of the app's CPU).
        servers_wanted += [
            _Server("django", "benchmarks.apps:django_app"),
            gateway_server("django-gateway", False, PURE, REPO),
        ]
        if compiled is not None and compiled.root is not None:
            servers_wanted += [
                gateway_server("gateway-compiled", True, COMPILED, compiled.root),
                gateway_server("gateway-nodest-compiled", False, COMPILED, compiled.root),
                gateway_server("gateway-first-compiled", False, COMPILED, compiled.root, first_visit=True),
                gateway_server("django-gateway-compiled", False, COMPILED, compiled.root),
            ]
        reference_script = next(s.script for s in servers_wanted if s.script is not None)
        servers: dict[str, Service] = {}
        pin = pinning_available()
        for wanted in servers_wanted:
            settings_file = wanted.config or wanted.settings_file
            env = {CONFIG_ENV: str(settings_file)} if settings_file else {}
            service = start_uvicorn(
                wanted.name,
                wanted.factory,
                directory,
                env=env,
                ready_path=PAGE_PATH,
                cwd=wanted.cwd,
                cpu=SERVER_CPU if pin and wanted.name.startswith("django") else None,
            )
            services.append(service)
            servers[wanted.name] = service
            if wanted.build is not None:  # what the server really loaded, from its memory maps
                check_process(service.process.pid, wanted.build, wanted.name, wanted.cwd)

        target = f"{PAGE_PATH}?{PAGE_QUERY}"
        delivering_config = next(s.config for s in servers_wanted if s.config is not None)
        cookie = cookie_header(load(delivering_config))
        for wanted in servers_wanted:
            if wanted.config is None:
                _check_page(f"{servers[wanted.name].url}{target}", cookie, must_contain=[b"<title>Download Python"])
            else:
                _check_page(
                    f"{servers[wanted.name].url}{target}",
                    wanted.cookie or cookie_header(load(wanted.config)),
                    # A first visit gets the banner; a returning visitor only the settings link.
                    must_contain=[
                        b"<title>Download Python",
                        b"/_privacy/",
                        *([BANNER_MARKER] if wanted.cookie else []),
                    ],
                    must_not_contain=[] if wanted.cookie else [BANNER_MARKER],
                )
        # The sanity requests' page views, to Plausible and to GA4, from every delivering gateway.
        _wait_delivered(collector, 2 * sum(s.delivering for s in servers_wanted))

        def delivered_counter() -> tuple[Callable[[], None], Callable[[], Mapping[str, float]]]:
            """Counters around one delivering run (the collector is shared, and quiet when a run starts)."""
            last = collector_counts(collector)

            def before() -> None:
                nonlocal last
                last = collector_counts(collector)

            def after() -> Mapping[str, float]:
                """Events that reached the collector during the run; then wait until the backlog is delivered."""
                now = collector_counts(collector)
                return {
                    "events_delivered": now["events"] - last["events"],
                    "requests": now["requests"] - last["requests"],
                    "drain_seconds": _wait_drained(collector),
                }

            return before, after

        configs = []
        for wanted in servers_wanted:
            before, after = delivered_counter() if wanted.delivering else (None, None)
            django_row = wanted.name.startswith("django")
            configs.append(
                Config(
                    wanted.name,
                    MIDDLEWARE_LABELS[wanted.name],
                    f"{servers[wanted.name].url}{target}",
                    wanted.script or reference_script,
                    (servers[wanted.name], collector) if wanted.delivering else (servers[wanted.name],),
                    before_run=before,
                    after_run=after,
                    headers=(
                        *REQUEST_HEADERS,
                        ("Cookie", wanted.cookie or (cookie_header(load(wanted.config)) if wanted.config else cookie)),
                    ),
                    connections=DJANGO_CONNECTIONS if django_row else WRK_CONNECTIONS,
                    client_cpu=CLIENT_CPU if pin and django_row else None,
                )
            )
        # A Django page costs milliseconds: the Django configurations are measured on their own (one core, one
        # request in flight, many short rounds: see the module docstring), so they neither drag the Starlette ones'
        # paced rate down nor measure the scheduler.
        django = [c for c in configs if c.name.startswith("django")]
        others = [c for c in configs if not c.name.startswith("django")]
        results = interleave(wrk, others, runs=runs, seconds=seconds, warmup=warmup, progress=progress)
        if django:
            results |= interleave(
                wrk, django, runs=DJANGO_ROUNDS, seconds=DJANGO_SECONDS, warmup=warmup, progress=progress
            )
        slowest = min(results[c.name].rps for c in others if c.name.startswith("gateway"))
        rate = max(100.0, PACED_FRACTION * slowest // 100 * 100)
        paced = paced_rounds(others, rate, runs=runs, seconds=paced_seconds(seconds), progress=progress)
        for name, values in paced.items():
            results[name] = dataclasses.replace(results[name], paced=values)
        for wanted in servers_wanted:
            if wanted.delivering:
                totals = gateway_dispatch_totals(servers[wanted.name])
                results[wanted.name] = dataclasses.replace(results[wanted.name], totals=totals)
        return results


# The per-stage breakdown (issue 17): the same request through the gateway with its stages switched on one at a time.
STAGES: Final = {
    "core": {"banner": {"enabled": False}, "analytics": {"pageviews": "off"}},
    "banner": {"analytics": {"pageviews": "off"}},
    "pageview": {"banner": {"enabled": False}},
    "full": {},
}
STAGE_LABELS: Final = {
    "core": "client IP (resolve, geo, truncate) + consent cookie + cookie guard",
    "banner": "core + banner (settings link injected)",
    "pageview": "core + page view (title, event handed off)",
    "full": "everything (core + banner + page view)",
}
STAGE_ROUNDS: Final = 5
STAGE_SECONDS: Final = 4.0


def run_stages(
    wrk: str,
    *,
    warmup: float,
    compiled: CompiledBuild | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Summary]:
    """Bare Starlette and the gateway (no destinations) with stages switched on one at a time, every server pinned
    to one core and wrk to the other (as the Django rows), interleaved; ``stage-<stage>[-compiled]`` summaries."""
    pin = pinning_available()
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp, _services() as services:
        directory = Path(tmp)
        geo = build_geo_database(directory)
        builds = [(PURE, REPO, "")]
        if compiled is not None and compiled.root is not None:
            builds.append((COMPILED, compiled.root, "-compiled"))
        target = f"{PAGE_PATH}?{PAGE_QUERY}"
        cpu = SERVER_CPU if pin else None
        client_cpu = CLIENT_CPU if pin else None
        bare = start_uvicorn("stage-bare", "benchmarks.apps:starlette_app", directory, ready_path=PAGE_PATH, cpu=cpu)
        services.append(bare)
        configs: list[Config] = []
        for build, cwd, suffix in builds:
            for stage, overrides in STAGES.items():
                name = f"stage-{stage}{suffix}"
                sub = directory / name
                sub.mkdir()
                table = gateway_settings(sub, geo, collector_url=None)
                for section, values in overrides.items():
                    table.setdefault(section, {}).update(values)
                config_path = sub / "gateway.toml"
                config_path.write_text(to_toml(table), encoding="utf-8")
                cookie = cookie_header(load(config_path))
                script = write_wrk_script(sub / "wrk.lua", cookie)
                service = start_uvicorn(
                    name, "benchmarks.apps:gateway_app", directory, env={CONFIG_ENV: str(config_path)},
                    ready_path=PAGE_PATH, cwd=cwd, cpu=cpu,
                )  # fmt: skip
                services.append(service)
                check_process(service.process.pid, build, name, cwd)
                _check_page(f"{service.url}{target}", cookie, must_contain=[b"<title>Download Python"])
                label = f"{STAGE_LABELS[stage]}" + (" (compiled)" if suffix else "")
                configs.append(Config(name, label, f"{service.url}{target}", script, (service,), client_cpu=client_cpu))
        reference_script = configs[0].script
        configs.insert(
            0,
            Config(
                "stage-bare", "bare Starlette", f"{bare.url}{target}", reference_script, (bare,), client_cpu=client_cpu
            ),
        )
        return interleave(wrk, configs, runs=STAGE_ROUNDS, seconds=STAGE_SECONDS, warmup=warmup, progress=progress)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="also measure the mypyc-compiled build")
    parser.add_argument("--compiled-dir", type=Path, help="build the compiled copy here and reuse it next time")
    args = parser.parse_args()
    tools = ensure_tools()
    if tools.wrk is None:
        sys.exit(f"wrk is required: {tools.note}")
    with contextlib.ExitStack() as stack:
        compiled = compiled_build_if_asked(stack, args.compiled, args.compiled_dir, _stderr)
        results = run_middleware(
            tools.wrk, runs=args.runs, seconds=args.duration, warmup=args.warmup, compiled=compiled, progress=_stderr
        )
    if args.json:
        print(json.dumps({k: v.to_json() for k, v in results.items()}, indent=2))
        return
    reference = results["starlette"]
    for summary in results.values():
        if summary.name.startswith("django"):  # its own reference, paired rounds (see the module docstring)
            django = results["django"]
            print(
                f"{summary.name:<25} {summary.rps:9.0f} req/s ({paired_ratio(django, summary):5.3f} of bare Django, "
                f"paired)  CPU {summary.cpu_us_per_request(summary.server):,.0f} µs/page"
            )
            continue
        print(
            f"{summary.name:<25} {summary.rps:9.0f} req/s ({summary.rps / reference.rps:5.2f})  "
            f"p50 {summary.p50_ms:6.2f} ms  p99 {summary.p99_ms:6.2f} ms ({summary.p99_ms / reference.p99_ms:5.2f}x)  "
            f"at {summary.paced_rate:,.0f} req/s: p99 {summary.paced_p99_ms:6.2f} ms "
            f"({summary.paced_p99_ms / reference.paced_p99_ms:5.2f}x)"
        )


if __name__ == "__main__":
    main()
