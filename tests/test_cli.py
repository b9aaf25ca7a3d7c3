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


def consent_config(tmp_path: Path) -> Path:
    config = tmp_path / "consent.toml"
    config.write_text(
        f'[consent]\nsecret_keys = ["{"k" * 40}"]\nreceipts = "{tmp_path / "receipts.sqlite3"}"\n'
        '[site]\norigins = ["https://testserver"]\n[spool]\nenabled = false\n'
    )
    return config


def record_choices(config: Path) -> None:
    """Three visitors choose through the real consent endpoint (in process)."""
    import anyio
    import httpx

    from gateway import PrivacyGateway, load_settings

    async def empty_app(scope: dict[str, object], receive: object, send: object) -> None:
        raise AssertionError("only consent endpoints are called")

    async def main() -> None:
        gateway = PrivacyGateway(empty_app, load_settings(config, environ={}))  # type: ignore[arg-type]
        for granted in (True, False, True):
            transport = httpx.ASGITransport(app=gateway, client=("198.51.100.77", 1234))
            async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
                response = await client.post(
                    "/_privacy/consent",
                    json={"categories": {"analytics": granted}},
                    headers={"sec-fetch-site": "same-origin", "user-agent": "CanaryAgent/1.0"},
                )
                assert response.status_code == 204
        await gateway.shutdown()

    anyio.run(main)


def test_consent_export_and_verify_detect_tampering(tmp_path: Path) -> None:
    import json
    import sqlite3

    config = consent_config(tmp_path)
    record_choices(config)

    verified = run_gateway("consent", "verify", "--config", str(config))
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("ok: 3 receipts")

    exported = run_gateway("consent", "export", "--config", str(config))
    assert exported.returncode == 0
    receipts = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [r["record"]["choices"]["analytics"] for r in receipts] == [True, False, True]
    assert all(r["record"]["method"] == "api" for r in receipts)
    assert "198.51.100" not in exported.stdout and "CanaryAgent" not in exported.stdout

    # An attacker with write access rewrites the second choice (dropping the append-only trigger first).
    with sqlite3.connect(tmp_path / "receipts.sqlite3") as db:
        db.execute("DROP TRIGGER IF EXISTS receipts_no_update")
        (record,) = db.execute("SELECT record FROM receipts WHERE seq = 2").fetchone()
        db.execute("UPDATE receipts SET record = ? WHERE seq = 2", (record.replace("false", "true"),))
    tampered = run_gateway("consent", "verify", "--config", str(config))
    assert tampered.returncode == 1
    assert tampered.stdout.startswith("TAMPERED: row 2:")


def test_explain_shows_what_each_destination_would_receive() -> None:

    env = {"GA4_API_SECRET": "explain-secret-canary"}
    args = ("explain", "--config", "config/python.org.toml", "--url", "https://www.python.org/downloads/?email=a%40b.c")
    env.update({"CONSENT_KEY": "k" * 40, "METRICS_TOKEN": "t"})
    denied = run_gateway(*args, "--consent", "denied", env=env)
    assert denied.returncode == 0, denied.stderr
    rows = {row["destination"]: row for row in _json_objects(denied.stdout)}
    assert rows["plausible"]["sent"] is True
    assert rows["plausible"]["request"]["body"]["url"] == "https://www.python.org/downloads/"
    assert rows["ga4"]["sent"] is False
    granted = run_gateway(*args, "--consent", "granted", env=env)
    rows = {row["destination"]: row for row in _json_objects(granted.stdout)}
    assert rows["ga4"]["sent"] is True
    assert "explain-secret-canary" not in granted.stdout
    gpc = run_gateway(*args, "--consent", "denied", "--gpc", env=env)
    assert {row["destination"]: row["sent"] for row in _json_objects(gpc.stdout)} == {"plausible": True, "ga4": False}


def _json_objects(text: str) -> list[dict[str, object]]:
    import json

    decoder = json.JSONDecoder()
    objects, index = [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        obj, index = decoder.raw_decode(text, index)
        objects.append(obj)
    return objects


def test_check_and_explain_work_on_the_example_without_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """config/gateway.example.toml references ${GA4_API_SECRET}: inspecting it must not need the secret."""
    monkeypatch.delenv("GA4_API_SECRET", raising=False)
    check = run_gateway("check", "--config", "config/gateway.example.toml")
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("config ok: config/gateway.example.toml")
    warning = (
        "config warning: destinations.ga4.api_secret: references ${GA4_API_SECRET}, which is not set in the"
        " environment (gateway serve refuses to start without it)"
    )
    assert check.stderr.strip().splitlines() == [warning]
    explained = run_gateway("explain", "--config", "config/gateway.example.toml", "--consent", "granted")
    assert explained.returncode == 0, explained.stderr
    assert explained.stderr.strip().splitlines() == [warning]
    assert '"api_secret=***"' not in explained.stdout and "api_secret=***" in explained.stdout
    assert "${GA4_API_SECRET}" not in explained.stdout  # the unexpanded reference is masked like a secret


def test_serve_refuses_to_start_without_a_referenced_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text(
        "[upstream]\nurl = 'http://127.0.0.1:9'\n"
        "[destinations.ga4]\nkind = 'ga4'\nendpoint = 'https://g.example/mp/collect'\nrequires = ['analytics']\n"
        "measurement_id = 'G-ABC1234'\napi_secret = '${GA4_SECRET_UNSET}'\n"
    )
    result = run_gateway("serve", "--config", str(path), "--port", "9")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "config error: destinations.ga4.api_secret: '${GA4_SECRET_UNSET}' references ${GA4_SECRET_UNSET}, which is"
        " not set in the environment"
    ]


def test_check_warns_about_what_a_narrower_field_list_costs(tmp_path: Path) -> None:
    path = tmp_path / "narrow.toml"
    path.write_text(
        "[destinations.plausible]\nkind = 'plausible'\nendpoint = 'https://plausible.io/api/event'\n"
        "domain = 'example.org'\nfields = ['name', 'url', 'referrer']\n"
    )
    result = run_gateway("check", "--config", str(path))
    assert result.returncode == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "config warning: destinations.plausible.fields: ['name', 'url', 'referrer'] leaves out 'ip', 'user_agent': "
    )
    assert "one visitor per day" in lines[0] and "browser and OS" in lines[0]
    minimal = tmp_path / "minimal.toml"
    minimal.write_text(path.read_text().replace("fields = ['name', 'url', 'referrer']\n", ""))
    quiet = run_gateway("check", "--config", str(minimal))
    assert (quiet.returncode, quiet.stderr) == (0, "")


def test_check_reads_the_python_org_profile_without_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSENT_KEY", "GA4_API_SECRET", "METRICS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # The profile's geo database lives on the production host; everything else is checked as written.
    result = run_gateway("check", "--config", "config/python.org.toml", env={"GATEWAY_GEO__DATABASE": '""'})
    assert result.returncode == 0, result.stderr
    warned = {line.split(":", 2)[1].strip() for line in result.stderr.strip().splitlines()}
    assert warned == {"consent.secret_keys[0]", "destinations.ga4.api_secret", "metrics.token"}
