"""Country lookups: full-address lookup, per-network cache correctness, startup errors, MaxMind compatibility.

Fixtures are built in the test with mmdb-writer; MaxMind's own test databases are an extra check, skipped when
the shared folder is absent (a user's clone has none).
"""

from __future__ import annotations

import ipaddress
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import maxminddb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from gateway.anonymize import Truncator
from gateway.config import ConfigError
from gateway.geo import Geo, MaxMindGeo, NullGeo, open_geo

MAXMIND_TEST_DATA = Path(__file__).resolve().parents[2] / "shared" / "geoip"

BuildDB = Callable[..., str]


@pytest.fixture
def build_db(tmp_path: Path) -> BuildDB:
    def build(
        records: dict[str, Any],
        *,
        ip_version: int = 6,
        database_type: str = "GeoLite2-Country",
        name: str = "geo.mmdb",
    ) -> str:
        writer = MMDBWriter(ip_version=ip_version, ipv4_compatible=ip_version == 6, database_type=database_type)
        for network, record in records.items():
            writer.insert_network(IPSet([network]), record)
        path = tmp_path / name
        writer.to_db_file(str(path))
        return str(path)

    return build


def _country(code: str) -> dict[str, Any]:
    return {"country": {"iso_code": code, "names": {"en": code}}, "continent": {"code": "XX"}}


class CountingReader:
    """Wraps the maxminddb reader to count real lookups (a cache hit makes none)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.lookups: list[str] = []

    def get_with_prefix_len(self, ip: str) -> Any:
        self.lookups.append(ip)
        return self.reader.get_with_prefix_len(ip)

    def close(self) -> None:
        self.reader.close()


def _geo_with_counter(path: str, monkeypatch: pytest.MonkeyPatch) -> tuple[MaxMindGeo, CountingReader]:
    geo = MaxMindGeo(path)
    counter = CountingReader(geo._reader)
    monkeypatch.setattr(geo, "_reader", counter)
    return geo, counter


truncate = Truncator(24, 48)


def lookup(geo: Geo, ip: str) -> str:
    return geo.country(ip, truncate(ip))


def test_lookup_uses_the_full_address(build_db: BuildDB) -> None:
    # The visitor's /28 is in the database, the truncated /24 as a whole is not.
    geo = MaxMindGeo(build_db({"198.51.100.16/28": _country("DE")}))
    assert lookup(geo, "198.51.100.20") == "DE"
    # Looking up the truncated address instead would have lost the country:
    assert geo.country("198.51.100.0", "198.51.100.0") == ""


def test_narrow_record_is_not_reused_for_a_neighbour(build_db: BuildDB, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build_db({"198.51.100.16/28": _country("DE"), "198.51.100.128/25": _country("NL")})
    geo, counter = _geo_with_counter(path, monkeypatch)
    assert lookup(geo, "198.51.100.20") == "DE"
    assert lookup(geo, "198.51.100.40") == ""  # same /24, outside the /28: must not inherit DE
    assert lookup(geo, "198.51.100.0") == ""
    assert lookup(geo, "198.51.100.200") == "NL"  # same /24, its own /25
    assert len(counter.lookups) == 4
    # Inside a network already seen, the answer comes from the cache; outside it, from the database.
    assert lookup(geo, "198.51.100.31") == "DE"
    assert lookup(geo, "198.51.100.129") == "NL"
    assert len(counter.lookups) == 4
    assert lookup(geo, "198.51.100.15") == ""  # just below the /28
    assert lookup(geo, "198.51.100.32") == ""  # just above it
    assert lookup(geo, "198.51.100.16") == "DE"
    assert lookup(geo, "198.51.100.127") == ""


def test_host_sized_networks_are_never_cached(build_db: BuildDB, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build_db(
        {"198.51.100.7/32": _country("DE"), "198.51.100.8/31": _country("AT"), "2001:db8:0:1::/96": _country("JP")}
    )
    geo, counter = _geo_with_counter(path, monkeypatch)
    for ip, code in [("198.51.100.7", "DE"), ("198.51.100.9", "AT"), ("2001:db8:0:1::5", "JP")]:
        assert lookup(geo, ip) == code
        assert lookup(geo, ip) == code
    assert len(counter.lookups) == 6
    assert lookup(geo, "198.51.100.200") == ""  # an empty /25 next to them is cached
    assert lookup(geo, "198.51.100.201") == ""
    assert len(counter.lookups) == 7
    (entry,) = geo._cache.values()
    assert isinstance(entry, list)
    assert [(shift, code) for shift, _, code in entry] == [(7, "")]


_V4_BASE = int(ipaddress.IPv4Address("198.51.0.0"))
_V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))
_v4_networks = st.tuples(st.integers(0, 2**16 - 1), st.integers(16, 32)).map(
    lambda t: str(ipaddress.IPv4Network((_V4_BASE + t[0], t[1]), strict=False))
)
_v6_networks = st.tuples(st.integers(0, 2**96 - 1), st.integers(32, 128)).map(
    lambda t: str(ipaddress.IPv6Network((_V6_BASE + t[0], t[1]), strict=False))
)
_v4_addresses = st.integers(0, 2**16 - 1).map(lambda n: str(ipaddress.IPv4Address(_V4_BASE + n)))
_v6_addresses = st.integers(0, 2**96 - 1).map(lambda n: str(ipaddress.IPv6Address(_V6_BASE + n)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    networks=st.lists(
        st.tuples(st.one_of(_v4_networks, _v6_networks), st.sampled_from(["DE", "FR", "NL"])), max_size=12
    ),
    visitors=st.lists(st.one_of(_v4_addresses, _v6_addresses), min_size=1, max_size=40),
    near=st.lists(st.integers(-300, 300), max_size=40),
    ipv4_prefix=st.sampled_from([16, 24]),
    ipv6_prefix=st.sampled_from([32, 48, 64]),
)
def test_cached_answers_always_match_the_database(
    networks: list[tuple[str, str]], visitors: list[str], near: list[int], ipv4_prefix: int, ipv6_prefix: int
) -> None:
    # Neighbours of earlier visitors are the interesting case: same truncated network, maybe another record.
    visitors += [str(ipaddress.ip_address(visitors[i % len(visitors)]) + d) for i, d in enumerate(near)]
    with tempfile.TemporaryDirectory() as directory:
        writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
        for network, code in networks:
            writer.insert_network(IPSet([network]), _country(code))
        path = str(Path(directory) / "geo.mmdb")
        writer.to_db_file(path)
        geo = MaxMindGeo(path, ipv4_prefix, ipv6_prefix)
        reader = maxminddb.open_database(path)
        truncator = Truncator(ipv4_prefix, ipv6_prefix)
        try:
            for ip in visitors * 2:  # the second round is answered mostly from the cache
                record = reader.get(ip)
                country = record.get("country") if isinstance(record, dict) else None
                expected = country.get("iso_code", "") if isinstance(country, dict) else ""
                assert geo.country(ip, truncator(ip)) == expected, ip
        finally:
            geo.close()
            reader.close()


def test_wide_record_is_reused_for_the_whole_network(build_db: BuildDB, monkeypatch: pytest.MonkeyPatch) -> None:
    geo, counter = _geo_with_counter(build_db({"203.0.0.0/16": _country("FR")}), monkeypatch)
    assert lookup(geo, "203.0.113.7") == "FR"
    assert lookup(geo, "203.0.113.200") == "FR"
    assert lookup(geo, "203.0.113.7") == "FR"
    assert counter.lookups == ["203.0.113.7"]
    assert lookup(geo, "203.0.114.1") == "FR"  # another /24 is another key
    assert len(counter.lookups) == 2


def test_cache_keys_are_truncated_addresses_only(build_db: BuildDB) -> None:
    geo = MaxMindGeo(build_db({"203.0.0.0/16": _country("FR"), "2001:db8::/32": _country("JP")}))
    visitors = ["203.0.113.7", "203.0.99.250", "2001:db8:1:2:3:4:5:6", "2001:db8:7::1"]
    for ip in visitors:
        lookup(geo, ip)
    assert set(geo._cache) == {"203.0.113.0", "203.0.99.0", "2001:db8:1::", "2001:db8:7::"}
    assert not set(visitors) & set(geo._cache)
    assert set(geo._cache.values()) == {"FR", "JP"}


def test_empty_network_result_is_cached_too(build_db: BuildDB, monkeypatch: pytest.MonkeyPatch) -> None:
    geo, counter = _geo_with_counter(build_db({"203.0.0.0/16": _country("FR")}), monkeypatch)
    assert lookup(geo, "192.0.2.1") == ""
    assert lookup(geo, "192.0.2.2") == ""
    assert len(counter.lookups) == 1  # the whole empty region is wider than /24


def test_ipv6(build_db: BuildDB, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build_db({"2001:db8::/32": _country("JP"), "2001:db9:0:1::/64": _country("KR")})
    geo, counter = _geo_with_counter(path, monkeypatch)
    assert lookup(geo, "2001:db8:1:2::3") == "JP"
    assert lookup(geo, "2001:db8:1:ffff::9") == "JP"
    assert len(counter.lookups) == 1
    assert lookup(geo, "2001:db9:0:1::5") == "KR"
    assert lookup(geo, "2001:db9:0:2::5") == ""  # same /48, outside the /64
    assert lookup(geo, "2001:db9:0:1::6") == "KR"  # inside the /64 seen before: cached
    assert len(counter.lookups) == 3


def test_other_truncation_prefixes(build_db: BuildDB) -> None:
    geo = MaxMindGeo(build_db({"203.0.0.0/20": _country("FR")}), ipv4_prefix=16)
    wide = Truncator(16, 48)
    assert geo.country("203.0.1.1", wide("203.0.1.1")) == "FR"
    assert geo.country("203.0.200.1", wide("203.0.200.1")) == ""  # a /20 is narrower than the /16 key


def test_registered_country_fallback_and_validation(build_db: BuildDB) -> None:
    path = build_db(
        {
            "192.0.2.0/24": {"registered_country": {"iso_code": "US"}},
            "198.51.100.0/24": {"country": {"iso_code": "<script>"}, "registered_country": {"iso_code": "ca"}},
            "203.0.113.0/24": {"country": {"iso_code": "DEU"}},
            "100.64.0.0/10": "just a string",
        }
    )
    geo = MaxMindGeo(path)
    assert lookup(geo, "192.0.2.1") == "US"
    assert lookup(geo, "198.51.100.1") == "CA"
    assert lookup(geo, "203.0.113.1") == ""
    assert lookup(geo, "100.64.1.1") == ""


def test_city_database_layout(build_db: BuildDB) -> None:
    record = {**_country("BR"), "city": {"names": {"en": "Recife"}}, "location": {"latitude": -8.05}}
    geo = MaxMindGeo(build_db({"203.0.113.0/24": record}, database_type="GeoIP2-City"))
    assert lookup(geo, "203.0.113.9") == "BR"


def test_ipv4_only_database(build_db: BuildDB) -> None:
    geo = MaxMindGeo(build_db({"203.0.113.0/24": _country("FR")}, ip_version=4))
    assert lookup(geo, "203.0.113.9") == "FR"
    assert lookup(geo, "2001:db8::1") == ""


def test_lookups_never_raise(build_db: BuildDB) -> None:
    geo = MaxMindGeo(build_db({"203.0.113.0/24": _country("FR")}))
    assert geo.country("garbage", "garbage") == ""
    geo.close()
    assert lookup(geo, "203.0.113.9") == ""


def test_c_extension_is_used_when_available(build_db: BuildDB) -> None:
    geo = MaxMindGeo(build_db({"203.0.113.0/24": _country("FR")}))
    try:
        import maxminddb.extension  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the wheel
        assert not geo.uses_c_extension
    else:
        assert geo.uses_c_extension


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.mmdb")
    with pytest.raises(ConfigError) as info:
        open_geo(path)
    assert info.value.key == "geo.database"
    assert path in str(info.value)
    assert "not found" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a maxmind database at all" * 10, b"\xab\xcd\xefMaxMind.com" + b"\x00" * 64],
    ids=["empty", "text", "bad-metadata"],
)
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.mmdb"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        open_geo(str(path))
    assert info.value.key == "geo.database"
    assert str(path) in str(info.value)


def test_truncated_file(build_db: BuildDB, tmp_path: Path) -> None:
    good = Path(build_db({"203.0.113.0/24": _country("FR")}))
    broken = tmp_path / "truncated.mmdb"
    broken.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ConfigError, match=r"truncated\.mmdb"):
        open_geo(str(broken))


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory"):
        open_geo(str(tmp_path))


def test_non_country_database(build_db: BuildDB) -> None:
    path = build_db({"203.0.113.0/24": {"autonomous_system_number": 64496}}, database_type="GeoLite2-ASN")
    with pytest.raises(ConfigError, match="not a country or city database") as info:
        open_geo(path)
    assert path in str(info.value)


def test_empty_setting_means_no_geo() -> None:
    geo = open_geo("")
    assert isinstance(geo, NullGeo)
    assert geo.country("203.0.113.7", "203.0.113.0") == ""
    geo.close()


# --------------------------------------------------------------------------------------------------------------
# MaxMind's official test databases (optional)
# --------------------------------------------------------------------------------------------------------------

needs_maxmind_data = pytest.mark.skipif(
    not MAXMIND_TEST_DATA.is_dir(), reason=f"MaxMind test databases not found in {MAXMIND_TEST_DATA}"
)


@needs_maxmind_data
@pytest.mark.parametrize("name", ["GeoIP2-Country-Test.mmdb", "GeoLite2-Country-Test.mmdb", "GeoIP2-City-Test.mmdb"])
def test_maxmind_test_databases(name: str) -> None:
    geo = open_geo(str(MAXMIND_TEST_DATA / name))
    try:
        assert lookup(geo, "81.2.69.160") == "GB"
        assert geo.country("81.2.69.0", "81.2.69.0") == ""
        # The visitor's network (a /27) is narrower than the /24: found via the full address, never cached.
        assert geo.country("81.2.69.160", "81.2.69.0") == "GB"
        assert geo.country("81.2.69.1", "81.2.69.0") == ""
        assert lookup(geo, "2001:218::1") == "JP"
    finally:
        geo.close()


@needs_maxmind_data
def test_maxmind_broken_search_tree() -> None:
    path = MAXMIND_TEST_DATA / "MaxMind-DB-test-broken-search-tree-24.mmdb"
    # The file's metadata reads fine; only some lookups hit the broken tree, which the startup probe finds.
    reader = maxminddb.open_database(str(path))
    assert reader.metadata().node_count > 0
    reader.close()
    with pytest.raises(ConfigError, match="corrupt") as info:
        open_geo(str(path))
    assert str(path) in str(info.value)
