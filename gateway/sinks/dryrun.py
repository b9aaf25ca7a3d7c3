"""Dry run: print exactly what a destination would receive, and answer as it would.

:class:`DryRunTransport` is an httpx transport. Give it to the client a sink's requests go through, and each request
prints as one JSON line instead of leaving the machine::

    {"destination": "ga4", "method": "POST", "url": "https://…/mp/collect?measurement_id=G-X&api_secret=***",
     "headers": {"host": "…", "content-length": "…", "content-type": "application/json"}, "body": {…}}

It then returns the success answer of that destination: ``204`` for the GA4 Measurement Protocol (a ``/mp/collect``
path), ``202`` otherwise (Plausible and the generic dry-run sink), unless ``status`` is given.

:class:`DryRunSink` is the ``kind = "dryrun"`` destination: a generic JSON payload with every field its allowlist
permits, always dry-run. The zero-config demo uses these so a newcomer sees what leaves for every page view.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, Final, TextIO

import httpx

from gateway.config import DestinationSettings, Settings
from gateway.events import PAGEVIEW, Event
from gateway.policy import DestinationPolicy, encode_json
from gateway.sinks import Outcome, Payload, PolicyDrop, Verdict

__all__ = ["DEFAULT_DRYRUN_ENDPOINT", "DryRunSink", "DryRunTransport", "describe_request", "mask_url"]

DEFAULT_DRYRUN_ENDPOINT: Final = "https://dryrun.invalid/event"  # RFC 2606 ".invalid": never resolves
MASK: Final = "***"
# Query parameters whose values are credentials and must not be printed.
SECRET_PARAMS: Final = frozenset({"api_secret"})


def mask_url(url: httpx.URL | str) -> str:
    """The URL as text with secret query values replaced by ``***``."""
    url = httpx.URL(url)
    query = url.query.decode("ascii", errors="replace")
    if not query:
        return str(url)
    parts = []
    for item in query.split("&"):
        key = item.split("=", 1)[0]
        parts.append(f"{key}={MASK}" if key in SECRET_PARAMS else item)
    return f"{url.copy_with(query=None)}?{'&'.join(parts)}"


def describe_request(request: httpx.Request, destination: str | None = None) -> dict[str, Any]:
    """A JSON-friendly picture of a request as it leaves: method, masked URL, every header, parsed body."""
    content = request.content
    body: Any
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = content.decode("utf-8", errors="replace")
    described: dict[str, Any] = {} if destination is None else {"destination": destination}
    described.update(
        method=request.method,
        url=mask_url(request.url),
        headers={name: value for name, value in request.headers.items()},
        body=body,
    )
    return described


class DryRunTransport(httpx.AsyncBaseTransport):
    """Prints each request as one JSON line and answers with the destination's success status."""

    def __init__(self, destination: str, out: TextIO | None = None, *, status: int | None = None) -> None:
        self.destination = destination
        self._out = out
        self._status = status

    def __repr__(self) -> str:
        return f"DryRunTransport(destination={self.destination!r})"

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        out = self._out if self._out is not None else sys.stdout
        out.write(json.dumps(describe_request(request, self.destination), ensure_ascii=False) + "\n")
        out.flush()
        status = self._status
        if status is None:
            status = 204 if request.url.path.endswith("/mp/collect") else 202
        content = b"" if status == 204 else b"ok"
        return httpx.Response(status, content=content, request=request)


class DryRunSink:
    """``kind = "dryrun"``: every allowed field as plain JSON, never sent anywhere (always dry-run)."""

    kind = "dryrun"
    max_batch = 1
    dry_run = True

    def __init__(self, dest: DestinationSettings, settings: Settings) -> None:
        self.name = dest.name
        self.requires: frozenset[str] = frozenset(dest.requires)
        self.endpoint = dest.endpoint or DEFAULT_DRYRUN_ENDPOINT
        self.ttl_seconds = dest.ttl_seconds  # read by the dispatcher: how long a payload may wait in the spool
        self.policy = DestinationPolicy(dest, settings)

    def __repr__(self) -> str:
        return f"DryRunSink(name={self.name!r})"

    def build(self, event: Event) -> Payload:
        fields = self.policy.apply(event)  # checks consent first
        if event.name != PAGEVIEW and not self.policy.allows("name"):
            raise PolicyDrop("custom_event_not_allowed")
        body: dict[str, Any] = {"name": event.name, "url": fields.url}
        optional = (
            ("referrer", fields.referrer),
            ("title", fields.title),
            ("country", fields.country),
            ("language", fields.language),
            ("user_agent", fields.user_agent),
            ("ip", fields.ip),
        )
        body.update((key, value) for key, value in optional if value)
        if fields.props:
            body["props"] = dict(fields.props)
        return Payload(destination=self.name, event_id=event.event_id, body=body, created_at=event.timestamp)

    def request(self, payloads: Sequence[Payload]) -> httpx.Request:
        if len(payloads) != 1:
            raise ValueError(f"a dry-run request carries exactly one event, got {len(payloads)}")
        headers = [("content-type", "application/json")]
        return httpx.Request("POST", self.endpoint, headers=headers, content=encode_json(payloads[0].body))

    def classify(self, response: httpx.Response) -> Verdict:
        if 200 <= response.status_code < 300:
            return Verdict(Outcome.DELIVERED)
        return Verdict(Outcome.REJECTED, reason=f"http {response.status_code}")
