"""The one timing loop and the one "is it faster" rule, on scripted clocks and constructed samples."""

from __future__ import annotations

import math

import pytest

from easier_export.core.stats import Speedup, median_ci, median_ci_rank, min_blocks, speedup
from easier_export.core.timing import BLOCK_ITERS, compare, interleaved, race_runners

BASE = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.1]


class ScriptedClock:
    """Seconds that only the runners advance, by their scripted cost (ms), plus an alternating drift per call."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def runner(self, ms: float, jitter: float = 0.0):
        def run() -> None:
            self.calls += 1
            self.now += (ms + (jitter if self.calls % 2 else -jitter)) / 1e3
        return run


def test_runners_take_turns_a_block_each_in_reversed_order_every_other_round() -> None:
    calls: list[str] = []
    timings = interleaved([lambda: calls.append("A"), lambda: calls.append("B")],
                          lambda blocks, _: len(blocks[0]) == 2, warmup=1, iters=2, clock=ScriptedClock())
    assert "".join(calls) == "AB" + "AABBBBAA"
    assert [[len(block) for block in blocks] for blocks in timings] == [[2, 2], [2, 2]]


def test_clearly_faster() -> None:
    found = speedup(BASE, [b / 1.25 for b in BASE])
    assert found.verdict == "faster" and found.faster and found.low > 1.0
    assert found.ratio == pytest.approx(1.25)


def test_clearly_slower() -> None:
    found = speedup(BASE, [b * 1.1 for b in BASE])
    assert found.verdict == "slower" and not found.faster and found.high < 1.0 and found.settled


def test_overlapping_samples_are_alike() -> None:
    found = speedup(BASE, [5.0, 20.0, 5.0, 20.0, 5.0, 20.0, 5.0, 20.0])
    assert found.verdict == "alike" and not found.faster and not found.settled
    assert found.low < 1.0 < found.high


def test_too_few_blocks_give_no_interval() -> None:
    found = speedup(BASE[:5], [b / 2 for b in BASE[:5]])
    assert found.low == -math.inf and found.verdict == "alike"


def test_a_stated_confidence_widens_or_narrows_the_interval() -> None:
    cand = [b / 1.02 for b in BASE[:4]] + [b * 1.01 for b in BASE[4:]] + [b / 1.03 for b in BASE] * 3
    wide, narrow = speedup(BASE * 4, cand, 0.99), speedup(BASE * 4, cand, 0.80)
    assert wide.low <= narrow.low and narrow.high <= wide.high and (wide.low, wide.high) != (narrow.low, narrow.high)
    assert wide.confidence == 0.99 and narrow.confidence == 0.80


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99])
def test_median_interval_covers_at_its_confidence(confidence: float) -> None:
    """Exact coverage of the order-statistics interval, P(k < #values below the median < n - k), over n."""
    assert median_ci_rank(min_blocks(confidence) - 1, confidence) is None
    for n in range(min_blocks(confidence), 401):
        k = median_ci_rank(n, confidence)
        assert 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n >= confidence, n


def test_median_interval_narrows_as_values_accumulate() -> None:
    assert median_ci([1.0, 2.0, 3.0]) == (2.0, -math.inf, math.inf)
    many = [float(v % 7) for v in range(700)]
    assert median_ci(many) == (3.0, 3.0, 3.0)
    _, low, high = median_ci(many[:14])
    assert high - low > 0


def test_compare_stops_once_settled_with_the_blocks_an_interval_needs() -> None:
    clock = ScriptedClock()
    medians, (merged, same) = compare([clock.runner(1.0), clock.runner(0.5), clock.runner(1.0)],
                                      lambda found: all(v.settled for v in found), iters=10, warmup=0,
                                      max_seconds=60.0, clock=clock)
    assert merged.verdict == "faster" and merged.ratio == pytest.approx(2.0)
    assert same.verdict == "alike" and same.settled
    assert merged.blocks == min_blocks() == 6 and [len(m) for m in medians] == [6, 6, 6]


def test_compare_gives_up_at_its_time_budget() -> None:
    clock = ScriptedClock()
    costs = iter(range(10**6))

    def noisy() -> None:  # whole blocks alternately twice as fast and 1.5 times as slow as the baseline
        clock.now += (0.5 if next(costs) // 10 % 2 else 1.5) / 1e3

    _, (found,) = compare([clock.runner(1.0), noisy], lambda found: found[0].settled, iters=10, warmup=0,
                          max_seconds=1.0, clock=clock)
    assert found.verdict == "alike" and clock.now >= 1.0


def test_speedup_keeps_its_report_form() -> None:
    assert Speedup(2.0, 1.9, 2.1, 6).to_dict() == {"ratio": 2.0, "low": 1.9, "high": 2.1, "blocks": 6,
                                                   "faster": True}


def test_race_stops_once_every_comparison_is_settled():
    clock = ScriptedClock()
    verdicts = race_runners(lambda: {"original": clock.runner(1.0, 0.05), "merged": clock.runner(0.5, 0.05),
                             "same": clock.runner(1.0, 0.05)}, "original", max_seconds=60.0, clock=clock, sets=1)[1]
    assert verdicts["merged"].faster and verdicts["merged"].ratio == pytest.approx(2.0, rel=0.1)
    assert not verdicts["same"].faster and verdicts["same"].settled
    assert verdicts["merged"].blocks == 6  # settled at the first interval: no more timing than needed


def test_race_gives_up_at_its_time_budget_and_calls_nothing_faster():
    clock = ScriptedClock()
    calls = iter(range(10**6))

    def noisy() -> None:  # whole blocks alternately twice as fast and 1.5 times as slow as the original
        clock.now += (0.5 if next(calls) // BLOCK_ITERS % 2 else 1.5) / 1e3

    verdicts = race_runners(lambda: {"original": clock.runner(1.0), "noisy": noisy}, "original", max_seconds=1.0,
                            warmup=0, clock=clock)[1]
    assert not verdicts["noisy"].faster and clock.now >= 1.0


def test_a_session_that_runs_faster_for_its_lifetime_is_not_a_speedup():
    """Fresh sessions of the same file, a few percent apart for as long as they live: one pair says "faster
    beyond the noise", five pairs do not (one of them is slower)."""
    clock = ScriptedClock()
    offsets = iter([0.94, 0.94, 0.95, 0.96, 0.94, 1.06])  # the candidate's ms against the baseline's, per set

    def sessions() -> dict:
        return {"original": clock.runner(1.0, 0.01), "copy": clock.runner(next(offsets), 0.01)}

    one = race_runners(sessions, "original", max_seconds=60.0, clock=clock, sets=1)[1]
    assert one["copy"].faster  # the first pair alone: ×1.06 beyond its own noise
    pooled = race_runners(sessions, "original", max_seconds=60.0, clock=clock, sets=5)[1]
    assert not pooled["copy"].faster and pooled["copy"].low == pytest.approx(1 / 1.06, rel=0.01)
