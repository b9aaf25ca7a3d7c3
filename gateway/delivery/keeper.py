"""The keeper: each lane's timer task, the bridge between memory and the spool.

One keeper per lane ticks every ``flush_interval / 4``: it writes overflow, queued events that waited too long,
retries and long in-flight batches to the spool, purges expired rows, loads due rows from the spool, and wakes
senders (see :mod:`gateway.delivery.dispatcher` for the durability and memory bounds this gives). In host mode (the
deliverer) memory holds nothing of its own: the keeper only leases the rows the request workers wrote, every tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging

from gateway.delivery.lanes import (
    BUILD_CHUNK,
    CIRCUIT_HALF_OPEN,
    CIRCUIT_OPEN,
    DONE,
    MEM,
    PURGE_EVERY_SECONDS,
    RELEASING,
    SPILL_AGE_TICKS,
    SPILL_CHUNK,
    SPILLING,
    SPOOLED,
    Item,
    Lane,
)  # fmt: skip
from gateway.delivery.settle import Settler
from gateway.delivery.spool_bridge import MaintainResult, SpoolBridge, maintain_op
from gateway.events import Event
from gateway.spool import PutResult, SpoolSummary

__all__ = ["Keeper"]

log = logging.getLogger("gateway.dispatch")


class Keeper:
    def __init__(self, settle: Settler, bridge: SpoolBridge, *, host: bool, tick_seconds: float) -> None:
        self.settle = settle
        self.bridge = bridge
        self.host = host
        self.tick_seconds = tick_seconds

    async def run(self, lane: Lane) -> None:
        while not lane.keeper_exit:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_seconds):
                    await lane.keeper_wake.wait()
            lane.keeper_wake.clear()
            if lane.keeper_exit:
                return
            try:
                await self.maintain(lane)
            except Exception as exc:  # a bug or a broken spool: keep going, the next tick tries again
                log.error("%s: keeper error: %s", lane.name, type(exc).__name__)

    def wake_if_work(self, lane: Lane, now: float) -> None:
        if lane.circuit == CIRCUIT_OPEN and now >= lane.open_until:
            lane.wake()  # one sender becomes the half-open probe
        if lane.blocked(now):
            return
        work = len(lane.ready) + len(lane.queue)
        if lane.retry and lane.retry[0].next_at <= now:
            work += 1
        if work:
            lane.wake(work)

    async def maintain(self, lane: Lane) -> None:
        now = self.settle.clock()
        lane.tick += 1
        lane.checkpoints.append(lane.enqueued)
        self.wake_if_work(lane, now)
        if self.bridge.spool is None:
            return
        # In flight for long, or retried and taken again before a tick could spool it: spool it (leased) now.
        old = lane.tick - SPILL_AGE_TICKS
        leased = [
            item
            for flight in lane.inflight
            for item in flight.items
            if item.in_flight and item.state == MEM and item.born_tick <= old
        ]
        if lane.ready and (lane.circuit == CIRCUIT_OPEN or lane.paused_until > now):
            # Leased rows wait for the circuit in the spool, where the TTL purge can reach them.
            self.settle.release(list(lane.ready), lane)
            lane.ready.clear()
        items: list[Item] = []
        while lane.retry:
            item = heapq.heappop(lane.retry)
            if not self.settle.expired(lane, item, now):
                items.append(item)
        # Unhealthy or shutting down: everything queued goes to the spool. Otherwise the events labelled
        # <= tick - SPILL_AGE_TICKS, i.e. enqueued before the checkpoint taken SPILL_AGE_TICKS - 1 ticks ago.
        if lane.unhealthy(now) or (lane.draining and lane.blocked(now)):
            spill_queue = len(lane.queue)
        elif len(lane.checkpoints) >= SPILL_AGE_TICKS:
            spill_queue = min(len(lane.queue), max(0, lane.checkpoints[-SPILL_AGE_TICKS] - lane.dequeued))
        else:
            spill_queue = 0
        # A long backlog is written in chunks of SPILL_CHUNK events, each built right before its commit: memory then
        # holds one chunk of built payloads (and their encodings) at a time rather than the whole backlog's.
        backlog = len(lane.overflow) + spill_queue
        events, taken = self._take_chunk(lane, spill_queue)
        spill_queue -= taken
        written = len(events)
        await self._build_into(lane, events, items, now)
        purge = now - lane.last_purge >= PURGE_EVERY_SECONDS or (
            lane.spool_oldest is not None and now - lane.spool_oldest > lane.ttl
        )
        load = 0
        if self.host:
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
        stale = lane.summary_version != lane.spool_version or self.host
        if items or leased or purge or load or stale:
            await self.spill(lane, items, leased, now, purge=purge, load=load, final=False)
        while written < backlog and not lane.keeper_exit:
            events, taken = self._take_chunk(lane, spill_queue)
            if not events:
                break
            spill_queue -= taken
            written += len(events)
            chunk: list[Item] = []
            await self._build_into(lane, events, chunk, now)
            await self.spill(lane, chunk, [], now, purge=False, load=0, final=False)

    @staticmethod
    def _take_chunk(lane: Lane, from_queue: int) -> tuple[list[Event], int]:
        """Up to SPILL_CHUNK events to spool: overflow first, then at most ``from_queue`` of the oldest queued
        (and how many of those)."""
        events: list[Event] = []
        overflow = lane.overflow
        while overflow and len(events) < SPILL_CHUNK:
            events.append(overflow.popleft())
        taken = min(from_queue, len(lane.queue), SPILL_CHUNK - len(events))
        for _ in range(taken):
            events.append(lane.queue.popleft())
        lane.dequeued += taken
        return events, taken

    async def _build_into(self, lane: Lane, events: list[Event], items: list[Item], now: float) -> None:
        # Register the batch before building, so the books can see its items while the build yields.
        lane.spilling.append(items)
        try:
            for index, event in enumerate(events):
                built = self.settle.build(lane, event, now)
                if built is not None:
                    items.append(built)
                if index % BUILD_CHUNK == BUILD_CHUNK - 1:
                    await asyncio.sleep(0)
        finally:
            lane.spilling.remove(items)

    async def spill(
        self, lane: Lane, items: list[Item], leased: list[Item], now: float, *, purge: bool, load: int, final: bool
    ) -> None:
        """One trip to the spool thread: purge, insert ``items`` (and ``leased`` in-flight items), lease due rows."""
        spool = self.bridge.spool
        assert spool is not None
        batch = items + leased
        for item in batch:
            item.state = SPILLING
        lane.spilling.append(batch)
        lane.spool_version += 1
        version = lane.spool_version
        if purge:
            lane.last_purge = now
        try:
            result = await self.bridge.run(
                maintain_op,
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
            result = MaintainResult(
                0, PutResult(rejected=tuple(item.payload.event_id for item in batch)), [], SpoolSummary(0, None, None)
            )
            version = lane.summary_version
        finally:
            lane.spilling.remove(batch)
        if result.purged:
            lane.dropped_expired += result.purged
            lane.spool_rows -= result.purged
        self.apply_put(lane, batch, result.put, final)
        loaded = result.loaded
        if lane.max_batch > 1 and len(loaded) > 1:
            # Rows come earliest first; a stable sort by batch key puts each client's rows next to each other, so
            # senders fill requests (GA4: up to 25 events of one client) with what one lease brought.
            loaded = sorted(loaded, key=lambda row: row.payload.batch_key)
        for row in loaded:
            lane.ready.append(
                Item(
                    row.payload,
                    row.accepted_at,
                    attempts=row.attempts,
                    next_at=row.next_at,
                    last_error=row.last_error,
                    state=SPOOLED,
                )
            )
        if lane.summary_version <= version:
            lane.summary_version = version
            lane.spool_oldest = result.summary.oldest_accepted_at
            lane.spool_next_due = result.summary.next_due
            if self.host:
                lane.spool_rows = result.summary.rows
        if result.loaded:
            self.wake_if_work(lane, self.settle.clock())

    def apply_put(self, lane: Lane, batch: list[Item], put: PutResult, final: bool) -> None:
        inserted = set(put.inserted)
        duplicates = set(put.duplicates)
        invalid = set(put.invalid)
        for item in batch:
            event_id = item.payload.event_id
            state = item.state
            if event_id in inserted:
                if state in (SPILLING, RELEASING):
                    item.state = SPOOLED
                    lane.mem_pending -= 1
                    lane.spool_rows += 1
                # DONE: finished while its insert was pending; the delete queued behind it removed the row.
                continue
            if state == DONE:
                continue
            item.state = MEM
            if item.in_flight:
                continue  # still being sent from memory
            if event_id in duplicates:
                self.settle.finish(lane, item, "dropped_policy", "duplicate")
            elif final:
                self.settle.finish(
                    lane, item, "dropped_overflow", "spool unavailable" if event_id in invalid else "spool full"
                )
            elif event_id not in invalid and len(lane.retry) >= lane.queue_size:
                self.settle.finish(lane, item, "dropped_overflow", "spool full")
            else:
                heapq.heappush(lane.retry, item)
        if put.rejected:
            self.settle.log(logging.WARNING, "spool refused payloads for %s: %s", lane.name, "spool full or failing")

    async def final_spill(self, lane: Lane, now: float) -> None:
        events = [*lane.queue, *lane.overflow]
        lane.dequeued += len(lane.queue)
        lane.queue.clear()
        lane.overflow.clear()
        items: list[Item] = []
        for event in events:
            built = self.settle.build(lane, event, now)
            if built is not None and not self.settle.expired(lane, built, now):
                items.append(built)
        while lane.retry:
            item = heapq.heappop(lane.retry)
            if not self.settle.expired(lane, item, now):
                items.append(item)
        if not items:
            return
        if self.bridge.spool is None:
            for item in items:
                self.settle.finish(lane, item, "dropped_overflow", "shutdown")
            log.warning("%s: %d events still queued at shutdown were dropped (no spool)", lane.name, len(items))
            return
        await self.spill(lane, items, [], now, purge=False, load=0, final=True)
