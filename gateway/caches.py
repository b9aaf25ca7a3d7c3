"""Bounded in-memory caches for the request path: plain dicts with first-in, first-out eviction.

Dicts keep insertion order, so the oldest entry is ``next(iter(cache))``: no per-entry bookkeeping, one extra
lookup only when the cache is full, and a flood of unique keys (client-controlled headers) cannot grow memory.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

__all__ = ["remember"]

_K = TypeVar("_K")
_V = TypeVar("_V")


def remember(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """``cache[key] = value``, first evicting the oldest entry when the cache already holds ``limit`` entries."""
    if len(cache) >= limit:
        with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # changed by another thread meanwhile
            del cache[next(iter(cache))]
    cache[key] = value
