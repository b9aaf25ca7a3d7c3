"""The bridge between the event loop and the SQLite spool: where spool calls run, and the keeper's one round trip.

The in-process dispatcher shares its loop with page requests, so every spool call runs on one dedicated thread
(calls run in the order they were submitted, and SQLite never blocks a page). The deliverer (host mode) runs them
inline: nothing else waits on its loop, and a local SQLite commit (~20 µs) costs less CPU than the two thread hops
around it (measured with benchmarks/bench_handoff.py). The thread shares the GIL with a loop that may be saturated,
so each trip into SQLite can cost it up to the 5 ms switch interval: the spool opened for it makes a constant number
of trips per call (``Spool(few_trips=True)``), and the keeper's round trip is one transaction (docs/delivery.md,
"The spool thread and the GIL").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.delivery.lanes import Lane
from gateway.spool import PutResult, Spool, SpoolRow, SpoolSummary

__all__ = ["MaintainResult", "SendingMarks", "SpoolBridge", "maintain_op"]

log = logging.getLogger("gateway.dispatch")

_T = TypeVar("_T")


class SpoolBridge:
    """Runs spool calls for the dispatcher; ``spool`` is None until it is open (and without a spool)."""

    def __init__(self, *, inline: bool) -> None:
        self.inline = inline
        self.spool: Spool | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def open(self) -> None:
        if not self.inline and self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-spool")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def run(self, func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a spool call and wait for its result."""
        if self.inline:
            return func(*args, **kwargs)
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: func(*args, **kwargs))

    @property
    def ready(self) -> bool:
        """A spool is open and calls can run."""
        return self.spool is not None and (self.inline or self._executor is not None)

    def fire(self, func: Callable[..., object], *args: Any) -> bool:
        """Submit a spool call without waiting (its effect on the books was already applied); False: no spool."""
        if not self.ready:
            return False
        if self.inline:
            try:
                func(*args)
            except Exception as exc:
                log.error("spool operation failed: %s", type(exc).__name__)
            return True
        assert self._executor is not None
        future = self._executor.submit(func, *args)
        future.add_done_callback(_log_spool_failure)
        return True


class SendingMarks:
    """Host mode: rows about to go on the wire, marked durably before they are, for every sender in one commit.

    A sender waits for the commit that marks its request's rows; all senders that reach that point in the same turn
    of the event loop share one commit (on a busy deliverer, responses arrive together and so do the next requests),
    and each lane's rows settled since the last commit go in it too. A commit costs ~40 µs of CPU whatever it holds.
    """

    def __init__(self, bridge: SpoolBridge) -> None:
        self.bridge = bridge
        self._waiting: list[tuple[Lane, list[str], asyncio.Future[None]]] = []

    def pending_for(self, lane: Lane) -> bool:
        """A commit for this lane is on its way in this turn of the loop."""
        return any(waiting is lane for waiting, _, _ in self._waiting)

    async def mark(self, lane: Lane, event_ids: list[str]) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._commit)
        self._waiting.append((lane, event_ids, future))
        await future

    def _commit(self) -> None:
        waiting, self._waiting = self._waiting, []
        lanes: dict[str, Lane] = {}
        marks: dict[str, tuple[list[str], dict[str, list[str]]]] = {}
        for lane, event_ids, _ in waiting:
            marked, settled = marks.setdefault(lane.name, ([], {}))
            marked.extend(event_ids)
            if lane.settling:
                for outcome, settled_ids in lane.settling.items():
                    settled.setdefault(outcome, []).extend(settled_ids)
                lane.settling = {}
                lane.spool_version += 1
            lanes[lane.name] = lane
        spool = self.bridge.spool
        try:
            if spool is None:
                raise RuntimeError("the spool is closed")
            spool.mark_sending_many(marks)
        except Exception as exc:
            log.error("spool: marking rows as sent failed: %s", type(exc).__name__)
            for name, (_, settled) in marks.items():  # not written: they settle with the next commit
                lane = lanes[name]
                for outcome, settled_ids in settled.items():
                    lane.settling.setdefault(outcome, []).extend(settled_ids)
            for _, _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, _, future in waiting:
            if not future.done():
                future.set_result(None)


def _log_spool_failure(future: concurrent.futures.Future[Any]) -> None:
    exc = future.exception() if not future.cancelled() else None
    if exc is not None:
        log.error("spool operation failed: %s", type(exc).__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class MaintainResult:
    purged: int
    put: PutResult
    loaded: list[SpoolRow]
    summary: SpoolSummary


def maintain_op(
    spool: Spool,
    destination: str,
    *,
    purge_before: float | None,
    rows: list[SpoolRow],
    leased_rows: list[SpoolRow],
    now: float,
    load: int,
    batch: int = 1,
) -> MaintainResult:
    # One transaction for the whole trip (Spool.batch: each statement is a GIL round trip on this thread).
    # Order matters: purge first, so rows inserted by this very call are never purged before the caller has
    # seen that they were inserted.
    with spool.batch():
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
        summary = spool.summary(destination)
    return MaintainResult(purged, put, loaded, summary)
