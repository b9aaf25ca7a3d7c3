"""A destination's lane and the items in it: the state every part of delivery shares, and nothing else.

One :class:`Lane` per destination (sink) holds its queue, the payloads in memory (:class:`Item`), its circuit breaker
state, the keeper's tick bookkeeping and its counters. All mutation happens on the event loop's thread; the parts
that act on lanes are :mod:`gateway.delivery.senders` (sending), :mod:`gateway.delivery.keeper` (the spool),
:mod:`gateway.delivery.settle` (outcomes) and :mod:`gateway.delivery.books` (reading the counters).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import httpx

from gateway.config import DispatchSettings
from gateway.events import Event
from gateway.sinks import Payload, Sink
from gateway.spool import SpoolRow

__all__ = [
    "CIRCUIT_CLOSED", "CIRCUIT_HALF_OPEN", "CIRCUIT_OPEN", "DONE", "MEM", "RELEASING", "SPILLING", "SPOOLED", "Flight",
    "Item", "Lane",
]  # fmt: skip

CIRCUIT_CLOSED: Final = 0
CIRCUIT_OPEN: Final = 1
CIRCUIT_HALF_OPEN: Final = 2

# Item states. An item is one built payload and its schedule; the books count it in exactly one place:
# MEM and SPILLING items in `mem_pending`, SPOOLED items in `spool_rows`.
MEM: Final = 0  # only in memory (retry heap, ready to send, or in flight)
SPILLING: Final = 1  # its spool insert is submitted but not yet confirmed
SPOOLED: Final = 2  # its row is in the spool; in memory only while leased (ready or in flight)
RELEASING: Final = 3  # retried or returned while SPILLING: becomes an unleased row once the insert lands
DONE: Final = 4  # outcome counted

TICKS_PER_FLUSH: Final = 4
# Each queued event is labelled with the last tick before it was enqueued. At tick m the keeper spools every event
# or payload still only in memory whose label is <= m - SPILL_AGE_TICKS: one enqueued at t in (T_j, T_j+1] is
# spooled at T_j+3 < t + 3 ticks = 0.75 flush intervals, and nothing younger than 2 ticks (half a flush interval)
# is spooled, so a healthy destination's requests normally finish first.
SPILL_AGE_TICKS: Final = 3
# Events waiting for the keeper to write them to the spool, per destination, beyond the queue itself: enough for
# several flush intervals at a peak arrival rate, so a slow commit does not drop events while the spool has room.
OVERFLOW_MIN: Final = 1000
# Overflow events that wake the keeper for a spool write before its next tick.
SPOOL_WAKE_BATCH: Final = 64
BUILD_CHUNK: Final = 256  # builds between yields to the loop when spooling a long queue
# Events built and written per spool commit when the keeper spools a backlog: memory holds one chunk of payloads.
SPILL_CHUNK: Final = 128
PURGE_EVERY_SECONDS: Final = 1.0
# Recent request durations kept per lane; while draining, a request is started only if twice the slowest of them
# still fits before the deadline.
LATENCY_SAMPLES: Final = 8


class Item:
    __slots__ = (
        "accepted_at", "attempts", "born_tick", "in_flight", "last_error", "next_at", "payload", "sending", "state",
    )  # fmt: skip

    def __init__(
        self,
        payload: Payload,
        accepted_at: float,
        *,
        attempts: int = 0,
        next_at: float = 0.0,
        last_error: str = "",
        state: int = MEM,
        born_tick: int = 0,
    ) -> None:
        self.payload = payload
        self.born_tick = born_tick  # the keeper tick label of its event (see SPILL_AGE_TICKS)
        self.accepted_at = accepted_at
        self.attempts = attempts
        self.next_at = next_at
        self.last_error = last_error
        self.state = state
        self.in_flight = False
        self.sending = False  # its request is on the wire

    def row(self) -> SpoolRow:
        return SpoolRow(self.payload, self.accepted_at, self.attempts, self.next_at, self.last_error)

    def __lt__(self, other: Item) -> bool:  # heap order
        return self.next_at < other.next_at


class Flight:
    """The items one sender took; registered so the keeper can spool them if the request takes long."""

    __slots__ = ("items", "probe")

    def __init__(self, items: list[Item], probe: bool) -> None:
        self.items = items
        self.probe = probe


class Lane:
    """Everything one destination needs; all mutation happens on the event loop thread."""

    def __init__(self, sink: Sink, settings: DispatchSettings, ttl: float, senders: int, overflow_size: int) -> None:
        self.sink = sink
        self.name = sink.name
        self.requires = frozenset(sink.requires)
        # Error-report lanes (Sentry) take only the tunnel's envelopes; every other lane takes only analytics.
        self.error_reports = getattr(sink, "kind", "") == "sentry"
        self.max_batch = max(1, int(sink.max_batch))
        self.ttl = ttl
        self.queue_size = settings.queue_size
        self.overflow_size = overflow_size
        self.senders = senders
        # Ready items kept in memory from the spool: enough to keep every sender busy for a round.
        self.ready_low = senders * self.max_batch
        self.ready_high = max(64, 2 * self.ready_low)
        # How this lane sends one request: httpx.AsyncClient.send, or the default transport called directly.
        self.send: Callable[[httpx.Request], Awaitable[httpx.Response]] | None = None

        # intake (hot path)
        self.queue: deque[Event] = deque()
        self.overflow: deque[Event] = deque()
        self.enqueued = 0  # events ever appended to `queue`
        self.dequeued = 0  # events ever taken from `queue`
        self.sleepers: deque[asyncio.Future[None]] = deque()
        # work in memory
        self.retry: list[Item] = []  # heap on next_at
        self.ready: deque[Item] = deque()  # leased from the spool
        self.inflight: set[Flight] = set()
        self.spilling: list[list[Item]] = []  # batches whose spool insert is pending
        # circuit breaker
        self.circuit = CIRCUIT_CLOSED
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        self.paused_until = 0.0
        # keeper
        self.tick = 0
        self.checkpoints: deque[int] = deque(maxlen=SPILL_AGE_TICKS + 1)  # `enqueued` at each of the last ticks
        self.keeper_wake = asyncio.Event()
        self.keeper_exit = False
        self.draining = False
        # Draining: the loop time by which stop() spools what is left, and how long this lane's last requests took,
        # so a sender starts no request that would be cut off on the wire at the deadline (see too_late).
        self.drain_deadline = math.inf
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.last_purge = -math.inf
        self.spool_version = 0  # spool-changing operations submitted
        self.summary_version = -1  # spool_version the last summary reflects
        self.spool_oldest: float | None = None
        self.spool_next_due: float | None = None
        self.settling: dict[str, list[str]] = {}  # host mode: rows settled, to delete and count in one commit

        # books
        self.accepted = 0
        self.replayed = 0
        self.refused = 0  # submitted after stop(); not accepted
        self.delivered = 0
        self.dropped_consent = 0
        self.dropped_policy: dict[str, int] = {}
        self.dropped_destination = 0
        self.dropped_overflow = 0
        self.dropped_expired = 0
        self.dead_lettered = 0
        self.ambiguous = 0
        self.retried = 0
        self.ambiguous_retried = 0
        self.mem_pending = 0
        self.spool_rows = 0

    def wake(self, count: int = 1) -> None:
        while count > 0 and self.sleepers:
            future = self.sleepers.popleft()
            if not future.done():
                future.set_result(None)
                count -= 1

    def wake_all(self) -> None:
        self.wake(len(self.sleepers))

    def blocked(self, now: float) -> bool:
        if self.paused_until > now:
            return True
        if self.circuit == CIRCUIT_OPEN:
            return now < self.open_until
        if self.circuit == CIRCUIT_HALF_OPEN:
            return self.probing
        return False

    def unhealthy(self, now: float) -> bool:
        return self.circuit != CIRCUIT_CLOSED or self.paused_until > now

    def too_late(self, loop_now: float) -> bool:
        """Draining with a spool, and a request started now would likely outlast the drain deadline: cut off on the
        wire it would end ambiguous (the destination may or may not have it), while left alone it is spooled and sent
        once later. With nothing measured yet there is no estimate, and the request is started."""
        return bool(self.latencies) and loop_now + 2 * max(self.latencies) > self.drain_deadline

    def memory_empty(self) -> bool:
        return not (self.queue or self.overflow or self.retry or self.inflight or self.spilling)

    def pending(self) -> int:
        return len(self.queue) + len(self.overflow) + self.mem_pending + self.spool_rows

    def in_flight_count(self) -> int:
        return sum(1 for flight in self.inflight for item in flight.items if item.in_flight and item.state != DONE)
