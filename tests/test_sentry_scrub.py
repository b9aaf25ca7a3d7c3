"""Sentry payloads minimised by policy: recorded SDK envelopes (browser and Python SDK), and a no-leak property.

The fixtures in tests/fixtures/sentry/ were recorded from the real SDKs: ``browser_*.envelope`` as
@sentry/browser 11 posted them to the tunnel from headless Chromium (tests/test_sentry_browser.py's page),
``python_sdk_error.envelope`` from sentry-sdk 2 with ``send_default_pii=True`` and local variables on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import load_settings
from gateway.events import ERROR_REPORT, Event
from gateway.sentry_envelope import parse_envelope
from gateway.sentry_scrub import SentryScrubber, make_before_send
from gateway.sinks import PolicyDrop
from gateway.sinks.sentry import SentrySink

FIXTURES = Path(__file__).parent / "fixtures" / "sentry"
DSN = "http://publickey@127.0.0.1:9/42"
EMAIL = "alice@example.org"
TOKEN = "Zx9KqL2mWv8RtY4pNs6B"
FULL_IP = "198.51.100.77"
TRUNCATED = "198.51.100.0"
CANARIES = (EMAIL, TOKEN, FULL_IP)


def sink(fields: list[str] | None = None, **extra: Any) -> SentrySink:
    table: dict[str, Any] = {"kind": "sentry", "dsns": [DSN], **extra}
    if fields is not None:
        table["fields"] = fields
    settings = load_settings(
        environ={},
        overrides={"destinations": {"sentry": table}, "site": {"origins": ["http://127.0.0.1:35121"]},
                   "urls": {"allowed_query_params": ["utm_source"]}},
    )  # fmt: skip
    return SentrySink(settings.destinations["sentry"], settings)


def recorded(name: str) -> str:
    """A recorded envelope with its DSN set to the test's (the recording's port was random)."""
    raw = (FIXTURES / name).read_bytes()
    header, _, rest = raw.partition(b"\n")
    data = json.loads(header)
    data["dsn"] = DSN
    return (json.dumps(data).encode() + b"\n" + rest).decode("latin-1")


def scrubbed(envelope: str, fields: list[str] | None = None, ip: str = TRUNCATED) -> list[tuple[dict[str, Any], Any]]:
    target = sink(fields)
    payload = target.build(Event(ERROR_REPORT, "", ip=ip, props={"envelope": envelope}, event_id="e1"))
    out = parse_envelope(str(payload.body["envelope"]).encode("latin-1"))
    assert out.header["dsn"] == DSN
    return [(header, json.loads(body)) for header, body in out.items]


@pytest.mark.parametrize("fixture", ["browser_error.envelope", "browser_session.envelope", "python_sdk_error.envelope"])
@pytest.mark.parametrize(
    "fields", [None, ["url", "user_agent", "ip"], ["url"], []], ids=["default", "with-ip", "url-only", "nothing"]
)
def test_recorded_envelopes_leave_without_canaries(fixture: str, fields: list[str] | None) -> None:
    raw = recorded(fixture)
    assert any(canary in raw for canary in CANARIES)  # the SDK really put them there
    items = scrubbed(raw, fields)
    text = json.dumps(items)
    for canary in (*CANARIES, "{{auto}}"):
        assert canary not in text, (canary, fixture)
    effective = ["url", "user_agent"] if fields is None else fields
    for header, payload in items:
        if header["type"] == "event":
            assert payload.get("user", {}) == ({"ip_address": TRUNCATED} if "ip" in effective else {})
            request = payload.get("request", {})
            assert set(request) <= {"url", "method", "headers"}
            assert set(request.get("headers", {})) <= ({"User-Agent"} if "user_agent" in effective else set())
            for value in payload["exception"]["values"]:
                for frame in value.get("stacktrace", {}).get("frames", []):
                    assert "vars" not in frame
        if header["type"] == "session":
            assert "did" not in payload
            assert payload["attrs"].get("ip_address") == (TRUNCATED if "ip" in effective else None)


def test_browser_error_keeps_what_sentry_needs() -> None:
    [(header, event)] = scrubbed(recorded("browser_error.envelope"))
    assert header == {"type": "event", "length": header["length"]}
    value = event["exception"]["values"][0]
    assert value["type"] == "Error"
    assert value["value"] == "checkout failed for :redacted with token :redacted"
    assert event["request"]["url"] == "http://127.0.0.1:35121/app?utm_source=mail"
    assert value["stacktrace"]["frames"][0]["filename"] == "http://127.0.0.1:35121/app?utm_source=mail"
    assert event["release"] == "python-org@2026.12.1" and event["environment"] == "production"
    assert len(event["event_id"]) == 32
    breadcrumbs = event["breadcrumbs"]  # the browser SDK sends a list, older SDKs {"values": [...]}
    crumbs = [c for c in breadcrumbs if c.get("category") == "navigation"]
    assert crumbs and crumbs[0]["data"] == {"from": "/reset/:redacted", "to": "/checkout"}


def test_python_sdk_error_drops_server_side_secrets() -> None:
    [(_, event)] = scrubbed(recorded("python_sdk_error.envelope"), ["url", "user_agent", "ip"])
    request = event["request"]
    assert request == {
        "url": "https://www.python.org/reset/:redacted/?utm_source=mail",
        "method": "POST",
        "headers": {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0"},
    }
    frames = event["exception"]["values"][0]["stacktrace"]["frames"]
    assert frames and all("vars" not in frame for frame in frames)  # local variables held the e-mail and token
    assert event["tags"]["reset_link"] == "https://www.python.org/reset/:redacted/"


def test_item_types_not_listed_are_dropped_and_an_empty_envelope_is_not_sent() -> None:
    envelope = recorded("browser_session.envelope")
    with pytest.raises(PolicyDrop, match="no_items_allowed"):
        sink(item_types=["event"]).build(Event(ERROR_REPORT, "", props={"envelope": envelope}))


def test_before_send_scrubs_python_sdk_events() -> None:
    settings = load_settings(
        environ={}, overrides={"destinations": {"sentry": {"kind": "sentry", "dsns": [DSN], "fields": ["url", "ip"]}}}
    )
    before_send = make_before_send(settings)
    raw = parse_envelope((FIXTURES / "python_sdk_error.envelope").read_bytes())
    event = json.loads(raw.items[0][1])
    event["request"] = {"url": f"https://www.python.org/a?token={TOKEN}", "env": {"REMOTE_ADDR": FULL_IP}}
    cleaned = before_send(event, {})
    assert cleaned is not None
    assert cleaned["user"] == {"ip_address": TRUNCATED}
    assert not any(canary in json.dumps(cleaned) for canary in CANARIES)


# Any JSON an SDK could send, with a canary somewhere in it: none survives.
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12))
_keys = st.sampled_from(["message", "url", "value", "from", "filename", "event_id", "release", "tags", "data",
                         "extra", "x", "user", "request", "headers", "transaction", "description"])  # fmt: skip
_canary_text = st.sampled_from(
    [EMAIL, FULL_IP, TOKEN, f"https://www.python.org/r?token={TOKEN}", f"/reset/{EMAIL}", f"ip {FULL_IP} seen",
     f"GET https://x.example/{TOKEN}/y", f"mailto:{EMAIL}", f"{{{{auto}}}} {EMAIL}"]
)  # fmt: skip
_trees = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4), max_leaves=12
)


@st.composite
def events_with_a_canary(draw: st.DrawFn) -> dict[str, Any]:
    tree = draw(st.dictionaries(_keys, _trees, max_size=5))
    canary = draw(_canary_text)
    path = draw(st.lists(_keys, min_size=1, max_size=4))
    as_key = draw(st.booleans())
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    if as_key:
        node[canary] = "v"
    else:
        node[path[-1]] = canary
    return tree


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events_with_a_canary(), st.sampled_from([None, ["url", "user_agent", "ip", "referrer"], []]))
def test_no_canary_survives_any_position(event: dict[str, Any], fields: list[str] | None) -> None:
    target = sink(fields)
    scrubber: SentryScrubber = target.scrubber
    out = json.dumps([scrubber.event(event, TRUNCATED), scrubber.session(event, TRUNCATED), scrubber.walk(event)])
    for canary in (*CANARIES, "{{auto}}"):
        assert canary not in out


def test_before_send_in_the_real_python_sdk() -> None:
    """sentry_sdk.init(before_send=make_before_send(settings)): what the SDK would send has no canary left."""
    import sentry_sdk
    from sentry_sdk.transport import Transport

    sent: list[bytes] = []

    class Capture(Transport):
        def capture_envelope(self, envelope: Any) -> None:
            sent.append(envelope.serialize())

    settings = load_settings(
        environ={}, overrides={"destinations": {"sentry": {"kind": "sentry", "dsns": [DSN], "fields": ["url", "ip"]}}}
    )
    client = sentry_sdk.Client(
        dsn=DSN, transport=Capture, send_default_pii=True, include_local_variables=True, default_integrations=False,
        before_send=make_before_send(settings),  # type: ignore[arg-type]
    )  # fmt: skip
    with sentry_sdk.isolation_scope() as scope:
        scope.set_client(client)
        scope.set_user({"email": EMAIL, "ip_address": FULL_IP})
        scope.set_tag("link", f"https://www.python.org/reset?token={TOKEN}")
        try:
            secret = {"email": EMAIL, "token": TOKEN}  # noqa: F841 - a local variable the SDK would send
            raise ValueError(f"no account for {EMAIL}")
        except ValueError:
            sentry_sdk.capture_exception()
    client.flush()
    assert sent
    text = b"".join(sent).decode()
    assert "no account for :redacted" in text and TRUNCATED in text
    for canary in CANARIES:
        assert canary not in text
