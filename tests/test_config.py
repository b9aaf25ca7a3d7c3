from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import ConfigError, Secret, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]

ARCHITECTURE_SKETCH = """
[upstream]
url = "https://origin.example.org"

[client_ip]
trusted_proxies = ["127.0.0.1/32", "::1/128"]
headers = ["fastly-client-ip", "x-forwarded-for"]

[anonymize]
ipv4_prefix = 24
ipv6_prefix = 48

[geo]
database = ""

[consent]
cookie = "__Host-consent"
categories = ["analytics"]
revision = "2024-10-04"
max_age_days = 180
honor_gpc = true

[destinations.plausible]
kind = "plausible"
endpoint = "https://plausible.io/api/event"
domain = "python.org"
requires = []
fields = ["name", "url", "referrer", "country", "user_agent", "ip"]

[destinations.ga4]
kind = "ga4"
endpoint = "https://region1.google-analytics.com/mp/collect"
measurement_id = "G-XXXXXXX"
api_secret = "${GA4_API_SECRET}"
requires = ["analytics"]
fields = ["name", "url", "referrer", "title", "country", "language"]

[urls]
allowed_query_params = ["utm_source", "utm_medium", "utm_campaign", "q"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_architecture_sketch_works_as_written(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ARCHITECTURE_SKETCH), environ={"GA4_API_SECRET": "s3cr3t-value"})
    assert settings.upstream.url == "https://origin.example.org"
    assert settings.client_ip.trusted_proxies == ("127.0.0.1/32", "::1/128")
    assert settings.client_ip.headers == ("fastly-client-ip", "x-forwarded-for")
    assert settings.consent.revision == "2024-10-04"
    ga4 = settings.destinations["ga4"]
    assert ga4.requires == ("analytics",)
    assert ga4.api_secret is not None and str(ga4.api_secret) == "s3cr3t-value"
    assert settings.destinations["plausible"].domain == "python.org"
    assert settings.urls.allowed_query_params == ("utm_source", "utm_medium", "utm_campaign", "q")


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, ARCHITECTURE_SKETCH + '\n[metrics]\ntoken = "${TOKEN}"\n'),
        environ={"GA4_API_SECRET": "canary-ga4-secret", "TOKEN": "canary-metrics-token"},
    )
    text = repr(settings) + str(settings)
    assert "canary-ga4-secret" not in text
    assert "canary-metrics-token" not in text
    assert isinstance(settings.metrics.token, Secret)


def test_shipped_profiles_validate() -> None:
    env = {"GA4_API_SECRET": "x", "CONSENT_KEY": "k" * 40, "METRICS_TOKEN": "t"}
    for name in ("gateway.example.toml", "python.org.toml"):
        settings = load_settings(REPO / "config" / name, environ=env)
        assert isinstance(settings, Settings)


def test_example_documents_every_key() -> None:
    """config/gateway.example.toml lists every setting the code knows (nested tables included)."""
    import dataclasses
    import tomllib

    example = tomllib.loads((REPO / "config" / "gateway.example.toml").read_text())

    def check(cls: type, table: dict[str, object], where: str) -> None:
        for field in dataclasses.fields(cls):
            if field.name in ("source", "warnings", "name", "texts", "category", "destinations"):
                continue
            if cls.__name__ == "DestinationSettings" and field.name == "allowed_query_params":
                continue  # documented as a comment: it has no default value to show
            if cls.__name__ == "DestinationSettings" and field.name == "fields":
                continue  # documented as a comment: the default depends on the kind (test_example_documents_...)
            if cls.__name__ == "FastlySettings" and field.name == "secret":
                continue  # documented as a comment: secrets have no default
            if cls.__name__ == "MetricsSettings" and field.name == "token":
                continue  # documented as a comment: secrets have no default
            assert field.name in table, f"{where}{field.name} is not documented in gateway.example.toml"

    check(Settings, example, "")
    for section in (
        "server",
        "upstream",
        "client_ip",
        "anonymize",
        "geo",
        "consent",
        "site",
        "banner",
        "analytics",
        "urls",
        "dispatch",
        "spool",
        "metrics",
        "logging",
        "fastly",
    ):
        cls = type(getattr(Settings(), section))
        check(cls, example[section], f"{section}.")
    from gateway.config import DestinationSettings

    destinations = example["destinations"]
    check(
        DestinationSettings, destinations["plausible"] | destinations["ga4"] | destinations["sentry"], "destinations.*."
    )


def test_defaults_without_file() -> None:
    settings = load_settings(environ={})
    assert settings.anonymize.ipv4_prefix == 24
    assert settings.anonymize.ipv6_prefix == 48
    assert settings.client_ip.trusted_proxies == ()  # nobody is trusted by default
    assert settings.consent.max_age_days == 180
    assert settings.destinations == {}


def test_environment_overrides(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, ARCHITECTURE_SKETCH),
        environ={
            "GA4_API_SECRET": "x",
            "GATEWAY_UPSTREAM__URL": "http://10.1.2.3:8080",
            "GATEWAY_ANONYMIZE__IPV4_PREFIX": "16",
            "GATEWAY_CLIENT_IP__TRUSTED_PROXIES": '["10.0.0.0/8"]',
            "GATEWAY_DESTINATIONS__GA4__API_SECRET": "from-env",
            "GATEWAY_NOT_A_SETTING": "ignored: no double underscore",
        },
    )
    assert settings.upstream.url == "http://10.1.2.3:8080"
    assert settings.anonymize.ipv4_prefix == 16
    assert settings.client_ip.trusted_proxies == ("10.0.0.0/8",)
    assert str(settings.destinations["ga4"].api_secret) == "from-env"


BAD = [
    # (toml snippet, expected start of the error line)
    (
        "[client_ip]\ntrusted_proxies = ['10.0.0.0/8', '10.0.0.300/8']",
        "config error: client_ip.trusted_proxies[1]: '10.0.0.300/8' is not an IP network",
    ),
    ("[client_ip]\nheaders = ['x-forwarded-for', 'x-evil']", "config error: client_ip.headers[1]: 'x-evil'"),
    ("[anonymize]\nipv4_prefix = 32", "config error: anonymize.ipv4_prefix: 32 must be 8..24"),
    ("[anonymize]\nipv6_prefix = 128", "config error: anonymize.ipv6_prefix: 128 must be 16..64"),
    ("[anonymize]\nipv4_prefix = '24'", "config error: anonymize.ipv4_prefix: '24' must be an integer"),
    ("[server]\nport = 70000", "config error: server.port: 70000 must be between 1 and 65535"),
    ("[server]\nworkrs = 2", "config error: server.workrs: 2 is not a known setting"),
    ("[upstrem]\nurl = 'http://x'", "config error: upstrem: {'url': 'http://x'} is not a known setting"),
    ("[upstream]\nurl = 'ftp://origin'", "config error: upstream.url: 'ftp://origin' is not an http(s) URL"),
    ("[consent]\nmax_age_days = 400", "config error: consent.max_age_days: 400 must be between 1 and 395"),
    ("[consent]\ncookie = 'bad name;'", "config error: consent.cookie: 'bad name;' is not a valid cookie name"),
    ("[consent]\nhonor_gpc = 'yes'", "config error: consent.honor_gpc: 'yes' must be true or false"),
    ("[consent]\nsecret_keys = ['short']", "config error: consent.secret_keys[0]: <secret> must be at least 32"),
    (
        "[consent]\nsecret_keys = ['${NOPE}']",
        "config error: consent.secret_keys[0]: '${NOPE}' references ${NOPE}, which is not set in the environment",
    ),
    ("[analytics]\npageviews = 'sometimes'", "config error: analytics.pageviews: 'sometimes' must be one of"),
    (
        "[destinations.x]\nkind = 'matomo'\nendpoint = 'https://m.example/'",
        "config error: destinations.x.kind: 'matomo'",
    ),
    ("[destinations.x]\nendpoint = 'https://m.example/'", "config error: destinations.x.kind: None is required"),
    (
        "[destinations.x]\nkind = 'plausible'\nendpoint = 'https://p.example/api/event'\ndomain = 'a.org'\n"
        "fields = ['name', 'email']",
        "config error: destinations.x.fields[1]: 'email' is not an event field",
    ),
    (
        "[destinations.x]\nkind = 'plausible'\nendpoint = 'https://p.example/api/event'",
        "config error: destinations.x.domain: '' is required",
    ),
    (
        "[destinations.g]\nkind = 'ga4'\nendpoint = 'https://g.example/mp/collect'\nmeasurement_id = 'UA-1'\n"
        "api_secret = 'x'",
        "config error: destinations.g.measurement_id: 'UA-1' is not a GA4 measurement id",
    ),
    (
        "[destinations.g]\nkind = 'ga4'\nendpoint = 'https://g.example/mp/collect'\nmeasurement_id = 'G-ABCDEF1'",
        "config error: destinations.g.api_secret: None is required",
    ),
    (
        "[destinations.g]\nkind = 'ga4'\nendpoint = 'https://g.example/mp/collect'\nmeasurement_id = 'G-ABCDEF1'\n"
        "api_secret = 'x'\nrequires = ['marketing']",
        "config error: destinations.g.requires[0]: 'marketing' is not a consent category",
    ),
    ("[dispatch]\nqueue_size = 0", "config error: dispatch.queue_size: 0 must be greater than 0"),
    ("[dispatch]\nmode = 'threads'", "config error: dispatch.mode: 'threads' must be one of"),
    (
        "[dispatch]\nmode = 'deliverer'\n[spool]\nenabled = false",
        "config error: dispatch.mode: 'deliverer' needs spool.enabled = true",
    ),
    ("[dispatch]\nhandoff_interval = 0", "config error: dispatch.handoff_interval: 0.0 must be greater than 0"),
    ("[metrics]\nallow = ['localhost']", "config error: metrics.allow[0]: 'localhost' is not an IP network"),
    ("prefix = '/'", "config error: prefix: '/' must not be the site root"),
    (
        "[site]\norigins = ['https://www.python.org/path']",
        "config error: site.origins[0]: 'https://www.python.org/path' must be an origin",
    ),
    ("this is not toml", "config error: "),
]


@pytest.mark.parametrize(("snippet", "expected"), BAD)
def test_bad_config_is_one_line_naming_key_and_value(tmp_path: Path, snippet: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, snippet), environ={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_unreadable_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_settings(tmp_path / "missing.toml", environ={})
    assert "missing.toml" in str(info.value)


def test_id_cookie_without_consent_is_rejected(tmp_path: Path) -> None:
    text = (
        "[destinations.g]\nkind = 'ga4'\nendpoint = 'https://g.example/mp/collect'\nmeasurement_id = 'G-ABCDEF1'\n"
        "api_secret = 'x'\nrequires = []\n"
    )
    with pytest.raises(ConfigError, match=r"^config error: destinations.g.client_id: 'cookie' needs a consent"):
        load_settings(write(tmp_path, text), environ={})
    load_settings(write(tmp_path, text + "client_id = 'pseudonym'\n"), environ={})


MINIMAL_DESTINATIONS = {
    "plausible": {"kind": "plausible", "endpoint": "https://plausible.io/api/event", "domain": "example.org"},
    "ga4": {
        "kind": "ga4",
        "endpoint": "https://region1.google-analytics.com/mp/collect",
        "measurement_id": "G-ABC1234",
        "api_secret": "s",
        "requires": ["analytics"],
    },
    "preview": {"kind": "dryrun"},
}


def test_minimal_destinations_get_their_kinds_default_fields() -> None:
    settings = load_settings(environ={}, overrides={"destinations": MINIMAL_DESTINATIONS})
    fields = {name: dest.fields for name, dest in settings.destinations.items()}
    assert fields == {
        "plausible": ("name", "url", "referrer", "user_agent", "ip"),
        "ga4": ("name", "url", "referrer", "title", "country", "language"),
        "preview": ("name", "url", "referrer"),
    }
    assert "ip" not in fields["ga4"]  # GA4 never gets an address, not even a truncated one
    assert settings.warnings == ()  # the defaults count correctly: nothing to warn about


def test_explicit_fields_win_over_the_kinds_default() -> None:
    destinations = {**MINIMAL_DESTINATIONS, "plausible": {**MINIMAL_DESTINATIONS["plausible"], "fields": ["name"]}}
    settings = load_settings(environ={}, overrides={"destinations": destinations})
    assert settings.destinations["plausible"].fields == ("name",)
    # An environment override is explicit too.
    env = {"GATEWAY_DESTINATIONS__GA4__FIELDS": '["name", "url"]'}
    assert load_settings(environ=env, overrides={"destinations": MINIMAL_DESTINATIONS}).destinations["ga4"].fields == (
        "name",
        "url",
    )


@pytest.mark.parametrize(
    ("name", "fields", "expected"),
    [
        ("plausible", ["name", "url", "referrer", "user_agent"], ["'ip'", "one visitor per day"]),
        ("plausible", ["name", "url", "referrer", "ip"], ["'user_agent'", "browser and OS"]),
        ("plausible", ["name"], ["'url', 'ip', 'user_agent'", "home page", "one visitor per day", "browser and OS"]),
        ("ga4", ["name", "url", "referrer", "title", "language"], ["'country'", "no country"]),
        ("ga4", ["name", "country"], ["'url'", "home page"]),
    ],
)
def test_a_narrower_list_warns_once_with_the_consequence(name: str, fields: list[str], expected: list[str]) -> None:
    destinations = {**MINIMAL_DESTINATIONS, name: {**MINIMAL_DESTINATIONS[name], "fields": fields}}
    warnings = load_settings(environ={}, overrides={"destinations": destinations}).warnings
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"config warning: destinations.{name}.fields: {fields!r} leaves out ")
    for text in expected:
        assert text in warnings[0]


def test_example_documents_each_kinds_default_fields() -> None:
    from gateway.config import DEFAULT_FIELDS

    text = (REPO / "config" / "gateway.example.toml").read_text()
    for kind in ("plausible", "ga4"):
        assert json.dumps(list(DEFAULT_FIELDS[kind])) in text.replace("', '", '", "'), kind


def test_missing_env_reference_is_a_warning_only_when_asked() -> None:
    destinations = {"ga4": {**MINIMAL_DESTINATIONS["ga4"], "api_secret": "${GA4_SECRET_UNSET}"}}
    with pytest.raises(ConfigError, match=r"destinations\.ga4\.api_secret: .*references \$\{GA4_SECRET_UNSET\}"):
        load_settings(environ={}, overrides={"destinations": destinations})
    settings = load_settings(environ={}, overrides={"destinations": destinations}, missing_env="warn")
    assert settings.warnings == (
        "config warning: destinations.ga4.api_secret: references ${GA4_SECRET_UNSET}, which is not set in the"
        " environment (gateway serve refuses to start without it)",
    )
    assert settings.destinations["ga4"].api_secret is not None
    assert str(settings.destinations["ga4"].api_secret) == "${GA4_SECRET_UNSET}"  # kept as written, never guessed


def test_warnings_cannot_be_set_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('warnings = ["all fine"]\n')
    with pytest.raises(ConfigError, match=r"warnings: .* is not a known setting"):
        load_settings(path, environ={})
