"""Proxy mode: ``gateway serve`` against the same local upstream hit directly, behind nginx, and a naive httpx proxy.

    python -m benchmarks.bench_proxy [--duration 10] [--runs 3] [--json] [--compiled [--compiled-dir DIR]]

The upstream is an nginx (one worker) serving the 10 KB HTML page as a static file. Configurations, all measured
in one run with wrk (``-t1 -c64``), interleaved, medians of ``--runs`` runs:

- ``direct``: wrk -> upstream nginx (the ceiling);
- ``nginx-proxy``: wrk -> a second nginx (one worker, ``proxy_pass`` with an upstream ``keepalive 64`` pool)
  -> upstream (the 1.00 reference);
- ``gateway``: wrk -> ``python -m gateway serve --config X`` (privacy middleware + reverse proxy, one worker,
  geo database, consent key, banner on, access log off, no destinations: page views are detected and their events
  built, but not delivered) -> upstream;
- ``gateway-compiled`` (given a compiled build, :mod:`benchmarks.compiled`): the same ``gateway serve``, run from
  the mypyc-compiled copy (checked by its memory maps to run the compiled modules);
- ``naive``: wrk -> the naive design the issue measured (Starlette + one shared ``httpx.AsyncClient``, streaming;
  :func:`benchmarks.apps.naive_proxy_app`) under uvicorn -> upstream.

Prints requests/s and p50/p99 latency of each, and the ratios gateway/nginx-proxy (goal >= 0.25) and
gateway/naive (goal >= 10) of each gateway build. Needs wrk and nginx (Debian packages); see
:func:`benchmarks.macro.ensure_tools`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

if __package__ in (None, ""):  # run as a script: make "benchmarks" and "gateway" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    PAGE,
    PAGE_PATH,
    PAGE_QUERY,
    build_geo_database,
    cookie_header,
    gateway_settings,
    load,
    to_toml,
    write_wrk_script,
)
from benchmarks.compiled import COMPILED, PURE, CompiledBuild, check_process, compiled_build_if_asked
from benchmarks.macro import (
    REPO,
    Config,
    Service,
    Summary,
    ensure_tools,
    fetch,
    free_port,
    interleave,
    start_nginx,
    start_process,
    start_uvicorn,
)

__all__ = ["LABELS", "run"]

LABELS: Final = {
    "direct": "upstream nginx, direct (ceiling)",
    "nginx-proxy": "nginx proxy_pass to the upstream (reference)",
    "gateway": "gateway serve (privacy middleware + proxy)",
    "gateway-compiled": "gateway serve (compiled)",
    "naive": "naive proxy: Starlette + shared httpx.AsyncClient",
}

_UPSTREAM_SERVER = """    server {{
        listen 127.0.0.1:{{port}};
        root {root};
        location / {{ index index.html; }}
    }}"""
_PROXY_SERVER = """    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{{port}};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}"""


def run(
    wrk: str,
    nginx: str,
    *,
    runs: int,
    seconds: float,
    warmup: float,
    compiled: CompiledBuild | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Summary]:
    """Every configuration up at once, interleaved runs; a Summary per configuration name (see the module doc)."""
    services: list[Service] = []
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)  # nginx workers run as "nobody" when started by root
        try:
            site = directory / "www"
            (site / PAGE_PATH.strip("/")).mkdir(parents=True)
            (site / PAGE_PATH.strip("/") / "index.html").write_bytes(PAGE)
            for path in (site, *site.rglob("*")):
                path.chmod(0o755 if path.is_dir() else 0o644)
            upstream = start_nginx("nginx-upstream", nginx, directory, _UPSTREAM_SERVER.format(root=site))
            services.append(upstream)
            proxy = start_nginx("nginx-proxy", nginx, directory, _PROXY_SERVER.format(upstream_port=upstream.port))
            services.append(proxy)

            geo = build_geo_database(directory)

            def start_gateway(name: str, cwd: Path) -> tuple[Service, Path]:
                """``gateway serve`` from the checkout ``cwd``, with its own settings (receipts, spool) and script."""
                sub = directory / name
                sub.mkdir()
                config_path = sub / "gateway.toml"
                table = gateway_settings(sub, geo, collector_url=None, upstream_url=upstream.url)
                config_path.write_text(to_toml(table), encoding="utf-8")
                port = free_port()
                command = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--port", str(port)]
                service = start_process(name, command, port, directory, ready_path="/_privacy/healthz", cwd=cwd)
                services.append(service)
                return service, write_wrk_script(sub / "wrk.lua", cookie_header(load(config_path)))

            gateway, script = start_gateway("gateway", REPO)
            check_process(gateway.process.pid, PURE, "gateway")
            gateways = {"gateway": (gateway, script)}
            if compiled is not None and compiled.root is not None:
                gateways["gateway-compiled"] = start_gateway("gateway-compiled", compiled.root)
                pid = gateways["gateway-compiled"][0].process.pid
                check_process(pid, COMPILED, "gateway-compiled", compiled.root)
            naive = start_uvicorn(
                "naive", "benchmarks.apps:naive_proxy_app", directory, env={"BENCH_UPSTREAM_URL": upstream.url}
            )
            services.append(naive)

            target = f"{PAGE_PATH}?{PAGE_QUERY}"
            servers = {
                "direct": upstream,
                "nginx-proxy": proxy,
                **{name: service for name, (service, _) in gateways.items()},
                "naive": naive,
            }
            for name, server in servers.items():
                status, body = fetch(f"{server.url}{target}")
                if status != 200 or b"<title>Download Python" not in body:
                    raise RuntimeError(f"{name}: sanity check failed: HTTP {status}")
                if name in gateways and b"/_privacy/" not in body:
                    raise RuntimeError(f"{name}: the banner's settings link was not injected")
            configs = [
                Config(
                    name,
                    LABELS[name],
                    f"{server.url}{target}",
                    gateways[name][1] if name in gateways else script,
                    # The server under test first; the upstream's CPU is reported for every proxy.
                    (server,) if server is upstream else (server, upstream),
                )
                for name, server in servers.items()
            ]
            return interleave(wrk, configs, runs=runs, seconds=seconds, warmup=warmup, progress=progress)
        finally:
            for service in reversed(services):
                service.stop()


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per configuration (median)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="also measure the mypyc-compiled build")
    parser.add_argument("--compiled-dir", type=Path, help="build the compiled copy here and reuse it next time")
    args = parser.parse_args()
    tools = ensure_tools()
    if tools.wrk is None or tools.nginx is None:
        sys.exit(f"bench_proxy needs wrk and nginx: {tools.note}")
    with contextlib.ExitStack() as stack:
        compiled = compiled_build_if_asked(stack, args.compiled, args.compiled_dir, _stderr)
        results = run(
            tools.wrk,
            tools.nginx,
            runs=args.runs,
            seconds=args.duration,
            warmup=args.warmup,
            compiled=compiled,
            progress=_stderr,
        )
    if args.json:
        print(json.dumps({name: summary.to_json() for name, summary in results.items()}, indent=2))
        return
    print(f"\n{'configuration':<48} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU':>10} {'wrk CPU':>8}")
    for summary in results.values():
        print(
            f"{summary.label:<48} {summary.rps:9.0f} {summary.p50_ms:8.2f} {summary.p99_ms:8.2f} "
            f"{summary.cpu_pct(summary.server):9.0f}% {summary.wrk_cpu_pct:7.0f}%"
        )
    reference, naive = results["nginx-proxy"], results["naive"]
    for name in ("gateway", "gateway-compiled"):
        if name in results:
            gateway = results[name]
            print(f"\n{name} / nginx proxy_pass: {gateway.rps / reference.rps:.3f} (goal >= 0.25)")
            print(f"{name} / naive httpx proxy: {gateway.rps / naive.rps:.1f}x (goal >= 10x)")
            print(f"{name} / upstream direct:   {gateway.rps / results['direct'].rps:.3f}")


if __name__ == "__main__":
    main()
