"""Shared helpers for the sink, policy, explain and leak tests (imported as ``tests.sinks``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from gateway.config import Settings, load_settings
from gateway.events import PAGEVIEW, Event
from gateway.sinks import Payload, Sink

GA4_SECRET = "Sup3rS3cretApiValue"  # distinctive, so a leak is unmistakable
GA4_ENDPOINT = "https://region1.google-analytics.com/mp/collect"
PLAUSIBLE_ENDPOINT = "https://plausible.io/api/event"
CHROME_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
TRUNCATED_IP = "198.51.100.0"
GA_CLIENT_ID = "1234567890.1700000000"
TIMESTAMP = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def python_org_overrides(
    *, plausible: Mapping[str, Any] | None = None, ga4: Mapping[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """The python.org profile: Plausible needs no consent, GA4 needs "analytics" (architecture.md)."""
    destinations = {
        "plausible": {
            "kind": "plausible",
            "endpoint": PLAUSIBLE_ENDPOINT,
            "domain": "python.org",
            "requires": [],
            "fields": ["name", "url", "referrer", "country", "user_agent", "ip"],
            **(plausible or {}),
        },
        "ga4": {
            "kind": "ga4",
            "endpoint": GA4_ENDPOINT,
            "measurement_id": "G-PYORG123",
            "api_secret": GA4_SECRET,
            "requires": ["analytics"],
            "fields": ["name", "url", "referrer", "title", "country", "language"],
            **(ga4 or {}),
        },
    }
    return {
        "site": {"origins": ["https://www.python.org"]},
        "urls": {"allowed_query_params": ["utm_source", "utm_medium", "utm_campaign", "q"]},
        "destinations": destinations,
        **top,
    }


def python_org_settings(**kwargs: Any) -> Settings:
    return load_settings(None, environ={}, overrides=python_org_overrides(**kwargs))


def make_event(**changes: Any) -> Event:
    """A python.org page view from a desktop browser with no consent choice yet."""
    base = Event(
        name=PAGEVIEW,
        url="https://www.python.org/downloads/",
        referrer="https://www.google.com/",
        title="Download Python | Python.org",
        language="en-gb",
        user_agent=CHROME_UA,
        country="GB",
        ip=TRUNCATED_IP,
        granted=frozenset(),
        gpc=False,
        client_id="",
        timestamp=TIMESTAMP,
        event_id="ev-1",
    )
    return dataclasses.replace(base, **changes)


def sink_named(sinks: Sequence[Sink], name: str) -> Sink:
    return next(s for s in sinks if s.name == name)


class Recorder:
    """A MockTransport handler that records every request and answers with ``respond``."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self._respond = respond or (lambda request: httpx.Response(202, text="ok"))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._respond(request)


async def deliver(sink: Sink, payloads: Sequence[Payload], recorder: Recorder, **client: Any) -> httpx.Response:
    """Send ``sink.request(payloads)`` the way the dispatcher does: ``client.send()`` on a prepared request."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder), **client) as http:
        return await http.send(sink.request(payloads))
