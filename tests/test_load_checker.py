"""The load test's own checks must fail on a broken build: a leaked canary, a silently dropped event, a 5xx, growing
memory, a payload over a documented limit. A fake gateway delivers synthetic events to the real collector app
(in process, through httpx.ASGITransport) with one defect switched on at a time; the checks must name it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.load.checker import (
    MIB,
    Expect,
    RequestResult,
    RssSample,
    accounting_rows,
    check_accounting,
    check_canaries,
    check_collector_problems,
    check_log,
    check_memory,
    check_statuses,
    delivered_events,
    format_report,
    latency_summary,
    outcomes_settled,
    parse_metrics,
)
from tests.load.collectors import (
    CollectorApp,
    CollectorRecord,
    PeerRecords,
    UpstreamApp,
    is_truncated_ip,
    validate_ga4,
    validate_plausible,
)
from tests.load.traffic import (
    EMAIL_CANARY,
    Destination,
    Visitor,
    expectation,
    make_canaries,
    make_plan,
)

DOMAIN = "load.example"
MEASUREMENT_ID = "G-LOADTEST1"
SECRET = "unit-test-secret"
ORIGIN = "http://127.0.0.1:8000"
CANARY_V4 = "198.51.100.77"
CANARY_V6 = "2001:db8:85a3:8d3:1319:8a2e:370:7348"
CANARIES = [CANARY_V4, CANARY_V6, EMAIL_CANARY, "canary-session-0123456789abcdef", "canary"]
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


# ---------------------------------------------------------------------------------------------------------------
# A fake gateway with switchable defects, delivering to the real collector app
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Defects:
    leak_xff: bool = False  # full client IP in X-Forwarded-For
    leak_ip_in_body: bool = False  # full client IP as GA4 ip_override
    leak_email_encoded: bool = False  # e-mail kept URL-encoded in the page URL
    leak_cookie_header: bool = False  # visitor's cookie forwarded to Plausible
    drop_silently: int = 0  # events neither delivered nor counted
    drop_counted: int = 0  # events dropped with a reason in the counters
    duplicate: bool = False  # one event delivered twice
    long_title: bool = False  # page_title over GA4's 300 characters


def plausible_body(rid: str, *, query: str = "utm_source=load") -> bytes:
    return json.dumps({"name": "pageview", "url": f"{ORIGIN}/p/{rid}/downloads?{query}", "domain": DOMAIN}).encode()


def ga4_body(rids: list[str], *, ip: str = "198.51.100.0", title: str = "Welcome") -> bytes:
    events = [
        {
            "name": "page_view",
            "timestamp_micros": int(time.time() * 1_000_000),
            "params": {
                "page_location": f"{ORIGIN}/p/{rid}/downloads",
                "page_title": title,
                "session_id": "1234567890",
                "engagement_time_msec": 1,
            },
        }
        for rid in rids
    ]
    body = {
        "client_id": "1234567890.1700000000",
        "consent": {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"},
        "ip_override": ip,
        "events": events,
    }
    return json.dumps(body).encode()


async def fake_gateway_run(defects: Defects, events: int = 10) -> tuple[PeerRecords, dict[str, dict[str, float]]]:
    """Deliver `events` page views to both collectors as a gateway would, with the chosen defects."""
    app = CollectorApp(domain=DOMAIN, measurement_id=MEASUREMENT_ID, api_secret=SECRET, upstream=UpstreamApp())
    rids = [f"r{n}" for n in range(1, events + 1)]
    dropped = set(rids[: defects.drop_silently + defects.drop_counted])
    sent = [rid for rid in rids if rid not in dropped]
    if defects.duplicate:
        sent.append(sent[0])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://collector") as client:
        for rid in sent:
            headers = {"content-type": "application/json", "user-agent": UA}
            headers["x-forwarded-for"] = CANARY_V4 if defects.leak_xff else "198.51.100.0"
            if defects.leak_cookie_header:
                headers["cookie"] = "sessionid=canary-session-0123456789abcdef"
            query = "utm_source=load"
            if defects.leak_email_encoded:
                query += "&email=" + quote(EMAIL_CANARY, safe="")
            await client.post("/api/event", content=plausible_body(rid, query=query), headers=headers)
        ip = CANARY_V4 if defects.leak_ip_in_body else "198.51.100.0"
        title = "x" * 301 if defects.long_title else "Welcome"
        for start in range(0, len(sent), 4):
            await client.post(
                f"/mp/collect?measurement_id={MEASUREMENT_ID}&api_secret={SECRET}",
                content=ga4_body(sent[start : start + 4], ip=ip, title=title),
                headers={"content-type": "application/json"},
            )
        snapshot: PeerRecords = (await client.get("/_records")).json()
    delivered = len(sent)
    metrics = {
        name: {
            "accepted": float(events),
            "delivered": float(delivered),
            "dropped_overflow": float(defects.drop_counted),
        }
        for name in ("plausible", "ga4")
    }
    return snapshot, metrics


def expected_all_must(events: int = 10) -> dict[str, dict[str, Expect]]:
    return {name: {f"r{n}": Expect.MUST for n in range(1, events + 1)} for name in ("plausible", "ga4")}


def all_problems(snapshot: PeerRecords, metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    records = snapshot["collector"]
    return [
        *check_collector_problems(records),
        *check_canaries(records, CANARIES),
        *check_accounting(expected_all_must(), records, metrics),
    ]


@pytest.mark.anyio
async def test_a_clean_run_passes() -> None:
    snapshot, metrics = await fake_gateway_run(Defects())
    assert all_problems(snapshot, metrics) == []
    assert len(snapshot["collector"]) == 10 + 3  # 10 Plausible requests, GA4 in batches of 4, 4, 2
    assert all(r["status"] in (202, 204) for r in snapshot["collector"])


@pytest.mark.anyio
async def test_dropped_with_a_reason_is_not_silent() -> None:
    snapshot, metrics = await fake_gateway_run(Defects(drop_counted=2))
    assert all_problems(snapshot, metrics) == []


@pytest.mark.parametrize(
    ("defects", "expected_fragment"),
    [
        (Defects(leak_xff=True), f"canary '{CANARY_V4}'"),
        (Defects(leak_xff=True), "x-forwarded-for '198.51.100.77' is not a truncated address"),
        (Defects(leak_ip_in_body=True), f"canary '{CANARY_V4}' in ga4"),
        (Defects(leak_ip_in_body=True), "ip_override '198.51.100.77' is not a truncated address"),
        (Defects(leak_email_encoded=True), f"canary 'canary', '{EMAIL_CANARY}' in plausible"),
        (Defects(leak_cookie_header=True), "header 'cookie' must not be sent"),
        (Defects(leak_cookie_header=True), "canary 'canary', 'canary-session-0123456789abcdef'"),
        (Defects(drop_silently=1), "plausible: 1 event(s) silently lost: 10 accepted, 9 delivered, 0 counted"),
        (Defects(drop_silently=1), "ga4: 1 event(s) silently lost"),
        (Defects(duplicate=True), "r1 delivered 2 times"),
        (Defects(long_title=True), "param 'page_title' has length 301, more than 300"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
@pytest.mark.anyio
async def test_a_broken_build_fails(defects: Defects, expected_fragment: str) -> None:
    snapshot, metrics = await fake_gateway_run(defects)
    problems = all_problems(snapshot, metrics)
    assert any(expected_fragment in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------------------
# Canaries in every disguise
# ---------------------------------------------------------------------------------------------------------------


def record(destination: str = "plausible", *, body: str = "{}", headers: list[list[str]] | None = None,
           path: str = "/api/event", query: str = "", status: int = 202) -> CollectorRecord:  # fmt: skip
    return {
        "destination": destination,
        "method": "POST",
        "path": path,
        "query": query,
        "headers": headers or [],
        "body": body,
        "status": status,
        "problems": [],
        "received_at": 0.0,
    }


@pytest.mark.parametrize(
    "leaked",
    [
        pytest.param(record(headers=[["x-forwarded-for", CANARY_V4]]), id="xff-header"),
        pytest.param(record(body=json.dumps({"ip_override": CANARY_V4})), id="ip-in-body"),
        pytest.param(record(body='{"u": "https://x/?e=load-canary%40example.org"}'), id="email-percent-encoded"),
        pytest.param(record(body='{"u": "https://x/?e=load-canary%2540example.org"}'), id="email-double-encoded"),
        pytest.param(record(body='{"u": "https://x/?e=load-canary\\u0040example.org"}'), id="email-json-escaped"),
        pytest.param(record(body='{"t": "load-canary&#64;example.org"}'), id="email-html-escaped"),
        pytest.param(record(query="e=LOAD-CANARY%40EXAMPLE.ORG"), id="email-upper-case-in-query"),
        pytest.param(record(path="/p/load-canary@example.org/x"), id="email-in-path"),
        pytest.param(
            record(body=json.dumps({"ip": ipaddress.ip_address(CANARY_V6).exploded})), id="ipv6-exploded-form"
        ),
        pytest.param(record(body=json.dumps({"ip": CANARY_V6.upper()})), id="ipv6-upper-case"),
    ],
)
def test_canaries_are_found_in_any_form(leaked: CollectorRecord) -> None:
    canaries = [*CANARIES, ipaddress.ip_address(CANARY_V6).exploded]
    problems = check_canaries([record(), leaked], canaries)
    assert len(problems) == 1, problems
    assert "#1" in problems[0]


def test_truncated_addresses_are_not_canaries() -> None:
    body = json.dumps({"ip_override": "198.51.100.0", "v6": "2001:db8:85a3::", "u": "https://x/p/:redacted/"})
    assert check_canaries([record(body=body, headers=[["x-forwarded-for", "198.51.100.0"]])], CANARIES) == []


def test_log_with_canary_or_traceback_fails() -> None:
    assert check_log("INFO 198.51.100.0 GET /p/r1/downloads 200\n", CANARIES) == []
    assert check_log(f"INFO {CANARY_V4} GET / 200\n", CANARIES)
    problems = check_log("Traceback (most recent call last):\n  File x\nKeyError: 'a'\n", CANARIES)
    assert problems and "1 traceback(s)" in problems[0]


# ---------------------------------------------------------------------------------------------------------------
# Accounting edge cases
# ---------------------------------------------------------------------------------------------------------------


def plausible_record(rid: str | None) -> CollectorRecord:
    url = f"{ORIGIN}/p/{rid}/x" if rid else f"{ORIGIN}/p/:redacted/x"
    return record(body=json.dumps({"name": "pageview", "url": url, "domain": DOMAIN}))


def test_event_the_policy_forbids_is_reported() -> None:
    expected = {"ga4": {"r1": Expect.MUST_NOT}}
    ga4 = record("ga4", body=ga4_body(["r1"]).decode(), status=204)
    problems = check_accounting(expected, [ga4], {"ga4": {"accepted": 1, "delivered": 1}})
    assert any("forbids" in p for p in problems), problems


def test_event_nobody_asked_for_is_reported() -> None:
    expected: dict[str, dict[str, Expect]] = {"plausible": {}}
    problems = check_accounting(expected, [plausible_record("r7")], {"plausible": {"accepted": 0, "delivered": 1}})
    assert any("r7 delivered but no accepted page view" in p for p in problems), problems


def test_event_without_request_id_is_reported() -> None:
    expected = {"plausible": {"r1": Expect.MUST}}
    problems = check_accounting(expected, [plausible_record(None)], {"plausible": {"accepted": 1, "delivered": 1}})
    assert any("without a request id" in p for p in problems), problems


def test_must_event_hidden_behind_a_policy_drop_is_reported() -> None:
    # The totals add up, but an event that had to be delivered was "dropped by policy": that is a wrong drop.
    expected = {"ga4": {"r1": Expect.MUST, "r2": Expect.MUST}}
    ga4 = record("ga4", body=ga4_body(["r1"]).decode(), status=204)
    metrics = {"ga4": {"accepted": 2, "delivered": 1, "dropped_policy[consent]": 1}}
    problems = check_accounting(expected, [ga4], metrics)
    assert problems == [
        "ga4: 1 event(s) that had to be delivered are missing, but only 0 are counted as lost (back-pressure, "
        "dead letter)"
    ]


def test_may_and_must_not_events_can_be_policy_drops() -> None:
    expected = {"ga4": {"r1": Expect.MUST, "r2": Expect.MAY, "r3": Expect.MUST_NOT}}
    ga4 = record("ga4", body=ga4_body(["r1"]).decode(), status=204)
    metrics = {"ga4": {"accepted": 3, "delivered": 1, "dropped_policy[consent]": 1, "dropped_policy[no_client_id]": 1}}
    assert check_accounting(expected, [ga4], metrics) == []


def test_gateway_counters_must_agree_with_collectors() -> None:
    expected = {"plausible": {"r1": Expect.MUST}}
    problems = check_accounting(expected, [plausible_record("r1")], {"plausible": {"accepted": 2, "delivered": 3}})
    assert any("counted 2 accepted" in p for p in problems), problems
    assert any("counted 3 delivered, the collector accepted 1" in p for p in problems), problems
    assert check_accounting(expected, [plausible_record("r1")], {}) == [
        "plausible: no counters for this destination in the gateway's metrics",
        "plausible: the gateway counted 0 delivered, the collector accepted 1",
    ]


def test_more_outcomes_than_events_is_reported() -> None:
    expected = {"plausible": {"r1": Expect.MUST}}
    metrics = {"plausible": {"accepted": 1, "delivered": 1, "dead_lettered": 1, "retried": 4}}
    problems = check_accounting(expected, [plausible_record("r1")], metrics)
    assert any("1 outcome(s) more than events" in p for p in problems), problems


def test_rejected_payloads_are_not_deliveries() -> None:
    rejected = plausible_record("r1")
    rejected["status"] = 400
    rejected["problems"] = ["name is required"]
    assert delivered_events(rejected) == []
    assert check_collector_problems([rejected]) == ["plausible record #0 (POST /api/event) rejected: name is required"]


def test_outcomes_settled() -> None:
    assert not outcomes_settled({})
    assert not outcomes_settled({"ga4": {"delivered": 1}})  # no accepted counter: cannot tell
    assert not outcomes_settled({"ga4": {"accepted": 3, "delivered": 1, "dropped_policy[consent]": 1}})
    assert outcomes_settled({"ga4": {"accepted": 3, "delivered": 1, "dropped_policy[consent]": 2}})


def test_parse_metrics_builds_the_status_table() -> None:
    text = """\
# HELP gateway_delivered_total Events delivered.
# TYPE gateway_delivered_total counter
gateway_delivered_total{destination="ga4"} 7.0
gateway_delivered_total{destination="plausible"} 9.0
# HELP gateway_dispatch_dropped_policy_total Events dropped by policy.
# TYPE gateway_dispatch_dropped_policy_total counter
gateway_dispatch_dropped_policy_total{destination="ga4",reason="consent"} 3.0
gateway_dispatch_dropped_policy_total{destination="ga4",reason="no_client_id"} 1.0
# HELP gateway_dispatch_queue_depth Events waiting.
# TYPE gateway_dispatch_queue_depth gauge
gateway_dispatch_queue_depth{destination="ga4"} 0.0
# HELP gateway_requests_total Requests.
# TYPE gateway_requests_total counter
gateway_requests_total 12.0
"""
    assert parse_metrics(text) == {
        "ga4": {
            "delivered": 7.0,
            "dropped_policy[consent]": 3.0,
            "dropped_policy[no_client_id]": 1.0,
            "queue_depth": 0.0,
        },
        "plausible": {"delivered": 9.0},
    }


# ---------------------------------------------------------------------------------------------------------------
# Statuses, latency, memory, report
# ---------------------------------------------------------------------------------------------------------------


def test_5xx_and_connection_errors_fail() -> None:
    results = [
        RequestResult("r1", "page", 200, 0.01),
        RequestResult("r2", "page", 404, 0.01),
        RequestResult("r3", "beacon", 502, 0.02),
        RequestResult("r4", "page", 0, 15.0, "ReadTimeout"),
    ]
    assert check_statuses(results) == ["r3 (beacon): HTTP 502", "r4 (page): no response: ReadTimeout"]
    assert check_statuses(results[:2]) == []


def test_latency_percentiles_are_nearest_rank() -> None:
    results = [RequestResult(f"r{n}", "page", 200, n / 1000) for n in range(1, 101)]
    summary = latency_summary(results, seconds=2.0)
    assert (summary.p50_ms, summary.p95_ms, summary.p99_ms, summary.max_ms) == pytest.approx((50, 95, 99, 100))
    assert summary.per_second == 50.0
    assert summary.statuses == {"page": {200: 100}}


def samples(rss_mib: list[float]) -> list[RssSample]:
    return [RssSample(i * 0.25, int(v * MIB), i * 50) for i, v in enumerate(rss_mib)]


def test_flat_or_plateauing_memory_passes() -> None:
    noise = random.Random(1)
    flat = [60 + noise.uniform(-2, 2) for _ in range(80)]
    assert check_memory(samples(flat)) == []
    warmup_then_plateau = [30 + min(i, 20) * 2 + noise.uniform(-1, 1) for i in range(80)]
    assert check_memory(samples(warmup_then_plateau)) == []


def test_growing_memory_fails() -> None:
    leak = [60 + i * 1.6 for i in range(80)]  # 1.6 MiB per 50 requests: a leak of ~32 KiB per request
    problems = check_memory(samples(leak))
    assert len(problems) == 1 and "keeps growing" in problems[0], problems


def test_too_few_memory_samples_fail() -> None:
    assert check_memory(samples([50.0] * 5)) == ["only 5 RSS samples: too few to judge memory growth"]


def test_report_shows_throughput_latency_and_accounting() -> None:
    results = [RequestResult(f"r{n}", "page", 200, 0.004) for n in range(1, 11)]
    expected = {"plausible": {f"r{n}": Expect.MUST for n in range(1, 11)}}
    rows = accounting_rows(expected, [plausible_record(f"r{n}") for n in range(1, 11)],
                           {"plausible": {"accepted": 10, "delivered": 10}})  # fmt: skip
    report = format_report(latency_summary(results, 0.5), rows, samples([50.0] * 10), [], planned=10)
    assert "10 of 10 planned in 0.5 s = 20 requests/s" in report
    assert "p50 4.0 ms" in report and "p95 4.0 ms" in report and "p99 4.0 ms" in report
    assert "plausible" in report and "no problems" in report
    assert rows[0].silently_missing == 0


# ---------------------------------------------------------------------------------------------------------------
# The collectors' validators against the documented limits (protocols.md §1, §2)
# ---------------------------------------------------------------------------------------------------------------

PLAUSIBLE_HEADERS = [("content-type", "text/plain"), ("user-agent", UA), ("x-forwarded-for", "198.51.100.0"),
                     ("host", "collector"), ("content-length", "99")]  # fmt: skip
VALID_PLAUSIBLE: dict[str, Any] = {"n": "pageview", "u": f"{ORIGIN}/p/r1/x", "d": DOMAIN, "r": None}


def test_valid_plausible_payload_passes() -> None:
    assert validate_plausible(PLAUSIBLE_HEADERS, json.dumps(VALID_PLAUSIBLE).encode(), domain=DOMAIN) == []
    with_props = {**VALID_PLAUSIBLE, "p": {f"k{i}": "v" * 2000 for i in range(30)}}
    assert validate_plausible(PLAUSIBLE_HEADERS, json.dumps(with_props).encode(), domain=DOMAIN) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"n": None}, "name is required"),
        ({"n": "x" * 121}, "name has 121 characters, more than 120"),
        ({"u": None}, "url is required"),
        ({"u": ORIGIN + "/" + "é" * 1000}, "url has 2022 bytes, more than 2000"),
        ({"u": "data:text/html,hi"}, "url must be a valid http(s) url"),
        ({"d": " "}, "domain can't be blank"),
        ({"d": "other.example"}, "domain 'other.example' is not the configured 'load.example'"),
        ({"r": "https://r/" + "x" * 1991}, "referrer has 2001 characters, more than 2000"),
        ({"p": {f"k{i}": "v" for i in range(31)}}, "31 props, more than 30"),
        ({"p": {"k" * 301: "v"}}, "prop key of 301 bytes, more than 300"),
        ({"p": {"k": "ü" * 1001}}, "prop 'k' value of 2002 bytes, more than 2000"),
        ({"p": {"k": ["a"]}}, "prop 'k' is not a scalar"),
        ({"p": "[1]"}, "props must be an object"),
        ({"ip": "1.2.3.4"}, "unknown key 'ip'"),
    ],
)
def test_plausible_limits(change: dict[str, Any], problem: str) -> None:
    body = {k: v for k, v in {**VALID_PLAUSIBLE, **change}.items() if v is not None or k == "r"}
    problems = validate_plausible(PLAUSIBLE_HEADERS, json.dumps(body).encode(), domain=DOMAIN)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("headers", "body", "problem"),
    [
        ([("user-agent", UA), ("x-forwarded-for", "198.51.100.0")], None, "content-type '' is neither"),
        ([("content-type", "text/plain"), ("x-forwarded-for", "198.51.100.0")], None, "user-agent is required"),
        ([("content-type", "text/plain"), ("user-agent", UA)], None, "x-forwarded-for is missing"),
        ([*PLAUSIBLE_HEADERS[:2], ("x-forwarded-for", "2001:db8:85a3:1::")], None, "is not a truncated address"),
        ([*PLAUSIBLE_HEADERS, ("cf-connecting-ip", "198.51.100.0")], None, "header 'cf-connecting-ip' must not"),
        ([*PLAUSIBLE_HEADERS, ("authorization", "Bearer x")], None, "header 'authorization' must not be sent"),
        (PLAUSIBLE_HEADERS, b"[1]", "body is not a JSON object"),
        (PLAUSIBLE_HEADERS, b"{", "Unable to parse request body as json"),
        (PLAUSIBLE_HEADERS, b"\xff", "body is not UTF-8"),
    ],
)
def test_plausible_headers_and_body(headers: list[tuple[str, str]], body: bytes | None, problem: str) -> None:
    raw = body if body is not None else json.dumps(VALID_PLAUSIBLE).encode()
    problems = validate_plausible(headers, raw, domain=DOMAIN)
    assert any(problem in p for p in problems), problems


GA4_QUERY = f"measurement_id={MEASUREMENT_ID}&api_secret={SECRET}"
GA4_HEADERS = [("content-type", "application/json"), ("host", "collector"), ("content-length", "99")]


def ga4(**changes: Any) -> bytes:
    body = json.loads(ga4_body(["r1"]))
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body).encode()


def ga4_event(**params: Any) -> dict[str, Any]:
    return {"name": "page_view", "params": {"page_location": f"{ORIGIN}/p/r1/x", **params}}


def test_valid_ga4_payload_passes() -> None:
    assert validate_ga4(GA4_QUERY, GA4_HEADERS, ga4(), measurement_id=MEASUREMENT_ID, api_secret=SECRET) == []
    # page_location and page_referrer count URL-encoded ("http://" is "http%3A%2F%2F"), page_title characters.
    location = "https://a.example/" + "a" * (1000 - len("https%3A%2F%2Fa.example%2F"))
    limits = ga4_event(page_location=location, page_referrer="r" * 420, page_title="t" * 300, plan="p" * 100)
    body = ga4(events=[limits] * 25, user_location={"country_id": "DE"}, user_agent=UA)
    assert validate_ga4(GA4_QUERY, GA4_HEADERS, body, measurement_id=MEASUREMENT_ID, api_secret=SECRET) == []


@pytest.mark.parametrize(
    ("query", "body", "problem"),
    [
        (f"measurement_id=G-OTHER1&api_secret={SECRET}", None, "measurement_id 'G-OTHER1' is not 'G-LOADTEST1'"),
        (f"measurement_id={MEASUREMENT_ID}", None, "api_secret is missing or wrong"),
        (GA4_QUERY + "&uip=1.2.3.4", None, "unexpected query parameter 'uip'"),
        (GA4_QUERY, ga4(client_id=None), "client_id is required"),
        (GA4_QUERY, ga4(client_id="abc"), "client_id is required"),
        (GA4_QUERY, ga4(user_id="u1"), "'user_id' must never be sent"),
        (GA4_QUERY, ga4(user_data={"sha256_email_address": "x"}), "'user_data' must never be sent"),
        (GA4_QUERY, ga4(consent={"ad_user_data": "YES"}), "consent.ad_user_data must be GRANTED or DENIED"),
        (GA4_QUERY, ga4(consent={"analytics_storage": "GRANTED"}), "consent.analytics_storage is not a consent"),
        (GA4_QUERY, ga4(ip_override="198.51.100.77"), "ip_override '198.51.100.77' is not a truncated address"),
        (GA4_QUERY, ga4(user_location={"country_id": "Germany"}), "country_id must be an ISO 3166-1"),
        (GA4_QUERY, ga4(events=[]), "events is required"),
        (GA4_QUERY, ga4(events=[ga4_event()] * 26), "26 events, more than 25"),
        (GA4_QUERY, ga4(events=[{"name": "session_start"}]), "'session_start' is reserved"),
        (GA4_QUERY, ga4(events=[{"name": "1st"}]), "must start with a letter"),
        (GA4_QUERY, ga4(events=[{"name": "e" * 41}]), "has more than 40 characters"),
        (GA4_QUERY, ga4(events=[ga4_event(**{f"p{i}": 1 for i in range(25)})]), "26 params, more than 25"),
        (GA4_QUERY, ga4(events=[ga4_event(_private=1)]), "must start with a letter"),
        (GA4_QUERY, ga4(events=[ga4_event(ga_session=1)]), "param 'ga_session' is reserved"),
        (GA4_QUERY, ga4(events=[ga4_event(plan="p" * 101)]), "param 'plan' has length 101, more than 100"),
        (GA4_QUERY, ga4(events=[ga4_event(page_title="t" * 301)]), "'page_title' has length 301, more than 300"),
        (GA4_QUERY, ga4(events=[ga4_event(page_referrer="é" * 71)]), "'page_referrer' has length 426, more than"),
        (
            GA4_QUERY,
            ga4(events=[ga4_event(page_location="a b" * 334)]),
            "'page_location' has length 1670, more than 1000",
        ),
        (GA4_QUERY, ga4(events=[ga4_event(plan=["a"])]), "param 'plan' is not a string or number"),
        (GA4_QUERY, ga4(events=[{"name": "page_view", "timestamp_micros": 1}]), "older than 72 hours"),
        (GA4_QUERY, ga4(padding="x" * 130_000), "is not below 130000"),
    ],
)
def test_ga4_limits(query: str, body: bytes | None, problem: str) -> None:
    raw = body if body is not None else ga4()
    problems = validate_ga4(query, GA4_HEADERS, raw, measurement_id=MEASUREMENT_ID, api_secret=SECRET)
    assert any(problem in p for p in problems), problems


@given(st.ip_addresses(v=4))
def test_ipv4_is_truncated_exactly_when_the_last_octet_is_zero(address: ipaddress.IPv4Address) -> None:
    assert is_truncated_ip(str(address)) == (address.packed[3] == 0)


@given(st.ip_addresses(v=6))
def test_ipv6_is_truncated_exactly_when_the_last_80_bits_are_zero(address: ipaddress.IPv6Address) -> None:
    if address.ipv4_mapped is not None:
        return
    assert is_truncated_ip(str(address)) == (int(address) & ((1 << 80) - 1) == 0)


@pytest.mark.anyio
async def test_upstream_serves_pages_assets_redirects_and_404s() -> None:
    upstream = UpstreamApp()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream), base_url="http://up") as client:
        page = await client.get("/p/r1/downloads", headers={"cookie": "sessionid=x", "x-forwarded-for": "1.2.3.0"})
        account = await client.get("/p/r2/account")
        long = await client.get("/p/r3/long-x")
        asset = await client.get("/static/r4/site.css")
        moved = await client.get("/old/r5")
        missing = await client.get("/missing/r6")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "title-canary@example.org" in account.text
    assert len(long.text.split("<title>")[1].split("</title>")[0]) > 300
    assert (asset.status_code, asset.headers["content-type"]) == (200, "text/css")
    assert (moved.status_code, moved.headers["location"]) == (301, "/p/r5")
    assert missing.status_code == 404
    first = upstream.records[0]
    assert ["x-forwarded-for", "1.2.3.0"] in first["headers"]
    assert all(name != "cookie" for name, _ in first["headers"])


# ---------------------------------------------------------------------------------------------------------------
# Traffic expectations
# ---------------------------------------------------------------------------------------------------------------

PLAUSIBLE = Destination("plausible", frozenset())
GA4 = Destination("ga4", frozenset({"analytics"}), needs_client_id=True)


@pytest.mark.parametrize(
    ("consent", "gpc", "had_client_id", "plausible", "ga4"),
    [
        ("none", False, True, Expect.MUST, Expect.MUST_NOT),
        ("refused", False, True, Expect.MUST, Expect.MUST_NOT),
        ("granted", False, True, Expect.MUST, Expect.MUST),
        ("granted", False, False, Expect.MUST, Expect.MAY),
        ("granted", True, True, Expect.MAY, Expect.MUST_NOT),
        ("none", True, True, Expect.MAY, Expect.MUST_NOT),
    ],
)
def test_expectations(consent: Any, gpc: bool, had_client_id: bool, plausible: Expect, ga4: Expect) -> None:
    visitor = Visitor(ip=CANARY_V4, user_agent=UA, language="en", consent=consent, gpc=gpc)
    assert expectation(PLAUSIBLE, visitor, had_client_id=had_client_id) is plausible
    assert expectation(GA4, visitor, had_client_id=had_client_id) is ga4


def test_plan_is_fixed_by_its_seed() -> None:
    first = make_plan(random.Random(5), 500, 48)
    assert first == make_plan(random.Random(5), 500, 48)
    assert [p.rid for p in first] == [f"r{n}" for n in range(1, 501)]
    kinds = {p.kind for p in first}
    assert {"page", "bot", "beacon", "asset"} <= kinds
    canaries = make_canaries(random.Random(5))
    assert CANARY_V4 in canaries.strings() and "canary" in canaries.strings()
    assert ipaddress.ip_address(CANARY_V6).exploded in canaries.ip_strings()
