"""Local peers for the load test: an upstream site, and Plausible and GA4 collectors that check every payload.

Run as its own process, so the gateway, the peers and the traffic generator do not share one interpreter::

    python -m tests.load.collectors --collector-port 9001 --upstream-port 9002 \\
        --domain load.example --measurement-id G-LOADTEST1 --api-secret-env LOAD_GA4_SECRET

Collector port:

- ``POST /api/event``: Plausible Events API (protocols.md §1). 202 ``ok`` when the payload is valid, else 400 with
  ``{"errors": {"request": [...]}}``, as Plausible answers malformed input.
- ``POST /mp/collect``: GA4 Measurement Protocol (protocols.md §2). 204 when valid, else 400 with
  ``{"validationMessages": [...]}``. The real service answers 2xx to anything (G-REF); answering 400 here makes
  a bad payload visible twice: in the gateway's delivery counters and in these records.
- ``GET /_records``: everything received, as JSON ``{"collector": [...], "upstream": [...]}``.

Upstream port: a small site. ``/p/...`` are HTML pages (``/p/.../long...`` has a 600-character title,
``/p/.../account`` a title holding :data:`TITLE_CANARY`), ``/static/``, ``/img/``, ``/js/`` files are assets,
``/old/X`` redirects to ``/p/X``, anything else is a 404 HTML page. The upstream records each request's path and
headers except ``cookie`` and ``authorization`` (the site may legitimately receive the visitor's own cookie and
credentials; it must never receive a full client IP).

The validators are pure functions (``validate_plausible``, ``validate_ga4``) so the unit tests can call them.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypedDict
from urllib.parse import parse_qs, quote, urlsplit

__all__ = [
    "GA4_PATH",
    "PLAUSIBLE_PATH",
    "RECORDS_PATH",
    "TITLE_CANARY",
    "CollectorApp",
    "CollectorRecord",
    "PeerRecords",
    "UpstreamApp",
    "is_truncated_ip",
    "main",
    "validate_ga4",
    "validate_plausible",
]

PLAUSIBLE_PATH: Final = "/api/event"
GA4_PATH: Final = "/mp/collect"
RECORDS_PATH: Final = "/_records"
# The upstream puts this address into the <title> of account pages: a page's own content can hold personal data,
# and the gateway's title scrubbing must keep it from the destinations.
TITLE_CANARY: Final = "title-canary@example.org"

MAX_BODY_BYTES: Final = 1_000_000  # Plausible's read_body limit for text/plain bodies (P-REQ)

# Headers a destination may see. Beyond what the wire format needs (content-type, user-agent and, for Plausible,
# X-Forwarded-For with the truncated address), only what any HTTP/1.1 client adds on its own.
TRANSPORT_HEADERS: Final = frozenset(
    {"host", "content-length", "accept", "accept-encoding", "connection", "transfer-encoding"}
)
ALLOWED_HEADERS: Final = TRANSPORT_HEADERS | {"content-type", "user-agent", "x-forwarded-for"}

# --- Plausible (protocols.md §1.2) ------------------------------------------------------------------------------
PLAUSIBLE_KEYS: Final = frozenset(
    {
        "n", "name", "u", "url", "d", "domain", "r", "referrer", "p", "props", "m", "meta", "$", "revenue",
        "i", "interactive", "h", "hashMode", "sd", "e", "v",
    }
)  # fmt: skip
PLAUSIBLE_MAX_NAME_CHARS: Final = 120
PLAUSIBLE_MAX_URL_BYTES: Final = 2000
PLAUSIBLE_MAX_REFERRER_CHARS: Final = 2000
PLAUSIBLE_MAX_PROPS: Final = 30
PLAUSIBLE_MAX_PROP_KEY_BYTES: Final = 300
PLAUSIBLE_MAX_PROP_VALUE_BYTES: Final = 2000

# --- GA4 Measurement Protocol (protocols.md §2.2-2.4) ------------------------------------------------------------
GA4_MAX_BODY_BYTES: Final = 130_000  # "< 130 kB", read as decimal kB (the stricter reading)
GA4_MAX_EVENTS: Final = 25
GA4_MAX_PARAMS: Final = 25
GA4_MAX_NAME_CHARS: Final = 40
GA4_MAX_VALUE_CHARS: Final = 100
# Collection-limit exceptions (G-LIM). page_location and page_referrer are measured URL-encoded, as G-LIM says;
# page_title in characters (the sink's reading of the same sentence; the stricter one would reject any non-ASCII).
GA4_ENCODED_LIMITS: Final = {"page_location": 1000, "page_referrer": 420}
GA4_CHAR_LIMITS: Final = {"page_title": 300}
GA4_MAX_USER_PROPERTIES: Final = 25
GA4_MAX_USER_PROPERTY_NAME: Final = 24
GA4_MAX_USER_PROPERTY_VALUE: Final = 36
GA4_MAX_AGE_MICROS: Final = 72 * 3600 * 1_000_000  # events older than 72 h are not accepted
GA4_CLOCK_SLACK_MICROS: Final = 60 * 1_000_000
GA4_TOP_LEVEL_KEYS: Final = frozenset(
    {
        "client_id", "user_id", "timestamp_micros", "user_properties", "user_data", "consent", "non_personalized_ads",
        "user_location", "ip_override", "device", "user_agent", "validation_behavior", "events",
    }
)  # fmt: skip
# A privacy gateway never sends a user id or user-provided data (protocols.md §5.3).
GA4_FORBIDDEN_KEYS: Final = frozenset({"user_id", "user_data"})
GA4_EVENT_KEYS: Final = frozenset({"name", "params", "timestamp_micros"})
GA4_CONSENT_KEYS: Final = frozenset({"ad_user_data", "ad_personalization"})
GA4_CONSENT_VALUES: Final = frozenset({"GRANTED", "DENIED"})
GA4_RESERVED_EVENTS: Final = frozenset(
    {
        "ad_activeview", "ad_click", "ad_exposure", "ad_query", "ad_reward", "adunit_exposure", "app_clear_data",
        "app_exception", "app_install", "app_remove", "app_store_refund", "app_update", "app_upgrade",
        "dynamic_link_app_open", "dynamic_link_app_update", "dynamic_link_first_open", "error", "firebase_campaign",
        "firebase_in_app_message_action", "firebase_in_app_message_dismiss", "firebase_in_app_message_impression",
        "first_open", "first_visit", "notification_dismiss", "notification_foreground", "notification_open",
        "notification_receive", "notification_send", "os_update", "session_start", "user_engagement",
        "ad_impression", "in_app_purchase", "screen_view",  # app streams only; the gateway feeds a web stream
    }
)  # fmt: skip
GA4_RESERVED_PARAMS: Final = frozenset({"firebase_conversion"})
GA4_RESERVED_PREFIXES: Final = ("_", "firebase_", "ga_", "google_", "gtag.")
GA4_RESERVED_USER_PROPERTIES: Final = frozenset(
    {"first_open_time", "first_visit_time", "last_deep_link_referrer", "user_id", "first_open_after_install"}
)
_GA4_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_GA4_CLIENT_ID: Final = re.compile(r"[0-9]+\.[0-9]+")  # "two positive numbers, joined by a period" (G-REF)
_MEASUREMENT_ID: Final = re.compile(r"G-[A-Z0-9]+")
_COUNTRY: Final = re.compile(r"[A-Z]{2}")


class CollectorRecord(TypedDict):
    """One request a peer received. ``destination`` is "plausible", "ga4", "upstream" or "unknown"."""

    destination: str
    method: str
    path: str
    query: str
    headers: list[list[str]]
    body: str
    status: int
    problems: list[str]
    received_at: float


class PeerRecords(TypedDict):
    collector: list[CollectorRecord]
    upstream: list[CollectorRecord]


# ---------------------------------------------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------------------------------------------


def is_truncated_ip(text: str, ipv4_prefix: int = 24, ipv6_prefix: int = 48) -> bool:
    """True if ``text`` is an IP address with every bit past the prefix zero (``198.51.100.0``, ``2001:db8:1::``)."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return address == network.network_address


def _check_headers(headers: Sequence[tuple[str, str]], allowed: frozenset[str], problems: list[str]) -> None:
    seen: set[str] = set()
    for name, _ in headers:
        if name not in allowed:
            problems.append(f"header {name!r} must not be sent")
        elif name in seen and name not in ("accept", "accept-encoding"):
            problems.append(f"header {name!r} sent twice")
        seen.add(name)


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _check_forwarded_for(
    headers: Sequence[tuple[str, str]], problems: list[str], *, required: bool, ipv4_prefix: int, ipv6_prefix: int
) -> None:
    value = _header(headers, "x-forwarded-for")
    if value is None:
        if required:
            problems.append("x-forwarded-for is missing: Plausible would see the gateway's address")
        return
    for item in value.split(","):
        if not is_truncated_ip(item, ipv4_prefix, ipv6_prefix):
            problems.append(f"x-forwarded-for {item.strip()!r} is not a truncated address")


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _decode_json_object(body: bytes, problems: list[str]) -> dict[str, Any] | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        problems.append("body is not UTF-8")
        return None
    try:
        value = json.loads(text)
    except ValueError:
        problems.append("Unable to parse request body as json")
        return None
    if not isinstance(value, dict):
        problems.append("body is not a JSON object")
        return None
    return value


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


# ---------------------------------------------------------------------------------------------------------------
# Plausible
# ---------------------------------------------------------------------------------------------------------------


def _plausible_field(body: Mapping[str, Any], short: str, long: str) -> Any:
    value = body.get(short)
    return body.get(long) if value is None or value is False else value


def validate_plausible(
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    domain: str,
    require_forwarded_for: bool = True,
    ipv4_prefix: int = 24,
    ipv6_prefix: int = 48,
) -> list[str]:
    """Problems with one ``POST /api/event`` (protocols.md §1.2-1.3, §5.1); empty when Plausible would accept it.

    Stricter than Plausible where Plausible is silently lossy: more than 30 props, or props that are not scalars,
    are problems here (Plausible discards them without telling), as are keys Plausible does not know.
    """
    problems: list[str] = []
    _check_headers(headers, ALLOWED_HEADERS, problems)
    content_type = _media_type(_header(headers, "content-type"))
    if content_type not in ("application/json", "text/plain"):
        problems.append(f"content-type {content_type!r} is neither application/json nor text/plain")
    if not (_header(headers, "user-agent") or "").strip():
        problems.append("user-agent is required")
    _check_forwarded_for(
        headers, problems, required=require_forwarded_for, ipv4_prefix=ipv4_prefix, ipv6_prefix=ipv6_prefix
    )
    if len(body) > MAX_BODY_BYTES:
        problems.append(f"body of {len(body)} bytes is over {MAX_BODY_BYTES}")
        return problems
    data = _decode_json_object(body, problems)
    if data is None:
        return problems

    for key in data:
        if key not in PLAUSIBLE_KEYS:
            problems.append(f"unknown key {key!r}")

    name = _plausible_field(data, "n", "name")
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)
    if not isinstance(name, str) or not name:
        problems.append("name is required")
    elif len(name) > PLAUSIBLE_MAX_NAME_CHARS:
        problems.append(f"name has {len(name)} characters, more than {PLAUSIBLE_MAX_NAME_CHARS}")

    url = _plausible_field(data, "u", "url")
    if not isinstance(url, str) or not url:
        problems.append("url is required")
    else:
        size = len(url.encode("utf-8"))
        if size > PLAUSIBLE_MAX_URL_BYTES:
            problems.append(f"url has {size} bytes, more than {PLAUSIBLE_MAX_URL_BYTES}")
        try:
            parts = urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            problems.append("url must be a valid http(s) url")

    raw_domain = _plausible_field(data, "d", "domain")
    if not isinstance(raw_domain, str) or not raw_domain.strip():
        problems.append("domain can't be blank")
    else:
        for entry in raw_domain.split(","):
            if entry.strip().removeprefix("www.") != domain:
                problems.append(f"domain {entry.strip()!r} is not the configured {domain!r}")

    referrer = _plausible_field(data, "r", "referrer")
    if referrer is not None and not isinstance(referrer, str):
        problems.append("referrer must be a string")
    elif isinstance(referrer, str) and len(referrer) > PLAUSIBLE_MAX_REFERRER_CHARS:
        problems.append(f"referrer has {len(referrer)} characters, more than {PLAUSIBLE_MAX_REFERRER_CHARS}")

    props: Any = None
    for key in ("m", "meta", "p", "props"):
        props = data.get(key)
        if props is not None and props is not False:
            break
    if isinstance(props, str):
        try:
            props = json.loads(props)
        except ValueError:
            problems.append("props is a string that is not JSON")
            props = None
    if props is not None and props is not False:
        if not isinstance(props, dict):
            problems.append("props must be an object")
        else:
            _check_plausible_props(props, problems)
    return problems


def _check_plausible_props(props: Mapping[str, Any], problems: list[str]) -> None:
    if len(props) > PLAUSIBLE_MAX_PROPS:
        problems.append(f"{len(props)} props, more than {PLAUSIBLE_MAX_PROPS} (the rest would be discarded)")
    for key, value in props.items():
        if len(key.encode("utf-8")) > PLAUSIBLE_MAX_PROP_KEY_BYTES:
            problems.append(f"prop key of {len(key.encode('utf-8'))} bytes, more than {PLAUSIBLE_MAX_PROP_KEY_BYTES}")
        if not _is_scalar(value):
            problems.append(f"prop {key[:40]!r} is not a scalar (it would be discarded)")
            continue
        size = len(str(value).encode("utf-8"))
        if size > PLAUSIBLE_MAX_PROP_VALUE_BYTES:
            problems.append(f"prop {key[:40]!r} value of {size} bytes, more than {PLAUSIBLE_MAX_PROP_VALUE_BYTES}")


# ---------------------------------------------------------------------------------------------------------------
# GA4
# ---------------------------------------------------------------------------------------------------------------


def _encoded_length(text: str) -> int:
    # As encodeURIComponent encodes a query value.
    return len(quote(text, safe="-_.!~*'()"))


def _ga4_name_problem(name: object, what: str) -> str | None:
    if not isinstance(name, str) or not name:
        return f"{what} is required"
    if len(name) > GA4_MAX_NAME_CHARS:
        return f"{what} {name[:60]!r} has more than {GA4_MAX_NAME_CHARS} characters"
    if not _GA4_NAME.fullmatch(name):
        return f"{what} {name[:60]!r} must start with a letter and hold only letters, digits and _"
    return None


def _check_timestamp(value: object, what: str, now_micros: int, problems: list[str]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{what} must be an integer number of microseconds")
    elif value > now_micros + GA4_CLOCK_SLACK_MICROS:
        problems.append(f"{what} is in the future")
    elif value < now_micros - GA4_MAX_AGE_MICROS:
        problems.append(f"{what} is older than 72 hours")


def validate_ga4(
    query: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    *,
    measurement_id: str,
    api_secret: str,
    ipv4_prefix: int = 24,
    ipv6_prefix: int = 48,
    now: float | None = None,
) -> list[str]:
    """Problems with one ``POST /mp/collect`` (protocols.md §2.1-2.4); empty when every documented limit holds."""
    problems: list[str] = []
    now_micros = int((time.time() if now is None else now) * 1_000_000)
    params = parse_qs(query, keep_blank_values=True)
    for key, values in params.items():
        if key not in ("measurement_id", "api_secret"):
            problems.append(f"unexpected query parameter {key!r}")
        elif len(values) != 1:
            problems.append(f"query parameter {key!r} given {len(values)} times")
    mid = params.get("measurement_id", [""])[0]
    if not _MEASUREMENT_ID.fullmatch(mid) or mid != measurement_id:
        problems.append(f"measurement_id {mid!r} is not {measurement_id!r}")
    if params.get("api_secret", [""])[0] != api_secret:
        problems.append("api_secret is missing or wrong")

    _check_headers(headers, ALLOWED_HEADERS, problems)
    if _media_type(_header(headers, "content-type")) != "application/json":
        problems.append("content-type must be application/json")
    _check_forwarded_for(headers, problems, required=False, ipv4_prefix=ipv4_prefix, ipv6_prefix=ipv6_prefix)
    if len(body) >= GA4_MAX_BODY_BYTES:
        problems.append(f"body of {len(body)} bytes is not below {GA4_MAX_BODY_BYTES}")
        return problems
    data = _decode_json_object(body, problems)
    if data is None:
        return problems

    for key in data:
        if key in GA4_FORBIDDEN_KEYS:
            problems.append(f"{key!r} must never be sent")
        elif key not in GA4_TOP_LEVEL_KEYS:
            problems.append(f"unknown key {key!r}")
    client_id = data.get("client_id")
    if not isinstance(client_id, str) or not _GA4_CLIENT_ID.fullmatch(client_id):
        problems.append("client_id is required: two positive numbers joined by a period")
    if "timestamp_micros" in data:
        _check_timestamp(data["timestamp_micros"], "timestamp_micros", now_micros, problems)
    _check_ga4_consent(data.get("consent"), problems)
    if "ip_override" in data:
        ip = data["ip_override"]
        if not isinstance(ip, str) or not is_truncated_ip(ip, ipv4_prefix, ipv6_prefix):
            problems.append(f"ip_override {str(ip)[:60]!r} is not a truncated address")
    if "user_location" in data:
        location = data["user_location"]
        if not isinstance(location, dict):
            problems.append("user_location must be an object")
        elif "country_id" in location and not (
            isinstance(location["country_id"], str) and _COUNTRY.fullmatch(location["country_id"])
        ):
            problems.append("user_location.country_id must be an ISO 3166-1 alpha-2 code")
    if "user_agent" in data and not isinstance(data["user_agent"], str):
        problems.append("user_agent must be a string")
    if "validation_behavior" in data and data["validation_behavior"] not in ("RELAXED", "ENFORCE_RECOMMENDATIONS"):
        problems.append("validation_behavior must be RELAXED or ENFORCE_RECOMMENDATIONS")
    if "user_properties" in data:
        _check_ga4_user_properties(data["user_properties"], problems)

    events = data.get("events")
    if not isinstance(events, list) or not events:
        problems.append("events is required: a list of 1 to 25 events")
        return problems
    if len(events) > GA4_MAX_EVENTS:
        problems.append(f"{len(events)} events, more than {GA4_MAX_EVENTS}")
    for index, event in enumerate(events):
        _check_ga4_event(index, event, now_micros, problems)
    return problems


def _check_ga4_consent(consent: object, problems: list[str]) -> None:
    if consent is None:
        return
    if not isinstance(consent, dict):
        problems.append("consent must be an object")
        return
    for key, value in consent.items():
        if key not in GA4_CONSENT_KEYS:
            problems.append(f"consent.{key} is not a consent field")
        elif value not in GA4_CONSENT_VALUES:
            problems.append(f"consent.{key} must be GRANTED or DENIED")


def _check_ga4_user_properties(properties: object, problems: list[str]) -> None:
    if not isinstance(properties, dict):
        problems.append("user_properties must be an object")
        return
    if len(properties) > GA4_MAX_USER_PROPERTIES:
        problems.append(f"{len(properties)} user properties, more than {GA4_MAX_USER_PROPERTIES}")
    for name, entry in properties.items():
        if (
            len(name) > GA4_MAX_USER_PROPERTY_NAME
            or not _GA4_NAME.fullmatch(name)
            or name in GA4_RESERVED_USER_PROPERTIES
            or name.startswith(GA4_RESERVED_PREFIXES[:4])
        ):
            problems.append(f"user property name {name[:40]!r} is invalid or reserved")
        value = entry.get("value") if isinstance(entry, dict) else None
        if isinstance(value, str) and len(value) > GA4_MAX_USER_PROPERTY_VALUE:
            problems.append(f"user property {name[:40]!r} value longer than {GA4_MAX_USER_PROPERTY_VALUE}")


def _check_ga4_event(index: int, event: object, now_micros: int, problems: list[str]) -> None:
    where = f"events[{index}]"
    if not isinstance(event, dict):
        problems.append(f"{where} is not an object")
        return
    for key in event:
        if key not in GA4_EVENT_KEYS:
            problems.append(f"{where}: unknown key {key!r}")
    name = event.get("name")
    problem = _ga4_name_problem(name, f"{where}.name")
    if problem:
        problems.append(problem)
    elif name in GA4_RESERVED_EVENTS:
        problems.append(f"{where}.name {name!r} is reserved")
    if "timestamp_micros" in event:
        _check_timestamp(event["timestamp_micros"], f"{where}.timestamp_micros", now_micros, problems)
    params = event.get("params", {})
    if not isinstance(params, dict):
        problems.append(f"{where}.params must be an object")
        return
    if len(params) > GA4_MAX_PARAMS:
        problems.append(f"{where}: {len(params)} params, more than {GA4_MAX_PARAMS}")
    for key, value in params.items():
        problem = _ga4_name_problem(key, f"{where} param")
        if problem:
            problems.append(problem)
        elif key in GA4_RESERVED_PARAMS or key.startswith(GA4_RESERVED_PREFIXES):
            problems.append(f"{where} param {key!r} is reserved")
        if key == "items" and isinstance(value, list):
            continue  # ecommerce items: not sent by the gateway, not validated here
        if not _is_scalar(value):
            problems.append(f"{where} param {key!r} is not a string or number")
        elif isinstance(value, str):
            if key in GA4_ENCODED_LIMITS:
                size, limit = _encoded_length(value), GA4_ENCODED_LIMITS[key]
            else:
                size, limit = len(value), GA4_CHAR_LIMITS.get(key, GA4_MAX_VALUE_CHARS)
            if size > limit:
                problems.append(f"{where} param {key!r} has length {size}, more than {limit}")


# ---------------------------------------------------------------------------------------------------------------
# The ASGI apps
# ---------------------------------------------------------------------------------------------------------------

Scope = Mapping[str, Any]
Message = dict[str, Any]


async def _read_body(receive: Any, limit: int) -> bytes | None:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def _respond(send: Any, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8") -> None:
    headers = [] if status == 204 else [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if status == 204 else body})


def _text_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw]


def _record(
    destination: str, scope: Scope, headers: Sequence[tuple[str, str]], body: bytes, status: int, problems: list[str]
) -> CollectorRecord:
    return {
        "destination": destination,
        "method": scope["method"],
        "path": scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
        "query": scope.get("query_string", b"").decode("latin-1"),
        "headers": [[name, value] for name, value in headers],
        "body": body.decode("utf-8", errors="replace"),
        "status": status,
        "problems": problems,
        "received_at": time.time(),
    }


class CollectorApp:
    """Plausible and GA4 endpoints on one port; every request is recorded with its problems."""

    def __init__(
        self,
        *,
        domain: str,
        measurement_id: str,
        api_secret: str,
        upstream: UpstreamApp | None = None,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 48,
    ) -> None:
        self.domain = domain
        self.measurement_id = measurement_id
        self._api_secret = api_secret
        self.upstream = upstream
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.records: list[CollectorRecord] = []

    def snapshot(self) -> PeerRecords:
        return {"collector": list(self.records), "upstream": list(self.upstream.records) if self.upstream else []}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path == RECORDS_PATH and method == "GET":
            body = json.dumps(self.snapshot()).encode()
            await _respond(send, 200, body, b"application/json")
            return
        headers = _text_headers(scope["headers"])
        body_or_none = await _read_body(receive, MAX_BODY_BYTES)
        body = body_or_none if body_or_none is not None else b""
        problems: list[str] = []
        if body_or_none is None:
            problems.append(f"body over {MAX_BODY_BYTES} bytes or client disconnected")
        if path == PLAUSIBLE_PATH:
            destination = "plausible"
            if method != "POST":
                problems.append(f"method {method} (only POST is served)")
            problems += validate_plausible(
                headers, body, domain=self.domain, ipv4_prefix=self.ipv4_prefix, ipv6_prefix=self.ipv6_prefix
            )
            if problems:
                status = 400
                answer = json.dumps({"errors": {"request": problems}}).encode()
                await _respond(send, status, answer, b"application/json")
            else:
                status = 202
                await _respond(send, status, b"ok")
        elif path == GA4_PATH:
            destination = "ga4"
            if method != "POST":
                problems.append(f"method {method} (only POST is served)")
            problems += validate_ga4(
                scope.get("query_string", b"").decode("latin-1"),
                headers,
                body,
                measurement_id=self.measurement_id,
                api_secret=self._api_secret,
                ipv4_prefix=self.ipv4_prefix,
                ipv6_prefix=self.ipv6_prefix,
            )
            if problems:
                status = 400
                messages = [{"fieldPath": "", "description": p, "validationCode": "VALUE_INVALID"} for p in problems]
                await _respond(send, status, json.dumps({"validationMessages": messages}).encode(), b"application/json")
            else:
                status = 204
                await _respond(send, status, b"")
        else:
            destination = "unknown"
            problems.append(f"{method} {path}: no such collector endpoint")
            status = 404
            await _respond(send, status, b"not found")
        self.records.append(_record(destination, scope, headers, body, status, problems))


_PAGE_TEMPLATE: Final = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
    '<link rel="stylesheet" href="/static/site.css"></head>\n<body><main><h1>{title}</h1>\n{filler}'
    "</main></body></html>\n"
)
_FILLER: Final = "<p>" + "Python is a programming language that lets you work quickly. " * 8 + "</p>\n"
_ASSET_TYPES: Final = {
    ".css": b"text/css",
    ".js": b"text/javascript",
    ".png": b"image/png",
}


class UpstreamApp:
    """The site behind the gateway. Records what reaches it (minus the visitor's own cookie and credentials)."""

    def __init__(self) -> None:
        self.records: list[CollectorRecord] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = _text_headers(scope["headers"])
        await _read_body(receive, MAX_BODY_BYTES)
        path: str = scope["path"]
        method: str = scope["method"]
        status, content_type, body, extra = self._page(path)
        start_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": start_headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        kept = [(n, v) for n, v in headers if n not in ("cookie", "authorization")]
        self.records.append(_record("upstream", scope, kept, b"", status, []))

    @staticmethod
    def _page(path: str) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        if path.startswith("/p/"):
            if "/long" in path:
                title = "Über Python – a very long title " + "with many words " * 36
            elif path.endswith("/account"):
                title = f"Your account ({TITLE_CANARY}) – Python"
            else:
                title = "Welcome to Python.org &amp; friends"
            html = _PAGE_TEMPLATE.format(title=title, filler=_FILLER * 4)
            return 200, b"text/html; charset=utf-8", html.encode(), []
        dot = path.rfind(".")
        if path.startswith(("/static/", "/img/", "/js/")) and path[dot:] in _ASSET_TYPES:
            return 200, _ASSET_TYPES[path[dot:]], b"/* asset */\n" * 64, []
        if path.startswith("/old/"):
            location = "/p/" + path.removeprefix("/old/")
            return 301, b"text/html; charset=utf-8", b"<p>moved</p>", [(b"location", location.encode("latin-1"))]
        html = _PAGE_TEMPLATE.format(title="Page not found", filler="<p>Nothing here.</p>")
        return 404, b"text/html; charset=utf-8", html.encode(), []


# ---------------------------------------------------------------------------------------------------------------
# Process entry point
# ---------------------------------------------------------------------------------------------------------------


async def _serve(collector: CollectorApp, upstream: UpstreamApp, collector_port: int, upstream_port: int) -> None:
    import uvicorn

    servers = [
        uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                access_log=False,
                log_level="warning",
                lifespan="off",
                http="httptools",
                proxy_headers=False,
                server_header=False,
                date_header=False,
            )
        )
        for app, port in ((upstream, upstream_port), (collector, collector_port))
    ]
    await asyncio.gather(*(server.serve() for server in servers))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--collector-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--domain", required=True, help="the Plausible site domain the gateway must send")
    parser.add_argument("--measurement-id", required=True)
    parser.add_argument("--api-secret-env", required=True, help="environment variable holding the GA4 api_secret")
    parser.add_argument("--ipv4-prefix", type=int, default=24)
    parser.add_argument("--ipv6-prefix", type=int, default=48)
    args = parser.parse_args(argv)
    upstream = UpstreamApp()
    collector = CollectorApp(
        domain=args.domain,
        measurement_id=args.measurement_id,
        api_secret=os.environ[args.api_secret_env],
        upstream=upstream,
        ipv4_prefix=args.ipv4_prefix,
        ipv6_prefix=args.ipv6_prefix,
    )
    try:
        import uvloop

        uvloop.run(_serve(collector, upstream, args.collector_port, args.upstream_port))
    except ImportError:  # pragma: no cover - uvloop is installed with uvicorn[standard]
        asyncio.run(_serve(collector, upstream, args.collector_port, args.upstream_port))


if __name__ == "__main__":
    main()
