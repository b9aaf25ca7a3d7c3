"""Prometheus metrics for the dispatcher at ``{prefix}/metrics``, for allowlisted clients or a bearer token.

Every family has a ``destination`` label; ``dropped_policy`` also has ``reason`` (short slugs such as ``consent``).
The counters obey, per destination::

    accepted = delivered + dropped_policy + dropped_destination + dropped_overflow + dropped_expired
               + dead_lettered + ambiguous + pending

(see :mod:`gateway.delivery.dispatcher`). Counters restart at zero with the process; ``replayed`` says how much of
``accepted`` came from the spool at start. The collector reads :meth:`Dispatcher.stats` at scrape time and is registered
in a dedicated :class:`~prometheus_client.CollectorRegistry`, never the global one, so several gateways (or tests) in
one process do not collide. In deliverer mode (several workers) the counters are the host's books, read from the
host spool (:class:`HostBooks`): the same in every worker, and they do not restart with any process.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import Receive, Scope, Send

from gateway.config import MetricsSettings

__all__ = ["DispatchCollector", "HandoffCollector", "HostBooks", "MetricsEndpoint"]


class StatsSource(Protocol):
    """Per destination: counters and gauges (``Dispatcher.stats`` in process, :class:`HostBooks` per host)."""

    def stats(self) -> Mapping[str, Mapping[str, float]]: ...


class HostBooks:
    """Deliverer mode: the host's books, read from the host spool at scrape time (same numbers in every worker)."""

    def __init__(self, path: str, destinations: Iterable[str]) -> None:
        self.path = path
        self.destinations = tuple(destinations)

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        from gateway.delivery.books import read_host_stats

        return read_host_stats(self.path, self.destinations)


PREFIX: Final = "gateway_dispatch"

# stats() key -> help text. Counter names get "_total" from prometheus_client.
COUNTERS: Final = {
    "accepted": "Events accepted for the destination (including those dropped by policy, and spool rows replayed "
    "at start).",
    "replayed": "Spool rows found at start and counted as accepted again in this process.",
    "delivered": "Events the destination accepted (2xx).",
    "dropped_destination": "Events the destination accepted but discarded (Plausible x-plausible-dropped).",
    "dropped_overflow": "Events lost to back-pressure: queue full with the spool off or full.",
    "dropped_expired": "Events older than the destination's TTL or dispatch.max_age_seconds.",
    "dead_lettered": "Events the destination rejected, or that failed after dispatch.max_attempts.",
    "ambiguous": "Events whose request may or may not have arrived (read timeout after sending), not retried.",
    "retried": "Retry attempts scheduled (not an outcome).",
    "ambiguous_retried": "Ambiguous failures retried because dispatch.retry_ambiguous is on (not an outcome).",
    "refused": "Events submitted after shutdown began (not accepted).",
}
GAUGES: Final = {
    "pending": "Events not yet settled: queued, in memory, in flight or spooled.",
    "queue_depth": "Events waiting in the in-memory queue.",
    "in_flight": "Payloads taken by a sender and not yet settled.",
    "spool_rows": "Payloads in the durable spool.",
    "spool_oldest_age_seconds": "Age of the oldest spooled payload.",
    "circuit_state": "Circuit breaker: 0 closed, 1 open, 2 half-open.",
    "consecutive_failures": "Failed requests in a row.",
}

_BEARER: Final = "bearer "


class DispatchCollector:
    """A prometheus_client collector that reads the dispatcher's books at scrape time."""

    def __init__(self, dispatcher: StatsSource) -> None:
        self.dispatcher = dispatcher

    def collect(self) -> Iterable[Metric]:
        stats = self.dispatcher.stats()
        counters = {
            key: CounterMetricFamily(f"{PREFIX}_{key}", text, labels=["destination"]) for key, text in COUNTERS.items()
        }
        policy = CounterMetricFamily(
            f"{PREFIX}_dropped_policy",
            "Events dropped by the destination's policy (consent, limits, ...), by reason.",
            labels=["destination", "reason"],
        )
        gauges = {
            key: GaugeMetricFamily(f"{PREFIX}_{key}", text, labels=["destination"]) for key, text in GAUGES.items()
        }
        spool_available = 0.0
        heartbeat_age: float | None = None
        for destination, values in stats.items():
            if "deliverer_heartbeat_age_seconds" in values:
                heartbeat_age = values["deliverer_heartbeat_age_seconds"]
            for key, counter in counters.items():
                counter.add_metric([destination], values.get(key, 0.0))
            for key, gauge in gauges.items():
                gauge.add_metric([destination], values.get(key, 0.0))
            for key, value in values.items():
                if key.startswith("dropped_policy:"):
                    policy.add_metric([destination, key.partition(":")[2]], value)
            spool_available = max(spool_available, values.get("spool_available", 0.0))
        yield from counters.values()
        yield policy
        yield from gauges.values()
        yield GaugeMetricFamily(f"{PREFIX}_spool_available", "1 if the durable spool is open.", value=spool_available)
        if heartbeat_age is not None:
            yield GaugeMetricFamily(
                "gateway_deliverer_heartbeat_age_seconds",
                "Seconds since the host's deliverer last ticked (-1: it never ran on this spool).",
                value=heartbeat_age,
            )


class WorkerStats(Protocol):
    worker: str

    def stats(self) -> Mapping[str, float]: ...


class HandoffCollector:
    """A request worker's own handoff counters, labelled ``worker`` (the host's books are not per worker)."""

    def __init__(self, handoff: WorkerStats) -> None:
        self.handoff = handoff

    def collect(self) -> Iterable[Metric]:
        worker = self.handoff.worker
        stats = self.handoff.stats()
        texts = {
            "handed_off": "Events this request worker wrote to the host spool.",
            "refused": "Events submitted after this worker began to stop.",
            "write_errors": "Failed writes to the host spool (retried with the next interval).",
        }
        for key, text in texts.items():
            family = CounterMetricFamily(f"gateway_handoff_{key}", text, labels=["worker"])
            family.add_metric([worker], stats.get(key, 0.0))
            yield family
        buffered = GaugeMetricFamily(
            "gateway_handoff_buffered", "Events in this worker's memory, not yet written.", labels=["worker"]
        )
        buffered.add_metric([worker], stats.get("buffered", 0.0))
        yield buffered


class ReceiptBacklogCollector:
    """The consent receipts waiting on this host for PostgreSQL (gateway.receipts_pg), read at scrape time."""

    def __init__(self, backlog: Callable[[], int]) -> None:
        self.backlog = backlog

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "gateway_consent_receipts_backlog",
            "Consent receipts queued on this host that PostgreSQL does not have yet.",
            value=float(self.backlog()),
        )


class IntakeCollector:
    """Edge log records (gateway.intake) by outcome: ``event`` or the reason each was skipped."""

    def __init__(self, counts: Mapping[str, int], worker: Callable[[], str] | None = None) -> None:
        self.counts = counts
        self.worker = worker  # several workers per host: each counts its own records, labelled

    def collect(self) -> Iterable[Metric]:
        labels = ["outcome", "worker"] if self.worker is not None else ["outcome"]
        family = CounterMetricFamily(
            "gateway_intake_records",
            "Edge log records: turned into an event, or skipped (by reason).",
            labels=labels,
        )
        worker = [self.worker()] if self.worker is not None else []
        for outcome, count in self.counts.items():
            family.add_metric([outcome, *worker], float(count))
        yield family


class MetricsEndpoint:
    """ASGI endpoint serving the Prometheus text format.

    The caller decides whether the *full* client address is allowlisted (``client_allowed``: the address resolved
    through trusted proxies, never the proxy's own; after the privacy middleware ``scope["client"]`` holds only the
    truncated address, so the endpoint cannot decide this itself). Otherwise the request
    needs ``Authorization: Bearer <metrics.token>``; anything else gets 403.
    """

    def __init__(
        self,
        settings: MetricsSettings,
        dispatcher: StatsSource,
        *,
        receipts_backlog: Callable[[], int] | None = None,
        blocking: bool = False,
    ) -> None:
        self.settings = settings
        # The host books are read from SQLite: render in a thread, not on the event loop.
        self._blocking = blocking
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DispatchCollector(dispatcher))
        if receipts_backlog is not None:
            self.registry.register(ReceiptBacklogCollector(receipts_backlog))

        token = str(settings.token) if settings.token is not None else ""
        self._token: bytes | None = token.encode() if token else None

    def __repr__(self) -> str:
        return f"MetricsEndpoint(enabled={self.settings.enabled}, token={'set' if self._token else 'unset'})"

    def authorized(self, scope: Scope, *, client_allowed: bool) -> bool:
        if client_allowed:
            return True
        if self._token is None:
            return False
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                text = value.decode("latin-1")
                if text[: len(_BEARER)].lower() != _BEARER:
                    return False
                given = text[len(_BEARER) :].strip().encode("latin-1")
                # Constant-time compare, so the response time does not reveal how much of a guess was right.
                return hmac.compare_digest(given, self._token)
        return False

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, *, client_allowed: bool) -> None:
        method = scope.get("method", "GET")
        if not self.settings.enabled:
            await _respond(send, 404, b"not found\n")
        elif method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
        elif not self.authorized(scope, client_allowed=client_allowed):
            await _respond(send, 403, b"forbidden\n")
        else:
            body = await asyncio.to_thread(self.render) if self._blocking else self.render()
            await _respond(
                send,
                200,
                b"" if method == "HEAD" else body,
                content_type=CONTENT_TYPE_LATEST.encode(),
                length=len(body),
            )


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    length: int | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body) if length is None else length).encode()),
        (b"cache-control", b"no-store"),
        *(extra or ()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
