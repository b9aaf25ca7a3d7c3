"""Standalone mode: the privacy middleware in front of the streaming reverse proxy, served by uvicorn.

uvicorn runs with ``proxy_headers=False`` (the gateway is the only place that trusts forwarding headers), without
its raw access log (it prints full client addresses and query strings; the gateway logs truncated ones), with the
httptools parser (it rejects Content-Length + Transfer-Encoding smuggling that h11 accepts, security.md P8) and
without WebSocket support (no ``Upgrade`` is ever relayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import uvicorn

from gateway.config import Settings, load_settings
from gateway.delivery.deliverer import DelivererSupervisor
from gateway.logs import configure_logging, get_logger, log_event
from gateway.middleware import PrivacyGateway
from gateway.proxy import ReverseProxy

__all__ = ["CONFIG_ENV", "app_factory", "create_app", "demo_overrides", "serve", "uvicorn_options"]

# Workers started by uvicorn re-import the app; they find the config file through this variable.
CONFIG_ENV = "GATEWAY_CONFIG_FILE"


def create_app(settings: Settings) -> PrivacyGateway:
    proxy = ReverseProxy(settings.upstream)
    return PrivacyGateway(proxy, settings, readiness=proxy.ready, access_log=settings.server.access_log)


def app_factory() -> PrivacyGateway:
    """Entry point for ``uvicorn --factory`` and multi-worker ``gateway serve`` (deliverer mode comes from the
    environment ``serve`` sets: ``GATEWAY_DISPATCH__MODE=deliverer``)."""
    settings = load_settings(os.environ.get(CONFIG_ENV) or None)
    configure_logging(settings.logging.level)
    return create_app(settings)


def uvicorn_options(settings: Settings, *, host: str, port: int) -> dict[str, Any]:
    return {
        "host": host,
        "port": port,
        "http": "httptools",
        "ws": "none",
        "lifespan": "on",
        "proxy_headers": False,
        "access_log": False,
        "server_header": False,
        # Proxied responses carry the upstream's Date; a second one from uvicorn would be a duplicate header.
        "date_header": False,
        "timeout_graceful_shutdown": int(max(1, settings.server.shutdown_timeout)),
        "limit_concurrency": settings.server.limit_concurrency or None,
        "log_level": settings.logging.level,
    }


def demo_overrides(upstream_url: str, gateway_origin: str, data_dir: str) -> Mapping[str, Any]:
    """Zero-config demo: a built-in upstream and dry-run destinations that print what would be sent."""
    return {
        "upstream": {"url": upstream_url},
        "client_ip": {"trusted_proxies": ["127.0.0.1/32", "::1/128"]},
        "site": {"origins": [gateway_origin]},
        "consent": {"receipts": str(Path(data_dir) / "consent-receipts.sqlite3")},
        "spool": {"path": str(Path(data_dir) / "spool.sqlite3")},
        "urls": {"allowed_query_params": ["utm_source", "utm_medium", "utm_campaign", "q"]},
        "destinations": {
            "plausible": {
                "kind": "plausible",
                "endpoint": "https://plausible.io/api/event",
                "domain": "demo.example",
                "requires": [],
                "dry_run": True,
            },
            "ga4": {
                "kind": "ga4",
                "endpoint": "https://region1.google-analytics.com/mp/collect",
                "measurement_id": "G-DEMO0000",
                "api_secret": "demo-secret-not-real",
                "requires": ["analytics"],
                "dry_run": True,
            },
        },
    }


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _shared_consent_key(settings: Settings) -> Iterator[None]:
    """Several workers must sign cookies with one key; without a configured one, make one for this run."""
    if settings.consent.secret_keys or "GATEWAY_CONSENT__SECRET_KEYS" in os.environ:
        yield
        return
    os.environ["GATEWAY_CONSENT__SECRET_KEYS"] = f'["{secrets.token_urlsafe(32)}"]'
    try:
        yield
    finally:
        os.environ.pop("GATEWAY_CONSENT__SECRET_KEYS", None)


def _graceful_sigterm(*servers: uvicorn.Server) -> None:
    """Make SIGTERM a clean stop with exit code 0.

    uvicorn handles SIGTERM gracefully and then re-raises it with the handler that was installed before it ran,
    so with the default handler the process dies of the signal (exit -15) after a clean shutdown. Installing
    this handler first makes that re-raise harmless, and a SIGTERM that arrives before uvicorn took over the
    signals (during startup) still stops the servers.
    """

    def stop(signum: int, frame: object) -> None:
        for server in servers:
            server.should_exit = True

    signal.signal(signal.SIGTERM, stop)


def serve(config_path: str | None, *, host: str | None, port: int | None, workers: int | None) -> int:
    """Run the gateway until SIGINT/SIGTERM; return the process exit code."""
    if config_path is None:
        return _serve_demo(host or "127.0.0.1", port or 8000)
    settings = load_settings(config_path)
    configure_logging(settings.logging.level)
    for line in settings.warnings:  # what the configuration costs in correctness, as `gateway check` says
        log_event(get_logger("config"), logging.WARNING, "config.warning", detail=line)
    host = host or settings.server.host
    port = port or settings.server.port
    workers = workers or settings.server.workers
    if not settings.upstream.url:
        print("config error: upstream.url: '' is required for gateway serve", file=sys.stderr)
        return 2
    if workers > 1 or settings.dispatch.mode == "deliverer":
        return _serve_workers(config_path, settings, host=host, port=port, workers=workers)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), **uvicorn_options(settings, host=host, port=port)))
    _graceful_sigterm(server)
    server.run()
    return 0 if server.started else 1


def _serve_workers(config_path: str, settings: Settings, *, host: str, port: int, workers: int) -> int:
    """Request workers (uvicorn's supervisor restarts any that die) plus the host's one deliverer, supervised.

    Stop order matters: the workers stop first (each writes what it still holds to the host spool), then the
    deliverer gets SIGTERM and finishes what is in flight; everything else waits in the spool for the next start.
    """
    if not settings.spool.enabled:
        print("config error: spool.enabled: false (several workers hand events off through the spool)", file=sys.stderr)
        return 2
    os.environ[CONFIG_ENV] = os.path.abspath(config_path)
    os.environ["GATEWAY_DISPATCH__MODE"] = "deliverer"
    with _shared_consent_key(settings):
        supervisor = DelivererSupervisor(os.path.abspath(config_path))
        supervisor.start()
        try:
            options = uvicorn_options(settings, host=host, port=port)
            if workers > 1:
                uvicorn.run("gateway.app:app_factory", factory=True, workers=workers, **options)
            else:
                server = uvicorn.Server(uvicorn.Config(app_factory(), **options))
                _graceful_sigterm(server)
                server.run()
        finally:
            supervisor.stop(settings.dispatch.shutdown_timeout + 10.0)
    return 0


def _serve_demo(host: str, port: int) -> int:
    from gateway.demo import demo_site

    upstream_port = _free_port()
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as data_dir:
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 - only for display
        origin = f"http://{shown_host}:{port}"
        settings = load_settings(None, overrides=demo_overrides(f"http://127.0.0.1:{upstream_port}", origin, data_dir))
        configure_logging(settings.logging.level)
        upstream = uvicorn.Server(
            uvicorn.Config(
                demo_site(), host="127.0.0.1", port=upstream_port, access_log=False, log_level="warning", lifespan="off"
            )
        )
        gateway = uvicorn.Server(
            uvicorn.Config(create_app(settings), **uvicorn_options(settings, host=host, port=port))
        )
        print(
            f"privacy-gateway demo: open {origin}/ (upstream demo site on 127.0.0.1:{upstream_port}).\n"
            "Each page view prints, one JSON line per destination, exactly what would be sent (dry run).\n"
            f"Data flows: {origin}{settings.prefix}/flows   Stop: Ctrl+C",
            flush=True,
        )

        _graceful_sigterm(gateway, upstream)

        async def run_both() -> None:
            upstream_task = asyncio.create_task(upstream.serve())
            try:
                await gateway.serve()
            finally:
                upstream.should_exit = True
                await upstream_task

        asyncio.run(run_both())
        return 0 if gateway.started else 1
