"""The page-view pixel, in process: where it is injected, what it counts, and what it refuses to count."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway import PrivacyGateway
from gateway.config import ConfigError
from gateway.pixel import GIF
from tests.test_middleware import BROWSER, ORIGIN, Recorder, gateway_for, html_app, make_settings

PIXEL = "/_privacy/p.gif"
PIXEL_TAG = b'<img src="/_privacy/p.gif"'


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def pixel_gateway(recorder: Recorder, status: int = 200, **extra: Any) -> PrivacyGateway:
    settings = make_settings(analytics={"pageviews": "pixel"}, **extra)
    return gateway_for(html_app([], status=status), recorder, settings)


def client(gateway: PrivacyGateway) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gateway, client=("127.0.0.1", 5555))
    return httpx.AsyncClient(transport=transport, base_url=ORIGIN, headers={"user-agent": BROWSER})


async def settle(gateway: PrivacyGateway) -> None:
    assert await gateway.dispatcher.wait_idle(5.0)


@pytest.mark.anyio
async def test_pages_carry_the_pixel_and_are_not_counted_at_the_origin(recorder: Recorder) -> None:
    gateway = pixel_gateway(recorder)
    async with client(gateway) as http:
        page = await http.get("/downloads/")
        assert page.status_code == 200 and PIXEL_TAG in page.content
        assert int(page.headers["content-length"]) == len(page.content)
        await settle(gateway)
    await gateway.shutdown()
    assert recorder.to("plausible.test") == []  # the page itself: no page view (the pixel will count it)


@pytest.mark.anyio
async def test_an_error_page_gets_the_banner_but_no_pixel(recorder: Recorder) -> None:
    gateway = pixel_gateway(recorder, status=404)
    async with client(gateway) as http:
        page = await http.get("/missing")
        assert b"pg-root" in page.content and PIXEL_TAG not in page.content
    await gateway.shutdown()


@pytest.mark.anyio
async def test_the_pixel_counts_the_referring_page(recorder: Recorder) -> None:
    gateway = pixel_gateway(recorder)
    async with client(gateway) as http:
        response = await http.get(
            PIXEL,
            headers={"referer": f"{ORIGIN}/downloads/?utm_source=x&email=a@b.org", "x-forwarded-for": "198.51.100.77",
                     "accept-language": "de-DE,de;q=0.9"},
        )  # fmt: skip
        assert response.status_code == 200 and response.content == GIF
        assert response.headers["content-type"] == "image/gif"
        assert response.headers["cache-control"] == "no-store"
        await settle(gateway)
    await gateway.shutdown()
    [plausible] = recorder.to("plausible.test")
    assert plausible["url"] == f"{ORIGIN}/downloads/?utm_source=x"  # scrubbed like any page view: email= gone
    [request] = [r for r in recorder.requests if r.url.host == "plausible.test"]
    assert request.headers["x-forwarded-for"] == "198.51.100.0"
    assert request.headers["user-agent"] == BROWSER


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no referer"),
        ({"referer": "https://elsewhere.example/page"}, "another site"),
        ({"referer": f"{ORIGIN}/static/app.css"}, "excluded path"),
        ({"referer": f"{ORIGIN}/report.pdf"}, "excluded extension"),
        ({"referer": f"{ORIGIN}/page", "user-agent": "Googlebot/2.1 (+http://www.google.com/bot.html)"}, "a bot"),
        ({"referer": f"{ORIGIN}/page", "sec-purpose": "prefetch"}, "a prefetch"),
        ({"referer": "not a url"}, "garbage"),
        ({"referer": "javascript:alert(1)"}, "not http"),
    ],
)
async def test_what_the_pixel_does_not_count(recorder: Recorder, headers: dict[str, str], why: str) -> None:
    gateway = pixel_gateway(recorder)
    async with client(gateway) as http:
        response = await http.get(PIXEL, headers=headers)
        assert response.status_code == 200 and response.content == GIF  # always an image, counted or not
        await settle(gateway)
    await gateway.shutdown()
    assert recorder.requests == [], why


@pytest.mark.anyio
async def test_methods_and_modes(recorder: Recorder) -> None:
    gateway = pixel_gateway(recorder)
    async with client(gateway) as http:
        assert (await http.post(PIXEL)).status_code == 405
        head = await http.head(PIXEL, headers={"referer": f"{ORIGIN}/page"})
        assert head.status_code == 200 and head.content == b""
        await settle(gateway)
    await gateway.shutdown()
    assert recorder.requests == []  # a HEAD is no view
    server_mode = gateway_for(html_app([]), recorder)
    async with client(server_mode) as http:
        assert (await http.get(PIXEL)).status_code == 404
        assert PIXEL_TAG not in (await http.get("/page")).content
    await server_mode.shutdown()


def test_pixel_mode_needs_the_banner() -> None:
    with pytest.raises(ConfigError, match=r"analytics\.pageviews: 'pixel' needs banner\.enabled"):
        make_settings(analytics={"pageviews": "pixel"}, banner={"enabled": False})


@pytest.mark.anyio
async def test_consented_visitor_gets_the_ga4_id_from_the_pixel(recorder: Recorder) -> None:
    gateway = pixel_gateway(recorder)
    async with client(gateway) as http:
        consent = await http.post(
            "/_privacy/consent", json={"categories": {"analytics": True}}, headers={"sec-fetch-site": "same-origin"}
        )
        cookie = consent.headers["set-cookie"].split(";", 1)[0]
        response = await http.get(PIXEL, headers={"referer": f"{ORIGIN}/page", "cookie": cookie})
        assert response.headers["set-cookie"].startswith("__Host-gw_cid=")
        await settle(gateway)
    await gateway.shutdown()
    [ga4] = [json.loads(r.content) for r in recorder.requests if r.url.host == "ga.test"]
    assert ga4["events"][0]["params"]["page_location"] == f"{ORIGIN}/page"
