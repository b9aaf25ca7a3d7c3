"""Fixtures shared by the benchmarks: the page, the geo database, gateway settings files, cookies, request headers.

Every load run sends the same browser-like request (:data:`REQUEST_HEADERS` plus cookies): a page view from a
visitor behind a trusted proxy (``X-Forwarded-For``) who granted analytics consent, so the gateway does all of its
per-request work: resolve, geo-locate and truncate the address, verify the consent and client-id cookies, detect
the page view, sniff the ``<title>``, inject the banner's settings link and enqueue the event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from gateway.clientid import ClientIdCookie
from gateway.config import Settings, load_settings
from gateway.consent import ConsentManager

__all__ = [
    "CLIENT_ADDRESS",
    "CONSENT_KEY",
    "PAGE",
    "PAGE_PATH",
    "PAGE_QUERY",
    "REQUEST_HEADERS",
    "build_geo_database",
    "cookie_header",
    "gateway_settings",
    "to_toml",
    "write_wrk_script",
]

# A ~10 KB HTML page with a <title> (the reference page).
PAGE: Final = (
    b"<!doctype html><html><head><meta charset=utf-8><title>Download Python | Python.org</title></head><body><p>"
    + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 178
    + b"</p></body></html>"
)
PAGE_PATH: Final = "/downloads/"
PAGE_QUERY: Final = "utm_source=bench"
CONSENT_KEY: Final = "benchmark-signing-key-" + "k" * 32
# The visitor's address as a trusted proxy reports it; the geo fixture maps its network to a country.
CLIENT_ADDRESS: Final = "198.51.100.77"
REQUEST_HEADERS: Final = (
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("Accept-Language", "en-GB,en;q=0.9"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Referer", "https://www.google.com/"),
    ("Sec-Fetch-Dest", "document"),
    ("Sec-Fetch-Mode", "navigate"),
    ("Sec-Fetch-Site", "cross-site"),
    ("X-Forwarded-For", CLIENT_ADDRESS),
)


def build_geo_database(directory: Path) -> str:
    """A small country database (mmdb-writer, a test dependency) covering the benchmark's client addresses."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["198.51.0.0/16"]), {"country": {"iso_code": "GB", "names": {"en": "United Kingdom"}}})
    writer.insert_network(IPSet(["81.2.0.0/16"]), {"country": {"iso_code": "GB", "names": {"en": "United Kingdom"}}})
    writer.insert_network(IPSet(["2001:db8::/32"]), {"country": {"iso_code": "DE", "names": {"en": "Germany"}}})
    path = directory / "bench-country.mmdb"
    writer.to_db_file(str(path))
    return str(path)


def gateway_settings(
    directory: Path,
    geo_database: str,
    *,
    collector_url: str | None,
    upstream_url: str = "",
    spool: bool = True,
    queue_size: int | None = None,
) -> dict[str, Any]:
    """Settings (as a TOML-shaped mapping) close to a production config, with every file inside ``directory``.

    ``collector_url``: Plausible and GA4 destinations that really deliver (``dry_run = false``) to that local
    collector; ``None``: no destinations (events are built and handed to a dispatcher with no lanes).
    ``queue_size``: ``[dispatch] queue_size`` (default: the gateway's default).
    """
    settings: dict[str, Any] = {
        "server": {"access_log": False},
        "client_ip": {"trusted_proxies": ["127.0.0.1/32"]},
        "geo": {"database": geo_database},
        "consent": {"secret_keys": [CONSENT_KEY], "receipts": str(directory / "receipts.sqlite3")},
        "spool": {"enabled": spool, "path": str(directory / "spool.sqlite3")},
        "logging": {"level": "warning"},
    }
    if upstream_url:
        settings["upstream"] = {"url": upstream_url}
    if queue_size is not None:
        settings["dispatch"] = {"queue_size": queue_size}
    if collector_url is not None:
        settings["destinations"] = {
            "plausible": {
                "kind": "plausible",
                "endpoint": f"{collector_url}/api/event",
                "domain": "bench.example",
                "fields": ["name", "url", "referrer", "country", "user_agent", "ip"],
            },
            "ga4": {
                "kind": "ga4",
                "endpoint": f"{collector_url}/mp/collect",
                "measurement_id": "G-BENCH0001",
                "api_secret": "bench-secret-not-real",
                "requires": ["analytics"],
                "fields": ["name", "url", "referrer", "title", "country", "language"],
            },
        }
    return settings


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(table: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text for nested tables of strings, numbers, booleans and lists (all these settings need)."""
    lines: list[str] = []
    nested: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            nested.append((f"{prefix}.{key}" if prefix else key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    text = (f"[{prefix}]\n" if prefix and lines else "") + "".join(f"{line}\n" for line in lines)
    for name, sub in nested:
        text += "\n" + to_toml(sub, name)
    return text


def load(path: Path) -> Settings:
    return load_settings(path, environ={})


def cookie_header(settings: Settings) -> str:
    """A Cookie header with a valid consent cookie (analytics granted) and client-id cookie for ``settings``.

    Signed with the settings' own key and revision, exactly as ``POST /_privacy/consent`` would have made it.
    """
    manager = ConsentManager(settings)
    consent = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
    _, set_cookie = ClientIdCookie(settings).new()
    client_id = set_cookie.split(b";", 1)[0].decode("latin-1")  # "name=token"
    return f"{settings.consent.cookie}={consent}; {client_id}; theme=dark"


def write_wrk_script(path: Path, cookie: str) -> Path:
    """A wrk Lua script that sends the benchmark's browser headers (set once, so wrk's per-request cost is nil)."""
    lines = ['wrk.method = "GET"']
    for name, value in (*REQUEST_HEADERS, ("Cookie", cookie)):
        lines.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
