"""Outcomes: how a payload leaves a lane (delivered, dropped, dead-lettered, ambiguous) or goes back to wait.

:class:`Settler` is the one place that counts an item's outcome in its lane's books and tells the spool: the senders
(:mod:`gateway.delivery.senders`), the keeper (:mod:`gateway.delivery.keeper`) and the dispatcher's shutdown all
settle through it, so an item is counted exactly once wherever it ends. In host mode (the deliverer) a settled row is
deleted and counted in the host books in one commit, batched per turn of the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
from collections.abc import Callable, Iterable
from typing import Any

from gateway.delivery.lanes import DONE, MEM, RELEASING, SPILLING, SPOOLED, Item, Lane
from gateway.delivery.retry import LogThrottle, safe_reason
from gateway.delivery.spool_bridge import SpoolBridge
from gateway.events import Event
from gateway.sinks import PolicyDrop
from gateway.spool import DeadLetter

__all__ = ["Settler"]


def _never(lane: Lane) -> bool:
    return False


class Settler:
    def __init__(self, bridge: SpoolBridge, clock: Callable[[], float], *, host: bool) -> None:
        self.bridge = bridge
        self.clock = clock
        self.host = host
        self.log = LogThrottle()
        # Host mode: whether a commit that marks this lane's next request is already on its way this turn (the senders
        # set it); it takes the lane's settled rows along, one commit instead of two.
        self.commit_pending: Callable[[Lane], bool] = _never

    def fire(self, lane: Lane, func: Callable[..., object], *args: Any) -> None:
        """A spool call whose effect on the books was already applied, without waiting for it."""
        if not self.bridge.ready:
            return
        lane.spool_version += 1
        self.bridge.fire(func, *args)

    def finish(self, lane: Lane, item: Item, outcome: str, reason: str = "") -> None:
        """Count an item's final outcome and forget it (its spool row, if any, is deleted or dead-lettered)."""
        if item.state == DONE:  # pragma: no cover - a bug
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
        had_row = item.state in (SPOOLED, SPILLING, RELEASING)
        if item.state == SPOOLED:
            lane.spool_rows -= 1
        else:
            lane.mem_pending -= 1
        item.state = DONE
        item.in_flight = False
        spool = self.bridge.spool
        if spool is None:
            return
        if outcome == "dead_lettered":
            letter = DeadLetter(
                item.payload.event_id, lane.name, reason, item.payload, item.accepted_at, item.attempts, self.clock()
            )
            self.fire(lane, spool.dead_letter, [letter])
        elif had_row and self.host:
            # Deleted and counted in one commit, for every row settled in this turn of the loop together.
            key = f"dropped_policy:{reason}" if outcome == "dropped_policy" else outcome
            if not lane.settling:
                asyncio.get_running_loop().call_soon(self.flush_settling, lane)
            lane.settling.setdefault(key, []).append(item.payload.event_id)
        elif had_row:
            # For a SPILLING item this runs after its insert: the spool thread keeps submission order.
            self.fire(lane, spool.delete, lane.name, [item.payload.event_id])

    def flush_settling(self, lane: Lane) -> None:
        if lane.settling and self.bridge.spool is not None and not self.commit_pending(lane):
            batch, lane.settling = lane.settling, {}
            self.fire(lane, self.bridge.spool.settle, lane.name, batch)

    def dead_letter_unbuilt(self, lane: Lane, event: Event, reason: str) -> None:
        lane.dead_lettered += 1
        self.log(logging.WARNING, "dead-lettered an event for %s: %s", lane.name, reason)
        if self.bridge.spool is not None:
            letter = DeadLetter(event.event_id, lane.name, reason, None, event.timestamp, 0, self.clock())
            self.fire(lane, self.bridge.spool.dead_letter, [letter])

    def reschedule(self, lane: Lane, item: Item, next_at: float, error: str, *, retried: int = 0) -> None:
        """Keep an item pending until ``next_at``: in the retry heap, or as an unleased spool row."""
        item.next_at = next_at
        item.last_error = error
        item.in_flight = False
        if item.state == MEM:
            if len(lane.retry) < lane.queue_size or self.bridge.spool is not None:
                heapq.heappush(lane.retry, item)
            else:
                self.finish(lane, item, "dropped_overflow", "retry queue full")
        elif item.state == SPOOLED:
            self.release([item], lane, retried)
        elif item.state == SPILLING:
            item.state = RELEASING
            self.release([item], lane, retried)

    def return_item(self, lane: Lane, item: Item) -> None:
        """An item that was taken but not sent goes back where it came from, without counting an attempt."""
        self.reschedule(lane, item, item.next_at, item.last_error)

    def release(self, items: list[Item], lane: Lane, retried: int = 0) -> None:
        if self.bridge.spool is not None:
            self.fire(lane, self.bridge.spool.release, [item.row() for item in items], retried)

    def build(self, lane: Lane, event: Event, now: float, born_tick: int = 0) -> Item | None:
        try:
            payload = lane.sink.build(event)
        except PolicyDrop as drop:
            reason = safe_reason(drop.reason)
            lane.dropped_policy[reason] = lane.dropped_policy.get(reason, 0) + 1
            return None
        except Exception as exc:
            self.dead_letter_unbuilt(lane, event, f"internal:{type(exc).__name__}")
            return None
        if payload.event_id != event.event_id or payload.destination != lane.name:
            payload = dataclasses.replace(payload, event_id=event.event_id, destination=lane.name)
        lane.mem_pending += 1
        return Item(payload, event.timestamp, born_tick=born_tick)

    def expired(self, lane: Lane, item: Item, now: float) -> bool:
        if now - item.accepted_at > lane.ttl:
            self.finish(lane, item, "dropped_expired")
            return True
        return False

    def dead_letter(self, lane: Lane, items: Iterable[Item], reason: str) -> None:
        self.log(logging.WARNING, "dead-lettered an event for %s: %s", lane.name, reason)
        for item in items:
            if item.state != DONE:
                self.finish(lane, item, "dead_lettered", reason)
