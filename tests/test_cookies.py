"""The gateway's cookies: reading one cookie's values, and owning the names it sets (an app cannot set them)."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway import PrivacyGateway
from gateway.cookies import CookieGuard, OwnedCookies, cookie_values
from tests.test_middleware import BROWSER, ORIGIN, Recorder, client_for, gateway_for, make_settings

CONSENT = "__Host-consent"
CLIENT_ID = "__Host-gw_cid"
OWNED = OwnedCookies((CONSENT, CLIENT_ID))

# (Set-Cookie value, the owned name it sets or None)
SET_COOKIE_TABLE = [
    ("__Host-consent=forged; Path=/; Secure", "__Host-consent"),
    ("__Host-consent=; Max-Age=0; Path=/; Secure", "__Host-consent"),  # a deletion is an overwrite too
    ("__Host-consent=", "__Host-consent"),
    ("  __Host-consent =x", "__Host-consent"),  # RFC 6265 §5.2: name and value are trimmed
    ("\t__Host-gw_cid=1.2; Path=/", "__Host-gw_cid"),
    ('__Host-consent="quoted"; Secure', "__Host-consent"),
    ("session=abc; Path=/", None),
    ("__Host-consentx=1", None),
    ("x__Host-consent=1", None),
    ("__host-consent=1", None),  # cookie names are case-sensitive: a different cookie, which ours is not read from
    ("__Host-consent", None),  # no "=": a nameless cookie whose value is this text
    ("a=__Host-consent=1", None),
    ("session=1; __Host-consent=2", None),  # the second pair is an attribute, not a cookie
    ("", None),
]


@pytest.mark.parametrize(("value", "expected"), SET_COOKIE_TABLE)
def test_owns(value: str, expected: str | None) -> None:
    owned = OWNED.owns(value.encode("latin-1"))
    assert (owned.decode() if owned is not None else None) == expected


def start(headers: Any, kind: str = "http.response.start") -> Message:
    return {"type": kind, "status": 200, "headers": headers}


def test_strip_start_keeps_order_and_other_cookies() -> None:
    headers = [
        (b"content-type", b"text/html"),
        (b"set-cookie", b"session=1; Path=/"),
        (b"set-cookie", b"__Host-consent=forged; Path=/; Secure"),
        (b"Set-Cookie", b"__Host-gw_cid=9; Path=/"),  # not ASGI's lower case, still a Set-Cookie
        (b"set-cookie", b"theme=dark"),
        (b"x-other", b"__Host-consent=not-a-cookie-header"),
    ]
    message = start(headers)
    stripped = OWNED.strip_start(message)
    assert stripped["headers"] == [headers[0], headers[1], headers[4], headers[5]]
    assert message["headers"] == headers  # the app's message is not edited in place
    assert stripped["status"] == 200


@pytest.mark.parametrize(
    "message",
    [
        start([(b"content-type", b"text/html"), (b"set-cookie", b"session=1")]),
        start([]),
        {"type": "http.response.body", "body": b"Set-Cookie: __Host-consent=x"},
        start([(b"set-cookie", 42)]),  # garbage is left for the server to judge, never raised on
        start(None),
    ],
    ids=["no-owned", "no-headers", "body", "garbage", "none"],
)
def test_strip_start_leaves_other_messages_alone(message: Message) -> None:
    assert OWNED.strip_start(message) is message


def test_strip_start_reads_an_iterator_once() -> None:
    headers = iter([(b"set-cookie", b"__Host-consent=x"), (b"content-type", b"text/plain")])
    assert OWNED.strip_start(start(headers))["headers"] == [(b"content-type", b"text/plain")]


def test_websocket_accept_is_guarded() -> None:
    message = start([(b"set-cookie", b"__Host-consent=x")], kind="websocket.accept")
    assert OWNED.strip_start(message)["headers"] == []


def test_warnings_are_one_per_name_and_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    owned = OwnedCookies((CONSENT, CLIENT_ID), warn_interval=60.0, clock=lambda: now[0])
    forged = start([(b"set-cookie", b"__Host-consent=SECRET-CONSENT-ID"), (b"set-cookie", b"__Host-gw_cid=7")])
    root = logging.getLogger("gateway")
    propagate = root.propagate  # configure_logging (run by other tests) turns it off; caplog listens at the root
    root.propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.cookies"):
            for _ in range(5):
                owned.strip_start(forged)
            now[0] += 61.0
            owned.strip_start(forged)
    finally:
        root.propagate = propagate
    records = [r for r in caplog.records if r.getMessage() == "response.owned_cookie_removed"]
    fields = [r.gateway_fields for r in records]  # type: ignore[attr-defined]
    assert [f["cookie"] for f in fields] == [CONSENT, CLIENT_ID, CONSENT, CLIENT_ID]
    assert [f["suppressed_since_last_warning"] for f in fields] == [0, 0, 4, 4]
    assert "SECRET-CONSENT-ID" not in caplog.text


@pytest.mark.anyio
async def test_cookie_guard_strips_only_the_start() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    guard = CookieGuard(send, OWNED)
    await guard(start([(b"set-cookie", b"__Host-consent=x"), (b"set-cookie", b"a=1")]))
    await guard({"type": "http.response.body", "body": b"ok"})
    assert sent[0]["headers"] == [(b"set-cookie", b"a=1")]
    assert sent[1] == {"type": "http.response.body", "body": b"ok"}


def test_cookie_values_reads_only_the_named_cookie() -> None:
    header = b'a=1; __Host-consent="v1"; x__Host-consent=no;__Host-consent=v2'
    assert list(cookie_values(header, b"__Host-consent=")) == [b"v1", b"v2"]


# --------------------------------------------------------------------------------------------------------------
# In the middleware: every kind of response an app can send goes through the same rule
# --------------------------------------------------------------------------------------------------------------

PAGE = b"<!doctype html><html><head><title>T</title></head><body><p>hi</p></body></html>"


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


SAME_ORIGIN = {"sec-fetch-site": "same-origin"}
FORGED = [
    (b"set-cookie", b"__Host-consent=forged; Path=/; Secure"),
    (b"set-cookie", b"__Host-consent=; Max-Age=0; Path=/; Secure"),
    (b"set-cookie", b"__Host-gw_cid=forged.1; Path=/; Secure"),
    (b"set-cookie", b"session=kept; Path=/"),
]


def forging_app(status: int, content_type: bytes, body: bytes) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *FORGED]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "content_type", "body", "path"),
    [
        (200, b"text/html; charset=utf-8", PAGE, "/page"),  # page view + banner
        (200, b"application/json", b"{}", "/api/data"),  # neither: the bare path
        (302, b"text/html", b"", "/moved"),  # a redirect with cookies
        (404, b"text/html", PAGE, "/missing"),  # banner, no page view
        (200, b"text/css", b"p{}", "/static/site.css"),  # an excluded path
    ],
    ids=["page", "json", "redirect", "not-found", "asset"],
)
@pytest.mark.parametrize("access_log", [False, True], ids=["no-log", "access-log"])
async def test_app_cannot_set_gateway_cookies(
    recorder: Recorder, status: int, content_type: bytes, body: bytes, path: str, access_log: bool
) -> None:
    settings = make_settings()
    gateway = gateway_for(forging_app(status, content_type, body), recorder, settings)
    if access_log:
        gateway = PrivacyGateway(gateway.app, settings, dispatcher=gateway.dispatcher, access_log=True)
    async with client_for(gateway) as client:
        # A visitor who accepted analytics: the page view also gets the gateway's own new analytics id cookie.
        post = await client.post("/_privacy/consent", json={"categories": {"analytics": True}}, headers=SAME_ORIGIN)
        assert post.status_code == 204
        consent_cookie = post.headers["set-cookie"].split(";", 1)[0]
        response = await client.get(
            path, headers={"cookie": consent_cookie, "user-agent": BROWSER}, follow_redirects=False
        )
        assert response.status_code == status
        set_cookies = response.headers.get_list("set-cookie")
        assert "session=kept; Path=/" in set_cookies
        assert not any("forged" in c or c.startswith("__Host-consent=") for c in set_cookies), set_cookies
        own_ids = [c for c in set_cookies if c.startswith("__Host-gw_cid=")]
        if path == "/page":
            assert len(own_ids) == 1 and "forged" not in own_ids[0]  # the gateway's own id is kept
        else:
            assert own_ids == []
        state = await client.get("/_privacy/consent", headers={"cookie": consent_cookie})
        assert json.loads(state.text)["categories"]["analytics"]["granted"] is True
    await gateway.shutdown()


@pytest.mark.anyio
async def test_endpoints_still_set_the_consent_cookie(recorder: Recorder) -> None:
    gateway = gateway_for(forging_app(200, b"text/html", PAGE), recorder)
    transport = httpx.ASGITransport(app=gateway, client=("198.51.100.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
        response = await client.post(
            "/_privacy/consent", json={"categories": {"analytics": False}}, headers=SAME_ORIGIN
        )
        assert response.headers["set-cookie"].startswith("__Host-consent=")
    await gateway.shutdown()
