"""Request side of deliverer mode: events go to the host spool in small batches, never over the network.

:meth:`Handoff.submit` is the only code on the request path: one ``deque.append``. A background thread wakes every
``dispatch.handoff_interval`` seconds, takes what was buffered, applies each destination's policy with the sinks'
own ``build`` (so only filtered payloads, never a raw event, rest on disk: no full address, no unscrubbed URL) and
writes the payloads plus their books in one SQLite commit (:meth:`gateway.spool.Spool.hand_off`). The deliverer
process (``gateway deliver``) sends them; see :mod:`gateway.delivery`.

What a request worker can lose: a worker killed with SIGKILL loses the events of its last interval that were not yet
written (they were never counted as accepted, so the books still balance). A clean stop writes everything.
Events beyond ``dispatch.queue_size`` waiting in memory (the disk stalled for that long) are dropped and counted
as ``dropped_overflow`` with the next write.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from gateway.config import Settings
from gateway.delivery.retry import safe_reason
from gateway.events import ERROR_REPORT, Event
from gateway.sinks import PolicyDrop, Sink
from gateway.spool import Spool, SpoolRow

__all__ = ["Handoff"]

log = logging.getLogger("gateway.handoff")


class Handoff:
    """Stands in for the in-process :class:`~gateway.delivery.dispatcher.Dispatcher` in a request worker.

    ``worker`` labels this process's own counters (:meth:`stats`); by default :meth:`start` claims the first free
    worker slot of the host (a lock file next to the spool), so a restarted worker gets its number back whatever
    server started it (``gateway serve``, gunicorn, ...).
    """

    def __init__(self, sinks: Sequence[Sink], settings: Settings, *, worker: str = "") -> None:
        self._sinks = list(sinks)
        self._requires = [frozenset(sink.requires) for sink in self._sinks]
        self._error_lanes = [getattr(sink, "kind", "") == "sentry" for sink in self._sinks]
        self._spool = Spool(settings.spool, host=True, owner=False)
        self._interval = settings.dispatch.handoff_interval
        self._limit = settings.dispatch.queue_size
        self.worker = worker
        self._buffer: deque[Event] = deque()
        self._retry: list[Event] = []  # built but not written (the disk refused): tried again next interval
        self._id_prefix = os.urandom(6).hex() + "-"
        self._ids = itertools.count(1)
        self._accepting = True
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._slot: IO[bytes] | None = None
        # This worker's own counters (the host's books are in the spool).
        self.handed_off = 0
        self.refused = 0
        self.write_errors = 0
        self._dropped_analytics = 0  # buffer full: counted in the books with the next write
        self._dropped_errors = 0

    def __repr__(self) -> str:
        return f"Handoff(path={os.fspath(self._spool.path)!r}, worker={self.worker!r})"

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return tuple(self._sinks)

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(sink.name for sink in self._sinks)

    # hot path ---------------------------------------------------------------------------------------------------

    def submit(self, event: Event) -> None:
        """Buffer an event for the next write; never blocks, never raises."""
        if not self._accepting:
            self.refused += 1
            return
        if len(self._buffer) < self._limit:
            self._buffer.append(event)
        elif event.name == ERROR_REPORT:
            self._dropped_errors += 1
        else:
            self._dropped_analytics += 1

    # lifecycle --------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._writer is not None:
            return
        await asyncio.to_thread(self._spool.open)
        if not self.worker:
            self.worker = self._claim_slot()
        self._stop.clear()
        self._accepting = True
        self._writer = threading.Thread(target=self._run, name="gateway-handoff", daemon=True)
        self._writer.start()

    async def stop(self) -> None:
        """Write everything buffered, then close."""
        self._accepting = False
        thread, self._writer = self._writer, None
        if thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(thread.join)
        await asyncio.to_thread(self._spool.close)
        if self._slot is not None:
            self._slot.close()  # releases the slot's flock
            self._slot = None

    def _claim_slot(self, slots: int = 256) -> str:
        base = os.fspath(self._spool.path)
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        for slot in range(slots):
            lock = open(f"{base}.worker{slot}.lock", "ab")  # noqa: SIM115 - held for the worker's lifetime
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self._slot = lock
            return str(slot)
        with contextlib.suppress(Exception):
            log.warning("handoff: no free worker slot among %d; labelling by process id", slots)
        return f"pid{os.getpid()}"

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._write_logged()
        self._write_logged()  # the last events, after intake stopped
        if self._retry:
            log.error("handoff: %d events could not be written to the spool at shutdown", len(self._retry))

    # off the request path -----------------------------------------------------------------------------------------

    def _write_logged(self) -> None:
        try:
            self._write()
        except Exception as exc:  # a bug: the writer must outlive it, or events would pile up unwritten
            log.error("handoff: write failed: %s", type(exc).__name__)

    def _write(self) -> None:
        events = self._retry
        self._retry = []
        buffer = self._buffer
        while buffer:
            events.append(buffer.popleft())
        dropped_analytics, self._dropped_analytics = self._dropped_analytics, 0
        dropped_errors, self._dropped_errors = self._dropped_errors, 0
        if not events and not dropped_analytics and not dropped_errors:
            return
        rows, counts = self._build(events)
        for index, sink in enumerate(self._sinks):
            dropped = dropped_errors if self._error_lanes[index] else dropped_analytics
            if dropped:
                lane = counts.setdefault(sink.name, {})
                lane["accepted"] = lane.get("accepted", 0) + dropped
                lane["dropped_overflow"] = lane.get("dropped_overflow", 0) + dropped
        try:
            self._spool.hand_off(rows, counts)
        except Exception as exc:  # locked for longer than the busy timeout, disk full: keep them, try again
            self.write_errors += 1
            log.error("handoff: cannot write to the spool: %s", type(exc).__name__)
            keep = self._limit
            self._retry = events[:keep]
            lost = len(events) - len(self._retry)
            self._dropped_analytics += dropped_analytics + sum(1 for e in events[keep:] if e.name != ERROR_REPORT)
            self._dropped_errors += dropped_errors + sum(1 for e in events[keep:] if e.name == ERROR_REPORT)
            if lost:
                log.error("handoff: %d events dropped while the spool is unavailable", lost)
            return
        self.handed_off += len(events)

    def _build(self, events: list[Event]) -> tuple[list[SpoolRow], dict[str, dict[str, int]]]:
        rows: list[SpoolRow] = []
        counts: dict[str, dict[str, int]] = {sink.name: {} for sink in self._sinks}
        for event in events:
            if not event.event_id:
                event.event_id = f"{self._id_prefix}{next(self._ids):x}"
            error_report = event.name == ERROR_REPORT
            granted = event.granted
            for index, sink in enumerate(self._sinks):
                if self._error_lanes[index] != error_report:
                    continue
                lane = counts[sink.name]
                lane["accepted"] = lane.get("accepted", 0) + 1
                requires = self._requires[index]
                if requires and not requires <= granted:
                    lane["dropped_policy:consent"] = lane.get("dropped_policy:consent", 0) + 1
                    continue
                try:
                    payload = sink.build(event)
                except PolicyDrop as drop:
                    key = f"dropped_policy:{safe_reason(drop.reason)}"
                    lane[key] = lane.get(key, 0) + 1
                    continue
                except Exception as exc:
                    log.warning("handoff: cannot build an event for %s: %s", sink.name, type(exc).__name__)
                    lane["dead_lettered"] = lane.get("dead_lettered", 0) + 1
                    continue
                if payload.event_id != event.event_id or payload.destination != sink.name:
                    payload = dataclasses.replace(payload, event_id=event.event_id, destination=sink.name)
                rows.append(SpoolRow(payload, event.timestamp, 0, event.timestamp))
        return rows, counts

    def stats(self) -> Mapping[str, float]:
        """This worker's own counters."""
        return {
            "handed_off": self.handed_off,
            "buffered": len(self._buffer) + len(self._retry),
            "refused": self.refused,
            "write_errors": self.write_errors,
        }
