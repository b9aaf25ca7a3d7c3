from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Callable
from http.cookies import SimpleCookie

import pytest
import time_machine
from hypothesis import given, settings
from hypothesis import strategies as st
from itsdangerous import TimestampSigner

from gateway.clientid import CLIENT_ID_SALT, ClientIdCookie
from gateway.config import Settings, load_settings

KEY_OLD = "o" * 40
KEY_NEW = "n" * 40
NAME = "__Host-gw_cid"


def make(keys: list[str] | None = None, **analytics: str) -> ClientIdCookie:
    overrides: dict[str, object] = {"consent": {"secret_keys": keys if keys is not None else [KEY_NEW]}}
    if analytics:
        overrides["analytics"] = analytics
    return ClientIdCookie(load_settings(overrides=overrides))


def parse(header: bytes, name: str = NAME) -> tuple[str, SimpleCookie]:
    cookie = SimpleCookie()
    cookie.load(header.decode("latin-1"))
    assert list(cookie) == [name]
    return cookie[name].value, cookie


def cookie_header(token: str, name: str = NAME) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", f"{name}={token}".encode())]


def test_round_trip() -> None:
    cookies = make()
    client_id, header = cookies.new()
    token, _ = parse(header)
    assert cookies.read(cookie_header(token)) == client_id
    assert cookies.read(cookie_header(token)) == client_id  # second read comes from the cache
    assert make().read(cookie_header(token)) == client_id  # another process with the same keys


def test_client_id_looks_like_a_ga_client_id() -> None:
    before = int(time.time())
    client_id, _ = make().new()
    after = int(time.time())
    match = re.fullmatch(r"([0-9]{10})\.([0-9]+)", client_id)
    assert match is not None
    assert not match.group(1).startswith("0")
    assert before <= int(match.group(2)) <= after


def test_client_ids_are_random() -> None:
    cookies = make()
    ids = {cookies.new()[0].split(".")[0] for _ in range(200)}
    assert len(ids) == 200


def test_set_cookie_attributes() -> None:
    _, header = make().new()
    _, cookie = parse(header)
    morsel = cookie[NAME]
    assert morsel["path"] == "/"
    assert morsel["secure"] is True
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["domain"] == ""  # __Host- forbids Domain (RFC 6265bis §4.1.3.2)
    assert int(morsel["max-age"]) == Settings().consent.max_age_days * 86400
    assert int(morsel["max-age"]) <= 395 * 86400  # 13 months at most (CNIL)


def test_max_age_follows_consent_setting() -> None:
    cookies = ClientIdCookie(load_settings(overrides={"consent": {"max_age_days": 30}}))
    _, cookie = parse(cookies.new()[1])
    assert int(cookie[NAME]["max-age"]) == 30 * 86400


def test_expire_header_deletes_with_the_same_attributes() -> None:
    value, cookie = parse(make().expire_header())
    morsel = cookie[NAME]
    assert value == ""
    assert morsel["max-age"] == "0"
    assert (morsel["path"], morsel["secure"], morsel["httponly"], morsel["samesite"]) == ("/", True, True, "Lax")


def test_custom_cookie_name() -> None:
    cookies = make(client_id_cookie="cid")
    client_id, header = cookies.new()
    token, _ = parse(header, "cid")
    assert cookies.read(cookie_header(token, "cid")) == client_id
    assert cookies.read(cookie_header(token)) == ""


def test_every_changed_character_is_rejected() -> None:
    cookies = make()
    _, header = cookies.new()
    token, _ = parse(header)
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_."
    for position, original in enumerate(token):
        for replacement in {alphabet[(alphabet.index(original) + step) % len(alphabet)] for step in (1, 2, 3, 17)}:
            forged = token[:position] + replacement + token[position + 1 :]
            assert cookies.read(cookie_header(forged)) == "", (position, replacement)


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(lambda t: t + "A", id="appended"),
        pytest.param(lambda t: t[:-1], id="truncated"),
        pytest.param(lambda t: t.rsplit(".", 1)[0], id="signature removed"),
        pytest.param(lambda t: "1234567890.1700000000." + t.split(".", 2)[2], id="other id, same signature"),
        pytest.param(lambda t: t.replace(".", "..", 1), id="extra dot"),
        pytest.param(lambda t: t[:12] + " " + t[12:], id="space inside"),
    ],
)
def test_tampering(forged: Callable[[str], str]) -> None:
    cookies = make()
    _, header = cookies.new()
    token, _ = parse(header)
    assert cookies.read(cookie_header(forged(token))) == ""


def test_other_key_and_other_salt_are_rejected() -> None:
    _, header = make([KEY_OLD]).new()
    token, _ = parse(header)
    assert make([KEY_NEW]).read(cookie_header(token)) == ""
    # A token signed with the right key for another purpose (e.g. consent's salt) is not an id.
    foreign = TimestampSigner(KEY_NEW, salt="privacy-gateway.consent", digest_method=hashlib.sha256)
    assert make([KEY_NEW]).read(cookie_header(foreign.sign("1234567890.1700000000").decode())) == ""
    own = TimestampSigner(KEY_NEW, salt=CLIENT_ID_SALT, digest_method=hashlib.sha256)
    assert make([KEY_NEW]).read(cookie_header(own.sign("1234567890.1700000000").decode())) == "1234567890.1700000000"
    # Correctly signed but not an id of ours.
    assert make([KEY_NEW]).read(cookie_header(own.sign("admin").decode())) == ""


def test_key_rotation() -> None:
    old_id, old_header = make([KEY_OLD]).new()
    rotated = make([KEY_OLD, KEY_NEW])
    assert rotated.read(cookie_header(parse(old_header)[0])) == old_id  # old tokens verify during the overlap
    new_id, new_header = rotated.new()
    assert make([KEY_NEW]).read(cookie_header(parse(new_header)[0])) == new_id  # the newest key signs


def test_random_key_without_configured_keys() -> None:
    first, second = make([]), make([])
    client_id, header = first.new()
    token, _ = parse(header)
    assert first.read(cookie_header(token)) == client_id
    assert second.read(cookie_header(token)) == ""


def test_expired_token_is_rejected_even_from_cache() -> None:
    cookies = make()
    with time_machine.travel(1_800_000_000, tick=False):
        client_id, header = cookies.new()
        token, _ = parse(header)
        assert cookies.read(cookie_header(token)) == client_id
    with time_machine.travel(1_800_000_000 + cookies.max_age - 1, tick=False):
        assert cookies.read(cookie_header(token)) == client_id
    with time_machine.travel(1_800_000_000 + cookies.max_age + 1, tick=False):
        assert cookies.read(cookie_header(token)) == ""
        assert make().read(cookie_header(token)) == ""  # and without a cache entry


@pytest.mark.parametrize(
    ("header_value", "found"),
    [
        ("{name}={token}", True),
        ("a=b; {name}={token}; c=d", True),
        ("a=b;{name}={token}", True),
        ('{name}="{token}"', True),
        ("x{name}={token}", False),
        ("{name}x={token}", False),
        ("a={name}={token}", False),
        ("{name}=", False),
        ("{name}=garbage", False),
        ("{name}={token}{token}", False),
        ("{name}=" + "1" * 5000, False),
        ("{name}=garbage; {name}={token}", True),  # first VALID one wins
        ("", False),
    ],
)
def test_cookie_header_forms(header_value: str, found: bool) -> None:
    cookies = make()
    client_id, header = cookies.new()
    token, _ = parse(header)
    value = header_value.format(name=NAME, token=token).encode()
    assert cookies.read([(b"cookie", value)]) == (client_id if found else "")


def test_several_cookie_headers_and_no_cookie_header() -> None:
    cookies = make()
    client_id, header = cookies.new()
    token, _ = parse(header)
    headers = [(b"cookie", b"a=b"), (b"user-agent", NAME.encode()), (b"cookie", f"{NAME}={token}".encode())]
    assert cookies.read(headers) == client_id
    assert cookies.read([(b"user-agent", b"x")]) == ""
    assert cookies.read([]) == ""


def test_cache_is_bounded() -> None:
    cookies = ClientIdCookie(load_settings(overrides={"consent": {"secret_keys": [KEY_NEW]}}), token_cache_size=8)
    tokens = [parse(cookies.new()[1])[0] for _ in range(30)]
    for token in tokens:
        assert cookies.read(cookie_header(token))
    assert len(cookies._cache) <= 8
    assert cookies.read(cookie_header(tokens[0]))  # evicted entries still verify, just not from the cache


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_cookie_headers_never_raise(value: bytes) -> None:
    assert make().read([(b"cookie", f"{NAME}=".encode() + value)]) == ""


def test_bad_max_age_is_refused() -> None:
    settings = Settings()
    bad = dataclasses.replace(settings, consent=dataclasses.replace(settings.consent, max_age_days=400))
    with pytest.raises(ValueError, match="max_age_days"):
        ClientIdCookie(bad)
