"""The consent endpoints: state, choices (JSON and no-JS form), withdrawal, CSRF rules, limits, receipts, gpc.json."""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope

from gateway.banner.texts import DEFAULT_CATEGORY_TEXTS
from gateway.config import Settings, load_settings
from gateway.consent import ConsentManager
from gateway.consent_api import MAX_BODY_BYTES, ConsentAPI, safe_next_path
from gateway.receipts import ReceiptLog
from tests.servers import free_port, run_server

KEY = "api-test-key-0123456789abcdef0123456789"
SITE = "https://www.example.org"
CONSENT = "/_privacy/consent"
COOKIE = "__Host-consent"
CLIENT_ID_COOKIE = "__Host-gw_cid"
SAME_ORIGIN = {"sec-fetch-site": "same-origin"}
CANARY_IP = "198.51.100.213"
CANARY_UA = "CanaryBrowser/9.9 (canary-ua-7f3a1c)"


def make_settings(consent: Mapping[str, Any] | None = None, **sections: Any) -> Settings:
    overrides: dict[str, Any] = {"consent": {"secret_keys": [KEY], "receipts": "", **(consent or {})}}
    overrides.update(sections)
    return load_settings(overrides=overrides)


class Gateway:
    """A ConsentAPI plus a client that sends cookies only when a test passes them (no hidden cookie jar)."""

    def __init__(self, settings: Settings, receipts: ReceiptLog | None = None, **options: Any) -> None:
        self.settings = settings
        self.manager = ConsentManager(settings)
        self.receipts = receipts
        self.api = ConsentAPI(settings, self.manager, receipts, **options)

    async def request(
        self,
        method: str,
        path: str = CONSENT,
        *,
        headers: Mapping[str, str] | None = None,
        cookie: str | None = None,
        base_url: str = SITE,
        **kwargs: Any,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if cookie is not None:
            all_headers["cookie"] = f"{COOKIE}={cookie}"
        transport = httpx.ASGITransport(app=self.api, client=(CANARY_IP, 40123))
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            return await client.request(method, path, headers=all_headers, **kwargs)

    async def accept(self, *, gpc: bool = False, cookie: str | None = None) -> str:
        headers = {**SAME_ORIGIN, **({"sec-gpc": "1"} if gpc else {})}
        response = await self.request("POST", headers=headers, json={"categories": {"analytics": True}}, cookie=cookie)
        assert response.status_code == 204
        return consent_cookie(response)

    async def state(self, cookie: str | None = None, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = await self.request("GET", cookie=cookie, headers=headers)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-type"] == "application/json"
        result: dict[str, Any] = response.json()
        return result


def set_cookies(response: httpx.Response) -> dict[str, Any]:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        jar.load(header)
    return dict(jar.items())


def consent_cookie(response: httpx.Response) -> str:
    morsel = set_cookies(response)[COOKIE]
    assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Lax" and morsel["path"] == "/"
    assert morsel["domain"] == ""
    assert 0 < int(morsel["max-age"]) <= 395 * 86400
    value: str = morsel.value
    return value


@pytest.fixture
def gateway() -> Gateway:
    return Gateway(make_settings())


@pytest.fixture
def receipts(tmp_path: Path) -> Iterator[ReceiptLog]:
    log = ReceiptLog(str(tmp_path / "receipts" / "consent.sqlite3"))
    yield log
    log.close()


# ------------------------------------------------------------------------------------------------ GET state


@pytest.mark.anyio
async def test_state_without_a_choice(gateway: Gateway) -> None:
    builtin = DEFAULT_CATEGORY_TEXTS["analytics"]  # the banner's own default text, so both show the same words
    assert await gateway.state() == {
        "choice_made": False,
        "revision": gateway.manager.revision,
        "gpc": False,
        "consent_id": "",
        "categories": {"analytics": {"granted": False, "label": builtin[0], "description": builtin[1]}},
    }


@pytest.mark.anyio
async def test_state_shows_configured_texts_for_each_category() -> None:
    texts = {"analytics": {"label": "Statistics", "description": "Counts visits."}, "video": {"label": "Videos"}}
    gateway = Gateway(make_settings({"categories": ["analytics", "video"], "category": texts}))
    categories = (await gateway.state())["categories"]
    assert list(categories) == ["analytics", "video"]
    assert categories["analytics"] == {"granted": False, "label": "Statistics", "description": "Counts visits."}
    assert categories["video"] == {"granted": False, "label": "Videos", "description": ""}


@pytest.mark.anyio
async def test_head_has_no_body(gateway: Gateway) -> None:
    response = await gateway.request("HEAD")
    assert response.status_code == 200 and response.content == b""


# ------------------------------------------------------------------------------------------------ JSON choice


@pytest.mark.anyio
async def test_same_origin_json_choice_sets_the_cookie(gateway: Gateway) -> None:
    response = await gateway.request("POST", headers=SAME_ORIGIN, json={"categories": {"analytics": True}})
    assert response.status_code == 204
    assert response.headers["cache-control"] == "no-store"
    assert "content-length" not in response.headers
    cookie = consent_cookie(response)
    assert CLIENT_ID_COOKIE not in set_cookies(response)  # nothing refused: the analytics id may stay
    state = await gateway.state(cookie)
    assert state["choice_made"] is True
    assert state["categories"]["analytics"]["granted"] is True
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,64}", state["consent_id"])


@pytest.mark.anyio
async def test_json_refusal_is_stored_and_ends_the_analytics_id(gateway: Gateway) -> None:
    response = await gateway.request("POST", headers=SAME_ORIGIN, json={"categories": {"analytics": False}})
    assert response.status_code == 204
    state = await gateway.state(consent_cookie(response))
    assert state["choice_made"] is True and state["categories"]["analytics"]["granted"] is False
    assert set_cookies(response)[CLIENT_ID_COOKIE]["max-age"] == "0"


@pytest.mark.anyio
async def test_categories_left_out_are_refused() -> None:
    gateway = Gateway(make_settings({"categories": ["analytics", "video"]}))
    response = await gateway.request("POST", headers=SAME_ORIGIN, json={"categories": {"video": True}})
    granted = {k: v["granted"] for k, v in (await gateway.state(consent_cookie(response)))["categories"].items()}
    assert granted == {"analytics": False, "video": True}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"origin": SITE}, id="origin"),
        pytest.param({"origin": "HTTPS://WWW.EXAMPLE.ORG:443"}, id="origin-default-port-upper-case"),
        pytest.param({"referer": SITE + "/downloads/?x=1"}, id="referer"),
        pytest.param({"sec-fetch-site": "same-origin", "origin": "https://evil.example"}, id="fetch-metadata-wins"),
    ],
)
async def test_same_origin_proofs_without_fetch_metadata(gateway: Gateway, headers: dict[str, str]) -> None:
    response = await gateway.request("POST", headers=headers, json={"categories": {"analytics": True}})
    assert response.status_code == 204
    consent_cookie(response)


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["POST-json", "POST-form", "DELETE"])
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"sec-fetch-site": "cross-site"}, id="fetch-cross-site"),
        pytest.param({"sec-fetch-site": "same-site"}, id="fetch-same-site"),  # a sibling subdomain
        pytest.param({"sec-fetch-site": "none"}, id="fetch-none"),
        pytest.param({"sec-fetch-site": "cross-site", "origin": SITE}, id="fetch-cross-site-with-good-origin"),
        pytest.param({"origin": "https://evil.example"}, id="origin-cross-site"),
        pytest.param({"origin": "https://www.example.org.evil.example"}, id="origin-suffix"),
        pytest.param({"origin": "http://www.example.org"}, id="origin-other-scheme"),
        pytest.param({"origin": "https://www.example.org:8443"}, id="origin-other-port"),
        pytest.param({"origin": "null"}, id="origin-null"),
        pytest.param({"origin": "https://evil.example", "referer": SITE + "/"}, id="bad-origin-good-referer"),
        pytest.param({"referer": "https://evil.example/" + SITE}, id="referer-cross-site"),
        pytest.param({"referer": "not a url"}, id="referer-garbage"),
        pytest.param({}, id="no-origin-no-referer-no-fetch-metadata"),
    ],
)
async def test_cross_site_writes_are_forbidden_without_a_cookie(
    gateway: Gateway, method: str, headers: dict[str, str]
) -> None:
    if method == "POST-json":
        response = await gateway.request("POST", headers=headers, json={"categories": {"analytics": True}})
    elif method == "POST-form":
        response = await gateway.request("POST", headers=headers, data={"action": "accept_all", "next": "/"})
    else:
        response = await gateway.request("DELETE", headers=headers)
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    assert response.text.startswith("Forbidden")


@pytest.mark.anyio
async def test_configured_site_origins_replace_the_request_host() -> None:
    gateway = Gateway(make_settings(site={"origins": ["https://www.python.org", "https://python.org"]}))
    body = {"categories": {"analytics": True}}
    for origin in ("https://www.python.org", "https://python.org"):
        response = await gateway.request("POST", headers={"origin": origin}, json=body, base_url="http://internal:8000")
        assert response.status_code == 204
    # The request's own host no longer counts once the site's origins are configured.
    response = await gateway.request(
        "POST", headers={"origin": "http://internal:8000"}, json=body, base_url="http://internal:8000"
    )
    assert response.status_code == 403


# ------------------------------------------------------------------------------------------------ form choice


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("form", "granted"),
    [
        ({"action": "accept_all"}, {"analytics": True, "video": True}),
        ({"action": "reject_all", "category": "analytics"}, {"analytics": False, "video": False}),
        ({"action": "save", "category": "video"}, {"analytics": False, "video": True}),
        ({"action": "save", "category": ["video", "analytics"]}, {"analytics": True, "video": True}),
        ({"action": "save"}, {"analytics": False, "video": False}),
    ],
)
async def test_form_post_redirects_back_with_the_choice(form: dict[str, Any], granted: dict[str, bool]) -> None:
    gateway = Gateway(make_settings({"categories": ["analytics", "video"]}))
    response = await gateway.request("POST", headers=SAME_ORIGIN, data={**form, "next": "/downloads/?os=mac"})
    assert response.status_code == 303
    assert response.headers["location"] == "/downloads/?os=mac"
    state = await gateway.state(consent_cookie(response))
    assert state["choice_made"] is True
    assert {name: value["granted"] for name, value in state["categories"].items()} == granted


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/", "/"),
        ("/downloads/release/python-3130/", "/downloads/release/python-3130/"),
        ("/search/?q=a%20b#top", "/search/?q=a%20b#top"),
        (None, "/"),
        ("", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("http:evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("evil.example", "/"),
        ("\\\\evil.example", "/"),
        ("/\t/evil.example", "/"),  # browsers drop tabs: this would become //evil.example
        ("/\n/evil.example", "/"),
        ("/\r\nSet-Cookie: x=1", "/"),  # header splitting
        (" //evil.example", "/"),
        ("/ok path", "/"),
        ("/caf\u00e9", "/"),
        ("/" + "a" * 3000, "/"),
    ],
)
def test_safe_next_path(value: str | None, expected: str) -> None:
    assert safe_next_path(value) == expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    "next_value", ["//evil.example/", "/\\evil.example", "https://evil.example/", "/\r\nSet-Cookie: x=1", "/\t/evil"]
)
async def test_open_redirects_in_next_are_neutralised(gateway: Gateway, next_value: str) -> None:
    response = await gateway.request("POST", headers=SAME_ORIGIN, data={"action": "reject_all", "next": next_value})
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    consent_cookie(response)  # the choice itself is still stored


@pytest.mark.anyio
async def test_form_without_next_returns_to_the_home_page(gateway: Gateway) -> None:
    response = await gateway.request("POST", headers=SAME_ORIGIN, data={"action": "accept_all"})
    assert response.status_code == 303 and response.headers["location"] == "/"


# ------------------------------------------------------------------------------------------------ withdrawal


@pytest.mark.anyio
async def test_withdraw_replaces_the_choice_with_a_refusal_and_expires_the_analytics_id(gateway: Gateway) -> None:
    accepted = await gateway.accept()
    before = await gateway.state(accepted)
    response = await gateway.request("DELETE", headers=SAME_ORIGIN, cookie=accepted)
    assert response.status_code == 204
    cookies = set_cookies(response)
    after = await gateway.state(consent_cookie(response))
    assert after["choice_made"] is True  # an explicit refusal: the banner does not nag
    assert after["categories"]["analytics"]["granted"] is False
    assert after["consent_id"] == before["consent_id"]
    expired = cookies[CLIENT_ID_COOKIE]
    assert expired.value == "" and expired["max-age"] == "0"
    assert expired["secure"] and expired["path"] == "/" and expired["domain"] == ""


@pytest.mark.anyio
async def test_withdraw_without_an_earlier_choice_still_stores_a_refusal(gateway: Gateway) -> None:
    response = await gateway.request("DELETE", headers={"origin": SITE})
    assert response.status_code == 204
    assert (await gateway.state(consent_cookie(response)))["choice_made"] is True


# ------------------------------------------------------------------------------------------------ revision, GPC


@pytest.mark.anyio
async def test_revision_change_voids_the_choice() -> None:
    old = Gateway(make_settings({"revision": "2024-10-04"}))
    cookie = await old.accept()
    assert (await old.state(cookie))["choice_made"] is True
    new = Gateway(make_settings({"revision": "2025-02-01"}))
    state = await new.state(cookie)
    assert state["choice_made"] is False
    assert state["revision"] == "2025-02-01"
    assert state["categories"]["analytics"]["granted"] is False


@pytest.mark.anyio
async def test_gpc_after_an_acceptance_given_without_it_grants_nothing(gateway: Gateway) -> None:
    cookie = await gateway.accept(gpc=False)
    state = await gateway.state(cookie, headers={"sec-gpc": "1"})
    assert state["gpc"] is True
    assert state["choice_made"] is True
    assert state["categories"]["analytics"]["granted"] is False
    assert (await gateway.state(cookie))["categories"]["analytics"]["granted"] is True


@pytest.mark.anyio
async def test_an_acceptance_given_while_gpc_was_sent_holds(gateway: Gateway) -> None:
    cookie = await gateway.accept(gpc=True)
    state = await gateway.state(cookie, headers={"sec-gpc": "1"})
    assert state["gpc"] is True and state["categories"]["analytics"]["granted"] is True


@pytest.mark.anyio
async def test_dnt_counts_only_when_honoured() -> None:
    ignoring = Gateway(make_settings())
    cookie = await ignoring.accept()
    assert (await ignoring.state(cookie, headers={"dnt": "1"}))["categories"]["analytics"]["granted"] is True
    honouring = Gateway(make_settings({"honor_dnt": True}))
    cookie = await honouring.accept()
    assert (await honouring.state(cookie, headers={"dnt": "1"}))["categories"]["analytics"]["granted"] is False
    response = await honouring.request(
        "POST", headers={**SAME_ORIGIN, "dnt": "1"}, json={"categories": {"analytics": True}}
    )
    opted_in = consent_cookie(response)
    assert (await honouring.state(opted_in, headers={"dnt": "1"}))["categories"]["analytics"]["granted"] is True


@pytest.mark.anyio
@pytest.mark.parametrize(("honor_gpc", "advertised"), [(True, True), (False, False)])
async def test_well_known_gpc_json(honor_gpc: bool, advertised: bool) -> None:
    gateway = Gateway(make_settings({"honor_gpc": honor_gpc}))
    response = await gateway.request("GET", "/.well-known/gpc.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"gpc", "lastUpdate"}
    assert body["gpc"] is advertised
    dt.date.fromisoformat(body["lastUpdate"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", body["lastUpdate"])
    head = await gateway.request("HEAD", "/.well-known/gpc.json")
    assert head.status_code == 200 and head.content == b""
    post = await gateway.request("POST", "/.well-known/gpc.json", headers=SAME_ORIGIN)
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


# ------------------------------------------------------------------------------------------------ bad requests


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS", "TRACE"])
async def test_other_methods_get_405_with_allow(gateway: Gateway, method: str) -> None:
    response = await gateway.request(method, headers=SAME_ORIGIN)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST, DELETE"
    assert "set-cookie" not in response.headers


@pytest.mark.anyio
async def test_unknown_path_is_404(gateway: Gateway) -> None:
    assert (await gateway.request("GET", "/_privacy/consent/extra")).status_code == 404


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "multipart/form-data; boundary=x", "application/jsonp", "application/json-patch+json", None],
)
async def test_other_content_types_get_415(gateway: Gateway, content_type: str | None) -> None:
    headers = {**SAME_ORIGIN, **({"content-type": content_type} if content_type else {})}
    response = await gateway.request("POST", headers=headers, content=b'{"categories": {"analytics": true}}')
    assert response.status_code == 415
    assert "set-cookie" not in response.headers


@pytest.mark.anyio
async def test_content_type_parameters_are_allowed(gateway: Gateway) -> None:
    headers = {**SAME_ORIGIN, "content-type": "Application/JSON; charset=utf-8"}
    response = await gateway.request("POST", headers=headers, content=b'{"categories": {"analytics": true}}')
    assert response.status_code == 204


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"\xff\xfe{}", "malformed JSON"),
        (b"[" * 2000 + b"]" * 2000, "malformed JSON"),  # nesting deeper than the JSON parser's recursion limit
        (b"[]", "expected"),
        (b'{"analytics": true}', "expected"),
        (b'{"categories": {"analytics": true}, "extra": 1}', "expected"),
        (b'{"categories": ["analytics"]}', "expected"),
        (b'{"categories": {"marketing": true}}', "unknown consent category"),
        (b'{"categories": {"analytics": 1}}', "true or false"),
        (b'{"categories": {"analytics": "true"}}', "true or false"),
        (b'{"categories": {"analytics": null}}', "true or false"),
        (b'{"categories": {"analytics": true, "analytics": false}}', "malformed JSON"),
    ],
)
async def test_bad_json_gets_400_with_a_reason(gateway: Gateway, body: bytes, reason: str) -> None:
    headers = {**SAME_ORIGIN, "content-type": "application/json"}
    response = await gateway.request("POST", headers=headers, content=body)
    assert response.status_code == 400
    assert reason in response.text
    assert "set-cookie" not in response.headers


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"next=/", "action"),
        (b"action=everything", "action"),
        (b"action=accept_all&action=reject_all", "action"),
        (b"action=save&category=marketing", "unknown consent category"),
        (b"action=save&next=/a&next=/b", "next"),
        (b"action=save&next=%ff", "malformed form"),
        ("action=save&next=/caf\u00e9".encode(), "malformed form"),
        (b"&".join(b"x=%d" % i for i in range(100)) + b"&action=save", "malformed form"),
    ],
)
async def test_bad_forms_get_400_with_a_reason(gateway: Gateway, body: bytes, reason: str) -> None:
    headers = {**SAME_ORIGIN, "content-type": "application/x-www-form-urlencoded"}
    response = await gateway.request("POST", headers=headers, content=body)
    assert response.status_code == 400
    assert reason in response.text


@pytest.mark.anyio
async def test_unknown_form_fields_are_ignored(gateway: Gateway) -> None:
    response = await gateway.request("POST", headers=SAME_ORIGIN, data={"action": "accept_all", "csrf": "x"})
    assert response.status_code == 303


@pytest.mark.anyio
async def test_declared_oversized_body_gets_413_without_being_read() -> None:
    gateway = Gateway(make_settings())
    received: list[Message] = []

    async def receive() -> Message:
        received.append({})
        return {"type": "http.request", "body": b"{}", "more_body": False}

    sent = await call_raw(gateway.api, receive, content_length=MAX_BODY_BYTES + 1)
    assert sent[0]["status"] == 413
    assert received == []


@pytest.mark.anyio
@pytest.mark.parametrize("declared", [None, 10])  # chunked (no length) and a Content-Length that lies
async def test_streamed_oversized_body_gets_413(declared: int | None) -> None:
    gateway = Gateway(make_settings())
    chunks = [b"{" + b" " * 1023] * 5 + [b"}"]

    async def receive() -> Message:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    sent = await call_raw(gateway.api, receive, content_length=declared)
    assert sent[0]["status"] == 413
    assert all(name != b"set-cookie" for name, _ in sent[0]["headers"])


@pytest.mark.anyio
async def test_body_exactly_at_the_limit_is_read() -> None:
    gateway = Gateway(make_settings())
    body = b'{"categories": {"analytics": true}}'
    body = body + b" " * (MAX_BODY_BYTES - len(body))
    response = await gateway.request("POST", headers={**SAME_ORIGIN, "content-type": "application/json"}, content=body)
    assert response.status_code == 204


@pytest.mark.anyio
async def test_invalid_content_length_gets_400() -> None:
    gateway = Gateway(make_settings())

    async def receive() -> Message:
        raise AssertionError("must not read")

    sent = await call_raw(gateway.api, receive, content_length=None, extra=[(b"content-length", b"-1")])
    assert sent[0]["status"] == 400


@pytest.mark.anyio
async def test_slow_body_gets_408() -> None:
    gateway = Gateway(make_settings(), body_timeout=0.05)

    async def receive() -> Message:
        await anyio.sleep(10)
        raise AssertionError("unreachable")

    with anyio.fail_after(2):
        sent = await call_raw(gateway.api, receive, content_length=20)
    assert sent[0]["status"] == 408


@pytest.mark.anyio
async def test_client_disconnect_while_reading_sends_nothing() -> None:
    gateway = Gateway(make_settings())

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    assert await call_raw(gateway.api, receive, content_length=20) == []


async def call_raw(
    app: ConsentAPI,
    receive: Receive,
    *,
    content_length: int | None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> list[Message]:
    headers = [
        (b"host", b"www.example.org"),
        (b"sec-fetch-site", b"same-origin"),
        (b"content-type", b"application/json"),
        *(extra or []),
    ]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": CONSENT,
        "raw_path": CONSENT.encode(),
        "query_string": b"",
        "headers": headers,
        "client": (CANARY_IP, 1234),
        "server": ("www.example.org", 443),
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=5000))
def test_arbitrary_cookie_header_bytes_never_break_the_state_endpoint(data: bytes) -> None:
    async def main() -> list[Message]:
        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        scope: Scope = {
            "type": "http",
            "method": "GET",
            "path": CONSENT,
            "scheme": "https",
            "headers": [(b"cookie", data), (b"cookie", COOKIE.encode() + b"=" + data)],
        }
        await _HYPOTHESIS_API(scope, receive, send)
        return sent

    sent = anyio.run(main)
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"])["choice_made"] is False


_HYPOTHESIS_SETTINGS = make_settings()
_HYPOTHESIS_API = ConsentAPI(_HYPOTHESIS_SETTINGS, ConsentManager(_HYPOTHESIS_SETTINGS), None)


# ------------------------------------------------------------------------------------------------ receipts


def receipt_rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as db:
        return [json.loads(row[0]) for row in db.execute("SELECT record FROM receipts ORDER BY seq")]


@pytest.mark.anyio
async def test_every_change_of_choice_is_recorded(receipts: ReceiptLog) -> None:
    gateway = Gateway(make_settings(), receipts)
    cookie = await gateway.accept()
    response = await gateway.request("POST", headers=SAME_ORIGIN, data={"action": "reject_all"}, cookie=cookie)
    cookie = consent_cookie(response)
    response = await gateway.request(
        "POST", headers={**SAME_ORIGIN, "sec-gpc": "1"}, data={"action": "accept_all"}, cookie=cookie
    )
    cookie = consent_cookie(response)
    response = await gateway.request("DELETE", headers=SAME_ORIGIN, cookie=cookie)
    assert response.status_code == 204
    # Refused writes leave no trace.
    assert (
        await gateway.request("POST", headers={"origin": "https://evil.example"}, data={"action": "accept_all"})
    ).status_code == 403

    rows = receipt_rows(Path(receipts.path))
    assert [(r["method"], r["choices"], r["gpc"]) for r in rows] == [
        ("api", {"analytics": True}, False),
        ("banner", {"analytics": False}, False),
        ("banner", {"analytics": True}, True),
        ("withdraw", {"analytics": False}, False),
    ]
    assert len({r["cid"] for r in rows}) == 1  # one visitor, one consent id across all changes
    assert {r["revision"] for r in rows} == {gateway.manager.revision}
    assert receipts.verify().ok and receipts.verify().count == 4


@pytest.mark.anyio
async def test_receipts_hold_no_ip_or_user_agent(receipts: ReceiptLog, tmp_path: Path) -> None:
    gateway = Gateway(make_settings(), receipts)
    canary_headers = {
        "user-agent": CANARY_UA,
        "x-forwarded-for": f"{CANARY_IP}, 203.0.113.9",
        "x-real-ip": CANARY_IP,
        "forwarded": f"for={CANARY_IP}",
        "accept-language": "en-CANARY",
    }
    response = await gateway.request(
        "POST", headers={**SAME_ORIGIN, **canary_headers}, json={"categories": {"analytics": True}}
    )
    cookie = consent_cookie(response)
    await gateway.request("POST", headers={"origin": SITE, **canary_headers}, data={"action": "save"}, cookie=cookie)
    await gateway.request("DELETE", headers={"referer": SITE + "/", **canary_headers}, cookie=cookie)
    assert receipts.verify().count == 3
    receipts.close()
    assert_no_canaries(tmp_path)


def assert_no_canaries(directory: Path) -> None:
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files, "no receipt file written"
    for path in files:  # the database and any -wal/-shm files
        data = path.read_bytes()
        for canary in (CANARY_IP, "198.51.100", CANARY_UA, "canary-ua-7f3a1c", "CANARY", "127.0.0.1"):
            assert canary.encode() not in data, f"{canary!r} leaked into {path.name}"


@pytest.mark.anyio
async def test_a_grant_that_cannot_be_recorded_is_not_stored(receipts: ReceiptLog) -> None:
    gateway = Gateway(make_settings(), receipts)
    receipts.close()  # the disk is gone
    response = await gateway.request("POST", headers=SAME_ORIGIN, json={"categories": {"analytics": True}})
    assert response.status_code == 503
    assert "set-cookie" not in response.headers
    # A refusal needs no proof to be honoured: it is stored anyway.
    response = await gateway.request("POST", headers=SAME_ORIGIN, json={"categories": {"analytics": False}})
    assert response.status_code == 204
    assert (await gateway.state(consent_cookie(response)))["choice_made"] is True


# ------------------------------------------------------------------------------------------------ real server


def uvicorn_app() -> ConsentAPI:
    """Factory for the real-server test (``uvicorn --factory``); settings come from GATEWAY_* variables."""
    settings = load_settings()
    return ConsentAPI(settings, ConsentManager(settings), ReceiptLog(settings.consent.receipts))


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    receipts_dir = tmp_path / "receipts"
    env = {
        "GATEWAY_CONSENT__SECRET_KEYS": json.dumps([KEY]),
        "GATEWAY_CONSENT__RECEIPTS": str(receipts_dir / "consent.sqlite3"),
    }
    args = [
        "uvicorn",
        "--factory",
        "tests.test_consent_api:uvicorn_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--no-proxy-headers",
        "--lifespan",
        "off",
        "--log-level",
        "warning",
    ]
    with run_server(args, port, tmp_path / "uvicorn.log", env=env) as server:
        yield server.url, receipts_dir


@pytest.fixture
async def real_client(real_server: tuple[str, Path]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=real_server[0], timeout=10) as client:
        yield client


@pytest.mark.slow
@pytest.mark.anyio
async def test_consent_flow_through_a_real_uvicorn(
    real_server: tuple[str, Path], real_client: httpx.AsyncClient
) -> None:
    url, receipts_dir = real_server
    canary = {"user-agent": CANARY_UA, "x-forwarded-for": CANARY_IP}

    crossed = await real_client.post(
        CONSENT, json={"categories": {"analytics": True}}, headers={"sec-fetch-site": "cross-site", **canary}
    )
    assert crossed.status_code == 403 and "set-cookie" not in crossed.headers

    accepted = await real_client.post(
        CONSENT, json={"categories": {"analytics": True}}, headers={"origin": url, **canary}
    )
    assert accepted.status_code == 204
    cookie = consent_cookie(accepted)
    real_client.cookies.clear()  # send it explicitly below: Secure cookies and http://127.0.0.1 differ by client

    state = (await real_client.get(CONSENT, headers={"cookie": f"{COOKIE}={cookie}"})).json()
    assert state["choice_made"] is True and state["categories"]["analytics"]["granted"] is True

    form = await real_client.post(
        CONSENT,
        data={"action": "reject_all", "next": "//evil.example/"},
        headers={"origin": url, "cookie": f"{COOKIE}={cookie}", **canary},
    )
    assert form.status_code == 303 and form.headers["location"] == "/"

    big = await real_client.post(
        CONSENT, content=b"{" + b" " * 5000 + b"}", headers={"origin": url, "content-type": "application/json"}
    )
    assert big.status_code == 413

    gpc = await real_client.get("/.well-known/gpc.json")
    assert gpc.json()["gpc"] is True

    # The receipts the server wrote chain correctly and hold nothing about the client.
    log = ReceiptLog(str(receipts_dir / "consent.sqlite3"))
    try:
        assert log.verify().ok and log.verify().count == 2
    finally:
        log.close()
    assert_no_canaries(receipts_dir)
