"""Truncate client addresses to a network prefix (IPv4 /24 and IPv6 /48 by default).

This is the step after which a full address no longer exists: everything downstream of the middleware (the app,
logs, analytics destinations) sees only the network address. Universal Analytics' ``anonymize_ip`` zeroed the last
octet and the last 80 bits, which is the same default. IPv4-mapped IPv6 (``::ffff:a.b.c.d``) is unmapped first, so
it truncates exactly like the plain IPv4 address (docs/security.md T3).

Truncation is a mask on the packed address; results are kept in a small bounded cache (process memory only) because
the same visitors come back within seconds.
"""

from __future__ import annotations

import functools

from gateway.clientip import format_packed, packed_ip

__all__ = ["Truncator", "truncate_ip"]

_DEFAULT_CACHE_SIZE = 8192
_ALL_V4 = (1 << 32) - 1
_ALL_V6 = (1 << 128) - 1


def _checked_prefix(name: str, value: object, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= bits:
        raise ValueError(f"{name} must be an integer between 0 and {bits}, not {value!r}")
    return value


class Truncator:
    """``Truncator(24, 48)("203.0.113.77") == "203.0.113.0"``; callable, cheap, bounded cache.

    The argument is an address as :func:`gateway.clientip.normalize_ip` returns it; a zone id or an IPv4-mapped form
    is accepted too. Anything that is not an address raises :class:`ValueError` (without echoing the input, which
    may be a full client address).
    """

    __slots__ = ("_cache", "_cache_size", "_v4_mask", "_v6_mask", "ipv4_prefix", "ipv6_prefix")

    # The prefixes are typed ``object`` and checked here: a compiled (mypyc) ``int`` parameter would silently turn
    # True into 1, and a bool prefix is a configuration mistake, not a /1.
    def __init__(
        self, ipv4_prefix: object = 24, ipv6_prefix: object = 48, *, cache_size: int = _DEFAULT_CACHE_SIZE
    ) -> None:
        self.ipv4_prefix: int = _checked_prefix("ipv4_prefix", ipv4_prefix, 32)
        self.ipv6_prefix: int = _checked_prefix("ipv6_prefix", ipv6_prefix, 128)
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._v4_mask = _ALL_V4 ^ (_ALL_V4 >> self.ipv4_prefix)
        self._v6_mask = _ALL_V6 ^ (_ALL_V6 >> self.ipv6_prefix)
        self._cache: dict[str, str] = {}
        self._cache_size = cache_size

    def __call__(self, ip: str) -> str:
        truncated = self._cache.get(ip)
        if truncated is not None:
            return truncated
        packed = packed_ip(ip)
        if packed is None:
            raise ValueError("not an IP address")
        if len(packed) == 4:
            truncated = format_packed((int.from_bytes(packed) & self._v4_mask).to_bytes(4))
        else:
            truncated = format_packed((int.from_bytes(packed) & self._v6_mask).to_bytes(16))
        cache = self._cache
        if len(cache) >= self._cache_size:
            cache.clear()  # O(1) amortised bound; the working set refills it quickly
        cache[ip] = truncated
        return truncated

    def __repr__(self) -> str:
        return f"Truncator(ipv4_prefix={self.ipv4_prefix}, ipv6_prefix={self.ipv6_prefix})"


@functools.lru_cache(maxsize=8, typed=True)
def _truncator(ipv4_prefix: object, ipv6_prefix: object) -> Truncator:
    return Truncator(ipv4_prefix, ipv6_prefix)


def truncate_ip(ip: str, ipv4_prefix: object = 24, ipv6_prefix: object = 48) -> str:
    """The network address of ``ip`` at the given prefix lengths, as canonical text (see :class:`Truncator`)."""
    return _truncator(ipv4_prefix, ipv6_prefix)(ip)
