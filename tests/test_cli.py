"""`gateway check` and friends, run as the real console command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_gateway(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=60,
        check=False,
    )


def test_check_accepts_example() -> None:
    result = run_gateway("check", "--config", "config/gateway.example.toml", env={"GA4_API_SECRET": "x"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config ok: config/gateway.example.toml")


def test_check_accepts_python_org_profile_with_secrets_from_env(tmp_path: Path) -> None:
    # The profile points at /data/GeoLite2-Country.mmdb; without that file, check must say so by key and path.
    env = {"GA4_API_SECRET": "x", "CONSENT_KEY": "k" * 40, "METRICS_TOKEN": "t"}
    result = run_gateway("check", "--config", "config/python.org.toml", env=env)
    if Path("/data/GeoLite2-Country.mmdb").exists():  # pragma: no cover - only on a production-like host
        assert result.returncode == 0
    else:
        assert result.returncode == 2
        assert result.stderr.startswith("config error: geo.database: '/data/GeoLite2-Country.mmdb'")


CASES = {
    "bad_network": (
        "[client_ip]\ntrusted_proxies = ['127.0.0.1/32', '10.0.0.300/8']\n",
        "config error: client_ip.trusted_proxies[1]: '10.0.0.300/8' is not an IP network",
    ),
    "bad_toml": ("[client_ip\n", "config error: "),
    "unknown_key": ("[anonymize]\nipv4_prefx = 24\n", "config error: anonymize.ipv4_prefx: 24 is not a known setting"),
    "wrong_type": ("[server]\nport = 'eighty'\n", "config error: server.port: 'eighty' must be an integer"),
    "out_of_range": ("[anonymize]\nipv6_prefix = 96\n", "config error: anonymize.ipv6_prefix: 96 must be 16..64"),
    "missing_env": (
        "[destinations.ga4]\nkind = 'ga4'\nendpoint = 'https://g.example/mp/collect'\n"
        "measurement_id = 'G-ABC1234'\napi_secret = '${GA4_SECRET_UNSET}'\n",
        "config error: destinations.ga4.api_secret: '${GA4_SECRET_UNSET}' references ${GA4_SECRET_UNSET}",
    ),
    "missing_geo_db": (
        "[geo]\ndatabase = '/nonexistent/country.mmdb'\n",
        "config error: geo.database: '/nonexistent/country.mmdb'",
    ),
    "bad_choice": (
        "[destinations.x]\nkind = 'ga4'\nendpoint = 'https://g.example/mp/collect'\n"
        "measurement_id = 'G-ABC1234'\napi_secret = 'x'\nclient_id = 'fingerprint'\n",
        "config error: destinations.x.client_id: 'fingerprint' must be one of 'cookie', 'pseudonym'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_broken_file_prints_one_line_and_exits_2(tmp_path: Path, case: str) -> None:
    text, expected = CASES[case]
    path = tmp_path / "broken.toml"
    path.write_text(text)
    result = run_gateway("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines[0]


def test_check_corrupt_geo_database(tmp_path: Path) -> None:
    db = tmp_path / "corrupt.mmdb"
    db.write_bytes(b"\x00" * 1024)
    path = tmp_path / "geo.toml"
    path.write_text(f"[geo]\ndatabase = '{db}'\n")
    result = run_gateway("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"config error: geo.database: '{db}'")
    assert len(result.stderr.strip().splitlines()) == 1
