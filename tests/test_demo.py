from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import httpx
import pytest

from gateway.demo import demo_site

pytestmark = pytest.mark.anyio

PAGES = {
    "/": "Home · privacy-gateway demo",
    "/about": "About · privacy-gateway demo",
    "/downloads": "Downloads · privacy-gateway demo",
    "/links": "Links · privacy-gateway demo",
    "/search?q=gateway": "Search · privacy-gateway demo",
}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=demo_site()), base_url="http://demo") as client:
        yield client


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.stylesheets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "a" and attributes.get("href"):
            self.hrefs.append(str(attributes["href"]))
        if tag == "link" and attributes.get("rel") == "stylesheet":
            self.stylesheets.append(str(attributes["href"]))


def _title(html: str) -> str:
    match = re.search(r"<title>(.*?)</title>", html, re.S)
    assert match, "page has no <title>"
    return match.group(1)


@pytest.mark.parametrize(("path", "title"), PAGES.items())
async def test_pages(client: httpx.AsyncClient, path: str, title: str) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-length"] == str(len(response.content))
    assert _title(response.text) == title
    assert "demo upstream" in response.text


def test_titles_are_distinct() -> None:
    assert len(set(PAGES.values())) == len(PAGES)


async def test_every_internal_link_resolves(client: httpx.AsyncClient) -> None:
    seen: set[str] = set()
    for path in PAGES:
        parser = _Links()
        parser.feed((await client.get(path)).text)
        for href in parser.hrefs + parser.stylesheets:
            if href.startswith("/") and href not in seen:
                seen.add(href)
                assert (await client.get(href)).status_code == 200, href
    assert {"/static/style.css", "/downloads/sample.txt", "/about", "/links"} <= seen


async def test_links_page_points_to_an_external_site(client: httpx.AsyncClient) -> None:
    parser = _Links()
    parser.feed((await client.get("/links")).text)
    assert any(href.startswith("https://") for href in parser.hrefs)


async def test_download_and_stylesheet(client: httpx.AsyncClient) -> None:
    download = await client.get("/downloads/sample.txt")
    assert download.headers["content-type"] == "text/plain; charset=utf-8"
    assert download.headers["content-disposition"] == 'attachment; filename="sample.txt"'
    assert 0 < len(download.content) < 4096
    downloads_page = (await client.get("/downloads")).text
    assert f"{len(download.content)} bytes" in downloads_page  # the listed size is the real one
    css = await client.get("/static/style.css")
    assert css.headers["content-type"] == "text/css; charset=utf-8"
    assert "font-family" in css.text


@pytest.mark.parametrize("path", ["/nope", "/static/missing.css", "/downloads/../demo.py", "/layout.html"])
async def test_unknown_path_is_404(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404
    assert _title(response.text) == "Page not found · privacy-gateway demo"


@pytest.mark.parametrize(
    "query",
    [
        "<script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "' onmouseover='alert(1)",
        "</mark><script>x</script>",
    ],
)
async def test_search_escapes_the_query(client: httpx.AsyncClient, query: str) -> None:
    response = await client.get("/search", params={"q": query})
    assert response.status_code == 200
    assert f"<mark>{html.escape(query, quote=True)}</mark>" in response.text
    assert "<script" not in response.text
    assert "<img" not in response.text
    assert "onmouseover='" not in response.text


async def test_search_finds_pages(client: httpx.AsyncClient) -> None:
    response = await client.get("/search", params={"q": "Global Privacy Control"})
    assert 'href="/about"' in response.text
    assert "Results for <mark>Global Privacy Control</mark>: 1 page." in response.text
    nothing = await client.get("/search", params={"q": "zzzz-not-there"})
    assert "No page mentions <mark>zzzz-not-there</mark>." in nothing.text
    empty = await client.get("/search")
    assert "Type a word" in empty.text


async def test_search_decodes_utf8_and_caps_length(client: httpx.AsyncClient) -> None:
    response = await client.get("/search", params={"q": "Grüße"})
    assert "<mark>Grüße</mark>" in response.text
    long = await client.get("/search", params={"q": "a" * 5000})
    assert "a" * 200 in long.text and "a" * 201 not in long.text


async def test_head_and_other_methods(client: httpx.AsyncClient) -> None:
    head = await client.head("/about")
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) > 0
    post = await client.post("/search", content=b"q=x")
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"


async def test_lifespan() -> None:
    app = demo_site()
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return messages.pop(0)

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("/downloads/", "/downloads"),
        ("/about/", "/about"),
        ("/downloads/?utm_source=readme", "/downloads?utm_source=readme"),
    ],
)
async def test_trailing_slash_spelling_redirects_to_the_page(
    client: httpx.AsyncClient, path: str, location: str
) -> None:
    """python.org spells its pages with a trailing slash; the demo answers both spellings."""
    moved = await client.get(path)
    assert moved.status_code == 301
    assert moved.headers["location"] == location
    followed = await client.get(path, follow_redirects=True)
    assert followed.status_code == 200 and "<title>" in followed.text


@pytest.mark.parametrize("path", ["/nope/", "/downloads/sample.txt/", "/static/style.css/"])
async def test_other_trailing_slashes_are_not_redirected(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404
    assert "location" not in response.headers


async def test_a_scheme_relative_path_is_no_open_redirect() -> None:
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "//about/", "query_string": b"", "headers": []}
    await demo_site()(scope, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 404
