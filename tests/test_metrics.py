from __future__ import annotations

from pathlib import Path

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message, Scope

from gateway.config import MetricsSettings, Secret, SpoolSettings
from gateway.delivery.dispatcher import Dispatcher
from gateway.events import Event
from gateway.metrics import MetricsEndpoint
from tests.delivery.test_dispatcher import FAST, FakeDestination, FakeSink, event, until

TOKEN = "s3cret-metrics-token-0123456789abcdef"

OUTCOMES = ("delivered", "dropped_policy", "dropped_destination", "dropped_overflow", "dropped_expired",
            "dead_lettered", "ambiguous", "pending")  # fmt: skip


def make_scope(method: str = "GET", authorization: str | None = None) -> Scope:
    headers = [(b"host", b"www.example.org")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode("latin-1")))
    # After the privacy middleware the client address is truncated; the endpoint must not rely on it.
    return {"type": "http", "method": method, "path": "/_privacy/metrics", "headers": headers,
            "client": ("127.0.0.0", 50000)}  # fmt: skip


async def call(endpoint: MetricsEndpoint, scope: Scope, *, client_allowed: bool) -> tuple[int, dict[str, str], bytes]:
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    await endpoint(scope, receive, send, client_allowed=client_allowed)
    start, body = messages
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body["body"]


@pytest.fixture
async def dispatcher(tmp_path: Path) -> Dispatcher:
    """A dispatcher that has delivered, dropped and dead-lettered something, and still has events queued."""
    dest = FakeDestination()
    dest.script.extend(["ok", "ok", "400"])
    sinks = [FakeSink("plausible"), FakeSink("ga4", requires=["analytics"])]
    d = Dispatcher(sinks, FAST, SpoolSettings(path=str(tmp_path / "spool.sqlite3")), transport=dest.transport)
    await d.start()
    for n in range(3):
        d.submit(event(n))
    await until(d, lambda: d.stats()["plausible"]["pending"] == 0)
    await d.stop()
    d.submit(Event("pageview", "https://www.python.org/late"))  # refused after stop
    return d


def parse(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.anyio
async def test_text_format_parses_with_counters_per_destination(dispatcher: Dispatcher) -> None:
    endpoint = MetricsEndpoint(MetricsSettings(), dispatcher)
    status, headers, body = await call(endpoint, make_scope(), client_allowed=True)
    assert status == 200
    assert headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert headers["cache-control"] == "no-store"
    samples = parse(body)
    stats = dispatcher.stats()
    for destination in ("plausible", "ga4"):
        labels = (("destination", destination),)
        for name in ("accepted", "delivered", "dropped_overflow", "dropped_expired", "dead_lettered", "ambiguous",
                     "retried", "refused", "replayed", "dropped_destination"):  # fmt: skip
            assert samples[f"gateway_dispatch_{name}_total"][labels] == stats[destination][name], name
        for name in ("pending", "queue_depth", "in_flight", "spool_rows", "spool_oldest_age_seconds", "circuit_state"):
            assert samples[f"gateway_dispatch_{name}"][labels] == stats[destination][name], name
    plausible = (("destination", "plausible"),)
    assert samples["gateway_dispatch_delivered_total"][plausible] == 2
    assert samples["gateway_dispatch_dead_lettered_total"][plausible] == 1
    assert samples["gateway_dispatch_refused_total"][plausible] == 1
    consent = (("destination", "ga4"), ("reason", "consent"))
    assert samples["gateway_dispatch_dropped_policy_total"][consent] == 3
    assert samples["gateway_dispatch_spool_available"][()] == 0  # closed by stop()


@pytest.mark.anyio
async def test_the_books_balance_in_the_exported_numbers(dispatcher: Dispatcher) -> None:
    samples = parse(MetricsEndpoint(MetricsSettings(), dispatcher).render())
    for destination in ("plausible", "ga4"):
        labels = (("destination", destination),)
        policy = sum(v for k, v in samples["gateway_dispatch_dropped_policy_total"].items() if k[0] == labels[0])
        total = (
            policy
            + samples["gateway_dispatch_pending"][labels]
            + sum(
                samples[f"gateway_dispatch_{name}_total"][labels]
                for name in OUTCOMES
                if name not in ("dropped_policy", "pending")
            )
        )
        assert samples["gateway_dispatch_accepted_total"][labels] == total


AUTH_TABLE = [
    # (token configured, client_allowed, Authorization header, expected status)
    (None, True, None, 200),
    (None, False, None, 403),
    (None, False, f"Bearer {TOKEN}", 403),  # no token configured: a bearer proves nothing
    (TOKEN, False, None, 403),
    (TOKEN, False, f"Bearer {TOKEN}", 200),
    (TOKEN, False, f"bearer {TOKEN}", 200),  # the scheme is case-insensitive (RFC 9110 §11.1)
    (TOKEN, False, f"Bearer {TOKEN}x", 403),
    (TOKEN, False, f"Bearer {TOKEN[:-1]}", 403),
    (TOKEN, False, "Bearer ", 403),
    (TOKEN, False, "Bearer wrong-token", 403),
    (TOKEN, False, f"Basic {TOKEN}", 403),
    (TOKEN, False, TOKEN, 403),
    (TOKEN, False, "Bearer ünïcode", 403),
    (TOKEN, True, "Bearer wrong-token", 200),  # trusted peer: the header does not matter
]


@pytest.mark.anyio
@pytest.mark.parametrize(("token", "client_allowed", "authorization", "expected"), AUTH_TABLE)
async def test_access(
    dispatcher: Dispatcher, token: str | None, client_allowed: bool, authorization: str | None, expected: int
) -> None:
    settings = MetricsSettings(token=Secret(token) if token else None)
    status, _, body = await call(MetricsEndpoint(settings, dispatcher), make_scope(authorization=authorization),
                                 client_allowed=client_allowed)  # fmt: skip
    assert status == expected
    if expected == 403:
        assert body == b"forbidden\n" and b"gateway_dispatch" not in body


@pytest.mark.anyio
async def test_methods_and_disabled(dispatcher: Dispatcher) -> None:
    endpoint = MetricsEndpoint(MetricsSettings(), dispatcher)
    status, headers, body = await call(endpoint, make_scope("POST"), client_allowed=True)
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    _, _, get_body = await call(endpoint, make_scope("GET"), client_allowed=True)
    status, headers, body = await call(endpoint, make_scope("HEAD"), client_allowed=True)
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) == len(get_body) > 0
    disabled = MetricsEndpoint(MetricsSettings(enabled=False), dispatcher)
    status, _, _ = await call(disabled, make_scope(), client_allowed=True)
    assert status == 404


@pytest.mark.anyio
async def test_dedicated_registry(dispatcher: Dispatcher) -> None:
    first = MetricsEndpoint(MetricsSettings(), dispatcher)
    second = MetricsEndpoint(MetricsSettings(), dispatcher)  # no "Duplicated timeseries" error
    assert first.registry is not prometheus_client.REGISTRY
    assert b"gateway_dispatch" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
    assert first.render() == second.render()


def test_token_not_in_repr() -> None:
    d = Dispatcher([FakeSink("p")], FAST, SpoolSettings(enabled=False))
    endpoint = MetricsEndpoint(MetricsSettings(token=Secret(TOKEN)), d)
    assert TOKEN not in repr(endpoint)


@pytest.mark.anyio
async def test_through_an_asgi_client(dispatcher: Dispatcher) -> None:
    """The endpoint is a plain ASGI callable once the caller has decided the peer's trust."""
    endpoint = MetricsEndpoint(MetricsSettings(token=Secret(TOKEN)), dispatcher)

    async def app(scope: Scope, receive: object, send: object) -> None:
        await endpoint(scope, receive, send, client_allowed=False)  # type: ignore[arg-type]

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/_privacy/metrics")).status_code == 403
        response = await client.get("/_privacy/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        assert "gateway_dispatch_accepted_total" in response.text
