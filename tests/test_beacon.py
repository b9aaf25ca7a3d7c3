from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from gateway.beacon import MAX_JSON_DEPTH, BeaconEndpoint
from gateway.config import Settings, load_settings
from gateway.context import STATE_KEY, PrivacyContext
from gateway.events import Event

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
CONTEXT = PrivacyContext(
    ip="203.0.113.0",
    country="DE",
    granted=frozenset({"analytics"}),
    choice_made=True,
    gpc=True,
    consent_id="c" * 22,
    client_id="1234567890.1700000000",
)
CAP = 16384

# What Plausible's tracker sends (protocols.md §1.6, tracker/src/track.js): JSON.stringify of {n, v, u, d, r, ...}
# as text/plain; the issue's example lists v last. Both must work byte for byte.
TRACKER_PAGEVIEW = (
    b'{"n":"pageview","v":26,"u":"https://www.python.org/downloads/","d":"python.org","r":"https://www.google.com/"}'
)
ISSUE_PAGEVIEW = (
    b'{"n":"pageview","u":"https://www.python.org/downloads/","d":"python.org","r":"https://www.google.com/","v":26}'
)
TRACKER_CUSTOM = (
    b'{"n":"Download","v":26,"u":"https://www.python.org/downloads/release/python-3130/","d":"python.org",'
    b'"r":null,"p":{"plan":"x","version":3.13,"secret":"nope"}}'
)
TRACKER_CUSTOM_STRING_PROPS = (
    b'{"n":"Download","v":26,"u":"https://www.python.org/downloads/","d":"python.org","r":null,'
    b'"p":"{\\"plan\\":\\"x\\",\\"secret\\":\\"nope\\"}"}'
)
TRACKER_ENGAGEMENT = (
    b'{"n":"engagement","sd":45,"d":"python.org","u":"https://www.python.org/downloads/","p":{},"e":3021,"v":26}'
)


def make_settings(**analytics: Any) -> Settings:
    return load_settings(
        overrides={
            "site": {"origins": ["https://www.python.org", "https://python.org"]},
            "analytics": {
                "pageviews": "beacon",
                "custom_events": ["Download", "404", "Outbound Link: Click"],
                "allowed_props": ["plan", "version", "url"],
                **analytics,
            },
        }
    )


@dataclasses.dataclass
class Result:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    bytes_read: int
    receive_calls: int


class Endpoint:
    """A BeaconEndpoint plus the events it submitted."""

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        self.events: list[Event] = []
        self.app = BeaconEndpoint(settings or make_settings(), self.events.append, **kwargs)

    async def post(
        self,
        body: bytes = b"",
        *,
        content_type: bytes | None = b"text/plain",
        chunks: Iterator[bytes] | list[bytes] | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        user_agent: str | None = CHROME,
        context: PrivacyContext | None = CONTEXT,
        method: str = "POST",
        content_length: bool = True,
        host: bytes = b"www.python.org",
    ) -> Result:
        all_headers = [(b"host", host)]
        if content_type is not None:
            all_headers.append((b"content-type", content_type))
        if user_agent is not None:
            all_headers.append((b"user-agent", user_agent.encode("latin-1")))
        if chunks is None:
            chunks = [body]
            if content_length:
                all_headers.append((b"content-length", str(len(body)).encode()))
        all_headers += headers or []
        scope: dict[str, Any] = {
            "type": "http",
            "method": method,
            "scheme": "https",
            "path": "/api/event",
            "raw_path": b"/api/event",
            "query_string": b"",
            "headers": all_headers,
            "server": ("127.0.0.1", 8000),
            "client": ("203.0.113.0", 0),
            "state": {STATE_KEY: context} if context is not None else {},
        }
        return await run(self.app, scope, chunks)


async def run(app: BeaconEndpoint, scope: dict[str, Any], chunks: Iterator[bytes] | list[bytes]) -> Result:
    """Drive the endpoint like a server: an instrumented receive that counts what the endpoint pulled."""
    iterator = iter(chunks)
    pending: list[bytes] = []
    read = calls = 0
    finished = False

    async def receive() -> dict[str, Any]:
        nonlocal read, calls, finished
        calls += 1
        if finished:
            await anyio.sleep_forever()
        chunk = pending.pop() if pending else next(iterator, None)
        if chunk is None:
            finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        nxt = next(iterator, None)
        if nxt is not None:
            pending.append(nxt)
        else:
            finished = True
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": nxt is not None}

    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    return Result(messages[0]["status"], dict(messages[0]["headers"]), messages[1]["body"], read, calls)


@pytest.fixture
def endpoint() -> Endpoint:
    return Endpoint()


# ---------------------------------------------------------------------------------------------- the tracker


@pytest.mark.anyio
@pytest.mark.parametrize("body", [TRACKER_PAGEVIEW, ISSUE_PAGEVIEW], ids=["tracker order", "issue order"])
async def test_tracker_pageview(endpoint: Endpoint, body: bytes) -> None:
    result = await endpoint.post(body, headers=[(b"accept-language", b"de-DE,de;q=0.9,en;q=0.5")])
    assert (result.status, result.body) == (202, b"ok")
    assert b"x-plausible-dropped" not in result.headers
    assert b"access-control-allow-origin" not in result.headers
    [event] = endpoint.events
    assert dataclasses.replace(event, timestamp=0.0) == Event(
        name="pageview",
        url="https://www.python.org/downloads/",
        referrer="https://www.google.com/",
        title="",
        language="de-de",
        user_agent=CHROME,
        country="DE",
        ip="203.0.113.0",
        granted=frozenset({"analytics"}),
        gpc=True,
        client_id="1234567890.1700000000",
        props={},
        source="beacon",
        timestamp=0.0,
    )


@pytest.mark.anyio
async def test_tracker_pageview_over_http() -> None:
    endpoint = Endpoint()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = {STATE_KEY: CONTEXT}
        await endpoint.app(scope, receive, send)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://www.python.org") as client:
        response = await client.post(
            "/api/event", content=TRACKER_PAGEVIEW, headers={"content-type": "text/plain", "user-agent": CHROME}
        )
    assert response.status_code == 202
    assert response.text == "ok"
    assert response.headers["cache-control"] == "no-store"
    assert [e.url for e in endpoint.events] == ["https://www.python.org/downloads/"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type",
    [b"text/plain", b"text/plain;charset=UTF-8", b"application/json", b"application/json; charset=utf-8",
     b'Application/JSON; charset="utf-8"', b"TEXT/PLAIN"],
)  # fmt: skip
async def test_accepted_content_types(endpoint: Endpoint, content_type: bytes) -> None:
    assert (await endpoint.post(TRACKER_PAGEVIEW, content_type=content_type)).status == 202
    assert len(endpoint.events) == 1


@pytest.mark.anyio
async def test_custom_event_with_props_object(endpoint: Endpoint) -> None:
    result = await endpoint.post(TRACKER_CUSTOM)
    assert result.status == 202
    [event] = endpoint.events
    assert event.name == "Download"
    assert event.url == "https://www.python.org/downloads/release/python-3130/"
    assert event.referrer == ""  # the tracker sends null when there is no referrer
    assert event.props == {"plan": "x", "version": "3.13"}  # allowlisted keys only, values as strings
    assert (event.ip, event.country, event.source) == ("203.0.113.0", "DE", "beacon")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        TRACKER_CUSTOM_STRING_PROPS,
        b'{"n":"Download","u":"https://www.python.org/","m":"{\\"plan\\":\\"x\\"}"}',  # legacy meta
        b'{"n":"Download","u":"https://www.python.org/","meta":{"plan":"x"}}',
        b'{"name":"Download","url":"https://www.python.org/","props":{"plan":"x"}}',  # long names
        b'{"n":"Download","u":"https://www.python.org/","m":{"plan":"x"},"p":{"plan":"ignored"}}',  # m wins
    ],
)
async def test_props_forms(endpoint: Endpoint, body: bytes) -> None:
    assert (await endpoint.post(body)).status == 202
    assert [e.props for e in endpoint.events] == [{"plan": "x"}]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"plan": "pro", "version": 3, "url": True}, {"plan": "pro", "version": "3", "url": "true"}),
        ({"plan": False, "version": 1.5}, {"plan": "false", "version": "1.5"}),
        ({"plan": ["a"], "version": {"x": 1}, "url": None}, {}),  # only scalars
        ({"plan": "", "version": "   "}, {}),  # blank values dropped
        ({"secret": "x", "PLAN": "y"}, {}),  # not allowlisted (case matters)
        ("not json", {}),
        ('["a"]', {}),
        ("{bad", {}),
        (["plan"], {}),
        (42, {}),
    ],
)
async def test_props_filtering(endpoint: Endpoint, props: object, expected: dict[str, str]) -> None:
    body = json.dumps({"n": "Download", "u": "https://www.python.org/", "p": props}).encode()
    assert (await endpoint.post(body)).status == 202
    assert [e.props for e in endpoint.events] == [expected]


@pytest.mark.anyio
async def test_props_count_is_capped() -> None:
    allowed = [f"k{i}" for i in range(40)]
    endpoint = Endpoint(make_settings(allowed_props=allowed))
    body = json.dumps({"n": "Download", "u": "https://www.python.org/", "p": {k: "v" for k in allowed}}).encode()
    assert (await endpoint.post(body)).status == 202
    assert len(endpoint.events[0].props) == 30


@pytest.mark.anyio
async def test_no_props_allowed_means_no_props() -> None:
    endpoint = Endpoint(make_settings(allowed_props=[]))
    assert (await endpoint.post(TRACKER_CUSTOM)).status == 202
    assert endpoint.events[0].props == {}


@pytest.mark.anyio
async def test_engagement_is_acknowledged_and_dropped(endpoint: Endpoint) -> None:
    result = await endpoint.post(TRACKER_ENGAGEMENT)
    assert (result.status, result.headers.get(b"x-plausible-dropped")) == (202, b"1")
    assert endpoint.events == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"sd": 45}, 202),
        ({"e": 3021}, 202),
        ({"sd": "45"}, 202),
        ({"sd": 150}, 202),  # clamped by Plausible, still valid
        ({"sd": -1, "e": 10}, 202),
        ({}, 400),
        ({"sd": "x"}, 400),
        ({"sd": -1}, 400),
        ({"e": 30 * 24 * 3600 * 1000}, 400),
        ({"sd": True}, 400),
        ({"sd": 4.5}, 400),
    ],
)
async def test_engagement_validation(endpoint: Endpoint, fields: dict[str, object], status: int) -> None:
    body = json.dumps({"n": "engagement", "u": "https://www.python.org/", **fields}).encode()
    assert (await endpoint.post(body)).status == status
    assert endpoint.events == []


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["server", "off"])
async def test_beacon_pageview_dropped_unless_beacon_mode(mode: str) -> None:
    endpoint = Endpoint(make_settings(pageviews=mode))
    result = await endpoint.post(TRACKER_PAGEVIEW)
    assert (result.status, result.headers.get(b"x-plausible-dropped")) == (202, b"1")
    assert endpoint.events == []
    assert (await endpoint.post(TRACKER_CUSTOM)).status == 202  # custom events still count
    assert [e.name for e in endpoint.events] == ["Download"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "forwarded"),
    [
        ("Download", True),
        ("Outbound Link: Click", True),
        (404, True),  # integer names (404 tracking) are cast to strings
        ("404", True),
        ("download", False),
        ("Signup", False),
        ("pageleave", False),
    ],
)
async def test_custom_event_allowlist(endpoint: Endpoint, name: object, forwarded: bool) -> None:
    body = json.dumps({"n": name, "u": "https://www.python.org/x", "sd": 1}).encode()
    result = await endpoint.post(body)
    assert result.status == 202
    assert (b"x-plausible-dropped" not in result.headers) is forwarded
    assert [e.name for e in endpoint.events] == ([str(name)] if forwarded else [])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "user_agent", [None, "", "curl/8.5.0", "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"]
)
async def test_bots_are_acknowledged_and_dropped(endpoint: Endpoint, user_agent: str | None) -> None:
    result = await endpoint.post(TRACKER_PAGEVIEW, user_agent=user_agent)
    assert (result.status, result.headers.get(b"x-plausible-dropped")) == (202, b"1")
    assert endpoint.events == []


@pytest.mark.anyio
async def test_without_privacy_context_no_address_or_consent_is_invented(endpoint: Endpoint) -> None:
    assert (await endpoint.post(TRACKER_PAGEVIEW, context=None, headers=[(b"sec-gpc", b"1")])).status == 202
    [event] = endpoint.events
    assert (event.ip, event.country, event.granted, event.client_id, event.gpc) == ("", "", frozenset(), "", True)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://WWW.Python.ORG/x", "https://WWW.Python.ORG/x"),
        ("https://python.org/x", "https://python.org/x"),
        ("http://www.python.org./x", "http://www.python.org./x"),
        ("https://www.python.org:8443/x?q=1#top", "https://www.python.org:8443/x?q=1#top"),
        ("https://user:secret@www.python.org/x?q=1", "https://www.python.org/x?q=1"),  # credentials never leave
        ("https://user@www.python.org:8443/x", "https://www.python.org:8443/x"),
    ],
)
async def test_url_on_site(endpoint: Endpoint, url: str, expected: str) -> None:
    body = json.dumps({"n": "pageview", "u": url}).encode()
    assert (await endpoint.post(body)).status == 202
    assert [e.url for e in endpoint.events] == [expected]


@pytest.mark.anyio
async def test_without_origins_the_request_host_is_the_site() -> None:
    endpoint = Endpoint(load_settings(overrides={"analytics": {"pageviews": "beacon"}}))
    on_site = b'{"n":"pageview","u":"http://localhost:8000/docs/"}'
    assert (await endpoint.post(on_site, host=b"localhost:8000")).status == 202
    assert (await endpoint.post(on_site, host=b"example.org")).status == 400
    assert (await endpoint.post(b'{"n":"pageview","u":"http://[::1]/"}', host=b"[::1]:8000")).status == 202
    assert len(endpoint.events) == 2


@pytest.mark.anyio
async def test_referrer_is_cut_and_malformed_ones_dropped(endpoint: Endpoint) -> None:
    long_referrer = "https://www.google.com/" + "a" * 3000
    for referrer, expected in ((long_referrer, long_referrer[:2000]), ("a b", ""), (7, ""), ("\ud800", "")):
        endpoint.events.clear()
        body = json.dumps({"n": "pageview", "u": "https://www.python.org/", "r": referrer}).encode()
        assert (await endpoint.post(body)).status == 202
        assert endpoint.events[0].referrer == expected


# ---------------------------------------------------------------------------------------------------- 413


@pytest.mark.anyio
async def test_content_length_over_cap_is_refused_unread(endpoint: Endpoint) -> None:
    result = await endpoint.post(chunks=iter([b" " * 1024] * 100), headers=[(b"content-length", str(CAP + 1).encode())])
    assert result.status == 413
    assert result.headers[b"connection"] == b"close"
    assert result.receive_calls == 0
    assert result.bytes_read == 0


@pytest.mark.anyio
@pytest.mark.parametrize("chunk_size", [1, 1000, 4096, 65536])
async def test_chunked_body_over_cap_stops_reading(endpoint: Endpoint, chunk_size: int) -> None:
    def endless() -> Iterator[bytes]:
        while True:
            yield b" " * chunk_size

    result = await endpoint.post(chunks=endless()) if chunk_size > 1 else None
    if result is None:  # 1-byte chunks: a finite but oversized stream keeps the test fast
        result = await endpoint.post(chunks=iter([b" "] * (CAP + 10)))
    assert result.status == 413
    assert result.bytes_read <= CAP + chunk_size
    assert endpoint.events == []


@pytest.mark.anyio
async def test_body_exactly_at_cap_is_read(endpoint: Endpoint) -> None:
    body = TRACKER_PAGEVIEW + b" " * (CAP - len(TRACKER_PAGEVIEW))
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    assert (await endpoint.post(chunks=chunks)).status == 202
    assert (await endpoint.post(body)).status == 202
    assert (await endpoint.post(body + b" ")).status == 413
    assert len(endpoint.events) == 2


# ---------------------------------------------------------------------------------------------------- 400

DEEP_OK = (
    b'{"n":"pageview","u":"https://www.python.org/","x":'
    + b"[" * (MAX_JSON_DEPTH - 1)
    + b"]" * (MAX_JSON_DEPTH - 1)
    + b"}"
)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", b"malformed JSON"),
        (b"{", b"malformed JSON"),
        (b"{'n': 'pageview'}", b"malformed JSON"),
        (TRACKER_PAGEVIEW[:-1], b"malformed JSON"),
        (b'{"n":"pageview","u":"https://www.python.org/","x":NaN}', b"malformed JSON"),
        (b'{"n":"pageview","u":"https://www.python.org/","x":Infinity}', b"malformed JSON"),
        (b'{"n":"pageview","u":"https://www.python.org/","x":-Infinity}', b"malformed JSON"),
        (b'{"n":"pageview","u":"https://www.python.org/","x":1e999}', b"malformed JSON"),
        (b'{"n":"pageview","u":"https://www.python.org/","x":' + b"1" * 5000 + b"}", b"malformed JSON"),
        (b"[" * 16000, b"JSON nested too deeply"),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, b"JSON nested too deeply"),
        (DEEP_OK[:-1].replace(b"[]", b"[[]]") + b"}", b"JSON nested too deeply"),
        (b"\xff\xfe{}", b"body is not UTF-8"),
        (b'{"n":"pageview","u":"https://www.python.org/\xc3"}', b"body is not UTF-8"),
        (b"\xef\xbb\xbf" + TRACKER_PAGEVIEW, b"malformed JSON"),  # a BOM is not JSON
        (b"[]", b"body must be a JSON object"),
        (b'"pageview"', b"body must be a JSON object"),
        (b"1", b"body must be a JSON object"),
        (b"null", b"body must be a JSON object"),
        (b'{"u":"https://www.python.org/"}', b"name is required"),
        (b'{"n":"","u":"https://www.python.org/"}', b"name is required"),
        (b'{"n":["x"],"u":"https://www.python.org/"}', b"name is required"),
        (b'{"n":true,"u":"https://www.python.org/"}', b"name is required"),
        (b'{"n":"' + b"x" * 121 + b'","u":"https://www.python.org/"}', b"name is too long"),
        (b'{"n":"\\ud800","u":"https://www.python.org/"}', b"name is not valid"),
        (b'{"n":"pageview"}', b"url is required"),
        (b'{"n":"pageview","u":""}', b"url is required"),
        (b'{"n":"pageview","u":42}', b"url is required"),
        (b'{"n":"pageview","u":"https://evil.example/"}', b"url not on this site"),
        (b'{"n":"pageview","u":"https://www.python.org.evil.example/"}', b"url not on this site"),
        (b'{"n":"pageview","u":"https://evil.example/https://www.python.org/"}', b"url not on this site"),
        (b'{"n":"pageview","u":"https://evil.example\\\\@www.python.org/"}', b"url is not valid"),
        (b'{"n":"pageview","u":"ftp://www.python.org/"}', b"url must be http(s)"),
        (b'{"n":"pageview","u":"javascript:alert(1)"}', b"url must be http(s)"),
        (b'{"n":"pageview","u":"data:text/html,hi"}', b"url must be http(s)"),
        (b'{"n":"pageview","u":"/relative/path"}', b"url must be http(s)"),
        (b'{"n":"pageview","u":"https:///nohost"}', b"url must be http(s)"),
        (b'{"n":"pageview","u":"https://www.python.org/a b"}', b"url is not valid"),
        (b'{"n":"pageview","u":"https://www.python.org/\\r\\nX-Injected: 1"}', b"url is not valid"),
        (b'{"n":"pageview","u":"https://[::1/"}', b"url is not valid"),
        (b'{"n":"pageview","u":"https://www.python.org:99999/"}', b"url is not valid"),
        (b'{"n":"pageview","u":"https://www.python.org/' + b"a" * 1980 + b'"}', b"url is too long"),
        (b'{"n":"Download","u":"https://www.python.org/","p":{"plan":"' + b"x" * 2001 + b'"}}',
         b"prop values must be at most 2000 bytes"),
    ],
)  # fmt: skip
async def test_bad_request(endpoint: Endpoint, body: bytes, reason: bytes) -> None:
    result = await endpoint.post(body)
    assert (result.status, result.body) == (400, reason)
    assert endpoint.events == []


@pytest.mark.anyio
async def test_nesting_limit_boundary(endpoint: Endpoint) -> None:
    assert (await endpoint.post(DEEP_OK)).status == 202


@pytest.mark.anyio
async def test_huge_nesting_with_a_large_cap() -> None:
    endpoint = Endpoint(make_settings(beacon_max_bytes=1_048_576))
    for body in (b"[" * 100_000, b'{"a":' * 20_000, b'{"a":[' * 50_000):
        result = await endpoint.post(body)
        assert (result.status, result.body) == (400, b"JSON nested too deeply")


@pytest.mark.anyio
@pytest.mark.parametrize("content_length", [b"abc", b"-1", b"1.5", b"0x10", b"99999999999999999999999", b"", b" "])
async def test_bad_content_length(endpoint: Endpoint, content_length: bytes) -> None:
    result = await endpoint.post(chunks=[TRACKER_PAGEVIEW], headers=[(b"content-length", content_length)])
    assert (result.status, result.body) == (400, b"bad content-length")


@pytest.mark.anyio
async def test_conflicting_content_lengths(endpoint: Endpoint) -> None:
    headers = [(b"content-length", b"5"), (b"content-length", b"6")]
    assert (await endpoint.post(chunks=[b"hello"], headers=headers)).status == 400


# ---------------------------------------------------------------------------------------------------- 415


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"text/html",
        b"application/jsonx",
        b"text/plain; charset=iso-8859-1",
        b"application/json; charset=utf-16",
        b"",
    ],
)
async def test_unsupported_content_type(endpoint: Endpoint, content_type: bytes | None) -> None:
    result = await endpoint.post(TRACKER_PAGEVIEW, content_type=content_type)
    assert (result.status, result.body) == (415, b"content type must be text/plain or application/json")
    assert result.receive_calls == 0


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", [b"gzip", b"br", b"deflate", b"identity", b""])
async def test_any_content_encoding_is_refused(endpoint: Endpoint, encoding: bytes) -> None:
    result = await endpoint.post(TRACKER_PAGEVIEW, headers=[(b"content-encoding", encoding)])
    assert (result.status, result.body) == (415, b"content-encoding not supported")
    assert result.receive_calls == 0
    assert endpoint.events == []


# ------------------------------------------------------------------------------------------------ methods


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT"])
async def test_other_methods(endpoint: Endpoint, method: str) -> None:
    result = await endpoint.post(TRACKER_PAGEVIEW, method=method)
    assert result.status == 405
    assert result.headers[b"allow"] == b"POST, OPTIONS"
    assert result.receive_calls == 0


@pytest.mark.anyio
async def test_options_grants_no_cors(endpoint: Endpoint) -> None:
    headers = [(b"origin", b"https://evil.example"), (b"access-control-request-method", b"POST")]
    result = await endpoint.post(method="OPTIONS", headers=headers)
    assert (result.status, result.body) == (204, b"")
    assert not [name for name in result.headers if name.startswith(b"access-control-")]
    assert b"content-length" not in result.headers


# ---------------------------------------------------------------------------------------- timing and failures


@pytest.mark.anyio
@pytest.mark.parametrize("first", [None, b"{"], ids=["nothing sent", "trickle then silence"])
async def test_slow_body_gets_408(first: bytes | None) -> None:
    submitted: list[Event] = []
    endpoint = BeaconEndpoint(make_settings(), submitted.append, body_timeout=0.05)
    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", b"text/plain")], "state": {}}
    sent: list[Message] = []
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if first is not None and calls == 1:
            return {"type": "http.request", "body": first, "more_body": True}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await endpoint(scope, receive, send)
    assert submitted == []
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert sent[1]["body"] == b"body not received in time"


@pytest.mark.anyio
async def test_client_disconnect_gets_no_answer(endpoint: Endpoint) -> None:
    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", b"text/plain")], "state": {}}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await endpoint.app(scope, receive, send)
    assert sent == []


@pytest.mark.anyio
async def test_failing_submit_is_acknowledged_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def submit(event: Event) -> None:
        raise RuntimeError("queue exploded")

    endpoint = Endpoint()
    endpoint.app = BeaconEndpoint(make_settings(), submit)
    with caplog.at_level(logging.ERROR, logger="gateway.beacon"):
        result = await endpoint.post(TRACKER_PAGEVIEW)
    assert (result.status, result.headers.get(b"x-plausible-dropped")) == (202, b"1")
    assert "could not be submitted" in caplog.text
    assert "203.0.113" not in caplog.text and "python.org/downloads" not in caplog.text


@pytest.mark.anyio
async def test_memory_stays_bounded_across_bad_requests(endpoint: Endpoint) -> None:
    oversized_chunks = [b" " * 4096] * 6
    deep = b"[" * 16000
    many_props = json.dumps(
        {"n": "Download", "u": "https://www.python.org/", "p": {f"k{i}": i for i in range(1000)}}
    ).encode()
    bad: list[Callable[[], Any]] = [
        lambda: endpoint.post(chunks=iter(oversized_chunks)),
        lambda: endpoint.post(deep),
        lambda: endpoint.post(b'{"x":NaN}'),
        lambda: endpoint.post(b"\xff" * 1000),
        lambda: endpoint.post(b'{"n":"pageview","u":"https://evil.example/"}'),
        lambda: endpoint.post(many_props[: CAP - 1] if len(many_props) >= CAP else many_props),
        lambda: endpoint.post(TRACKER_PAGEVIEW, content_type=b"application/x-www-form-urlencoded"),
    ]
    for request in bad * 5:  # warm up caches and lazily built objects
        await request()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for i in range(2000):
            result = await bad[i % len(bad)]()
            assert result.status in (400, 413, 415, 202)
            # A server passes through its event loop between requests; that is also when asyncio drops the
            # cancelled timer of each body-read timeout. Without this the test would count them as growth.
            await anyio.sleep(0)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - baseline < 1024 * 1024, peak - baseline
    assert current - baseline < 256 * 1024, current - baseline  # nothing accumulates per request


# ------------------------------------------------------------------------------------------------ properties


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_URLS = st.one_of(
    st.sampled_from(["https://www.python.org/", "https://evil.example/", "ftp://www.python.org/", "", "x" * 2100]),
    st.text(max_size=40),
    _JSON,
)
_BEACONS = st.fixed_dictionaries(
    {},
    optional={
        "n": st.one_of(st.sampled_from(["pageview", "engagement", "Download", "404"]), _JSON),
        "u": _URLS,
        "r": st.one_of(st.text(max_size=30), _JSON),
        "p": st.one_of(
            st.dictionaries(st.sampled_from(["plan", "version", "x"]), _JSON, max_size=4), st.text(max_size=30)
        ),
        "m": _JSON,
        "sd": _JSON,
        "e": _JSON,
        "v": _JSON,
    },
).map(lambda beacon: json.dumps(beacon).encode())
_BODIES = st.one_of(
    _BEACONS,
    _JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    st.integers(min_value=CAP - 10, max_value=CAP + 10).map(lambda n: b" " * n),
)
_HEADER_VALUES = st.one_of(st.binary(max_size=40), st.sampled_from([b"text/plain", b"application/json", b"1", b""]))


@pytest.mark.anyio
@given(
    body=_BODIES,
    content_type=st.one_of(st.none(), _HEADER_VALUES),
    extra=st.lists(
        st.tuples(
            st.sampled_from([b"content-length", b"content-encoding", b"user-agent", b"host", b"accept-language"]),
            _HEADER_VALUES,
        ),
        max_size=3,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=4),
    send_length=st.booleans(),
)
@settings(max_examples=300, deadline=None)
async def test_arbitrary_requests_get_a_clean_answer(
    body: bytes,
    content_type: bytes | None,
    extra: list[tuple[bytes, bytes]],
    cuts: list[int],
    send_length: bool,
) -> None:
    handler = _Collect()
    logger = logging.getLogger("gateway.beacon")
    logger.addHandler(handler)
    try:
        endpoint = Endpoint(body_timeout=1.0)
        points = [0, *sorted(c for c in cuts if c < len(body)), len(body)]
        chunks = [body[a:b] for a, b in itertools.pairwise(points)]
        headers = [(b"content-length", str(len(body)).encode())] if send_length else []
        result = await endpoint.post(
            chunks=chunks, content_type=content_type, headers=headers + extra, content_length=False
        )
    finally:
        logger.removeHandler(handler)
    assert result.status in (202, 400, 408, 413, 415)
    assert result.bytes_read <= CAP + max((len(c) for c in chunks), default=0)
    assert handler.records == []  # no request reached the catch-all
    for event in endpoint.events:
        assert event.source == "beacon" and event.ip == "203.0.113.0"
        assert event.url.startswith(("https://www.python.org/", "https://python.org/"))
