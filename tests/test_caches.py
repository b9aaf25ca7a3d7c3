from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.caches import remember


def test_remember_evicts_the_oldest_entry_first() -> None:
    cache: dict[str, int] = {}
    for i in range(5):
        remember(cache, f"k{i}", i, limit=3)
    assert cache == {"k2": 2, "k3": 3, "k4": 4}


def test_remember_replaces_an_existing_key_without_growing_past_the_limit() -> None:
    cache = {"a": 1, "b": 2}
    remember(cache, "b", 20, limit=2)
    assert len(cache) <= 2 and cache["b"] == 20


@given(st.lists(st.integers(), max_size=200), st.integers(min_value=1, max_value=16))
def test_remember_never_exceeds_its_limit_and_keeps_the_newest(keys: list[int], limit: int) -> None:
    cache: dict[int, int] = {}
    for key in keys:
        remember(cache, key, key * 2, limit)
        assert len(cache) <= limit
        assert cache[key] == key * 2
