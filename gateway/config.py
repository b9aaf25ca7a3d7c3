"""Typed settings, loaded once at startup from TOML plus ``GATEWAY_*`` environment overrides.

Every problem is reported as one line that names the dotted key and the bad value, for example::

    config error: client_ip.trusted_proxies[1]: '10.0.0.300/8' is not an IP network

Environment overrides use ``GATEWAY_<SECTION>__<KEY>`` (double underscore between levels), for example
``GATEWAY_UPSTREAM__URL=https://origin.example.org`` or ``GATEWAY_DESTINATIONS__GA4__API_SECRET=...``. The value
is read as a TOML value when it parses as one (``["a", "b"]``, ``42``, ``true``) and as a plain string otherwise.
String values may reference environment variables as ``${NAME}``; secrets should always be given that way.
Secrets are held as :class:`starlette.datastructures.Secret`, whose ``repr`` is masked.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from starlette.datastructures import Secret

__all__ = [
    "DEFAULT_FIELDS",
    "NEEDED_FIELDS",
    "AnalyticsSettings",
    "AnonymizeSettings",
    "BannerSettings",
    "ClientIPSettings",
    "ConfigError",
    "ConsentCategory",
    "ConsentSettings",
    "DestinationSettings",
    "DispatchSettings",
    "FastlySettings",
    "GeoSettings",
    "LoggingSettings",
    "MetricsSettings",
    "Secret",
    "ServerSettings",
    "Settings",
    "SiteSettings",
    "SpoolSettings",
    "UpstreamSettings",
    "UrlSettings",
    "load_settings",
]

ENV_PREFIX = "GATEWAY_"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Sources the client-IP resolver understands (see gateway.clientip).
CLIENT_IP_SOURCES = (
    "fastly-client-ip",
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "cf-connecting-ip",
    "true-client-ip",
)
# Fields an event can carry; a destination's `fields` allowlist picks from these.
EVENT_FIELDS = ("name", "url", "referrer", "title", "country", "language", "user_agent", "ip", "props")
DESTINATION_KINDS = ("plausible", "ga4", "sentry", "dryrun")
# Sentry envelope item types (https://develop.sentry.dev/sdk/envelopes/#data-model). Replays, attachments,
# profiles and feedback carry page content, files and free text: off unless a destination lists them.
SENTRY_ITEM_TYPES = (
    "event", "transaction", "session", "sessions", "client_report", "check_in", "span", "statsd", "metric_meta",
    "attachment", "replay_event", "replay_recording", "replay_video", "profile", "profile_chunk", "user_report",
    "feedback",
)  # fmt: skip
DEFAULT_SENTRY_ITEM_TYPES = ("event", "transaction", "session", "sessions", "client_report")

# The fields a destination gets when its table names none: what that kind needs to count correctly, and no more.
DEFAULT_FIELDS: Final[Mapping[str, tuple[str, ...]]] = types.MappingProxyType(
    {
        # Plausible tells visitors apart by a daily-salted hash of address and user agent, reads browser and OS from
        # the user agent, and drops datacenter addresses. Without the visitor's (truncated) address it would see
        # the gateway's own for everyone (https://plausible.io/docs/events-api#request-headers).
        "plausible": ("name", "url", "referrer", "user_agent", "ip"),
        # GA4 never gets an address: the country from the gateway's lookup on the full one is its only location
        # (user_location.country_id), and the title and language fill its page and audience reports.
        "ga4": ("name", "url", "referrer", "title", "country", "language"),
        # Error reports: where the error happened and in which browser; no address (Sentry would only use it to
        # tell users apart and guess a location).
        "sentry": ("url", "user_agent"),
        # A generic dry run prints a page view's bare minimum unless told otherwise.
        "dryrun": ("name", "url", "referrer"),
    }
)
_GENERIC_DEFAULT_FIELDS: Final = ("name", "url", "referrer")

# Per kind: the fields whose absence makes that destination's figures wrong, and what goes wrong. An explicit
# `fields` list may leave them out (the operator decides); `gateway check` says what that costs.
NEEDED_FIELDS: Final[Mapping[str, tuple[tuple[str, str], ...]]] = types.MappingProxyType(
    {
        "plausible": (
            ("url", "every page view is counted on the home page"),
            (
                "ip",
                "Plausible sees the gateway's address for every visitor: all of them count as one visitor per day,"
                " locations show the gateway's country, and the events may be dropped as datacenter traffic",
            ),
            (
                "user_agent",
                "Plausible sees a fixed user agent: browser and OS reports read 'privacy-gateway' and visitors are"
                " told apart by address only",
            ),
        ),
        "ga4": (
            ("url", "every page view is counted on the home page"),
            ("country", "GA4 never sees an address, so its reports show no country"),
        ),
        "sentry": (
            ("url", "errors cannot be tied to the page they happened on (only its origin is kept)"),
            ("user_agent", "browser-specific errors cannot be told apart"),
        ),
    }
)


class ConfigError(Exception):
    """A configuration problem, reported as a single line naming the key and the value."""

    def __init__(self, key: str, value: object, problem: str) -> None:
        self.key = key
        self.value = value
        self.problem = problem
        shown = "<secret>" if isinstance(value, Secret) else repr(value)
        super().__init__(f"config error: {key}: {shown} {problem}" if key else f"config error: {problem}")


# --------------------------------------------------------------------------------------------------------------
# Sections. Field defaults are the documented defaults (config/gateway.example.toml mirrors them).
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    # Seconds uvicorn waits for in-flight requests on SIGTERM before closing connections.
    shutdown_timeout: float = 10.0
    # The gateway's own access log (truncated IPs, scrubbed paths). uvicorn's raw access log is always off.
    access_log: bool = True
    # uvicorn answers 503 above this many concurrent connections/tasks (0 = unlimited).
    limit_concurrency: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str = ""
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    # Keep-alive connections kept open to the upstream.
    pool_size: int = 64
    # Send the visitor's Host header upstream instead of the upstream URL's host.
    preserve_host: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class ClientIPSettings:
    # Forwarding headers are consulted only when the TCP peer is inside one of these networks.
    trusted_proxies: tuple[str, ...] = ()
    # Ordered sources; the first that yields a valid address wins, the TCP peer is the last resort.
    headers: tuple[str, ...] = ("fastly-client-ip", "x-forwarded-for", "forwarded")


@dataclasses.dataclass(frozen=True, slots=True)
class AnonymizeSettings:
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48


@dataclasses.dataclass(frozen=True, slots=True)
class GeoSettings:
    database: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentCategory:
    label: str = ""
    description: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentSettings:
    cookie: str = "__Host-consent"
    categories: tuple[str, ...] = ("analytics",)
    # Human texts per category: [consent.category.analytics] label = "…", description = "…".
    category: Mapping[str, ConsentCategory] = dataclasses.field(default_factory=dict)
    # Empty: derived from a hash of categories, destinations and banner texts, so any change asks again.
    revision: str = ""
    max_age_days: int = 180
    honor_gpc: bool = True
    honor_dnt: bool = False
    # Signing keys, oldest first; the last one signs, all verify (rotation). Give them as ${VAR} references.
    # Empty: a random key per start (fine for the demo; every restart asks visitors again).
    secret_keys: tuple[Secret, ...] = ()
    # Append-only, hash-chained receipt log of every change of choice: a SQLite file per host, or a
    # postgresql:// URL (password as ${VAR}) for one chain across a fleet. Empty string disables it. Not in the
    # repr: a URL may carry a password.
    receipts: str = dataclasses.field(default="var/consent-receipts.sqlite3", repr=False)
    # With PostgreSQL: the durable local queue receipts wait in until the database has them, and its bound.
    receipts_queue: str = "var/consent-receipts-queue.sqlite3"
    receipts_queue_max: int = 100_000
    # Largest consent-cookie value accepted; anything longer is "no choice".
    max_cookie_bytes: int = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class SiteSettings:
    # Origins of the site, e.g. ["https://www.python.org"]. Used for same-origin checks on consent writes and to
    # tell the site's own referrers from external ones. Empty: the request's own scheme://host is the site.
    origins: tuple[str, ...] = ()
    # Where the banner's "privacy notice" link points.
    privacy_url: str = "/privacy/"


@dataclasses.dataclass(frozen=True, slots=True)
class BannerSettings:
    enabled: bool = True
    default_language: str = "en"
    # Per-language overrides of the banner texts: [banner.texts.de] title = "…", accept = "…", …
    texts: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class AnalyticsSettings:
    # "server": page views are seen server-side (right without a caching CDN); "pixel": a first-party image in every
    # page the gateway rewrites counts them, so a page served from a CDN's cache counts too (no JavaScript needed);
    # "beacon": only the beacon counts them; "off": nothing does.
    # "edge": the CDN's own request log, streamed to {prefix}/intake/fastly ([fastly] below), counts them.
    pageviews: Literal["server", "pixel", "edge", "beacon", "off"] = "server"
    beacon_path: str = "/api/event"
    beacon_max_bytes: int = 16384
    # Path prefixes and file extensions that are never page views.
    exclude_paths: tuple[str, ...] = ("/static/", "/media/", "/favicon.ico", "/robots.txt", "/.well-known/")
    exclude_extensions: tuple[str, ...] = (
        ".css",
        ".js",
        ".mjs",
        ".map",
        ".png",
        ".jpg",
        ".jpeg",
        ".gif",
        ".svg",
        ".ico",
        ".webp",
        ".avif",
        ".woff",
        ".woff2",
        ".ttf",
        ".txt",
        ".xml",
        ".json",
        ".pdf",
        ".zip",
        ".gz",
        ".tgz",
        ".xz",
        ".exe",
        ".msi",
        ".pkg",
        ".dmg",
    )
    # Custom (non-pageview) event names and prop keys the beacon accepts; anything else is dropped.
    custom_events: tuple[str, ...] = ()
    allowed_props: tuple[str, ...] = ()
    # First-party id cookie for destinations that need a client id (GA4); set only with the required consent.
    client_id_cookie: str = "__Host-gw_cid"


@dataclasses.dataclass(frozen=True, slots=True)
class FastlySettings:
    # Fastly HTTPS log streaming to {prefix}/intake/fastly (analytics.pageviews = "edge"). Service ids answer Fastly's
    # ownership check at /.well-known/fastly/logging/challenge.
    service_ids: tuple[str, ...] = ()
    # The header the logging endpoint sends (Fastly: "Custom header name/value") and its secret; no secret, no intake.
    auth_header: str = "x-gateway-intake-token"
    secret: Secret | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    # gzip-compressed batches are inflated up to this many bytes; more is a 413, never memory growth.
    max_decompressed_bytes: int = 64 * 1024 * 1024
    # Records older than this (Fastly retries for a while after an outage) are skipped as "too_old".
    max_record_age_seconds: float = 6 * 3600.0


@dataclasses.dataclass(frozen=True, slots=True)
class UrlSettings:
    allowed_query_params: tuple[str, ...] = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
    # Replace path segments that look like e-mails, UUIDs, long tokens or long digit runs.
    scrub_path_segments: bool = True
    placeholder: str = ":redacted"


@dataclasses.dataclass(frozen=True, slots=True)
class DestinationSettings:
    name: str
    kind: Literal["plausible", "ga4", "sentry", "dryrun"]
    endpoint: str = ""
    domain: str = ""  # plausible: the site domain registered with Plausible
    measurement_id: str = ""  # ga4
    api_secret: Secret | None = None  # ga4
    # Consent categories that must all be granted; empty = needs none (cookieless, e.g. Plausible).
    requires: tuple[str, ...] = ()
    # Allowlist of event fields this destination receives ("ip" = the truncated IP; no other form exists). Not
    # given: DEFAULT_FIELDS of the kind, filled in by load_settings.
    fields: tuple[str, ...] = _GENERIC_DEFAULT_FIELDS
    # Per-destination query parameter allowlist; None = the global [urls] list.
    allowed_query_params: tuple[str, ...] | None = None
    # Print what would be sent instead of sending it.
    dry_run: bool = False
    # How long an undeliverable payload may wait in the spool (GA4 ignores events older than 72 h).
    ttl_seconds: float = 3600.0
    # GA4 without consent: "pseudonym" = a daily-rotating keyed hash instead of a cookie id.
    client_id: Literal["cookie", "pseudonym"] = "cookie"
    # sentry: the DSNs whose envelopes the tunnel forwards (anything else is refused: the SSRF guard), and the
    # envelope item types that may leave.
    dsns: tuple[str, ...] = ()
    item_types: tuple[str, ...] = DEFAULT_SENTRY_ITEM_TYPES


@dataclasses.dataclass(frozen=True, slots=True)
class DispatchSettings:
    queue_size: int = 10000
    max_attempts: int = 6
    max_age_seconds: float = 72 * 3600.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # A read timeout after the body was sent may have been delivered; retrying it risks a double count.
    retry_ambiguous: bool = False
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    write_timeout: float = 5.0
    pool_timeout: float = 1.0
    max_connections: int = 20
    # Consecutive failures that open a destination's circuit, and how long it stays open.
    circuit_threshold: int = 5
    circuit_reset_seconds: float = 30.0
    # How often queued overflow is written to the spool and the spool is polled.
    flush_interval: float = 0.2
    # On shutdown: time to deliver what is queued before the rest goes to the spool.
    shutdown_timeout: float = 5.0
    # "in_process": this process delivers (one process). "deliverer": request workers write filtered payloads to the
    # host's spool (spool.path) and one `gateway deliver` process per host sends them and keeps the books
    # (`gateway serve --workers N` runs it for you). See README "Deploying".
    mode: Literal["in_process", "deliverer"] = "in_process"
    # Deliverer mode: how often a request worker writes its buffered payloads to the host spool, in seconds. A worker
    # killed with SIGKILL loses at most the events of this last interval.
    handoff_interval: float = 0.01


@dataclasses.dataclass(frozen=True, slots=True)
class SpoolSettings:
    enabled: bool = True
    path: str = "var/spool.sqlite3"
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool = True
    # Bearer token that also grants access from untrusted addresses.
    token: Secret | None = None
    # Peers allowed without a token (besides loopback).
    allow: tuple[str, ...] = ("127.0.0.1/32", "::1/128")


@dataclasses.dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    upstream: UpstreamSettings = dataclasses.field(default_factory=UpstreamSettings)
    client_ip: ClientIPSettings = dataclasses.field(default_factory=ClientIPSettings)
    anonymize: AnonymizeSettings = dataclasses.field(default_factory=AnonymizeSettings)
    geo: GeoSettings = dataclasses.field(default_factory=GeoSettings)
    consent: ConsentSettings = dataclasses.field(default_factory=ConsentSettings)
    site: SiteSettings = dataclasses.field(default_factory=SiteSettings)
    banner: BannerSettings = dataclasses.field(default_factory=BannerSettings)
    analytics: AnalyticsSettings = dataclasses.field(default_factory=AnalyticsSettings)
    urls: UrlSettings = dataclasses.field(default_factory=UrlSettings)
    fastly: FastlySettings = dataclasses.field(default_factory=FastlySettings)
    destinations: Mapping[str, DestinationSettings] = dataclasses.field(default_factory=dict)
    dispatch: DispatchSettings = dataclasses.field(default_factory=DispatchSettings)
    spool: SpoolSettings = dataclasses.field(default_factory=SpoolSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    logging: LoggingSettings = dataclasses.field(default_factory=LoggingSettings)
    # Path prefix of the gateway's own endpoints (consent, flows, health, metrics).
    prefix: str = "/_privacy"
    # Where the settings came from (a file path, or "" for defaults); informational.
    source: str = ""
    # One line each: what the settings cost in correctness, and (when loaded with missing_env="warn") the
    # ${VAR} references that were not set. Informational, like source; never read from a file.
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    missing_env: Literal["error", "warn"] = "error",
) -> Settings:
    """Load, interpolate and validate settings; raise :class:`ConfigError` on the first problem.

    ``path=None`` gives the defaults plus environment overrides. ``overrides`` is a nested mapping merged last
    (used by the CLI and tests). ``missing_env="warn"`` (``gateway check`` and ``explain``, which must work on a
    config without its secrets) keeps an unset ``${NAME}`` as written and reports it in ``Settings.warnings``
    instead of failing; anything that runs the gateway keeps the default, and refuses to start without it.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        source = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("", None, f"cannot read {source!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError("", None, f"{source!r} is not UTF-8") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", None, f"{source!r} is not valid TOML: {exc}") from None
    _merge(raw, _environment_overrides(env))
    if overrides:
        _merge(raw, _deep_copy(overrides))
    unset: list[str] = []
    raw = _interpolate(raw, env, "", None if missing_env == "error" else unset)
    settings: Settings = _build(Settings, raw, "", {"source": source})
    _validate(settings)
    warnings = (*unset, *field_warnings(settings))
    return dataclasses.replace(settings, warnings=warnings) if warnings else settings


def field_warnings(settings: Settings) -> list[str]:
    """One line per destination whose ``fields`` leave out what its kind needs to count correctly (NEEDED_FIELDS)."""
    lines: list[str] = []
    for name, dest in settings.destinations.items():
        missing = [(field, cost) for field, cost in NEEDED_FIELDS.get(dest.kind, ()) if field not in dest.fields]
        if missing:
            left_out = ", ".join(repr(field) for field, _ in missing)
            costs = "; ".join(cost for _, cost in missing)
            lines.append(
                f"config warning: destinations.{name}.fields: {list(dest.fields)!r} leaves out {left_out}: {costs}"
            )
    return lines


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _environment_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            continue
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return result


def _interpolate(value: Any, env: Mapping[str, str], key: str, unset: list[str] | None) -> Any:
    """Replace ``${NAME}`` references; an unset one raises, or (``unset`` given) stays as written and is noted."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in env:
                return env[name]
            problem = f"references ${{{name}}}, which is not set in the environment"
            if unset is None:
                raise ConfigError(key, value, problem)
            unset.append(f"config warning: {key}: {problem} (gateway serve refuses to start without it)")
            return match.group(0)

        return _ENV_REF.sub(replace, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{key}.{k}" if key else k, unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{key}[{i}]", unset) for i, v in enumerate(value)]
    return value


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _build(cls: type[Any], raw: Any, key: str, extra: Mapping[str, Any] | None = None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(key, raw, "must be a table")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in names or name in ("source", "warnings") or (cls is DestinationSettings and name == "name"):
            raise ConfigError(f"{key}.{name}" if key else name, raw[name], "is not a known setting")
    kwargs: dict[str, Any] = dict(extra or {})
    for field in dataclasses.fields(cls):
        if field.name in raw:
            sub = f"{key}.{field.name}" if key else field.name
            kwargs[field.name] = _convert(hints[field.name], raw[field.name], sub, field.name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs]
        raise ConfigError(f"{key}.{missing[0]}" if missing else key, None, "is required") from exc


def _convert(tp: Any, value: Any, key: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _convert(non_none[0], value, key, name)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(key, value, f"must be one of {allowed}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    if tp is Secret:
        if not isinstance(value, str):
            raise ConfigError(key, "<secret>", "must be a string")
        return Secret(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, value, "must be a list")
        return tuple(_convert(args[0], item, f"{key}[{i}]", name) for i, item in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "must be a table")
        value_type = args[1]
        result: dict[str, Any] = {}
        for sub_name, sub_value in value.items():
            sub_key = f"{key}.{sub_name}"
            if value_type is DestinationSettings:
                given: dict[str, Any] = {"name": sub_name}
                kind = sub_value.get("kind") if isinstance(sub_value, dict) else None
                if isinstance(kind, str) and kind in DEFAULT_FIELDS:
                    given["fields"] = DEFAULT_FIELDS[kind]  # an explicit `fields` in the table replaces it
                result[sub_name] = _build(DestinationSettings, sub_value, sub_key, given)
            else:
                result[sub_name] = _convert(value_type, sub_value, sub_key, sub_name)
        return types.MappingProxyType(result)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, key)
    raise AssertionError(f"unsupported setting type {tp!r} for {key}")  # pragma: no cover - programming error


# --------------------------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------------------------

_COOKIE_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 6265 token
_CATEGORY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_GA4_ID = re.compile(r"^G-[A-Z0-9]{4,20}$")
# https://develop.sentry.dev/sdk/overview/#parsing-the-dsn: scheme://public_key[:secret]@host[:port]/[path/]project_id
_SENTRY_DSN = re.compile(
    r"^https?://[0-9A-Za-z]+(?::[0-9A-Za-z]+)?@[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[^/?#]+)*/[0-9]+/?$"
)


def _unresolved(value: object) -> bool:
    """A ${NAME} reference still in a value: only load_settings(missing_env="warn") leaves one (and warns)."""
    return _ENV_REF.search(str(value)) is not None


def _check(condition: bool, key: str, value: object, problem: str) -> None:
    if not condition:
        raise ConfigError(key, value, problem)


def _check_url(key: str, value: str, *, path_allowed: bool = True) -> None:
    parts = urlsplit(value)
    _check(parts.scheme in ("http", "https") and bool(parts.hostname), key, value, "is not an http(s) URL")
    _check(not parts.username and not parts.password, key, value, "must not contain credentials")
    _check(not parts.fragment, key, value, "must not have a fragment")
    if not path_allowed:
        _check(parts.path in ("", "/") and not parts.query, key, value, "must be an origin (scheme://host[:port])")


def _check_networks(key: str, values: tuple[str, ...]) -> None:
    for i, text in enumerate(values):
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}]", text, "is not an IP network") from None


def _check_positive(section: object, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value > 0, f"{prefix}.{name}", value, "must be greater than 0")


def _validate(s: Settings) -> None:
    _check(1 <= s.server.port <= 65535, "server.port", s.server.port, "must be between 1 and 65535")
    _check(1 <= s.server.workers <= 64, "server.workers", s.server.workers, "must be between 1 and 64")
    _check(s.server.limit_concurrency >= 0, "server.limit_concurrency", s.server.limit_concurrency, "must be >= 0")
    _check_positive(s.server, "server", ("shutdown_timeout",))

    if s.upstream.url:
        _check_url("upstream.url", s.upstream.url)
        _check(not urlsplit(s.upstream.url).query, "upstream.url", s.upstream.url, "must not have a query")
    _check_positive(s.upstream, "upstream", ("connect_timeout", "read_timeout", "write_timeout", "pool_size"))

    _check_networks("client_ip.trusted_proxies", s.client_ip.trusted_proxies)
    for i, header in enumerate(s.client_ip.headers):
        _check(
            header.lower() in CLIENT_IP_SOURCES,
            f"client_ip.headers[{i}]",
            header,
            f"is not a supported source (one of {', '.join(CLIENT_IP_SOURCES)})",
        )

    # Longer prefixes would keep too much of the address to count as truncation.
    _check(8 <= s.anonymize.ipv4_prefix <= 24, "anonymize.ipv4_prefix", s.anonymize.ipv4_prefix, "must be 8..24")
    _check(16 <= s.anonymize.ipv6_prefix <= 64, "anonymize.ipv6_prefix", s.anonymize.ipv6_prefix, "must be 16..64")

    c = s.consent
    _check(bool(_COOKIE_NAME.match(c.cookie)), "consent.cookie", c.cookie, "is not a valid cookie name")
    _check(len(c.categories) > 0, "consent.categories", list(c.categories), "must name at least one category")
    for i, cat in enumerate(c.categories):
        _check(bool(_CATEGORY.match(cat)), f"consent.categories[{i}]", cat, "must match [a-z][a-z0-9_]*")
    _check(len(set(c.categories)) == len(c.categories), "consent.categories", list(c.categories), "has duplicates")
    for name in c.category:
        _check(name in c.categories, f"consent.category.{name}", name, "is not listed in consent.categories")
    # CNIL: consent cookies must not outlive 13 months; 6 months is the recommended lifetime.
    _check(1 <= c.max_age_days <= 395, "consent.max_age_days", c.max_age_days, "must be between 1 and 395")
    for i, secret in enumerate(c.secret_keys):
        # An unset ${NAME} left in place (check/explain only, already reported as a warning) is not judged.
        if not _unresolved(secret):
            _check(len(str(secret)) >= 32, f"consent.secret_keys[{i}]", secret, "must be at least 32 characters")
    _check(c.max_cookie_bytes >= 256, "consent.max_cookie_bytes", c.max_cookie_bytes, "must be at least 256")
    if c.receipts.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(c.receipts)
        shown = c.receipts.replace(f":{parts.password}@", ":***@") if parts.password else c.receipts
        _check(
            bool(parts.hostname) and len(parts.path) > 1, "consent.receipts", shown, "must name a host and a database"
        )
        _check(bool(c.receipts_queue), "consent.receipts_queue", c.receipts_queue, "is required with PostgreSQL")
    _check(c.receipts_queue_max >= 1, "consent.receipts_queue_max", c.receipts_queue_max, "must be at least 1")

    for i, origin in enumerate(s.site.origins):
        _check_url(f"site.origins[{i}]", origin, path_allowed=False)

    a = s.analytics
    for path_key, value in (("analytics.beacon_path", a.beacon_path), ("prefix", s.prefix)):
        _check(value.startswith("/") and not value.startswith("//"), path_key, value, "must be a path starting with /")
    _check(s.prefix != "/", "prefix", s.prefix, "must not be the site root")
    f = s.fastly
    _check(bool(_COOKIE_NAME.match(f.auth_header)), "fastly.auth_header", f.auth_header, "is not a header name")
    if f.secret is not None and not _unresolved(f.secret):
        _check(len(str(f.secret)) >= 16, "fastly.secret", f.secret, "must be at least 16 characters")
    _check(a.pageviews != "edge" or f.secret is not None, "analytics.pageviews", a.pageviews, "needs fastly.secret")
    _check_positive(f, "fastly", ("max_body_bytes", "max_decompressed_bytes", "max_record_age_seconds"))
    _check(
        a.pageviews != "pixel" or s.banner.enabled,
        "analytics.pageviews",
        a.pageviews,
        "needs banner.enabled = true (the pixel goes where the banner goes)",
    )
    _check(
        256 <= a.beacon_max_bytes <= 1_048_576, "analytics.beacon_max_bytes", a.beacon_max_bytes, "must be 256..1048576"
    )
    _check(
        bool(_COOKIE_NAME.match(a.client_id_cookie)),
        "analytics.client_id_cookie",
        a.client_id_cookie,
        "is not a valid cookie name",
    )

    for name, dest in s.destinations.items():
        key = f"destinations.{name}"
        _check(dest.kind in DESTINATION_KINDS, f"{key}.kind", dest.kind, "is not a known kind")
        for i, field in enumerate(dest.fields):
            _check(
                field in EVENT_FIELDS, f"{key}.fields[{i}]", field, f"is not an event field ({', '.join(EVENT_FIELDS)})"
            )
        for i, cat in enumerate(dest.requires):
            _check(cat in c.categories, f"{key}.requires[{i}]", cat, "is not a consent category")
        if dest.kind == "sentry":
            _check(bool(dest.dsns), f"{key}.dsns", list(dest.dsns), "must list at least one DSN")
            for i, dsn in enumerate(dest.dsns):
                _check(_SENTRY_DSN.match(dsn) is not None, f"{key}.dsns[{i}]", dsn,
                       "is not a Sentry DSN (https://PUBLIC_KEY@HOST/PROJECT_ID)")  # fmt: skip
            for i, item_type in enumerate(dest.item_types):
                _check(item_type in SENTRY_ITEM_TYPES, f"{key}.item_types[{i}]", item_type,
                       "is not a Sentry envelope item type")  # fmt: skip
        elif dest.kind != "dryrun" and (dest.endpoint or not dest.dry_run):
            _check(bool(dest.endpoint), f"{key}.endpoint", dest.endpoint, "is required")
            _check_url(f"{key}.endpoint", dest.endpoint)
        if dest.kind == "plausible":
            _check(bool(dest.domain), f"{key}.domain", dest.domain, "is required for a plausible destination")
        if dest.kind == "ga4":
            _check(
                bool(_GA4_ID.match(dest.measurement_id)),
                f"{key}.measurement_id",
                dest.measurement_id,
                "is not a GA4 measurement id (G-XXXXXXX)",
            )
            _check(
                dest.api_secret is not None and bool(str(dest.api_secret)),
                f"{key}.api_secret",
                dest.api_secret,
                "is required for a ga4 destination",
            )
            # An id cookie is only lawful with consent (ePrivacy Art. 5(3)); without one, use the pseudonym.
            _check(
                dest.client_id != "cookie" or bool(dest.requires),
                f"{key}.client_id",
                dest.client_id,
                "needs a consent category in requires (or client_id = 'pseudonym')",
            )
        _check(dest.ttl_seconds > 0, f"{key}.ttl_seconds", dest.ttl_seconds, "must be greater than 0")

    _check_positive(
        s.dispatch,
        "dispatch",
        (
            "queue_size",
            "max_attempts",
            "max_age_seconds",
            "backoff_base",
            "backoff_cap",
            "connect_timeout",
            "read_timeout",
            "write_timeout",
            "pool_timeout",
            "max_connections",
            "circuit_threshold",
            "circuit_reset_seconds",
            "flush_interval",
            "shutdown_timeout",
            "handoff_interval",
        ),
    )
    _check(
        s.dispatch.mode != "deliverer" or s.spool.enabled,
        "dispatch.mode",
        s.dispatch.mode,
        "needs spool.enabled = true (the host spool is the handoff)",
    )
    _check_positive(s.spool, "spool", ("max_rows", "max_bytes"))
    _check_networks("metrics.allow", s.metrics.allow)
