"""The consent model, the signed cookie codec (tampering, expiry, rotation, flags) and the GPC/DNT precedence rule."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import Any

import pytest
import time_machine
from hypothesis import example, given, settings
from hypothesis import strategies as st
from itsdangerous import URLSafeTimedSerializer

from gateway.banner import texts as banner_texts
from gateway.config import Settings, load_settings
from gateway.consent import (
    COOKIE_SALT,
    HEADER_CACHE_BYTES,
    ConsentChoice,
    ConsentDecision,
    ConsentManager,
    compute_revision,
)

KEY_OLD = "old-key-0123456789abcdef0123456789abcdef"
KEY_NEW = "new-key-fedcba9876543210fedcba9876543210"
COOKIE = "__Host-consent"
START = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
DAY = 86400

Headers = list[tuple[bytes, bytes]]


def make_settings(consent: Mapping[str, Any] | None = None, **sections: Any) -> Settings:
    overrides: dict[str, Any] = {"consent": {"secret_keys": [KEY_NEW], "receipts": "", **(consent or {})}}
    overrides.update(sections)
    return load_settings(overrides=overrides)


def cookie_headers(*values: str, name: str = COOKIE) -> Headers:
    return [(b"cookie", f"{name}={value}".encode("latin-1")) for value in values]


def sign(payload: object, key: str = KEY_NEW, salt: str = COOKIE_SALT) -> str:
    """Sign like the gateway does (same format), so a test can craft payloads the gateway never would."""
    serializer = URLSafeTimedSerializer(key.encode(), salt=salt, signer_kwargs={"digest_method": hashlib.sha256})
    return serializer.dumps(payload)


def valid_payload(manager: ConsentManager, **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "v": 1,
        "cid": "Q2hlY2tpbmctY29uc2VudC1pZA",
        "t": 1_700_000_000,
        "r": manager.revision,
        "c": {"analytics": True},
        "gpc": False,
    }
    payload.update(changes)
    return payload


@pytest.fixture
def manager() -> ConsentManager:
    return ConsentManager(make_settings())


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip_through_dumps_and_loads(manager: ConsentManager) -> None:
    choice = manager.make_choice({"analytics": True}, gpc=False)
    assert manager.loads(manager.dumps(choice)) == choice


def test_round_trip_through_set_cookie_and_decide(manager: ConsentManager) -> None:
    choice = manager.make_choice({"analytics": True}, gpc=False)
    jar: SimpleCookie = SimpleCookie()
    jar.load(manager.set_cookie_header(choice).decode("latin-1"))
    decision = manager.decide([(b"cookie", f"_ga=GA1.2.3; {COOKIE}={jar[COOKIE].value}; csrftoken=x".encode())])
    assert decision == ConsentDecision(choice, frozenset({"analytics"}), gpc=False)


def test_refusal_is_remembered_like_an_acceptance(manager: ConsentManager) -> None:
    accepted = manager.make_choice({"analytics": True}, gpc=False)
    refused = manager.make_choice({"analytics": False}, gpc=False)
    decision = manager.decide(cookie_headers(manager.dumps(refused)))
    assert decision.choice == refused  # a choice is on record: the banner does not ask again
    assert decision.granted == frozenset()
    assert _max_age(manager.set_cookie_header(refused)) == _max_age(manager.set_cookie_header(accepted))


def test_no_cookie_is_no_choice(manager: ConsentManager) -> None:
    assert manager.decide([]) == ConsentDecision(None, frozenset(), gpc=False)
    other = [(b"cookie", b"_ga=GA1.2.3; sessionid=abc"), (b"accept", b"text/html")]
    assert manager.decide(other) == ConsentDecision(None, frozenset(), gpc=False)


def test_make_choice_refuses_unnamed_categories_and_rejects_unknown_ones() -> None:
    manager = ConsentManager(make_settings({"categories": ["analytics", "marketing"]}))
    choice = manager.make_choice({"analytics": True}, gpc=True)
    assert dict(choice.choices) == {"analytics": True, "marketing": False}
    assert choice.revision == manager.revision and choice.gpc is True
    with pytest.raises(ValueError, match="unknown consent category"):
        manager.make_choice({"ads": True}, gpc=False)
    with pytest.raises(ValueError, match="true or false"):
        manager.make_choice({"analytics": 1}, gpc=False)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="consent id"):
        manager.make_choice({}, gpc=False, consent_id="short")


def test_make_choice_keeps_a_given_consent_id(manager: ConsentManager) -> None:
    first = manager.make_choice({"analytics": True}, gpc=False)
    second = manager.make_choice({"analytics": False}, gpc=False, consent_id=first.consent_id)
    assert second.consent_id == first.consent_id
    assert manager.make_choice({}, gpc=False).consent_id != first.consent_id


# ------------------------------------------------------------------------------------------------ tampering


@pytest.mark.parametrize("mask", [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80])
def test_every_flipped_byte_of_the_token_means_no_choice(mask: int) -> None:
    manager = ConsentManager(make_settings())
    token = manager.dumps(manager.make_choice({"analytics": True}, gpc=False)).encode()
    assert manager.decide([(b"cookie", COOKIE.encode() + b"=" + token)]).choice is not None
    for position in range(len(token)):
        flipped = bytearray(token)
        flipped[position] ^= mask
        decision = manager.decide([(b"cookie", COOKIE.encode() + b"=" + bytes(flipped))])
        assert decision.choice is None, f"byte {position} ^ {mask:#x} still verified"
        assert decision.granted == frozenset()


def test_truncated_and_extended_tokens_mean_no_choice(manager: ConsentManager) -> None:
    token = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
    for cut in range(len(token)):
        assert manager.loads(token[:cut]) is None
    for suffix in ("A", "=", ".", "==", ".AAAA"):
        assert manager.loads(token + suffix) is None


@pytest.mark.parametrize(
    ("key", "salt"),
    [
        pytest.param(KEY_NEW, "session", id="wrong-salt"),
        pytest.param(KEY_NEW, "itsdangerous", id="default-salt"),
        pytest.param("another-key-00000000000000000000000000", COOKIE_SALT, id="unknown-key"),
    ],
)
def test_tokens_from_another_key_or_salt_mean_no_choice(manager: ConsentManager, key: str, salt: str) -> None:
    token = sign(valid_payload(manager), key=key, salt=salt)
    assert manager.decide(cookie_headers(token)).choice is None
    # The same payload signed correctly does verify: the key or salt alone made the difference.
    assert manager.decide(cookie_headers(sign(valid_payload(manager)))).choice is not None


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"v": 2}, id="unknown-schema-version"),
        pytest.param({"v": "1"}, id="version-as-string"),
        pytest.param({"v": True}, id="version-as-bool"),
        pytest.param({"cid": 42}, id="cid-not-a-string"),
        pytest.param({"cid": "short"}, id="cid-too-short"),
        pytest.param({"cid": "has spaces in it, which ids never do"}, id="cid-bad-chars"),
        pytest.param({"t": "1700000000"}, id="issued-at-string"),
        pytest.param({"t": True}, id="issued-at-bool"),
        pytest.param({"r": 7}, id="revision-not-a-string"),
        pytest.param({"c": {"analytics": "yes"}}, id="choice-not-bool"),
        pytest.param({"c": {"analytics": True, "ads": True}}, id="unknown-category"),
        pytest.param({"c": {}}, id="missing-category"),
        pytest.param({"c": ["analytics"]}, id="choices-not-a-map"),
        pytest.param({"gpc": 1}, id="gpc-not-bool"),
    ],
)
def test_signed_but_malformed_payloads_mean_no_choice(manager: ConsentManager, changes: dict[str, Any]) -> None:
    assert manager.decide(cookie_headers(sign(valid_payload(manager, **changes)))).choice is None


@pytest.mark.parametrize("payload", [None, [], "consent", 1, {"v": 1}], ids=repr)
def test_signed_non_objects_mean_no_choice(manager: ConsentManager, payload: object) -> None:
    assert manager.decide(cookie_headers(sign(payload))).choice is None


def test_a_crafted_valid_payload_is_accepted(manager: ConsentManager) -> None:
    decision = manager.decide(cookie_headers(sign(valid_payload(manager))))
    assert decision.choice is not None
    assert decision.choice.consent_id == "Q2hlY2tpbmctY29uc2VudC1pZA"
    assert decision.choice.issued_at == 1_700_000_000
    assert decision.granted == frozenset({"analytics"})


def test_oversized_cookie_is_no_choice_and_never_parsed(
    manager: ConsentManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_parse(*args: object, **kwargs: object) -> object:
        raise AssertionError("an oversized cookie reached the signature check")

    monkeypatch.setattr(manager._serializer, "loads", must_not_parse)
    five_kb = "A" * 5 * 1024
    assert manager.decide(cookie_headers(five_kb)) == ConsentDecision(None, frozenset(), gpc=False)
    assert manager.loads(five_kb) is None
    just_over = "A" * (manager.max_cookie_bytes + 1)
    assert manager.decide(cookie_headers(just_over)).choice is None


def test_max_cookie_bytes_applies_to_valid_tokens_too() -> None:
    categories = [
        f"category_{i:02d}_{name}"
        for i, name in enumerate(("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"))
    ]
    roomy = ConsentManager(make_settings({"categories": categories}))
    tight = ConsentManager(make_settings({"categories": categories, "max_cookie_bytes": 256}))
    token = roomy.dumps(roomy.make_choice(dict.fromkeys(categories, True), gpc=False))
    assert len(token) > 256
    assert roomy.loads(token) is not None
    assert tight.loads(token) is None


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param("one-header", id="same-header"),
        pytest.param("two-headers", id="two-cookie-headers"),
    ],
)
def test_two_consent_cookies_mean_no_choice(manager: ConsentManager, headers: str) -> None:
    granted = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
    refused = manager.dumps(manager.make_choice({"analytics": False}, gpc=False))
    if headers == "one-header":
        request = [(b"cookie", f"{COOKIE}={granted}; other=1; {COOKIE}={refused}".encode())]
    else:
        request = cookie_headers(granted) + cookie_headers(refused)
    assert manager.decide(request) == ConsentDecision(None, frozenset(), gpc=False)
    # Even two copies of the same valid token: a tossed cookie can be a replayed copy.
    assert manager.decide(cookie_headers(granted, granted)).choice is None
    assert manager.previous_consent_id(request) is None


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("x{name}={token}", id="longer-name"),
        pytest.param("other={name}={token}", id="inside-another-value"),
        pytest.param("{name}x={token}", id="name-prefix"),
    ],
)
def test_lookalike_cookie_names_are_not_ours(manager: ConsentManager, header: str) -> None:
    token = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
    assert manager.decide([(b"cookie", header.format(name=COOKIE, token=token).encode())]).choice is None


@pytest.mark.parametrize(
    "template",
    ["{name}={token}", "a=1;{name}={token}", "a=1;  {name}={token} ;b=2", '{name}="{token}"', "a=1; {name}={token};"],
)
def test_cookie_syntax_variants_are_found(manager: ConsentManager, template: str) -> None:
    token = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
    assert manager.decide([(b"cookie", template.format(name=COOKIE, token=token).encode())]).choice is not None


_SHARED_MANAGER_SETTINGS = make_settings()
_SHARED_MANAGER = ConsentManager(_SHARED_MANAGER_SETTINGS)
_SHARED_TOKEN = _SHARED_MANAGER.dumps(_SHARED_MANAGER.make_choice({"analytics": True}, gpc=False)).encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000))
def test_arbitrary_cookie_bytes_never_raise(data: bytes) -> None:
    manager = _SHARED_MANAGER
    for headers in ([(b"cookie", data)], [(b"cookie", COOKIE.encode() + b"=" + data)], [(b"sec-gpc", data)]):
        decision = manager.decide(headers)
        assert decision.choice is None
        assert decision.granted == frozenset()


@settings(max_examples=200, deadline=None)
@given(prefix=st.binary(max_size=200), suffix=st.binary(max_size=200))
def test_junk_around_a_valid_cookie_never_raises(prefix: bytes, suffix: bytes) -> None:
    manager = _SHARED_MANAGER
    header = prefix + b"; " + COOKIE.encode() + b"=" + _SHARED_TOKEN + b"; " + suffix
    decision = manager.decide([(b"cookie", header)])
    if COOKIE.encode() not in prefix + suffix:
        assert decision.choice is not None  # junk in other cookies does not hide ours
    assert decision.granted <= {"analytics"}


def test_non_ascii_token_string_is_no_choice(manager: ConsentManager) -> None:
    assert manager.loads("é" * 10) is None


# ------------------------------------------------------------------------------------------------ expiry


def test_expired_cookie_is_no_choice() -> None:
    manager = ConsentManager(make_settings({"max_age_days": 30}))
    with time_machine.travel(START, tick=False) as traveller:
        token = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
        traveller.shift(dt.timedelta(days=30) - dt.timedelta(seconds=1))
        assert manager.loads(token) is not None
        traveller.shift(dt.timedelta(seconds=2))
        assert manager.loads(token) is None
        assert manager.decide(cookie_headers(token)).choice is None


def test_expiry_is_enforced_on_cached_tokens() -> None:
    manager = ConsentManager(make_settings({"max_age_days": 1}))
    with time_machine.travel(START, tick=False) as traveller:
        token = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
        assert manager.decide(cookie_headers(token)).choice is not None  # verified and cached
        assert token.encode() in manager._cache
        traveller.shift(dt.timedelta(days=1, seconds=1))
        assert manager.decide(cookie_headers(token)).choice is None
        assert token.encode() not in manager._cache


def test_token_from_the_future_is_no_choice() -> None:
    manager = ConsentManager(make_settings())
    with time_machine.travel(START + dt.timedelta(hours=1), tick=False):
        token = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
    with time_machine.travel(START, tick=False):
        assert manager.loads(token) is None


def test_token_cache_stays_bounded() -> None:
    manager = ConsentManager(make_settings(), token_cache_size=8)
    tokens = [manager.dumps(manager.make_choice({"analytics": True}, gpc=False)) for _ in range(20)]
    for token in tokens:
        assert manager.decide(cookie_headers(token)).choice is not None
        assert len(manager._cache) <= 8
    assert tokens[-1].encode() in manager._cache and tokens[0].encode() not in manager._cache
    assert manager.decide(cookie_headers(tokens[0])).choice is not None  # evicted tokens still verify


def test_header_cache_stays_bounded_and_skips_long_headers() -> None:
    manager = ConsentManager(make_settings(), token_cache_size=8)
    token = manager.dumps(manager.make_choice({"analytics": True}, gpc=False))
    for index in range(20):
        (header,) = cookie_headers(token)
        header = (b"cookie", header[1] + f"; n={index}".encode())
        assert manager.decide([header]).granted == {"analytics"}
        assert len(manager._by_header) <= 8
    long_header = (b"cookie", cookie_headers(token)[0][1] + b"; pad=" + b"x" * HEADER_CACHE_BYTES)
    for _ in range(2):
        assert manager.decide([long_header]).granted == {"analytics"}
    assert long_header[1] not in manager._by_header


_COOKIE_PARTS = st.sampled_from(
    [
        f"{COOKIE}={_SHARED_TOKEN.decode()}",
        f"{COOKIE}={_SHARED_TOKEN.decode()[:-3]}abc",  # a broken signature
        f"{COOKIE}=",
        f"x{COOKIE}={_SHARED_TOKEN.decode()}",  # a lookalike name
        "theme=dark",
        "sessionid=abc123",
    ]
)


@settings(max_examples=200, deadline=None)
@given(headers=st.lists(st.lists(_COOKIE_PARTS, max_size=3).map("; ".join), min_size=0, max_size=2))
@example(headers=[f"{COOKIE}={_SHARED_TOKEN.decode()}"])
@example(headers=[f"theme=dark; {COOKIE}={_SHARED_TOKEN.decode()}; {COOKIE}={_SHARED_TOKEN.decode()}"])
def test_cached_decisions_equal_fresh_ones(headers: list[str]) -> None:
    """Whatever the Cookie headers and Sec-GPC/DNT, a manager that has seen them decides as a fresh one does."""
    cookies = [value.encode("latin-1") for value in headers]
    warm = ConsentManager(_SHARED_MANAGER_SETTINGS)
    signals = [(False, False), (False, True), (True, False), (True, True)]
    for gpc, dnt in signals * 2:  # each combination twice: from the cache the second time
        fresh = ConsentManager(_SHARED_MANAGER_SETTINGS).decide_cookies(cookies, gpc, dnt)
        assert warm.decide_cookies(cookies, gpc, dnt) == fresh


# ------------------------------------------------------------------------------------------------ rotation


def test_old_key_verifies_during_rotation_and_the_newest_key_signs() -> None:
    before = ConsentManager(make_settings({"secret_keys": [KEY_OLD]}))
    during = ConsentManager(make_settings({"secret_keys": [KEY_OLD, KEY_NEW]}))
    after = ConsentManager(make_settings({"secret_keys": [KEY_NEW]}))

    old_token = before.dumps(before.make_choice({"analytics": True}, gpc=False))
    assert during.loads(old_token) is not None  # visitors keep their choice while both keys are configured
    assert after.loads(old_token) is None  # and lose it once the old key is removed

    new_token = during.dumps(during.make_choice({"analytics": True}, gpc=False))
    assert after.loads(new_token) is not None  # signed with the newest key
    assert before.loads(new_token) is None  # not with the old one


def test_demo_mode_makes_a_random_key_per_manager(caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings({"secret_keys": []})
    with caplog.at_level("WARNING", logger="gateway.consent"):
        first = ConsentManager(settings)
    assert first.demo_key and "every restart" in caplog.text
    second = ConsentManager(settings)  # a restart
    token = first.dumps(first.make_choice({"analytics": True}, gpc=False))
    assert first.loads(token) is not None
    assert second.loads(token) is None  # so every restart asks again, as documented
    assert not ConsentManager(make_settings()).demo_key


# ------------------------------------------------------------------------------------------------ Set-Cookie


def _parse_set_cookie(header: bytes) -> tuple[str, dict[str, str | bool]]:
    text = header.decode("latin-1")
    jar: SimpleCookie = SimpleCookie()
    jar.load(text)
    assert len(jar) == 1
    (name, morsel), *_ = jar.items()
    attributes = {
        key: morsel[key] for key in ("max-age", "path", "domain", "secure", "httponly", "samesite", "expires")
    }
    return name, attributes


def _max_age(header: bytes) -> int:
    return int(_parse_set_cookie(header)[1]["max-age"])


@pytest.mark.parametrize("days", [1, 180, 395])
@pytest.mark.parametrize("granted", [True, False])
def test_set_cookie_attributes(days: int, granted: bool) -> None:
    manager = ConsentManager(make_settings({"max_age_days": days}))
    choice = manager.make_choice({"analytics": granted}, gpc=False)
    header = manager.set_cookie_header(choice)
    name, attributes = _parse_set_cookie(header)
    assert name == COOKIE
    assert attributes["secure"] is True
    assert attributes["httponly"] is True
    assert attributes["samesite"] == "Lax"
    assert attributes["path"] == "/"
    assert attributes["domain"] == ""  # __Host- forbids Domain
    assert attributes["expires"] == ""
    assert int(str(attributes["max-age"])) == days * DAY <= 395 * DAY
    assert b"\r" not in header and b"\n" not in header
    assert header.count(b";") == 5  # value; Max-Age; Path; Secure; HttpOnly; SameSite and nothing else
    value = header.split(b";", 1)[0].split(b"=", 1)[1].decode()
    assert manager.loads(value) == choice


def test_default_cookie_lifetime_is_180_days(manager: ConsentManager) -> None:
    assert _max_age(manager.set_cookie_header(manager.make_choice({}, gpc=False))) == 180 * DAY


def test_max_age_over_395_days_is_refused() -> None:
    settings = make_settings()
    too_long = dataclasses.replace(settings, consent=dataclasses.replace(settings.consent, max_age_days=396))
    with pytest.raises(ValueError, match="395"):
        ConsentManager(too_long)


# ------------------------------------------------------------------------------------------------ revision


def test_choice_under_another_revision_is_no_choice() -> None:
    first = ConsentManager(make_settings({"revision": "2024-10-04"}))
    token = first.dumps(first.make_choice({"analytics": True}, gpc=False))
    assert first.loads(token) is not None
    second = ConsentManager(make_settings({"revision": "2025-01-15"}))
    assert second.revision == "2025-01-15"
    assert second.decide(cookie_headers(token)) == ConsentDecision(None, frozenset(), gpc=False)
    # The visitor keeps their consent id across the change, so their receipts stay linked.
    old_choice = first.loads(token)
    assert old_choice is not None
    assert second.previous_consent_id(cookie_headers(token)) == old_choice.consent_id


GA4 = {
    "kind": "ga4",
    "endpoint": "https://region1.google-analytics.com/mp/collect",
    "measurement_id": "G-ABC1234",
    "api_secret": "secret",
    "requires": ["analytics"],
    "fields": ["name", "url"],
}
PLAUSIBLE = {"kind": "plausible", "endpoint": "https://plausible.io/api/event", "domain": "python.org"}
BASE: dict[str, Any] = {
    "consent": {"category": {"analytics": {"label": "Analytics", "description": "Counts visits."}}},
    "destinations": {"ga4": GA4, "plausible": PLAUSIBLE},
    "banner": {"texts": {"en": {"title": "Cookies?"}}},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with one nested key replaced, e.g. _with("destinations.ga4.fields", [...])."""
    result = copy.deepcopy(BASE)
    node = result
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return result


def _revision(overrides: dict[str, Any]) -> str:
    consent = {"secret_keys": [KEY_NEW], "receipts": "", **overrides.get("consent", {})}
    return compute_revision(load_settings(overrides={**overrides, "consent": consent}))


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(_with("consent.category.analytics.label", "Statistics"), id="category-label"),
        pytest.param(_with("consent.category.analytics.description", "Counts more."), id="category-description"),
        pytest.param(_with("destinations.ga4.fields", ["name", "url", "referrer"]), id="destination-fields"),
        pytest.param(_with("destinations.plausible.requires", ["analytics"]), id="destination-requires"),
        pytest.param(_with("destinations.ga4.kind", "dryrun"), id="destination-kind"),
        pytest.param(_with("destinations.dryrun", {"kind": "dryrun", "dry_run": True}), id="destination-added"),
        pytest.param({**BASE, "destinations": {"plausible": PLAUSIBLE}}, id="destination-removed"),
        pytest.param(_with("banner.texts.en.title", "Cookies!"), id="banner-text"),
        pytest.param(_with("banner.texts.de", {"title": "Kekse?"}), id="banner-language"),
    ],
)
def test_derived_revision_changes_with_what_visitors_agree_to(changed: dict[str, Any]) -> None:
    assert _revision(changed) != _revision(BASE)


@pytest.mark.parametrize(
    "unchanged",
    [
        pytest.param(_with("destinations.ga4.endpoint", "https://www.google-analytics.com/mp/collect"), id="endpoint"),
        pytest.param(_with("destinations.ga4.fields", ["url", "name"]), id="field-order"),
        pytest.param({**BASE, "destinations": {"plausible": PLAUSIBLE, "ga4": GA4}}, id="destination-order"),
        pytest.param({**BASE, "dispatch": {"queue_size": 5}}, id="unrelated-setting"),
    ],
)
def test_derived_revision_ignores_what_visitors_do_not_agree_to(unchanged: dict[str, Any]) -> None:
    assert _revision(unchanged) == _revision(BASE)


def test_derived_revision_changes_with_the_built_in_banner_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _revision(BASE)
    monkeypatch.setattr(banner_texts, "DEFAULT_TEXTS", {**banner_texts.DEFAULT_TEXTS, "accept_all": "OK"})
    assert _revision(BASE) != before


def test_derived_revision_changes_with_built_in_category_texts_only_when_they_are_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configured, builtin = _revision(BASE), _revision({**BASE, "consent": {}})
    changed = {"analytics": ("Analytics", "Something else.")}
    monkeypatch.setattr(banner_texts, "DEFAULT_CATEGORY_TEXTS", changed)
    assert _revision(BASE) == configured  # [consent.category.analytics] overrides the built-in text
    assert _revision({**BASE, "consent": {}}) != builtin


def test_derived_revision_is_short_stable_hex_and_explicit_revision_wins() -> None:
    revision = _revision(BASE)
    assert len(revision) == 16 and int(revision, 16) >= 0
    assert _revision(BASE) == revision  # same settings, same revision (across restarts and replicas)
    assert _revision(_with("consent.revision", "2024-10-04")) == "2024-10-04"


def test_adding_a_category_voids_earlier_choices_even_with_a_fixed_revision() -> None:
    one = ConsentManager(make_settings({"revision": "fixed"}))
    two = ConsentManager(make_settings({"revision": "fixed", "categories": ["analytics", "marketing"]}))
    token = one.dumps(one.make_choice({"analytics": True}, gpc=False))
    assert two.loads(token) is None  # the visitor was never asked about "marketing"


# ------------------------------------------------------------------------------------------------ GPC / DNT


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"1"], True),
        ([b" 1\t"], True),
        ([b"0"], False),
        ([b""], False),
        ([b"true"], False),
        ([b"11"], False),
        ([b"1.0"], False),
        ([b"01"], False),
        ([b"0", b"1"], True),  # several headers: any exact "1" counts
        ([b"0", b"0"], False),
        ([b"0, 1"], True),  # the same two field lines folded into one
        ([b"1;q=0"], False),
    ],
)
def test_sec_gpc_header_values(manager: ConsentManager, values: list[bytes], expected: bool) -> None:
    assert manager.decide([(b"sec-gpc", v) for v in values]).gpc is expected


@pytest.mark.parametrize(
    ("value", "expected"), [(b"1", True), (b" 1 ", True), (b"1xyz", True), (b"0", False), (b"", False), (b"x1", False)]
)
def test_dnt_header_values(manager: ConsentManager, value: bytes, expected: bool) -> None:
    assert manager.decide([(b"dnt", value)]).dnt is expected


GRANTED = frozenset({"analytics"})
NONE: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    ("choice_with_signal", "request_headers", "honor_gpc", "honor_dnt", "expected"),
    [
        # Precedence: no signal -> the signed choice.
        (False, [], True, False, GRANTED),
        (True, [], True, False, GRANTED),
        # Sec-GPC: 1 after an acceptance given without it -> nothing granted.
        (False, [(b"sec-gpc", b"1")], True, False, NONE),
        # An acceptance given while Sec-GPC: 1 was sent knowingly overrides the signal.
        (True, [(b"sec-gpc", b"1")], True, False, GRANTED),
        # consent.honor_gpc = false disables the rule.
        (False, [(b"sec-gpc", b"1")], False, False, GRANTED),
        # Values other than exactly "1" are no signal.
        (False, [(b"sec-gpc", b"0")], True, False, GRANTED),
        # DNT is ignored unless consent.honor_dnt, and then treated like GPC.
        (False, [(b"dnt", b"1")], True, False, GRANTED),
        (False, [(b"dnt", b"1")], True, True, NONE),
        (True, [(b"dnt", b"1")], True, True, GRANTED),
        (False, [(b"dnt", b"1"), (b"sec-gpc", b"1")], False, True, NONE),
    ],
)
def test_gpc_and_dnt_precedence(
    choice_with_signal: bool, request_headers: Headers, honor_gpc: bool, honor_dnt: bool, expected: frozenset[str]
) -> None:
    manager = ConsentManager(make_settings({"honor_gpc": honor_gpc, "honor_dnt": honor_dnt}))
    token = manager.dumps(manager.make_choice({"analytics": True}, gpc=choice_with_signal))
    decision = manager.decide([*cookie_headers(token), *request_headers])
    assert decision.choice is not None  # the choice stays on record; only its effect changes
    assert decision.granted == expected


def test_signal_without_a_choice_grants_nothing_and_is_reported(manager: ConsentManager) -> None:
    assert manager.decide([(b"sec-gpc", b"1"), (b"dnt", b"1")]) == ConsentDecision(
        None, frozenset(), gpc=True, dnt=True
    )


def test_refusal_made_under_gpc_stays_a_refusal(manager: ConsentManager) -> None:
    token = manager.dumps(manager.make_choice({"analytics": False}, gpc=True))
    assert manager.decide([*cookie_headers(token), (b"sec-gpc", b"1")]).granted == frozenset()
    assert manager.decide(cookie_headers(token)).granted == frozenset()


def test_decision_and_choice_are_immutable(manager: ConsentManager) -> None:
    choice = manager.make_choice({"analytics": True}, gpc=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.revision = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        choice.choices["analytics"] = False  # type: ignore[index]
    assert isinstance(manager.decide(cookie_headers(manager.dumps(choice))).choice, ConsentChoice)
