"""Behind a caching CDN: nginx ``proxy_cache`` in front of ``gateway serve``, headless Chromium with JavaScript off.

One page, opened N times. Counted at the origin (``pageviews = "server"``), only the cache miss reaches the gateway:
the collector gets 1. Counted by the pixel (``pageviews = "pixel"``), every view loads the no-store image through
the CDN: the collector gets exactly N.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import Server, free_port, run_server, wait_for_port
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, _require_chromium

pytestmark = pytest.mark.slow

VIEWS = 5
DESKTOP_CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"
DOMAIN = "cdn.example"

NGINX = """
daemon off;
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    proxy_cache_path {dir}/cache levels=1 keys_zone=edge:1m;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{gateway_port};
            proxy_http_version 1.1;
            proxy_cache edge;
            proxy_cache_valid 200 5m;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            add_header X-Cache $upstream_cache_status always;
        }}
    }}
}}
"""


def _nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
            pytest.fail("nginx is missing; .ci/run should have installed Debian's nginx package")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return found


def start_nginx(tmp: Path, gateway_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX.format(dir=tmp, port=port, gateway_port=gateway_port, user="user root;" if os.geteuid() == 0 else "")
    )
    with (tmp / "nginx.log").open("wb") as log:
        process = subprocess.Popen([_nginx(), "-c", str(conf), "-p", str(tmp)], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, process)  # type: ignore[arg-type]
    return process, port


def run_setup(tmp: Path, mode: str) -> Iterator[tuple[str, Server]]:
    collector_port, upstream_port, gateway_port = free_port(), free_port(), free_port()
    config = tmp / "gateway.toml"
    config.write_text(
        f"""
[upstream]
url = "http://127.0.0.1:{upstream_port}"

[client_ip]
trusted_proxies = ["127.0.0.1/32"]

[consent]
secret_keys = ["{"c" * 40}"]
receipts = ""

[spool]
enabled = false

[analytics]
pageviews = "{mode}"

[destinations.plausible]
kind = "plausible"
endpoint = "http://127.0.0.1:{collector_port}/api/event"
domain = "{DOMAIN}"
"""
    )
    uvicorn = ["uvicorn", "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning", "--lifespan", "off"]
    with (
        run_server([*uvicorn, "--factory", "tests.apps.collector:collector_app", "--port", str(collector_port)],
                   collector_port, tmp / "collector.log", env={"COLLECTOR_DOMAIN": DOMAIN}) as collector,
        run_server([*uvicorn, "tests.apps.cdn_page:cdn_page_app", "--port", str(upstream_port)], upstream_port,
                   tmp / "upstream.log"),
        run_server(["gateway", "serve", "--config", str(config), "--port", str(gateway_port)], gateway_port,
                   tmp / "gateway.log"),
    ):  # fmt: skip
        nginx, port = start_nginx(tmp, gateway_port)
        try:
            yield f"http://127.0.0.1:{port}", collector
        finally:
            nginx.terminate()
            nginx.wait(10)


def view_page(url: str, views: int) -> list[str]:
    """Open ``url`` ``views`` times in Chromium with JavaScript disabled; the CDN's cache status of each page."""
    from playwright.sync_api import sync_playwright

    statuses = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for _ in range(views):
                # A new visitor each time, with a desktop Chrome's user agent: "HeadlessChrome" is (rightly) a bot.
                context = browser.new_context(java_script_enabled=False, user_agent=DESKTOP_CHROME)
                page = context.new_page()
                response = page.goto(url)
                assert response is not None and response.status == 200
                statuses.append(response.headers.get("x-cache", ""))
                page.wait_for_load_state("load")
                context.close()
        finally:
            browser.close()
    return statuses


def plausible_count(collector: Server, settle: float) -> int:
    deadline = time.monotonic() + settle
    count = -1
    while True:
        records = httpx.get(f"{collector.url}/_records", trust_env=False).json()["collector"]
        assert all(not r["problems"] for r in records), records
        count = len([r for r in records if r["destination"] == "plausible"])
        if time.monotonic() > deadline:
            return count
        time.sleep(0.2)


@pytest.mark.parametrize(("mode", "expected"), [("server", 1), ("pixel", VIEWS)])
def test_a_cached_page_counts_once_per_view_only_with_the_pixel(tmp_path: Path, mode: str, expected: int) -> None:
    _require_chromium()
    setup = run_setup(tmp_path, mode)
    edge, collector = next(setup)
    try:
        statuses = view_page(f"{edge}/article", VIEWS)
        assert statuses[0] == "MISS" and set(statuses[1:]) == {"HIT"}, statuses  # the CDN really served the cache
        assert plausible_count(collector, settle=3.0) == expected
    finally:
        setup.close()
