from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import httpx
import pytest

from gateway.sinks import Outcome, PolicyDrop
from gateway.sinks.factory import build_sinks
from gateway.sinks.plausible import (
    GENERIC_USER_AGENT,
    MAX_PROP_KEY_BYTES,
    MAX_PROP_VALUE_BYTES,
    MAX_PROPS,
    MAX_URL_BYTES,
    PlausibleSink,
)
from tests.sinks import CHROME_UA, TRUNCATED_IP, Recorder, deliver, make_event, python_org_settings, sink_named

ALL_FIELDS = ["name", "url", "referrer", "title", "country", "language", "user_agent", "ip", "props"]


def plausible(**dest: Any) -> PlausibleSink:
    sink = sink_named(build_sinks(python_org_settings(plausible=dest)), "plausible")
    assert isinstance(sink, PlausibleSink)
    return sink


CONSENT_STATES: dict[str, dict[str, Any]] = {
    "granted": {"granted": frozenset({"analytics"})},
    "refused": {"granted": frozenset()},
    "gpc": {"granted": frozenset(), "gpc": True},
    "no_choice_yet": {},
}


@pytest.mark.anyio
@pytest.mark.parametrize("consent", list(CONSENT_STATES))
async def test_pageview_wire_format_is_exact_for_every_consent_state(consent: str) -> None:
    # Plausible is cookieless in the python.org profile: it needs no consent, so every state sends the same request.
    sink = plausible()
    event = make_event(
        url="https://www.python.org/downloads/release/python-3130/?utm_source=x&email=a@b.c#frag",
        referrer="https://mail.example.com/inbox/42?user=someone@example.com",
        **CONSENT_STATES[consent],
    )
    recorder = Recorder()
    response = await deliver(sink, [sink.build(event)], recorder)

    assert response.status_code == 202
    [request] = recorder.requests
    body = request.content
    assert request.method == "POST"
    assert str(request.url) == "https://plausible.io/api/event"
    # The complete header set that leaves the machine: nothing else (no cookie, no accept-*, no other forwarding).
    assert dict(request.headers) == {
        "host": "plausible.io",
        "content-length": str(len(body)),
        "content-type": "application/json",
        "user-agent": CHROME_UA,
        "x-forwarded-for": TRUNCATED_IP,
    }
    assert len(request.headers.raw) == 5
    assert json.loads(body) == {
        "name": "pageview",
        "url": "https://www.python.org/downloads/release/python-3130/?utm_source=x",
        "domain": "python.org",
        "referrer": "https://mail.example.com/",
    }


@pytest.mark.anyio
async def test_client_cookies_and_default_headers_never_ride_along() -> None:
    sink = plausible()
    recorder = Recorder()
    await deliver(
        sink,
        [sink.build(make_event())],
        recorder,
        cookies={"sessionid": "c00kie-canary"},
        headers={"authorization": "Bearer auth-canary"},
    )
    [request] = recorder.requests
    assert "cookie" not in request.headers
    assert "authorization" not in request.headers
    assert set(request.headers) == {"host", "content-length", "content-type", "user-agent", "x-forwarded-for"}


@pytest.mark.anyio
async def test_without_user_agent_and_ip_fields_a_generic_agent_and_no_forwarding_header() -> None:
    sink = plausible(fields=["name", "url"])
    recorder = Recorder()
    await deliver(sink, [sink.build(make_event())], recorder)
    [request] = recorder.requests
    assert dict(request.headers) == {
        "host": "plausible.io",
        "content-length": str(len(request.content)),
        "content-type": "application/json",
        "user-agent": GENERIC_USER_AGENT,
    }
    assert GENERIC_USER_AGENT.startswith("privacy-gateway/")
    # Referrer not allowed: omitted, not sent empty.
    assert json.loads(request.content) == {
        "name": "pageview",
        "url": "https://www.python.org/downloads/",
        "domain": "python.org",
    }


def test_empty_user_agent_falls_back_to_the_generic_one() -> None:
    payload = plausible().build(make_event(user_agent=""))
    assert ("user-agent", GENERIC_USER_AGENT) in payload.headers


def test_url_not_allowed_sends_only_the_origin() -> None:
    payload = plausible(fields=["name", "referrer"]).build(make_event(url="https://www.python.org/secret/path/?q=1"))
    assert payload.body["url"] == "https://www.python.org/"


def test_own_site_referrer_is_scrubbed_not_cut_to_origin() -> None:
    payload = plausible().build(
        make_event(referrer="https://www.python.org/accounts/password/reset/key/3-abc123def456abc123def456/?next=/x")
    )
    assert payload.body["referrer"] == "https://www.python.org/accounts/password/reset/key/:redacted/"


def test_props_only_when_allowed_and_omitted_when_empty() -> None:
    event = make_event(props={"section": "downloads"})
    assert "props" not in plausible().build(event).body
    assert plausible(fields=[*ALL_FIELDS]).build(event).body["props"] == {"section": "downloads"}
    assert "props" not in plausible(fields=[*ALL_FIELDS]).build(make_event(props={})).body


def test_fields_plausible_has_no_place_for_are_never_sent() -> None:
    body = plausible(fields=ALL_FIELDS).build(make_event()).body
    assert set(body) == {"name", "url", "domain", "referrer"}
    assert "GB" not in json.dumps(body) and "Download Python" not in json.dumps(body)


def test_custom_event_needs_the_name_field() -> None:
    event = make_event(name="Download")
    assert plausible().build(event).body["name"] == "Download"
    with pytest.raises(PolicyDrop) as info:
        plausible(fields=["url"]).build(event)
    assert info.value.reason == "custom_event_not_allowed"


def test_consent_is_checked_by_the_sink_itself() -> None:
    sink = plausible(requires=["analytics"])
    with pytest.raises(PolicyDrop) as info:
        sink.build(make_event())
    assert info.value.reason == "consent"
    assert sink.build(make_event(granted=frozenset({"analytics"}))).body["name"] == "pageview"


def test_request_carries_exactly_one_event() -> None:
    sink = plausible()
    payload = sink.build(make_event())
    assert sink.max_batch == 1 and payload.batch_key == ""
    with pytest.raises(ValueError):
        sink.request([payload, payload])


# ------------------------------------------------------------------------------------------------------------
# Limits (protocols.md §1.2): enforced locally because Plausible answers 400 to the whole request otherwise
# ------------------------------------------------------------------------------------------------------------


def test_url_is_capped_at_2000_bytes_dropping_the_query_first() -> None:
    long_path = "/".join(["segment"] * 400)
    body = plausible().build(make_event(url=f"https://www.python.org/{long_path}?utm_source=newsletter")).body
    assert len(body["url"].encode()) == MAX_URL_BYTES
    assert "?" not in body["url"]
    short = plausible().build(make_event(url="https://www.python.org/" + "x" * 1900 + "?utm_source=" + "y" * 200))
    assert short.body["url"] == "https://www.python.org/" + "x" * 1900


def test_url_cut_never_splits_a_percent_escape() -> None:
    body = plausible().build(make_event(url="https://www.python.org/" + "%C3%A9" * 400)).body
    assert len(body["url"]) <= MAX_URL_BYTES
    assert body["url"].endswith("%C3%A9")  # a cut through "é" drops its first byte too


def test_referrer_is_capped_at_2000_characters() -> None:
    body = plausible().build(make_event(referrer="https://www.python.org/" + "r" * 3000)).body
    assert len(body["referrer"]) == 2000


@pytest.mark.parametrize(("length", "sent"), [(120, True), (121, False)])
def test_event_name_is_at_most_120_characters(length: int, sent: bool) -> None:
    event = make_event(name="n" * length)
    if sent:
        assert plausible().build(event).body["name"] == "n" * length
    else:
        with pytest.raises(PolicyDrop) as info:
            plausible().build(event)
        assert info.value.reason == "event_name_too_long"


def test_props_are_capped_scalar_and_sized() -> None:
    props: dict[str, Any] = {f"k{i:02d}": f"v{i}" for i in range(40)}
    body = plausible(fields=ALL_FIELDS).build(make_event(props=props)).body
    assert len(body["props"]) == MAX_PROPS
    assert list(body["props"]) == [f"k{i:02d}" for i in range(MAX_PROPS)]

    odd: dict[str, Any] = {
        "k" * (MAX_PROP_KEY_BYTES + 1): "dropped: key too long",
        "long": "é" * MAX_PROP_VALUE_BYTES,  # 4000 bytes: cut to 2000 bytes on a character boundary
        "list": ["a", "b"],
        "map": {"a": 1},
        "none": None,
        "blank": "   ",
        "flag": True,
        "count": 3,
    }
    body = plausible(fields=ALL_FIELDS).build(make_event(props=odd)).body
    assert body["props"] == {"long": "é" * (MAX_PROP_VALUE_BYTES // 2), "flag": "true", "count": "3"}
    assert len(body["props"]["long"].encode()) == MAX_PROP_VALUE_BYTES


# ------------------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------------------


def http_date_in_120s() -> str:
    """Taken when the test runs, not at import: the suite may reach this test minutes after collecting it."""
    return email.utils.formatdate(time.time() + 120, usegmt=True)


@pytest.mark.parametrize(
    ("status", "headers", "content", "outcome", "reason"),
    [
        (202, {}, b"ok", Outcome.DELIVERED, ""),
        (202, {"x-plausible-dropped": "1"}, b"ok", Outcome.DROPPED_BY_DESTINATION, "x-plausible-dropped"),
        (200, {}, b"", Outcome.DELIVERED, ""),
        (204, {}, b"", Outcome.DELIVERED, ""),
        (
            400,
            {"content-type": "application/json"},
            b'{"errors":{"request":["Unable to parse request body as json"]}}',
            Outcome.REJECTED,
            "request: Unable to parse request body as json",
        ),
        (400, {}, b"bad\r\nthing", Outcome.REJECTED, "bad thing"),
        (400, {}, b"", Outcome.REJECTED, "http 400"),
        (401, {}, b"", Outcome.REJECTED, "http 401"),
        (404, {}, b"", Outcome.REJECTED, "http 404"),
        (413, {}, b"", Outcome.REJECTED, "http 413"),
        (301, {"location": "https://elsewhere/"}, b"", Outcome.REJECTED, "http 301"),
        (429, {"retry-after": "30"}, b"", Outcome.RETRY, "http 429"),
        (500, {}, b"", Outcome.RETRY, "http 500"),
        (503, {"retry-after": "soon"}, b"", Outcome.RETRY, "http 503"),
    ],
)
def test_classify(status: int, headers: dict[str, str], content: bytes, outcome: Outcome, reason: str) -> None:
    verdict = plausible().classify(httpx.Response(status, headers=headers, content=content))
    assert verdict.outcome is outcome
    assert verdict.reason == reason


def test_retry_after_seconds_and_http_date() -> None:
    sink = plausible()
    assert sink.classify(httpx.Response(429, headers={"retry-after": "30"})).retry_after == 30.0
    dated = sink.classify(httpx.Response(503, headers={"retry-after": http_date_in_120s()})).retry_after
    assert dated is not None and 100 <= dated <= 121
    assert sink.classify(httpx.Response(503, headers={"retry-after": "soon"})).retry_after is None
    assert sink.classify(httpx.Response(503)).retry_after is None


def test_400_reason_is_short() -> None:
    content = json.dumps({"errors": {"url": ["x" * 5000]}}).encode()
    assert len(plausible().classify(httpx.Response(400, content=content)).reason) <= 200


def test_repr_is_plain() -> None:
    assert repr(plausible()) == (
        "PlausibleSink(name='plausible', endpoint='https://plausible.io/api/event', domain='python.org')"
    )
