from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import httpx
import pytest

from gateway.events import Event
from gateway.policy import encode_json
from gateway.sinks import Outcome, Payload, PolicyDrop
from gateway.sinks.factory import build_sinks
from gateway.sinks.ga4 import (
    MAX_BODY_BYTES,
    MAX_EVENT_BYTES,
    MAX_EVENTS,
    MAX_PARAMS,
    RESERVED_EVENT_NAMES,
    DailyKey,
    GA4Sink,
)
from tests.sinks import (
    CHROME_UA,
    GA4_SECRET,
    GA_CLIENT_ID,
    TIMESTAMP,
    TRUNCATED_IP,
    Recorder,
    deliver,
    make_event,
    python_org_settings,
    sink_named,
)

ALL_FIELDS = ["name", "url", "referrer", "title", "country", "language", "user_agent", "ip", "props"]
GA4_URL = f"https://region1.google-analytics.com/mp/collect?measurement_id=G-PYORG123&api_secret={GA4_SECRET}"
GA_CLIENT = re.compile(r"[1-9][0-9]{9}\.[1-9][0-9]{9}")
ANALYTICS = frozenset({"analytics"})


def ga4(key: DailyKey | None = None, **dest: Any) -> GA4Sink:
    settings = python_org_settings(ga4=dest)
    if key is not None:
        return GA4Sink(settings.destinations["ga4"], settings, pseudonym_key=key)
    sink = sink_named(build_sinks(settings), "ga4")
    assert isinstance(sink, GA4Sink)
    return sink


def consented(**changes: Any) -> Event:
    return make_event(**{"granted": ANALYTICS, "client_id": GA_CLIENT_ID, **changes})


def params_of(payload: Payload) -> dict[str, Any]:
    [event] = payload.body["events"]
    params: dict[str, Any] = event["params"]
    return params


class FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def counting_random() -> Any:
    counter = iter(range(1, 1000))
    return lambda size: bytes([next(counter)]) * size


# ------------------------------------------------------------------------------------------------------------
# Wire format
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_pageview_wire_format_with_consent() -> None:
    sink = ga4()
    event = consented(
        url="https://www.python.org/downloads/release/python-3130/?utm_source=x&email=a@b.c#frag",
        referrer="https://www.python.org/search/?q=asyncio&csrftoken=abc",
    )
    recorder = Recorder(lambda request: httpx.Response(204))
    response = await deliver(sink, [sink.build(event)], recorder)

    assert response.status_code == 204
    [request] = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == GA4_URL
    assert dict(request.headers) == {
        "host": "region1.google-analytics.com",
        "content-length": str(len(request.content)),
        "content-type": "application/json",
    }
    assert len(request.headers.raw) == 3
    assert json.loads(request.content) == {
        "client_id": GA_CLIENT_ID,
        "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
        "user_location": {"country_id": "GB"},
        "events": [
            {
                "name": "page_view",
                "timestamp_micros": 1_700_000_000_000_000,
                "params": {
                    "page_location": "https://www.python.org/downloads/release/python-3130/?utm_source=x",
                    "page_referrer": "https://www.python.org/search/?q=asyncio",
                    "page_title": "Download Python | Python.org",
                    "language": "en-gb",
                    "session_id": GA4Sink.session_id(GA_CLIENT_ID, TIMESTAMP),
                    "engagement_time_msec": 1,
                },
            }
        ],
    }


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"granted": frozenset()}, "consent"),  # refused
        ({}, "consent"),  # no choice yet (no id cookie either)
        ({"granted": frozenset(), "gpc": True}, "consent"),  # GPC grants nothing without an explicit opt-in
    ],
    ids=["refused", "no_choice_yet", "gpc"],
)
def test_without_consent_nothing_is_built(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(PolicyDrop) as info:
        ga4().build(make_event(**changes))
    assert info.value.reason == reason


def test_python_org_profile_without_consent_plausible_builds_and_ga4_drops() -> None:
    sinks = build_sinks(python_org_settings())
    event = make_event()
    assert sink_named(sinks, "plausible").build(event).body["name"] == "pageview"
    with pytest.raises(PolicyDrop):
        sink_named(sinks, "ga4").build(event)


@pytest.mark.parametrize(
    ("requires", "gpc", "ad_user_data"),
    [
        (["analytics"], False, "GRANTED"),
        (["analytics"], True, "DENIED"),  # explicit opt-in despite GPC: sent, but never for ads
        ([], False, "DENIED"),  # a destination that needs no consent has none to pass on
    ],
)
def test_consent_object(requires: list[str], gpc: bool, ad_user_data: str) -> None:
    # config.py allows a GA4 destination without required consent only in pseudonym mode.
    payload = ga4(requires=requires, client_id="cookie" if requires else "pseudonym").build(consented(gpc=gpc))
    assert payload.body["consent"] == {"ad_user_data": ad_user_data, "ad_personalization": "DENIED"}


def test_request_level_fields_follow_the_allowlist() -> None:
    full = ga4(fields=ALL_FIELDS).build(consented()).body
    assert full["ip_override"] == TRUNCATED_IP
    assert full["user_agent"] == CHROME_UA
    assert full["user_location"] == {"country_id": "GB"}

    bare = ga4(fields=["url"]).build(consented()).body
    assert set(bare) == {"client_id", "consent", "events"}
    assert set(bare["events"][0]["params"]) == {"page_location", "session_id", "engagement_time_msec"}

    no_url = ga4(fields=["name"]).build(consented()).body
    assert "page_location" not in no_url["events"][0]["params"]


def test_country_is_never_derived_from_the_ip() -> None:
    body = ga4(fields=["url", "ip"]).build(consented(country="")).body
    assert "user_location" not in body
    assert ga4(fields=["url", "country"]).build(consented(country="not a code")).body.keys() == {
        "client_id",
        "consent",
        "events",
    }


def test_custom_event_names_pass_through() -> None:
    payload = ga4().build(consented(name="file_download"))
    assert payload.body["events"][0]["name"] == "file_download"


# ------------------------------------------------------------------------------------------------------------
# Client id and session id
# ------------------------------------------------------------------------------------------------------------


def test_cookie_id_in_ga_form_passes_other_forms_are_mapped_stably() -> None:
    sink = ga4()
    assert sink.build(consented()).body["client_id"] == GA_CLIENT_ID
    mapped = sink.build(consented(client_id="Zm9vYmFyYmF6cXV4")).body["client_id"]
    assert GA_CLIENT.fullmatch(mapped)
    assert sink.build(consented(client_id="Zm9vYmFyYmF6cXV4")).body["client_id"] == mapped
    assert sink.build(consented(client_id="another-id-value")).body["client_id"] != mapped


def test_no_cookie_and_no_pseudonym_drops() -> None:
    with pytest.raises(PolicyDrop) as info:
        ga4().build(make_event(granted=ANALYTICS, client_id=""))
    assert info.value.reason == "no_client_id"


def test_pseudonym_rotates_daily_and_depends_on_ip_agent_and_site() -> None:
    clock = FixedClock(TIMESTAMP)
    sink = ga4(DailyKey(clock=clock, random=counting_random()), client_id="pseudonym", requires=[])
    event = make_event(client_id="")

    first = sink.build(event).body["client_id"]
    assert GA_CLIENT.fullmatch(first)
    assert sink.build(event).body["client_id"] == first  # stable within the day
    assert sink.build(dataclasses.replace(event, ip="198.51.101.0")).body["client_id"] != first
    assert sink.build(dataclasses.replace(event, user_agent="curl/8.0")).body["client_id"] != first
    assert sink.build(dataclasses.replace(event, url="https://docs.python.org/3/")).body["client_id"] != first

    clock.now += 86_400  # next UTC day: a new random key, so yesterday's pseudonym cannot be recomputed
    assert sink.build(event).body["client_id"] != first


def test_pseudonym_key_is_random_per_process_and_never_shown() -> None:
    a, b = DailyKey(), DailyKey()
    assert a.current() != b.current()
    assert len(a.current()) == 32
    assert a.current().hex() not in repr(a)


def test_cookie_id_wins_over_pseudonym() -> None:
    sink = ga4(client_id="pseudonym")
    assert sink.build(consented()).body["client_id"] == GA_CLIENT_ID


def test_session_id_is_numeric_stable_per_client_and_day() -> None:
    first = GA4Sink.session_id(GA_CLIENT_ID, TIMESTAMP)
    assert re.fullmatch(r"[1-9][0-9]{9}", first)
    assert GA4Sink.session_id(GA_CLIENT_ID, TIMESTAMP + 60) == first
    assert GA4Sink.session_id(GA_CLIENT_ID, TIMESTAMP + 86_400) != first
    assert GA4Sink.session_id("1.2", TIMESTAMP) != first


# ------------------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_events_of_one_client_merge_into_one_request() -> None:
    sink = ga4()
    payloads = [sink.build(consented(url=f"https://www.python.org/page{i}/", event_id=f"e{i}")) for i in range(3)]
    assert len({p.batch_key for p in payloads}) == 1
    assert payloads[0].batch_key.startswith(GA_CLIENT_ID + ":")
    recorder = Recorder(lambda request: httpx.Response(204))
    await deliver(sink, payloads, recorder)
    [request] = recorder.requests
    body = json.loads(request.content)
    assert [e["params"]["page_location"] for e in body["events"]] == [
        f"https://www.python.org/page{i}/" for i in range(3)
    ]
    assert body["client_id"] == GA_CLIENT_ID


def test_batch_key_separates_clients_and_request_level_fields() -> None:
    sink = ga4(fields=ALL_FIELDS)
    base = sink.build(consented()).batch_key
    assert sink.build(consented(client_id="1.2")).batch_key != base
    assert sink.build(consented(user_agent="Other/1.0")).batch_key != base
    assert sink.build(consented(gpc=True)).batch_key != base
    assert sink.build(consented(url="https://www.python.org/other/")).batch_key == base


def test_request_refuses_mixed_batch_keys() -> None:
    sink = ga4()
    with pytest.raises(ValueError):
        sink.request([sink.build(consented()), sink.build(consented(client_id="1.2"))])


# ------------------------------------------------------------------------------------------------------------
# Every documented limit, enforced locally (GA4 answers 2xx to anything)
# ------------------------------------------------------------------------------------------------------------


def _drop_reason(name: str) -> str | None:
    try:
        ga4().build(consented(name=name))
    except PolicyDrop as drop:
        return drop.reason
    return None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("e" * 40, None),
        ("e" * 41, "event_name_too_long"),
        ("download_2", None),
        ("2download", "event_name_invalid"),
        ("file-download", "event_name_invalid"),
        ("file download", "event_name_invalid"),
        ("téléchargement", "event_name_invalid"),
        ("", "event_name_invalid"),
        ("_internal", "event_name_invalid"),
        ("firebase_thing", "event_name_reserved"),
        ("ga_thing", "event_name_reserved"),
        ("google_thing", "event_name_reserved"),
        *[(reserved, "event_name_reserved") for reserved in sorted(RESERVED_EVENT_NAMES)],
    ],
)
def test_limit_event_name(name: str, reason: str | None) -> None:
    assert _drop_reason(name) == reason


def _custom_params(props: dict[str, Any]) -> dict[str, Any]:
    params = params_of(ga4(fields=ALL_FIELDS).build(consented(props=props)))
    standard = {"page_location", "page_referrer", "page_title", "language", "session_id", "engagement_time_msec"}
    return {k: v for k, v in params.items() if k not in standard}


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("section", True),
        ("firebase_conversion", False),  # reserved parameter name
        ("_private", False),
        ("firebase_x", False),
        ("ga_x", False),
        ("google_x", False),
        ("gtag.x", False),
        ("p" * 40, True),
        ("p" * 41, False),
        ("2nd", False),
        ("with-dash", False),
        ("session_id", False),  # would overwrite the sink's own parameter
        ("page_location", False),
    ],
)
def test_limit_param_names(name: str, kept: bool) -> None:
    assert (name in _custom_params({name: "value"})) is kept


def test_limit_at_most_25_params_per_event() -> None:
    params = params_of(ga4(fields=ALL_FIELDS).build(consented(props={f"p{i:02d}": "v" for i in range(40)})))
    assert len(params) == MAX_PARAMS
    assert "session_id" in params and "page_location" in params  # standard params come first


def test_limit_param_values_100_characters() -> None:
    assert _custom_params({"section": "v" * 150}) == {"section": "v" * 100}
    params = params_of(ga4(fields=ALL_FIELDS).build(consented(language="en-gb")))
    assert all(
        len(str(v)) <= 100 for k, v in params.items() if k not in ("page_location", "page_referrer", "page_title")
    )


def _encoded_len(value: str) -> int:
    from urllib.parse import quote

    return len(quote(value, safe="-_.!~*'()"))


def test_limit_page_location_1000_url_encoded() -> None:
    params = params_of(ga4().build(consented(url="https://www.python.org/" + "/".join(["docs"] * 400))))
    assert 990 <= _encoded_len(params["page_location"]) <= 1000
    assert params["page_location"].startswith("https://www.python.org/docs/")


def test_limit_page_referrer_420_url_encoded() -> None:
    params = params_of(ga4().build(consented(referrer="https://www.python.org/" + "x/" * 400)))
    assert 410 <= _encoded_len(params["page_referrer"]) <= 420


def test_limit_page_title_300_characters() -> None:
    params = params_of(ga4().build(consented(title="T" * 500)))
    assert params["page_title"] == "T" * 300


def test_limit_no_user_properties() -> None:
    body = ga4(fields=ALL_FIELDS).build(consented(props={"user_id": "x"})).body
    assert "user_properties" not in body and "user_id" not in body


def test_limit_body_under_130_kb_for_25_maximal_events() -> None:
    sink = ga4(fields=ALL_FIELDS)
    props = {f"p{i:02d}": "😀" * 100 for i in range(30)}  # 400 bytes each: far over the per-event budget
    event = consented(
        url="https://www.python.org/" + "%F0%9F%98%80" * 200,
        referrer="https://www.python.org/" + "%F0%9F%98%80" * 100,
        title="😀" * 400,
        user_agent="U" * 2000,
        props=props,
    )
    payloads = [sink.build(dataclasses.replace(event, event_id=str(i))) for i in range(MAX_EVENTS)]
    assert all(len(encode_json(p.body["events"][0])) <= MAX_EVENT_BYTES for p in payloads)
    content = sink.request(payloads).content
    assert len(content) < MAX_BODY_BYTES
    assert len(json.loads(content)["events"]) == MAX_EVENTS


def test_limit_25_events_per_request() -> None:
    sink = ga4()
    payload = sink.build(consented())
    assert sink.max_batch == MAX_EVENTS == 25
    sink.request([payload] * 25)
    with pytest.raises(ValueError):
        sink.request([payload] * 26)
    with pytest.raises(ValueError):
        sink.request([])


def test_limit_client_id_required() -> None:
    # Consent granted but no id cookie (e.g. the visitor blocks cookies) and no pseudonym allowed.
    with pytest.raises(PolicyDrop) as info:
        ga4().build(make_event(granted=ANALYTICS, client_id=""))
    assert info.value.reason == "no_client_id"


# ------------------------------------------------------------------------------------------------------------
# The api_secret
# ------------------------------------------------------------------------------------------------------------


def test_api_secret_is_only_in_the_request_url() -> None:
    sink = ga4()
    payload = sink.build(consented())
    request = sink.request([payload])
    assert GA4_SECRET in str(request.url)  # GA4 requires it there
    for text in (repr(sink), repr(payload), json.dumps(payload.body), payload.batch_key, repr(request)):
        assert GA4_SECRET not in text
    assert GA4_SECRET not in request.content.decode()
    assert repr(request) == "<Request('POST', 'https://region1.google-analytics.com/mp/collect?…')>"


# ------------------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (204, Outcome.DELIVERED),
        (200, Outcome.DELIVERED),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (400, Outcome.REJECTED),
        (403, Outcome.REJECTED),
        (404, Outcome.REJECTED),
        (302, Outcome.REJECTED),
    ],
)
def test_classify(status: int, outcome: Outcome) -> None:
    assert ga4().classify(httpx.Response(status)).outcome is outcome


def test_classify_reads_retry_after() -> None:
    assert ga4().classify(httpx.Response(429, headers={"retry-after": "7"})).retry_after == 7.0
