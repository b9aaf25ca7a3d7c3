"""A small HTML site wrapped in the gateway, for the real-browser test (``uvicorn --factory tests.apps.site:app``).

The configuration file is named by ``SITE_GATEWAY_CONFIG``. Every page carries a strict Content-Security-Policy
(no inline script or style anywhere), so the browser test also proves that the injected banner works under one.
"""

from __future__ import annotations

import html
import os
from typing import Final

from starlette.types import Receive, Scope, Send

from gateway import PrivacyGateway, load_settings
from gateway.demo import answer_lifespan

__all__ = ["CSP", "PAGES", "app", "site_app"]

# What a careful site sends; the banner must need nothing more (security.md: no inline code or styles).
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'"
)

# path -> (title, heading, paragraphs)
PAGES: Final[dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "/": (
        "Example Project",
        "Build things that last.",
        (
            "Example Project is a friendly, open-source toolkit for building reliable web services. "
            "It is free to use, easy to learn and maintained by a community of volunteers.",
            "Read the guide to get started, browse the downloads for the latest release, or join the community "
            "to ask questions and help others.",
        ),
    ),
    "/downloads/": (
        "Downloads | Example Project",
        "Download the latest release",
        (
            "Release 3.2.1 is the newest stable version. Source archives and installers for every platform are "
            "signed and listed with their checksums.",
        ),
    ),
    "/privacy/": (
        "Privacy notice | Example Project",
        "Privacy notice",
        ("This site counts page views without cookies. Optional analytics run only after you accept them.",),
    ),
}

STYLESHEET: Final = b"""\
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f7f8fa; color: #1f2328; font: 400 1.0625rem/1.6 system-ui, sans-serif; }
.site-header { background: #1d4f7c; color: #fff; }
.site-header .wrap { display: flex; flex-wrap: wrap; gap: 0.5rem 1.5rem; align-items: center;
  justify-content: space-between; padding: 1rem 1.5rem; }
.site-logo { display: flex; align-items: center; gap: 0.6rem; color: #fff; font-weight: 700; font-size: 1.25rem;
  text-decoration: none; }
.site-logo img { width: 2rem; height: 2rem; }
.site-nav { display: flex; flex-wrap: wrap; gap: 0.25rem 1.5rem; }
.site-nav a { color: #e3eef8; text-decoration: none; font-weight: 600; }
.wrap { max-width: 62rem; margin: 0 auto; }
.hero { background: linear-gradient(135deg, #e8f1f9, #f7f8fa); border-bottom: 1px solid #dde3ea; }
.hero .wrap { padding: 4rem 1.5rem 4.5rem; }
.hero h1 { margin: 0 0 0.75rem; font-size: 2.5rem; line-height: 1.15; color: #16191d; }
.hero p { max-width: 40rem; margin: 0 0 1rem; color: #3f4752; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr)); gap: 1rem; padding: 2rem 1.5rem; }
.card { background: #fff; border: 1px solid #dde3ea; border-radius: 0.5rem; padding: 1.25rem; }
.card h2 { margin: 0 0 0.5rem; font-size: 1.125rem; }
.card p { margin: 0; color: #3f4752; font-size: 0.95rem; }
.site-footer { border-top: 1px solid #dde3ea; color: #57606a; font-size: 0.9rem; }
.site-footer .wrap { padding: 1.5rem; }
"""

FAVICON: Final = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    b'<rect width="32" height="32" rx="7" fill="#ffd43b"/>'
    b'<path d="M9 22V10h8a4 4 0 0 1 0 8h-4v4z" fill="#1d4f7c"/></svg>'
)

CARDS: Final = (
    ("Guide", "Step-by-step introduction, from installation to your first deployment."),
    ("Downloads", "Stable releases and installers for Linux, macOS and Windows."),
    ("Community", "Mailing lists, forums and meetups where people help each other."),
)


def render_page(path: str) -> tuple[int, bytes]:
    status = 200
    page = PAGES.get(path)
    if page is None:
        status = 404
        page = ("Not found | Example Project", "Page not found", ("There is nothing at this address.",))
    title, heading, paragraphs = page
    esc = html.escape
    text = "\n".join(f"<p>{esc(p)}</p>" for p in paragraphs)
    cards = "\n".join(
        f'<section class="card"><h2>{esc(name)}</h2><p>{esc(blurb)}</p></section>' for name, blurb in CARDS
    )
    body = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/site.css">
</head>
<body>
<header class="site-header"><div class="wrap">
<a class="site-logo" href="/"><img src="/static/favicon.svg" alt="">Example Project</a>
<nav class="site-nav" aria-label="Main"><a href="/">Home</a><a href="/downloads/">Downloads</a>
<a href="/privacy/">Privacy</a></nav>
</div></header>
<main>
<div class="hero"><div class="wrap">
<h1>{esc(heading)}</h1>
{text}
</div></div>
<div class="wrap cards">
{cards}
</div>
</main>
<footer class="site-footer"><div class="wrap">&copy; Example Project contributors.</div></footer>
</body>
</html>
"""
    return status, body.encode("utf-8")


STATIC: Final = {
    "/static/site.css": (b"text/css; charset=utf-8", STYLESHEET),
    "/static/favicon.svg": (b"image/svg+xml", FAVICON),
    # Browsers ask for /favicon.ico on pages without an icon link, such as the gateway's own settings page.
    "/favicon.ico": (b"image/svg+xml", FAVICON),
}


async def site_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    if scope["method"] not in ("GET", "HEAD"):
        status, content_type, body = 405, b"text/plain; charset=utf-8", b"Method Not Allowed\n"
    elif path in STATIC:
        status = 200
        content_type, body = STATIC[path]
    else:
        status, body = render_page(path)
        content_type = b"text/html; charset=utf-8"
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"content-security-policy", CSP.encode("ascii")),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def app() -> PrivacyGateway:
    return PrivacyGateway(site_app, load_settings(os.environ["SITE_GATEWAY_CONFIG"]))
