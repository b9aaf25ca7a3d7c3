"""Transparency: what each destination receives, generated from the running configuration.

- :func:`explain` builds a sample page view and shows, per destination, the exact request that would leave (secret
  masked) or why nothing would (``gateway explain``).
- :func:`flows_table` and :func:`render_flows_html` describe every data flow (the ``/_privacy/flows`` page), so the
  privacy notice can point at something generated from the configuration rather than written by hand.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from gateway.config import DestinationSettings, Settings
from gateway.events import ERROR_REPORT, PAGEVIEW, Event
from gateway.sentry_envelope import Envelope, parse_dsn
from gateway.sinks import PolicyDrop
from gateway.sinks.dryrun import DEFAULT_DRYRUN_ENDPOINT, describe_request
from gateway.sinks.factory import build_sinks
from gateway.sinks.plausible import GENERIC_USER_AGENT
from gateway.sinks.sentry import SentrySink

__all__ = ["SAMPLE_CLIENT_ID", "SAMPLE_COUNTRY", "SAMPLE_IP", "SAMPLE_USER_AGENT", "explain", "flows_table",
           "render_flows_html"]  # fmt: skip

# RFC 5737 documentation address, already in truncated form (the only form an event ever holds).
SAMPLE_IP: Final = "203.0.113.0"
SAMPLE_USER_AGENT: Final = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
SAMPLE_COUNTRY: Final = "GB"
SAMPLE_LANGUAGE: Final = "en-gb"
SAMPLE_CLIENT_ID: Final = "1234567890.1700000000"

_FIELD_SUPPORT: Final[dict[str, frozenset[str]]] = {
    # Fields a destination's wire format has a place for; others in its allowlist are ignored.
    "plausible": frozenset({"name", "url", "referrer", "user_agent", "ip", "props"}),
    "ga4": frozenset({"name", "url", "referrer", "title", "country", "language", "user_agent", "ip", "props"}),
    "dryrun": frozenset({"name", "url", "referrer", "title", "country", "language", "user_agent", "ip", "props"}),
    "sentry": frozenset({"url", "referrer", "user_agent", "ip"}),
}
# A browser error report as the Sentry SDK sends it, with what the notice does not allow in it: the sample for
# `gateway explain` (canary values show what the scrubber removes).
SAMPLE_ERROR_EVENT: Final = {
    "event_id": "0123456789abcdef0123456789abcdef",
    "platform": "javascript",
    "level": "error",
    "message": "Checkout failed for alice@example.org",
    "exception": {"values": [{"type": "TypeError", "value": "cannot read token=Zx9KqL2mWv8RtY4pNs6B"}]},
    "request": {
        "url": "https://example.org/reset/alice@example.org?token=Zx9KqL2mWv8RtY4pNs6B&utm_source=mail",
        "headers": {"User-Agent": SAMPLE_USER_AGENT, "Cookie": "session=abc"},
        "cookies": {"session": "abc"},
    },
    "user": {"ip_address": "{{auto}}", "email": "alice@example.org", "id": "42"},
    "breadcrumbs": {"values": [{"category": "navigation", "data": {"from": "/account?email=alice@example.org",
                                                                    "to": "/checkout"}}]},
}  # fmt: skip


def _default_url(settings: Settings) -> str:
    base = settings.site.origins[0] if settings.site.origins else "https://example.org"
    return base.rstrip("/") + "/"


def _sample_granted(settings: Settings, consent: str) -> frozenset[str]:
    # "granted" is an explicit opt-in; with GPC it models a choice made while the signal was sent, which wins over
    # the signal (11 CCR §7025(c)(3), gateway.consent). GA4 still gets ad_user_data DENIED whenever GPC is sent.
    return frozenset(settings.consent.categories) if consent == "granted" else frozenset()


def _sample_client_id(settings: Settings, granted: frozenset[str]) -> str:
    # The first-party id cookie exists only where a GA4 destination identifies clients by it and may be used.
    needs_cookie = any(
        d.kind == "ga4" and d.client_id == "cookie" and frozenset(d.requires) <= granted
        for d in settings.destinations.values()
    )
    return SAMPLE_CLIENT_ID if needs_cookie else ""


def explain(
    settings: Settings,
    *,
    url: str | None = None,
    consent: Literal["granted", "denied", "none"] = "none",
    gpc: bool = False,
    referrer: str = "",
    title: str = "Example page",
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Per destination, the request a sample page view would cause, or the reason it causes none.

    ``url`` defaults to the first ``site.origins`` entry (or ``https://example.org/``). The sample visitor has the
    truncated documentation address 203.0.113.0, a desktop Chrome user agent, country GB and language en-gb.
    """
    if consent not in ("granted", "denied", "none"):
        raise ValueError(f"consent must be 'granted', 'denied' or 'none', not {consent!r}")
    granted = _sample_granted(settings, consent)
    event = Event(
        name=PAGEVIEW,
        url=url or _default_url(settings),
        referrer=referrer,
        title=title,
        language=SAMPLE_LANGUAGE,
        user_agent=SAMPLE_USER_AGENT,
        country=SAMPLE_COUNTRY,
        ip=SAMPLE_IP,
        granted=granted,
        gpc=gpc,
        client_id=_sample_client_id(settings, granted),
        timestamp=time.time() if now is None else now,
        event_id="sample",
    )
    rows: list[dict[str, Any]] = []
    for sink in build_sinks(settings):
        if isinstance(sink, SentrySink):
            rows.append(_explain_sentry(sink, settings.destinations[sink.name], event))
            continue
        # The effective allowlist (the kind's default when the table names none), next to what it produces.
        fields = list(settings.destinations[sink.name].fields)
        try:
            # The dispatcher's own check comes first; build() repeats it.
            if not sink.requires <= event.granted:
                raise PolicyDrop("consent")
            request = sink.request([sink.build(event)])
        except PolicyDrop as drop:
            rows.append({"destination": sink.name, "fields": fields, "sent": False, "reason": drop.reason})
            continue
        rows.append({"destination": sink.name, "fields": fields, "sent": True, "request": describe_request(request)})
    return rows


def _explain_sentry(sink: SentrySink, dest: DestinationSettings, page_view: Event) -> dict[str, Any]:
    """What Sentry receives of a sample browser error (:data:`SAMPLE_ERROR_EVENT`) from the same visitor."""
    fields = list(dest.fields)
    dsn = dest.dsns[0]
    envelope = Envelope({"dsn": dsn, "event_id": SAMPLE_ERROR_EVENT["event_id"]},
                        [({"type": "event"}, json.dumps(SAMPLE_ERROR_EVENT).encode())])  # fmt: skip
    report = Event(
        name=ERROR_REPORT, url="", user_agent=page_view.user_agent, ip=page_view.ip, granted=page_view.granted,
        gpc=page_view.gpc, props={"envelope": envelope.dumps().decode("latin-1")}, event_id="sample",
    )  # fmt: skip
    try:
        if not sink.requires <= report.granted:
            raise PolicyDrop("consent")
        request = sink.request([sink.build(report)])
    except PolicyDrop as drop:
        return {"destination": sink.name, "fields": fields, "sent": False, "reason": drop.reason}
    lines = request.content.split(b"\n")
    described = describe_request(request)
    described["body"] = [json.loads(line) for line in lines if line.strip()]
    return {"destination": sink.name, "fields": fields, "sent": True, "request": described}


# ---------------------------------------------------------------------------------------------------------------
# Data-flow table
# ---------------------------------------------------------------------------------------------------------------


def _ip_policy(dest: DestinationSettings, settings: Settings) -> str:
    if "ip" in dest.fields:
        prefixes = f"/{settings.anonymize.ipv4_prefix} IPv4, /{settings.anonymize.ipv6_prefix} IPv6"
        return f"truncated ({prefixes})"
    if dest.kind == "plausible":
        return "not sent (Plausible sees the gateway's own address)"
    return "not sent"


def _notes(dest: DestinationSettings) -> list[str]:
    notes: list[str] = []
    ignored = [f for f in dest.fields if f not in _FIELD_SUPPORT.get(dest.kind, frozenset())]
    if ignored:
        notes.append(f"not part of the {dest.kind} format, never sent: {', '.join(ignored)}")
    if dest.kind == "plausible":
        if "user_agent" not in dest.fields:
            notes.append(f"sends the fixed user agent {GENERIC_USER_AGENT!r} instead of the visitor's")
        notes.append("no cookies; Plausible derives the country itself from the address it is given")
    elif dest.kind == "sentry":
        notes.append(f"error reports from the {{prefix}}/sentry tunnel; item types: {', '.join(dest.item_types)}")
        notes.append("no cookies, local variables, user ids or e-mails; URLs and messages scrubbed like page URLs")
    elif dest.kind == "ga4":
        if dest.client_id == "pseudonym":
            notes.append("client id: first-party cookie if consented, else a daily-rotating keyed hash (never stored)")
        else:
            notes.append("client id: first-party cookie, set only with consent; no cookie, nothing sent")
        notes.append("ad_personalization always DENIED; ad_user_data GRANTED only with consent and no GPC")
    if dest.dry_run or dest.kind == "dryrun":
        notes.append("dry run: printed, not sent")
    return notes


def flows_table(settings: Settings) -> list[dict[str, Any]]:
    """One row per destination: where data goes, which fields, in which form, under which consent."""
    rows: list[dict[str, Any]] = []
    for dest in settings.destinations.values():
        endpoint = dest.endpoint or (DEFAULT_DRYRUN_ENDPOINT if dest.kind == "dryrun" else "")
        if dest.kind == "sentry" and dest.dsns:
            parsed = parse_dsn(dest.dsns[0])
            endpoint = parsed.envelope_url if parsed else ""
        params = (
            dest.allowed_query_params if dest.allowed_query_params is not None else settings.urls.allowed_query_params
        )
        rows.append(
            {
                "destination": dest.name,
                "kind": dest.kind,
                "endpoint_host": urlsplit(endpoint).hostname or "",
                "fields": list(dest.fields),
                "ip_policy": _ip_policy(dest, settings),
                "user_agent_sent": "user_agent" in dest.fields,
                "consent_needed": list(dest.requires),
                "query_params_kept": list(params),
                "dry_run": dest.dry_run or dest.kind == "dryrun",
                "notes": _notes(dest),
            }
        )
    return rows


_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Data flows</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;line-height:1.4;color:#222}}
table{{border-collapse:collapse;width:100%}}th,td{{border:1px solid #ccc;padding:.4rem .6rem;text-align:left;
vertical-align:top}}th{{background:#f3f3f3}}code{{font-size:.9em}}ul{{margin:0;padding-left:1.1rem}}
</style>
</head>
<body>
<h1>Where analytics data goes</h1>
<p>Generated from this site's running configuration. Client IP addresses are truncated
(/{ipv4} IPv4, /{ipv6} IPv6) before anything else sees them. Page URLs keep only these query parameters
unless a destination says otherwise: {params}; the fragment, user names and passwords are removed, and path
segments that look like e-mail addresses, identifiers or tokens are replaced by <code>{placeholder}</code>.
Referrers from other sites are reduced to their origin.</p>
<table>
<thead><tr><th>Destination</th><th>Sent to</th><th>Fields</th><th>IP address</th><th>Browser user agent</th>
<th>Consent needed</th><th>Query parameters kept</th><th>Notes</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
</body>
</html>
"""


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(f"<code>{html.escape(str(v))}</code>" for v in value) or "none"
    return html.escape(str(value))


def render_flows_html(settings: Settings) -> bytes:
    """A small, self-contained HTML page of :func:`flows_table` (every value escaped)."""
    rows = []
    for row in flows_table(settings):
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in row["notes"])
        cells = [
            f"{html.escape(row['destination'])} <small>({html.escape(row['kind'])})</small>",
            html.escape(row["endpoint_host"]) or "&mdash;",
            _cell(row["fields"]),
            _cell(row["ip_policy"]),
            _cell(row["user_agent_sent"]),
            _cell(row["consent_needed"]),
            _cell(row["query_params_kept"]),
            f"<ul>{notes}</ul>" if notes else "",
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        rows.append('<tr><td colspan="8">No analytics destinations are configured: nothing is sent.</td></tr>')
    page = _PAGE.format(
        ipv4=settings.anonymize.ipv4_prefix,
        ipv6=settings.anonymize.ipv6_prefix,
        params=_cell(list(settings.urls.allowed_query_params)),
        placeholder=html.escape(settings.urls.placeholder),
        rows="\n".join(rows),
    )
    return page.encode("utf-8")
