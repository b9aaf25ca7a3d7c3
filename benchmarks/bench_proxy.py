"""Proxy mode: ``gateway serve`` against the same local upstream hit directly, behind nginx, and a naive httpx proxy.

    python -m benchmarks.bench_proxy [--duration 10] [--runs 3] [--json]

The upstream is an nginx (one worker) serving the 10 KB HTML page as a static file. Configurations, all measured
in one run with wrk (``-t1 -c64``), interleaved, medians of ``--runs`` runs:

- ``direct``: wrk -> upstream nginx (the ceiling);
- ``nginx-proxy``: wrk -> a second nginx (one worker, ``proxy_pass`` with an upstream ``keepalive 64`` pool)
  -> upstream (the 1.00 reference);
- ``gateway``: wrk -> ``python -m gateway serve --config X`` (privacy middleware + reverse proxy, one worker,
  geo database, consent key, banner on, access log off, no destinations: page views are detected and their events
  built, but not delivered) -> upstream;
- ``naive``: wrk -> the naive design the issue measured (Starlette + one shared ``httpx.AsyncClient``, streaming;
  :func:`benchmarks.apps.naive_proxy_app`) under uvicorn -> upstream.

Prints requests/s and p50/p99 latency of each, and the ratios gateway/nginx-proxy (goal >= 0.25) and
gateway/naive (goal >= 10). Needs wrk and nginx (Debian packages); see :func:`benchmarks.macro.ensure_tools`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

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
from benchmarks.macro import (
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

LABELS = {
    "direct": "upstream nginx, direct (ceiling)",
    "nginx-proxy": "nginx proxy_pass to the upstream (reference)",
    "gateway": "gateway serve (privacy middleware + proxy)",
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
    wrk: str, nginx: str, *, runs: int, seconds: float, warmup: float, progress: Callable[[str], None] = print
) -> dict[str, Summary]:
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

            config_path = directory / "gateway.toml"
            table = gateway_settings(
                directory, build_geo_database(directory), collector_url=None, upstream_url=upstream.url
            )
            config_path.write_text(to_toml(table), encoding="utf-8")
            port = free_port()
            command = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--port", str(port)]
            gateway = start_process("gateway", command, port, directory, ready_path="/_privacy/healthz")
            services.append(gateway)
            naive = start_uvicorn(
                "naive", "benchmarks.apps:naive_proxy_app", directory, env={"BENCH_UPSTREAM_URL": upstream.url}
            )
            services.append(naive)

            script = write_wrk_script(directory / "wrk.lua", cookie_header(load(config_path)))
            target = f"{PAGE_PATH}?{PAGE_QUERY}"
            servers = {"direct": upstream, "nginx-proxy": proxy, "gateway": gateway, "naive": naive}
            for name, server in servers.items():
                status, body = fetch(f"{server.url}{target}")
                if status != 200 or b"<title>Download Python" not in body:
                    raise RuntimeError(f"{name}: sanity check failed: HTTP {status}")
                if name == "gateway" and b"/_privacy/" not in body:
                    raise RuntimeError("gateway: the banner's settings link was not injected")
            configs = [
                Config(
                    name,
                    LABELS[name],
                    f"{server.url}{target}",
                    script,
                    # The server under test first; the upstream's CPU is reported for every proxy.
                    (server,) if server is upstream else (server, upstream),
                )
                for name, server in servers.items()
            ]
            return interleave(wrk, configs, runs=runs, seconds=seconds, warmup=warmup, progress=progress)
        finally:
            for service in reversed(services):
                service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per configuration (median)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tools = ensure_tools()
    if tools.wrk is None or tools.nginx is None:
        sys.exit(f"bench_proxy needs wrk and nginx: {tools.note}")
    results = run(tools.wrk, tools.nginx, runs=args.runs, seconds=args.duration, warmup=args.warmup)
    if args.json:
        print(json.dumps({name: summary.to_json() for name, summary in results.items()}, indent=2))
        return
    print(f"\n{'configuration':<48} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU':>10} {'wrk CPU':>8}")
    for summary in results.values():
        print(
            f"{summary.label:<48} {summary.rps:9.0f} {summary.p50_ms:8.2f} {summary.p99_ms:8.2f} "
            f"{summary.cpu_pct(summary.server):9.0f}% {summary.wrk_cpu_pct:7.0f}%"
        )
    gateway, reference, naive = results["gateway"], results["nginx-proxy"], results["naive"]
    print(f"\ngateway / nginx proxy_pass: {gateway.rps / reference.rps:.3f} (goal >= 0.25)")
    print(f"gateway / naive httpx proxy: {gateway.rps / naive.rps:.1f}x (goal >= 10x)")
    print(f"gateway / upstream direct:   {gateway.rps / results['direct'].rps:.3f}")


if __name__ == "__main__":
    main()
