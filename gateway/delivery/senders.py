"""Senders: each lane's tasks that take work, turn payloads into requests, send them and apply the verdict.

``max_connections // #destinations`` senders per lane (at least one) take ready spool rows, due retries and queued
events (built here, off the request path), group equal non-empty ``batch_key``\\ s into one request of at most
``sink.max_batch`` payloads, send it through the lane's transport and settle each payload by the verdict
(:mod:`gateway.delivery.retry` says what a failure means). In host mode a request's rows are marked as on the wire,
durably, before it is sent.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random

from gateway.config import DispatchSettings
from gateway.delivery.lanes import CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, DONE, Flight, Item, Lane
from gateway.delivery.retry import backoff_delay, call, circuit_failure, circuit_success, safe_reason
from gateway.delivery.settle import Settler
from gateway.delivery.spool_bridge import SendingMarks, SpoolBridge
from gateway.policy import parse_retry_after
from gateway.sinks import Outcome

__all__ = ["Senders"]

log = logging.getLogger("gateway.dispatch")


class Senders:
    """The sending side of every lane (run one :meth:`run` task per sender)."""

    def __init__(
        self, settings: DispatchSettings, settle: Settler, bridge: SpoolBridge, *, host: bool, request_deadline: float
    ) -> None:
        self.settings = settings
        self.settle = settle
        self.bridge = bridge
        self.host = host
        self.request_deadline = request_deadline
        self.random = random.Random()
        self.marks = SendingMarks(bridge)
        settle.commit_pending = self.marks.pending_for

    async def run(self, lane: Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            flight = self.take(lane)
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
                await self.fly(lane, flight)
            except Exception as exc:  # pragma: no cover - a bug; never let it kill the sender
                log.error("%s: sender error: %s", lane.name, type(exc).__name__)
                for item in flight.items:
                    if item.in_flight and item.state != DONE:
                        self.settle.finish(lane, item, "dead_lettered", f"internal:{type(exc).__name__}")
            lane.inflight.discard(flight)
            if lane.draining and lane.memory_empty():
                lane.keeper_wake.set()
            elif self.host and len(lane.ready) < lane.ready_low:
                lane.keeper_wake.set()  # lease the next rows now rather than at the next tick

    def take(self, lane: Lane) -> Flight | None:
        if lane.draining and lane.too_late(asyncio.get_running_loop().time()):
            return None  # what is left is spooled by stop()
        now = self.settle.clock()
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
        items: list[Item] = []
        ready = lane.ready
        while ready and len(items) < limit:
            item = ready.popleft()
            if not self.settle.expired(lane, item, now):
                items.append(item)
        retry = lane.retry
        while retry and retry[0].next_at <= now and len(items) < limit:
            item = heapq.heappop(retry)
            if not self.settle.expired(lane, item, now):
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
            built = self.settle.build(lane, event, now, label)
            if built is not None and not self.settle.expired(lane, built, now):
                items.append(built)
        if not items:
            return None
        if probe:
            lane.probing = True
        for item in items:
            item.in_flight = True
        flight = Flight(items, probe)
        lane.inflight.add(flight)
        return flight

    async def fly(self, lane: Lane, flight: Flight) -> None:
        groups: list[list[Item]] = []
        if lane.max_batch > 1:
            keyed: dict[str, list[Item]] = {}
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
                            if item.in_flight and item.state != DONE:
                                self.settle.return_item(lane, item)
                    break
                await self.send(lane, [item for item in group if item.in_flight and item.state != DONE])
        finally:
            if flight.probe:
                lane.probing = False
                if lane.circuit == CIRCUIT_CLOSED:
                    lane.wake_all()

    async def send(self, lane: Lane, group: list[Item]) -> None:
        now = self.settle.clock()
        items = [item for item in group if not self.settle.expired(lane, item, now)]
        if not items:
            return
        loop = asyncio.get_running_loop()
        if lane.draining and lane.too_late(loop.time()):
            # A flight's later groups: the drain deadline came too close while the earlier ones were sent.
            for item in items:
                self.settle.return_item(lane, item)
            return
        sink = lane.sink
        try:
            request = sink.request([item.payload for item in items])
        except Exception as exc:
            self.settle.dead_letter(lane, items, f"internal:{type(exc).__name__}")
            return
        if self.host and self.bridge.spool is not None:
            # Durably "on the wire" before it is: a deliverer killed now counts it as ambiguous at its next start
            # instead of sending it twice.
            try:
                await self.marks.mark(lane, [item.payload.event_id for item in items])
            except Exception:
                if lane.settling:
                    asyncio.get_running_loop().call_soon(self.settle.flush_settling, lane)
                for item in items:
                    if item.in_flight and item.state != DONE:
                        self.settle.return_item(lane, item)
                return
        for item in items:
            item.attempts += 1
            item.sending = True
        # On cancellation (shutdown) `sending` stays set: stop() then knows the request may have been sent.
        assert lane.send is not None
        started = loop.time()
        response, failure, ambiguous = await call(lane.send, request, self.request_deadline)
        lane.latencies.append(loop.time() - started)
        for item in items:
            item.sending = False
        now = self.settle.clock()
        if response is None:
            if failure.startswith(("transport:", "internal:")):
                self.settle.dead_letter(lane, items, failure)
                return
            circuit_failure(lane, self.settings, now, failure)
            if ambiguous and not self.settings.retry_ambiguous:
                self.settle.log(logging.WARNING, "delivery to %s may have failed: %s", lane.name, failure)
                for item in items:
                    self.settle.finish(lane, item, "ambiguous", failure)
                return
            if ambiguous:
                lane.ambiguous_retried += len(items)
            self.retry(lane, items, now, failure, None)
            return
        try:
            verdict = sink.classify(response)
        except Exception as exc:
            self.settle.dead_letter(lane, items, f"internal:{type(exc).__name__}")
            return
        outcome = verdict.outcome
        if outcome is Outcome.RETRY:
            retry_after = verdict.retry_after
            if retry_after is None:
                retry_after = parse_retry_after(response.headers.get("retry-after"), now=now)
            reason = safe_reason(verdict.reason or f"http {response.status_code}")
            circuit_failure(lane, self.settings, now, reason)
            if retry_after is not None and retry_after > 0:
                lane.paused_until = max(lane.paused_until, now + min(retry_after, self.settings.backoff_cap))
            self.retry(lane, items, now, reason, retry_after)
            return
        circuit_success(lane)
        if outcome is Outcome.DELIVERED:
            for item in items:
                self.settle.finish(lane, item, "delivered")
        elif outcome is Outcome.DROPPED_BY_DESTINATION:
            for item in items:
                self.settle.finish(lane, item, "dropped_destination")
        else:
            self.settle.dead_letter(lane, items, safe_reason(verdict.reason or f"http {response.status_code}"))

    def retry(self, lane: Lane, items: list[Item], now: float, reason: str, retry_after: float | None) -> None:
        s = self.settings
        self.settle.log(logging.INFO, "delivery to %s failed, will retry: %s", lane.name, reason)
        for item in items:
            if item.attempts >= s.max_attempts:
                self.settle.finish(lane, item, "dead_lettered", f"retries exhausted: {reason}")
                continue
            next_at = now + backoff_delay(s, self.random, item.attempts, retry_after)
            if next_at - item.accepted_at > lane.ttl:
                self.settle.finish(lane, item, "dropped_expired")
                continue
            lane.retried += 1
            self.settle.reschedule(lane, item, next_at, reason, retried=1)
