"""Delivery you can trust: bounded per-destination queues, retries, a circuit breaker, a durable spool, and books.

Shape
-----
One *lane* per destination (sink). :meth:`Dispatcher.submit` is the only code on the request path: per lane it
checks consent with one set operation, counts the event and appends it to the lane's bounded deque. It never
awaits, never does I/O and never raises. Everything else runs in the lane's background tasks:

- *senders* (``max_connections // #destinations`` per lane, at least one) build payloads with ``sink.build`` (policy
  and scrubbing happen here, off the request path), group equal non-empty ``batch_key``\\ s into one request of at
  most ``sink.max_batch`` payloads, send it through one shared keep-alive transport
  (:class:`~gateway.sinks.transport.UpstreamTransport`, or an ``httpx.AsyncClient`` around a transport that was
  passed in) and apply the verdict;
- one *keeper* ticks every ``flush_interval / 4``: it writes overflow, queued events that waited too long, retries
  and long in-flight batches to the spool, purges expired rows, loads due rows from the spool, and wakes senders.

Delivery rules (security.md §2 "Delivery guarantees")
------------------------------------------------------
- Connect errors, pool and write timeouts (the request was not completely sent), ``429`` and ``5xx`` are retried
  with full-jitter backoff ``uniform(0, min(cap, base·2ⁿ))`` that honours ``Retry-After`` (RFC 9110 §10.2.3), up to
  ``max_attempts`` and the destination's TTL (``min(ttl_seconds, max_age_seconds)``). A ``429``/``503`` with
  ``Retry-After`` also pauses the whole lane (at most ``backoff_cap`` seconds).
- Other 4xx and unusable requests are dead-lettered with their reason (GA4: "Don't retry the same request").
- A read timeout, a dropped connection after the request was written, or a hang past the request deadline are
  *ambiguous*: the destination may have counted the event and neither Plausible nor GA4 can deduplicate. By default
  they are not retried (at most once) and counted as ``ambiguous``; ``retry_ambiguous = true`` retries them
  (at least once) and counts ``ambiguous_retried``.
- ``circuit_threshold`` consecutive failures open the lane's circuit for ``circuit_reset_seconds``; then a single
  probe request decides (half-open). While the circuit is open nothing is sent and queued events go to the spool.
- Exceptions from ``sink.build``/``request``/``classify`` or the transport never kill a task: the payloads are
  dead-lettered as ``internal:<ExceptionName>``.

Durability
----------
With the spool on, memory is only a staging area: on every tick the keeper spools every payload waiting for a
retry, the whole queue while the lane is unhealthy (circuit not closed, or paused by ``Retry-After``), and any event
accepted three tick labels ago that is still only in memory, queued or in flight (in-flight rows stay leased and are
deleted once the verdict is in; see ``SPILL_AGE_TICKS``). So every accepted event reaches the spool within
``0.75 · flush_interval`` plus one SQLite commit, whatever the destination does, while requests that finish within
half a flush interval never touch the spool. Within one run nothing is sent
twice on the success path; after a crash (SIGKILL) the batches that were in flight may be sent again.

Memory bound
------------
Per destination at most ``queue_size`` queued events, ``max(queue_size, 1000)`` overflow events waiting for the
keeper's next spool write (more are dropped and counted as ``dropped_overflow``), ``queue_size`` payloads waiting
for a retry when the spool is off, and about ``2 · senders · max_batch`` payloads leased from the spool or in flight.
Without a spool, events beyond ``queue_size`` are dropped at once.

Books
-----
Per lane, at every moment (:meth:`Dispatcher.check_invariant`)::

    accepted = delivered + dropped_policy + dropped_destination + dropped_overflow + dropped_expired
               + dead_lettered + ambiguous + pending
    pending  = queued in memory + built payloads in memory not yet spooled + spool rows

``accepted`` counts every event submitted to the lane, including those dropped for lack of consent. Counters live in
memory and start at zero in each process; rows found in the spool at start are counted as ``accepted`` again in the
new process (and as ``replayed``), so the books balance within each process. ``retried`` counts retry attempts,
not outcomes. ``dropped_overflow`` counts events lost to back-pressure: the queue and its overflow buffer were full
with the spool off or full, or they were still in memory at shutdown with no room in the spool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import heapq
import http.cookiejar
import itertools
import logging
import math
import os
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

import httpx

from gateway.config import DispatchSettings, SpoolSettings
from gateway.events import ERROR_REPORT, Event
from gateway.logs import quiet_http_client_logs
from gateway.policy import parse_retry_after
from gateway.sinks import Outcome, Payload, PolicyDrop, Sink
from gateway.sinks.transport import UpstreamTransport
from gateway.spool import DeadLetter, PutResult, Spool, SpoolRow, SpoolSummary

__all__ = ["CIRCUIT_CLOSED", "CIRCUIT_HALF_OPEN", "CIRCUIT_OPEN", "Dispatcher"]

log = logging.getLogger("gateway.dispatch")
# Destinations' URLs may carry secrets (GA4's api_secret): keep httpx's per-request INFO lines out of any log.
quiet_http_client_logs()

CIRCUIT_CLOSED: Final = 0
CIRCUIT_OPEN: Final = 1
CIRCUIT_HALF_OPEN: Final = 2

# Item states. An item is one built payload and its schedule; the books count it in exactly one place:
# MEM and SPILLING items in `mem_pending`, SPOOLED items in `spool_rows`.
_MEM: Final = 0  # only in memory (retry heap, ready to send, or in flight)
_SPILLING: Final = 1  # its spool insert is submitted but not yet confirmed
_SPOOLED: Final = 2  # its row is in the spool; in memory only while leased (ready or in flight)
_RELEASING: Final = 3  # retried or returned while SPILLING: becomes an unleased row once the insert lands
_DONE: Final = 4  # outcome counted

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
PURGE_EVERY_SECONDS: Final = 1.0
LOG_REPEAT_SECONDS: Final = 60.0
MAX_REASON_CHARS: Final = 120

_REASON_UNSAFE = re.compile(r"[^\w .:;,/()+=-]+")
# Errors raised before the request was completely written: the destination cannot have processed it.
_NOT_SENT_ERRORS: Final = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
)
# Errors after the request was written: it may have been processed.
_AMBIGUOUS_ERRORS: Final = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError, httpx.DecodingError)

_T = TypeVar("_T")


def _no_cookies() -> http.cookiejar.CookieJar:
    # A shared client must never carry one destination's Set-Cookie into another request
    # (GHSA-7vwr-g6pm-9hc8 in fastapi-proxy-lib); an empty allowed_domains list refuses every cookie.
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def _safe_reason(text: str) -> str:
    """A reason for counters, logs and dead letters: one short line of harmless characters."""
    return _REASON_UNSAFE.sub("_", text).strip()[:MAX_REASON_CHARS] or "unknown"


class _Item:
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
        state: int = _MEM,
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

    def __lt__(self, other: _Item) -> bool:  # heap order
        return self.next_at < other.next_at


class _Flight:
    """The items one sender took; registered so the keeper can spool them if the request takes long."""

    __slots__ = ("items", "probe")

    def __init__(self, items: list[_Item], probe: bool) -> None:
        self.items = items
        self.probe = probe


class _LogThrottle:
    """At most one log line per (destination, reason) per LOG_REPEAT_SECONDS, with the number suppressed."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, str, str], tuple[float, int]] = {}

    def __call__(self, level: int, message: str, destination: str, reason: str) -> None:
        if not log.isEnabledFor(level):
            return
        now = time.monotonic()
        key = (level, destination, reason)
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < LOG_REPEAT_SECONDS:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > 1000:  # reasons come from destinations; keep the table small
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            log.log(level, message + " (%d similar suppressed)", destination, reason, suppressed)
        else:
            log.log(level, message, destination, reason)


class _Lane:
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
        self.retry: list[_Item] = []  # heap on next_at
        self.ready: deque[_Item] = deque()  # leased from the spool
        self.inflight: set[_Flight] = set()
        self.spilling: list[list[_Item]] = []  # batches whose spool insert is pending
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

    def memory_empty(self) -> bool:
        return not (self.queue or self.overflow or self.retry or self.inflight or self.spilling)

    def pending(self) -> int:
        return len(self.queue) + len(self.overflow) + self.mem_pending + self.spool_rows

    def in_flight_count(self) -> int:
        return sum(1 for flight in self.inflight for item in flight.items if item.in_flight and item.state != _DONE)


@dataclasses.dataclass(frozen=True, slots=True)
class _MaintainResult:
    purged: int
    put: PutResult
    loaded: list[SpoolRow]
    summary: SpoolSummary


def _maintain_op(
    spool: Spool,
    destination: str,
    *,
    purge_before: float | None,
    rows: list[SpoolRow],
    leased_rows: list[SpoolRow],
    now: float,
    load: int,
    batch: int = 1,
) -> _MaintainResult:
    # Order matters: purge first, so rows inserted by this very call are never purged before the caller has
    # seen that they were inserted.
    purged = 0
    if purge_before is not None:
        purged = spool.purge_expired(destination, purge_before)
        spool.purge_dead_letters(destination, purge_before)
    put = PutResult()
    if rows or leased_rows:
        first = spool.put(rows) if rows else PutResult()
        second = spool.put(leased_rows, leased=True) if leased_rows else PutResult()
        put = PutResult(
            first.inserted + second.inserted,
            first.duplicates + second.duplicates,
            first.rejected + second.rejected,
            first.invalid + second.invalid,
        )
    loaded = spool.lease_due(destination, now, load, batch) if load > 0 else []
    return _MaintainResult(purged, put, loaded, spool.summary(destination))


class Dispatcher:
    """Delivers events to every configured destination; see the module docstring for the guarantees.

    ``submit`` must be called on the event loop's thread (it is not thread-safe). Events submitted before
    :meth:`start` wait in the queues; events submitted after :meth:`stop` began are refused and counted.

    Arguments:
        sinks: one per destination; ``sink.name`` keys the stats, the spool rows and ``transports``.
        settings, spool: ``[dispatch]`` and ``[spool]``.
        transports: a transport per destination name (dry-run, tests), used through an ``httpx.AsyncClient``;
            default: the shared :class:`~gateway.sinks.transport.UpstreamTransport`.
        transport: the transport for every destination without its own (tests).
        clock: wall-clock seconds; TTLs, backoff and circuit times use it (tests pass a fake one).
        ttls: seconds a payload may wait per destination (``[destinations.NAME] ttl_seconds``); default: the sink's
            ``ttl_seconds`` attribute if it has one, else ``dispatch.max_age_seconds``. Always capped by that.
    """

    def __init__(
        self,
        sinks: Sequence[Sink],
        settings: DispatchSettings,
        spool: SpoolSettings,
        *,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        ttls: Mapping[str, float] | None = None,
        host: bool = False,
    ) -> None:
        names = [sink.name for sink in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        self.settings = settings
        self.spool_settings = spool
        # Deliverer mode: request workers put payloads in the host spool; this process only sends them, and every
        # outcome is counted in the host books (gateway.delivery.books) in the commit that deletes its row.
        self._host = host
        self._clock = clock
        self._transports = dict(transports or {})
        self._transport = transport
        self._random = random.Random()
        self._tick_seconds = settings.flush_interval / TICKS_PER_FLUSH
        # A request deadline of its own: httpx's timeouts apply per network operation (and not at all to a
        # MockTransport), so a destination that trickles bytes or hangs would otherwise hold a sender forever.
        self._request_deadline = (
            settings.connect_timeout + settings.write_timeout + settings.read_timeout + settings.pool_timeout
        )
        senders = max(1, settings.max_connections // max(1, len(sinks)))
        ttls = ttls or {}
        self._lanes: list[_Lane] = []
        for sink in sinks:
            ttl = ttls.get(sink.name, getattr(sink, "ttl_seconds", settings.max_age_seconds))
            ttl = min(float(ttl), settings.max_age_seconds)
            overflow_size = max(settings.queue_size, OVERFLOW_MIN)
            self._lanes.append(_Lane(sink, settings, ttl, senders, overflow_size=overflow_size))
        self._by_name = {lane.name: lane for lane in self._lanes}
        # Event ids: a per-process random prefix and a counter; unique across restarts sharing one spool.
        self._id_prefix = os.urandom(6).hex() + "-"
        self._id_counter = itertools.count(1)
        self._accepting = True
        self._running = False
        self._spool: Spool | None = None
        # Until start() has tried to open it, assume the spool will take the overflow (kept in memory meanwhile).
        self._spool_available = spool.enabled
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._clients: list[httpx.AsyncClient | UpstreamTransport] = []
        self._senders: list[asyncio.Task[None]] = []
        self._keepers: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._log = _LogThrottle()

    def __repr__(self) -> str:
        return f"Dispatcher(destinations={[lane.name for lane in self._lanes]!r}, running={self._running})"

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return tuple(lane.sink for lane in self._lanes)

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(lane.name for lane in self._lanes)

    @property
    def spool_open(self) -> bool:
        return self._spool is not None

    # ----------------------------------------------------------------------------------------------------------
    # hot path
    # ----------------------------------------------------------------------------------------------------------

    def submit(self, event: Event) -> None:
        """Hand an event to every destination; O(#destinations) in-memory work that never blocks or raises."""
        try:
            if not self._accepting:
                error_report = event.name == ERROR_REPORT
                for lane in self._lanes:
                    if lane.error_reports == error_report:
                        lane.refused += 1
                return
            if not event.event_id:
                event.event_id = f"{self._id_prefix}{next(self._id_counter):x}"
            granted = event.granted
            error_report = event.name == ERROR_REPORT
            for lane in self._lanes:
                if lane.error_reports != error_report:
                    continue  # not this lane's kind of event: never accepted, so not in its books
                lane.accepted += 1
                requires = lane.requires
                if requires and not requires <= granted:
                    lane.dropped_consent += 1
                    continue
                if len(lane.queue) < lane.queue_size:
                    lane.queue.append(event)
                    lane.enqueued += 1
                    if lane.sleepers:
                        lane.wake()
                elif self._spool_available and len(lane.overflow) < lane.overflow_size:
                    lane.overflow.append(event)
                    if len(lane.overflow) >= SPOOL_WAKE_BATCH:
                        # Spool it now rather than at the next tick: memory then stays bounded by a batch, not by
                        # (request rate x tick), however fast pages arrive while a destination is down.
                        lane.keeper_wake.set()
                else:
                    lane.dropped_overflow += 1
                    self._log(logging.WARNING, "dropped an event for %s: %s", lane.name, "queue full")
        except Exception as exc:  # pragma: no cover - a bug; the request must still succeed
            log.error("dispatcher: submit failed: %s", type(exc).__name__)

    # ----------------------------------------------------------------------------------------------------------
    # lifecycle
    # ----------------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open and replay the spool, then start the background tasks."""
        if self._running:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-spool")
        if self.spool_settings.enabled:
            await self._open_spool()
        if self._spool is None:
            for lane in self._lanes:  # buffered before start for a spool that is not there
                if lane.overflow:
                    lane.dropped_overflow += len(lane.overflow)
                    lane.overflow.clear()
        self._open_clients()
        self._accepting = True
        self._running = True
        for lane in self._lanes:
            lane.checkpoints.clear()
            lane.keeper_wake = asyncio.Event()  # bound to this loop on first use
            lane.sleepers.clear()
            lane.keeper_exit = lane.draining = False
            for index in range(lane.senders):
                self._senders.append(asyncio.create_task(self._sender(lane), name=f"dispatch-{lane.name}-{index}"))
            self._keepers.append(asyncio.create_task(self._keeper(lane), name=f"dispatch-{lane.name}-keeper"))
        if self._host and self._spool is not None:
            self._heartbeat = asyncio.create_task(self._beat(), name="dispatch-heartbeat")

    async def _open_spool(self) -> None:
        spool = Spool(self.spool_settings, host=self._host)
        recovered: Mapping[str, int] = {}
        try:
            await self._run(spool.open)
            if self._host:
                recovered = await self._run(spool.recover_sending, retry=self.settings.retry_ambiguous)
            rows = spool.rows_by_destination()
            unknown = sorted(name for name in rows if name not in self._by_name)
            if unknown:
                cutoff = self._clock() - self.settings.max_age_seconds
                await self._run(spool.purge_destinations, self._by_name.keys(), cutoff)
                log.warning("spool: rows for unconfigured destinations %s are kept until they expire", unknown)
        except Exception as exc:
            # Availability first: without a spool the gateway still delivers, it only loses durability.
            log.error("spool unavailable, running without it: %s", exc)
            self._spool_available = False
            with contextlib.suppress(Exception):
                await self._run(spool.close)
            return
        self._spool = spool
        self._spool_available = True
        if recovered:
            log.warning(
                "spool: %d payloads were on the wire when the last deliverer stopped; counted as %s",
                sum(recovered.values()),
                "ambiguous_retried and sent again" if self.settings.retry_ambiguous else "ambiguous, not sent again",
            )
        if self._host:
            for lane in self._lanes:
                lane.spool_rows = rows.get(lane.name, 0)
            return
        if spool.recovered_leases:
            log.warning(
                "spool: %d payloads were in flight when the last process stopped; they will be sent again",
                spool.recovered_leases,
            )
        for lane in self._lanes:
            replayed = rows.get(lane.name, 0)
            lane.spool_rows += replayed
            lane.accepted += replayed
            lane.replayed += replayed

    def _open_clients(self) -> None:
        s = self.settings
        timeout = httpx.Timeout(
            connect=s.connect_timeout, read=s.read_timeout, write=s.write_timeout, pool=s.pool_timeout
        )
        limits = httpx.Limits(max_connections=s.max_connections, max_keepalive_connections=s.max_connections)
        by_transport: dict[int, httpx.AsyncClient] = {}
        default: UpstreamTransport | None = None

        def client_for(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
            key = id(transport)
            if key not in by_transport:
                client = httpx.AsyncClient(
                    transport=transport,
                    limits=limits,
                    timeout=timeout,
                    trust_env=False,  # no proxy or netrc from the environment
                    follow_redirects=False,  # a redirect must not move visitor data to another host
                    cookies=_no_cookies(),
                )
                by_transport[key] = client
                self._clients.append(client)
            return by_transport[key]

        for lane in self._lanes:
            transport = self._transports.get(lane.name, self._transport)
            if transport is not None:
                lane.send = client_for(transport).send
                continue
            if default is None:
                # The real destinations: keep-alive HTTP/1.1 over gateway.upstream, called without an
                # httpx.AsyncClient around it (GitHub issue 7: the client's send() alone cost ~90 µs per request).
                # What AsyncClient would add here is off anyway: no cookie jar, no redirects, no proxy or
                # certificate settings from the environment; the transport reads every answer completely.
                default = UpstreamTransport.from_settings(s)
                self._clients.append(default)
            lane.send = default.handle_async_request

    async def stop(self) -> None:
        """Stop intake, deliver what is queued within ``shutdown_timeout``, spool the rest, close everything."""
        self._accepting = False
        if not self._running:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        for lane in self._lanes:
            lane.draining = True
            # Items leased from the spool are safe where they are; give them back instead of sending them now.
            if lane.ready:
                self._release(list(lane.ready), lane)
                lane.ready.clear()
            lane.wake_all()
            lane.keeper_wake.set()
        while loop.time() < deadline and not all(self._drained(lane) for lane in self._lanes):
            await asyncio.sleep(self._tick_seconds)
        for lane in self._lanes:
            lane.keeper_exit = True
            lane.keeper_wake.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        await asyncio.gather(*self._keepers, return_exceptions=True)
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        self._keepers.clear()
        self._senders.clear()
        now = self._clock()
        for lane in self._lanes:
            self._settle_cancelled_flights(lane, now)
            self._flush_settling(lane)
            await self._final_spill(lane, now)
        self._running = False
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._clients.clear()
        if self._spool is not None:
            spool, self._spool = self._spool, None
            self._spool_available = False
            with contextlib.suppress(Exception):
                await self._run(spool.close)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _drained(self, lane: _Lane) -> bool:
        if lane.memory_empty():
            return True
        # A lane that cannot send anything before the deadline need not be waited for.
        return lane.circuit == CIRCUIT_OPEN and not lane.inflight and not lane.spilling

    def _settle_cancelled_flights(self, lane: _Lane, now: float) -> None:
        for flight in list(lane.inflight):
            for item in flight.items:
                if not item.in_flight or item.state == _DONE:
                    continue
                if item.sending:
                    # Cut off on the wire: the destination may have it.
                    if self.settings.retry_ambiguous:
                        item.in_flight = item.sending = False
                        lane.ambiguous_retried += 1
                        self._reschedule(lane, item, now, "shutdown")
                    else:
                        self._finish(lane, item, "ambiguous", "shutdown")
                else:
                    self._return(lane, item)
        lane.inflight.clear()

    async def _final_spill(self, lane: _Lane, now: float) -> None:
        events = [*lane.queue, *lane.overflow]
        lane.dequeued += len(lane.queue)
        lane.queue.clear()
        lane.overflow.clear()
        items: list[_Item] = []
        for event in events:
            built = self._build(lane, event, now)
            if built is not None and not self._expired(lane, built, now):
                items.append(built)
        while lane.retry:
            item = heapq.heappop(lane.retry)
            if not self._expired(lane, item, now):
                items.append(item)
        if not items:
            return
        if self._spool is None:
            for item in items:
                self._finish(lane, item, "dropped_overflow", "shutdown")
            log.warning("%s: %d events still queued at shutdown were dropped (no spool)", lane.name, len(items))
            return
        await self._spill(lane, items, [], now, purge=False, load=0, final=True)

    # ----------------------------------------------------------------------------------------------------------
    # executor
    # ----------------------------------------------------------------------------------------------------------

    async def _run(self, func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a spool call on the single spool thread; calls run in the order they were submitted.

        In host mode (the deliverer) they run right here instead: no request waits on this loop, and a local
        SQLite commit (~20 µs) costs far less CPU than the two thread hops around it (measured: bench_handoff).
        """
        if self._host:
            return func(*args, **kwargs)
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: func(*args, **kwargs))

    def _fire(self, lane: _Lane, func: Callable[..., object], *args: Any) -> None:
        """Submit a spool call without waiting; its effect on the books was already applied."""
        if self._spool is None or self._executor is None:
            return
        lane.spool_version += 1
        if self._host:
            try:
                func(*args)
            except Exception as exc:
                log.error("spool operation failed: %s", type(exc).__name__)
            return
        future = self._executor.submit(func, *args)
        future.add_done_callback(self._log_spool_failure)

    @staticmethod
    def _log_spool_failure(future: concurrent.futures.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else None
        if exc is not None:
            log.error("spool operation failed: %s", type(exc).__name__)

    # ----------------------------------------------------------------------------------------------------------
    # books
    # ----------------------------------------------------------------------------------------------------------

    def _finish(self, lane: _Lane, item: _Item, outcome: str, reason: str = "") -> None:
        """Count an item's final outcome and forget it (its spool row, if any, is deleted or dead-lettered)."""
        if item.state == _DONE:  # pragma: no cover - a bug
            raise AssertionError(f"{lane.name}: {item.payload.event_id} finished twice")
        if outcome == "delivered":
            lane.delivered += 1
        elif outcome == "dropped_destination":
            lane.dropped_destination += 1
        elif outcome == "dropped_expired":
            lane.dropped_expired += 1
        elif outcome == "dropped_overflow":
            lane.dropped_overflow += 1
        elif outcome == "ambiguous":
            lane.ambiguous += 1
        elif outcome == "dropped_policy":
            lane.dropped_policy[reason] = lane.dropped_policy.get(reason, 0) + 1
        elif outcome == "dead_lettered":
            lane.dead_lettered += 1
        else:  # pragma: no cover - a bug
            raise AssertionError(outcome)
        had_row = item.state in (_SPOOLED, _SPILLING, _RELEASING)
        if item.state == _SPOOLED:
            lane.spool_rows -= 1
        else:
            lane.mem_pending -= 1
        item.state = _DONE
        item.in_flight = False
        spool = self._spool
        if spool is None:
            return
        if outcome == "dead_lettered":
            letter = DeadLetter(
                item.payload.event_id, lane.name, reason, item.payload, item.accepted_at, item.attempts, self._clock()
            )
            self._fire(lane, spool.dead_letter, [letter])
        elif had_row and self._host:
            # Deleted and counted in one commit, for every row settled in this turn of the loop together.
            key = f"dropped_policy:{reason}" if outcome == "dropped_policy" else outcome
            if not lane.settling:
                asyncio.get_running_loop().call_soon(self._flush_settling, lane)
            lane.settling.setdefault(key, []).append(item.payload.event_id)
        elif had_row:
            # For a SPILLING item this runs after its insert: the spool thread keeps submission order.
            self._fire(lane, spool.delete, lane.name, [item.payload.event_id])

    def _flush_settling(self, lane: _Lane) -> None:
        if lane.settling and self._spool is not None:
            batch, lane.settling = lane.settling, {}
            self._fire(lane, self._spool.settle, lane.name, batch)

    async def _beat(self) -> None:
        """Host mode: tell the request workers' metrics that this deliverer lives, and its circuits' states."""
        pid = os.getpid()
        while self._spool is not None:
            state = {
                lane.name: {"circuit_state": lane.circuit, "consecutive_failures": lane.failures}
                for lane in self._lanes
            }
            try:
                await self._run(self._spool.heartbeat, pid, state)
            except Exception as exc:
                log.error("spool: heartbeat failed: %s", type(exc).__name__)
            await asyncio.sleep(1.0)

    def _dead_letter_unbuilt(self, lane: _Lane, event: Event, reason: str) -> None:
        lane.dead_lettered += 1
        self._log(logging.WARNING, "dead-lettered an event for %s: %s", lane.name, reason)
        if self._spool is not None:
            letter = DeadLetter(event.event_id, lane.name, reason, None, event.timestamp, 0, self._clock())
            self._fire(lane, self._spool.dead_letter, [letter])

    def _reschedule(self, lane: _Lane, item: _Item, next_at: float, error: str, *, retried: int = 0) -> None:
        """Keep an item pending until ``next_at``: in the retry heap, or as an unleased spool row."""
        item.next_at = next_at
        item.last_error = error
        item.in_flight = False
        if item.state == _MEM:
            if len(lane.retry) < lane.queue_size or self._spool is not None:
                heapq.heappush(lane.retry, item)
            else:
                self._finish(lane, item, "dropped_overflow", "retry queue full")
        elif item.state == _SPOOLED:
            self._release([item], lane, retried)
        elif item.state == _SPILLING:
            item.state = _RELEASING
            self._release([item], lane, retried)

    def _return(self, lane: _Lane, item: _Item) -> None:
        """An item that was taken but not sent goes back where it came from, without counting an attempt."""
        self._reschedule(lane, item, item.next_at, item.last_error)

    def _release(self, items: list[_Item], lane: _Lane, retried: int = 0) -> None:
        if self._spool is not None:
            self._fire(lane, self._spool.release, [item.row() for item in items], retried)

    def _build(self, lane: _Lane, event: Event, now: float, born_tick: int = 0) -> _Item | None:
        try:
            payload = lane.sink.build(event)
        except PolicyDrop as drop:
            reason = _safe_reason(drop.reason)
            lane.dropped_policy[reason] = lane.dropped_policy.get(reason, 0) + 1
            return None
        except Exception as exc:
            self._dead_letter_unbuilt(lane, event, f"internal:{type(exc).__name__}")
            return None
        if payload.event_id != event.event_id or payload.destination != lane.name:
            payload = dataclasses.replace(payload, event_id=event.event_id, destination=lane.name)
        lane.mem_pending += 1
        return _Item(payload, event.timestamp, born_tick=born_tick)

    def _expired(self, lane: _Lane, item: _Item, now: float) -> bool:
        if now - item.accepted_at > lane.ttl:
            self._finish(lane, item, "dropped_expired")
            return True
        return False

    # ----------------------------------------------------------------------------------------------------------
    # senders
    # ----------------------------------------------------------------------------------------------------------

    async def _sender(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            flight = self._take(lane)
            if flight is None:
                future: asyncio.Future[None] = loop.create_future()
                lane.sleepers.append(future)
                try:
                    await future
                finally:
                    if not future.done():
                        future.cancel()
                continue
            try:
                await self._fly(lane, flight)
            except Exception as exc:  # pragma: no cover - a bug; never let it kill the sender
                log.error("%s: sender error: %s", lane.name, type(exc).__name__)
                for item in flight.items:
                    if item.in_flight and item.state != _DONE:
                        self._finish(lane, item, "dead_lettered", f"internal:{type(exc).__name__}")
            lane.inflight.discard(flight)
            if lane.draining and lane.memory_empty():
                lane.keeper_wake.set()
            elif self._host and len(lane.ready) < lane.ready_low:
                lane.keeper_wake.set()  # lease the next rows now rather than at the next tick

    def _take(self, lane: _Lane) -> _Flight | None:
        now = self._clock()
        if lane.circuit == CIRCUIT_OPEN and now >= lane.open_until and lane.paused_until <= now:
            lane.circuit = CIRCUIT_HALF_OPEN
            lane.probing = False
        if lane.blocked(now):
            return None
        probe = lane.circuit == CIRCUIT_HALF_OPEN
        # A flight's groups go out one after another, so take only this sender's share of the backlog: light
        # traffic stays spread over all senders, and batches fill up when there is a backlog to batch.
        share = (len(lane.ready) + len(lane.queue)) // lane.senders
        limit = 1 if probe else max(1, min(lane.max_batch, share))
        items: list[_Item] = []
        ready = lane.ready
        while ready and len(items) < limit:
            item = ready.popleft()
            if not self._expired(lane, item, now):
                items.append(item)
        retry = lane.retry
        while retry and retry[0].next_at <= now and len(items) < limit:
            item = heapq.heappop(retry)
            if not self._expired(lane, item, now):
                items.append(item)
        queue = lane.queue
        while queue and len(items) < limit:
            event = queue.popleft()
            sequence = lane.dequeued
            lane.dequeued += 1
            label = lane.tick
            for mark in reversed(lane.checkpoints):
                if sequence >= mark:
                    break
                label -= 1
            built = self._build(lane, event, now, label)
            if built is not None and not self._expired(lane, built, now):
                items.append(built)
        if not items:
            return None
        if probe:
            lane.probing = True
        for item in items:
            item.in_flight = True
        flight = _Flight(items, probe)
        lane.inflight.add(flight)
        return flight

    async def _fly(self, lane: _Lane, flight: _Flight) -> None:
        groups: list[list[_Item]] = []
        if lane.max_batch > 1:
            keyed: dict[str, list[_Item]] = {}
            for item in flight.items:
                key = item.payload.batch_key
                if not key:
                    groups.append([item])
                elif key in keyed:
                    keyed[key].append(item)
                else:
                    keyed[key] = group = [item]
                    groups.append(group)
        else:
            groups = [[item] for item in flight.items]
        try:
            for index, group in enumerate(groups):
                if lane.circuit != CIRCUIT_CLOSED and not flight.probe:
                    # The circuit opened while this flight was under way: stop hammering, give the rest back.
                    for rest in groups[index:]:
                        for item in rest:
                            if item.in_flight and item.state != _DONE:
                                self._return(lane, item)
                    break
                await self._send(lane, [item for item in group if item.in_flight and item.state != _DONE])
        finally:
            if flight.probe:
                lane.probing = False
                if lane.circuit == CIRCUIT_CLOSED:
                    lane.wake_all()

    async def _send(self, lane: _Lane, group: list[_Item]) -> None:
        now = self._clock()
        items = [item for item in group if not self._expired(lane, item, now)]
        if not items:
            return
        sink = lane.sink
        try:
            request = sink.request([item.payload for item in items])
        except Exception as exc:
            self._dead_letter(lane, items, f"internal:{type(exc).__name__}")
            return
        if self._host and self._spool is not None:
            # Durably "on the wire" before it is: a deliverer killed now counts it as ambiguous at its next start
            # instead of sending it twice.
            try:
                await self._run(self._spool.mark_sending, lane.name, [item.payload.event_id for item in items])
            except Exception as exc:
                log.error("%s: spool write failed: %s", lane.name, type(exc).__name__)
                for item in items:
                    if item.in_flight and item.state != _DONE:
                        self._return(lane, item)
                return
        for item in items:
            item.attempts += 1
            item.sending = True
        # On cancellation (shutdown) `sending` stays set: stop() then knows the request may have been sent.
        response, failure, ambiguous = await self._call(lane, request)
        for item in items:
            item.sending = False
        now = self._clock()
        if response is None:
            if failure.startswith(("transport:", "internal:")):
                self._dead_letter(lane, items, failure)
                return
            self._failure(lane, now, failure)
            if ambiguous and not self.settings.retry_ambiguous:
                self._log(logging.WARNING, "delivery to %s may have failed: %s", lane.name, failure)
                for item in items:
                    self._finish(lane, item, "ambiguous", failure)
                return
            if ambiguous:
                lane.ambiguous_retried += len(items)
            self._retry(lane, items, now, failure, None)
            return
        try:
            verdict = sink.classify(response)
        except Exception as exc:
            self._dead_letter(lane, items, f"internal:{type(exc).__name__}")
            return
        outcome = verdict.outcome
        if outcome is Outcome.RETRY:
            retry_after = verdict.retry_after
            if retry_after is None:
                retry_after = parse_retry_after(response.headers.get("retry-after"), now=now)
            reason = _safe_reason(verdict.reason or f"http {response.status_code}")
            self._failure(lane, now, reason)
            if retry_after is not None and retry_after > 0:
                lane.paused_until = max(lane.paused_until, now + min(retry_after, self.settings.backoff_cap))
            self._retry(lane, items, now, reason, retry_after)
            return
        self._success(lane)
        if outcome is Outcome.DELIVERED:
            for item in items:
                self._finish(lane, item, "delivered")
        elif outcome is Outcome.DROPPED_BY_DESTINATION:
            for item in items:
                self._finish(lane, item, "dropped_destination")
        else:
            self._dead_letter(lane, items, _safe_reason(verdict.reason or f"http {response.status_code}"))

    async def _call(self, lane: _Lane, request: httpx.Request) -> tuple[httpx.Response | None, str, bool]:
        """Send one request: (response, "", False), or (None, failure reason, whether it may have arrived)."""
        send = lane.send
        assert send is not None
        try:
            async with asyncio.timeout(self._request_deadline):
                return await send(request), "", False
        except TimeoutError:
            return None, "timeout", True
        except _NOT_SENT_ERRORS as exc:
            return None, type(exc).__name__, False
        except _AMBIGUOUS_ERRORS as exc:
            return None, type(exc).__name__, True
        except httpx.HTTPError as exc:
            return None, f"transport:{type(exc).__name__}", False
        except Exception as exc:
            return None, f"internal:{type(exc).__name__}", False

    def _dead_letter(self, lane: _Lane, items: Iterable[_Item], reason: str) -> None:
        self._log(logging.WARNING, "dead-lettered an event for %s: %s", lane.name, reason)
        for item in items:
            if item.state != _DONE:
                self._finish(lane, item, "dead_lettered", reason)

    def _retry(self, lane: _Lane, items: list[_Item], now: float, reason: str, retry_after: float | None) -> None:
        s = self.settings
        self._log(logging.INFO, "delivery to %s failed, will retry: %s", lane.name, reason)
        for item in items:
            if item.attempts >= s.max_attempts:
                self._finish(lane, item, "dead_lettered", f"retries exhausted: {reason}")
                continue
            # Full jitter (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/).
            delay = self._random.uniform(0.0, min(s.backoff_cap, s.backoff_base * 2.0 ** (item.attempts - 1)))
            if retry_after is not None:
                delay = max(delay, retry_after)
            next_at = now + delay
            if next_at - item.accepted_at > lane.ttl:
                self._finish(lane, item, "dropped_expired")
                continue
            lane.retried += 1
            self._reschedule(lane, item, next_at, reason, retried=1)

    def _failure(self, lane: _Lane, now: float, reason: str) -> None:
        lane.failures += 1
        if lane.circuit == CIRCUIT_HALF_OPEN or (
            lane.circuit == CIRCUIT_CLOSED and lane.failures >= self.settings.circuit_threshold
        ):
            lane.circuit = CIRCUIT_OPEN
            lane.open_until = now + self.settings.circuit_reset_seconds
            log.warning("circuit for %s opened: %s", lane.name, _safe_reason(reason))
            lane.keeper_wake.set()  # spool the queue now

    def _success(self, lane: _Lane) -> None:
        lane.failures = 0
        if lane.circuit != CIRCUIT_CLOSED:
            lane.circuit = CIRCUIT_CLOSED
            log.info("circuit for %s closed", lane.name)
            lane.wake_all()

    # ----------------------------------------------------------------------------------------------------------
    # keeper
    # ----------------------------------------------------------------------------------------------------------

    async def _keeper(self, lane: _Lane) -> None:
        while not lane.keeper_exit:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick_seconds):
                    await lane.keeper_wake.wait()
            lane.keeper_wake.clear()
            if lane.keeper_exit:
                return
            try:
                await self._maintain(lane)
            except Exception as exc:  # a bug or a broken spool: keep going, the next tick tries again
                log.error("%s: keeper error: %s", lane.name, type(exc).__name__)

    def _wake_if_work(self, lane: _Lane, now: float) -> None:
        if lane.circuit == CIRCUIT_OPEN and now >= lane.open_until:
            lane.wake()  # one sender becomes the half-open probe
        if lane.blocked(now):
            return
        work = len(lane.ready) + len(lane.queue)
        if lane.retry and lane.retry[0].next_at <= now:
            work += 1
        if work:
            lane.wake(work)

    async def _maintain(self, lane: _Lane) -> None:
        now = self._clock()
        lane.tick += 1
        lane.checkpoints.append(lane.enqueued)
        self._wake_if_work(lane, now)
        if self._spool is None:
            return
        # In flight for long, or retried and taken again before a tick could spool it: spool it (leased) now.
        old = lane.tick - SPILL_AGE_TICKS
        leased = [
            item
            for flight in lane.inflight
            for item in flight.items
            if item.in_flight and item.state == _MEM and item.born_tick <= old
        ]
        if lane.ready and (lane.circuit == CIRCUIT_OPEN or lane.paused_until > now):
            # Leased rows wait for the circuit in the spool, where the TTL purge can reach them.
            self._release(list(lane.ready), lane)
            lane.ready.clear()
        items: list[_Item] = []
        while lane.retry:
            item = heapq.heappop(lane.retry)
            if not self._expired(lane, item, now):
                items.append(item)
        # Unhealthy or shutting down: everything queued goes to the spool. Otherwise the events labelled
        # <= tick - SPILL_AGE_TICKS, i.e. enqueued before the checkpoint taken SPILL_AGE_TICKS - 1 ticks ago.
        if lane.unhealthy(now) or (lane.draining and lane.blocked(now)):
            spill_queue = len(lane.queue)
        elif len(lane.checkpoints) >= SPILL_AGE_TICKS:
            spill_queue = min(len(lane.queue), max(0, lane.checkpoints[-SPILL_AGE_TICKS] - lane.dequeued))
        else:
            spill_queue = 0
        events: list[Event] = list(lane.overflow)
        lane.overflow.clear()
        for _ in range(spill_queue):
            events.append(lane.queue.popleft())
        lane.dequeued += spill_queue
        # Register the batch before building, so the books can see its items while the build yields.
        lane.spilling.append(items)
        try:
            for index, event in enumerate(events):
                built = self._build(lane, event, now)
                if built is not None:
                    items.append(built)
                if index % BUILD_CHUNK == BUILD_CHUNK - 1:
                    await asyncio.sleep(0)
        finally:
            lane.spilling.remove(items)
        purge = now - lane.last_purge >= PURGE_EVERY_SECONDS or (
            lane.spool_oldest is not None and now - lane.spool_oldest > lane.ttl
        )
        load = 0
        if self._host:
            # Other processes add rows: look every tick (one indexed query) instead of trusting our own counts.
            if not lane.draining and len(lane.ready) < lane.ready_low:
                if not lane.unhealthy(now):
                    load = lane.ready_high - len(lane.ready)
                elif lane.circuit == CIRCUIT_HALF_OPEN and not lane.probing and lane.memory_empty():
                    load = 1
        elif not lane.draining and lane.spool_rows > len(lane.ready) and len(lane.ready) < lane.ready_low:
            due = (
                lane.spool_next_due is None or lane.spool_next_due <= now or lane.summary_version != lane.spool_version
            )
            if due and not lane.unhealthy(now):
                load = lane.ready_high - len(lane.ready)
            elif due and lane.circuit == CIRCUIT_HALF_OPEN and not lane.probing and lane.memory_empty():
                load = 1
        stale = lane.summary_version != lane.spool_version or self._host
        if items or leased or purge or load or stale:
            await self._spill(lane, items, leased, now, purge=purge, load=load, final=False)

    async def _spill(
        self, lane: _Lane, items: list[_Item], leased: list[_Item], now: float, *, purge: bool, load: int, final: bool
    ) -> None:
        """One trip to the spool thread: purge, insert ``items`` (and ``leased`` in-flight items), lease due rows."""
        spool = self._spool
        assert spool is not None
        batch = items + leased
        for item in batch:
            item.state = _SPILLING
        lane.spilling.append(batch)
        lane.spool_version += 1
        version = lane.spool_version
        if purge:
            lane.last_purge = now
        try:
            result = await self._run(
                _maintain_op,
                spool,
                lane.name,
                purge_before=now - lane.ttl if purge else None,
                rows=[item.row() for item in items],
                leased_rows=[item.row() for item in leased],
                now=now,
                load=load,
                batch=lane.max_batch,
            )
        except Exception as exc:
            log.error("%s: spool write failed: %s", lane.name, type(exc).__name__)
            result = _MaintainResult(
                0, PutResult(rejected=tuple(item.payload.event_id for item in batch)), [], SpoolSummary(0, None, None)
            )
            version = lane.summary_version
        finally:
            lane.spilling.remove(batch)
        if result.purged:
            lane.dropped_expired += result.purged
            lane.spool_rows -= result.purged
        self._apply_put(lane, batch, result.put, final)
        loaded = result.loaded
        if lane.max_batch > 1 and len(loaded) > 1:
            # Rows come earliest first; a stable sort by batch key puts each client's rows next to each other, so
            # senders fill requests (GA4: up to 25 events of one client) with what one lease brought.
            loaded = sorted(loaded, key=lambda row: row.payload.batch_key)
        for row in loaded:
            lane.ready.append(
                _Item(
                    row.payload,
                    row.accepted_at,
                    attempts=row.attempts,
                    next_at=row.next_at,
                    last_error=row.last_error,
                    state=_SPOOLED,
                )
            )
        if lane.summary_version <= version:
            lane.summary_version = version
            lane.spool_oldest = result.summary.oldest_accepted_at
            lane.spool_next_due = result.summary.next_due
            if self._host:
                lane.spool_rows = result.summary.rows
        if result.loaded:
            self._wake_if_work(lane, self._clock())

    def _apply_put(self, lane: _Lane, batch: list[_Item], put: PutResult, final: bool) -> None:
        inserted = set(put.inserted)
        duplicates = set(put.duplicates)
        invalid = set(put.invalid)
        for item in batch:
            event_id = item.payload.event_id
            state = item.state
            if event_id in inserted:
                if state in (_SPILLING, _RELEASING):
                    item.state = _SPOOLED
                    lane.mem_pending -= 1
                    lane.spool_rows += 1
                # _DONE: finished while its insert was pending; the delete queued behind it removed the row.
                continue
            if state == _DONE:
                continue
            item.state = _MEM
            if item.in_flight:
                continue  # still being sent from memory
            if event_id in duplicates:
                self._finish(lane, item, "dropped_policy", "duplicate")
            elif final:
                self._finish(
                    lane, item, "dropped_overflow", "spool unavailable" if event_id in invalid else "spool full"
                )
            elif event_id not in invalid and len(lane.retry) >= lane.queue_size:
                self._finish(lane, item, "dropped_overflow", "spool full")
            else:
                heapq.heappush(lane.retry, item)
        if put.rejected:
            self._log(logging.WARNING, "spool refused payloads for %s: %s", lane.name, "spool full or failing")

    # ----------------------------------------------------------------------------------------------------------
    # observation
    # ----------------------------------------------------------------------------------------------------------

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        """Per destination: counters (monotonic within a process) and gauges."""
        now = self._clock()
        result: dict[str, dict[str, float]] = {}
        for lane in self._lanes:
            policy = dict(lane.dropped_policy)
            if lane.dropped_consent:
                policy["consent"] = policy.get("consent", 0) + lane.dropped_consent
            oldest_age = 0.0
            if lane.spool_rows and lane.spool_oldest is not None:
                oldest_age = max(0.0, now - lane.spool_oldest)
            stats: dict[str, float] = {
                "accepted": lane.accepted,
                "replayed": lane.replayed,
                "refused": lane.refused,
                "delivered": lane.delivered,
                "dropped_policy": sum(policy.values()),
                "dropped_destination": lane.dropped_destination,
                "dropped_overflow": lane.dropped_overflow,
                "dropped_expired": lane.dropped_expired,
                "dead_lettered": lane.dead_lettered,
                "ambiguous": lane.ambiguous,
                "retried": lane.retried,
                "ambiguous_retried": lane.ambiguous_retried,
                "pending": lane.pending(),
                "queue_depth": len(lane.queue) + len(lane.overflow),
                "in_flight": lane.in_flight_count(),
                "memory_pending": lane.mem_pending,
                "spool_rows": lane.spool_rows,
                "spool_oldest_age_seconds": oldest_age,
                "circuit_state": lane.circuit,
                "consecutive_failures": lane.failures,
                "spool_available": 1.0 if self._spool_available else 0.0,
            }
            for reason, count in sorted(policy.items()):
                stats[f"dropped_policy:{reason}"] = count
            result[lane.name] = stats
        return result

    def check_invariant(self) -> None:
        """Raise AssertionError with details unless every lane's books balance (see the module docstring)."""
        problems: list[str] = []
        for lane in self._lanes:
            policy = sum(lane.dropped_policy.values()) + lane.dropped_consent
            outcomes = {
                "delivered": lane.delivered,
                "dropped_policy": policy,
                "dropped_destination": lane.dropped_destination,
                "dropped_overflow": lane.dropped_overflow,
                "dropped_expired": lane.dropped_expired,
                "dead_lettered": lane.dead_lettered,
                "ambiguous": lane.ambiguous,
                "pending": lane.pending(),
            }
            total = sum(outcomes.values())
            if total != lane.accepted:
                detail = ", ".join(f"{k}={v}" for k, v in outcomes.items())
                problems.append(f"{lane.name}: accepted={lane.accepted} != {total} ({detail})")
            negative = {
                k: v for k, v in {**outcomes, "spool_rows": lane.spool_rows, "mem": lane.mem_pending}.items() if v < 0
            }
            if negative:
                problems.append(f"{lane.name}: negative counts {negative}")
            # The books' count of payloads in memory must match what memory actually holds.
            held: dict[int, _Item] = {}
            for item in lane.retry:
                held[id(item)] = item
            for flight in lane.inflight:
                for item in flight.items:
                    if item.in_flight:
                        held[id(item)] = item
            for batch in lane.spilling:
                for item in batch:
                    held[id(item)] = item
            in_memory = sum(1 for item in held.values() if item.state in (_MEM, _SPILLING, _RELEASING))
            if in_memory != lane.mem_pending:
                problems.append(f"{lane.name}: {in_memory} payloads in memory but the books say {lane.mem_pending}")
            if lane.dequeued > lane.enqueued:
                problems.append(f"{lane.name}: dequeued {lane.dequeued} > enqueued {lane.enqueued}")
        if problems:
            raise AssertionError("dispatcher books do not balance: " + "; ".join(problems))

    def _idle(self, lane: _Lane, now: float) -> bool:
        if lane.queue or lane.overflow or lane.inflight or lane.spilling:
            return False
        blocked = lane.blocked(now) or (lane.circuit == CIRCUIT_OPEN and now < lane.open_until)
        if lane.ready and not blocked:
            return False
        if lane.retry and (self._spool is not None or (lane.retry[0].next_at <= now and not blocked)):
            return False
        if self._spool is not None:
            if lane.summary_version != lane.spool_version:
                return False
            if lane.spool_oldest is not None and now - lane.spool_oldest > lane.ttl:
                return False
            if lane.spool_rows and lane.spool_next_due is not None and lane.spool_next_due <= now and not blocked:
                return False
            if lane.circuit == CIRCUIT_OPEN and now >= lane.open_until and lane.spool_rows:
                return False
        elif lane.circuit == CIRCUIT_OPEN and now >= lane.open_until and lane.retry:
            return False
        return True

    async def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no lane has work it could do now; True if reached within ``timeout`` seconds (tests, tools)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            now = self._clock()
            if all(self._idle(lane, now) for lane in self._lanes):
                return True
            if loop.time() >= deadline:
                return False
            for lane in self._lanes:
                lane.keeper_wake.set()
            await asyncio.sleep(self._tick_seconds)
