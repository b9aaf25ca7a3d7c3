"""End to end: the middleware under a real uvicorn on 127.0.0.1, canary addresses in every forwarding header."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, run_server

CANARY_V4 = "198.51.100.77"
CANARY_V6 = "2001:db8:1234:5678:9abc:def0:1234:5678"
FORWARDING = (
    "x-forwarded-for",
    "x-real-ip",
    "forwarded",
    "fastly-client-ip",
    "cf-connecting-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
)

CONFIG = """
[client_ip]
trusted_proxies = ["127.0.0.1/32", "::1/128"]
headers = ["fastly-client-ip", "x-forwarded-for", "forwarded"]

[consent]
receipts = ""

[spool]
enabled = false
"""


def canary_headers(ip: str) -> dict[str, str]:
    headers = {name: ip for name in FORWARDING}
    headers["forwarded"] = f'for="[{ip}]:4711"' if ":" in ip else f"for={ip}"
    headers["x-forwarded-for"] = f"10.9.8.7, {ip}"
    return headers


def echo_server_args(port: int, *extra: str) -> list[str]:
    """uvicorn serving tests.apps.echo behind the gateway on 127.0.0.1:port, without uvicorn's own XFF handling."""
    return ["uvicorn", "--factory", "tests.apps.echo:gateway_echo", "--host", "127.0.0.1", "--port", str(port),
            "--no-proxy-headers", *extra]  # fmt: skip


@pytest.mark.parametrize("access_log", [True, False], ids=["uvicorn-access-log", "no-access-log"])
def test_canary_ip_never_reaches_app_or_logs(tmp_path: Path, access_log: bool) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    port = free_port()
    args = echo_server_args(port, "--log-level", "info", *(() if access_log else ("--no-access-log",)))
    with run_server(args, port, tmp_path / "server.log", env={"ECHO_GATEWAY_CONFIG": str(config)}) as server:
        reports = []
        with httpx.Client(base_url=server.url, trust_env=False) as client:
            for canary in (CANARY_V4, CANARY_V6):
                response = client.get("/page?x=1", headers=canary_headers(canary))
                assert response.status_code == 200
                reports.append((canary, response.text, response.json()))
        server.stop()
        output = server.output()

    for canary, raw, report in reports:
        expected = "198.51.100.0" if canary == CANARY_V4 else "2001:db8:1234::"
        assert report["client"] == [expected, 0]
        assert report["privacy"]["ip"] == expected
        header_names = {name for name, _ in report["headers"]}
        assert not header_names & set(FORWARDING), header_names
        assert canary not in raw
        assert canary not in json.dumps(report)
    assert "app saw client" in output  # the app's own log line was captured
    assert CANARY_V4 not in output
    assert CANARY_V6 not in output
    if access_log:
        assert "198.51.100.0" in output  # uvicorn's access log shows the truncated address (scope rewritten in place)


def test_untrusted_peer_cannot_spoof(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[consent]\nreceipts = ''\n[spool]\nenabled = false\n")  # nobody trusted
    port = free_port()
    args = echo_server_args(port, "--no-access-log")
    with run_server(args, port, tmp_path / "server.log", env={"ECHO_GATEWAY_CONFIG": str(config)}) as server:
        report = httpx.get(f"{server.url}/", headers=canary_headers(CANARY_V4), trust_env=False).json()
    assert report["client"] == ["127.0.0.0", 0]
    assert CANARY_V4 not in json.dumps(report)
