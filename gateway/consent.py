"""Consent model, signed consent cookie with key rotation, and the GPC/DNT precedence rule.

The visitor's choice lives in one signed cookie (``__Host-consent`` by default), so every replica can read it with
the shared keys and no server-side session exists. The cookie value is an itsdangerous ``URLSafeTimedSerializer``
token over a small JSON payload::

    {"v": 1, "cid": "<random id>", "t": <issued-at, unix s>, "r": "<policy revision>",
     "c": {"analytics": true}, "gpc": false}

Reading fails closed: a tampered, expired, oversized, duplicated, non-canonical or unknown-schema cookie means
"no choice" (the banner asks), never an error. A choice made under another policy revision (or for another set of
categories) is also "no choice", so changing what the visitor agreed to asks again.

Precedence on every request (security.md §3, protocols.md §4.1):

1. ``Sec-GPC: 1`` (and ``DNT: 1`` when ``consent.honor_dnt``) grants nothing, *unless* the stored choice granting a
   category was itself made while the signal was sent: an explicit opt-in that knowingly overrides the signal
   (11 CCR §7025(c)(3) lets a later explicit consent win over an earlier opt-out preference signal).
2. otherwise the signed choice;
3. otherwise deny.

Key rotation (security.md T7): ``consent.secret_keys`` lists keys oldest first; the newest signs, all verify.
Append a new key, deploy, keep the old one for at least ``max_age_days``, then remove it. With no key configured a
random key is made at start-up (demo mode): every restart then invalidates every stored choice and asks again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from itsdangerous import BadData, URLSafeTimedSerializer

from gateway.caches import remember
from gateway.config import Settings
from gateway.cookies import cookie_values

__all__ = [
    "COOKIE_SALT",
    "SCHEMA_VERSION",
    "ConsentChoice",
    "ConsentDecision",
    "ConsentManager",
    "category_texts",
    "compute_revision",
    "dnt_is_on",
    "sec_gpc_is_on",
]

logger = logging.getLogger("gateway.consent")

# A salt of its own, so no other token signed with the same keys (sessions, CSRF, ...) is ever read as consent.
COOKIE_SALT: Final = "privacy-gateway.consent"
# HMAC-SHA256 rather than itsdangerous' default SHA-1.
SIGNER_KWARGS: Final[dict[str, Any]] = {"digest_method": hashlib.sha256}
SCHEMA_VERSION: Final = 1
# CNIL: a consent cookie must not outlive 13 months (security.md §3); config validation enforces the same bound.
MAX_AGE_DAYS_LIMIT: Final = 395
# Verified tokens kept in memory; a hit skips the HMAC and JSON work (expiry is still checked on every hit).
TOKEN_CACHE_SIZE: Final = 4096
# Whole Cookie header values -> what they decide (see ConsentManager.decide_cookies). A visitor's browser sends the
# same header on every request until one of the site's cookies changes, so this skips finding and parsing our cookie
# in it. Longer headers (many or large cookies) are not worth the memory: they take the parsing path. The values
# (the site's other cookies too) stay in this process's memory only, like the request they came with: bounded by
# ConsentManager's token cache size, never logged, never written anywhere.
HEADER_CACHE_BYTES: Final = 1024
DEMO_KEY_WARNING: Final = (
    "consent.secret_keys is empty: signing consent cookies with a random per-process key; "
    "every restart (and every other worker) will ask visitors for consent again"
)

_CONSENT_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
# The alphabet itsdangerous' URL-safe base64 uses, as 6-bit values, for the canonical-form check below.
_B64_VALUE: Final = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_OWS: Final = b" \t"


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentChoice:
    """One visitor's recorded choice, as signed into the cookie."""

    consent_id: str  # random id, also the key of the proof-of-consent receipts
    choices: Mapping[str, bool]  # every configured category -> granted?
    revision: str  # the policy revision the choice was given under
    issued_at: int  # unix seconds
    gpc: bool  # an opt-out signal (Sec-GPC: 1, or DNT: 1 when honoured) was sent when the choice was made


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentDecision:
    """What one request may do, after the GPC/DNT precedence rule."""

    choice: ConsentChoice | None  # None = no valid current choice -> show the banner
    granted: frozenset[str]  # effective categories after GPC/DNT precedence
    gpc: bool  # Sec-GPC: 1 on this request (reported even when consent.honor_gpc is off)
    dnt: bool = False  # DNT: 1 on this request (reported even when consent.honor_dnt is off)


def category_texts(settings: Settings) -> dict[str, tuple[str, str]]:
    """``{category: (label, description)}`` as the banner shows them by default, in configured order.

    ``[consent.category.NAME]`` wins; otherwise the banner's built-in text for a known category; otherwise the name.
    """
    from gateway.banner.texts import DEFAULT_CATEGORY_TEXTS  # lazy: only needed at start-up

    result: dict[str, tuple[str, str]] = {}
    for name in settings.consent.categories:
        builtin_label, builtin_description = DEFAULT_CATEGORY_TEXTS.get(name, (name, ""))
        configured = settings.consent.category.get(name)
        label = configured.label if configured is not None and configured.label else builtin_label
        description = configured.description if configured is not None and configured.description else ""
        result[name] = (label, description or builtin_description)
    return result


def compute_revision(settings: Settings) -> str:
    """``consent.revision`` if set, else a short stable hash of everything the visitor is asked to agree to.

    The hash covers the categories with their texts, each destination's name, kind, required categories and field
    allowlist, and the banner texts (the built-in defaults and the configured overrides), so any change to what is
    collected, by whom, or how it is explained voids earlier choices. Endpoints, timeouts and other settings the
    visitor is not asked about do not count.
    """
    if settings.consent.revision:
        return settings.consent.revision
    from gateway.banner.texts import DEFAULT_TEXTS  # lazy: only needed at start-up

    material = {
        "categories": [[name, label, description] for name, (label, description) in category_texts(settings).items()],
        "destinations": [
            [dest.name, dest.kind, sorted(dest.requires), sorted(dest.fields)]
            for dest in sorted(settings.destinations.values(), key=lambda d: d.name)
        ],
        "banner_defaults": dict(sorted(DEFAULT_TEXTS.items())),
        "banner": {lang: dict(sorted(texts.items())) for lang, texts in sorted(settings.banner.texts.items())},
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def sec_gpc_is_on(value: bytes) -> bool:
    """Sec-GPC: exactly "1" after trimming optional whitespace (https://privacycg.github.io/gpc-spec/).

    A comma-joined value (several field lines folded by an intermediary, RFC 9110 §5.3) counts if any member is "1".
    """
    if value.strip(_OWS) == b"1":
        return True
    return b"," in value and any(part.strip(_OWS) == b"1" for part in value.split(b","))


def dnt_is_on(value: bytes) -> bool:
    """DNT: W3C TPE's DNT-field-value = ("0" / "1") *DNT-extension, so "1" followed by extension characters is 1."""
    return value.strip(_OWS)[:1] == b"1"


def _is_canonical_base64(segment: bytes) -> bool:
    """Reject base64 that decodes to the same bytes as a different string (non-zero padding bits, stray characters).

    Python's decoder ignores both, so without this check some single-character changes of a token would still
    verify: harmless (the signed bytes are the same) but it would make every token have several spellings.
    """
    if not segment:
        return False
    values = _B64_VALUE
    for char in segment:
        if char not in values:
            return False
    rest = len(segment) % 4
    if rest == 1:
        return False
    if rest == 2:
        return values[segment[-1]] & 0x0F == 0
    if rest == 3:
        return values[segment[-1]] & 0x03 == 0
    return True


def _is_canonical_token(token: bytes) -> bool:
    body = token[1:] if token[:1] == b"." else token  # a leading "." marks a zlib-compressed payload
    parts = body.split(b".")
    return len(parts) == 3 and all(_is_canonical_base64(part) for part in parts)


class _CacheEntry:
    """A verified token: its choice and the four decisions it can lead to (Sec-GPC x DNT), built once."""

    __slots__ = ("choice", "decisions", "expires_at")

    def __init__(self, choice: ConsentChoice | None, expires_at: float, honor_gpc: bool, honor_dnt: bool) -> None:
        self.choice = choice
        self.expires_at = expires_at
        granted: frozenset[str] = frozenset()
        if choice is not None:
            granted = frozenset(name for name, ok in choice.choices.items() if ok)
        # Under an opt-out signal only a choice made while the signal was sent keeps its grants.
        under_signal = granted if choice is not None and choice.gpc else frozenset()
        self.decisions = tuple(
            ConsentDecision(choice, under_signal if (gpc and honor_gpc) or (dnt and honor_dnt) else granted, gpc, dnt)
            for gpc, dnt in ((False, False), (False, True), (True, False), (True, True))
        )


class ConsentManager:
    """Reads and writes the consent cookie and applies the precedence rule.

    Build one per process at start-up; :meth:`decide` runs on every request and does no I/O.
    """

    def __init__(self, settings: Settings, *, token_cache_size: int = TOKEN_CACHE_SIZE) -> None:
        consent = settings.consent
        if token_cache_size < 1:
            raise ValueError("token_cache_size must be at least 1")
        self._token_cache_size = token_cache_size
        if not 1 <= consent.max_age_days <= MAX_AGE_DAYS_LIMIT:
            raise ValueError(f"consent.max_age_days must be between 1 and {MAX_AGE_DAYS_LIMIT}")
        self.revision: str = compute_revision(settings)
        self.categories: tuple[str, ...] = tuple(consent.categories)
        self._category_set = frozenset(self.categories)
        self.cookie_name: str = consent.cookie
        self.max_age: int = consent.max_age_days * 86400
        self.max_cookie_bytes: int = consent.max_cookie_bytes
        self.honor_gpc: bool = consent.honor_gpc
        self.honor_dnt: bool = consent.honor_dnt
        keys = [str(key).encode("utf-8") for key in consent.secret_keys]
        self.demo_key: bool = not keys
        if self.demo_key:
            keys = [secrets.token_bytes(32)]
            logger.warning(DEMO_KEY_WARNING)
        # itsdangerous >= 2.0: a list of keys, oldest first; the last one signs, all of them verify.
        self._serializer = URLSafeTimedSerializer(keys, salt=COOKIE_SALT, signer_kwargs=SIGNER_KWARGS)
        self._name_eq = consent.cookie.encode("latin-1") + b"="
        self._cookie_attributes = f"; Max-Age={self.max_age}; Path=/; Secure; HttpOnly; SameSite=Lax"
        self._cache: dict[bytes, _CacheEntry] = {}
        # Cookie header value -> its verified token's entry, or None when it holds no single valid token of ours.
        self._by_header: dict[bytes, _CacheEntry | None] = {}
        self._no_choice = ConsentDecision(None, frozenset(), False)

    # ---------------------------------------------------------------------------------------------- hot path

    def decide(self, headers: Sequence[tuple[bytes, bytes]]) -> ConsentDecision:
        """The consent decision for one request, from its ASGI headers (lower-case names, latin-1 bytes)."""
        gpc = dnt = False
        cookies: list[bytes] = []
        for name, value in headers:
            if name == b"cookie":
                cookies.append(value)  # decide_cookies looks for our name in each
            elif name == b"sec-gpc":
                gpc = gpc or sec_gpc_is_on(value)
            elif name == b"dnt":
                dnt = dnt or dnt_is_on(value)
        return self.decide_cookies(cookies, gpc, dnt)

    def decide_cookies(
        self, cookies: Sequence[bytes], gpc: bool, dnt: bool, now: float | None = None
    ) -> ConsentDecision:
        """:meth:`decide` for a caller that has read the request headers already (the middleware, in one pass).

        ``cookies``: the values of every Cookie header, in order; ``gpc``/``dnt``: whether any Sec-GPC/DNT header
        said :func:`sec_gpc_is_on`/:func:`dnt_is_on`; ``now``: ``time.time()`` if the caller has it at hand.
        """
        now_ = time.time() if now is None else now
        header = cookies[0] if len(cookies) == 1 else None  # one Cookie header (HTTP/1.1 always; HTTP/2 may split)
        entry: _CacheEntry | None
        if type(header) is bytes and len(header) <= HEADER_CACHE_BYTES:
            try:
                entry = self._by_header[header]
            except KeyError:
                entry = self._entry_for(cookies, now_)
                remember(self._by_header, header, entry, self._token_cache_size)
            else:
                if entry is not None and entry.expires_at < now_:
                    entry = self._by_header[header] = self._entry_for(cookies, now_)  # expired: now no choice
        else:
            entry = self._entry_for(cookies, now_)
        if entry is None:
            return self._no_choice if not gpc and not dnt else ConsentDecision(None, frozenset(), gpc, dnt)
        return entry.decisions[2 * gpc + dnt]

    def _entry_for(self, cookies: Iterable[bytes], now: float) -> _CacheEntry | None:
        """The verified, unexpired entry of the one consent token in ``cookies``; None if there is none (no cookie,
        two of them, or one that does not verify)."""
        name_eq = self._name_eq
        token: bytes | None = None
        duplicated = False
        for value in cookies:
            # Cheap pre-check; most requests without our cookie stop here. (bytes.find, not "in": for bytes, "in"
            # first tries the operand as an integer and pays for a TypeError.)
            start = value.find(name_eq)
            if start != -1:
                found, many = self._find_cookie(value, start)
                if found is not None:
                    duplicated = duplicated or many or token is not None
                    token = found

        if token is None or duplicated:
            # Two cookies with our name (cookie tossing from a sibling domain, or a stale path): nobody can tell
            # which one the visitor set, so neither counts.
            return None
        entry = self._cache.get(token)
        if entry is None:
            entry = self._verify(token)
        if entry is not None and entry.expires_at < now:
            self._cache.pop(token, None)
            entry = None
        return entry

    def _find_cookie(self, header: bytes, start: int | None = None) -> tuple[bytes | None, bool]:
        """Our cookie's last value in one Cookie header and whether it occurs more than once.

        ``start``: where ``header.find(name + "=")`` is, if the caller has looked already.
        """
        values = list(cookie_values(header, self._name_eq, start))
        return (values[-1] if values else None), len(values) > 1

    def _verify(self, token: bytes) -> _CacheEntry | None:
        if len(token) > self.max_cookie_bytes or not _is_canonical_token(token):
            return None
        try:
            payload, signed_at = self._serializer.loads(token, max_age=self.max_age, return_timestamp=True)
        except (BadData, ValueError, TypeError, OverflowError, RecursionError):
            return None  # tampered, expired, wrong key or salt, undecodable: fail closed, no choice
        choice = self._choice_from_payload(payload)
        if choice is not None and choice.revision != self.revision:
            choice = None  # valid but given under another policy revision: ask again
        entry = _CacheEntry(choice, signed_at.timestamp() + self.max_age, self.honor_gpc, self.honor_dnt)
        remember(self._cache, token, entry, self._token_cache_size)
        return entry

    def _choice_from_payload(self, payload: object) -> ConsentChoice | None:
        if not isinstance(payload, dict):
            return None
        version = payload.get("v")
        if type(version) is not int or version != SCHEMA_VERSION:  # True == 1 in Python: compare the type too
            return None
        cid, issued_at, revision, choices, gpc = (payload.get(k) for k in ("cid", "t", "r", "c", "gpc"))
        if not (
            isinstance(cid, str)
            and _CONSENT_ID.match(cid)
            and isinstance(issued_at, int)
            and not isinstance(issued_at, bool)
            and isinstance(revision, str)
            and isinstance(gpc, bool)
            and isinstance(choices, dict)
            and all(isinstance(v, bool) for v in choices.values())
        ):
            return None
        if choices.keys() != self._category_set:
            return None  # the visitor was asked about other categories: this is not a choice about today's set
        ordered = {name: choices[name] for name in self.categories}
        return ConsentChoice(cid, MappingProxyType(ordered), revision, issued_at, gpc)

    # ---------------------------------------------------------------------------------------------- writing

    def make_choice(self, choices: Mapping[str, object], gpc: bool, consent_id: str | None = None) -> ConsentChoice:
        """A new choice under the current revision; categories not named are refused (deny by default).

        Raises ValueError for an unknown category, a non-boolean value or a malformed consent id.
        """
        unknown = [name for name in choices if name not in self._category_set]
        if unknown:
            raise ValueError(f"unknown consent category {unknown[0]!r}")
        if not all(isinstance(v, bool) for v in choices.values()):
            raise ValueError("consent choices must be true or false")
        if consent_id is None:
            consent_id = secrets.token_urlsafe(16)
        elif not _CONSENT_ID.match(consent_id):
            raise ValueError("malformed consent id")
        ordered = {name: bool(choices.get(name, False)) for name in self.categories}
        return ConsentChoice(consent_id, MappingProxyType(ordered), self.revision, int(time.time()), gpc)

    def dumps(self, choice: ConsentChoice) -> str:
        payload = {
            "v": SCHEMA_VERSION,
            "cid": choice.consent_id,
            "t": choice.issued_at,
            "r": choice.revision,
            "c": dict(choice.choices),
            "gpc": choice.gpc,
        }
        return self._serializer.dumps(payload)

    def loads(self, token: str) -> ConsentChoice | None:
        """The current, valid choice in ``token``, or None (never raises)."""
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            return None
        entry = self._cache.get(raw)
        if entry is not None and entry.expires_at < time.time():
            self._cache.pop(raw, None)
            return None
        if entry is None:
            entry = self._verify(raw)
        return entry.choice if entry is not None else None

    def set_cookie_header(self, choice: ConsentChoice) -> bytes:
        """The full ``Set-Cookie`` value. A refusal is stored with the same lifetime as an acceptance (CNIL).

        ``__Host-`` requires Secure, ``Path=/`` and no Domain (RFC 6265bis §4.1.3.2); HttpOnly because the banner reads
        the state from ``GET {prefix}/consent``, never from the cookie.
        """
        return f"{self.cookie_name}={self.dumps(choice)}{self._cookie_attributes}".encode("latin-1")

    def previous_consent_id(self, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        """The consent id of a validly signed cookie, even one from an older revision (None when there is none).

        Reusing it links a visitor's successive choices in the receipt log without any other identifier.
        """
        token: bytes | None = None
        for name, value in headers:
            if name == b"cookie" and self._name_eq in value:
                found, many = self._find_cookie(value)
                if many or (found is not None and token is not None):
                    return None
                token = found if found is not None else token
        if token is None or len(token) > self.max_cookie_bytes or not _is_canonical_token(token):
            return None
        try:
            payload = self._serializer.loads(token, max_age=self.max_age)
        except (BadData, ValueError, TypeError, OverflowError, RecursionError):
            return None
        cid = payload.get("cid") if isinstance(payload, dict) else None
        return cid if isinstance(cid, str) and _CONSENT_ID.match(cid) else None
