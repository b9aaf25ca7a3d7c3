"""IP truncation (security.md T3): known values, and properties over every address Hypothesis can make."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.anonymize import Truncator, truncate_ip

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@pytest.mark.parametrize(
    ("ip", "ipv4_prefix", "ipv6_prefix", "expected"),
    [
        ("203.0.113.77", 24, 48, "203.0.113.0"),
        ("203.0.113.0", 24, 48, "203.0.113.0"),
        ("2001:db8:85a3:1:2::3", 24, 48, "2001:db8:85a3::"),
        ("2001:db8:85a3:1234:5678::", 24, 56, "2001:db8:85a3:1200::"),
        ("2001:db8:85a3:1234:5678::", 24, 64, "2001:db8:85a3:1234::"),
        ("::ffff:203.0.113.77", 24, 48, "203.0.113.0"),  # IPv4-mapped truncates as IPv4
        ("fe80::1:2:3:4%eth0", 24, 48, "fe80::"),
        ("10.1.2.3", 16, 48, "10.1.0.0"),
        ("10.1.2.3", 8, 48, "10.0.0.0"),
        ("255.255.255.255", 24, 48, "255.255.255.0"),
        ("255.255.255.255", 0, 48, "0.0.0.0"),
        ("255.255.255.255", 32, 48, "255.255.255.255"),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 24, 48, "ffff:ffff:ffff::"),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 24, 0, "::"),
        ("2001:db8::1", 24, 128, "2001:db8::1"),
        ("::1.2.3.4", 24, 128, "::102:304"),  # glibc prints this one dotted; the canonical form is not
        ("::1", 24, 48, "::"),
    ],
)
def test_known_values(ip: str, ipv4_prefix: int, ipv6_prefix: int, expected: str) -> None:
    assert Truncator(ipv4_prefix, ipv6_prefix)(ip) == expected
    assert truncate_ip(ip, ipv4_prefix, ipv6_prefix) == expected


def test_defaults_are_24_and_48() -> None:
    assert truncate_ip("198.51.100.99") == "198.51.100.0"
    assert truncate_ip("2001:db8:1:2:3:4:5:6") == "2001:db8:1::"


@pytest.mark.parametrize("bad", ["", "garbage", "203.0.113.777", "1.2.3.4:80", "[2001:db8::1]", "unknown"])
def test_not_an_address_raises_without_echoing_it(bad: str) -> None:
    with pytest.raises(ValueError, match="not an IP address") as info:
        Truncator()(bad)
    assert not bad or bad not in str(info.value)


@pytest.mark.parametrize(("ipv4_prefix", "ipv6_prefix"), [(33, 48), (-1, 48), (24, 129), (24, -1), (True, 48)])
def test_bad_prefixes(ipv4_prefix: int, ipv6_prefix: int) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Truncator(ipv4_prefix, ipv6_prefix)
    with pytest.raises(ValueError, match="prefix"):
        truncate_ip("1.2.3.4", ipv4_prefix, ipv6_prefix)


def test_cache_is_bounded_and_correct() -> None:
    truncator = Truncator(cache_size=4)
    for i in range(50):
        assert truncator(f"198.51.{i}.7") == f"198.51.{i}.0"
        assert len(truncator._cache) <= 4


def _unmapped(ip: Address) -> Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@settings(deadline=None)
@given(st.ip_addresses(), st.integers(0, 32), st.integers(0, 128))
def test_truncated_address_is_the_network_of_the_original(ip: Address, ipv4_prefix: int, ipv6_prefix: int) -> None:
    result = Truncator(ipv4_prefix, ipv6_prefix)(str(ip))
    original = _unmapped(ip)
    prefix = ipv4_prefix if original.version == 4 else ipv6_prefix
    network = ipaddress.ip_network(f"{original}/{prefix}", strict=False)
    assert original in network
    assert ipaddress.ip_address(result) == network.network_address
    assert str(ipaddress.ip_address(result)) == result  # canonical, round-trips
    assert "%" not in result


@settings(deadline=None)
@given(st.ip_addresses())
def test_default_prefixes_stay_inside_24_or_48(ip: Address) -> None:
    result = ipaddress.ip_address(truncate_ip(str(ip)))
    original = _unmapped(ip)
    width = 24 if original.version == 4 else 48
    assert original in ipaddress.ip_network(f"{result}/{width}")


@settings(deadline=None)
@given(st.ip_addresses(), st.integers(0, 32), st.integers(0, 128))
def test_idempotent(ip: Address, ipv4_prefix: int, ipv6_prefix: int) -> None:
    truncate = Truncator(ipv4_prefix, ipv6_prefix)
    once = truncate(str(ip))
    assert truncate(once) == once


@settings(deadline=None)
@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_mapped_and_plain_ipv4_truncate_alike(ip: ipaddress.IPv4Address, ipv4_prefix: int) -> None:
    truncate = Truncator(ipv4_prefix, 48)
    assert truncate(f"::ffff:{ip}") == truncate(str(ip))
    assert truncate(str(ipaddress.IPv6Address(0xFFFF << 32 | int(ip)))) == truncate(str(ip))


@settings(deadline=None)
@given(st.ip_addresses(v=6), st.text(max_size=20))
def test_zone_ids_never_survive(ip: ipaddress.IPv6Address, zone: str) -> None:
    result = truncate_ip(f"{ip}%{zone}")
    assert "%" not in result
    assert result == truncate_ip(str(ip))
