"""A site whose pages a CDN may cache (``Cache-Control: public, max-age=300``): the caching-CDN test's upstream."""

from __future__ import annotations

from typing import Any

PAGE = (
    b"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>A cached article</title></head>"
    b"<body><main><h1>A cached article</h1><p>Served from the edge most of the time.</p></main></body></html>"
)


async def cdn_page_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    found = scope["path"] == "/article"
    body = PAGE if found else b"not found"
    headers = [
        (b"content-type", b"text/html; charset=utf-8" if found else b"text/plain"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"public, max-age=300"),
    ]
    await send({"type": "http.response.start", "status": 200 if found else 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})
