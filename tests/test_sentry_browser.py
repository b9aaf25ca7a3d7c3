"""The official Sentry browser SDK (from npm) reporting through ``gateway serve``'s tunnel, in headless Chromium.

The page sets canaries wherever a site can (user e-mail and address, a tag, a breadcrumb URL with a token, the
error message); the visitor's full address comes in X-Forwarded-For from the trusted loopback proxy. The fake
ingest (tests/apps/sentry_ingest.py) parses what arrives like Sentry does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.apps.sentry_page import CANARY_EMAIL, CANARY_IP, CANARY_TOKEN
from tests.servers import Server, free_port, run_server
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, _require_chromium

pytestmark = pytest.mark.slow

KEY = "sentry-browser-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    _require_chromium()
    from tests.npm_sentry import sentry_bundle

    bundle = sentry_bundle()
    tmp = tmp_path_factory.mktemp("sentry")
    ingest_port, page_port, gateway_port = free_port(), free_port(), free_port()
    allowed = f"http://publickey@127.0.0.1:{ingest_port}/42"
    foreign = f"http://otherkey@127.0.0.1:{ingest_port}/43"  # the ingest knows it, the gateway does not list it
    config = tmp / "gateway.toml"
    config.write_text(
        f"""
[upstream]
url = "http://127.0.0.1:{page_port}"

[client_ip]
trusted_proxies = ["127.0.0.1/32"]

[consent]
secret_keys = ["{KEY}"]
receipts = ""

[spool]
path = "{tmp / "spool.sqlite3"}"

[banner]
enabled = false

[destinations.sentry]
kind = "sentry"
dsns = ["{allowed}"]
fields = ["url", "user_agent", "ip"]
"""
    )
    uvicorn = ["uvicorn", "--factory", "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning"]
    with (
        run_server([*uvicorn, "tests.apps.sentry_ingest:ingest_app", "--port", str(ingest_port)], ingest_port,
                   tmp / "ingest.log", env={"SENTRY_INGEST_KEYS": "42:publickey,43:otherkey"}) as ingest,
        run_server([*uvicorn, "tests.apps.sentry_page:page_app", "--port", str(page_port)], page_port,
                   tmp / "page.log", env={"SENTRY_PAGE_BUNDLE": str(bundle), "SENTRY_PAGE_DSN": allowed,
                                          "SENTRY_PAGE_OTHER_DSN": foreign}),
        run_server(["gateway", "serve", "--config", str(config), "--port", str(gateway_port)], gateway_port,
                   tmp / "gateway.log") as gateway,
    ):  # fmt: skip
        yield gateway, ingest


def records(ingest: Server) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = httpx.get(f"{ingest.url}/_records", trust_env=False).json()
    return result


def open_page(gateway: Server, path: str) -> tuple[list[bytes], list[int]]:
    """Load the page in Chromium; return what the SDK posted to the tunnel and the tunnel's answers."""
    from playwright.sync_api import sync_playwright

    posted: list[bytes] = []
    answers: list[int] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(extra_http_headers={"X-Forwarded-For": CANARY_IP})
            page = context.new_page()
            page.on(
                "request", lambda r: posted.append(r.post_data_buffer or b"") if "/_privacy/sentry" in r.url else None
            )
            page.on("response", lambda r: answers.append(r.status) if "/_privacy/sentry" in r.url else None)
            page.goto(f"{gateway.url}{path}?token={CANARY_TOKEN}&utm_source=mail")
            page.wait_for_function("document.title !== 'error page'", timeout=15_000)
        finally:
            browser.close()
    return posted, answers


def test_the_sdks_error_arrives_without_what_the_notice_forbids(servers: tuple[Server, Server]) -> None:
    gateway, ingest = servers
    posted, answers = open_page(gateway, "/app")
    assert posted and answers and set(answers) == {200}
    sent = b"".join(posted).decode("utf-8", "replace")
    for canary in (CANARY_EMAIL, CANARY_TOKEN):  # the SDK did send them: the test is not vacuous
        assert canary in sent
    deadline = time.monotonic() + 15
    while not records(ingest) and time.monotonic() < deadline:
        time.sleep(0.1)
    received = records(ingest)
    assert received, gateway.output()[-2000:]
    assert all(r["status"] == 200 and not r["problems"] for r in received), received
    bodies = "\n".join(r["body"] for r in received)
    for canary in (CANARY_EMAIL, CANARY_TOKEN, CANARY_IP, "{{auto}}"):
        assert canary not in bodies, canary
    events = [json.loads(line) for r in received for line in r["body"].split("\n")
              if line.startswith("{") and '"exception"' in line]  # fmt: skip
    assert len(events) == 1
    event = events[0]
    assert event["user"] == {"ip_address": "198.51.100.0"}  # truncated, and nothing else about the user
    assert event["exception"]["values"][0]["type"] == "Error"
    assert "checkout failed for" in event["exception"]["values"][0]["value"]
    assert event["request"]["url"].endswith("/app?utm_source=mail")
    assert "Cookie" not in json.dumps(event["request"])
    assert all(r["path"] == "/api/42/envelope/" for r in received)
    gateway_log = gateway.output()
    for canary in (CANARY_EMAIL, CANARY_TOKEN, CANARY_IP):
        assert canary not in gateway_log


def test_an_envelope_for_a_dsn_not_listed_is_refused(servers: tuple[Server, Server]) -> None:
    gateway, ingest = servers
    before = len(records(ingest))
    posted, answers = open_page(gateway, "/other")
    assert posted and answers and set(answers) == {403}
    time.sleep(1.0)
    assert len(records(ingest)) == before  # nothing reached Sentry, not even for a DSN Sentry itself would take
