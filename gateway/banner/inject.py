"""Render the consent banner once at startup and inject it into HTML responses while they stream.

Two pieces of markup go before ``</body>``:

* the **footer** on every HTML page: the stylesheet and script tags and a "Privacy settings" link. Without
  JavaScript the link opens ``{prefix}/settings``; with it the banner opens in place;
* the **banner** only while the visitor has made no valid choice: a plain ``<form>`` that posts to
  ``{prefix}/consent``, so it works without JavaScript, with "Reject all" and "Accept all" as equal buttons.

Both are the same bytes for every visitor of a URL in a given language (no per-visitor data, and no query string,
which may carry personal data), so a shared cache may store them keyed on ``Vary: Cookie`` (banner or not) and,
with several languages, ``Accept-Language``.

Typical use in the middleware::

    banner = Banner(settings)                                  # once, at startup
    language = banner.choose_language(accept_language_header)  # per request, cached
    send = wrap_send(send, banner.snippet(language, scope["path"], not ctx.choice_made), vary=banner.vary)
"""

from __future__ import annotations

import functools
import hashlib
import html
import importlib.resources
import re
import secrets
import string
from collections.abc import Iterable, Sequence
from typing import Any, Final
from urllib.parse import quote

from starlette.types import Message, Receive, Scope, Send

from gateway.banner.texts import BannerTexts, LanguageChooser, resolve_texts
from gateway.caches import remember
from gateway.config import Settings
from gateway.cookies import OwnedCookies
from gateway.pageview import is_html_type

__all__ = ["ASSET_NAMES", "HOLD_LIMIT", "Banner", "BannerInjector", "next_path", "wrap_send"]

ASSET_NAMES: Final = ("banner.css", "banner.js")
ASSET_CACHE_CONTROL: Final = b"public, max-age=86400"
_CONTENT_TYPES: Final = {"banner.css": b"text/css; charset=utf-8", "banner.js": b"text/javascript; charset=utf-8"}

# Bytes after the latest ``</body>`` the injector will hold back while waiting to learn whether it is the last one.
# Real pages end in ``</body></html>`` plus a newline; past this much the candidate is given up (the snippet then
# goes before a later ``</body>`` or at the very end, which browsers still place inside <body>).
HOLD_LIMIT: Final = 1024
# The end tag may carry whitespace or a stray "/" before ">" (HTML tokenizer, "end tag open state").
_BODY_END: Final = re.compile(rb"</body(?=[\t\n\f\r />])", re.IGNORECASE)
_TAG_NAME_END: Final = frozenset(b"\t\n\f\r />")  # the same characters, as byte values
# Enough trailing bytes to finish a "</body" that a chunk boundary split, plus the byte that follows it.
_TAIL: Final = len(b"</body")
_MAX_PATH: Final = 2048
# Sub-delims, ":" and "@" are legal in a path (RFC 3986 §3.3); everything else, including "%", "\" and controls,
# is percent-encoded so the value is a plain relative reference.
_PATH_SAFE: Final = "/!$&'()*+,;=:@-._~"

# Injectable responses: pages a visitor sees. Not 1xx, 3xx (nobody reads a redirect body), 204/205/304 (no body)
# or 206 (a byte range of the original representation).
_NO_INJECT_STATUS: Final = frozenset({204, 205, 206})
# Validators and digests describe the upstream's bytes, which we change. nginx's sub_filter drops them the same
# way (https://nginx.org/en/docs/http/ngx_http_sub_module.html#sub_filter_last_modified). Keeping a validator would
# let a browser revalidate its copy *with* the banner after the visitor chose (Chromium revalidates on a Vary
# mismatch) and be told "304, still fresh". Accept-Ranges goes too: a range of the upstream's bytes would not match
# ours.
_DROPPED_HEADERS: Final = frozenset(
    {b"etag", b"last-modified", b"accept-ranges", b"content-md5", b"digest", b"content-digest", b"repr-digest"}
)


# How _rewrite_start treats each response header (by lower-case name); any other header is kept as it is.
_CONTENT_TYPE, _CONTENT_LENGTH, _CONTENT_ENCODING, _CONTENT_RANGE, _CACHE_CONTROL, _VARY, _DROPPED = range(7)
_START_HEADER_KINDS: Final[dict[bytes, int]] = {
    b"content-type": _CONTENT_TYPE,
    b"content-length": _CONTENT_LENGTH,
    b"content-encoding": _CONTENT_ENCODING,
    b"content-range": _CONTENT_RANGE,
    b"cache-control": _CACHE_CONTROL,
    b"vary": _VARY,
    **dict.fromkeys(_DROPPED_HEADERS, _DROPPED),
}


def _plain_path(path: str) -> str:
    """``path`` (decoded, as in ``scope["path"]``) if it is a usable local path, else ``/``.

    Leading slashes collapse to one: ``//evil.example/`` would be a scheme-relative URL, an open redirect.
    """
    if not path.startswith("/") or len(path) > _MAX_PATH:
        return "/"
    return "/" + path.lstrip("/")


def next_path(path: str) -> str:
    """The decoded ``path`` as a safe, percent-encoded relative reference for ``next`` (never a query string)."""
    return quote(_plain_path(path), safe=_PATH_SAFE)


_safe_next = next_path  # settings_page() has a parameter of the same name


def _encode_path(path: str) -> tuple[bytes, bytes]:
    """The path as a query value for the settings link and as the HTML-escaped ``next`` field, in ASCII bytes.

    The query value carries the *decoded* path (percent-encoded once for the query), so the settings endpoint reads
    back exactly what ``scope["path"]`` held and hands it to :meth:`Banner.settings_page`.
    """
    query = quote(_plain_path(path), safe="/")
    return query.encode("ascii"), html.escape(next_path(path)).encode("ascii")


# Popular pages are asked for again and again; long (often random) paths are not worth memory in the cache.
_encode_short_path = functools.lru_cache(maxsize=4096)(_encode_path)
_CACHED_PATH_LENGTH: Final = 256


def _encoded_path(path: str) -> tuple[bytes, bytes]:
    return _encode_short_path(path) if len(path) <= _CACHED_PATH_LENGTH else _encode_path(path)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _template(name: str) -> string.Template:
    text = importlib.resources.files("gateway.banner").joinpath(name).read_text(encoding="utf-8")
    return string.Template(text.strip("\n"))


class _Asset:
    __slots__ = ("body", "etag", "headers", "not_modified_headers")

    def __init__(self, name: str, body: bytes) -> None:
        self.body = body
        digest = hashlib.sha256(body).hexdigest()[:32]
        self.etag = f'"{digest}"'.encode("ascii")
        self.not_modified_headers = [
            (b"cache-control", ASSET_CACHE_CONTROL),
            (b"etag", self.etag),
            (b"x-content-type-options", b"nosniff"),
        ]
        self.headers = [
            (b"content-type", _CONTENT_TYPES[name]),
            (b"content-length", str(len(body)).encode("ascii")),
            *self.not_modified_headers,
        ]


class _Parts:
    """Pre-rendered bytes of one language, split where the request path goes."""

    __slots__ = ("assets", "banner_after", "banner_before", "footer_after", "footer_before")

    def __init__(self, assets: bytes, banner: tuple[bytes, bytes], footer: tuple[bytes, bytes]) -> None:
        # The stylesheet comes first so the banner is never painted unstyled.
        self.assets = assets
        self.banner_before, self.banner_after = banner
        self.footer_before, self.footer_after = footer

    def banner_parts(self) -> tuple[bytes, bytes]:
        return self.banner_before, self.banner_after

    def footer_parts(self) -> tuple[bytes, bytes]:
        return self.footer_before, self.footer_after


def _split_once(text: str, marker: str) -> tuple[bytes, bytes]:
    before, found, after = text.partition(marker)
    assert found and marker not in after, "the path placeholder must occur exactly once"
    return before.encode("utf-8"), after.encode("utf-8")


class Banner:
    """The banner's markup and assets, rendered and hashed once; every per-request method is a few joins.

    Raises :class:`gateway.config.ConfigError` at construction for a bad ``[banner.texts]`` table, an unknown
    ``banner.default_language`` or an unsafe ``site.privacy_url``.
    """

    def __init__(self, settings: Settings) -> None:
        prefix = settings.prefix.rstrip("/")
        self._texts: dict[str, BannerTexts] = resolve_texts(settings)
        self._privacy_url = settings.site.privacy_url
        self._endpoint = f"{prefix}/consent"
        self._settings_url = f"{prefix}/settings"
        self._banner_template = _template("banner.html")
        self._category_template = _template("category.html")
        self._footer_template = _template("footer.html")
        self._page_template = _template("page.html")

        files = importlib.resources.files("gateway.banner")
        self._assets = {name: _Asset(name, files.joinpath(name).read_bytes()) for name in ASSET_NAMES}
        assets_hash = hashlib.sha256(b"".join(a.body for a in self._assets.values())).hexdigest()
        # ?v= busts browser and CDN caches when a deploy changes the files; the server ignores the query.
        self._css_url = f"{prefix}/banner.css?v={assets_hash[:12]}"
        self._js_url = f"{prefix}/banner.js?v={assets_hash[:12]}"

        self.languages: tuple[str, ...] = tuple(self._texts)
        # analytics.pageviews = "pixel": a same-origin image that counts the page view when the browser loads it,
        # also for pages a CDN serves from its cache. No script, so it counts with JavaScript off.
        pixel = f'<img src="{prefix}/p.gif" alt="" width="1" height="1" style="position:absolute;left:-9999px">\n'
        self.pixel = pixel.encode() if settings.analytics.pageviews == "pixel" else b""
        self.default_language: str = settings.banner.default_language.strip().lower().replace("_", "-")
        self._chooser = LanguageChooser(self.languages, self.default_language)
        # The footer's language follows Accept-Language as soon as there is more than one to choose from.
        self.vary: tuple[bytes, ...] = (b"cookie", b"accept-language") if len(self.languages) > 1 else (b"cookie",)

        css, js = _esc(self._css_url), _esc(self._js_url)
        assets = f'<link rel="stylesheet" href="{css}">\n<script defer src="{js}"></script>\n'
        marker = f"pg-path-{secrets.token_hex(16)}"
        self._parts: dict[str, _Parts] = {}
        version = hashlib.sha256(assets.encode("utf-8"))
        for language, texts in self._texts.items():
            banner = self._render_panel(texts, next_value=marker, granted=frozenset(), standalone=False) + "\n"
            footer = self._render_footer(texts, marker)
            parts = _Parts(assets.encode("utf-8"), _split_once(banner, marker), _split_once(footer, marker))
            self._parts[language] = parts
            # Hash the pieces around the (random) placeholder: every worker must agree on the version.
            version.update(b"\0".join((language.encode(), *parts.banner_parts(), *parts.footer_parts())))
        # Identifies exactly what visitors were shown (markup of every language plus CSS and JS): record it with
        # each consent receipt so a choice can be tied to the banner version it was made on (GDPR Art 7(1)).
        self.version: str = version.hexdigest()

    # ---------------------------------------------------------------------------------------------- per request

    def choose_language(self, accept_language: bytes | None) -> str:
        """One of :attr:`languages`: the visitor's most preferred match, else the default language."""
        return self._chooser.choose(accept_language)

    def snippet(self, language: str, path: str, show_banner: bool) -> bytes:
        """Bytes to insert before ``</body>``: assets + settings link, plus the banner when ``show_banner``.

        ``path`` is ``scope["path"]``; only the path is embedded (percent-encoded), never the query string.
        An unknown language falls back to the default.
        """
        parts = self._parts.get(language) or self._parts[self.default_language]
        # _encoded_path, inlined: this runs on every HTML response.
        query_path, attribute_path = (
            _encode_short_path(path) if len(path) <= _CACHED_PATH_LENGTH else _encode_path(path)
        )
        if not show_banner:
            return b"".join((parts.assets, parts.footer_before, query_path, parts.footer_after))
        return b"".join(
            (
                parts.assets,
                parts.banner_before,
                attribute_path,
                parts.banner_after,
                parts.footer_before,
                query_path,
                parts.footer_after,
            )
        )

    def settings_page(self, language: str, granted: frozenset[str], next_path: str) -> bytes:
        """A complete HTML page with the same form, checkboxes reflecting ``granted`` (for ``{prefix}/settings``).

        ``next_path`` is where the form returns to: the decoded ``next`` query parameter of the settings link
        (a path as in ``scope["path"]``); anything that is not a plain local path becomes ``/``. Serve it with
        ``Cache-Control: no-store``: it shows one visitor's choices.
        """
        texts = self._texts.get(language) or self._texts[self.default_language]
        nxt = _safe_next(next_path)
        panel = self._render_panel(texts, next_value=_esc(nxt), granted=granted, standalone=True)
        page = self._page_template.substitute(
            lang=_esc(texts.language),
            settings_title=_esc(texts["settings_title"]),
            css_url=_esc(self._css_url),
            js_url=_esc(self._js_url),
            panel=panel,
            next=_esc(nxt),
            back=_esc(texts["back"]),
        )
        return page.encode("utf-8") + b"\n"

    async def serve_asset(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        """Answer a request for ``banner.css`` / ``banner.js``: 200 with an ETag, 304 on a matching If-None-Match."""
        asset = self._assets.get(name)
        if asset is None:
            await _plain(send, 404, b"Not Found")
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _plain(send, 405, b"Method Not Allowed", [(b"allow", b"GET, HEAD")])
            return
        if_none_match = _header(scope, b"if-none-match")
        if if_none_match is not None and _etag_matches(if_none_match, asset.etag):
            await send({"type": "http.response.start", "status": 304, "headers": asset.not_modified_headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": asset.headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else asset.body})

    # ------------------------------------------------------------------------------------------------ rendering

    def _render_footer(self, texts: BannerTexts, marker: str) -> str:
        return self._footer_template.substitute(
            lang=_esc(texts.language),
            endpoint=_esc(self._endpoint),
            saved=_esc(texts["saved"]),
            settings_url=f"{_esc(self._settings_url)}?next={marker}",
            settings_link=_esc(texts["settings_link"]),
        )

    def _render_panel(self, texts: BannerTexts, *, next_value: str, granted: frozenset[str], standalone: bool) -> str:
        categories = []
        for category in texts.categories:
            name = _esc(category.name)
            description = ""
            described_by = ""
            if category.description:
                description_id = f"pg-category-{name}-description"
                description = (
                    f'<p class="pg-category-description" id="{description_id}">{_esc(category.description)}</p>\n'
                )
                described_by = f' aria-describedby="{description_id}"'
            categories.append(
                self._category_template.substitute(
                    name=name,
                    label=_esc(category.label),
                    description=description,
                    describedby=described_by,
                    # Deny by default: nothing is pre-ticked unless this visitor granted it before.
                    checked=" checked" if category.name in granted else "",
                )
            )
        return self._banner_template.substitute(
            classes="pg-banner pg-banner-page" if standalone else "pg-banner",
            lang=_esc(texts.language),
            # A standalone page is the whole document, not a dialog over one; the script turns a fetched panel
            # back into a non-modal dialog when it opens it in place.
            role="region" if standalone else "dialog",
            modal="" if standalone else ' aria-modal="false"',
            standalone=" data-pg-standalone" if standalone else "",
            heading="h1" if standalone else "h2",
            title=_esc(texts["settings_title"] if standalone else texts["title"]),
            body=_esc(texts["body"]),
            privacy_url=_esc(self._privacy_url),
            privacy_link=_esc(texts["privacy_link"]),
            endpoint=_esc(self._endpoint),
            next=next_value,
            reject_all=_esc(texts["reject_all"]),
            accept_all=_esc(texts["accept_all"]),
            details_open=" open" if standalone else "",
            settings=_esc(texts["settings"]),
            categories_legend=_esc(texts["categories_legend"]),
            categories="\n".join(categories),
            save=_esc(texts["save"]),
            close=_esc(texts["close"]),
        )


# ------------------------------------------------------------------------------------------------- ASGI helpers


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    # If-None-Match uses the weak comparison: W/"x" matches "x" (RFC 9110 §13.1.2).
    for candidate in if_none_match.split(b","):
        candidate = candidate.strip()
        if candidate == b"*":
            return True
        if candidate.removeprefix(b"W/") == etag:
            return True
    return False


async def _plain(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------------- injection


def wrap_send(
    send: Send, snippet: bytes, *, vary: tuple[bytes, ...] = (b"cookie",), owned: OwnedCookies | None = None
) -> Send:
    """Wrap ``send`` so an HTML response gets ``snippet`` inserted before its last ``</body>`` while streaming.

    Injected only into ``text/html`` responses with a body a visitor sees (2xx except 204/205/206, 4xx, 5xx), no
    ``Content-Encoding`` other than identity, no ``Content-Range`` and no ``Cache-Control: no-transform``
    (RFC 9111 §5.2.2.6). Compressed bodies are passed through byte for byte: decompressing and recompressing
    every page would cost CPU on the hot path and hide the final length, and the CDN in front compresses anyway;
    ask the upstream for identity-encoded HTML if the banner must appear there.

    The body is never buffered whole. After the latest ``</body>`` seen so far, at most :data:`HOLD_LIMIT` bytes
    are held back in case another ``</body>`` follows (then that one wins); otherwise only the last 6 bytes are
    held, in case a chunk boundary splits the tag. With no ``</body>`` at all the snippet is appended. Either way
    exactly ``len(snippet)`` bytes are added, so a ``Content-Length`` is rewritten up front (and stays absent when
    it was absent). ``Vary`` is merged with ``vary``; validators (ETag, Last-Modified) and ``Accept-Ranges`` are
    dropped because the bytes are no longer the upstream's.

    ``owned``: the gateway's cookie names; a Set-Cookie for one of them is removed from the response start.

    Nothing in here raises: a response it does not understand is passed on unchanged. Errors raised by the
    wrapped ``send`` itself (a client that went away) propagate as usual.
    """
    return BannerInjector(send, snippet, vary, owned)


# States of BannerInjector.
_WAITING_FOR_START: Final = 0
_HOLDING_START: Final = 1  # an injectable start, sent only once the first body message shows how the body comes
_STREAMING: Final = 2
_PASSING: Final = 3


class BannerInjector:
    """The ``send`` that :func:`wrap_send` returns.

    The middleware subclasses it to watch the same messages for a page view in the same call (one await layer per
    message instead of one per concern): set :attr:`_observes` and override :meth:`_observe`, which sees every
    message the app sends before the injector does and may return a replacement, and :meth:`_begin`, which decides
    about the first message.
    """

    __slots__ = (
        "_anchored", "_held", "_original_start", "_owned", "_pixel", "_send", "_snippet", "_start", "_state", "_vary",
    )  # fmt: skip

    _observes = False  # class-level switch: skip the _observe call entirely in the plain injector

    def __init__(
        self,
        send: Send,
        snippet: bytes,
        vary: tuple[bytes, ...],
        owned: OwnedCookies | None = None,
        pixel: bytes = b"",
    ) -> None:
        self._send = send
        self._snippet = snippet
        self._vary = vary
        self._owned = owned
        self._pixel = pixel
        self._state = _WAITING_FOR_START
        self._start: Message | None = None
        self._original_start: Message | None = None
        self._held = b""  # bytes not yet sent: a short tail, or everything from the latest "</body"
        self._anchored = False  # self._held starts with a "</body" the snippet will go before

    def _observe(self, message: Message) -> Message:
        return message

    def _begin(self, message: Message) -> Message | None:
        """For the first message: the start to hold back (rewritten for injection), or None to pass all through."""
        if self._pixel and message.get("status") == 200:
            # The page-view pixel goes only into pages that count (200); an error page gets the banner alone.
            self._snippet += self._pixel
        return _rewrite_start(message, len(self._snippet), self._vary)

    async def __call__(self, message: Message) -> None:
        state = self._state
        if state == _WAITING_FOR_START and self._owned is not None:
            # Before _observe, which may add the gateway's own Set-Cookie (a new analytics id) to this message.
            message = self._owned.strip_start(message)
        if self._observes:
            message = self._observe(message)
        if state == _PASSING:
            await self._send(message)
            return
        if state == _WAITING_FOR_START:
            start = self._begin(message)
            if start is None:
                self._state = _PASSING
                await self._send(message)
                return
            self._state = _HOLDING_START
            self._start, self._original_start = start, message
            return
        is_body = message.get("type") == "http.response.body"
        if state == _HOLDING_START:
            if not is_body:
                # http.response.pathsend / zerocopysend: the server sends a file itself, which we cannot edit
                # and whose length the original headers describe.
                self._state = _PASSING
                assert self._original_start is not None
                await self._send(self._original_start)
                await self._send(message)
                return
            self._state = _STREAMING
            start, self._start, self._original_start = self._start, None, None
            assert start is not None
            await self._send(start)
        # Streaming the body (inline rather than a helper coroutine: one await layer less per message).
        if not is_body:
            await self._send(message)  # e.g. http.response.trailers after the body
            return
        try:
            chunk = message.get("body", b"")
            if type(chunk) is not bytes:
                if not isinstance(chunk, bytes | bytearray | memoryview):
                    raise TypeError("body is not bytes")  # bytes(42) would be 42 NUL bytes
                chunk = bytes(chunk)
            more = bool(message.get("more_body", False))
            out = self._feed(chunk, more)
        except Exception:
            # A body we cannot read as bytes: stop editing, flush what we hold, pass the rest on as it is.
            self._state = _PASSING
            held, self._held = self._held, b""
            if held:
                await self._send({"type": "http.response.body", "body": held, "more_body": True})
            await self._send(message)
            return
        if not more:
            self._state = _PASSING
        if out or not more:
            await self._send({"type": "http.response.body", "body": out, "more_body": more})

    def _feed(self, chunk: bytes, more: bool) -> bytes:
        data = self._held + chunk if self._held else chunk
        size = len(data)
        last = _last_body_end(data, size - HOLD_LIMIT if size > HOLD_LIMIT else 0)
        if more:
            if last >= 0 and size - last <= HOLD_LIMIT:
                out, self._held, self._anchored = data[:last], data[last:], True
            else:
                cut = size - _TAIL if size > _TAIL else 0
                out, self._held, self._anchored = data[:cut], data[cut:], False
            return out
        # The last chunk: nothing more to hold, so splice the snippet in with a single copy.
        self._held, self._anchored = b"", False
        if last >= 0 and size - last <= HOLD_LIMIT:
            view = memoryview(data)  # slices of a view are not copies: the page is copied once, into the result
            return b"".join((view[:last], self._snippet, view[last:]))
        return data + self._snippet


def _last_body_end(data: bytes, start: int) -> int:
    """Where the last ``</body`` end tag at or after ``start`` begins, or -1.

    Only a "</body" starting within the last HOLD_LIMIT bytes can become the anchor (an earlier one is outside the
    hold window whatever follows), so the caller passes that window and this stays O(1) per chunk. Pages end in a
    lower-case ``</body>`` a few bytes from the end: found with one backward byte search, and confirmed to be the
    last one (no other spelling after it) by a regex over the short tail; anything else is one pass of the regex.
    """
    candidate = data.rfind(b"</body", start)
    if (
        candidate >= 0
        and candidate + _TAIL < len(data)
        and data[candidate + _TAIL] in _TAG_NAME_END
        and _BODY_END.search(data, candidate + 1) is None
    ):
        return candidate
    last = -1
    for match in _BODY_END.finditer(data, start):
        last = match.start()
    return last


def _header_kind(name: bytes) -> int | None:
    """The _START_HEADER_KINDS entry for a header name that is not plain bytes.

    A name whose lower-case form is not hashable (a bytearray) raises TypeError, so the response is passed through
    unchanged, as it always has been; other names (str: not ASGI either) are compared and never match.
    """
    lname = name.lower()
    hash(lname)
    for known, kind in _START_HEADER_KINDS.items():
        if lname == known:
            return kind
    return None


def _merge_vary(values: Sequence[bytes], wanted: Iterable[bytes]) -> bytes | None:
    """One Vary value holding the existing tokens plus the wanted ones; None when nothing needs to change."""
    if not values:  # the usual case, no Vary header yet: just the wanted tokens
        return b", ".join(wanted) or None
    tokens = [t.strip() for value in values for t in value.split(b",") if t.strip()]
    present = {t.lower() for t in tokens}
    if b"*" in present:
        return None  # already varies on everything
    missing = [w for w in wanted if w.lower() not in present]
    if not missing:
        return None
    return b", ".join(tokens + missing)


# Response starts seen before -> their rewritten header list (None: not injectable). An app sends the same few header
# sets again and again (a page's type and length), so most responses cost one lookup here instead of a walk over
# their headers. Bounded: responses with ever-changing headers (dates, ETags, per-request cookies) just miss.
_REWRITE_CACHE_SIZE: Final = 512
_rewritten_headers: dict[tuple[object, ...], list[tuple[bytes, bytes]] | None] = {}


def _rewrite_start(message: Message, added: int, vary: tuple[bytes, ...]) -> Message | None:
    """The start message with fixed-up headers when the response is to be injected, else None.

    Anything unexpected (odd types, malformed headers) leaves the response alone: every exception means None.
    """
    headers = message.get("headers", ())
    if type(headers) is list or type(headers) is tuple:
        try:
            key: tuple[object, ...] | None = (message.get("type"), message.get("status"), added, vary, *headers)
            cached = _rewritten_headers.get(key)  # type: ignore[arg-type]  # unhashable headers: TypeError
        except TypeError:
            key = cached = None
        if cached is not None:
            rewritten: dict[str, Any] = dict(message)
            rewritten["headers"] = list(cached)  # a copy: whoever sends it on may change its list
            return rewritten
        if key is not None and key in _rewritten_headers:
            return None
    else:
        key = None
    result = _rewrite_start_uncached(message, added, vary)
    if key is not None:
        remember(_rewritten_headers, key, None if result is None else list(result["headers"]), _REWRITE_CACHE_SIZE)
    return result


def _rewrite_start_uncached(message: Message, added: int, vary: tuple[bytes, ...]) -> Message | None:
    try:
        if message.get("type") != "http.response.start" or not added:
            return None
        status = message.get("status")
        if (
            not isinstance(status, int)
            or not (200 <= status < 300 or 400 <= status < 600)
            or status in _NO_INJECT_STATUS
        ):
            return None
        # One pass: decide and build the new header list together (an iterable per the ASGI spec, walked once). Any
        # header that rules injection out returns None at once, before the rest is looked at.
        kinds = _START_HEADER_KINDS
        new_headers: list[tuple[bytes, bytes]] = []
        content_type: bytes | None = None
        has_length = False
        vary_values: list[bytes] | None = None
        for name, value in message.get("headers", ()):
            if type(name) is bytes:
                kind = kinds.get(name)
                if kind is None and not name.islower():  # ASGI names are lower case; accept others all the same
                    kind = kinds.get(name.lower())
            else:
                kind = _header_kind(name)
            if kind is None:
                new_headers.append((name, value))
            elif kind == _CONTENT_TYPE:
                if content_type is not None or not is_html_type(value):
                    return None
                content_type = value
                new_headers.append((name, value))
            elif kind == _CONTENT_LENGTH:
                text = value.strip()
                if has_length or not text.isdigit():
                    return None  # duplicate or garbage: the server will complain about it, not us
                has_length = True
                new_headers.append((name, b"%d" % (int(text) + added)))
            elif kind == _CONTENT_ENCODING:
                if value.strip().lower() not in (b"", b"identity"):
                    return None
                new_headers.append((name, value))
            elif kind == _CONTENT_RANGE:
                return None
            elif kind == _CACHE_CONTROL:
                if b"no-transform" in value.lower():
                    return None
                new_headers.append((name, value))
            elif kind == _VARY:
                if vary_values is None:
                    vary_values = []
                vary_values.append(value)
                new_headers.append((name, value))
            # else _DROPPED: validators and digests describe the upstream's bytes
        if content_type is None:
            return None

        merged_vary = _merge_vary(vary_values or (), vary)
        if merged_vary is not None:
            if vary_values is not None:
                new_headers = [header for header in new_headers if header[0].lower() != b"vary"]
            new_headers.append((b"vary", merged_vary))
        rewritten: dict[str, Any] = dict(message)
        rewritten["headers"] = new_headers
        return rewritten
    except Exception:
        return None
