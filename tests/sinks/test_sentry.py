"""The Sentry sink: envelope requests, answers and per-category rate limits, and routing in the dispatcher."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway.config import load_settings
from gateway.delivery.dispatcher import Dispatcher
from gateway.events import ERROR_REPORT, Event
from gateway.sentry_envelope import Envelope, parse_envelope
from gateway.sinks import Outcome, PolicyDrop
from gateway.sinks.factory import build_sinks
from gateway.sinks.sentry import SentrySink, parse_rate_limits

DSN = "https://publickey@o1.ingest.sentry.io/42"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_sink(clock: Clock | None = None) -> SentrySink:
    settings = load_settings(environ={}, overrides={"destinations": {"sentry": {"kind": "sentry", "dsns": [DSN]}}})
    return SentrySink(settings.destinations["sentry"], settings, clock=clock or Clock())


def report(*types: str, dsn: str = DSN) -> Event:
    items = [({"type": t}, json.dumps({"message": "boom", "event_id": "0" * 32}).encode()) for t in types]
    body = Envelope({"dsn": dsn, "event_id": "0" * 32}, items).dumps()
    return Event(ERROR_REPORT, "", props={"envelope": body.decode("latin-1")}, event_id="e")


def test_request_goes_to_the_dsns_envelope_endpoint_with_its_key() -> None:
    sink = make_sink()
    request = sink.request([sink.build(report("event"))])
    assert str(request.url) == "https://o1.ingest.sentry.io/api/42/envelope/"
    assert request.headers["content-type"] == "application/x-sentry-envelope"
    assert "sentry_key=publickey" in request.headers["x-sentry-auth"]
    envelope = parse_envelope(request.content)
    assert envelope.header["dsn"] == DSN and [h["type"] for h, _ in envelope.items] == ["event"]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (Event("pageview", "https://x.org/"), "not_an_error_report"),
        (report("event", dsn="https://other@o1.ingest.sentry.io/42"), "dsn_not_allowed"),
        (Event(ERROR_REPORT, "", props={"envelope": "not an envelope"}), "invalid_envelope"),
        (report("replay_recording", "attachment"), "no_items_allowed"),
    ],
)
def test_policy_drops(event: Event, reason: str) -> None:
    with pytest.raises(PolicyDrop, match=reason):
        make_sink().build(event)


def test_rate_limit_header_parsing() -> None:
    limits = parse_rate_limits("60:error;transaction:key, 2700:default:organization, 10::project, junk, x:y", 100.0)
    assert limits == {"error": 160.0, "transaction": 160.0, "default": 2800.0, "": 110.0}


def test_rate_limits_are_kept_per_category() -> None:
    clock = Clock()
    sink = make_sink(clock)
    verdict = sink.classify(httpx.Response(200, headers={"x-sentry-rate-limits": "60:error:organization"}))
    assert verdict.outcome is Outcome.DELIVERED
    payload = sink.build(report("event", "session"))  # the error is left out, the session still goes
    types = [h["type"] for h, _ in parse_envelope(str(payload.body["envelope"]).encode("latin-1")).items]
    assert types == ["session"]
    with pytest.raises(PolicyDrop, match="no_items_allowed"):
        sink.build(report("event"))
    clock.now += 61
    assert sink.build(report("event"))  # the limit expired


@pytest.mark.parametrize(
    ("status", "headers", "outcome", "retry_after"),
    [
        (200, {}, Outcome.DELIVERED, None),
        (429, {"retry-after": "30"}, Outcome.RETRY, 30.0),
        (429, {"x-sentry-rate-limits": "120:error:key"}, Outcome.RETRY, 120.0),
        (429, {}, Outcome.RETRY, 60.0),
        (503, {}, Outcome.RETRY, None),
        (400, {}, Outcome.REJECTED, None),
        (403, {}, Outcome.REJECTED, None),
        (413, {}, Outcome.REJECTED, None),
    ],
)
def test_classify(status: int, headers: dict[str, str], outcome: Outcome, retry_after: float | None) -> None:
    verdict = make_sink().classify(httpx.Response(status, headers=headers))
    assert verdict.outcome is outcome
    assert verdict.retry_after == retry_after


@pytest.mark.anyio
async def test_only_sentry_lanes_take_error_reports_and_only_analytics_lanes_take_page_views() -> None:
    settings = load_settings(
        environ={},
        overrides={
            "spool": {"enabled": False},
            "dispatch": {"flush_interval": 0.05},
            "destinations": {
                "plausible": {"kind": "plausible", "endpoint": "https://plausible.test/api/event", "domain": "x.org"},
                "sentry": {"kind": "sentry", "dsns": [DSN]},
            },
        },
    )
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200 if request.url.host.endswith("sentry.io") else 202)

    dispatcher = Dispatcher(
        build_sinks(settings), settings.dispatch, settings.spool, transport=httpx.MockTransport(handler)
    )
    await dispatcher.start()
    try:
        dispatcher.submit(Event("pageview", "https://x.org/", user_agent="Mozilla/5.0"))
        dispatcher.submit(report("event"))
        assert await dispatcher.wait_idle(5.0)
    finally:
        await dispatcher.stop()
    stats: dict[str, Any] = {name: dict(values) for name, values in dispatcher.stats().items()}
    assert stats["plausible"]["accepted"] == 1 and stats["plausible"]["delivered"] == 1
    assert stats["sentry"]["accepted"] == 1 and stats["sentry"]["delivered"] == 1
    assert sorted(seen) == ["o1.ingest.sentry.io", "plausible.test"]
    dispatcher.check_invariant()
