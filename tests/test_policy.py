from __future__ import annotations

import email.utils
import time
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import load_settings
from gateway.policy import (
    DestinationPolicy,
    is_sensitive,
    origin,
    parse_retry_after,
    reduce_referrer,
    scrub_text,
    scrub_url,
    short_reason,
    truncate_url,
    truncate_utf8,
)
from gateway.sinks import PolicyDrop
from tests.sinks import CHROME_UA, make_event, python_org_overrides

PY_PARAMS = ("utm_source", "utm_medium", "utm_campaign", "q")


def policy(dest: str = "plausible", **top: Any) -> DestinationPolicy:
    overrides = python_org_overrides(**top)
    settings = load_settings(None, environ={}, overrides=overrides)
    return DestinationPolicy(settings.destinations[dest], settings)


def scrub(url: str) -> str | None:
    return scrub_url(url, allowed_query_params=PY_PARAMS)


# ------------------------------------------------------------------------------------------------------------
# Golden tests: real python.org URLs
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://www.python.org/downloads/release/python-3130/?utm_source=x&email=a@b.c#frag",
            "https://www.python.org/downloads/release/python-3130/?utm_source=x",
        ),
        (
            "https://www.python.org/accounts/password/reset/key/3-abc123def456abc123def456/",
            "https://www.python.org/accounts/password/reset/key/:redacted/",
        ),
        (  # Django's own reset view: uidb64 + token
            "https://www.python.org/accounts/reset/MTIzNDU/c3m2ys-4f7a6b2e1d9c8b7a6f5e4d3c2b1a0f9e/",
            "https://www.python.org/accounts/reset/MTIzNDU/:redacted/",
        ),
        (  # allauth e-mail confirmation key
            "https://www.python.org/accounts/confirm-email/MTI:1tAbcD:xYz9QwErTyUiOpAsDfGhJkL/",
            "https://www.python.org/accounts/confirm-email/:redacted/",
        ),
        ("https://www.python.org/search/?q=asyncio&submit=", "https://www.python.org/search/?q=asyncio"),
        ("https://www.python.org/search/?q=someone%40example.com", "https://www.python.org/search/?q=:redacted"),
        ("https://www.python.org/users/jane.doe@example.com/", "https://www.python.org/users/:redacted/"),
        ("https://www.python.org/users/jane.doe%40example.com/", "https://www.python.org/users/:redacted/"),
        ("https://www.python.org/users/jane.doe%2540example.com/", "https://www.python.org/users/:redacted/"),
        ("https://www.python.org/dev/peps/pep-0008/", "https://www.python.org/dev/peps/pep-0008/"),
        ("https://www.python.org/ftp/python/3.13.0/Python-3.13.0-amd64.exe", None),
        ("https://www.python.org/downloads/release/python-3130rc3/", None),
        ("https://www.python.org/jobs/7321/", None),
        (
            "https://www.python.org/psf/sponsorship/sponsors/#heading",
            "https://www.python.org/psf/sponsorship/sponsors/",
        ),
        (
            "https://www.python.org/events/python-events/1672/?page=2",
            "https://www.python.org/events/python-events/1672/",
        ),
        ("https://www.python.org/blogs/python-3-13-release-schedule/", None),
        ("https://www.python.org/about/Getting-Started-With-Python/", None),
        ("https://www.python.org/orders/123456789/", "https://www.python.org/orders/:redacted/"),
        ("https://www.python.org/orders/12345678/", None),
        (
            "https://www.python.org/s/550e8400-e29b-41d4-a716-446655440000/",
            "https://www.python.org/s/:redacted/",
        ),
        ("https://www.python.org/s/deadbeefcafebabe0123/", "https://www.python.org/s/:redacted/"),
        ("https://www.python.org/s/aB3dEfGhIjKlMnOpQ12-_x/", "https://www.python.org/s/:redacted/"),
        ("https://www.python.org/s/aB3dEfGhIjKlMnOpQ12%2B%2Fx%3D/", "https://www.python.org/s/:redacted/"),
        ("https://www.python.org/whois/198.51.100.77/", "https://www.python.org/whois/:redacted/"),
        ("https://www.python.org/whois/2001:db8:85a3::8a2e:370:7334/", "https://www.python.org/whois/:redacted/"),
        ("https://www.python.org/page;jsessionid=0123456789ABCDEF0123/", "https://www.python.org/:redacted/"),
        ("https://user:hunter2@www.python.org/members/", "https://www.python.org/members/"),
        ("HTTPS://WWW.Python.ORG:443/about/", "https://www.python.org/about/"),
        ("http://www.python.org:8080/about/", None),
        ("https://www.python.org", "https://www.python.org/"),
        ("https://www.python.org/caf\u00e9 menu/", "https://www.python.org/caf%C3%A9%20menu/"),
        ("https://b\u00fccher.example/", "https://xn--bcher-kva.example/"),
        ("https://[2001:db8::1]:8443/x", None),
        ("https://www.python.org/?utm_source=news;password=hunter2", "https://www.python.org/?utm_source=news"),
        (
            "https://www.python.org/?utm_source=a+b&utm_medium=%2Fpath",
            "https://www.python.org/?utm_source=a%20b&utm_medium=/path",
        ),
        ("https://www.python.org/?q=550e8400-e29b-41d4-a716-446655440000", "https://www.python.org/?q=:redacted"),
        ("https://www.python.org/?Q=x&UTM_SOURCE=y&utm_source", "https://www.python.org/?utm_source="),
    ],
)
def test_golden_urls(url: str, expected: str | None) -> None:
    assert scrub(url) == (expected if expected is not None else url)


@pytest.mark.parametrize(
    "url",
    ["javascript:alert(1)", "data:text/html,hi", "/relative/path", "", "https://", "ftp://x.org/", "http://exa mple/",
     "https://x.org:99999/", "https://[nothex]/"],
)  # fmt: skip
def test_not_http_urls_are_refused(url: str) -> None:
    assert scrub(url) is None
    assert origin(url) is None


def test_scrubbing_can_be_switched_off_but_the_query_allowlist_still_applies() -> None:
    url = "https://www.python.org/u/a@b.org/?email=a@b.org"
    assert scrub_url(url, allowed_query_params=(), scrub_segments=False) == "https://www.python.org/u/a@b.org/"


def test_placeholder_is_configurable() -> None:
    p = policy(urls={"allowed_query_params": [], "placeholder": "_"})
    assert p.page_url("https://www.python.org/u/a@b.org/") == "https://www.python.org/u/_/"


def test_destination_query_params_override_the_global_list() -> None:
    url = "https://www.python.org/?utm_source=x&q=y&ref=z"
    assert policy().page_url(url) == "https://www.python.org/?utm_source=x&q=y"
    assert policy(plausible={"allowed_query_params": ["ref"]}).page_url(url) == "https://www.python.org/?ref=z"
    assert policy(plausible={"allowed_query_params": []}).page_url(url) == "https://www.python.org/"


# ------------------------------------------------------------------------------------------------------------
# Sensitive-looking values
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sensitive"),
    [
        ("someone@example.com", True),
        ("550e8400-e29b-41d4-a716-446655440000", True),
        ("550E8400-E29B-41D4-A716-446655440000", True),
        ("0123456789abcdef", True),  # 16 hex
        ("0a1b2c3d4e5f6a7", False),  # 15 hex
        ("123456789", True),  # 9 digits
        ("12345678", False),
        ("aB3dEfGhIjKlMnOp", True),  # base64, 16
        ("aB3dEfGhIjKlMnO", False),  # 15
        ("Zm9vYmFyYmF6cXV4", True),
        ("internationalization", False),  # one lower-case word
        ("python-3-13-release-schedule", False),
        ("Getting-Started-With-Python", False),
        ("198.51.100.77", True),
        ("3.13.0", False),
        ("2001:db8::1", True),
        ("a:b", False),
        ("pep-0008", False),
        ("", False),
    ],
)
def test_is_sensitive(text: str, sensitive: bool) -> None:
    assert is_sensitive(text) is sensitive


def test_scrub_text_keeps_prose_and_user_agent_versions() -> None:
    text = "Reset for bob@example.com, token aB3dEfGhIjKlMnOpQ12, from 198.51.100.77 on Python 3.13.0"
    assert scrub_text(text, "[x]") == "Reset for [x], token [x], from [x] on Python 3.13.0"
    assert scrub_text(CHROME_UA, "[x]", product_versions=True) == CHROME_UA
    assert scrub_text("Bot/1.0 (+mailto:ops@example.com)", "[x]", product_versions=True) == "Bot/1.0 [x])"


# ------------------------------------------------------------------------------------------------------------
# Referrers
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("referrer", "expected"),
    [
        ("https://www.google.com/search?q=python+email%40x.org", "https://www.google.com/"),
        ("https://user:pw@mail.example.com:8443/inbox/1", "https://mail.example.com:8443/"),
        ("https://www.python.org/search/?q=async&csrf=1#top", "https://www.python.org/search/?q=async"),
        ("https://www.python.org/u/a@b.org/", "https://www.python.org/u/:redacted/"),
        ("https://docs.python.org/3/library/asyncio.html", "https://docs.python.org/"),  # another host is external
        ("https://example.net/page", "https://example.net/page"),  # the page's own host counts as own site
        ("http://198.51.100.77/admin", ""),  # an external bare address is dropped entirely
        ("android-app://com.google.android.gm/", ""),
        ("not a url", ""),
        ("", ""),
    ],
)
def test_referrer_reduction(referrer: str, expected: str) -> None:
    page = "https://example.net/" if "example.net" in referrer else "https://www.python.org/"
    result = reduce_referrer(referrer, page_url=page, own_hosts={"www.python.org"}, allowed_query_params=PY_PARAMS)
    assert result == expected


def test_own_hosts_come_from_site_origins() -> None:
    p = policy(site={"origins": ["https://www.python.org", "https://pypi.org"]})
    assert p.own_hosts == frozenset({"www.python.org", "pypi.org"})
    assert (
        p.referrer("https://pypi.org/project/x/?q=1&t=2", "https://www.python.org/")
        == "https://pypi.org/project/x/?q=1"
    )


# ------------------------------------------------------------------------------------------------------------
# Length helpers
# ------------------------------------------------------------------------------------------------------------


@given(st.text(max_size=60), st.integers(min_value=0, max_value=200))
def test_truncate_utf8_never_splits_characters(text: str, limit: int) -> None:
    cut = truncate_utf8(text, limit)
    assert len(cut.encode()) <= limit
    assert text.startswith(cut)


@given(
    st.lists(st.sampled_from(["abc", "%C3%A9", "%F0%9F%98%80", "/", "%2F", "x"]), max_size=80),
    st.integers(min_value=16, max_value=300),
    st.booleans(),
)
def test_truncate_url_never_leaves_a_broken_escape(pieces: list[str], limit: int, encoded: bool) -> None:
    url = "https://a.org/" + "".join(pieces) + "?utm_source=x"
    cut = truncate_url(url, limit, measure_encoded=encoded)
    measured = len(quote(cut, safe="-_.!~*'()")) if encoded else len(cut)
    assert measured <= limit or cut == ""
    assert url.startswith(cut)
    # Every escape complete and the percent-decoded path valid UTF-8.
    from urllib.parse import unquote_to_bytes

    assert "%" not in cut[-2:]
    unquote_to_bytes(cut.split("?")[0]).decode("utf-8")


# ------------------------------------------------------------------------------------------------------------
# The destination policy
# ------------------------------------------------------------------------------------------------------------


def test_apply_returns_only_allowed_fields() -> None:
    fields = policy().apply(make_event(title="T", props={"a": "b"}))
    assert fields.url == "https://www.python.org/downloads/"
    assert fields.referrer == "https://www.google.com/"
    assert fields.country == "GB" and fields.user_agent == CHROME_UA and fields.ip == "198.51.100.0"
    assert fields.title == "" and fields.language == "" and fields.props == {}
    bare = policy(plausible={"fields": ["name"]}).apply(make_event())
    assert (bare.url, bare.referrer, bare.ip, bare.user_agent, bare.country) == (
        "https://www.python.org/",
        "",
        "",
        "",
        "",
    )


def test_apply_refuses_without_consent_and_for_bad_urls() -> None:
    with pytest.raises(PolicyDrop) as info:
        policy("ga4").apply(make_event())
    assert info.value.reason == "consent"
    with pytest.raises(PolicyDrop) as info:
        policy().apply(make_event(url="javascript:alert(1)"))
    assert info.value.reason == "invalid_url"


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("198.51.100.0", "198.51.100.0"),
        ("198.51.100.77", "198.51.100.0"),  # a full address that got into an event anyway is truncated again
        ("2001:db8:85a3:8d3:1319:8a2e:370:7348", "2001:db8:85a3::"),
        ("not-an-ip", ""),
        ("", ""),
    ],
)
def test_ip_is_truncated_to_the_configured_prefix(ip: str, expected: str) -> None:
    assert policy().ip(ip) == expected


def test_ip_prefix_follows_settings() -> None:
    assert policy(anonymize={"ipv4_prefix": 16, "ipv6_prefix": 32}).ip("198.51.100.77") == "198.51.0.0"


@pytest.mark.parametrize(("value", "expected"), [("gb", "GB"), (" GB ", "GB"), ("GBR", ""), ("1A", ""), ("", "")])
def test_country(value: str, expected: str) -> None:
    assert DestinationPolicy.country(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"), [("en", "en"), ("en-GB", "en-gb"), ("zh_Hant_TW", "zh-hant-tw"), ("en;q=0.8", ""), ("x", "")]
)
def test_language(value: str, expected: str) -> None:
    assert DestinationPolicy.language(value) == expected


def test_title_and_user_agent_are_single_line_and_scrubbed() -> None:
    p = policy()
    assert p.title("  Reset\n\tpassword for bob@example.com ") == "Reset password for :redacted"
    assert p.user_agent("Agent/1.0\r\nX-Injected: 1 \u00e9") == "Agent/1.0 X-Injected: 1"
    assert len(p.user_agent("A" * 5000)) <= 512


def test_props_are_scalars_with_minimised_values() -> None:
    props = policy().props(
        {
            "section": "downloads",
            "author": "bob@example.com",
            "next": "https://www.python.org/x/?token=abc&utm_source=y#f",
            "path": "/reset/3-abc123def456abc123def456/?password=x",
            # An address whose local part starts with "/" (RFC 5322 atext allows it) is no site path: split at "/",
            # no segment would show the address (found by test_leak_property).
            "contact": "/@a.example",
            "site_path": "/@python/posts/",
            "count": 3,
            "flag": False,
            "list": [1],
            "empty": "",
            "a@b.org": "key looks like an e-mail",
            " ": "blank key",
        }
    )
    assert props == {
        "section": "downloads",
        "author": ":redacted",
        "next": "https://www.python.org/x/?utm_source=y",
        "path": "/reset/:redacted/",
        "contact": ":redacted",
        "site_path": "/@python/posts/",
        "count": "3",
        "flag": "false",
    }


def test_repr_names_the_policy_only() -> None:
    assert repr(policy()) == (
        "DestinationPolicy(name='plausible', fields=['country', 'ip', 'name', 'referrer', 'url', 'user_agent'], "
        "requires=[])"
    )


# ------------------------------------------------------------------------------------------------------------
# Wire helpers
# ------------------------------------------------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", 30.0),
        ("0", 0.0),
        ("999999999", 86_400.0),  # capped at a day
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),  # in the past: now
        ("Sun, 06 Nov 1994 08:49:37 -0000", 0.0),
        ("-5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_short_reason() -> None:
    assert short_reason("a\r\nb\x00c " + "x" * 500) == ("a b c " + "x" * 500)[:200]


@pytest.mark.parametrize(
    "text",
    ["a" * 200_000, "@" + "a" * 200_000, ":" * 200_000, "1." * 100_000, "aB3-" * 50_000],
    ids=["letters", "leading_at", "colons", "dotted_digits", "mixed_dashes"],
)
def test_scrubbing_is_linear_on_hostile_input(text: str) -> None:
    # A backtracking pattern would take minutes here; these must stay well under a second each.
    started = time.perf_counter()
    scrub_text(text, ":redacted")
    is_sensitive(text)
    scrub_url("https://www.python.org/" + text + "?q=" + text, allowed_query_params=PY_PARAMS)
    assert time.perf_counter() - started < 3.0
