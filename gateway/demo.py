"""The zero-config demo's upstream: a tiny static website standing in for the real site behind the gateway.

Pages are package data in ``gateway/demo_site/`` (content fragments inside one ``layout.html``), rendered once at
construction. The only dynamic page is ``/search?q=...``, which echoes the query HTML-escaped: it is the demo of
user input in a URL, so it must not also be a demo of cross-site scripting.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from importlib import resources
from string import Template
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["answer_lifespan", "demo_site"]

# path -> (fragment file, <title>)
_PAGES = {
    "/": ("index.html", "Home"),
    "/about": ("about.html", "About"),
    "/downloads": ("downloads.html", "Downloads"),
    "/links": ("links.html", "Links"),
}
_DOWNLOAD_PATH = "/downloads/sample.txt"
_STYLESHEET_PATH = "/static/style.css"
_MAX_QUERY_CHARS = 200  # longer queries are cut before they are echoed or searched
_TAG = re.compile(r"<[^>]+>")
_HTML = b"text/html; charset=utf-8"


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """The ASGI lifespan protocol for an app with nothing to start or stop: acknowledge both, return at shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass(frozen=True, slots=True)
class _Resource:
    status: int
    content_type: bytes
    body: bytes
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()


def _read(name: str) -> bytes:
    return (resources.files("gateway") / "demo_site" / name).read_bytes()


class _DemoSite:
    """Raw ASGI app serving the demo pages; GET and HEAD only."""

    def __init__(self) -> None:
        self._layout = Template(_read("layout.html").decode("utf-8"))
        download = _read("files/sample.txt")
        self._resources: dict[str, _Resource] = {}
        # Plain text of each page, for the search.
        self._texts: list[tuple[str, str, str]] = []
        for path, (name, title) in _PAGES.items():
            fragment = Template(_read(name).decode("utf-8")).safe_substitute(size=str(len(download)))
            self._resources[path] = _Resource(200, _HTML, self._render(title, fragment))
            self._texts.append((path, title, " ".join(_TAG.sub(" ", fragment).split())))
        self._resources[_STYLESHEET_PATH] = _Resource(
            200, b"text/css; charset=utf-8", _read("style.css"), ((b"cache-control", b"public, max-age=3600"),)
        )
        self._resources[_DOWNLOAD_PATH] = _Resource(
            200,
            b"text/plain; charset=utf-8",
            download,
            ((b"content-disposition", b'attachment; filename="sample.txt"'),),
        )
        self._search = Template(_read("search.html").decode("utf-8"))
        self._not_found = _Resource(404, _HTML, self._render("Page not found", _read("not_found.html").decode()))

    def _render(self, title: str, content: str) -> bytes:
        return self._layout.substitute(title=html.escape(title), content=content).encode("utf-8")

    def _search_page(self, query_string: bytes) -> _Resource:
        query = ""
        for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, encoding="latin-1"):
            if name == "q":
                # Parsed as latin-1 so every byte survives; the bytes are UTF-8, as browsers send them.
                query = value.encode("latin-1").decode("utf-8", "replace").strip()[:_MAX_QUERY_CHARS]
                break
        if not query:
            results = "<p>Type a word in the search box to search the demo pages.</p>"
        else:
            needle = query.casefold()
            hits = [(path, title) for path, title, text in self._texts if needle in text.casefold()]
            shown = html.escape(query, quote=True)
            if hits:
                items = "".join(f'<li><a href="{path}">{html.escape(title)}</a></li>' for path, title in hits)
                count = "1 page" if len(hits) == 1 else f"{len(hits)} pages"
                results = f"<p>Results for <mark>{shown}</mark>: {count}.</p>\n<ul>{items}</ul>"
            else:
                results = f"<p>No page mentions <mark>{shown}</mark>.</p>"
        return _Resource(200, _HTML, self._render("Search", self._search.substitute(results=results)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await self._send(send, _Resource(405, b"text/plain; charset=utf-8", b"Method Not Allowed\n",
                                             ((b"allow", b"GET, HEAD"),)), head=False)  # fmt: skip
            return
        path = scope["path"]
        if path == "/search":
            resource = self._search_page(scope["query_string"])
        elif path not in self._resources and path.endswith("/") and path.rstrip("/") in _PAGES:
            # "/downloads/" is how python.org spells its pages: send it to the demo's own spelling, query kept.
            query = scope["query_string"]
            location = path.rstrip("/").encode("ascii") + (b"?" + query if query else b"")
            resource = _Resource(301, b"text/plain; charset=utf-8", b"Moved Permanently\n", ((b"location", location),))
        else:
            resource = self._resources.get(path, self._not_found)
        await self._send(send, resource, head=method == "HEAD")

    @staticmethod
    async def _send(send: Send, resource: _Resource, *, head: bool) -> None:
        headers = [
            (b"content-type", resource.content_type),
            (b"content-length", str(len(resource.body)).encode("ascii")),
            (b"x-content-type-options", b"nosniff"),
            *resource.extra_headers,
        ]
        await send({"type": "http.response.start", "status": resource.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else resource.body})


def demo_site() -> ASGIApp:
    """The demo upstream website as an ASGI app."""
    return _DemoSite()
