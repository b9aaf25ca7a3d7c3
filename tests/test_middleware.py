"""The composed middleware, in process: real consent, banner, sinks and dispatcher; destinations on MockTransport."""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from gateway import PrivacyGateway, load_settings
from gateway.config import Settings
from gateway.context import STATE_KEY, PrivacyContext
from gateway.delivery.dispatcher import Dispatcher
from gateway.sinks.factory import build_sinks

PAGE = b"<!doctype html><html><head><title>Downloads &amp; more</title></head><body><p>hello</p></body></html>"
KEY = "k" * 40
ORIGIN = "https://testserver"


def make_settings(**extra: Any) -> Settings:
    overrides: dict[str, Any] = {
        "client_ip": {"trusted_proxies": ["127.0.0.1/32"]},
        "consent": {"receipts": "", "secret_keys": [KEY]},
        "spool": {"enabled": False},
        "site": {"origins": [ORIGIN]},
        "dispatch": {"flush_interval": 0.05, "shutdown_timeout": 2.0},
        "destinations": {
            "plausible": {
                "kind": "plausible",
                "endpoint": "https://plausible.test/api/event",
                "domain": "testserver",
                "fields": ["name", "url", "referrer", "country", "user_agent", "ip"],
            },
            "ga4": {
                "kind": "ga4",
                "endpoint": "https://ga.test/mp/collect",
                "measurement_id": "G-TEST1234",
                "api_secret": "ga-secret-canary",
                "requires": ["analytics"],
                "fields": ["name", "url", "referrer", "title", "country", "language"],
            },
        },
    }
    overrides.update(extra)
    return load_settings(environ={}, overrides=overrides)


@dataclass
class Recorder:
    requests: list[httpx.Request] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(202 if request.url.path.endswith("/api/event") else 204)

    def to(self, host: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.host == host]


Seen = dict[str, Any]


def html_app(
    seen: list[Seen], body: bytes = PAGE, content_type: bytes = b"text/html; charset=utf-8", status: int = 200
) -> Callable[[Scope, Receive, Send], Any]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return
        seen.append(
            {"client": scope.get("client"), "headers": list(scope["headers"]), "privacy": scope["state"][STATE_KEY]}
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    yield Recorder()


def gateway_for(app: Any, recorder: Recorder, settings: Settings | None = None) -> PrivacyGateway:
    settings = settings or make_settings()
    dispatcher = Dispatcher(
        build_sinks(settings), settings.dispatch, settings.spool, transport=httpx.MockTransport(recorder.handler)
    )
    return PrivacyGateway(app, settings, dispatcher=dispatcher)


def client_for(gateway: PrivacyGateway, peer: str = "198.51.100.77") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gateway, client=(peer, 5555))
    return httpx.AsyncClient(transport=transport, base_url=ORIGIN)


BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"


@pytest.mark.anyio
async def test_scope_is_rewritten_and_state_set(recorder: Recorder) -> None:
    seen: list[Seen] = []
    gateway = gateway_for(html_app(seen), recorder)
    async with client_for(gateway, peer="127.0.0.1") as client:
        await client.get(
            "/x",
            headers={
                "x-forwarded-for": "203.0.113.9, 198.51.100.77",
                "x-real-ip": "1.1.1.1",
                "cf-connecting-ip": "1.1.1.1",
                "user-agent": BROWSER,
            },
        )
    await gateway.shutdown()
    (request,) = seen
    assert request["client"] == ("198.51.100.0", 0)
    names = {name for name, _ in request["headers"]}
    assert not names & {b"x-forwarded-for", b"x-real-ip", b"cf-connecting-ip"}
    privacy: PrivacyContext = request["privacy"]
    assert privacy.ip == "198.51.100.0"
    assert privacy.granted == frozenset()
    assert privacy.choice_made is False


@pytest.mark.anyio
async def test_pageview_reaches_cookieless_destination_only_without_consent(recorder: Recorder) -> None:
    gateway = gateway_for(html_app([]), recorder)
    async with client_for(gateway) as client:
        response = await client.get("/downloads/?utm_source=news&email=a%40b.example", headers={"user-agent": BROWSER})
    await gateway.shutdown()
    assert response.status_code == 200
    (plausible,) = recorder.to("plausible.test")
    assert plausible["name"] == "pageview"
    assert plausible["url"] == "https://testserver/downloads/?utm_source=news"
    assert recorder.to("ga.test") == []
    (sent,) = [r for r in recorder.requests if r.url.host == "plausible.test"]
    assert sent.headers["x-forwarded-for"] == "198.51.100.0"
    assert "198.51.100.77" not in repr(recorder.requests) + sent.content.decode()


@pytest.mark.anyio
async def test_consent_grants_ga4_with_first_party_client_id(recorder: Recorder) -> None:
    gateway = gateway_for(html_app([]), recorder)
    async with client_for(gateway) as client:
        consent = await client.post(
            "/_privacy/consent", json={"categories": {"analytics": True}}, headers={"sec-fetch-site": "same-origin"}
        )
        assert consent.status_code == 204
        page = await client.get("/about/", headers={"user-agent": BROWSER, "accept-language": "de-DE,de;q=0.9"})
        assert page.status_code == 200
        cid_cookie = page.headers.get("set-cookie", "")
        assert cid_cookie.startswith("__Host-gw_cid=")
        again = await client.get("/about/", headers={"user-agent": BROWSER})
        assert "set-cookie" not in again.headers  # the id is set once, then read back
    await gateway.shutdown()
    ga4 = recorder.to("ga.test")
    events = [event for body in ga4 for event in body["events"]]
    assert len(events) == 2
    assert events[0]["name"] == "page_view"
    assert events[0]["params"]["page_title"] == "Downloads & more"
    assert len({body["client_id"] for body in ga4}) == 1
    assert "ga-secret-canary" not in json.dumps(ga4)


@pytest.mark.anyio
async def test_gpc_blocks_ga4_after_plain_acceptance(recorder: Recorder) -> None:
    gateway = gateway_for(html_app([]), recorder)
    async with client_for(gateway) as client:
        await client.post(
            "/_privacy/consent", json={"categories": {"analytics": True}}, headers={"sec-fetch-site": "same-origin"}
        )
        await client.get("/page/", headers={"user-agent": BROWSER, "sec-gpc": "1"})
    await gateway.shutdown()
    assert recorder.to("ga.test") == []
    assert len(recorder.to("plausible.test")) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "headers", "status", "content_type"),
    [
        (
            "/page/",
            {"user-agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"},
            200,
            b"text/html",
        ),
        ("/page/", {"user-agent": BROWSER, "sec-purpose": "prefetch"}, 200, b"text/html"),
        ("/static/site.css", {"user-agent": BROWSER}, 200, b"text/html"),
        ("/page/", {"user-agent": BROWSER}, 404, b"text/html"),
        ("/api/data", {"user-agent": BROWSER}, 200, b"application/json"),
    ],
    ids=["bot", "prefetch", "excluded-path", "not-found", "not-html"],
)
async def test_no_pageview(
    recorder: Recorder, path: str, headers: dict[str, str], status: int, content_type: bytes
) -> None:
    gateway = gateway_for(html_app([], status=status, content_type=content_type), recorder)
    async with client_for(gateway) as client:
        await client.get(path, headers=headers)
    await gateway.shutdown()
    assert recorder.requests == []
    stats = gateway.dispatcher.stats()
    assert all(row.get("accepted", 0) == 0 for row in stats.values())


@pytest.mark.anyio
async def test_banner_until_a_choice_is_made(recorder: Recorder) -> None:
    gateway = gateway_for(html_app([]), recorder)
    async with client_for(gateway) as client:
        first = await client.get("/", headers={"user-agent": BROWSER})
        assert 'role="dialog"' in first.text and 'action="/_privacy/consent"' in first.text
        assert "Privacy settings" in first.text
        assert int(first.headers["content-length"]) == len(first.content)
        assert "cookie" in first.headers["vary"].lower()
        await client.post(
            "/_privacy/consent", json={"categories": {"analytics": False}}, headers={"sec-fetch-site": "same-origin"}
        )
        second = await client.get("/", headers={"user-agent": BROWSER})
        assert 'role="dialog"' not in second.text  # a choice was made: no banner ...
        assert "Privacy settings" in second.text  # ... but the link that reopens the settings is on every page
        assert int(second.headers["content-length"]) == len(second.content)
    await gateway.shutdown()


@pytest.mark.anyio
async def test_gateway_endpoints(recorder: Recorder) -> None:
    gateway = gateway_for(html_app([]), recorder)
    async with client_for(gateway) as client:
        assert (await client.get("/_privacy/healthz")).status_code == 200
        assert (await client.get("/_privacy/readyz")).status_code == 200
        assert (await client.get("/_privacy/nope")).status_code == 404
        gpc = await client.get("/.well-known/gpc.json")
        assert gpc.json()["gpc"] is True
        flows = await client.get("/_privacy/flows.json")
        assert {row["destination"] for row in flows.json()} == {"plausible", "ga4"}
        assert "ga-secret-canary" not in flows.text
        assert (await client.get("/_privacy/metrics")).status_code == 403  # untrusted peer, no token
    async with client_for(gateway, peer="127.0.0.1") as client:
        metrics = await client.get("/_privacy/metrics")
        assert metrics.status_code == 200
    await gateway.shutdown()


# (peer, trusted proxies, forwarding headers, expected status): metrics.allow is the default loopback list.
METRICS_ACCESS = [
    pytest.param("127.0.0.1", ["127.0.0.1/32"], {}, 200, id="v4-direct-loopback"),
    pytest.param("::1", ["::1/128"], {}, 200, id="v6-direct-loopback"),
    pytest.param("198.51.100.77", ["127.0.0.1/32"], {}, 403, id="v4-direct-internet"),
    pytest.param("2001:db8::77", ["::1/128"], {}, 403, id="v6-direct-internet"),
    # A same-host proxy forwarding an internet client: the client decides, not the proxy's loopback address.
    pytest.param("127.0.0.1", ["127.0.0.1/32"], {"x-forwarded-for": "8.8.8.8"}, 403, id="v4-forwarded-internet"),
    pytest.param("::1", ["::1/128"], {"x-forwarded-for": "2001:4860::8888"}, 403, id="v6-forwarded-internet"),
    pytest.param("127.0.0.1", ["127.0.0.1/32"], {"forwarded": "for=8.8.8.8"}, 403, id="v4-forwarded-rfc7239"),
    pytest.param("::1", ["::1/128"], {"fastly-client-ip": "2001:4860::8888"}, 403, id="v6-forwarded-fastly"),
    pytest.param("127.0.0.1", ["127.0.0.1/32"], {"x-forwarded-for": "127.0.0.1"}, 200, id="v4-forwarded-loopback"),
    pytest.param("::1", ["::1/128"], {"x-forwarded-for": " , ::1 , "}, 200, id="v6-forwarded-loopback"),
    # Forwarded by a proxy that is not trusted: whoever it acts for is unknown, so never allowlisted by address.
    pytest.param("127.0.0.1", [], {"x-forwarded-for": "8.8.8.8"}, 403, id="v4-untrusted-proxy"),
    pytest.param("::1", [], {"x-forwarded-for": "2001:4860::8888"}, 403, id="v6-untrusted-proxy"),
    # An allowlisted monitoring host behind a trusted proxy.
    pytest.param("127.0.0.1", ["127.0.0.1/32"], {"x-forwarded-for": "192.0.2.10"}, 200, id="v4-forwarded-allowed"),
    pytest.param("::1", ["::1/128"], {"x-forwarded-for": "2001:db8:5::10"}, 200, id="v6-forwarded-allowed"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("peer", "trusted", "headers", "expected"), METRICS_ACCESS)
async def test_metrics_allowlist_judges_the_resolved_client(
    recorder: Recorder, peer: str, trusted: list[str], headers: dict[str, str], expected: int
) -> None:
    settings = make_settings(
        client_ip={"trusted_proxies": trusted, "headers": ["fastly-client-ip", "x-forwarded-for", "forwarded"]},
        metrics={"allow": ["127.0.0.1/32", "::1/128", "192.0.2.10/32", "2001:db8:5::/48"]},
    )
    gateway = gateway_for(html_app([]), recorder, settings)
    async with client_for(gateway, peer=peer) as client:
        response = await client.get("/_privacy/metrics", headers=headers)
        assert response.status_code == expected, response.text
        if expected == 403:  # the token still opens it, whoever asks
            assert "gateway_dispatch" not in response.text
    await gateway.shutdown()


@pytest.mark.anyio
async def test_metrics_token_works_for_a_forwarded_client(recorder: Recorder) -> None:
    token = "metrics-token-0123456789abcdef0123"
    gateway = gateway_for(html_app([]), recorder, make_settings(metrics={"token": token}))
    async with client_for(gateway, peer="127.0.0.1") as client:
        forwarded = {"x-forwarded-for": "8.8.8.8"}
        assert (await client.get("/_privacy/metrics", headers=forwarded)).status_code == 403
        authorized = {**forwarded, "authorization": f"Bearer {token}"}
        assert (await client.get("/_privacy/metrics", headers=authorized)).status_code == 200
    await gateway.shutdown()


@pytest.mark.anyio
async def test_lifespan_passes_through_and_runs_dispatcher(recorder: Recorder) -> None:
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            events.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    gateway = gateway_for(app, recorder)
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await gateway({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert events == ["lifespan.startup", "lifespan.shutdown"]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def attribute_values(obj: object) -> list[object]:
    """Every attribute value of ``obj``: its __dict__, its slots, and a compiled (mypyc) class's native attributes."""
    names = set(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        names.update(name for name, member in vars(cls).items() if inspect.isdatadescriptor(member))
    values = [getattr(obj, name, None) for name in sorted(names) if not name.startswith("__")]
    assert values, "no attributes found: the check below would prove nothing"
    return values


@pytest.mark.anyio
async def test_request_data_does_not_leak_between_requests(recorder: Recorder) -> None:
    seen: list[Seen] = []
    gateway = gateway_for(html_app(seen), recorder)
    async with client_for(gateway, peer="198.51.100.77") as first, client_for(gateway, peer="2001:db8:9::1") as second:
        await first.post(
            "/_privacy/consent", json={"categories": {"analytics": True}}, headers={"sec-fetch-site": "same-origin"}
        )
        await first.get("/a", headers={"user-agent": BROWSER})
        await second.get("/b", headers={"user-agent": BROWSER})
    await gateway.shutdown()
    a, b = seen
    assert a["privacy"].granted == frozenset({"analytics"})
    assert b["privacy"].granted == frozenset()
    assert b["client"] == ("2001:db8:9::", 0)
    assert not any(isinstance(v, str) and "198.51.100" in v for v in attribute_values(gateway))


def test_the_fast_context_constructor_builds_the_same_frozen_context() -> None:
    from gateway.middleware import _new_context

    args = ("198.51.100.0", "GB", frozenset({"analytics"}), True, False, "consent-id", "client-id")
    fast = _new_context(*args)
    assert type(fast) is PrivacyContext
    assert fast == PrivacyContext(*args)
    assert _new_context is not PrivacyContext  # the fast path is in use (pure and compiled builds alike)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.ip = "198.51.100.77"  # type: ignore[misc]
