"""Destinations: one module per wire format. The dispatcher speaks to them only through :class:`Sink`.

A sink turns an :class:`~gateway.events.Event` into a :class:`Payload` that already holds only what its policy
permits (this is what the spool stores), turns a batch of payloads into one HTTP request, and classifies the
destination's answer.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from gateway.events import Event

__all__ = ["Outcome", "Payload", "PolicyDrop", "Sink", "Verdict"]


class PolicyDrop(Exception):
    """Raised by :meth:`Sink.build` when policy forbids sending the event; ``reason`` is a short slug."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Payload:
    """One event as its destination will receive it: already filtered, JSON-serialisable, safe to spool."""

    destination: str
    event_id: str
    body: dict[str, Any]
    # Extra request headers this event needs (e.g. User-Agent, X-Forwarded-For with the truncated IP).
    headers: tuple[tuple[str, str], ...] = ()
    # Payloads with the same non-empty key may share one request (GA4: same client); "" = one request each.
    batch_key: str = ""
    created_at: float = 0.0
    # ``body`` as compact JSON when it is already known (read back from the spool), so that sending it does not
    # encode it again; "" = encode ``body``. Always the encoding of ``body`` (gateway.policy.encode_json's form).
    body_json: str = dataclasses.field(default="", compare=False, repr=False)


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    DROPPED_BY_DESTINATION = "dropped_destination"  # accepted but discarded (Plausible's x-plausible-dropped)
    REJECTED = "rejected"  # a 4xx that retrying cannot fix: dead-letter with the reason
    RETRY = "retry"  # 429, 5xx: try again later


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None  # seconds, from Retry-After


class Sink(Protocol):
    name: str  # the [destinations.NAME] key
    kind: str  # "plausible" | "ga4"
    requires: frozenset[str]  # consent categories that must all be granted
    max_batch: int  # events per request (Plausible 1, GA4 25)
    dry_run: bool

    def build(self, event: Event) -> Payload:
        """Filter and shape one event; raise :class:`PolicyDrop` when nothing may be sent."""
        ...

    def request(self, payloads: Sequence[Payload]) -> httpx.Request:
        """One HTTP request for payloads that share a batch key (len <= max_batch)."""
        ...

    def classify(self, response: httpx.Response) -> Verdict:
        """What the destination's answer means for delivery accounting."""
        ...
