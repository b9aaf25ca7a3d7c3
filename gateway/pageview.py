"""Server-side page views: which requests count, the page title, the visitor's language and the page URL.

A page view is counted without any JavaScript when a ``GET`` is answered ``200`` with ``text/html``, the user agent
is not a bot, the request is not a speculative prefetch, and the path is neither excluded in
``[analytics]`` nor one of the gateway's own endpoints. The middleware asks :meth:`PageviewDetector.request_counts`
on every request (cheap, before the app runs; :meth:`~PageviewDetector.request_may_count` is the same question asked
of a whole scope) and :meth:`PageviewDetector.response_counts` on the response start, then takes the title from the
first body chunk with :func:`quick_title`, or feeds the body to a :class:`TitleSniffer` while it streams through.

Bots are recognised with the maintained ``crawlerdetect`` patterns. Its stock matcher is quadratic in the length of
runs of word characters (one pattern starts with ``[a-z0-9\\-_]*``: 512 ``x`` take ~26 ms, 8,000 take 5 s), which a
visitor controls, so :func:`is_bot` compiles the same patterns in linear form, never classifies more than
:data:`MAX_USER_AGENT_CHARS` characters, and caches verdicts per user-agent string in a bounded dict.
"""

from __future__ import annotations

import codecs
import functools
import html
import ipaddress
import re
import string
from collections.abc import Iterable
from urllib.parse import quote, urlsplit

from starlette.types import Scope

from gateway.caches import remember
from gateway.config import Settings
from gateway.events import Event, PageRequest

__all__ = [
    "MAX_USER_AGENT_CHARS",
    "PREFETCH_HEADERS",
    "TITLE_MAX_CHARS",
    "TITLE_SCAN_BYTES",
    "PageviewDetector",
    "TitleSniffer",
    "is_bot",
    "is_html_type",
    "is_prefetch",
    "page_url",
    "page_url_for_host",
    "primary_language",
    "primary_language_of",
    "quick_title",
    "request_host",
    "request_hostname",
]

# Real browser user agents are 100–400 characters (in-app browsers are the long ones). Anything longer is not a
# browser we want to count, and classifying it would cost milliseconds of event-loop time per unique value.
MAX_USER_AGENT_CHARS = 512
BOT_CACHE_SIZE = 4096

TITLE_SCAN_BYTES = 32 * 1024  # only the first 32 KiB of a body are looked at
TITLE_MAX_CHARS = 300
# Raw bytes kept between <title> and </title>; generous for entities (&amp; is 5 bytes for 1 character).
_TITLE_RAW_BYTES = 4096

# Speculative loads are not views: Chromium sends "Sec-Purpose: prefetch" (also "prefetch;prerender",
# "prefetch;anonymous-client-ip", https://wicg.github.io/nav-speculation/prefetch.html#sec-purpose-header), older
# Chrome "Purpose: prefetch", Firefox "X-Moz: prefetch" (https://developer.mozilla.org/docs/Glossary/Prefetch) and
# Safari "X-Purpose: preview" for Top Sites thumbnails.
PREFETCH_HEADERS = frozenset((b"sec-purpose", b"purpose", b"x-moz", b"x-purpose"))
_PREFETCH_VALUES = (b"prefetch", b"preview")

# What frameworks send for pages (Starlette, Django, Flask, nginx), recognised without parsing.
_COMMON_HTML_TYPES = frozenset((b"text/html", b"text/html; charset=utf-8", b"text/html; charset=UTF-8"))


def is_html_type(content_type: bytes) -> bool:
    """Is this Content-Type value ``text/html`` (any parameters, any case)?"""
    if type(content_type) is bytes and content_type in _COMMON_HTML_TYPES:
        return True
    return content_type.split(b";", 1)[0].strip().lower() == b"text/html"


# --------------------------------------------------------------------------------------------------------------
# Bots
# --------------------------------------------------------------------------------------------------------------

# A leading "[...]*" or "[...]?" can match the empty string, so in an unanchored search it never changes WHETHER a
# pattern matches, only where the match starts; dropping it turns the one quadratic crawlerdetect pattern linear.
_LEADING_OPTIONAL_CLASS = re.compile(r"^\[(?:\\.|[^\]\\])*\][*?]")


@functools.cache
def _classifier() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """crawlerdetect's (exclusions, crawlers) regexes, compiled once, in the same shape as its own matcher."""
    from crawlerdetect.providers.crawlers import data as crawler_patterns
    from crawlerdetect.providers.exclusions import data as exclusion_patterns

    linear = []
    for pattern in crawler_patterns:
        stripped = _LEADING_OPTIONAL_CLASS.sub("", pattern, count=1)
        linear.append(stripped or pattern)
    exclusions = re.compile(f"({'|'.join(exclusion_patterns)})", re.IGNORECASE)
    crawlers = re.compile(f"({'|'.join(linear)})", re.IGNORECASE)
    return exclusions, crawlers


def _classify(user_agent: str) -> bool:
    # Same steps as crawlerdetect.CrawlerDetect._check_crawler: strip known-harmless tokens, then search.
    exclusions, crawlers = _classifier()
    remainder = exclusions.sub("", user_agent)
    return bool(remainder) and crawlers.search(remainder) is not None


_bot_cache: dict[str, bool] = {}


def is_bot(user_agent: str) -> bool:
    """True for crawlers, scripts and monitors (crawlerdetect), for an empty user agent and for an absurdly long one."""
    verdict = _bot_cache.get(user_agent)
    if verdict is not None:
        return verdict
    stripped = user_agent.strip()
    verdict = not stripped or len(stripped) > MAX_USER_AGENT_CHARS or _classify(stripped)
    if len(user_agent) <= MAX_USER_AGENT_CHARS * 2:  # don't let huge keys sit in the cache
        remember(_bot_cache, user_agent, verdict, BOT_CACHE_SIZE)
    return verdict


# --------------------------------------------------------------------------------------------------------------
# Which requests and responses are page views
# --------------------------------------------------------------------------------------------------------------


def is_prefetch(value: bytes) -> bool:
    """Does the value of one of :data:`PREFETCH_HEADERS` mark the request as a speculative load?"""
    return value[:8].lower().startswith(_PREFETCH_VALUES)


class PageviewDetector:
    """Decides, cheaply, whether a request/response pair is a server-side page view."""

    __slots__ = ("_enabled", "_excluded_exact", "_excluded_extensions", "_excluded_prefixes")

    def __init__(self, settings: Settings) -> None:
        analytics = settings.analytics
        self._enabled = analytics.pageviews == "server"
        # The gateway's own endpoints and the beacon are never page views, whatever the exclusions say.
        own = tuple(p.rstrip("/") or "/" for p in (settings.prefix, analytics.beacon_path))
        self._excluded_exact = frozenset(own)
        self._excluded_prefixes = tuple(analytics.exclude_paths) + tuple(f"{p}/" for p in own if p != "/")
        self._excluded_extensions = frozenset(ext.lower() for ext in analytics.exclude_extensions)
        # Compile the bot patterns now, at startup: lazily, the first visitor's request waited ~30-100 ms for it.
        _classifier()

    def request_may_count(self, scope: Scope) -> bool:
        """Could this request become a page view? Cheap: no parsing beyond one look at each header name.

        The middleware, which has read the headers already, asks :meth:`request_counts` instead.
        """
        if scope.get("method") != "GET" or not self._enabled:
            return False
        user_agent = b""
        headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
        for name, value in headers:
            if name == b"user-agent":
                user_agent = value
            elif name in PREFETCH_HEADERS and is_prefetch(value):
                return False
        return self.request_counts("GET", scope.get("path", ""), user_agent.decode("latin-1"), prefetch=False)

    def request_counts(self, method: str, path: str, user_agent: str, *, prefetch: bool) -> bool:
        """:meth:`request_may_count` for a request whose headers the caller has already read.

        ``user_agent`` is the (last) User-Agent value decoded as latin-1, "" when absent; ``prefetch`` is whether
        any of :data:`PREFETCH_HEADERS` said :func:`is_prefetch`. The middleware reads every header it needs in one
        pass and asks this, so the header list is not walked again.
        """
        if method != "GET" or not self._enabled:
            return False
        return self.path_counts(path, user_agent, prefetch=prefetch)

    def path_counts(self, path: str, user_agent: str, *, prefetch: bool) -> bool:
        """The page-view rules on their own, whatever ``analytics.pageviews`` is: not a prefetch, not an excluded
        path or extension, not a bot. The pixel applies them to the page it was loaded by."""
        if prefetch:
            return False
        if path in self._excluded_exact or path.startswith(self._excluded_prefixes):
            return False
        dot = path.rfind(".")
        if dot > path.rfind("/") and path[dot:].lower() in self._excluded_extensions:
            return False
        return not is_bot(user_agent)

    @staticmethod
    def response_counts(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """A 200 whose media type is text/html (any parameters, any case)."""
        if status != 200:
            return False
        for name, value in headers:
            # ASGI names are lower case: compare directly, lower only a name that is not (no copy per header).
            if name == b"content-type" or (not name.islower() and name.lower() == b"content-type"):
                return is_html_type(value)
        return False


# --------------------------------------------------------------------------------------------------------------
# <title>
# --------------------------------------------------------------------------------------------------------------

# The title element's start tag, or a sign that the head is over (then there is no document title to find; this
# also keeps inline <svg><title> in the body from being taken for the page title). HTML tag names end at
# whitespace, "/" or ">" (https://html.spec.whatwg.org/multipage/parsing.html#tag-name-state).
_HEAD_TAGS = re.compile(rb"<(?:(title)|body|/head)[\t\n\f\r />]", re.IGNORECASE)
_HEAD_TAGS_CARRY = len(b"</head>") - 1
_TITLE_END = re.compile(rb"</title[\t\n\f\r />]", re.IGNORECASE)
# _HEAD_TAGS, with a bare <title>'s text (group 1) and, when that text holds no "<", its end tag (group 2) in the
# same search: one regex call for the usual page. [^<] cannot run past an end tag, so group 2 is the first one.
_HEAD_TAGS_WITH_TITLE = re.compile(
    rb"<(?:title>([^<]{0,%d})(</title[\t\n\f\r />])?|title[\t\n\f\r /]|body[\t\n\f\r />]|/head[\t\n\f\r />])"
    % _TITLE_RAW_BYTES,
    re.IGNORECASE,
)
_TITLE_END_CARRY = len(b"</title>") - 1
_TAG_END_OR_QUOTE = re.compile(rb"[>\"']")
# C0 and C1 control characters (and DEL) never belong in a title; they could also corrupt logs.
_CONTROL_CHARS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)], " ")

_SEEK, _IN_TAG, _IN_TITLE, _DONE = range(4)


def _ascii_compatible(encoding: str) -> str:
    if encoding == "utf-8":
        return encoding  # the default, on every page view: skip the codec registry
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return "utf-8"
    # The byte-level tag search only works for encodings that spell ASCII as ASCII (not UTF-16/32).
    return name if "<title>".encode(name, "ignore") == b"<title>" else "utf-8"


class TitleSniffer:
    """Feed response body chunks; finds <title>…</title> within the first 32 KiB only, across chunk boundaries,
    case-insensitive, attributes allowed (<title data-x="y">), HTML entities unescaped, whitespace collapsed,
    capped at 300 chars; stops looking after the cap (no whole-body buffering; memory bounded).

    Memory is a few bytes of carry-over between chunks plus at most ~4 KiB of raw title. ``encoding`` is the
    response charset (default UTF-8; an unknown or non-ASCII-compatible one falls back to UTF-8).
    """

    __slots__ = ("_carry", "_encoding", "_quote", "_raw", "_scanned", "_seen", "_state", "_title")

    def __init__(self, encoding: str = "utf-8") -> None:
        self._encoding = _ascii_compatible(encoding)
        self._state = _SEEK
        self._seen = 0  # body bytes looked at so far (at most TITLE_SCAN_BYTES)
        self._carry = b""  # tail of the previous chunk, so a tag split across chunks is still found
        self._quote = b""  # inside a quoted attribute value of the <title ...> tag
        self._raw = bytearray()  # bytes after <title ...>
        self._scanned = 0  # how much of _raw has been searched for </title
        self._title = ""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def title(self) -> str:
        """The title found; while the body is still open inside <title>, what has been read so far."""
        if self._state == _IN_TITLE:
            return self._clean(bytes(self._raw), partial=True)
        return self._title

    def feed(self, chunk: bytes) -> None:
        if self._state == _DONE or not chunk:
            return
        if self._seen == 0 and self._state == _SEEK and self._fast(chunk):
            return
        room = TITLE_SCAN_BYTES - self._seen
        if len(chunk) > room:
            chunk = chunk[:room]
        self._seen += len(chunk)
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        if self._state == _SEEK:
            data = self._seek(data)
        if self._state == _IN_TAG:
            data = self._skip_attributes(data)
        if self._state == _IN_TITLE:
            self._collect(data)
        if self._state != _DONE and self._seen >= TITLE_SCAN_BYTES:
            # Out of budget: a title that started but did not end keeps what was read; otherwise there is none.
            self._finish(partial=True)

    def _fast(self, chunk: bytes) -> bool:
        """The common case on every page view: a plain ``<title>…</title>`` wholly inside the first chunk.

        Same rules as the streaming path (title before ``<body``/``</head``, within the scan budget, raw title
        within its cap), without copying the chunk; anything else returns False and the streaming path runs.
        """
        raw = _title_bytes_in_chunk(chunk)
        if raw is None:
            return False
        self._seen = min(len(chunk), TITLE_SCAN_BYTES)
        self._title = _clean_title(raw, self._encoding, partial=False)
        self._state = _DONE
        return True

    def _seek(self, data: bytes) -> bytes:
        match = _HEAD_TAGS.search(data)
        if match is None:
            self._carry = data[-_HEAD_TAGS_CARRY:]
            return b""
        if match.group(1) is None:  # <body or </head before any <title
            self._state = _DONE
            return b""
        self._state = _IN_TAG
        return data[match.end() - 1 :]  # from the delimiter: it may already be the closing ">"

    def _skip_attributes(self, data: bytes) -> bytes:
        position = 0
        while True:
            if self._quote:
                end = data.find(self._quote, position)
                if end < 0:
                    return b""
                self._quote = b""
                position = end + 1
                continue
            match = _TAG_END_OR_QUOTE.search(data, position)
            if match is None:
                return b""
            if match.group() == b">":
                self._state = _IN_TITLE
                return data[match.end() :]
            self._quote = match.group()
            position = match.end()

    def _collect(self, data: bytes) -> None:
        raw = self._raw
        raw += data[: _TITLE_RAW_BYTES + _TITLE_END_CARRY + 1 - len(raw)]
        end = _TITLE_END.search(raw, max(0, self._scanned - _TITLE_END_CARRY))
        if end is not None:
            del raw[end.start() :]
            self._finish(partial=False)
        elif len(raw) >= _TITLE_RAW_BYTES:
            del raw[_TITLE_RAW_BYTES:]
            self._finish(partial=True)
        else:
            self._scanned = len(raw)

    def _clean(self, raw: bytes, *, partial: bool) -> str:
        return _clean_title(raw, self._encoding, partial=partial)

    def _finish(self, *, partial: bool) -> None:
        if self._state == _IN_TITLE and self._raw:
            self._title = self._clean(bytes(self._raw), partial=partial)
        self._state = _DONE
        self._raw = bytearray()
        self._carry = b""


def _title_bytes_in_chunk(chunk: bytes) -> bytes | None:
    """The raw bytes of a plain ``<title>…</title>`` wholly inside ``chunk`` (the first body chunk), else None."""
    limit = min(len(chunk), TITLE_SCAN_BYTES)
    tag = _HEAD_TAGS_WITH_TITLE.search(chunk, 0, limit)
    if tag is None:
        return None
    raw = tag.group(1)
    if raw is None:  # <body, </head or a <title with attributes came first
        return None
    if tag.group(2) is not None:  # the common case: no "<" in the title, so this is the first </title
        return raw
    start = tag.start(1)
    end = _TITLE_END.search(chunk, start, min(limit, start + _TITLE_RAW_BYTES + _TITLE_END_CARRY + 1))
    if end is None or end.start() - start > _TITLE_RAW_BYTES:
        return None
    return chunk[start : end.start()]


def _clean_title(raw: bytes, encoding: str, *, partial: bool) -> str:
    if partial:
        # A cut-off title must not end in half a multi-byte character: the incremental decoder holds it back.
        text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(raw, final=False)
    else:
        text = raw.decode(encoding, "replace")
    # Runs once per page view on the request path: skip the costly steps when they cannot change anything.
    if "&" in text:
        text = html.unescape(text)
    if not text.isprintable():
        text = text.translate(_CONTROL_CHARS)
    return " ".join(text.split())[:TITLE_MAX_CHARS].rstrip()


def quick_title(first_chunk: bytes) -> str | None:
    """The page title when the first body chunk holds a plain ``<title>…</title>`` (UTF-8), else None.

    Exactly what a fresh ``TitleSniffer()`` fed ``first_chunk`` reports in that case, without building one: the
    middleware tries this on the first chunk of every page view and falls back to a :class:`TitleSniffer` only when
    it returns None.
    """
    raw = _title_bytes_in_chunk(first_chunk)
    if raw is None:
        return None
    if type(raw) is not bytes:  # a bytearray or memoryview body: not hashable, not worth caching
        return _clean_title(raw, "utf-8", partial=False)
    title = _title_cache.get(raw)
    if title is None:
        title = _clean_title(raw, "utf-8", partial=False)
        remember(_title_cache, raw, title, _TITLE_CACHE_SIZE)  # pages reuse titles; unique ones just pass through
    return title


# Raw title bytes -> cleaned title, for quick_title: a site has far fewer titles than page views. Bounded in entries
# and (through _TITLE_RAW_BYTES) in key size: at most ~4 MiB even when every title is unique and long.
_TITLE_CACHE_SIZE = 1024
_title_cache: dict[bytes, str] = {}


# --------------------------------------------------------------------------------------------------------------
# Language and URL
# --------------------------------------------------------------------------------------------------------------

# RFC 9110 §12.5.4 / RFC 4647: language-range = (1*8ALPHA *("-" 1*8alphanum)) / "*"; weight = OWS ";" OWS "q=" qvalue.
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")
_QVALUE = re.compile(r"[qQ]=(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")
_MAX_LANGUAGE_TAG = 35  # RFC 5646 §4.4.1: implementations should handle tags of at least 35 characters
_MAX_ACCEPT_LANGUAGE = 512


@functools.lru_cache(maxsize=512)
def primary_language(accept_language: str) -> str:
    """The most preferred language tag, lower case ("en-US,en;q=0.9" -> "en-us"); "" when absent or garbage.

    Cached (bounded): browsers send few distinct Accept-Language values, and this runs on every page view.
    """
    best, best_q = "", 0.0
    for item in accept_language[:_MAX_ACCEPT_LANGUAGE].split(",", 32)[:32]:
        tag, _, params = item.partition(";")
        tag = tag.strip()
        if len(tag) > _MAX_LANGUAGE_TAG or not _LANGUAGE_TAG.fullmatch(tag):
            continue  # "*", garbage, or a tag longer than anything real
        q = 1.0
        for param in params.split(";"):
            param = param.strip()
            if param[:2] in ("q=", "Q="):
                weight = _QVALUE.fullmatch(param)
                q = float(weight.group(1)) if weight else 0.0
        if q > best_q:  # ties keep the first, as listed order expresses preference too
            best, best_q = tag.lower(), q
    return best


_LANGUAGE_CACHE_SIZE = 512
_CACHED_LANGUAGE_HEADER_BYTES = 256  # real browsers send well under 100 bytes; longer values are not kept
_languages_by_header: dict[bytes, str] = {}


def primary_language_of(accept_language: bytes) -> str:
    """:func:`primary_language` of a raw Accept-Language value (latin-1 bytes, as in the ASGI headers).

    Cached by the bytes themselves (bounded), so a repeat visitor's header costs one lookup and no decoding.
    """
    cacheable = type(accept_language) is bytes and len(accept_language) <= _CACHED_LANGUAGE_HEADER_BYTES
    language = _languages_by_header.get(accept_language) if cacheable else None
    if language is None:
        language = primary_language(accept_language.decode("latin-1"))
        if cacheable:
            remember(_languages_by_header, accept_language, language, _LANGUAGE_CACHE_SIZE)
    return language


# RFC 3986 host: reg-name (kept to what DNS and browsers send) or an IP-literal, then an optional port.
_HOST = re.compile(rb"(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters that stay as they are in a path or query (RFC 3986 pchar plus "/", "?", and "%" of existing escapes).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
# What quote(..., safe=_PATH_SAFE/_QUERY_SAFE) returns unchanged: unreserved characters plus the safe sets. A value
# is unchanged when deleting these bytes leaves nothing (bytes.translate: one C pass, cheaper than a regex match).
_UNRESERVED = (string.ascii_letters + string.digits + "-._~").encode("ascii")
_PATH_UNCHANGED = _UNRESERVED + _PATH_SAFE.encode("ascii")
_QUERY_UNCHANGED = _UNRESERVED + _QUERY_SAFE.encode("ascii")


def _scheme(scope: Scope) -> str:
    scheme = scope.get("scheme")
    return scheme if scheme in ("http", "https") else "http"


def request_host(scope: Scope) -> str:
    """``host[:port]`` of the request, lower case: the Host header if it is a valid host, else ``scope["server"]``."""
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
    for name, value in headers:
        if name == b"host":
            return _host(_scheme(scope), scope.get("server"), value)
    return _host(_scheme(scope), scope.get("server"), None)


def _valid_host(host_header: bytes) -> bool:
    match = _HOST.fullmatch(host_header)
    return match is not None and (match.group(1) is None or int(match.group(1)) <= 65535)


def _host(scheme: str, server: object, host_header: bytes | None) -> str:
    """:func:`request_host` from the scope's scheme ("http" or "https") and ``server`` and the value of the first
    Host header (None when there is none)."""
    if host_header is not None and _valid_host(host_header):
        return host_header.decode("ascii").lower()
    # Garbage or no Host (HTTP/1.0): fall back to the address the server listens on.
    if not isinstance(server, (tuple, list)) or not server or not isinstance(server[0], str):
        return "localhost"
    host = server[0].lower()
    if ":" in host:
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return "localhost"
    elif not _HOST.fullmatch(host.encode("ascii", "replace")):
        return "localhost"  # e.g. a unix socket path
    port = server[1]
    if isinstance(port, int) and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return host


def request_hostname(scope: Scope) -> str:
    """The request's host name without port or brackets (``"::1"``, ``"www.python.org"``)."""
    try:
        return (urlsplit(f"//{request_host(scope)}").hostname or "").rstrip(".")
    except ValueError:
        return ""


# "scheme://host" for valid Host headers already seen, per scheme. The Host header is client-controlled, so the
# cache is bounded (oldest entry evicted first); a real site sees a handful of host names.
_URL_PREFIX_CACHE_SIZE = 256
_url_prefixes: dict[str, dict[bytes, str]] = {"http": {}, "https": {}}


def _url_prefix(scheme: str, server: object, host_header: bytes | None) -> str:
    cache = _url_prefixes[scheme]
    key = host_header if type(host_header) is bytes else None  # a bytearray is not hashable
    if key is not None:
        prefix = cache.get(key)
        if prefix is not None:
            return prefix
    host = _host(scheme, server, host_header)
    default = f":{_DEFAULT_PORTS[scheme]}"
    if host.endswith(default):
        host = host[: -len(default)]
    prefix = f"{scheme}://{host}"
    if key is not None and _valid_host(key):
        # Only a valid Host header decides the prefix alone; the fallback also depends on scope["server"].
        remember(cache, key, prefix, _URL_PREFIX_CACHE_SIZE)
    return prefix


def page_url(scope: Scope) -> str:
    """Absolute URL of the request: scheme, validated Host, raw path and query, as the browser addressed it."""
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
    for name, value in headers:
        if name == b"host":
            return page_url_for_host(scope, value)
    return page_url_for_host(scope, None)


def page_url_for_host(scope: Scope, host_header: bytes | None) -> str:
    """:func:`page_url` given the value of the request's first Host header (None when it has none).

    For callers that have read the headers already (the middleware reads all it needs in one pass).
    """
    return _page_url(
        scope.get("scheme"), host_header, scope.get("raw_path"), scope.get("path"), scope.get("query_string"),
        scope.get("server"),
    )  # fmt: skip


def _page_url(
    scheme: object, host_header: bytes | None, raw_path: object, path: object, query: object, server: object
) -> str:
    """:func:`page_url_for_host` from the scope's values (a deferred page view keeps just these)."""
    prefix = _url_prefix(scheme if scheme == "https" else "http", server, host_header)
    if isinstance(raw_path, bytes) and raw_path.startswith(b"/"):
        # Fast path (every page view): already-encoded ASCII that quote() would return unchanged.
        unchanged = not raw_path.translate(None, _PATH_UNCHANGED)
        text_path = raw_path.decode("ascii") if unchanged else quote(raw_path, safe=_PATH_SAFE)
    else:
        text_path = quote(str(path or "/"), safe=_PATH_SAFE)
        if not text_path.startswith("/"):
            text_path = "/" + text_path
    if query and isinstance(query, bytes):
        unchanged = not query.translate(None, _QUERY_UNCHANGED)
        query_text = query.decode("ascii") if unchanged else quote(query, safe=_QUERY_SAFE)
        return f"{prefix}{text_path}?{query_text}"
    return prefix + text_path


def page_request(scope: Scope, host_header: bytes | None) -> PageRequest:
    """What :func:`page_url_for_host` reads, for :meth:`Event.server_pageview`'s ``request`` (path only if needed)."""
    raw_path = scope.get("raw_path")
    usable = isinstance(raw_path, bytes) and raw_path.startswith(b"/")
    path = None if usable else scope.get("path")
    return (scope.get("scheme"), host_header, raw_path, path, scope.get("query_string"), scope.get("server"))


def complete_pageview(event: Event) -> None:
    """Fill in the url of a page view made with a ``request`` (:meth:`Event.server_pageview`); idempotent."""
    request = event.request
    if request is not None:
        event.request = None
        event.url = _page_url(*request)
