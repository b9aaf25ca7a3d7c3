"""Who is the client? Trusted proxies, forwarding headers and address validation.

The rule (docs/security.md T1, T2, T3):

* Forwarding headers are read **only** when the TCP peer is inside one of the configured proxy networks. From any
  other peer they are attacker-controlled text and are ignored (the middleware also strips them, see
  :data:`FORWARDING_HEADERS`).
* Sources are tried in the configured order; the first one that yields a valid address wins, the peer is the last
  resort.
* ``X-Forwarded-For`` and ``Forwarded`` are walked **right to left**: every proxy appends what it saw, so only the
  right-hand part was written by infrastructure we trust. Hops that are themselves trusted proxies are skipped; the
  first untrusted address is the client. An entry that is not a valid address stops the walk and the source yields
  nothing: skipping it would let the client's own text further left win. If every entry is trusted the leftmost
  one is the client (uvicorn's semantics, encode/uvicorn#1068).
* Every candidate is validated and normalised by :func:`normalize_ip`: zone ids are dropped (RFC 4007 puts no limit
  on their characters, so ``fe80::1%<script>`` is a "valid" address to :mod:`ipaddress`), IPv4-mapped IPv6 is
  unmapped (otherwise ``::ffff:10.0.0.1`` is not in ``10.0.0.0/8``), and the text is canonical.

Trust is decided by explicit CIDR lists only, never by ``is_private``/``is_global`` (their ranges were wrong until
CVE-2024-4032 and still change).

Speed: the resolver runs on every request. Parsing uses :func:`socket.inet_pton` and integer masks instead of
:mod:`ipaddress` objects, and a bounded in-memory cache maps peer/hop text to its parsed form, so the common case
(peer not trusted) is one dict lookup. The cache holds full addresses in process memory only; nothing here logs.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence

from gateway.config import CLIENT_IP_SOURCES

__all__ = [
    "DEFAULT_SOURCES",
    "FORWARDING_HEADERS",
    "MAX_HOPS",
    "SOURCES",
    "ClientIPResolver",
    "TrustedProxies",
    "format_packed",
    "normalize_ip",
    "packed_ip",
    "parse_ip",
]

# Every source the resolver understands, in no particular order (the config validates against the same list).
SOURCES: tuple[str, ...] = CLIENT_IP_SOURCES
DEFAULT_SOURCES: tuple[str, ...] = ("fastly-client-ip", "x-forwarded-for", "forwarded")

# Request headers that carry a client address. The middleware strips all of them from every request before the app
# or the upstream sees it, and sets its own: whatever a client sent there is either spoofed or the full address.
FORWARDING_HEADERS: frozenset[bytes] = frozenset(
    {
        b"x-forwarded-for",
        b"x-real-ip",
        b"forwarded",
        b"fastly-client-ip",
        b"cf-connecting-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        # Less common spellings that frameworks still read (PHP's HTTP_CLIENT_IP, ingress-nginx, Microsoft proxies).
        b"client-ip",
        b"forwarded-for",
        b"x-forwarded",
        b"x-original-forwarded-for",
        # Plausible reads these before X-Forwarded-For (protocols.md §1.3): never let a visitor's value through.
        b"b-forwarded-for",
        b"x-plausible-ip",
        b"x-plausible-ip-type",
    }
)

_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_inet_pton = socket.inet_pton
_inet_ntop = socket.inet_ntop
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"  # ::ffff:0:0/96, RFC 4291 §2.5.5.2
# The longest textual address is 45 characters (IPv6 with an embedded IPv4); leave room for a short zone id and
# surrounding spaces. Longer text is rejected before any work and never becomes a cache key.
_MAX_ADDRESS_TEXT = 100
# A real chain has a handful of proxies. Walking further would let one request cost milliseconds (a 64 KB header of
# trusted-looking hops); beyond this many hops the source yields nothing.
MAX_HOPS = 32
_DEFAULT_CACHE_SIZE = 4096

ParsedIP = tuple[str, bytes]


def packed_ip(text: str) -> bytes | None:
    """Validate one address and return it packed (4 or 16 bytes, IPv4-mapped unmapped), or ``None``.

    Surrounding whitespace and an IPv6 zone id are dropped.
    """
    candidate = text.strip()
    if not candidate or len(candidate) > _MAX_ADDRESS_TEXT:
        return None
    if ":" in candidate:
        zone = candidate.find("%")
        if zone >= 0:
            # RFC 4007 §11: the zone id is free text (inetaf/netaddr#171); it only names a local interface.
            candidate = candidate[:zone]
        try:
            packed = _inet_pton(_AF_INET6, candidate)
        except (OSError, ValueError):  # ValueError: embedded NUL
            return None
        return packed[12:] if packed[:12] == _V4_MAPPED_PREFIX else packed
    try:
        return _inet_pton(_AF_INET, candidate)
    except (OSError, ValueError):
        # inet_pton rejects leading zeros ("010.0.0.1", CVE-2021-29921), short forms and non-ASCII digits.
        return None


def format_packed(packed: bytes) -> str:
    """Canonical text of a packed address (what ``str(ipaddress.ip_address(...))`` prints)."""
    if len(packed) == 4:
        return _inet_ntop(_AF_INET, packed)
    text = _inet_ntop(_AF_INET6, packed)
    if "." in text:
        # glibc prints some addresses with a dotted tail ("::1.2.3.4"); ipaddress does not. Rare, so the slow exact
        # formatter is fine here.
        return str(ipaddress.IPv6Address(packed))
    return text


def parse_ip(text: str) -> ParsedIP | None:
    """Validate one address and return ``(canonical text, packed bytes)``, or ``None`` (see :func:`packed_ip`)."""
    packed = packed_ip(text)
    return None if packed is None else (format_packed(packed), packed)


def normalize_ip(text: str) -> str | None:
    """Validate one candidate address and return its canonical text, or ``None``.

    Strips surrounding whitespace and a zone id (``%...``), unmaps IPv4-mapped IPv6 (``::ffff:a.b.c.d`` ->
    ``a.b.c.d``) and returns the canonical compressed form. Empty text, ``unknown``, ports, brackets and anything
    else that is not exactly one address give ``None``.
    """
    parsed = parse_ip(text)
    return None if parsed is None else parsed[0]


class TrustedProxies:
    """A set of IPv4/IPv6 networks, parsed once, with a fast ``address in proxies`` test.

    Networks are stored per prefix length as sets of network numbers, so a test is one shift and one set lookup per
    distinct prefix length; an index on the first octet (IPv4) or the first 16 bits (IPv6) leaves only the prefix
    lengths that can match, usually none. IPv4-mapped networks (``::ffff:10.0.0.0/104``) are stored as IPv4
    networks, because addresses are unmapped before they are tested.
    """

    __slots__ = ("_networks", "_v4_index", "_v4_wide", "_v6_index", "_v6_wide")

    def __init__(self, cidrs: Iterable[str]) -> None:
        if isinstance(cidrs, str):
            raise TypeError("trusted proxies must be a list of networks, not one string")
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        networks: list[str] = []
        for text in cidrs:
            # strict=False like gateway.config: "10.0.0.1/8" means 10.0.0.0/8. Raises ValueError for bad input.
            network = ipaddress.ip_network(text.strip(), strict=False)
            if isinstance(network, ipaddress.IPv6Network):
                mapped = network.network_address.ipv4_mapped
                if mapped is not None and network.prefixlen >= 96:
                    network = ipaddress.IPv4Network((int(mapped), network.prefixlen - 96))
            family = v4 if isinstance(network, ipaddress.IPv4Network) else v6
            family.append((network.prefixlen, int(network.network_address)))
            networks.append(str(network))
        self._networks = tuple(networks)
        self._v4_index, self._v4_wide = _index(v4, bits=32, top_bits=_V4_INDEX_BITS)
        self._v6_index, self._v6_wide = _index(v6, bits=128, top_bits=_V6_INDEX_BITS)

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        packed = packed_ip(ip)
        return packed is not None and self.contains_packed(packed)

    def contains_packed(self, packed: bytes) -> bool:
        """Membership for a packed address (4 or 16 bytes, IPv4-mapped already unmapped)."""
        value = int.from_bytes(packed)
        if len(packed) == 4:
            candidates = self._v4_index.get(value >> (32 - _V4_INDEX_BITS), self._v4_wide)
        else:
            candidates = self._v6_index.get(value >> (128 - _V6_INDEX_BITS), self._v6_wide)
        for shift, keys in candidates:  # noqa: SIM110 (a loop beats any() here)
            if value >> shift in keys:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self._networks)!r})"


_V4_INDEX_BITS = 8
_V6_INDEX_BITS = 16
_Table = tuple[tuple[int, frozenset[int]], ...]


def _table(networks: list[tuple[int, int]], bits: int) -> _Table:
    by_shift: dict[int, set[int]] = {}
    for prefixlen, number in networks:
        shift = bits - prefixlen
        by_shift.setdefault(shift, set()).add(number >> shift)
    return tuple((shift, frozenset(keys)) for shift, keys in sorted(by_shift.items()))


def _index(networks: list[tuple[int, int]], *, bits: int, top_bits: int) -> tuple[dict[int, _Table], _Table]:
    """Group networks by their leading ``top_bits``; networks wider than that are checked for every address."""
    wide = [(p, n) for p, n in networks if p < top_bits]
    buckets: dict[int, list[tuple[int, int]]] = {}
    for prefixlen, number in networks:
        if prefixlen >= top_bits:
            buckets.setdefault(number >> (bits - top_bits), []).append((prefixlen, number))
    return {top: _table(entries + wide, bits) for top, entries in buckets.items()}, _table(wide, bits)


# --------------------------------------------------------------------------------------------------------------
# RFC 7239 "Forwarded", parsed right to left.
#
# A parser that reads left to right can be derailed by the client's own element (an unterminated quote swallows the
# rest, a syntax error rejects the whole header), which hides the element our proxy appended (forwarded-parse#6).
# So the header is reversed and read from its right end, one element at a time, with patterns for the *reversed*
# grammar; the walk stops at the first element that does not parse. Quantifiers are possessive: every input has at
# most one parse, and matching stays linear.
# --------------------------------------------------------------------------------------------------------------

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # RFC 9110 §5.6.2
# A quoted-string, reversed. Read forwards it is '"' *( qdtext / "\" char ) '"' (RFC 9110 §5.6.4). Reversed, an
# escaped character is followed by its backslash, so each unit is one character plus the run of backslashes that
# precedes it in the original text: any run after an ordinary character; an odd run after '"' (an escaped quote).
# A '"' followed by an even run is the delimiter. The leading run is the original's trailing escaped backslashes.
_QUOTED_REVERSED = r'"(?P<quoted>(?:\\\\)*+(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]\\*+|"\\(?:\\\\)*+)*+)"'
_PAIR_REVERSED = re.compile(rf"[ \t]*+(?:(?P<token>{_TCHAR}++)|{_QUOTED_REVERSED})=(?P<name>{_TCHAR}++)[ \t]*+")
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
# node-port = port / obfport (RFC 7239 §6.3)
_NODE_PORT = re.compile(r":(?:[0-9]{1,5}|_[A-Za-z0-9._\-]+)")


class ClientIPResolver:
    """Resolve the client address of one request from the TCP peer and, behind trusted proxies, its headers.

    Arguments:
        trusted_proxies: IPv4/IPv6 networks (or single addresses) of the proxies whose headers are believed.
            Empty: headers are never read and the peer is the client.
        sources: forwarding headers to consult, in order of preference; names from :data:`SOURCES`.

    Single-value sources (``fastly-client-ip``, ``x-real-ip``, ``cf-connecting-ip``, ``true-client-ip``) must hold
    exactly one address. A comma list is invalid, and so are several header lines: a proxy that sets such a header
    replaces it, so a duplicate means one copy came from the client and there is no telling which.
    ``x-forwarded-for`` lines are joined in order (uvicorn >= 0.49, #2971); ``forwarded`` lines likewise. An XFF
    entry must be a bare address (no port, no brackets). ``Forwarded`` follows RFC 7239 strictly: IPv6 only as
    ``"[addr]"`` with an optional port, ``unknown`` and obfuscated ``_node`` values end the walk. More than
    :data:`MAX_HOPS` trusted hops end it too. Header names must be lower-case, as ASGI servers send them.
    """

    def __init__(
        self,
        trusted_proxies: Iterable[str],
        sources: Sequence[str] = DEFAULT_SOURCES,
        *,
        cache_size: int = _DEFAULT_CACHE_SIZE,
    ) -> None:
        if isinstance(sources, str):
            raise TypeError("sources must be a sequence of header names, not one string")
        self.trusted = TrustedProxies(trusted_proxies)
        names = tuple(source.strip().lower() for source in sources)
        for name in names:
            if name not in SOURCES:
                raise ValueError(f"unsupported client-IP source {name!r} (one of {', '.join(SOURCES)})")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate client-IP source in {list(names)!r}")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.sources = names
        self._header_names = frozenset(name.encode("latin-1") for name in names)
        self._source_headers = tuple(name.encode("latin-1") for name in names)
        # Peer and hop text -> (canonical address or None, trusted); Forwarded "for=" values likewise. Full
        # addresses, in process memory only.
        self._cache: dict[str, tuple[str | None, bool]] = {}
        self._node_cache: dict[str, tuple[str | None, bool]] = {}
        self._cache_size = cache_size

    def resolve(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Return the normalised full client address, or ``None`` when neither headers nor peer give one.

        ``peer`` is ``scope["client"][0]`` (may be ``None``, garbage, IPv4-mapped or carry a zone id); ``headers``
        is the ASGI raw header list (lower-case names, latin-1 values, names may repeat).
        """
        if peer is None:
            return None
        peer_entry = self._cache.get(peer)
        if peer_entry is None:
            peer_entry = self._classify(peer)
        peer_address, peer_trusted = peer_entry
        if not peer_trusted:
            return peer_address

        wanted = self._header_names
        found: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            # ASGI servers send lower-case names. A hand-built scope with "X-Forwarded-For" is simply not read,
            # which errs on the safe side (the peer is used).
            if name in wanted:
                values = found.get(name)
                if values is None:
                    found[name] = [value]
                else:
                    values.append(value)
        if not found:
            return peer_address
        for header in self._source_headers:
            values = found.get(header)
            if values is None:
                continue
            if header == b"x-forwarded-for":
                client = self._from_x_forwarded_for(values)
            elif header == b"forwarded":
                client = self._from_forwarded(values)
            else:
                client = self._from_single_value(values)
            if client is not None:
                return client
        return peer_address

    # ----------------------------------------------------------------------------------------------------------

    def _classify(self, text: str) -> tuple[str | None, bool]:
        """``(canonical address or None, is a trusted proxy)`` for one peer or hop text, cached."""
        entry = self._cache.get(text)
        if entry is not None:
            return entry
        parsed = parse_ip(text)
        entry = (None, False) if parsed is None else (parsed[0], self.trusted.contains_packed(parsed[1]))
        if len(text) <= _MAX_ADDRESS_TEXT:
            cache = self._cache
            if len(cache) >= self._cache_size:
                # Dropping everything is O(1) amortised and keeps the bound without per-entry bookkeeping; the
                # working set (peers, proxy hops) refills it within a few requests.
                cache.clear()
            cache[text] = entry
        return entry

    def _from_single_value(self, values: list[bytes]) -> str | None:
        if len(values) != 1:
            return None
        text = values[0].decode("latin-1")
        if "," in text:
            return None
        return self._classify(text)[0]

    def _from_x_forwarded_for(self, values: list[bytes]) -> str | None:
        joined = values[0].decode("latin-1") if len(values) == 1 else ",".join(v.decode("latin-1") for v in values)
        hops = joined.rsplit(",", MAX_HOPS)
        too_long = len(hops) > MAX_HOPS
        if too_long:
            del hops[0]  # the unsplit remainder: reaching it would mean more than MAX_HOPS trusted hops
        cache = self._cache
        address: str | None = None
        for hop in reversed(hops):
            # Hop text is used unstripped as the cache key (parse_ip strips): " 1.2.3.4" is as cacheable as "1.2.3.4".
            entry = cache.get(hop)
            if entry is None:
                entry = self._classify(hop)
            hop_address, trusted = entry
            if hop_address is None:
                if not hop or hop.isspace():
                    # RFC 9110 §5.6.1: a recipient MUST accept and ignore empty list elements (" , 1.2.3.4 , ").
                    # MAX_HOPS above bounds how many of them one header can make us look at.
                    continue
                return None  # garbage: do not look further left (client-controlled text)
            address = hop_address
            if not trusted:
                return address
        return None if too_long else address  # all trusted: the leftmost is the client (uvicorn #1068)

    def _from_forwarded(self, values: list[bytes]) -> str | None:
        text = values[0].decode("latin-1") if len(values) == 1 else ",".join(v.decode("latin-1") for v in values)
        reversed_text = text[::-1]
        end = len(reversed_text)
        pos = 0
        hops = 0
        address: str | None = None
        pair = _PAIR_REVERSED.match
        while True:
            # One forwarded-element: pairs separated by ";" (RFC 7239 §4), read from its right end.
            names: set[str] = set()
            node: str | None = None
            while True:
                matched = pair(reversed_text, pos)  # OWS pair OWS
                if matched is not None:
                    name = matched["name"].lower()  # still reversed: "rof" is "for"
                    if name in names:
                        return None  # "Each parameter MUST NOT occur more than once per forwarded-element"
                    names.add(name)
                    if name == "rof":
                        token = matched["token"]
                        node = token[::-1] if token is not None else matched["quoted"][::-1]
                    pos = matched.end()
                else:
                    while pos < end and reversed_text[pos] in " \t":  # an empty pair, e.g. "for=x; ;proto=y"
                        pos += 1
                if pos == end or reversed_text[pos] == ",":
                    break
                if reversed_text[pos] != ";":
                    return None  # syntax error: stop here, everything further left is the client's text
                pos += 1
            if names:  # empty list elements are allowed and ignored (RFC 9110 §5.6.1)
                hops += 1
                if node is None or hops > MAX_HOPS:
                    return None
                if "\\" in node:
                    node = _UNESCAPE.sub(r"\1", node)
                entry = self._node_cache.get(node)
                if entry is None:
                    entry = self._forwarded_node(node)
                address, trusted = entry
                if address is None:
                    return None  # "unknown", an obfuscated "_node", or not an address: the chain is broken here
                if not trusted:
                    return address
            if pos == end:
                return address  # all trusted: the leftmost is the client
            pos += 1  # the ","

    def _forwarded_node(self, node: str) -> tuple[str | None, bool]:
        """``_classify`` for a ``for=`` value, cached: ``IPv4[:port]`` or ``"[IPv6][:port]"`` (RFC 7239 §6)."""
        entry = self._parse_forwarded_node(node)
        if len(node) <= _MAX_ADDRESS_TEXT:
            cache = self._node_cache
            if len(cache) >= self._cache_size:
                cache.clear()
            cache[node] = entry
        return entry

    def _parse_forwarded_node(self, node: str) -> tuple[str | None, bool]:
        if node.startswith("["):
            close = node.find("]")
            if close < 0:
                return None, False
            host, port = node[1:close], node[close + 1 :]
            if ":" not in host:
                return None, False  # brackets hold IPv6 only
        else:
            # No colon allowed in an IPv4 host, so an unbracketed IPv6 address is rejected here (RFC 7239 §6).
            host, colon, port = node.partition(":")
            port = colon + port
        if port and _NODE_PORT.fullmatch(port) is None:
            return None, False
        return self._classify(host)
