"""Fastly log streaming into ``gateway serve`` (``pageviews = "edge"``): the shipped log format, NDJSON and gzip."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server, free_port, run_server

pytestmark = pytest.mark.slow

SECRET = "intake-secret-0123456789abcdef"
HEADER = "x-gateway-intake-token"
DOMAIN = "www.example.org"
PLAUSIBLE_DOMAIN = "example.org"  # Plausible drops a leading "www."
CANARY_IP = "198.51.100.77"
CANARY_EMAIL = "alice@example.org"
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, Path]]:
    tmp = tmp_path_factory.mktemp("intake")
    collector_port, gateway_port = free_port(), free_port()
    config = tmp / "gateway.toml"
    config.write_text(
        f"""
[upstream]
url = "http://127.0.0.1:9"

[consent]
secret_keys = ["{"i" * 40}"]
receipts = ""

[site]
origins = ["https://{DOMAIN}"]

[spool]
path = "{tmp / "spool.sqlite3"}"

[analytics]
pageviews = "edge"

[fastly]
service_ids = ["SU1Z0isxPaozGVKXdv0eY"]
secret = "{SECRET}"
max_body_bytes = 200000
max_decompressed_bytes = 1000000

[destinations.plausible]
kind = "plausible"
endpoint = "http://127.0.0.1:{collector_port}/api/event"
domain = "{PLAUSIBLE_DOMAIN}"

[destinations.ga4]
kind = "ga4"
endpoint = "http://127.0.0.1:{collector_port}/mp/collect"
measurement_id = "G-DELIVERY1"
api_secret = "delivery-test-secret-not-real"
requires = ["analytics"]
client_id = "pseudonym"
"""
    )
    uvicorn = ["uvicorn", "--factory", "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning",
               "--lifespan", "off"]  # fmt: skip
    with (
        run_server([*uvicorn, "tests.apps.collector:collector_app", "--port", str(collector_port)], collector_port,
                   tmp / "collector.log", env={"COLLECTOR_DOMAIN": PLAUSIBLE_DOMAIN}) as collector,
        run_server(["gateway", "serve", "--config", str(config), "--port", str(gateway_port)], gateway_port,
                   tmp / "gateway.log") as gateway,
    ):  # fmt: skip
        yield gateway, collector, tmp


def record(**changes: Any) -> dict[str, Any]:
    """One request in the shipped Fastly log format (README, "Behind a CDN")."""
    base: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client_ip": CANARY_IP,
        "host": DOMAIN,
        "url": f"/downloads/?utm_source=news&email={CANARY_EMAIL}",
        "method": "GET",
        "status": 200,
        "content_type": "text/html; charset=utf-8",
        "user_agent": CHROME,
        "referer": "https://www.google.com/search?q=python",
        "accept_language": "en-GB,en;q=0.9",
        "sec_gpc": "",
        "sec_purpose": "",
        "purpose": "",
        "cache": "HIT-CLUSTER",
        "consent": "",
        "client_id": "",
        "scheme": "https",
    }
    base.update(changes)
    return base


def post(gateway: Server, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    all_headers = {HEADER: SECRET, "content-type": "application/json", **(headers or {})}
    return httpx.post(f"{gateway.url}/_privacy/intake/fastly", content=body, headers=all_headers, trust_env=False)


def consent_cookie(gateway: Server, granted: bool) -> str:
    response = httpx.post(
        f"{gateway.url}/_privacy/consent", json={"categories": {"analytics": granted}},
        headers={"sec-fetch-site": "same-origin"}, trust_env=False,
    )  # fmt: skip
    assert response.status_code == 204
    return response.headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]


def test_challenge_answers_the_service_ids_hash(stack: tuple[Server, Server, Path]) -> None:
    gateway, _, _ = stack
    response = httpx.get(f"{gateway.url}/.well-known/fastly/logging/challenge", trust_env=False)
    assert response.status_code == 200
    assert response.text == hashlib.sha256(b"SU1Z0isxPaozGVKXdv0eY").hexdigest() + "\n"


@pytest.mark.parametrize("token", [None, "wrong-secret-0123456789abcdef", SECRET + "x", ""])
def test_without_the_secret_401(stack: tuple[Server, Server, Path], token: str | None) -> None:
    gateway, _, _ = stack
    headers = {} if token is None else {HEADER: token}
    response = httpx.post(f"{gateway.url}/_privacy/intake/fastly", content=b"{}", headers=headers, trust_env=False)
    assert response.status_code == 401


def test_oversized_and_bomb_batches_413(stack: tuple[Server, Server, Path]) -> None:
    gateway, _, _ = stack
    assert post(gateway, b" " * 200_001).status_code == 413
    bomb = gzip.compress(b"\n" * 20_000_000)  # ~20 KB on the wire, 20 MB inflated
    assert len(bomb) < 200_000
    assert post(gateway, bomb, {"content-encoding": "gzip"}).status_code == 413
    assert post(gateway, b"not gzip", {"content-encoding": "gzip"}).status_code == 400
    assert post(gateway, b"{}", {"content-encoding": "br"}).status_code == 415


def records_of(collector: Server) -> list[dict[str, Any]]:
    return list(httpx.get(f"{collector.url}/_records", trust_env=False).json()["collector"])


def metrics(gateway: Server) -> dict[str, float]:
    counts = {}
    for line in httpx.get(f"{gateway.url}/_privacy/metrics", trust_env=False).text.splitlines():
        if line.startswith("gateway_intake_records_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


def test_a_mixed_batch_lands_as_the_rules_say(stack: tuple[Server, Server, Path]) -> None:
    gateway, collector, tmp = stack
    granted = consent_cookie(gateway, True)
    tampered = granted[:-3] + ("AAA" if not granted.endswith("AAA") else "BBB")
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7 * 3600))
    batch = [
        record(),  # a page view, no consent: Plausible only
        record(consent=granted, url="/about/"),  # consented: Plausible and GA4
        record(consent=tampered, url="/tampered/"),  # a forged cookie is no consent
        record(consent=granted, sec_gpc="1", url="/gpc/"),  # GPC withdraws a grant made without it
        record(user_agent="Googlebot/2.1 (+http://www.google.com/bot.html)"),
        record(sec_purpose="prefetch;prerender"),
        record(url="/static/site.css", content_type="text/css"),
        record(status=404),
        record(method="POST"),
        record(time=old),
        record(client_ip="not an address"),
        {"host": DOMAIN},
    ]
    lines = [json.dumps(r) for r in batch] + ["{not json", "", "42"]
    answer = post(gateway, "\n".join(lines).encode())
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"event": 4, "bot": 1, "prefetch": 1, "not_a_page": 3, "invalid_record": 4, "too_old": 1}
    # The same as a gzip-compressed JSON array.
    again = post(gateway, gzip.compress(json.dumps(batch).encode()), {"content-encoding": "gzip"})
    assert again.json() == {"event": 4, "bot": 1, "prefetch": 1, "not_a_page": 3, "invalid_record": 2, "too_old": 1}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        received = records_of(collector)
        if len(received) >= 10:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    received = records_of(collector)
    assert all(not r["problems"] for r in received), [r["problems"] for r in received if r["problems"]]
    plausible = [json.loads(r["body"]) for r in received if r["destination"] == "plausible"]
    ga4 = [json.loads(r["body"]) for r in received if r["destination"] == "ga4"]
    assert len(plausible) == 8 and len(ga4) == 2  # 4 page views per batch; GA4 only for the valid grant
    assert {p["url"] for p in plausible} == {
        f"https://{DOMAIN}/downloads/?utm_source=news", f"https://{DOMAIN}/about/", f"https://{DOMAIN}/tampered/",
        f"https://{DOMAIN}/gpc/",
    }  # fmt: skip
    assert {e["events"][0]["params"]["page_location"] for e in ga4} == {f"https://{DOMAIN}/about/"}
    xff = {dict(r["headers"]).get("x-forwarded-for") for r in received if r["destination"] == "plausible"}
    assert xff == {"198.51.100.0"}
    everything = json.dumps(received) + gateway.output()
    spool = tmp / "spool.sqlite3"
    if spool.exists():
        everything += spool.read_bytes().decode("latin-1")
    for canary in (CANARY_IP, CANARY_EMAIL):
        assert canary not in everything
    counted = metrics(gateway)
    assert sum(counted.values()) == 14 + 12 and counted["event"] == 8  # every record accounted for
