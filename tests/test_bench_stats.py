"""The statistics the benchmark report judges goals by (benchmarks/macro.py): paired per-round figures."""

from __future__ import annotations

import pytest

from benchmarks.macro import RunResult, Summary, paired_added_cpu, paired_ratio, spread


def summary(name: str, rounds: list[tuple[float, float]]) -> Summary:
    """``rounds``: (requests per second, server CPU µs per request) for 10 s runs."""
    runs = tuple(
        RunResult(rps, 1.0, 2.0, int(rps * 10), 0, 10.0, 1.0, {name: cpu * 1e-6 * int(rps * 10)}) for rps, cpu in rounds
    )
    return Summary(name, name, name, runs, ())


def test_a_dip_in_one_round_moves_both_sides_of_that_round() -> None:
    # Round 2: the machine slowed everything by half; the stage still costs 10 µs more than bare in every round.
    bare = summary("bare", [(20_000, 40.0), (10_000, 80.0), (20_000, 40.0)])
    stage = summary("stage", [(16_000, 50.0), (8_000, 90.0), (16_000, 50.0)])
    assert paired_added_cpu(bare, stage) == pytest.approx(10.0)
    assert paired_ratio(bare, stage) == pytest.approx(0.8)
    assert spread(bare) == pytest.approx(0.5)
    assert spread(stage) == pytest.approx(0.5)


def test_spread_flags_a_reference_that_did_not_hold_steady() -> None:
    # A dip that hits only the reference's rounds cannot be paired away; the report says so from the spread.
    steady = summary("bare", [(20_000, 40.0), (19_500, 41.0), (20_400, 39.0)])
    dipped = summary("bare", [(24_400, 33.0), (16_600, 48.0), (24_000, 33.5)])
    assert spread(steady) < 0.10 < spread(dipped)
