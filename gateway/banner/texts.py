"""Banner texts: English defaults, per-language overrides from ``[banner.texts.<lang>]``, Accept-Language choice.

Every text the visitor reads is a key below. A language table in the configuration overrides any subset of them::

    [banner.texts.de]
    title = "Ihre Datenschutz-Einstellungen"
    accept_all = "Alle akzeptieren"
    reject_all = "Alle ablehnen"
    analytics_label = "Statistik"            # <category>_label / <category>_description per consent category

Category texts fall back to ``[consent.category.<name>]`` and then to the built-in English text. Problems (an
unknown key, an empty button text, a malformed language tag) are reported at startup as :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from types import MappingProxyType
from urllib.parse import urlsplit

from gateway.config import ConfigError, Settings

__all__ = [
    "CATEGORY_TEXT_SUFFIXES",
    "DEFAULT_CATEGORY_TEXTS",
    "DEFAULT_TEXTS",
    "TEXT_KEYS",
    "BannerTexts",
    "CategoryText",
    "LanguageChooser",
    "parse_accept_language",
    "resolve_texts",
]

# The English defaults. "Reject all" sits next to "Accept all" with the same weight: refusing must be as easy as
# accepting (CNIL délibération 2020-092, and GDPR Art 7(3) for withdrawing).
DEFAULT_TEXTS: Mapping[str, str] = MappingProxyType(
    {
        "title": "Your privacy choices",
        "body": (
            "We would like to use optional analytics to understand how this site is used and to improve it. "
            "They stay off unless you accept. You can change your choice at any time under "
            "\u201cPrivacy settings\u201d at the bottom of every page."
        ),
        "accept_all": "Accept all",
        "reject_all": "Reject all",
        "settings": "Settings",
        "categories_legend": "Optional categories",
        "save": "Save choices",
        "close": "Close",
        "privacy_link": "Privacy notice",
        "settings_link": "Privacy settings",
        "settings_title": "Privacy settings",
        "back": "Back to the page",
        "saved": "Your privacy choices have been saved.",
    }
)
TEXT_KEYS: tuple[str, ...] = tuple(DEFAULT_TEXTS)
CATEGORY_TEXT_SUFFIXES = ("_label", "_description")

DEFAULT_CATEGORY_TEXTS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "analytics": (
            "Analytics",
            "Statistics about how pages are used, such as which pages are visited, sent to our analytics "
            "providers so that we can improve the site.",
        ),
    }
)

# BCP 47 tags as they appear in configuration and Accept-Language (RFC 9110 §12.5.4 uses RFC 4647 language ranges).
_LANGUAGE_TAG = re.compile(r"^[a-z]{1,8}(?:-[a-z0-9]{1,8})*$")
# Accept-Language weight: "q=" then 0, 0.xxx, 1 or 1.000 (RFC 9110 §12.4.2).
_QVALUE = re.compile(r"^(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)$")
# A visitor's header beyond this many entries is noise or an attack; the first ones are the preferred ones.
_MAX_RANGES = 16
_MAX_HEADER_CHARS = 512
# Distinct Accept-Language values remembered; real traffic has a few hundred at most.
_CACHE_SIZE = 512


@dataclasses.dataclass(frozen=True, slots=True)
class CategoryText:
    name: str
    label: str
    description: str


@dataclasses.dataclass(frozen=True, slots=True)
class BannerTexts:
    """All texts of one language, resolved (overrides over config over defaults)."""

    language: str
    values: Mapping[str, str]
    categories: tuple[CategoryText, ...]

    def __getitem__(self, key: str) -> str:
        return self.values[key]


def _check(condition: bool, key: str, value: object, problem: str) -> None:
    if not condition:
        raise ConfigError(key, value, problem)


def _normalize_tag(tag: str) -> str:
    return tag.strip().lower().replace("_", "-")


def resolve_texts(settings: Settings) -> dict[str, BannerTexts]:
    """Texts per language (lower-case tags), English always included. Raises ConfigError on a bad table."""
    banner = settings.banner
    categories = settings.consent.categories
    category_keys = {f"{name}{suffix}" for name in categories for suffix in CATEGORY_TEXT_SUFFIXES}

    url = settings.site.privacy_url
    parts = urlsplit(url)
    # The link goes into every page; only a same-site path or an http(s) URL may be configured (no javascript:).
    local = url.startswith("/") and not url.startswith(("//", "/\\"))
    _check(
        local or (parts.scheme in ("http", "https") and bool(parts.netloc)),
        "site.privacy_url",
        url,
        "must be a path starting with / or an http(s) URL",
    )

    overrides: dict[str, Mapping[str, str]] = {}
    for raw_tag, table in banner.texts.items():
        tag = _normalize_tag(raw_tag)
        _check(bool(_LANGUAGE_TAG.match(tag)), f"banner.texts.{raw_tag}", raw_tag, "is not a language tag like 'de'")
        _check(tag not in overrides, f"banner.texts.{raw_tag}", raw_tag, "is given twice")
        for key, value in table.items():
            where = f"banner.texts.{raw_tag}.{key}"
            _check(key in DEFAULT_TEXTS or key in category_keys, where, value, "is not a known banner text")
            # An empty "Reject all" would make refusing harder than accepting; no text may be blank.
            _check(bool(value.strip()) or key.endswith("_description"), where, value, "must not be empty")
        overrides[tag] = table

    default_language = _normalize_tag(banner.default_language)
    _check(
        default_language == "en" or default_language in overrides,
        "banner.default_language",
        banner.default_language,
        "has no texts: add a [banner.texts.<language>] table or use 'en'",
    )

    result: dict[str, BannerTexts] = {}
    for tag in dict.fromkeys(("en", *overrides)):
        table = overrides.get(tag, {})
        values = {key: table.get(key, default) for key, default in DEFAULT_TEXTS.items()}
        cats = []
        for name in categories:
            configured = settings.consent.category.get(name)
            builtin = DEFAULT_CATEGORY_TEXTS.get(name, (name.replace("_", " ").capitalize(), ""))
            label = table.get(f"{name}_label") or (configured.label if configured else "") or builtin[0]
            if f"{name}_description" in table:
                description = table[f"{name}_description"]
            else:
                description = (configured.description if configured else "") or builtin[1]
            cats.append(CategoryText(name, label, description))
        result[tag] = BannerTexts(tag, MappingProxyType(values), tuple(cats))
    return result


def parse_accept_language(value: str) -> list[str]:
    """Language ranges from an Accept-Language value, most preferred first; q=0 and malformed entries dropped.

    RFC 9110 §12.5.4: ``da, en-gb;q=0.8, en;q=0.7``. Equal weights keep the visitor's order (a stable sort).
    """
    ranked: list[tuple[float, str]] = []
    for item in value[:_MAX_HEADER_CHARS].split(",")[:_MAX_RANGES]:
        tag, _, params = item.partition(";")
        tag = tag.strip().lower()
        if not (tag == "*" or _LANGUAGE_TAG.match(tag)):
            continue
        weight = 1.0
        for param in params.split(";"):
            name, _, text = param.strip().partition("=")
            if name.strip().lower() == "q":
                text = text.strip()
                weight = float(text) if _QVALUE.match(text) else -1.0
        if weight > 0:
            ranked.append((weight, tag))
    ranked.sort(key=lambda pair: -pair[0])
    return [tag for _, tag in ranked]


class LanguageChooser:
    """Picks one of the configured languages for an Accept-Language header, cached per distinct header value.

    For each range in preference order: the exact tag, then its primary subtag, then any configured tag with the
    same primary subtag ("pt-pt" falls back to "pt-br" rather than to the default); ``*`` and no match fall
    through to the default language.
    """

    __slots__ = ("_available", "_by_primary", "_cache", "default")

    def __init__(self, languages: tuple[str, ...], default: str) -> None:
        self.default = default
        self._available = frozenset(languages)
        self._by_primary: dict[str, str] = {}
        for tag in sorted(languages):
            self._by_primary.setdefault(tag.split("-")[0], tag)
        self._cache: dict[bytes, str] = {}

    def choose(self, accept_language: bytes | None) -> str:
        if not accept_language or len(self._available) == 1:
            return self.default
        cached = self._cache.get(accept_language)
        if cached is not None:
            return cached
        chosen = self._choose(accept_language.decode("latin-1"))
        if len(self._cache) >= _CACHE_SIZE:
            # Crude but bounded: an attacker sending random values only ever costs a re-parse.
            self._cache.clear()
        self._cache[accept_language] = chosen
        return chosen

    def _choose(self, header: str) -> str:
        for tag in parse_accept_language(header):
            if tag in self._available:
                return tag
            primary = tag.split("-")[0]
            if primary in self._available:
                return primary
            if primary in self._by_primary and primary != "*":
                return self._by_primary[primary]
        return self.default
