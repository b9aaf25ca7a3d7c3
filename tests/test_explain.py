from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from gateway.config import load_settings
from gateway.explain import SAMPLE_IP, SAMPLE_USER_AGENT, explain, flows_table, render_flows_html
from gateway.sinks.ga4 import GA4Sink
from gateway.sinks.plausible import GENERIC_USER_AGENT
from tests.sinks import GA4_SECRET, python_org_overrides, python_org_settings

GA4_FIELDS = ["name", "url", "referrer", "title", "country", "language"]

NOW = 1_700_000_000.0


def by_destination(rows: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {row["destination"]: row for row in rows}


def test_no_consent_plausible_sends_and_ga4_does_not() -> None:
    rows = explain(
        python_org_settings(),
        url="https://www.python.org/downloads/release/python-3130/?utm_source=x&email=a@b.c#frag",
        referrer="https://www.google.com/search?q=python",
        now=NOW,
    )
    assert [row["destination"] for row in rows] == ["plausible", "ga4"]
    plausible, ga4 = rows
    assert ga4 == {"destination": "ga4", "fields": GA4_FIELDS, "sent": False, "reason": "consent"}
    assert plausible["sent"] is True
    request = plausible["request"]
    assert isinstance(request, dict)
    assert request["method"] == "POST"
    assert request["url"] == "https://plausible.io/api/event"
    assert request["headers"] == {
        "host": "plausible.io",
        "content-type": "application/json",
        "user-agent": SAMPLE_USER_AGENT,
        "x-forwarded-for": SAMPLE_IP,
        "content-length": request["headers"]["content-length"],
    }
    assert request["body"] == {
        "name": "pageview",
        "url": "https://www.python.org/downloads/release/python-3130/?utm_source=x",
        "domain": "python.org",
        "referrer": "https://www.google.com/",
    }


def test_granted_consent_shows_the_ga4_request_with_the_secret_masked() -> None:
    rows = by_destination(explain(python_org_settings(), consent="granted", title="Welcome", now=NOW))
    ga4 = rows["ga4"]
    assert ga4["sent"] is True
    request = ga4["request"]
    assert isinstance(request, dict)
    assert request["url"] == "https://region1.google-analytics.com/mp/collect?measurement_id=G-PYORG123&api_secret=***"
    assert GA4_SECRET not in json.dumps(rows)
    body = request["body"]
    assert body["consent"] == {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"}
    assert body["user_location"] == {"country_id": "GB"}
    [event] = body["events"]
    assert event["params"] == {
        "page_location": "https://www.python.org/",  # the first site origin is the default page
        "page_title": "Welcome",
        "language": "en-gb",
        "session_id": GA4Sink.session_id(body["client_id"], NOW),
        "engagement_time_msec": 1,
    }


def test_gpc_with_an_explicit_opt_in_still_denies_ad_user_data() -> None:
    ga4 = by_destination(explain(python_org_settings(), consent="granted", gpc=True, now=NOW))["ga4"]
    request = ga4["request"]
    assert isinstance(request, dict)
    assert request["body"]["consent"] == {"ad_user_data": "DENIED", "ad_personalization": "DENIED"}


@pytest.mark.parametrize("consent", ["denied", "none"])
def test_refused_or_no_choice_sends_nothing_to_ga4(consent: str) -> None:
    rows = by_destination(explain(python_org_settings(), consent=consent, gpc=True))  # type: ignore[arg-type]
    assert rows["ga4"] == {"destination": "ga4", "fields": GA4_FIELDS, "sent": False, "reason": "consent"}
    assert rows["plausible"]["sent"] is True


def test_pseudonymous_ga4_needs_no_cookie() -> None:
    settings = python_org_settings(ga4={"requires": [], "client_id": "pseudonym"})
    ga4 = by_destination(explain(settings, now=NOW))["ga4"]
    assert ga4["sent"] is True
    request = ga4["request"]
    assert isinstance(request, dict)
    assert request["body"]["consent"]["ad_user_data"] == "DENIED"


def test_default_url_without_site_origins_is_example_org() -> None:
    overrides = python_org_overrides()
    overrides["site"] = {"origins": []}
    rows = explain(load_settings(None, environ={}, overrides=overrides))
    request = rows[0]["request"]
    assert isinstance(request, dict)
    assert request["body"]["url"] == "https://example.org/"


def test_explain_rejects_an_unknown_consent_value() -> None:
    with pytest.raises(ValueError):
        explain(python_org_settings(), consent="maybe")  # type: ignore[arg-type]


def test_no_destinations_means_nothing_to_explain() -> None:
    settings = load_settings(None, environ={})
    assert explain(settings) == []
    assert flows_table(settings) == []
    assert b"nothing is sent" in render_flows_html(settings)


# ------------------------------------------------------------------------------------------------------------
# Flows table and page
# ------------------------------------------------------------------------------------------------------------


def test_flows_table_describes_every_destination() -> None:
    settings = python_org_settings(plausible={"fields": ["name", "url", "title"]}, ga4={"fields": ["url", "ip"]})
    plausible, ga4 = flows_table(settings)
    assert plausible["destination"] == "plausible"
    assert plausible["kind"] == "plausible"
    assert plausible["endpoint_host"] == "plausible.io"
    assert plausible["fields"] == ["name", "url", "title"]
    assert plausible["ip_policy"] == "not sent (Plausible sees the gateway's own address)"
    assert plausible["user_agent_sent"] is False
    assert plausible["consent_needed"] == []
    assert plausible["query_params_kept"] == ["utm_source", "utm_medium", "utm_campaign", "q"]
    assert plausible["dry_run"] is False
    notes = plausible["notes"]
    assert isinstance(notes, list)
    assert any("title" in n and "never sent" in n for n in notes)
    assert any(GENERIC_USER_AGENT in n for n in notes)

    assert ga4["endpoint_host"] == "region1.google-analytics.com"
    assert ga4["ip_policy"] == "truncated (/24 IPv4, /48 IPv6)"
    assert ga4["consent_needed"] == ["analytics"]
    assert GA4_SECRET not in json.dumps(flows_table(settings))


def test_flows_table_per_destination_query_params_and_dry_run() -> None:
    settings = python_org_settings(plausible={"allowed_query_params": ["ref"], "dry_run": True})
    plausible = flows_table(settings)[0]
    assert plausible["query_params_kept"] == ["ref"]
    assert plausible["dry_run"] is True


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_flows_page_is_escaped_html() -> None:
    overrides = python_org_overrides()
    overrides["destinations"]["<script>alert(1)</script>"] = {
        "kind": "plausible",
        "endpoint": "https://plausible.example/api/event",
        "domain": "x",
        "dry_run": True,
    }
    page = render_flows_html(load_settings(None, environ={}, overrides=overrides))
    text = page.decode("utf-8")
    assert text.startswith("<!doctype html>")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    collector = _Collector()
    collector.feed(text)
    assert "script" not in collector.tags
    assert collector.tags.count("tr") == 4  # header + three destinations
    visible = " ".join(collector.text)
    assert "plausible.io" in visible and "region1.google-analytics.com" in visible
    assert "analytics" in visible
    assert GA4_SECRET not in text


def test_explain_and_flows_show_the_kinds_default_fields() -> None:
    """A minimal destination table: the effective (per-kind default) fields are what explain and flows show."""
    settings = load_settings(
        environ={},
        overrides={
            "destinations": {
                "plausible": {"kind": "plausible", "endpoint": "https://plausible.io/api/event", "domain": "x.org"},
                "ga4": {"kind": "ga4", "endpoint": "https://g.example/mp/collect", "measurement_id": "G-ABC1234",
                        "api_secret": GA4_SECRET, "requires": ["analytics"]},
            }
        },
    )  # fmt: skip
    rows = by_destination(explain(settings, consent="granted"))
    assert rows["plausible"]["fields"] == ["name", "url", "referrer", "user_agent", "ip"]
    assert rows["ga4"]["fields"] == GA4_FIELDS
    headers = rows["plausible"]["request"]["headers"]
    assert headers["x-forwarded-for"] == SAMPLE_IP and headers["user-agent"] == SAMPLE_USER_AGENT
    assert rows["ga4"]["request"]["body"]["user_location"] == {"country_id": "GB"}
    assert "ip_override" not in rows["ga4"]["request"]["body"]
    flows = {row["destination"]: row for row in flows_table(settings)}
    assert flows["plausible"]["fields"] == ["name", "url", "referrer", "user_agent", "ip"]
    assert flows["plausible"]["ip_policy"].startswith("truncated")
    assert flows["ga4"]["fields"] == GA4_FIELDS and flows["ga4"]["ip_policy"] == "not sent"
