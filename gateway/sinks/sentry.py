"""Sentry: error reports from the first-party tunnel, scrubbed by policy, posted as envelopes.

The tunnel (gateway.sentry_tunnel) hands the raw envelope to the dispatcher as an event named
:data:`gateway.events.ERROR_REPORT`; only sentry lanes take such events. Here, off the request path, each item of an
allowlisted type is minimised (gateway.sentry_scrub) and the envelope is posted to the DSN's envelope endpoint
(``/api/{project_id}/envelope/``, https://develop.sentry.dev/sdk/envelopes/#authentication) with the DSN's public key.

Rate limits (https://develop.sentry.dev/sdk/expected-features/rate-limiting/) are kept per category: an
``X-Sentry-Rate-Limits`` header on any answer (``seconds:cat1;cat2:scope...``, an empty category list meaning all)
makes later envelopes leave those categories out until the limit expires, and a 429 is retried after the longest
limit or ``Retry-After``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import httpx

from gateway.config import DestinationSettings, Settings
from gateway.events import ERROR_REPORT, Event
from gateway.policy import parse_retry_after
from gateway.sentry_envelope import Dsn, Envelope, EnvelopeError, parse_dsn, parse_envelope
from gateway.sentry_scrub import SentryScrubber
from gateway.sinks import Outcome, Payload, PolicyDrop, Verdict

__all__ = ["CATEGORIES", "SentrySink", "parse_rate_limits"]

# Item type -> rate-limit data category (https://develop.sentry.dev/sdk/expected-features/rate-limiting/#definitions).
CATEGORIES: Final = {
    "event": "error",
    "transaction": "transaction",
    "session": "session",
    "sessions": "session",
    "client_report": "internal",
    "attachment": "attachment",
    "replay_event": "replay",
    "replay_recording": "replay",
    "replay_video": "replay",
    "profile": "profile",
    "profile_chunk": "profile_chunk",
    "check_in": "monitor",
    "span": "span",
    "statsd": "metric_bucket",
    "metric_meta": "metric_bucket",
    "user_report": "user_report_v2",
    "feedback": "feedback",
}
_JSON_ITEMS: Final = frozenset({"event", "transaction", "session", "sessions", "client_report", "check_in", "span"})
_ALL: Final = ""  # the category key of a limit that covers every category
_CLIENT: Final = "privacy-gateway/0.1"


def parse_rate_limits(value: str, now: float) -> dict[str, float]:
    """``X-Sentry-Rate-Limits`` as ``{category: until}`` (``""`` = all categories); malformed entries are skipped."""
    limits: dict[str, float] = {}
    for entry in value.split(","):
        parts = entry.strip().split(":")
        if len(parts) < 2:
            continue
        try:
            seconds = float(parts[0])
        except ValueError:
            continue
        if not 0 <= seconds <= 86_400:
            continue
        categories = [c.strip() for c in parts[1].split(";") if c.strip()] or [_ALL]
        for category in categories:
            limits[category] = max(limits.get(category, 0.0), now + seconds)
    return limits


class SentrySink:
    """One ``[destinations.NAME]`` with ``kind = "sentry"``."""

    kind = "sentry"
    max_batch = 1

    def __init__(
        self, dest: DestinationSettings, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.name = dest.name
        self.requires: frozenset[str] = frozenset(dest.requires)
        self.dry_run = dest.dry_run
        self.ttl_seconds = dest.ttl_seconds
        self.item_types = frozenset(dest.item_types)
        self.scrubber = SentryScrubber(dest, settings)
        dsns = [parse_dsn(text) for text in dest.dsns]
        self._dsns: dict[str, Dsn] = {d.text: d for d in dsns if d is not None}
        self._limits: dict[str, float] = {}
        self._clock = clock

    def __repr__(self) -> str:
        return f"SentrySink(name={self.name!r}, projects={sorted(d.project_id for d in self._dsns.values())!r})"

    def allows_dsn(self, dsn: object) -> bool:
        return isinstance(dsn, str) and dsn.strip() in self._dsns

    def _limited(self, category: str, now: float) -> bool:
        limits = self._limits
        return limits.get(category, 0.0) > now or limits.get(_ALL, 0.0) > now

    def build(self, event: Event) -> Payload:
        if event.name != ERROR_REPORT:
            raise PolicyDrop("not_an_error_report")
        self.scrubber.policy.check_consent(event)  # the dispatcher checks first; a sink never builds without it
        try:
            envelope = parse_envelope(event.props.get("envelope", "").encode("latin-1"))
        except (EnvelopeError, UnicodeEncodeError):
            raise PolicyDrop("invalid_envelope") from None
        dsn_text = envelope.header.get("dsn")
        dsn = self._dsns.get(dsn_text.strip()) if isinstance(dsn_text, str) else None
        if dsn is None:
            raise PolicyDrop("dsn_not_allowed")
        now = self._clock()
        items: list[tuple[dict[str, Any], bytes]] = []
        for item_header, payload in envelope.items:
            item_type = str(item_header.get("type"))
            if item_type not in self.item_types or self._limited(CATEGORIES.get(item_type, item_type), now):
                continue
            cleaned = self._item(item_type, payload, event.ip)
            if cleaned is None:
                continue
            header: dict[str, Any] = {"type": item_type}
            content_type = item_header.get("content_type")
            if item_type not in _JSON_ITEMS and isinstance(content_type, str) and len(content_type) < 100:
                header["content_type"] = content_type
            items.append((header, cleaned))
        if not items:
            raise PolicyDrop("no_items_allowed")
        header = self.scrubber.envelope_header(envelope.header)
        header["dsn"] = dsn.text
        body = Envelope(header, items).dumps()
        return Payload(
            destination=self.name,
            event_id=event.event_id,
            body={"envelope": body.decode("latin-1"), "dsn": dsn.text},
            created_at=event.timestamp,
        )

    def _item(self, item_type: str, payload: bytes, client_ip: str) -> bytes | None:
        if item_type not in _JSON_ITEMS:
            return payload  # listed in item_types by the operator: sent as the SDK made it
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        if item_type in ("event", "transaction"):
            cleaned = self.scrubber.event(data, client_ip)
        elif item_type in ("session", "sessions"):
            cleaned = self.scrubber.session(data, client_ip)
        else:
            cleaned = self.scrubber.walk(data)
        return json.dumps(cleaned, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def request(self, payloads: Sequence[Payload]) -> httpx.Request:
        if len(payloads) != 1:
            raise ValueError(f"a Sentry request carries exactly one envelope, got {len(payloads)}")
        payload = payloads[0]
        dsn = self._dsns.get(str(payload.body.get("dsn", "")))
        if dsn is None:  # a spooled payload for a DSN no longer configured
            raise ValueError("the payload's DSN is no longer configured")
        auth = f"Sentry sentry_version=7, sentry_key={dsn.public_key}, sentry_client={_CLIENT}"
        headers = [("content-type", "application/x-sentry-envelope"), ("x-sentry-auth", auth)]
        content = str(payload.body["envelope"]).encode("latin-1")
        return httpx.Request("POST", dsn.envelope_url, headers=headers, content=content)

    def classify(self, response: httpx.Response) -> Verdict:
        status = response.status_code
        now = self._clock()
        header = response.headers.get("x-sentry-rate-limits")
        longest: float | None = None
        if header:
            for category, until in parse_rate_limits(header, now).items():
                self._limits[category] = max(self._limits.get(category, 0.0), until)
                longest = max(longest or 0.0, until - now)
        if 200 <= status < 300:
            return Verdict(Outcome.DELIVERED)
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status == 429 and not header and retry_after is None:
                retry_after = 60.0  # the SDKs' default when a 429 says nothing more
            if status == 429 and not header and retry_after is not None:
                self._limits[_ALL] = max(self._limits.get(_ALL, 0.0), now + retry_after)
            return Verdict(Outcome.RETRY, reason=f"http {status}", retry_after=longest or retry_after)
        return Verdict(Outcome.REJECTED, reason=f"http {status}")
