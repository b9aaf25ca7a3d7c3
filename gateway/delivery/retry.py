"""Retry policy and circuit breaker: what a failed request means, when to try again, when to stop trying.

Rules (security.md §2 "Delivery guarantees"):

- Connect errors, pool and write timeouts (the request was not completely sent), ``429`` and ``5xx`` are retried
  with full-jitter backoff ``uniform(0, min(cap, base·2ⁿ))`` that honours ``Retry-After`` (RFC 9110 §10.2.3).
- A read timeout, a dropped connection after the request was written, or a hang past the request deadline are
  *ambiguous*: the destination may have counted the event.
- ``circuit_threshold`` consecutive failures open a lane's circuit for ``circuit_reset_seconds``; then a single
  probe request decides (half-open).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

import httpx

from gateway.config import DispatchSettings
from gateway.delivery.lanes import CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, Lane

__all__ = ["LogThrottle", "backoff_delay", "call", "circuit_failure", "circuit_success", "safe_reason"]

log = logging.getLogger("gateway.dispatch")

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


def safe_reason(text: str) -> str:
    """A reason for counters, logs and dead letters: one short line of harmless characters."""
    return _REASON_UNSAFE.sub("_", text).strip()[:MAX_REASON_CHARS] or "unknown"


class LogThrottle:
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


async def call(
    send: Callable[[httpx.Request], Awaitable[httpx.Response]], request: httpx.Request, deadline: float
) -> tuple[httpx.Response | None, str, bool]:
    """Send one request: (response, "", False), or (None, failure reason, whether it may have arrived).

    ``deadline``: a limit of its own on the whole request: httpx's timeouts apply per network operation (and not at
    all to a MockTransport), so a destination that trickles bytes or hangs would otherwise hold a sender forever.
    """
    try:
        async with asyncio.timeout(deadline):
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


def backoff_delay(settings: DispatchSettings, rng: random.Random, attempts: int, retry_after: float | None) -> float:
    """Seconds until the next attempt: full jitter
    (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/), at least ``Retry-After``."""
    delay = rng.uniform(0.0, min(settings.backoff_cap, settings.backoff_base * 2.0 ** (attempts - 1)))
    return max(delay, retry_after) if retry_after is not None else delay


def circuit_failure(lane: Lane, settings: DispatchSettings, now: float, reason: str) -> None:
    lane.failures += 1
    if lane.circuit == CIRCUIT_HALF_OPEN or (
        lane.circuit == CIRCUIT_CLOSED and lane.failures >= settings.circuit_threshold
    ):
        lane.circuit = CIRCUIT_OPEN
        lane.open_until = now + settings.circuit_reset_seconds
        log.warning("circuit for %s opened: %s", lane.name, safe_reason(reason))
        lane.keeper_wake.set()  # spool the queue now


def circuit_success(lane: Lane) -> None:
    lane.failures = 0
    if lane.circuit != CIRCUIT_CLOSED:
        lane.circuit = CIRCUIT_CLOSED
        log.info("circuit for %s closed", lane.name)
        lane.wake_all()
