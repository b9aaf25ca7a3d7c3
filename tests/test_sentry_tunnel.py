"""The Sentry tunnel behind the privacy middleware, in process: what it refuses, and what it hands on."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import pytest

from gateway import PrivacyGateway
from gateway.delivery.dispatcher import Dispatcher
from gateway.sentry_envelope import MAX_ENVELOPE_BYTES, MAX_ITEMS, Envelope, parse_envelope
from gateway.sinks.factory import build_sinks
from tests.test_middleware import Recorder, html_app, make_settings

DSN = "https://publickey@o1.ingest.sentry.io/42"
PATH = "/_privacy/sentry"


def envelope(dsn: str = DSN, items: int = 1, message: str = "boom for alice@example.org") -> bytes:
    payload = json.dumps({"message": message, "user": {"ip_address": "{{auto}}"}}).encode()
    return Envelope({"dsn": dsn}, [({"type": "event"}, payload)] * items).dumps()


def sentry_gateway(recorder: Recorder, **extra: Any) -> PrivacyGateway:
    settings = make_settings(
        destinations={"sentry": {"kind": "sentry", "dsns": [DSN], "fields": ["url", "user_agent", "ip"]}}, **extra
    )
    dispatcher = Dispatcher(
        build_sinks(settings), settings.dispatch, settings.spool, transport=httpx.MockTransport(recorder.handler)
    )
    return PrivacyGateway(html_app([]), settings, dispatcher=dispatcher)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def client(gateway: PrivacyGateway) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gateway, client=("127.0.0.1", 5555))
    return httpx.AsyncClient(transport=transport, base_url="https://testserver")


REFUSALS = [
    ("get", "GET", b"", {}, 405),
    ("foreign-dsn", "POST", envelope("https://other@o1.ingest.sentry.io/42"), {}, 403),
    ("foreign-host", "POST", envelope("https://publickey@evil.example/42"), {}, 403),
    ("no-dsn", "POST", b'{}\n{"type":"event"}\n{}', {}, 403),
    ("malformed", "POST", b"not an envelope", {}, 400),
    ("bad-length", "POST", b'{"dsn":"' + DSN.encode() + b'"}\n{"type":"event","length":99}\n{}', {}, 400),
    ("too-many-items", "POST", envelope(items=MAX_ITEMS + 1), {}, 413),
    ("too-large", "POST", b"x" * (MAX_ENVELOPE_BYTES + 1), {}, 413),
    ("declared-too-large", "POST", b"{}", {"content-length": str(MAX_ENVELOPE_BYTES + 1)}, 413),
    ("gzip", "POST", gzip.compress(envelope()), {"content-encoding": "gzip"}, 415),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("method", "body", "headers", "status"), [pytest.param(*r[1:], id=r[0]) for r in REFUSALS])
async def test_refusals(recorder: Recorder, method: str, body: bytes, headers: dict[str, str], status: int) -> None:
    gateway = sentry_gateway(recorder)
    async with client(gateway) as http:
        if "content-length" in headers:  # a declared length the body does not match: sent raw

            async def chunks() -> Any:
                yield body

            response = await http.request(method, PATH, content=chunks(), headers=headers)
        else:
            response = await http.request(method, PATH, content=body, headers=headers)
        assert response.status_code == status, response.text
    await gateway.shutdown()
    assert recorder.requests == []


@pytest.mark.anyio
async def test_an_allowed_envelope_is_scrubbed_and_delivered(recorder: Recorder) -> None:
    gateway = sentry_gateway(recorder)
    async with client(gateway) as http:
        response = await http.post(
            PATH, content=envelope(), headers={"x-forwarded-for": "198.51.100.77", "user-agent": "Firefox/133.0"}
        )
        assert (response.status_code, response.json()) == (200, {})
        assert await gateway.dispatcher.wait_idle(5.0)
    await gateway.shutdown()
    [request] = recorder.requests
    assert str(request.url) == "https://o1.ingest.sentry.io/api/42/envelope/"
    [(_header, payload)] = parse_envelope(request.content).items
    event = json.loads(payload)
    assert event["message"] == "boom for :redacted"
    assert event["user"] == {"ip_address": "198.51.100.0"}  # the gateway's truncated address, not {{auto}}
    assert b"198.51.100.77" not in request.content


@pytest.mark.anyio
async def test_without_a_sentry_destination_there_is_no_tunnel(recorder: Recorder) -> None:
    gateway = PrivacyGateway(html_app([]), make_settings())
    async with client(gateway) as http:
        assert (await http.post(PATH, content=envelope())).status_code == 404
    await gateway.shutdown()


@pytest.mark.anyio
async def test_a_required_consent_is_respected(recorder: Recorder) -> None:
    settings_extra = {"destinations": {"sentry": {"kind": "sentry", "dsns": [DSN], "requires": ["analytics"]}}}
    settings = make_settings(**settings_extra)
    dispatcher = Dispatcher(
        build_sinks(settings), settings.dispatch, settings.spool, transport=httpx.MockTransport(recorder.handler)
    )
    gateway = PrivacyGateway(html_app([]), settings, dispatcher=dispatcher)
    async with client(gateway) as http:
        assert (await http.post(PATH, content=envelope())).status_code == 200  # answered, never forwarded
        assert await gateway.dispatcher.wait_idle(5.0)
    await gateway.shutdown()
    assert recorder.requests == []
    assert dispatcher.stats()["sentry"]["dropped_policy:consent"] == 1
