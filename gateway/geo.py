"""Country of the client, from a MaxMind DB (GeoLite2/GeoIP2 Country or City, DB-IP Country/City Lite).

Only the ISO 3166-1 alpha-2 country code leaves this module; the CNIL's analytics guidance says geolocation must not
be more precise than the city, and the gateway keeps it at the country.

The lookup uses the **full** address, in memory, because a truncated /24 or /48 can lie outside the network the
database knows (a /28 allocation) and then the country would be lost.

Results are cached per *truncated* network, so no full address becomes a cache key. The database reports the width
of the network it answered for (``get_with_prefix_len``):

* at least as wide as the truncation prefix (a /16 record for a /24): the answer holds for the whole truncated
  network and is cached as such;
* narrower (a /28 inside the /24): a neighbour in the same /24 may be elsewhere, so the answer is kept under the
  truncated key together with *that* network (number and width) and reused only for addresses inside it. Networks
  of fewer than four IPv4 addresses or narrower than an IPv6 /64 are never cached: their number would be as good
  as the client's address.

Caching matters: decoding a GeoLite2 Country record takes ~5 µs with the C extension (names in eight languages).
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import maxminddb
from maxminddb.types import Record

from gateway.clientip import packed_ip
from gateway.config import ConfigError

__all__ = ["Geo", "MaxMindGeo", "NullGeo", "open_geo"]

_CONFIG_KEY = "geo.database"
_DEFAULT_CACHE_SIZE = 16384
# Narrow networks remembered per truncated network; a /24 cut into many small allocations keeps only the first few.
_MAX_NARROW_PER_KEY = 8
# The narrowest networks whose number may be kept (see the module docstring).
_NARROWEST_CACHED_V4 = 30
_NARROWEST_CACHED_V6 = 64
# A database that can answer "which country": GeoIP2/GeoLite2 Country, City, Enterprise; DB-IP Country/City Lite.
_COUNTRY_DATABASE_WORDS = ("country", "city", "enterprise")
# A few addresses spread over the space, looked up once at startup so a corrupt search tree fails the start instead
# of failing lookups later. Not exhaustive (that would walk the whole tree); lookups stay defensive.
_PROBE_V4 = (
    "0.0.0.1",
    "1.1.1.1",
    "8.8.8.8",
    "81.2.69.160",
    "128.0.0.1",
    "192.0.2.1",
    "223.255.255.1",
    "255.255.255.255",
)
_PROBE_V6 = ("::", "2001:db8::1", "2a00::1", "2c0f:ff00::1", "fe80::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")

_logger = logging.getLogger("gateway.geo")


class Geo(Protocol):
    def country(self, full_ip: str, truncated_ip: str) -> str:
        """ISO country code of the client, or ``""`` when unknown."""
        ...

    def close(self) -> None: ...


class NullGeo:
    """No database configured: every country is unknown."""

    def country(self, full_ip: str, truncated_ip: str) -> str:
        return ""

    def close(self) -> None:
        return None


def _iso_code(record: Record | None) -> str:
    """``country.iso_code``, else ``registered_country.iso_code`` (GeoIP2 Country/City layout), else ``""``."""
    if not isinstance(record, dict):
        return ""
    for key in ("country", "registered_country"):
        section = record.get(key)
        if isinstance(section, dict):
            code = section.get("iso_code")
            # Only a two-letter code may reach events and logs, whatever the file contains.
            if isinstance(code, str) and len(code) == 2 and code.isascii() and code.isalpha():
                return code.upper()
    return ""


class MaxMindGeo:
    """Country lookups in a MaxMind DB file, opened once at startup.

    ``country(full_ip, truncated_ip)`` expects ``truncated_ip`` to be ``full_ip`` truncated with the same prefixes
    given here (the middleware uses one :class:`gateway.anonymize.Truncator` built from the same settings).
    A missing, unreadable, corrupt or non-country file raises :class:`gateway.config.ConfigError`.
    """

    def __init__(
        self, path: str, ipv4_prefix: int = 24, ipv6_prefix: int = 48, *, cache_size: int = _DEFAULT_CACHE_SIZE
    ) -> None:
        if not 0 <= ipv4_prefix <= 32 or not 0 <= ipv6_prefix <= 128:
            raise ValueError("prefixes must be 0..32 (IPv4) and 0..128 (IPv6)")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.path = path
        self._ipv4_prefix = ipv4_prefix
        self._ipv6_prefix = ipv6_prefix
        # truncated address -> country of the whole truncated network, or the narrower networks seen inside it as
        # (shift, network number, country): an address is inside when address >> shift == network number.
        self._cache: dict[str, str | list[tuple[int, int, str]]] = {}
        self._cache_size = cache_size
        self._warned_corrupt = False
        if os.path.isdir(path):
            raise ConfigError(_CONFIG_KEY, path, "is a directory, not a .mmdb file")
        try:
            # MODE_AUTO picks the C extension (libmaxminddb, mmap) when it is installed; the pure-Python reader is
            # about 20x slower, so say so at startup if that is what we got.
            reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
        except FileNotFoundError:
            raise ConfigError(_CONFIG_KEY, path, "file not found") from None
        except PermissionError:
            raise ConfigError(_CONFIG_KEY, path, "is not readable (permission denied)") from None
        except OSError as exc:
            raise ConfigError(_CONFIG_KEY, path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
        except (maxminddb.InvalidDatabaseError, ValueError):
            raise ConfigError(_CONFIG_KEY, path, "is not a valid MaxMind DB file") from None
        self._reader = reader
        try:
            self._check(reader)
        except ConfigError:
            reader.close()
            raise
        self.uses_c_extension = type(reader).__module__ == "maxminddb.extension"
        if not self.uses_c_extension:
            _logger.warning("maxminddb C extension unavailable: country lookups use the slow pure-Python reader")

    def _check(self, reader: maxminddb.Reader) -> None:
        metadata = reader.metadata()
        self._ipv6_capable = metadata.ip_version == 6
        probes = _PROBE_V4 + (_PROBE_V6 if self._ipv6_capable else ())
        try:
            for probe in probes:
                reader.get_with_prefix_len(probe)
        except (maxminddb.InvalidDatabaseError, ValueError):
            raise ConfigError(_CONFIG_KEY, self.path, "is corrupt (broken search tree or data section)") from None
        database_type = str(metadata.database_type)
        if not any(word in database_type.lower() for word in _COUNTRY_DATABASE_WORDS):
            problem = f"is a {database_type[:60]!r} database, not a country or city database"
            raise ConfigError(_CONFIG_KEY, self.path, problem)

    def country(self, full_ip: str, truncated_ip: str) -> str:
        cached = self._cache.get(truncated_ip)
        if cached is not None:
            if isinstance(cached, str):
                return cached
            packed = packed_ip(full_ip)
            if packed is not None:
                value = int.from_bytes(packed)
                for shift, network, code in cached:
                    if value >> shift == network:
                        return code
        is_ipv6 = ":" in full_ip
        if is_ipv6 and not self._ipv6_capable:
            return ""  # an IPv4-only database has no answer for IPv6 (the reader would raise)
        try:
            record, network_prefix = self._reader.get_with_prefix_len(full_ip)
        except ValueError:  # not an address, or the reader is closed
            return ""
        except maxminddb.InvalidDatabaseError:
            if not self._warned_corrupt:
                self._warned_corrupt = True
                _logger.warning("geo database lookup failed: the file is corrupt in places; country left empty")
            return ""
        code = _iso_code(record)
        # For IPv4 the reader reports the prefix within the IPv4 space, also in an IPv6 database.
        if is_ipv6:
            bits, truncation, narrowest = 128, self._ipv6_prefix, _NARROWEST_CACHED_V6
        else:
            bits, truncation, narrowest = 32, self._ipv4_prefix, _NARROWEST_CACHED_V4
        if network_prefix <= truncation:
            self._store(truncated_ip, code)
        elif network_prefix <= narrowest:
            packed = packed_ip(full_ip)
            if packed is not None and len(packed) * 8 == bits:
                shift = bits - network_prefix
                narrow = cached if isinstance(cached, list) else []
                if len(narrow) < _MAX_NARROW_PER_KEY:
                    narrow.append((shift, int.from_bytes(packed) >> shift, code))
                if narrow is not cached:
                    self._store(truncated_ip, narrow)
        return code

    def _store(self, truncated_ip: str, entry: str | list[tuple[int, int, str]]) -> None:
        cache = self._cache
        if len(cache) >= self._cache_size:
            cache.clear()  # O(1) amortised bound; the working set refills it quickly
        cache[truncated_ip] = entry

    def close(self) -> None:
        self._cache.clear()
        self._reader.close()


def open_geo(database: str, ipv4_prefix: int = 24, ipv6_prefix: int = 48) -> Geo:
    """The configured lookup: :class:`NullGeo` for ``""``, else :class:`MaxMindGeo` (raises ``ConfigError``)."""
    if not database:
        return NullGeo()
    return MaxMindGeo(database, ipv4_prefix, ipv6_prefix)
