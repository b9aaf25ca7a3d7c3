"""Plausible Events API sink: ``POST {endpoint}`` (``https://plausible.io/api/event``), one event per request.

What leaves (protocols.md §1, §5.1), and nothing else, no cookies and no other forwarding header:

- body ``{"name", "url", "domain", "referrer"?, "props"?}``. ``referrer`` and ``props`` are left out when empty or
  not allowed. Plausible has no title, language or country field: it derives the country from the address itself.
- ``Content-Type: application/json``;
- ``User-Agent``: the visitor's (scrubbed) user agent if ``"user_agent"`` is allowed, otherwise the fixed
  ``privacy-gateway/<version>``. Plausible needs a user agent to accept an event at all, and hashes it with the IP
  and a daily salt into its visitor id. Without the visitor's UA every visitor behind one /24 counts as one visitor
  per day, and browser/OS/device reports read "privacy-gateway". That is the privacy/accuracy tradeoff.
- ``X-Forwarded-For``: the truncated IP, only if ``"ip"`` is allowed. Without it Plausible sees the gateway's own
  address: every visitor looks alike and, since that is a server address, Plausible may drop the events as
  datacenter traffic (answered with ``202`` + ``x-plausible-dropped``; security.md T14).

Limits enforced here so Plausible never answers 400 (P-REQ, P-PROPS): url <= 2000 bytes, name <= 120 characters,
referrer <= 2000 characters, at most 30 props with keys <= 300 bytes and values <= 2000 bytes, scalars only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Final

import httpx

from gateway import __version__
from gateway.config import DestinationSettings, Settings
from gateway.events import PAGEVIEW, Event
from gateway.policy import (
    DestinationPolicy,
    encode_json,
    is_sensitive,
    parse_retry_after,
    short_reason,
    truncate_url,
    truncate_utf8,
)
from gateway.sinks import Outcome, Payload, PolicyDrop, Verdict

__all__ = [
    "GENERIC_USER_AGENT",
    "MAX_NAME_CHARS",
    "MAX_PROPS",
    "MAX_PROP_KEY_BYTES",
    "MAX_PROP_VALUE_BYTES",
    "MAX_REFERRER_CHARS",
    "MAX_URL_BYTES",
    "PlausibleSink",
]

MAX_URL_BYTES: Final = 2000  # byte_size(url) <= 2000 of the whole URL (P-REQ)
MAX_NAME_CHARS: Final = 120  # validate_length(:event_name, max: 120)
MAX_REFERRER_CHARS: Final = 2000  # sliced to 2000 by newer servers, rejected by older ones
MAX_PROPS: Final = 30  # @max_props 30
MAX_PROP_KEY_BYTES: Final = 300  # a longer key fails the whole request with 400
MAX_PROP_VALUE_BYTES: Final = 2000
GENERIC_USER_AGENT: Final = f"privacy-gateway/{__version__}"
DROPPED_HEADER: Final = "x-plausible-dropped"


class PlausibleSink:
    """One ``[destinations.NAME]`` with ``kind = "plausible"``."""

    kind = "plausible"
    max_batch = 1

    def __init__(self, dest: DestinationSettings, settings: Settings) -> None:
        self.name = dest.name
        self.requires: frozenset[str] = frozenset(dest.requires)
        self.dry_run = dest.dry_run
        self.ttl_seconds = dest.ttl_seconds  # read by the dispatcher: how long a payload may wait in the spool
        self.endpoint = dest.endpoint
        self._endpoint_url: httpx.URL | None = None  # parsed once on first use (httpx's parsing costs ~25 µs)
        self.domain = dest.domain
        self.policy = DestinationPolicy(dest, settings)

    def __repr__(self) -> str:
        return f"PlausibleSink(name={self.name!r}, endpoint={self.endpoint!r}, domain={self.domain!r})"

    def build(self, event: Event) -> Payload:
        policy = self.policy
        fields = policy.apply(event)  # checks consent first
        if event.name == PAGEVIEW:
            name = PAGEVIEW
        elif not policy.allows("name"):
            raise PolicyDrop("custom_event_not_allowed")
        else:
            name = event.name.strip()
            if not name or is_sensitive(name):
                raise PolicyDrop("event_name_invalid")
            if len(name) > MAX_NAME_CHARS:
                raise PolicyDrop("event_name_too_long")
        body: dict[str, object] = {
            "name": name,
            "url": truncate_url(fields.url, MAX_URL_BYTES),
            "domain": self.domain,
        }
        referrer = truncate_url(fields.referrer, MAX_REFERRER_CHARS)
        if referrer:
            body["referrer"] = referrer
        props = _plausible_props(fields.props)
        if props:
            body["props"] = props
        headers = [("user-agent", fields.user_agent or GENERIC_USER_AGENT)]
        if fields.ip:
            headers.append(("x-forwarded-for", fields.ip))
        return Payload(
            destination=self.name,
            event_id=event.event_id,
            body=body,
            headers=tuple(headers),
            batch_key="",
            created_at=event.timestamp,
        )

    def request(self, payloads: Sequence[Payload]) -> httpx.Request:
        if len(payloads) != 1:
            raise ValueError(f"a Plausible request carries exactly one event, got {len(payloads)}")
        payload = payloads[0]
        # Explicit headers only; the dispatcher sends this with client.send(), which adds Host and Content-Length
        # and nothing from the client's defaults or cookie jar.
        headers = [("content-type", "application/json"), *payload.headers]
        url = self._endpoint_url
        if url is None:
            url = self._endpoint_url = httpx.URL(self.endpoint)
        content = payload.body_json.encode() if payload.body_json else encode_json(payload.body)
        return httpx.Request("POST", url, headers=headers, content=content)

    def classify(self, response: httpx.Response) -> Verdict:
        status = response.status_code
        if status == 202 and DROPPED_HEADER in response.headers:
            # Accepted but discarded (bot, datacenter IP, blocked referrer): retrying cannot change it.
            return Verdict(Outcome.DROPPED_BY_DESTINATION, reason=DROPPED_HEADER)
        if 200 <= status < 300:
            return Verdict(Outcome.DELIVERED)
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            return Verdict(Outcome.RETRY, reason=f"http {status}", retry_after=retry_after)
        if status == 400:
            return Verdict(Outcome.REJECTED, reason=_error_text(response) or "http 400")
        return Verdict(Outcome.REJECTED, reason=f"http {status}")


def _plausible_props(props: Mapping[str, str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in props.items():
        if len(result) >= MAX_PROPS:
            break
        if len(key.encode("utf-8")) > MAX_PROP_KEY_BYTES:
            continue  # a truncated key would be a different property; drop it
        result[key] = truncate_utf8(value, MAX_PROP_VALUE_BYTES)
    return result


def _error_text(response: httpx.Response) -> str:
    """Plausible's 400 body ``{"errors": {"field": ["message", ...]}}`` as one short line."""
    try:
        content = response.content
    except httpx.ResponseNotRead:
        return ""
    try:
        data = json.loads(content[:4096])
    except ValueError:
        return short_reason(content[:400].decode("utf-8", errors="replace"))
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(errors, dict):
        parts = []
        for field, messages in errors.items():
            text = "; ".join(str(m) for m in messages) if isinstance(messages, list) else str(messages)
            parts.append(f"{field}: {text}")
        return short_reason(", ".join(parts))
    return short_reason(json.dumps(data)[:400])
