"""Delivery you can trust: bounded per-destination queues, retries, a circuit breaker, a durable spool, and books.

Shape
-----
The parts live in :mod:`gateway.delivery`, one module per concern: ``lanes`` (per-destination state),
``retry`` (backoff, circuit breaker, what a failure means), ``settle`` (outcomes and the books),
``senders``, ``keeper`` (the spool's timer), ``spool_bridge`` (where spool calls run) and ``books`` (reading the
counters). This class composes them and owns the lifecycle.

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
import contextlib
import http.cookiejar
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import httpx

from gateway.config import DispatchSettings, SpoolSettings
from gateway.delivery.books import check_lanes, lane_stats
from gateway.delivery.keeper import Keeper
from gateway.delivery.lanes import (
    CIRCUIT_CLOSED,
    CIRCUIT_HALF_OPEN,
    CIRCUIT_OPEN,
    DONE,
    OVERFLOW_MIN,
    SPOOL_WAKE_BATCH,
    TICKS_PER_FLUSH,
    Lane,
)  # fmt: skip
from gateway.delivery.senders import Senders
from gateway.delivery.settle import Settler
from gateway.delivery.spool_bridge import SpoolBridge
from gateway.events import ERROR_REPORT, Event
from gateway.logs import quiet_http_client_logs
from gateway.sinks import Sink
from gateway.sinks.transport import UpstreamTransport
from gateway.spool import Spool

__all__ = ["CIRCUIT_CLOSED", "CIRCUIT_HALF_OPEN", "CIRCUIT_OPEN", "Dispatcher"]

DRAIN_POLL_SECONDS: Final = 0.01

log = logging.getLogger("gateway.dispatch")
# Destinations' URLs may carry secrets (GA4's api_secret): keep httpx's per-request INFO lines out of any log.
quiet_http_client_logs()


def _no_cookies() -> http.cookiejar.CookieJar:
    # A shared client must never carry one destination's Set-Cookie into another request
    # (GHSA-7vwr-g6pm-9hc8 in fastapi-proxy-lib); an empty allowed_domains list refuses every cookie.
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


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
        self._tick_seconds = settings.flush_interval / TICKS_PER_FLUSH
        # A request deadline of its own (see gateway.delivery.retry.call).
        self._request_deadline = (
            settings.connect_timeout + settings.write_timeout + settings.read_timeout + settings.pool_timeout
        )
        senders = max(1, settings.max_connections // max(1, len(sinks)))
        ttls = ttls or {}
        self._lanes: list[Lane] = []
        for sink in sinks:
            ttl = ttls.get(sink.name, getattr(sink, "ttl_seconds", settings.max_age_seconds))
            ttl = min(float(ttl), settings.max_age_seconds)
            overflow_size = max(settings.queue_size, OVERFLOW_MIN)
            self._lanes.append(Lane(sink, settings, ttl, senders, overflow_size=overflow_size))
        self._by_name = {lane.name: lane for lane in self._lanes}
        # Event ids: a per-process random prefix and a counter; unique across restarts sharing one spool.
        self._id_prefix = os.urandom(6).hex() + "-"
        self._id_counter = itertools.count(1)
        self._accepting = True
        self._running = False
        # Until start() has tried to open it, assume the spool will take the overflow (kept in memory meanwhile).
        self._spool_available = spool.enabled
        self._clients: list[httpx.AsyncClient | UpstreamTransport] = []
        self._sender_tasks: list[asyncio.Task[None]] = []
        self._keeper_tasks: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        # The parts, in the order data flows through them: spool calls, outcomes, sending, the spool's timer.
        self._bridge = SpoolBridge(inline=host)
        self._settler = Settler(self._bridge, clock, host=host)
        self._sending = Senders(
            settings, self._settler, self._bridge, host=host, request_deadline=self._request_deadline
        )
        self._keeper = Keeper(self._settler, self._bridge, host=host, tick_seconds=self._tick_seconds)

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
        return self._bridge.spool is not None

    def submit(self, event: Event) -> None:
        """Hand an event to every destination; O(#destinations) in-memory work that never blocks or raises."""
        try:
            if not self._accepting:
                error_report = event.name == ERROR_REPORT
                for lane in self._lanes:
                    if lane.error_reports == error_report:
                        lane.refused += 1
                return
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
                if not event.event_id:  # only an event a lane keeps needs an id (no destination: none is made)
                    event.event_id = f"{self._id_prefix}{next(self._id_counter):x}"
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
                    self._settler.log(logging.WARNING, "dropped an event for %s: %s", lane.name, "queue full")
        except Exception as exc:  # pragma: no cover - a bug; the request must still succeed
            log.error("dispatcher: submit failed: %s", type(exc).__name__)

    async def start(self) -> None:
        """Open and replay the spool, then start the background tasks."""
        if self._running:
            return
        self._bridge.open()
        if self.spool_settings.enabled:
            await self._open_spool()
        if self._bridge.spool is None:
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
                self._sender_tasks.append(
                    asyncio.create_task(self._sending.run(lane), name=f"dispatch-{lane.name}-{index}")
                )
            self._keeper_tasks.append(asyncio.create_task(self._keeper.run(lane), name=f"dispatch-{lane.name}-keeper"))
        if self._host and self._bridge.spool is not None:
            self._heartbeat = asyncio.create_task(self._beat(), name="dispatch-heartbeat")

    async def _open_spool(self) -> None:
        spool = Spool(self.spool_settings, host=self._host, few_trips=not self._bridge.inline)
        recovered: Mapping[str, int] = {}
        try:
            await self._bridge.run(spool.open)
            if self._host:
                recovered = await self._bridge.run(spool.recover_sending, retry=self.settings.retry_ambiguous)
            rows = spool.rows_by_destination()
            unknown = sorted(name for name in rows if name not in self._by_name)
            if unknown:
                cutoff = self._clock() - self.settings.max_age_seconds
                await self._bridge.run(spool.purge_destinations, self._by_name.keys(), cutoff)
                log.warning("spool: rows for unconfigured destinations %s are kept until they expire", unknown)
        except Exception as exc:
            # Availability first: without a spool the gateway still delivers, it only loses durability.
            log.error("spool unavailable, running without it: %s", exc)
            self._spool_available = False
            with contextlib.suppress(Exception):
                await self._bridge.run(spool.close)
            return
        self._bridge.spool = spool
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
        """Stop intake, deliver what is queued within ``shutdown_timeout``, spool the rest, close everything.

        With a spool, no request is started that would likely still be on the wire at the deadline (twice the lane's
        slowest recent request, Lane.too_late): cut off, it would count as ambiguous; spooled, it is sent once later.
        """
        self._accepting = False
        if not self._running:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        for lane in self._lanes:
            lane.draining = True
            # With a spool, what a sender does not start in time is kept and sent once later; without one it would
            # be dropped, so then every sender keeps trying (at worst ambiguous) until the deadline.
            lane.drain_deadline = deadline if self._bridge.spool is not None else math.inf
            # Items leased from the spool are safe where they are; give them back instead of sending them now.
            if lane.ready:
                self._settler.release(list(lane.ready), lane)
                lane.ready.clear()
            lane.wake_all()
            lane.keeper_wake.set()
        while loop.time() < deadline and not all(self._drained(lane, loop.time()) for lane in self._lanes):
            # Polled finer than a keeper tick (flush_interval / 4): the drain ends as soon as nothing more can go.
            await asyncio.sleep(min(self._tick_seconds, DRAIN_POLL_SECONDS, deadline - loop.time()))
        for lane in self._lanes:
            lane.keeper_exit = True
            lane.keeper_wake.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        await asyncio.gather(*self._keeper_tasks, return_exceptions=True)
        for task in self._sender_tasks:
            task.cancel()
        await asyncio.gather(*self._sender_tasks, return_exceptions=True)
        self._keeper_tasks.clear()
        self._sender_tasks.clear()
        now = self._clock()
        for lane in self._lanes:
            self._settle_cancelled_flights(lane, now)
            self._settler.flush_settling(lane)
            await self._keeper.final_spill(lane, now)
        self._running = False
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._clients.clear()
        if self._bridge.spool is not None:
            spool, self._bridge.spool = self._bridge.spool, None
            self._spool_available = False
            with contextlib.suppress(Exception):
                await self._bridge.run(spool.close)
        self._bridge.close()

    def _drained(self, lane: Lane, loop_now: float) -> bool:
        if lane.memory_empty():
            return True
        # A lane that cannot send anything before the deadline need not be waited for: its circuit is open, or a
        # request started now would not finish in time (gateway.delivery.lanes.Lane.too_late).
        if lane.inflight or lane.spilling:
            return False
        return lane.circuit == CIRCUIT_OPEN or lane.too_late(loop_now)

    def _settle_cancelled_flights(self, lane: Lane, now: float) -> None:
        for flight in list(lane.inflight):
            for item in flight.items:
                if not item.in_flight or item.state == DONE:
                    continue
                if item.sending:
                    # Cut off on the wire: the destination may have it.
                    if self.settings.retry_ambiguous:
                        item.in_flight = item.sending = False
                        lane.ambiguous_retried += 1
                        self._settler.reschedule(lane, item, now, "shutdown")
                    else:
                        self._settler.finish(lane, item, "ambiguous", "shutdown")
                else:
                    self._settler.return_item(lane, item)
        lane.inflight.clear()

    async def _beat(self) -> None:
        """Host mode: tell the request workers' metrics that this deliverer lives, and its circuits' states."""
        pid = os.getpid()
        while self._bridge.spool is not None:
            state = {
                lane.name: {"circuit_state": lane.circuit, "consecutive_failures": lane.failures}
                for lane in self._lanes
            }
            try:
                await self._bridge.run(self._bridge.spool.heartbeat, pid, state)
            except Exception as exc:
                log.error("spool: heartbeat failed: %s", type(exc).__name__)
            await asyncio.sleep(1.0)

    def stats(self) -> Mapping[str, Mapping[str, float]]:
        """Per destination: counters (monotonic within a process) and gauges (gateway.delivery.books)."""
        return lane_stats(self._lanes, self._clock(), self._spool_available)

    def check_invariant(self) -> None:
        """Raise AssertionError with details unless every lane's books balance (see the module docstring)."""
        check_lanes(self._lanes)

    def _idle(self, lane: Lane, now: float) -> bool:
        if lane.queue or lane.overflow or lane.inflight or lane.spilling:
            return False
        blocked = lane.blocked(now) or (lane.circuit == CIRCUIT_OPEN and now < lane.open_until)
        if lane.ready and not blocked:
            return False
        if lane.retry and (self._bridge.spool is not None or (lane.retry[0].next_at <= now and not blocked)):
            return False
        if self._bridge.spool is not None:
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
