"""Delivery across processes: request workers hand off, one deliverer per host sends and keeps the books.

Data flow (imports follow it, never the other way)::

    request side                 handoff                        delivery
    middleware / beacon  ->  handoff.Handoff.submit  ->  host spool (SQLite)  ->  deliverer.run_deliverer
                             (memory, then a batch         payloads + books        (Dispatcher in host mode:
                              write every few ms)                                   lease, send, settle, count)

- :mod:`gateway.delivery.handoff`: what a request worker runs instead of an in-process dispatcher.
- :mod:`gateway.delivery.books`: the host's counters, kept in the spool in the same commits as the rows.
- :mod:`gateway.delivery.deliverer`: the ``gateway deliver`` process and its supervisor in ``gateway serve``.

``dispatch.mode = "in_process"`` (the default) keeps everything in one process
(:class:`gateway.delivery.dispatcher.Dispatcher`).
"""

from __future__ import annotations

from typing import Protocol

from gateway.events import Event
from gateway.sinks import Sink

__all__ = ["Delivery"]


class Delivery(Protocol):
    """What the request side needs from delivery: the in-process Dispatcher and the Handoff both are one."""

    @property
    def sinks(self) -> tuple[Sink, ...]: ...

    def submit(self, event: Event) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
