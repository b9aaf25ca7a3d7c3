"""`gateway serve` as a real process: canaries through every forwarding header, open-proxy probes over raw
sockets, and the zero-config demo from the README."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import REPO, Server, free_port, run_server

pytestmark = pytest.mark.slow

CANARY_V4 = "198.51.100.77"
CANARY_V6 = "2001:db8:1234:5678:9abc:def0:1234:5678"
FORWARDING = (
    "x-forwarded-for", "x-real-ip", "forwarded", "fastly-client-ip", "cf-connecting-ip", "true-client-ip",
    "x-client-ip", "x-cluster-client-ip",
)  # fmt: skip
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"


@pytest.fixture
def echo_upstream(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    args = [
        "uvicorn",
        "tests.apps.echo:echo_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--no-proxy-headers",
    ]
    with run_server(args, port, tmp_path / "upstream.log") as server:
        yield server


@pytest.fixture
def gateway(tmp_path: Path, echo_upstream: Server) -> Iterator[Server]:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[upstream]
url = "{echo_upstream.url}"
read_timeout = 5.0

[client_ip]
trusted_proxies = ["127.0.0.1/32", "::1/128"]

[consent]
secret_keys = ["{"k" * 40}"]
receipts = "{tmp_path / "receipts.sqlite3"}"

[spool]
path = "{tmp_path / "spool.sqlite3"}"

[destinations.plausible]
kind = "plausible"
endpoint = "https://plausible.io/api/event"
domain = "example.org"
dry_run = true
fields = ["name", "url", "referrer", "country", "user_agent", "ip"]
"""
    )
    args = ["gateway", "serve", "--config", str(config), "--port", str(port)]
    with run_server(args, port, tmp_path / "gateway.log") as server:
        yield server


def canary_headers(ip: str) -> dict[str, str]:
    headers = {name: ip for name in FORWARDING}
    headers["forwarded"] = f'for="[{ip}]:4711"' if ":" in ip else f"for={ip}"
    headers["x-forwarded-for"] = f"10.9.8.7, {ip}"
    headers["user-agent"] = BROWSER
    return headers


def test_upstream_sees_only_truncated_address(gateway: Server, echo_upstream: Server) -> None:
    with httpx.Client(base_url=gateway.url, trust_env=False) as client:
        reports = []
        for canary, truncated in ((CANARY_V4, "198.51.100.0"), (CANARY_V6, "2001:db8:1234::")):
            response = client.get("/some/page?x=1", headers=canary_headers(canary))
            assert response.status_code == 200
            report = response.json()
            reports.append(report)
            headers = dict(report["headers"])
            assert headers["x-forwarded-for"] == truncated
            assert report["client"][0] == "127.0.0.1"  # the proxy's own connection
            assert canary not in response.text
            for name in FORWARDING:
                if name != "x-forwarded-for":
                    assert name not in headers, name
    gateway.stop()
    echo_upstream.stop()
    for output in (gateway.output(), echo_upstream.output()):
        assert CANARY_V4 not in output
        assert CANARY_V6 not in output
    assert "198.51.100.0" in gateway.output()  # the gateway's own access log shows the truncated address


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize(
    ("request_bytes", "routed_path"),
    [
        # httptools reduces an absolute-form target to its path (security.md P6): routed to OUR upstream, or 400.
        (b"GET http://127.0.0.2:9/x HTTP/1.1\r\nHost: 127.0.0.2:9\r\nConnection: close\r\n\r\n", "/x"),
        (b"GET //evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", None),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n", None),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", None),
        (b"GET /routed HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", "/routed"),
    ],
    ids=["absolute-form", "double-slash", "connect", "options-star", "foreign-host"],
)
def test_no_open_proxy(gateway: Server, echo_upstream: Server, request_bytes: bytes, routed_path: str | None) -> None:
    response = raw_request(gateway.port, request_bytes)
    match = re.match(rb"HTTP/1\.1 (\d{3})", response)
    assert match is not None, response[:200]
    status = int(match.group(1))
    gateway.stop()
    echo_upstream.stop()
    seen = [line for line in echo_upstream.output().splitlines() if line.startswith("app saw client")]
    if status == 200:
        # Routed to the configured upstream only, with the path and nothing of the foreign host.
        assert routed_path is not None, response[:300]
        assert len(seen) == 1
        head, _, body = response.partition(b"\r\n\r\n")
        assert body, response
        report = json.loads(body)
        assert head.lower().count(b"\r\ndate:") == 1  # one Date: the upstream's, relayed
        assert report["path"] == routed_path
        assert dict(report["headers"])["host"] == echo_upstream.url.removeprefix("http://")
    else:
        assert 400 <= status < 500, response[:300]
        assert seen == []  # the upstream was never contacted


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.DOTALL)


def test_readme_starts_with_the_two_commands() -> None:
    run, test = readme_commands()[:2]
    assert run == "python3 -m pip install -e . && gateway serve"
    assert test == "python3 -m pip install -e '.[test]' && python3 -m pytest"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert f"\n{test}\n" in ci  # .ci/run runs exactly the README's test command


def test_zero_config_demo_serves_pages_and_prints_dry_run_payloads(tmp_path: Path) -> None:
    run = readme_commands()[0]
    assert run.endswith("&& gateway serve")
    port = free_port()
    # Run from an empty directory, exactly as the README says, but on a free port.
    with run_server(["gateway", "serve", "--port", str(port)], port, tmp_path / "demo.log", cwd=tmp_path) as demo:
        with httpx.Client(
            base_url=demo.url, trust_env=False, headers={"user-agent": BROWSER, "x-forwarded-for": CANARY_V4}
        ) as client:
            pages = {}
            for path in ("/", "/about", "/downloads", "/links", "/search?q=asyncio&email=canary%40example.org"):
                response = client.get(path)
                assert response.status_code == 200, path
                assert response.headers["content-type"].startswith("text/html")
                title = re.search(r"<title>(.*?)</title>", response.text)
                assert title is not None
                pages[path] = title.group(1)
            assert len(set(pages.values())) == len(pages)  # distinct pages with their own titles
            assert 'role="dialog"' in client.get("/").text  # the consent banner
            assert client.get("/_privacy/flows.json").status_code == 200
        demo.stop()
        output = demo.output()
    payloads = [json.loads(line) for line in output.splitlines() if line.startswith('{"destination"')]
    plausible = [p for p in payloads if p["destination"] == "plausible"]
    assert len(plausible) >= 4
    urls = {p["body"]["url"] for p in plausible}
    assert f"http://127.0.0.1:{port}/search?q=asyncio" in urls  # email= dropped by the query allowlist
    assert all(p["headers"]["x-forwarded-for"] == "198.51.100.0" for p in plausible)
    assert not [p for p in payloads if p["destination"] == "ga4"]  # no consent given: GA4 receives nothing
    assert CANARY_V4 not in output
    assert "canary" not in output


def test_status_prints_the_counters_of_a_running_gateway(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    port = free_port()
    with run_server(["gateway", "serve", "--port", str(port)], port, tmp_path / "demo.log", cwd=tmp_path) as demo:
        with httpx.Client(base_url=demo.url, trust_env=False, headers={"user-agent": BROWSER}) as client:
            for path in ("/", "/about", "/links"):
                assert client.get(path).status_code == 200
        deadline = time.monotonic() + 10
        while True:
            result = subprocess.run(
                [sys.executable, "-m", "gateway", "status", "--url", demo.url],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            lines = result.stdout.splitlines()
            rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.strip()}
            if rows.get("delivered", [""])[0] == "3" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert lines[0].split() == ["plausible", "ga4"]
    assert rows["accepted"] == ["3", "3"]
    assert rows["delivered"] == ["3", "0"]  # the dry-run transport answers like Plausible does
    assert rows["dropped_policy[consent]"] == ["0", "3"]  # GA4 needs consent nobody gave


class RawUpstream:
    """An upstream that answers every request with the same bytes, exactly as written (no framework in between)."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(self.response)

    def close(self) -> None:
        self.listener.close()


def test_upstream_cannot_set_the_gateways_cookies(tmp_path: Path) -> None:
    body = b"<!doctype html><html><head><title>Forged</title></head><body><p>user content</p></body></html>"
    upstream = RawUpstream(
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Set-Cookie: __Host-consent=FORGED-CONSENT; Path=/; Secure\r\n"
        b"Set-Cookie: session=kept; Path=/\r\n"
        b"set-cookie:   __Host-gw_cid = FORGED-ID ; Path=/; Secure\r\n"
        b"Set-Cookie: __Host-consent=; Max-Age=0; Path=/; Secure\r\n"
        b"Connection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[upstream]
url = "{upstream.url}"

[consent]
secret_keys = ["{"k" * 40}"]
receipts = ""

[spool]
enabled = false
"""
    )
    try:
        with run_server(
            ["gateway", "serve", "--config", str(config), "--port", str(port)], port, tmp_path / "g.log"
        ) as gw:
            with httpx.Client(base_url=gw.url, trust_env=False) as client:
                for _ in range(3):
                    response = client.get("/page", headers={"user-agent": BROWSER})
                    assert response.status_code == 200
                    assert "user content" in response.text
                    assert response.headers.get_list("set-cookie") == ["session=kept; Path=/"]
            gw.stop()
            log_lines = [json.loads(line) for line in gw.output().splitlines() if line.startswith("{")]
    finally:
        upstream.close()
    warnings = [line for line in log_lines if line["event"] == "response.owned_cookie_removed"]
    # One warning per name, however many responses tried (rate-limited); the forged values are never logged.
    assert sorted(w["cookie"] for w in warnings) == ["__Host-consent", "__Host-gw_cid"]
    assert "FORGED" not in gw.output()


def test_a_minimal_config_gives_each_destination_what_it_needs_to_count(tmp_path: Path) -> None:
    """The smallest destination tables (kind, endpoint, domain / measurement id, requires): Plausible gets the
    visitor's truncated address and user agent, GA4 the country from the full address and never an address."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    from tests.test_delivery_e2e import peer

    geo = tmp_path / "country.mmdb"
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "NZ"}})
    writer.to_db_file(str(geo))
    collector_port, upstream_port, port = free_port(), free_port(), free_port()
    config = tmp_path / "minimal.toml"
    config.write_text(
        f"""
[upstream]
url = "http://127.0.0.1:{upstream_port}"

[client_ip]
trusted_proxies = ["127.0.0.1/32"]

[geo]
database = "{geo}"

[consent]
secret_keys = ["{"k" * 40}"]
receipts = ""

[spool]
enabled = false

[destinations.plausible]
kind = "plausible"
endpoint = "http://127.0.0.1:{collector_port}/api/event"
domain = "delivery.example"

[destinations.ga4]
kind = "ga4"
endpoint = "http://127.0.0.1:{collector_port}/mp/collect"
measurement_id = "G-DELIVERY1"
api_secret = "delivery-test-secret-not-real"
requires = ["analytics"]
"""
    )
    with (
        peer("collector_app", collector_port, tmp_path / "collector.log") as collector,
        peer("upstream_app", upstream_port, tmp_path / "upstream.log"),
        run_server(["gateway", "serve", "--config", str(config), "--port", str(port)], port, tmp_path / "g.log") as gw,
        httpx.Client(base_url=gw.url, trust_env=False) as client,
    ):
        visitor = {"x-forwarded-for": CANARY_V4, "user-agent": BROWSER, "accept-language": "de-DE,de;q=0.9"}
        consent = client.post(
            "/_privacy/consent",
            json={"categories": {"analytics": True}},
            headers={**visitor, "sec-fetch-site": "same-origin", "origin": gw.url},
        )
        assert consent.status_code == 204, consent.text
        cookie = consent.headers["set-cookie"].split(";", 1)[0]
        assert client.get("/p/1", headers={**visitor, "cookie": cookie}).status_code == 200
        deadline = time.monotonic() + 15
        while True:
            records = httpx.get(f"{collector.url}/_records", trust_env=False).json()["collector"]
            if {r["destination"] for r in records} >= {"plausible", "ga4"} or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    by_destination = {r["destination"]: r for r in records}
    assert set(by_destination) == {"plausible", "ga4"}, records
    for record in records:
        assert record["problems"] == [], record
    plausible = dict((k.lower(), v) for k, v in by_destination["plausible"]["headers"])
    assert plausible["x-forwarded-for"] == "198.51.100.0"  # the truncated address: one visitor per visitor
    assert plausible["user-agent"] == BROWSER  # browser and OS reports, and the visitor hash
    ga4 = json.loads(by_destination["ga4"]["body"])
    assert ga4["user_location"] == {"country_id": "NZ"}  # looked up on the full address, before truncation
    assert "ip_override" not in ga4 and "user_agent" not in ga4
    assert ga4["events"][0]["params"]["language"] == "de-de"
    for record in records:
        assert CANARY_V4 not in json.dumps(record)


def demo_examples() -> list[tuple[str, str]]:
    """(command, what its comment promises) for each line of the sh block in the README's demo section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## What the demo shows", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)\n```", section, flags=re.DOTALL)
    assert block is not None
    examples = []
    for line in block.group(1).splitlines():
        command, _, promise = line.partition("  # ")
        examples.append((command.strip(), promise.strip()))
    return examples


def test_every_readme_demo_example_does_what_it_says(tmp_path: Path) -> None:
    import subprocess
    import sys

    examples = demo_examples()
    promises = [promise for _, promise in examples]
    # Each promise the README makes is checked below; a new example needs its check here.
    assert promises == [
        'prints "x-forwarded-for": "203.0.113.0"',
        "which fields go where, as JSON",
        "what one page view sends",
    ]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "GA4_API_SECRET"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this install's `gateway`
    with run_server(["gateway", "serve", "--port", str(port)], port, tmp_path / "demo.log", cwd=tmp_path) as demo:
        results = []
        for command, _ in examples:
            assert "127.0.0.1:8000" in command or command.startswith("gateway ")
            run = subprocess.run(
                ["bash", "-c", command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
                capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False,
            )  # fmt: skip
            assert run.returncode == 0, (command, run.stderr)
            results.append(run)
        deadline = time.monotonic() + 10
        while '"x-forwarded-for": "203.0.113.0"' not in demo.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        demo.stop()
        printed = [json.loads(line) for line in demo.output().splitlines() if line.startswith('{"destination"')]
    # 1: the redirected /downloads/ is one page view; the demo prints what Plausible would get, address truncated.
    assert '"x-forwarded-for": "203.0.113.0"' in demo.output()
    downloads = [p for p in printed if p["destination"] == "plausible" and p["body"]["url"].endswith("/downloads")]
    assert len(downloads) == 1 and downloads[0]["headers"]["x-forwarded-for"] == "203.0.113.0"
    assert "203.0.113.77" not in demo.output()
    # 2: the data-flow table as JSON, one row per destination.
    flows = json.loads(results[1].stdout)
    assert {row["destination"]: row["fields"] for row in flows} == {
        "plausible": ["name", "url", "referrer", "user_agent", "ip"],
        "ga4": ["name", "url", "referrer", "title", "country", "language"],
    }
    # 3: both destinations' requests for one consented page view, without the GA4 secret being set.
    rows = [json.loads(chunk) for chunk in re.split(r"\n(?=\{)", results[2].stdout.strip())]
    assert [(row["destination"], row["sent"]) for row in rows] == [("plausible", True), ("ga4", True), ("sentry", True)]
    assert "alice@example.org" not in json.dumps(rows[2])  # the sample error report's e-mail never reaches Sentry
    assert rows[1]["request"]["url"].endswith("api_secret=***")
    assert "config warning: destinations.ga4.api_secret" in results[2].stderr
