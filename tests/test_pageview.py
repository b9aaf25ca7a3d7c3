from __future__ import annotations

import itertools
import time
import tracemalloc
from typing import Any

import pytest
from crawlerdetect import CrawlerDetect
from crawlerdetect.providers.crawlers import data as crawler_patterns
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.pageview as pageview
from gateway.config import Settings, load_settings
from gateway.events import Event
from gateway.pageview import (
    MAX_USER_AGENT_CHARS,
    TITLE_MAX_CHARS,
    TITLE_SCAN_BYTES,
    PageviewDetector,
    TitleSniffer,
    complete_pageview,
    is_bot,
    page_request,
    page_url,
    primary_language,
    request_host,
)

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0"
SAFARI_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1"
)
EDGE = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
    "Safari/537.36 Edg/124.0.2478.67"
)
SAMSUNG = (
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/24.0 "
    "Chrome/117.0.0.0 Mobile Safari/537.36"
)
BROWSERS = [CHROME, FIREFOX, SAFARI_IOS, EDGE, SAMSUNG]
BOTS = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) "
    "Chrome/116.0.1938.76 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "Go-http-client/1.1",
    "Wget/1.21.4",
]


def make_scope(
    path: str = "/downloads/",
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    user_agent: str | None = CHROME,
    **extra: Any,
) -> dict[str, Any]:
    all_headers = [(b"host", b"www.python.org"), (b"accept", b"text/html")]
    if user_agent is not None:
        all_headers.append((b"user-agent", user_agent.encode("latin-1")))
    all_headers += headers or []
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": all_headers,
        "server": ("127.0.0.1", 8000),
    }
    scope.update(extra)
    return scope


# ---------------------------------------------------------------------------------------------- request_may_count


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        pytest.param(make_scope(), True, id="GET html page"),
        pytest.param(make_scope("/"), True, id="root"),
        pytest.param(make_scope(method="POST"), False, id="POST"),
        pytest.param(make_scope(method="HEAD"), False, id="HEAD"),
        pytest.param(make_scope("/static/css/style.css"), False, id="excluded prefix /static/"),
        pytest.param(make_scope("/static/page"), False, id="excluded prefix without extension"),
        pytest.param(make_scope("/media/img/x"), False, id="excluded prefix /media/"),
        pytest.param(make_scope("/favicon.ico"), False, id="favicon"),
        pytest.param(make_scope("/robots.txt"), False, id="robots"),
        pytest.param(make_scope("/.well-known/security.txt"), False, id="well-known"),
        pytest.param(make_scope("/ftp/python/3.12.0/python-3.12.0.exe"), False, id="extension .exe"),
        pytest.param(make_scope("/docs/guide.PDF"), False, id="extension case-insensitive"),
        pytest.param(make_scope("/api/data.json"), False, id="extension .json"),
        pytest.param(make_scope("/downloads/release/python-3.12/"), True, id="dot in a directory is no extension"),
        pytest.param(make_scope("/about/python.org"), True, id="unlisted extension"),
        pytest.param(make_scope("/_privacy"), False, id="own prefix"),
        pytest.param(make_scope("/_privacy/consent"), False, id="own endpoint"),
        pytest.param(make_scope("/_privacy/settings"), False, id="own html page"),
        pytest.param(make_scope("/_privacyx"), True, id="own prefix only as a path segment"),
        pytest.param(make_scope("/api/event"), False, id="beacon path"),
        pytest.param(make_scope(headers=[(b"sec-purpose", b"prefetch")]), False, id="Sec-Purpose prefetch"),
        pytest.param(make_scope(headers=[(b"sec-purpose", b"prefetch;prerender")]), False, id="prerender"),
        pytest.param(make_scope(headers=[(b"sec-purpose", b"Prefetch;anonymous-client-ip")]), False, id="anon"),
        pytest.param(make_scope(headers=[(b"purpose", b"prefetch")]), False, id="Purpose prefetch"),
        pytest.param(make_scope(headers=[(b"x-moz", b"prefetch")]), False, id="X-Moz prefetch"),
        pytest.param(make_scope(headers=[(b"x-purpose", b"preview")]), False, id="Safari preview"),
        pytest.param(make_scope(headers=[(b"x-moz", b"something")]), True, id="other X-Moz value"),
        pytest.param(make_scope(user_agent=None), False, id="no user agent"),
        pytest.param(make_scope(user_agent=""), False, id="empty user agent"),
        pytest.param(make_scope(user_agent="   "), False, id="blank user agent"),
        pytest.param(make_scope(user_agent="Mozilla/5.0 " + "x" * 600), False, id="absurdly long user agent"),
    ],
)
def test_request_may_count(scope: dict[str, Any], expected: bool) -> None:
    assert PageviewDetector(Settings()).request_may_count(scope) is expected


@pytest.mark.parametrize("user_agent", BROWSERS)
def test_real_browsers_count(user_agent: str) -> None:
    assert not CrawlerDetect().is_crawler(user_agent)  # the classifier itself agrees: these are people
    assert PageviewDetector(Settings()).request_may_count(make_scope(user_agent=user_agent))


@pytest.mark.parametrize("user_agent", BOTS)
def test_bots_do_not_count(user_agent: str) -> None:
    assert CrawlerDetect().is_crawler(user_agent)
    assert not PageviewDetector(Settings()).request_may_count(make_scope(user_agent=user_agent))


@pytest.mark.parametrize("mode", ["beacon", "off"])
def test_no_server_pageviews_unless_configured(mode: str) -> None:
    detector = PageviewDetector(load_settings(overrides={"analytics": {"pageviews": mode}}))
    assert not detector.request_may_count(make_scope())


def test_configured_exclusions_and_prefix() -> None:
    settings = load_settings(
        overrides={
            "prefix": "/gw/",
            "analytics": {"beacon_path": "/stats/e", "exclude_paths": ["/admin/"], "exclude_extensions": [".RSS"]},
        }
    )
    detector = PageviewDetector(settings)
    assert not detector.request_may_count(make_scope("/gw"))
    assert not detector.request_may_count(make_scope("/gw/flows"))
    assert not detector.request_may_count(make_scope("/stats/e"))
    assert not detector.request_may_count(make_scope("/admin/users/"))
    assert not detector.request_may_count(make_scope("/feeds/news.rss"))
    assert detector.request_may_count(make_scope("/static/x.css"))  # the defaults were replaced
    assert detector.request_may_count(make_scope("/_privacy/consent"))


@given(
    headers=st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=80)), max_size=8),
    path=st.text(max_size=40),
    method=st.sampled_from(["GET", "POST", "HEAD", ""]),
)
@settings(max_examples=200, deadline=None)
def test_request_may_count_never_raises(headers: list[tuple[bytes, bytes]], path: str, method: str) -> None:
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    assert isinstance(PageviewDetector(Settings()).request_may_count(scope), bool)


def test_request_may_count_is_cheap() -> None:
    detector = PageviewDetector(Settings())
    scope = make_scope(
        headers=[(b"accept-language", b"en-US,en;q=0.9"), (b"cookie", b"a=b"), (b"sec-fetch-mode", b"navigate")]
    )
    assert detector.request_may_count(scope)  # warms the bot cache
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        detector.request_may_count(scope)
    per_call = (time.perf_counter() - started) / rounds
    assert per_call < 20e-6, per_call  # ~1 µs on the dev machine; generous for slow CI


# ------------------------------------------------------------------------------------------------------- bots


def test_empty_user_agent_is_a_bot() -> None:
    assert is_bot("")
    assert is_bot(" \t")


def test_bot_patterns_are_compiled_when_the_detector_is_built_not_on_the_first_request() -> None:
    # Compiling crawlerdetect's patterns takes tens of milliseconds: the first visitor must not wait for it.
    pageview._classifier.cache_clear()
    assert pageview._classifier.cache_info().currsize == 0
    PageviewDetector(Settings())
    assert pageview._classifier.cache_info().currsize == 1


def test_linear_classifier_agrees_with_crawlerdetect_on_its_own_literals() -> None:
    # Every plain-word pattern of crawlerdetect, inside a browser UA and on its own.
    detector = CrawlerDetect()
    words = [p for p in crawler_patterns if p.replace(" ", "").replace("-", "").replace("_", "").isalnum()]
    assert len(words) > 500
    for word in words[::3]:
        for user_agent in (word, f"{CHROME} {word}/1.0"):
            assert is_bot(user_agent) == detector.is_crawler(user_agent), user_agent


_UA_PARTS = st.sampled_from(
    [
        *BROWSERS,
        *BOTS,
        "Mozilla/5.0",
        "(compatible;",
        "bot",
        "crawler",
        "Spider",
        "checker",
        "robot",
        "headless",
        "Java/1.8",
        "outbrain",
        "Go 1.2 package http",
        "+http://example.com",
        "x" * 50,
    ]
)


@given(parts=st.lists(st.one_of(_UA_PARTS, st.text(max_size=30)), min_size=1, max_size=6))
@settings(max_examples=300, deadline=None)
def test_linear_classifier_agrees_with_crawlerdetect(parts: list[str]) -> None:
    user_agent = " ".join(parts)[:MAX_USER_AGENT_CHARS]
    if user_agent.strip():
        assert is_bot(user_agent) == CrawlerDetect().is_crawler(user_agent)


def test_hostile_user_agents_are_classified_in_linear_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stock crawlerdetect needs ~26 ms for 512 "x" (quadratic); the linear form a fraction of that.
    monkeypatch.setattr(pageview, "_bot_cache", {})
    hostile = ["x" * MAX_USER_AGENT_CHARS, "1" * MAX_USER_AGENT_CHARS, "Java" * 128, "Go " + "1" * 500]
    is_bot("warm up the compiled patterns")
    started = time.perf_counter()
    for user_agent in hostile:
        is_bot(user_agent)
    assert time.perf_counter() - started < 0.2
    started = time.perf_counter()
    assert is_bot("Mozilla/5.0 " + "a" * 1_000_000)  # too long to be a browser: not even classified
    assert time.perf_counter() - started < 0.05


def test_bot_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    cache: dict[str, bool] = {}
    monkeypatch.setattr(pageview, "_bot_cache", cache)
    monkeypatch.setattr(pageview, "BOT_CACHE_SIZE", 16)
    for i in range(100):
        assert is_bot(f"curl/{i}")
        assert len(cache) <= 16
    assert "curl/99" in cache and "curl/0" not in cache  # oldest evicted first
    assert not is_bot(CHROME)
    assert cache[CHROME] is False


# ---------------------------------------------------------------------------------------------- response_counts


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, [(b"content-type", b"text/html")], True),
        (200, [(b"content-type", b"text/html; charset=utf-8")], True),
        (200, [(b"Content-Type", b"TEXT/HTML;charset=UTF-8")], True),
        (200, [(b"content-length", b"5"), (b"content-type", b" text/html ; charset=utf-8")], True),
        (404, [(b"content-type", b"text/html")], False),
        (301, [(b"content-type", b"text/html")], False),
        (304, [(b"content-type", b"text/html")], False),
        (500, [(b"content-type", b"text/html")], False),
        (200, [(b"content-type", b"application/json")], False),
        (200, [(b"content-type", b"text/plain")], False),
        (200, [(b"content-type", b"text/html-fragment")], False),
        (200, [(b"content-type", b"application/xhtml+xml")], False),
        (200, [], False),
    ],
)
def test_response_counts(status: int, headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    assert PageviewDetector.response_counts(status, headers) is expected


# --------------------------------------------------------------------------------------------------- <title>

SAMPLE_PAGE = (
    b"<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
    b"<script>var x = '<titl' + 'e>not this</title>';</script>\n"
    b"<TITLE data-x=\"a>b\" class='t'>\n   Welcome to   Python.org &amp; "
    b"&#8220;friends&#8221; \xe2\x80\x94 caf\xc3\xa9\n"
    b"</title >\n</head>\n<body><svg><title>icon</title></svg><p>Hello</p></body></html>\n"
)
SAMPLE_TITLE = "Welcome to Python.org & \u201cfriends\u201d \u2014 caf\u00e9"


def sniff(chunks: list[bytes], **kwargs: str) -> TitleSniffer:
    sniffer = TitleSniffer(**kwargs)
    for chunk in chunks:
        sniffer.feed(chunk)
    return sniffer


def test_title_whole_page() -> None:
    # Attribute values may hold ">", the script's "<titl' + 'e>" is no tag, the <svg><title> in the body is not the
    # page title; entities, UTF-8 and whitespace are normalised.
    sniffer = sniff([SAMPLE_PAGE])
    assert sniffer.done
    assert sniffer.title == SAMPLE_TITLE


def test_title_across_every_two_way_split() -> None:
    for cut in range(len(SAMPLE_PAGE) + 1):
        sniffer = sniff([SAMPLE_PAGE[:cut], SAMPLE_PAGE[cut:]])
        assert sniffer.title == SAMPLE_TITLE, cut


def test_title_fed_byte_by_byte() -> None:
    assert sniff([bytes([b]) for b in SAMPLE_PAGE]).title == SAMPLE_TITLE


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(SAMPLE_PAGE)), max_size=12))
@settings(max_examples=300, deadline=None)
def test_title_across_arbitrary_splits(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(SAMPLE_PAGE)]
    chunks = [SAMPLE_PAGE[a:b] for a, b in itertools.pairwise(points)]
    assert sniff(chunks).title == SAMPLE_TITLE


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (
            b"<title>A &lt;b&gt; &quot;c&quot; &#39;d&#39; &eacute; &#x263A; &nbsp;x</title>",
            "A <b> \"c\" 'd' \u00e9 \u263a x",
        ),
        (b"<title>Tom &amp Jerry</title>", "Tom & Jerry"),  # entity without semicolon, as browsers read it
        (b"<title>\n\t multi \r\n line \f </title>", "multi line"),
        (b"<title>ctl\x00\x07\x1b[31m</title>", "ctl [31m"),
        (b"<title></title>", ""),
        (b"<title>x</TITLE>", "x"),
        (b"<TiTlE>Mixed</tItLe>", "Mixed"),
        (b"<title\n lang=en>Attr</title>", "Attr"),
        (b"<title/>Self</title>", "Self"),
        (b"<title>a</titlex> b</title>", "a</titlex> b"),
        (b"<titles>no</titles><title>yes</title>", "yes"),
        (b"<html><head></head><body><title>late</title>", ""),
        (b"<html><body><svg><title>icon</title></svg>", ""),
        (b"<title>bad \xff utf-8</title>", "bad \ufffd utf-8"),
    ],
)
def test_title_parsing(page: bytes, expected: str) -> None:
    sniffer = sniff([page])
    assert sniffer.done
    assert sniffer.title == expected


def test_no_title_yet_keeps_looking() -> None:
    sniffer = sniff([b"<!doctype html><html><head><meta charset=utf-8>"])
    assert not sniffer.done
    assert sniffer.title == ""
    sniffer.feed(b"<title>found</title>")
    assert sniffer.done
    assert sniffer.title == "found"
    sniffer.feed(b"<title>second</title>")  # done: later chunks are ignored
    assert sniffer.title == "found"


def test_title_in_other_encoding() -> None:
    assert sniff([b"<title>caf\xe9</title>"], encoding="iso-8859-1").title == "caf\u00e9"
    assert sniff([b"<title>caf\xc3\xa9</title>"], encoding="no-such-codec").title == "caf\u00e9"
    # UTF-16 spells "<title>" differently; it falls back to UTF-8 rather than misreading.
    assert sniff([b"<title>x</title>"], encoding="utf-16").title == "x"


def test_title_is_capped() -> None:
    sniffer = sniff([b"<title>", "\u00e9".encode() * 5000, b"</title>"])
    assert sniffer.done
    assert sniffer.title == "\u00e9" * TITLE_MAX_CHARS


def test_title_that_never_closes_is_cut_at_a_character_boundary() -> None:
    sniffer = sniff([b"<title>", "\u20ac".encode() * 3000])  # 9000 bytes, no </title>
    assert sniffer.done
    assert sniffer.title == "\u20ac" * TITLE_MAX_CHARS


def test_title_while_body_is_still_open() -> None:
    sniffer = sniff([b"<title>Partial caf\xc3"])
    assert not sniffer.done
    assert sniffer.title == "Partial caf"  # half a character is held back, not shown as U+FFFD


def test_title_after_32_kib_is_ignored() -> None:
    padding = (b"<head>" + b"<meta name=x content=y>" * (TITLE_SCAN_BYTES // 23 + 1))[:TITLE_SCAN_BYTES]
    assert len(padding) == TITLE_SCAN_BYTES
    sniffer = sniff([padding, b"<title>too late</title>"])
    assert sniffer.done
    assert sniffer.title == ""
    # Just inside the budget it is still found, even when split across chunks.
    early = b" " * (TITLE_SCAN_BYTES - 40) + b"<title>in time</title>"
    assert sniff([early[:-30], early[-30:]]).title == "in time"


def test_done_after_budget_without_title() -> None:
    sniffer = TitleSniffer()
    for _ in range(TITLE_SCAN_BYTES // 1000 + 1):
        sniffer.feed(b"<p>" + b"x" * 997)
    assert sniffer.done
    assert sniffer.title == ""


def test_sniffer_memory_is_bounded() -> None:
    chunk = b"<p>" + b"a" * 4093
    tracemalloc.start()
    try:
        for page_start in (b"<html><head>", b"<html><head><title>", b'<html><head><title x="'):
            sniffer = TitleSniffer()
            sniffer.feed(page_start)
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for _ in range(256):  # 1 MiB of body
                sniffer.feed(chunk)
            _, peak = tracemalloc.get_traced_memory()
            assert peak - base < 24 * 1024, (page_start, peak - base)
            assert sniffer.done
    finally:
        tracemalloc.stop()


# -------------------------------------------------------------------------------------------------- language


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("en-US,en;q=0.9", "en-us"),
        ("de", "de"),
        ("fr-CH, fr;q=0.9, en;q=0.8, de;q=0.7, *;q=0.5", "fr-ch"),
        ("fr;q=0.5, de", "de"),
        ("en;q=0.8, pt-BR;q=0.9", "pt-br"),
        ("en; q=0.8, es", "es"),
        ("zh-Hant-TW", "zh-hant-tw"),
        ("sr-Latn-RS;q=1.0", "sr-latn-rs"),
        ("*", ""),
        ("", ""),
        ("   ", ""),
        ("en;q=0", ""),
        ("en;q=abc, de;q=0.1", "de"),
        ("en;q=2", ""),
        ("<script>", ""),
        ("en_US", ""),
        ("a" * 9, ""),
        ("x-" + "-".join(["abcdefgh"] * 10), ""),
        (",,,;;;,", ""),
        ("en-US" + ",xx" * 10_000, "en-us"),
    ],
)
def test_primary_language(header: str, expected: str) -> None:
    assert primary_language(header) == expected


@given(st.text(max_size=200))
def test_primary_language_never_raises(header: str) -> None:
    language = primary_language(header)
    assert len(language) <= 35
    assert language == language.lower()


# ------------------------------------------------------------------------------------------------------ URLs


PAGE_URLS = [
    (make_scope("/downloads/"), "https://www.python.org/downloads/"),
    (make_scope("/s", query_string=b"q=py&utm_source=x"), "https://www.python.org/s?q=py&utm_source=x"),
    (make_scope("/caf\u00e9", raw_path=b"/caf%C3%A9"), "https://www.python.org/caf%C3%A9"),
    (make_scope("/caf\u00e9", raw_path=b"/caf\xc3\xa9"), "https://www.python.org/caf%C3%A9"),
    (make_scope("/a b", raw_path=None), "https://www.python.org/a%20b"),
    (make_scope("/x", query_string=b"a=<b>"), "https://www.python.org/x?a=%3Cb%3E"),
    (make_scope("/x", scheme="http"), "http://www.python.org/x"),
    (make_scope("/x", scheme="weird"), "http://www.python.org/x"),
    (make_scope("/x", headers=[]) | {"headers": [(b"host", b"Example.ORG:8443")]}, "https://example.org:8443/x"),
    (make_scope("/x") | {"headers": [(b"host", b"www.python.org:443")]}, "https://www.python.org/x"),
    (make_scope("/x") | {"headers": [(b"host", b"[::1]:8000")]}, "https://[::1]:8000/x"),
    (make_scope("/x") | {"headers": [(b"host", b"evil.org/x?")]}, "https://127.0.0.1:8000/x"),
    (make_scope("/x") | {"headers": [(b"host", b"a b")]}, "https://127.0.0.1:8000/x"),
    (make_scope("/x") | {"headers": [(b"host", b"x:99999")]}, "https://127.0.0.1:8000/x"),
    (make_scope("/x") | {"headers": []}, "https://127.0.0.1:8000/x"),
    (make_scope("/x") | {"headers": [], "server": ("::1", 443)}, "https://[::1]/x"),
    (make_scope("/x") | {"headers": [], "server": ("/run/gw.sock", None)}, "https://localhost/x"),
    (make_scope("/x") | {"headers": [], "server": None}, "https://localhost/x"),
    (make_scope("/x", raw_path=b"http://other/x"), "https://www.python.org/x"),
]


@pytest.mark.parametrize(("scope", "expected"), PAGE_URLS)
def test_page_url(scope: dict[str, Any], expected: str) -> None:
    assert page_url(scope) == expected


@pytest.mark.parametrize(("scope", "expected"), PAGE_URLS)
def test_a_deferred_page_view_completes_to_the_url_of_the_eager_one(scope: dict[str, Any], expected: str) -> None:
    """The middleware keeps a few scope values; the policy completes them into the same URL, once."""
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    event = Event.server_pageview(
        "", "https://ref.example/", "en-gb", "UA", "GB", "198.51.100.0", frozenset(), False, "", 1.0,
        page_request(scope, host),
    )  # fmt: skip
    assert event.url == ""  # nothing worked out on the request path
    complete_pageview(event)
    assert (event.url, event.request, event.referrer, event.language) == (
        expected,
        None,
        "https://ref.example/",
        "en-gb",
    )
    complete_pageview(event)  # idempotent
    assert event.url == expected


def test_request_host_lowercases_and_keeps_port() -> None:
    assert request_host(make_scope() | {"headers": [(b"host", b"LocalHost:8000")]}) == "localhost:8000"
