"""Per-destination policy: what of an :class:`~gateway.events.Event` a destination may receive, and in what form.

Runs in the dispatcher (off the request path), before anything is sent or spooled. A destination's policy is the
``[destinations.NAME]`` table: the consent categories it ``requires``, the event ``fields`` it may receive, and the
query parameters it keeps. On top of that allowlist every value is minimised (security.md T13):

- URLs keep scheme, host, non-default port, path and allowlisted query parameters only. Userinfo
  (``user:pass@``) and the fragment are dropped.
- Path segments and kept query values that look like e-mail addresses, UUIDs, long hex/base64 tokens (16+ chars),
  long digit runs (9+) or IP addresses become the placeholder (``urls.placeholder``). Checks run on the
  percent-decoded text (decoded repeatedly), so ``a%40b.org`` and ``a%2540b.org`` are caught too.
- Referrers from the site itself (``site.origins`` hosts, or the page's own host) are scrubbed like the page URL.
  External referrers shrink to their origin, ``https://host/``.
- Free text (titles, user agents, prop values) has the same kinds of substrings replaced.
- The IP is re-truncated to the configured prefixes (the event should only ever hold a truncated address; this makes
  the invariant hold even if it did not).

Length limits differ per destination, so sinks apply them with the helpers at the end of this module.

The token heuristics trade a few false positives (a CamelCase word of 16+ letters, a long slug that mixes letters and
digits in one piece) for not sending secrets. A redacted segment still counts as a page view, under the
placeholder.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import functools
import ipaddress
import json
import re
import time
from collections.abc import Collection, Mapping
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit, urlunsplit

from gateway.config import DestinationSettings, Settings
from gateway.events import Event
from gateway.pageview import complete_pageview
from gateway.sinks import PolicyDrop

__all__ = [
    "FIELDS",
    "MAX_USER_AGENT_CHARS",
    "DestinationPolicy",
    "FilteredEvent",
    "encode_json",
    "is_sensitive",
    "origin",
    "parse_retry_after",
    "reduce_referrer",
    "scrub_text",
    "scrub_url",
    "short_reason",
    "truncate_chars",
    "truncate_url",
    "truncate_utf8",
]

FIELDS: Final = ("name", "url", "referrer", "title", "country", "language", "user_agent", "ip", "props")

# Real user agents are ~100-300 characters; longer ones are junk or carry data, and the GA4 body budget assumes this.
MAX_USER_AGENT_CHARS: Final = 512
MAX_TITLE_CHARS: Final = 1000  # before per-destination caps; keeps the scrubbing regexes cheap
MAX_PROP_TEXT_CHARS: Final = 4000
# Inputs are cut to this before scrubbing, to bound the work. Every destination caps URLs at 2000 or less, so what
# lies beyond this never leaves anyway.
MAX_INPUT_URL_CHARS: Final = 16_384

# Memo caches for the pure, regex-heavy minimisation of URLs, referrers, titles, user agents and addresses. Popular
# pages, referrers and browsers repeat, so most events skip the ~100 µs of scrubbing (GitHub issue 7). Each cache is
# keyed by the input and every setting that affects the result, and holds only values that are already in memory
# in queued events, plus their minimised forms; nothing is written anywhere, and a process restart forgets it all.
# Bounded twice: at most _CACHE_ENTRIES entries per cache (least recently used go first), and inputs longer than
# _CACHEABLE_CHARS bypass the caches, so each holds at most ~4096 × (512 + result) characters, a few MB worst case.
_CACHE_ENTRIES: Final = 4096
_CACHEABLE_CHARS: Final = 512

# ---------------------------------------------------------------------------------------------------------------
# What "looks sensitive" means
# ---------------------------------------------------------------------------------------------------------------

# A whole word with an inner '@'. Generous on purpose: local parts may hold = & / ? # ' and more (RFC 5322 atext),
# and a path segment or word like that is rarely anything but an address. The lookbehind starts matches only at word
# starts, which keeps the search linear on long inputs without an '@'.
_EMAIL: Final = re.compile(r"(?<![^\s@])[^\s@]+@(?:[^\s@]*[^\s@.,;:!?)\]}>'\"])?")
_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_HEX_RUN: Final = re.compile(r"[0-9a-f]{16,}", re.IGNORECASE)
_DIGIT_RUN: Final = re.compile(r"[0-9]{9,}")
# Candidate base64/base64url tokens; _is_token() decides whether a candidate looks random.
_TOKEN_RUN: Final = re.compile(r"[A-Za-z0-9+/=_-]{16,}")
_IPV4: Final = re.compile(r"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9]|\.[0-9])")
_IPV6: Final = re.compile(
    r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|[0-9.]{7,15})?(?![0-9A-Za-z:])"
)
_SLUG_SEPARATORS: Final = re.compile(r"[-_]")
# Slug pieces: a lower-case or Capitalised word, a short acronym, a short number or a short version-like piece.
_WORD: Final = re.compile(r"[A-Z]?[a-z]+|[A-Z]{1,5}|[0-9]{1,8}|[a-z0-9]{1,8}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_SPACES: Final = re.compile(r"\s+")
_HOSTNAME: Final = re.compile(r"[a-z0-9._:-]+")
_COUNTRY: Final = re.compile(r"[A-Z]{2}")
# BCP 47 primary tag plus up to three subtags ("en", "en-gb", "zh-hant-tw").
_LANGUAGE: Final = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]{1,8}){0,3}")
# Characters left as they are when a URL path is normalised to ASCII (RFC 3986 pchar plus '/' and '%').
_PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"


def _is_token(run: str) -> bool:
    """A 16+ character base64-alphabet run that mixes character classes is a token, unless it reads as a slug."""
    classes = any(c.isdigit() for c in run) + any(c.isupper() for c in run) + any(c.islower() for c in run)
    if classes < 2:
        return False
    pieces = [p for p in _SLUG_SEPARATORS.split(run) if p]
    # "python-3-13-release-schedule", "Getting-Started-With-Python": pieces that each read as a word or a short
    # number. A random base64url token almost never splits that way (it mixes classes inside each piece).
    return not (len(pieces) > 1 and all(_WORD.fullmatch(p) for p in pieces))


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _decoded_forms(text: str, *, plus: bool = False) -> str:
    """Percent-decode until stable (at most 3 rounds), so double-encoded values are checked as well."""
    for _ in range(3):
        decoded = unquote_plus(text) if plus else unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def is_sensitive(text: str) -> bool:
    """Whether ``text`` (already decoded) contains an e-mail, UUID, token, long digit run or IP address."""
    if _EMAIL.search(text) or _UUID.search(text) or _HEX_RUN.search(text) or _DIGIT_RUN.search(text):
        return True
    if any(_is_token(m.group()) for m in _TOKEN_RUN.finditer(text)):
        return True
    if any(_is_ip(m.group()) for m in _IPV4.finditer(text)):
        return True
    return text.count(":") >= 2 and any(_is_ip(m.group()) for m in _IPV6.finditer(text))


def scrub_text(text: str, placeholder: str, *, product_versions: bool = False) -> str:
    """Replace sensitive substrings of free text (titles, user agents, prop values) with ``placeholder``.

    ``product_versions``: keep dotted quads right after a ``/``, as in user agents ("Chrome/120.0.0.0").
    """
    if not text:
        return text
    text = _EMAIL.sub(placeholder, text)
    text = _UUID.sub(placeholder, text)

    def ipv4(match: re.Match[str]) -> str:
        if product_versions and match.start() > 0 and match.string[match.start() - 1] == "/":
            return match.group()
        return placeholder if _is_ip(match.group()) else match.group()

    text = _IPV4.sub(ipv4, text)
    if text.count(":") >= 2:
        text = _IPV6.sub(lambda m: placeholder if _is_ip(m.group()) else m.group(), text)
    text = _HEX_RUN.sub(placeholder, text)
    text = _DIGIT_RUN.sub(placeholder, text)
    return _TOKEN_RUN.sub(lambda m: placeholder if _is_token(m.group()) else m.group(), text)


def _clean_text(text: str, placeholder: str, max_chars: int, *, product_versions: bool = False) -> str:
    """Single-line, control-free, scrubbed text. Cut before scrubbing to bound the regex work, and after."""
    if len(text) <= _CACHEABLE_CHARS:
        return _clean_text_cached(text, placeholder, max_chars, product_versions)
    return _clean_text_uncached(text, placeholder, max_chars, product_versions)


def _clean_text_uncached(text: str, placeholder: str, max_chars: int, product_versions: bool) -> str:
    text = _SPACES.sub(" ", _CONTROL.sub(" ", text[: max_chars * 2])).strip()
    return scrub_text(text, placeholder, product_versions=product_versions)[:max_chars].strip()


_clean_text_cached: Final = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_clean_text_uncached)


def _ascii_user_agent(user_agent: str, placeholder: str) -> str:
    # Header values are Latin-1 on the wire; keep printable ASCII so the value is a valid header and JSON-cheap.
    ascii_only = "".join(c if " " <= c <= "~" else " " for c in user_agent[: MAX_USER_AGENT_CHARS * 2])
    # Uncached inside: the whole function is memoised (or the input is too long to be), so one entry per UA.
    return _clean_text_uncached(ascii_only, placeholder, MAX_USER_AGENT_CHARS, True)


_ascii_user_agent_cached: Final = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_ascii_user_agent)


def _truncate_ip(ip: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ""
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


_truncate_ip_cached: Final = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_truncate_ip)


# ---------------------------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------------------------


def _netloc(hostname: str, port: int | None, scheme: str) -> str:
    host = f"[{hostname}]" if ":" in hostname else hostname
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return host
    return f"{host}:{port}"


def _split(url: str) -> tuple[str, str, int | None, str, str] | None:
    """(scheme, ASCII hostname, port, path, query) of an absolute http(s) URL, or None. Userinfo is never kept."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        hostname = (parts.hostname or "").lower()
        if not hostname.isascii():
            hostname = hostname.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not _HOSTNAME.fullmatch(hostname):
        return None
    if ":" in hostname and not _is_ip(hostname):
        return None
    return scheme, hostname, port, parts.path, parts.query


def origin(url: str) -> str | None:
    """``scheme://host[:port]/`` of an absolute http(s) URL, without userinfo; None if it is not one."""
    split = _split(url)
    if split is None:
        return None
    scheme, hostname, port, _, _ = split
    return f"{scheme}://{_netloc(hostname, port, scheme)}/"


def _is_slash_address(text: str) -> bool:
    """One word with an '@' and no '/' after it: an address whose local part starts with '/' (RFC 5322 atext allows
    it), not a site path; split at '/' like a path, no segment would show it."""
    return _EMAIL.fullmatch(text) is not None and "/" not in text.partition("@")[2]


def _scrub_path(path: str, placeholder: str, scrub_segments: bool) -> str:
    # Normalise to ASCII: existing escapes stay, anything else unsafe (spaces, non-ASCII, quotes) is encoded.
    path = quote(path or "/", safe=_PATH_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    if not scrub_segments:
        return path
    segments = path.split("/")
    return "/".join(placeholder if seg and is_sensitive(_decoded_forms(seg)) else seg for seg in segments)


def _scrub_query(query: str, allowed: Collection[str], placeholder: str) -> str:
    if not query or not allowed:
        return ""
    kept: list[tuple[str, str]] = []
    # ";" separates parameters for some servers (HTML 4 B.2.2); splitting on it too means a value of an allowed
    # parameter can never smuggle "x;password=..." out.
    for key, value in parse_qsl(query.replace(";", "&"), keep_blank_values=True):
        if key in allowed:
            decoded = _decoded_forms(value, plus=True)
            kept.append((key, placeholder if is_sensitive(decoded) else decoded))
    # RFC 3986 allows ":" and "/" in a query; leaving them readable keeps the placeholder and paths legible.
    return "&".join(f"{quote(key, safe='')}={quote(value, safe=':/')}" for key, value in kept)


def scrub_url(
    url: str, *, allowed_query_params: Collection[str], placeholder: str = ":redacted", scrub_segments: bool = True
) -> str | None:
    """The URL with only what may leave: no userinfo, no fragment, allowlisted query, scrubbed path segments.

    Returns None when ``url`` is not an absolute http(s) URL. The result is ASCII (percent-encoded).
    """
    return _page_parts(url, frozenset(allowed_query_params), placeholder, scrub_segments).url


@dataclasses.dataclass(frozen=True, slots=True)
class _PageParts:
    """A URL as a destination may see it: scrubbed (None if not an http(s) URL), its origin and its hostname."""

    url: str | None
    origin: str | None
    hostname: str  # "" when the URL is not usable


_NO_PAGE: Final = _PageParts(None, None, "")


def _page_parts_uncached(url: str, params: frozenset[str], placeholder: str, scrub_segments: bool) -> _PageParts:
    split = _split(url)
    if split is None:
        return _NO_PAGE
    scheme, hostname, port, path, query = split
    netloc = _netloc(hostname, port, scheme)
    scrubbed = urlunsplit(
        (scheme, netloc, _scrub_path(path, placeholder, scrub_segments), _scrub_query(query, params, placeholder), "")
    )
    return _PageParts(scrubbed, f"{scheme}://{netloc}/", hostname)


_page_parts_cached: Final = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_page_parts_uncached)


def _page_parts(url: str, params: frozenset[str], placeholder: str, scrub_segments: bool) -> _PageParts:
    if len(url) <= _CACHEABLE_CHARS:
        return _page_parts_cached(url, params, placeholder, scrub_segments)
    return _page_parts_uncached(url, params, placeholder, scrub_segments)


def reduce_referrer(
    referrer: str,
    *,
    page_url: str,
    own_hosts: Collection[str],
    allowed_query_params: Collection[str],
    placeholder: str = ":redacted",
    scrub_segments: bool = True,
) -> str:
    """Own-site referrers are scrubbed like the page URL; external ones become their origin; junk becomes ""."""
    page = _split(page_url)
    return _reduce_referrer(
        referrer,
        page[1] if page is not None else "",
        frozenset(own_hosts),
        frozenset(allowed_query_params),
        placeholder,
        scrub_segments,
    )


def _reduce_referrer(
    referrer: str,
    page_host: str,
    own_hosts: frozenset[str],
    params: frozenset[str],
    placeholder: str,
    scrub_segments: bool,
) -> str:
    """:func:`reduce_referrer` given the page's hostname ("" if unknown); memoised for short referrers."""
    if len(referrer) <= _CACHEABLE_CHARS:
        return _reduce_referrer_cached(referrer, page_host, own_hosts, params, placeholder, scrub_segments)
    return _reduce_referrer_uncached(referrer, page_host, own_hosts, params, placeholder, scrub_segments)


def _reduce_referrer_uncached(
    referrer: str,
    page_host: str,
    own_hosts: frozenset[str],
    params: frozenset[str],
    placeholder: str,
    scrub_segments: bool,
) -> str:
    split = _split(referrer)
    if split is None:
        return ""
    hostname = split[1]
    if hostname in own_hosts or hostname == page_host:
        return _page_parts(referrer, params, placeholder, scrub_segments).url or ""
    if _is_ip(hostname):
        # An external page on a bare IP address is often someone's own machine; its address says too much.
        return ""
    scheme, _, port, _, _ = split
    return f"{scheme}://{_netloc(hostname, port, scheme)}/"


_reduce_referrer_cached: Final = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_reduce_referrer_uncached)


# ---------------------------------------------------------------------------------------------------------------
# Length caps (sinks pick the destination's documented limits)
# ---------------------------------------------------------------------------------------------------------------


def truncate_chars(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars]


def truncate_utf8(text: str, max_bytes: int) -> str:
    """At most ``max_bytes`` of UTF-8, never splitting a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def _encoded_len(text: str) -> int:
    """Length of the value as GA4 measures it: URL-encoded as a query value (encodeURIComponent)."""
    return len(quote(text, safe="-_.!~*'()"))


def truncate_url(url: str, max_len: int, *, measure_encoded: bool = False) -> str:
    """Cut an ASCII URL (as :func:`scrub_url` makes) to ``max_len``: drop the query first, then shorten the path.

    Never leaves a broken ``%XX`` escape at the end. ``measure_encoded`` counts the URL-encoded length (GA4).
    """
    if len(url) <= _CACHEABLE_CHARS:
        return _truncate_url_cached(url, max_len, measure_encoded)
    return _truncate_url(url, max_len, measure_encoded)


def _truncate_url(url: str, max_len: int, measure_encoded: bool) -> str:

    def size(text: str) -> int:
        return _encoded_len(text) if measure_encoded else len(text.encode("utf-8"))

    if size(url) <= max_len:
        return url
    if "?" in url:
        url = url.split("?", 1)[0]
        if size(url) <= max_len:
            return url
    # Binary search for the longest prefix that fits (encoded length is monotonic in prefix length).
    low, high = 0, len(url)
    while low < high:
        mid = (low + high + 1) // 2
        if size(url[:mid]) <= max_len:
            low = mid
        else:
            high = mid - 1
    cut = url[:low]
    percent = cut.rfind("%", max(0, len(cut) - 2))
    if percent != -1:
        cut = cut[:percent]
    return _drop_partial_utf8(cut)


# Scrubbed page URLs and referrers repeat as much as their inputs; measuring GA4's encoded length is a quote() each.
_truncate_url_cached: Final = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_truncate_url)


_TRAILING_ESCAPES: Final = re.compile(r"(?:%[0-9A-Fa-f]{2})+$")


def _drop_partial_utf8(url: str) -> str:
    """Remove trailing escapes that start a UTF-8 character the cut left incomplete ("%C3" of "%C3%A9")."""
    match = _TRAILING_ESCAPES.search(url)
    if match is None:
        return url
    raw = bytes.fromhex(match.group().replace("%", ""))
    start = len(raw) - 1
    while start >= 0 and raw[start] & 0xC0 == 0x80:  # continuation bytes
        start -= 1
    if start < 0 or raw[start] < 0xC0:
        return url
    needed = 2 if raw[start] < 0xE0 else 3 if raw[start] < 0xF0 else 4
    if len(raw) - start >= needed:
        return url
    return url[: match.start() + start * 3]


# ---------------------------------------------------------------------------------------------------------------
# The policy of one destination
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FilteredEvent:
    """The allowed, minimised fields of one event for one destination ("" / {} when a field is not allowed)."""

    name: str
    url: str  # scrubbed page URL if "url" is allowed, else the page's origin ("https://host/")
    referrer: str
    title: str
    country: str
    language: str
    user_agent: str
    ip: str  # truncated to the configured prefixes
    props: Mapping[str, str]
    page_host: str  # hostname of the page (always known, used for keys, never a field on its own)


class DestinationPolicy:
    """Everything about one ``[destinations.NAME]`` table that decides what an event may carry, precomputed."""

    __slots__ = (
        "fields",
        "ipv4_prefix",
        "ipv6_prefix",
        "name",
        "own_hosts",
        "placeholder",
        "query_params",
        "requires",
        "scrub_segments",
    )

    def __init__(self, dest: DestinationSettings, settings: Settings) -> None:
        self.name = dest.name
        self.fields: frozenset[str] = frozenset(dest.fields)
        self.requires: frozenset[str] = frozenset(dest.requires)
        params = (
            dest.allowed_query_params if dest.allowed_query_params is not None else settings.urls.allowed_query_params
        )
        self.query_params: frozenset[str] = frozenset(params)
        self.placeholder = settings.urls.placeholder
        self.scrub_segments = settings.urls.scrub_path_segments
        self.own_hosts: frozenset[str] = frozenset(
            (urlsplit(o).hostname or "").lower() for o in settings.site.origins if urlsplit(o).hostname
        )
        self.ipv4_prefix = settings.anonymize.ipv4_prefix
        self.ipv6_prefix = settings.anonymize.ipv6_prefix

    def __repr__(self) -> str:
        return (
            f"DestinationPolicy(name={self.name!r}, fields={sorted(self.fields)!r}, requires={sorted(self.requires)!r})"
        )

    def allows(self, field: str) -> bool:
        return field in self.fields

    def check_consent(self, event: Event) -> None:
        """Defence in depth: the dispatcher checks this too, but a sink never builds without the consent it needs."""
        if not self.requires <= event.granted:
            raise PolicyDrop("consent")

    # Single fields -------------------------------------------------------------------------------------------

    def _page(self, url: str) -> _PageParts:
        return _page_parts(url[:MAX_INPUT_URL_CHARS], self.query_params, self.placeholder, self.scrub_segments)

    def page_url(self, url: str) -> str | None:
        return self._page(url).url

    def referrer(self, referrer: str, page_url: str) -> str:
        return self._referrer(referrer, self._page(page_url).hostname)

    def _referrer(self, referrer: str, page_host: str) -> str:
        if not referrer:
            return ""
        return _reduce_referrer(
            referrer[:MAX_INPUT_URL_CHARS],
            page_host,
            self.own_hosts,
            self.query_params,
            self.placeholder,
            self.scrub_segments,
        )

    def title(self, title: str) -> str:
        return _clean_text(title, self.placeholder, MAX_TITLE_CHARS)

    def user_agent(self, user_agent: str) -> str:
        if len(user_agent) <= _CACHEABLE_CHARS:
            return _ascii_user_agent_cached(user_agent, self.placeholder)
        return _ascii_user_agent(user_agent, self.placeholder)

    def ip(self, ip: str) -> str:
        """The address truncated to the configured prefix; "" if it is not an address."""
        if len(ip) <= _CACHEABLE_CHARS:
            return _truncate_ip_cached(ip, self.ipv4_prefix, self.ipv6_prefix)
        return _truncate_ip(ip, self.ipv4_prefix, self.ipv6_prefix)

    @staticmethod
    def country(country: str) -> str:
        code = country.strip().upper()
        return code if _COUNTRY.fullmatch(code) else ""

    @staticmethod
    def language(language: str) -> str:
        tag = language.strip().lower().replace("_", "-")
        return tag if _LANGUAGE.fullmatch(tag) else ""

    def prop_value(self, value: object) -> str | None:
        """A scalar prop value as minimised text; None for non-scalars (lists, maps, None)."""
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float | str):
            text = str(value)
        else:
            return None
        stripped = text.strip()
        if stripped.startswith(("http://", "https://")):
            return self.page_url(stripped[:MAX_PROP_TEXT_CHARS]) or ""
        if stripped.startswith("/") and not stripped.startswith("//") and not _is_slash_address(stripped):
            # A site path: scrub it like a URL's path and query.
            scrubbed = self.page_url("http://x.invalid" + stripped[:MAX_PROP_TEXT_CHARS])
            return scrubbed.removeprefix("http://x.invalid") if scrubbed else ""
        return _clean_text(text, self.placeholder, MAX_PROP_TEXT_CHARS)

    def props(self, props: Mapping[str, object]) -> dict[str, str]:
        """Scalar props with minimised values; keys that look sensitive and empty entries are dropped."""
        result: dict[str, str] = {}
        for key, value in props.items():
            if not isinstance(key, str):
                continue
            clean_key = _SPACES.sub(" ", _CONTROL.sub(" ", key)).strip()
            if not clean_key or is_sensitive(_decoded_forms(clean_key)):
                continue
            text = self.prop_value(value)
            if text is None or not text.strip():
                continue
            result[clean_key] = text
        return result

    # The whole event -----------------------------------------------------------------------------------------

    def apply(self, event: Event) -> FilteredEvent:
        """Check consent and return the allowed, minimised fields; PolicyDrop if the event cannot be sent at all."""
        self.check_consent(event)
        complete_pageview(event)  # a page view from the middleware: its url, worked out now
        page = self._page(event.url)
        if page.url is None or page.origin is None:
            raise PolicyDrop("invalid_url")
        allows = self.fields.__contains__
        return FilteredEvent(
            name=event.name,
            url=page.url if allows("url") else page.origin,
            referrer=self._referrer(event.referrer, page.hostname) if allows("referrer") else "",
            title=self.title(event.title) if allows("title") else "",
            country=self.country(event.country) if allows("country") else "",
            language=self.language(event.language) if allows("language") else "",
            user_agent=self.user_agent(event.user_agent) if allows("user_agent") else "",
            ip=self.ip(event.ip) if allows("ip") else "",
            props=self.props(event.props) if allows("props") else {},
            page_host=page.hostname,
        )


# ---------------------------------------------------------------------------------------------------------------
# Wire helpers the sinks share
# ---------------------------------------------------------------------------------------------------------------


def encode_json(body: Mapping[str, object]) -> bytes:
    """Compact UTF-8 JSON, the form every sink sends and measures."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 86_400))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate_to_datetime leaves "-0000" naive
        when = when.replace(tzinfo=datetime.UTC)
    current = time.time() if now is None else now
    return max(0.0, min(when.timestamp() - current, 86_400.0))


def short_reason(text: str, limit: int = 200) -> str:
    """A destination's error text made safe for counters and logs: one line, printable, short."""
    return _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()[:limit]
