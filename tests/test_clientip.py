"""Client-IP resolution: trusted proxies, X-Forwarded-For, Forwarded (RFC 7239), validation (security.md T1-T3).

The main table follows uvicorn's tests/middleware/test_proxy_headers.py: (trusted, sources, peer, headers, expected).
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clientip import (
    DEFAULT_SOURCES,
    FORWARDING_HEADERS,
    MAX_HOPS,
    SOURCES,
    ClientIPResolver,
    TrustedProxies,
    normalize_ip,
)

PROXY_NET = "10.0.0.0/8"
PROXY = "10.0.0.1"  # the TCP peer when we sit behind our own load balancer
PROXY_NET_V6 = "2001:db8:ffff::/48"
PROXY_V6 = "2001:db8:ffff::1"
TRUSTED = (PROXY_NET, PROXY_NET_V6)
VISITOR = "203.0.113.7"  # a direct, untrusted peer
ALL = SOURCES  # every source, in the documented order
DEF = DEFAULT_SOURCES
XFF = "x-forwarded-for"
FWD = "forwarded"
FASTLY = "fastly-client-ip"

Headers = tuple[tuple[str, str], ...]


def _raw(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


CASES: list[tuple[str, tuple[str, ...], tuple[str, ...], str | None, Headers, str | None]] = [
    # --- untrusted peers: every forwarding header is ignored (T1) ---
    ("no-proxies-configured", (), DEF, VISITOR, ((XFF, "1.2.3.4"),), VISITOR),
    ("untrusted-peer-spoofed-xff", TRUSTED, DEF, VISITOR, ((XFF, "1.2.3.4"),), VISITOR),
    ("untrusted-peer-spoofed-fastly", TRUSTED, DEF, VISITOR, ((FASTLY, "1.2.3.4"),), VISITOR),
    ("untrusted-peer-spoofed-forwarded", TRUSTED, DEF, VISITOR, ((FWD, "for=1.2.3.4"),), VISITOR),
    ("untrusted-peer-spoofed-all", TRUSTED, ALL, VISITOR, tuple((s, "1.2.3.4") for s in ALL), VISITOR),
    ("untrusted-peer-trusted-looking-xff", TRUSTED, DEF, VISITOR, ((XFF, "10.0.0.9"),), VISITOR),
    # --- trusted peer, X-Forwarded-For walked right to left ---
    ("trusted-peer-no-headers", TRUSTED, DEF, PROXY, (), PROXY),
    ("trusted-peer-one-hop", TRUSTED, DEF, PROXY, ((XFF, "1.2.3.4"),), "1.2.3.4"),
    ("attacker-prefix-rightmost-wins", TRUSTED, DEF, PROXY, ((XFF, "6.6.6.6, 1.2.3.4"),), "1.2.3.4"),
    ("trusted-chain-3-hops", TRUSTED, DEF, PROXY, ((XFF, "6.6.6.6,1.2.3.4,10.0.0.2,10.9.9.9"),), "1.2.3.4"),
    ("all-hops-trusted-leftmost", TRUSTED, DEF, PROXY, ((XFF, "10.0.0.5, 10.0.0.2"),), "10.0.0.5"),
    ("two-xff-lines-joined", TRUSTED, DEF, PROXY, ((XFF, "6.6.6.6"), (XFF, "1.2.3.4")), "1.2.3.4"),
    ("two-xff-lines-trusted-last", TRUSTED, DEF, PROXY, ((XFF, "1.2.3.4"), (XFF, "10.0.0.2")), "1.2.3.4"),
    ("empty-xff", TRUSTED, DEF, PROXY, ((XFF, ""),), PROXY),
    # RFC 9110 §5.6.1: empty list elements are ignored wherever they are; garbage still ends the walk.
    ("empty-entry-rightmost", TRUSTED, DEF, PROXY, ((XFF, " , 10.0.0.2"),), "10.0.0.2"),
    ("empty-entries-left-ignored", TRUSTED, DEF, PROXY, ((XFF, ", , 9.9.9.9"),), "9.9.9.9"),
    ("empty-entries-middle-skipped", TRUSTED, DEF, PROXY, ((XFF, "9.9.9.9 , , , 10.0.0.2"),), "9.9.9.9"),
    ("empty-entries-both-sides", TRUSTED, DEF, PROXY, ((XFF, " , 9.9.9.9 , "),), "9.9.9.9"),
    ("empty-entries-tabs", TRUSTED, DEF, PROXY, ((XFF, "9.9.9.9,\t,,10.0.0.2,"),), "9.9.9.9"),
    ("empty-entries-only", TRUSTED, DEF, PROXY, ((XFF, " , ,, "),), PROXY),
    ("empty-entry-own-line", TRUSTED, DEF, PROXY, ((XFF, "9.9.9.9"), (XFF, " ")), "9.9.9.9"),
    ("empty-then-garbage-stops", TRUSTED, DEF, PROXY, ((XFF, "6.6.6.6, garbage , , 10.0.0.2"),), PROXY),
    ("empty-entries-ipv6", TRUSTED, DEF, PROXY_V6, ((XFF, ", 2001:db8::7 ,"),), "2001:db8::7"),
    ("garbage-rightmost", TRUSTED, DEF, PROXY, ((XFF, "1.2.3.4, garbage"),), PROXY),
    ("garbage-not-skipped", TRUSTED, DEF, PROXY, ((XFF, "6.6.6.6, garbage, 10.0.0.2"),), PROXY),
    ("p2-zone-script-then-garbage", TRUSTED, DEF, PROXY, ((XFF, "fe80::1%<script>, garbage"),), PROXY),
    ("zone-id-script-stripped", TRUSTED, DEF, PROXY, ((XFF, "fe80::1%<script>alert(1)</script>"),), "fe80::1"),
    ("zone-id-newline-stripped", TRUSTED, DEF, PROXY, ((XFF, "fe80::1%a\nb"),), "fe80::1"),
    ("xff-port-invalid", TRUSTED, DEF, PROXY, ((XFF, "1.2.3.4:5678"),), PROXY),
    ("xff-brackets-invalid", TRUSTED, DEF, PROXY, ((XFF, "[2001:db8::1]"),), PROXY),
    ("xff-unknown", TRUSTED, DEF, PROXY, ((XFF, "unknown"),), PROXY),
    ("xff-leading-zero-octet", TRUSTED, DEF, PROXY, ((XFF, "010.0.0.1"),), PROXY),
    ("xff-ipv4-mapped-unmapped", TRUSTED, DEF, PROXY, ((XFF, "::ffff:1.2.3.4"),), "1.2.3.4"),
    ("xff-mapped-trusted-hop", TRUSTED, DEF, PROXY, ((XFF, "1.2.3.4, ::ffff:10.0.0.2"),), "1.2.3.4"),
    ("xff-uppercase-ipv6", TRUSTED, DEF, PROXY, ((XFF, "2001:DB8:0:0:0:0:0:1"),), "2001:db8::1"),
    # --- IPv6 peers and chains ---
    ("ipv6-trusted-chain", TRUSTED, DEF, PROXY_V6, ((XFF, "2001:db8::abcd, 2001:db8:ffff::2"),), "2001:db8::abcd"),
    ("ipv6-peer-untrusted-canonical", TRUSTED, DEF, "2001:DB8:1:0::1", ((XFF, "1.2.3.4"),), "2001:db8:1::1"),
    ("ipv6-peer-ipv4-client", TRUSTED, DEF, PROXY_V6, ((XFF, "6.6.6.6, 1.2.3.4"),), "1.2.3.4"),
    ("mixed-chain-v4-v6", TRUSTED, DEF, PROXY, ((XFF, "2001:db8::7, 2001:db8:ffff::9, 10.0.0.3"),), "2001:db8::7"),
    # --- IPv4-mapped peers against IPv4 CIDRs (P4) ---
    ("mapped-peer-trusted", TRUSTED, DEF, "::ffff:10.0.0.1", ((XFF, "1.2.3.4"),), "1.2.3.4"),
    ("mapped-peer-untrusted", TRUSTED, DEF, "::ffff:203.0.113.7", ((XFF, "1.2.3.4"),), VISITOR),
    ("mapped-cidr-matches-v4-peer", ("::ffff:10.0.0.0/104",), DEF, PROXY, ((XFF, "1.2.3.4"),), "1.2.3.4"),
    ("single-address-trusted", ("127.0.0.1",), DEF, "127.0.0.1", ((XFF, "1.2.3.4"),), "1.2.3.4"),
    # --- peers with zone ids and garbage ---
    ("peer-zone-script", TRUSTED, DEF, "fe80::1%<script>", (), "fe80::1"),
    ("peer-zone-crlf", TRUSTED, DEF, "fe80::1%eth0\r\nX-Injected: 1", (), "fe80::1"),
    ("peer-zone-trusted", ("fe80::/10",), DEF, "fe80::1%eth0", ((XFF, "1.2.3.4"),), "1.2.3.4"),
    ("peer-testclient", TRUSTED, DEF, "testclient", ((XFF, "1.2.3.4"),), None),
    ("peer-none", TRUSTED, DEF, None, ((XFF, "1.2.3.4"),), None),
    ("peer-empty", TRUSTED, DEF, "", ((XFF, "1.2.3.4"),), None),
    ("peer-garbage-trusted-client-fallback", TRUSTED, DEF, "garbage", (), None),
    # --- single-value headers and source order ---
    ("fastly-from-trusted", TRUSTED, DEF, PROXY, ((FASTLY, "1.2.3.4"),), "1.2.3.4"),
    ("fastly-before-xff", TRUSTED, DEF, PROXY, ((XFF, "5.6.7.8"), (FASTLY, "1.2.3.4")), "1.2.3.4"),
    ("fastly-garbage-falls-back", TRUSTED, DEF, PROXY, ((FASTLY, "garbage"), (XFF, "5.6.7.8")), "5.6.7.8"),
    ("fastly-comma-list-invalid", TRUSTED, DEF, PROXY, ((FASTLY, "1.2.3.4, 5.6.7.8"),), PROXY),
    ("fastly-two-lines-ambiguous", TRUSTED, DEF, PROXY, ((FASTLY, "1.2.3.4"), (FASTLY, "5.6.7.8")), PROXY),
    ("fastly-whitespace", TRUSTED, DEF, PROXY, ((FASTLY, "  1.2.3.4\t"),), "1.2.3.4"),
    ("configured-order-xff-first", TRUSTED, (XFF, FASTLY), PROXY, ((FASTLY, "1.2.3.4"), (XFF, "5.6.7.8")), "5.6.7.8"),
    ("unconfigured-source-ignored", TRUSTED, (XFF,), PROXY, (("x-real-ip", "1.2.3.4"),), PROXY),
    ("x-real-ip", TRUSTED, ("x-real-ip",), PROXY, (("x-real-ip", "1.2.3.4"),), "1.2.3.4"),
    (
        "cf-connecting-ip-v6",
        TRUSTED,
        ("cf-connecting-ip",),
        PROXY,
        (("cf-connecting-ip", "2001:db8::5"),),
        "2001:db8::5",
    ),
    ("true-client-ip", TRUSTED, ("true-client-ip",), PROXY, (("true-client-ip", "1.2.3.4"),), "1.2.3.4"),
    # --- Forwarded (RFC 7239, T2) ---
    ("fwd-rfc-example", TRUSTED, (FWD,), PROXY, ((FWD, "for=192.0.2.60;proto=http;by=203.0.113.43"),), "192.0.2.60"),
    ("fwd-quoted-ipv6-port", TRUSTED, (FWD,), PROXY, ((FWD, 'for="[2001:db8:cafe::17]:4711"'),), "2001:db8:cafe::17"),
    ("fwd-quoted-ipv6", TRUSTED, (FWD,), PROXY, ((FWD, 'For="[2001:db8:cafe::17]"'),), "2001:db8:cafe::17"),
    ("fwd-quoted-ipv4-port", TRUSTED, (FWD,), PROXY, ((FWD, 'for="192.0.2.43:47011"'),), "192.0.2.43"),
    ("fwd-obfuscated-port", TRUSTED, (FWD,), PROXY, ((FWD, 'for="[2001:db8::1]:_p0rt"'),), "2001:db8::1"),
    ("fwd-port-too-long", TRUSTED, (FWD,), PROXY, ((FWD, 'for="192.0.2.43:123456"'),), PROXY),
    ("fwd-unknown", TRUSTED, (FWD,), PROXY, ((FWD, "for=unknown"),), PROXY),
    ("fwd-obfuscated-node", TRUSTED, (FWD,), PROXY, ((FWD, "for=_hidden"),), PROXY),
    ("fwd-obfuscated-stops-walk", TRUSTED, (FWD,), PROXY, ((FWD, "for=1.2.3.4, for=_hidden"),), PROXY),
    ("fwd-quoted-comma-semicolon", TRUSTED, (FWD,), PROXY, ((FWD, 'for=1.2.3.4;ext="a,for=6.6.6.6;x"'),), "1.2.3.4"),
    ("fwd-jshttp-1", TRUSTED, (FWD,), PROXY, ((FWD, 'user="bad,for=_whitelisted_ip";for=_blacklisted_ip'),), PROXY),
    ("fwd-escaped-quote", TRUSTED, (FWD,), PROXY, ((FWD, r'for=1.2.3.4;ext="a\"b,for=6.6.6.6"'),), "1.2.3.4"),
    ("fwd-escaped-backslash", TRUSTED, (FWD,), PROXY, ((FWD, r'for="1.2.3.4";ext="a\\", for=10.0.0.2'),), "1.2.3.4"),
    ("fwd-trusted-hops", TRUSTED, (FWD,), PROXY, ((FWD, "for=6.6.6.6, for=1.2.3.4, for=10.0.0.2"),), "1.2.3.4"),
    ("fwd-all-trusted", TRUSTED, (FWD,), PROXY, ((FWD, "for=10.0.0.7, for=10.0.0.2"),), "10.0.0.7"),
    ("fwd-garbage-prefix", TRUSTED, (FWD,), PROXY, ((FWD, 'for="unterminated, for=1.2.3.4'),), "1.2.3.4"),
    ("fwd-garbage-prefix-line", TRUSTED, (FWD,), PROXY, ((FWD, '";;=,"\\'), (FWD, "for=1.2.3.4")), "1.2.3.4"),
    ("fwd-broken-rightmost", TRUSTED, (FWD,), PROXY, ((FWD, "for=1.2.3.4, for=10.0.0.2;;x y"),), PROXY),
    ("fwd-unquoted-ipv6-invalid", TRUSTED, (FWD,), PROXY, ((FWD, "for=2001:db8::1"),), PROXY),
    ("fwd-unbracketed-ipv6-invalid", TRUSTED, (FWD,), PROXY, ((FWD, 'for="2001:db8::1"'),), PROXY),
    ("fwd-bracketed-ipv4-invalid", TRUSTED, (FWD,), PROXY, ((FWD, 'for="[1.2.3.4]"'),), PROXY),
    ("fwd-duplicate-for", TRUSTED, (FWD,), PROXY, ((FWD, "for=1.2.3.4;for=5.6.7.8"),), PROXY),
    ("fwd-no-for", TRUSTED, (FWD,), PROXY, ((FWD, "proto=https;by=10.0.0.2"),), PROXY),
    ("fwd-empty-elements", TRUSTED, (FWD,), PROXY, ((FWD, "for=1.2.3.4 , ,for=10.0.0.2,"),), "1.2.3.4"),
    ("fwd-empty-elements-both-sides", TRUSTED, (FWD,), PROXY, ((FWD, " , for=9.9.9.9 , "),), "9.9.9.9"),
    ("fwd-empty-elements-only", TRUSTED, (FWD,), PROXY, ((FWD, " , ,, "),), PROXY),
    ("fwd-empty-then-garbage-stops", TRUSTED, (FWD,), PROXY, ((FWD, "for=6.6.6.6, for=x y, , for=10.0.0.2"),), PROXY),
    ("fwd-zone-id-in-brackets", TRUSTED, (FWD,), PROXY, ((FWD, 'for="[fe80::1%<script>]"'),), "fe80::1"),
    ("fwd-falls-back-to-xff", TRUSTED, (FWD, XFF), PROXY, ((FWD, "for=unknown"), (XFF, "1.2.3.4")), "1.2.3.4"),
    ("fwd-untrusted-peer", TRUSTED, (FWD,), VISITOR, ((FWD, "for=1.2.3.4"),), VISITOR),
]


@pytest.mark.parametrize(
    ("trusted", "sources", "peer", "headers", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_resolve(
    trusted: tuple[str, ...], sources: tuple[str, ...], peer: str | None, headers: Headers, expected: str | None
) -> None:
    resolver = ClientIPResolver(trusted, sources)
    assert resolver.resolve(peer, _raw(headers)) == expected
    # A second call answers from the cache and must agree.
    assert resolver.resolve(peer, _raw(headers)) == expected


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


def test_non_lowercase_header_names_are_not_read() -> None:
    # ASGI names are lower-case; anything else did not come from a server, and ignoring it errs on the safe side.
    resolver = ClientIPResolver(TRUSTED)
    assert resolver.resolve(PROXY, [(b"X-Forwarded-For", b"1.2.3.4")]) == PROXY


@pytest.mark.parametrize(("trusted_hops", "expected"), [(MAX_HOPS - 1, "1.2.3.4"), (MAX_HOPS + 5, PROXY)])
def test_hop_limit(trusted_hops: int, expected: str) -> None:
    resolver = ClientIPResolver(TRUSTED)
    xff = ", ".join(["6.6.6.6", "1.2.3.4", *["10.0.0.2"] * trusted_hops])
    assert resolver.resolve(PROXY, [(b"x-forwarded-for", xff.encode())]) == expected
    forwarded = ", ".join(["for=6.6.6.6", "for=1.2.3.4", *["for=10.0.0.2"] * trusted_hops])
    assert ClientIPResolver(TRUSTED, (FWD,)).resolve(PROXY, [(b"forwarded", forwarded.encode())]) == expected


def test_huge_header_stays_cheap_and_uncached() -> None:
    resolver = ClientIPResolver(TRUSTED, cache_size=16)
    huge = "1" * 60_000
    assert resolver.resolve(PROXY, [(b"x-forwarded-for", huge.encode())]) == PROXY
    assert huge not in resolver._cache


def test_cache_is_bounded() -> None:
    resolver = ClientIPResolver(TRUSTED, cache_size=8)
    for i in range(100):
        assert resolver.resolve(f"198.51.100.{i}", []) == f"198.51.100.{i}"
        assert len(resolver._cache) <= 8
    assert resolver.resolve(PROXY, [(b"x-forwarded-for", b"1.2.3.4")]) == "1.2.3.4"


# --------------------------------------------------------------------------------------------------------------
# normalize_ip and TrustedProxies
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7\t", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("::FFFF:cb00:7107", "203.0.113.7"),
        ("2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),  # RFC 5952 §4.2.2: no "::" for one zero field
        ("::1.2.3.4", "::102:304"),  # IPv4-compatible (deprecated) stays IPv6; only ::ffff:0:0/96 is unmapped
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%<script>", "fe80::1"),
        ("fe80::1%a\nb", "fe80::1"),
        ("::ffff:10.0.0.1%x", "10.0.0.1"),
        ("1.2.3.4%eth0", None),  # zone ids exist for IPv6 only
        ("010.0.0.1", None),  # CVE-2021-29921
        ("1.2.3", None),
        ("1.2.3.4:80", None),
        ("[2001:db8::1]", None),
        ("1.2.3.4\x00", None),
        ("١.٢.٣.٤", None),
        ("", None),
        ("   ", None),
        ("unknown", None),
        ("_hidden", None),
        ("1" * 200, None),
    ],
)
def test_normalize_ip(text: str, expected: str | None) -> None:
    assert normalize_ip(text) == expected


def test_trusted_proxies() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32", "::ffff:198.51.100.0/120", "10.1.2.3/16"])
    assert proxies
    assert not TrustedProxies([])
    assert "10.255.0.1" in proxies
    assert "::ffff:10.255.0.1" in proxies  # P4
    assert "192.0.2.1" in proxies
    assert "192.0.2.2" not in proxies
    assert "2001:db8:1::1" in proxies
    assert "2001:db9::1" not in proxies
    assert "198.51.100.77" in proxies  # mapped network stored as IPv4
    assert "198.51.101.1" not in proxies
    assert "fe80::1%eth0" not in proxies
    assert "garbage" not in proxies
    assert 42 not in proxies


def test_trust_is_explicit_not_is_private() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert "192.168.1.1" not in proxies
    assert "127.0.0.1" not in proxies


@pytest.mark.parametrize("bad", ["10.0.0.300/8", "*", "", "10.0.0.0/33", "unix:/tmp/sock"])
def test_trusted_proxies_reject_bad_networks(bad: str) -> None:
    with pytest.raises(ValueError):  # ipaddress raises its own ValueError subclasses with varying messages
        TrustedProxies([bad])


def test_trusted_proxies_reject_a_bare_string() -> None:
    with pytest.raises(TypeError):
        TrustedProxies("10.0.0.0/8")


@pytest.mark.parametrize("sources", [("x-forwarded-host",), (XFF, XFF)])
def test_resolver_rejects_bad_sources(sources: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="source"):
        ClientIPResolver(TRUSTED, sources)


def test_resolver_accepts_source_names_in_any_case() -> None:
    resolver = ClientIPResolver(TRUSTED, ("X-Forwarded-For",))
    assert resolver.resolve(PROXY, [(b"x-forwarded-for", b"1.2.3.4")]) == "1.2.3.4"


def test_forwarding_headers_cover_every_source() -> None:
    assert {s.encode() for s in SOURCES} <= FORWARDING_HEADERS
    assert all(name == name.lower() for name in FORWARDING_HEADERS)


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------

_RESOLVER = ClientIPResolver(TRUSTED, ALL)
_trusted_v4 = st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address((10 << 24) | n)))
_trusted_v6 = st.integers(0, 2**80 - 1).map(lambda n: str(ipaddress.IPv6Address((0x20010DB8FFFF << 80) | n)))
_trusted_hop = st.one_of(_trusted_v4, _trusted_v6)
_untrusted = st.ip_addresses().filter(lambda ip: normalize_ip(str(ip)) not in _RESOLVER.trusted)
_header_text = st.text(st.characters(max_codepoint=255), max_size=60)


def _forwarded_node(ip: str, style: int) -> str:
    if ":" in ip:
        return f'"[{ip}]"' if style % 2 else f'"[{ip}]:{style}"'
    return ip if style % 2 else f'"{ip}:{style}"'


@settings(max_examples=300, deadline=None)
@given(
    prefix=_header_text,
    real=_untrusted,
    hops=st.lists(_trusted_hop, max_size=4),
    peer=_trusted_hop,
    split_lines=st.booleans(),
)
def test_attacker_xff_prefix_never_wins(
    prefix: str, real: ipaddress.IPv4Address | ipaddress.IPv6Address, hops: list[str], peer: str, split_lines: bool
) -> None:
    expected = normalize_ip(str(real))
    ours = ", ".join([str(real), *hops])
    lines = [prefix, ours] if split_lines else [f"{prefix}, {ours}"]
    headers = [(b"x-forwarded-for", line.encode("latin-1")) for line in lines]
    assert ClientIPResolver(TRUSTED).resolve(peer, headers) == expected


@settings(max_examples=300, deadline=None)
@given(
    prefix=_header_text,
    real=_untrusted,
    hops=st.lists(_trusted_hop, max_size=4),
    peer=_trusted_hop,
    style=st.integers(1, 65535),
    split_lines=st.booleans(),
)
def test_attacker_forwarded_prefix_never_wins(
    prefix: str,
    real: ipaddress.IPv4Address | ipaddress.IPv6Address,
    hops: list[str],
    peer: str,
    style: int,
    split_lines: bool,
) -> None:
    expected = normalize_ip(str(real))
    elements = [f"for={_forwarded_node(str(real), style)};proto=https"]
    elements += [f"for={_forwarded_node(hop, style + i)}" for i, hop in enumerate(hops)]
    ours = ", ".join(elements)
    lines = [prefix, ours] if split_lines else [f"{prefix}, {ours}"]
    headers = [(b"forwarded", line.encode("latin-1")) for line in lines]
    assert ClientIPResolver(TRUSTED, (FWD,)).resolve(peer, headers) == expected


@settings(deadline=None)
@given(st.text(max_size=80))
def test_normalize_ip_output_is_clean(text: str) -> None:
    result = normalize_ip(text)
    if result is not None:
        assert "%" not in result
        assert not any(ch.isspace() for ch in result)
        assert str(ipaddress.ip_address(result)) == result


@settings(deadline=None)
@given(st.ip_addresses(), st.text(st.characters(max_codepoint=0x10FFFF), max_size=20), st.sampled_from(["", " ", "\t"]))
def test_normalize_ip_is_canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str, padding: str) -> None:
    expected = str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)
    assert normalize_ip(f"{padding}{ip}{padding}") == expected
    assert normalize_ip(expected) == expected  # idempotent
    if isinstance(ip, ipaddress.IPv6Address):
        assert normalize_ip(f"{ip}%{zone}") == expected


_header_names = st.sampled_from([s.encode() for s in ALL] + [b"x-forwarded-for", b"forwarded", b"host", b"X-Real-IP"])


@settings(max_examples=500, deadline=None)
@given(
    peer=st.one_of(st.none(), st.text(max_size=50), _trusted_hop, st.ip_addresses().map(str)),
    headers=st.lists(st.tuples(st.one_of(_header_names, st.binary(max_size=20)), st.binary(max_size=120)), max_size=8),
)
def test_resolve_never_raises(peer: str | None, headers: list[tuple[bytes, bytes]]) -> None:
    result = _RESOLVER.resolve(peer, headers)
    if result is not None:
        assert str(ipaddress.ip_address(result)) == result
        assert "%" not in result


_networks = st.one_of(
    st.ip_addresses(v=4).map(lambda a: (a, 32)), st.ip_addresses(v=6).map(lambda a: (a, 128))
).flatmap(
    lambda pair: st.integers(0, pair[1]).map(lambda prefix: ipaddress.ip_network(f"{pair[0]}/{prefix}", strict=False))
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_networks, max_size=6), st.lists(st.ip_addresses(), min_size=1, max_size=6))
def test_trusted_proxies_agree_with_ipaddress(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    proxies = TrustedProxies([str(network) for network in networks])
    for address in addresses + [network.network_address for network in networks]:
        plain = address.ipv4_mapped or address if isinstance(address, ipaddress.IPv6Address) else address
        expected = any(
            plain in network
            or (  # a mapped network in the config covers the IPv4 addresses it maps
                isinstance(network, ipaddress.IPv6Network)
                and network.prefixlen >= 96
                and network.network_address.ipv4_mapped is not None
                and isinstance(plain, ipaddress.IPv4Address)
                and ipaddress.IPv6Address(0xFFFF << 32 | int(plain)) in network
            )
            for network in networks
        )
        assert (str(address) in proxies) is expected
