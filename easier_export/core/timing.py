"""The one timing loop for things timed side by side (benchmark rows, races between exported models, the fold
planner's segments): the runners take turns, a block of runs each, so a neighbour, a clock boost or thermal drift
hits every runner alike; and the turn order reverses every round (A, B, B, A, A, B, ...), so the cost of running
right after another runner (its thread pool still spinning, its data in the caches) does too. In one order only,
a file raced against its own copy measured ×1.03–×1.10 "faster beyond the noise" (benchmarks/precision.md)."""

from __future__ import annotations

import operator
import statistics
import time
from collections.abc import Callable, Sequence

from .stats import Speedup, min_blocks, speedup

Runner = Callable[[], None]
Clock = Callable[[], float]
Blocks = list[list[float]]
"""One runner's timings: per block, the milliseconds of each run."""


def interleaved(runners: Sequence[Runner], done: Callable[[list[Blocks], float], bool], *, warmup: int,
                iters: int, block_seconds: float = 0.0, clock: Clock | None = None) -> list[Blocks]:
    """Warm every runner up, then time them in rounds of one block each, the order reversed every other round,
    until ``done(blocks so far, seconds since the warm-up)``; a block is at least ``iters`` runs and at least
    ``block_seconds`` long.

    ``clock``: seconds, ``time.perf_counter`` unless given (a scripted clock makes the loop testable)."""
    clock = clock or time.perf_counter
    for run in runners:
        for _ in range(warmup):
            run()
    timings: list[Blocks] = [[] for _ in runners]
    start = clock()
    turns = list(zip(runners, timings, strict=True))
    while not done(timings, clock() - start):
        for run, blocks in turns if len(timings[0]) % 2 == 0 else reversed(turns):
            ms: list[float] = []
            block_start = clock()
            while len(ms) < iters or clock() - block_start < block_seconds:
                t0 = clock()
                run()
                ms.append((clock() - t0) * 1e3)
            blocks.append(ms)
    return timings


def compare(runners: Sequence[Runner], settled: Callable[[list[Speedup]], bool], *, iters: int, warmup: int,
            max_seconds: float, confidence: float = 0.95,
            clock: Clock | None = None) -> tuple[list[list[float]], list[Speedup]]:
    """Time ``runners[0]`` (the baseline) and the others in interleaved blocks of ``iters`` runs until
    ``settled(each one's speed-up over the baseline)`` or ``max_seconds`` have passed, with at least the blocks
    an interval at ``confidence`` needs, however slow the runners, and always an even number of blocks (as many
    in each turn order). Returns each runner's block medians (ms) and the speed-ups of ``runners[1:]``."""
    need = min_blocks(confidence) + min_blocks(confidence) % 2
    medians: list[list[float]] = []
    verdicts: list[Speedup] = []

    def done(timings: list[Blocks], elapsed: float) -> bool:
        if len(timings[0]) < need or len(timings[0]) % 2:
            return False
        medians[:] = [[statistics.median(block) for block in blocks] for blocks in timings]
        verdicts[:] = [speedup(medians[0], m, confidence) for m in medians[1:]]
        return settled(verdicts) or elapsed > max_seconds

    interleaved(runners, done, warmup=warmup, iters=iters, clock=clock)
    return medians, verdicts


BLOCK_ITERS = 10
"""Runs per block in a race: enough that one block outlasts a scheduler tick on sub-millisecond files."""

SESSION_SETS = 5
"""Fresh runners (onnxruntime sessions) per file in one race: two sessions of the same file can run a few percent
apart for as long as they live (memory placement, thread pools), which no number of blocks of one pair averages
out; a file raced against its own copy measured ×0.94–×1.03 "beyond the noise" (benchmarks/precision.md), and a
fold segment's saving 0.3 µs in one run and 4.7 µs in the next (benchmarks/promise.md). The interval over the
blocks of every pair is widened to cover each pair's own ratio, so "faster" needs all five pairs faster: for two
files alike, a chance of 1 in 32."""


def race_runners(make_runners: Callable[[], dict[str, Runner]], baseline: str, max_seconds: float = 10.0,
                 warmup: int = 5, clock: Clock | None = None, sets: int = SESSION_SETS, iters: int = BLOCK_ITERS,
                 settled: Callable[[Speedup], bool] = operator.attrgetter("settled"),
                 ) -> tuple[dict[str, list[float]], dict[str, Speedup]]:
    """Time the runners in interleaved blocks of ``iters`` runs, ``sets`` times with fresh runners from
    ``make_runners``, each time until every speed-up over ``baseline`` is ``settled`` (by default
    ``Speedup.settled``) or its share of ``max_seconds`` has passed: the speed-ups over the blocks of every set,
    their intervals spanning each set's own ratio (``Speedup.spanning``); and each runner's block medians (ms)
    over every set."""
    pooled: dict[str, list[float]] = {}
    own: dict[str, list[float]] = {}
    for _ in range(sets):
        runners = make_runners()
        labels = [baseline, *(label for label in runners if label != baseline)]
        medians, verdicts = compare([runners[label] for label in labels],
                                    lambda found: all(settled(v) for v in found), iters=iters, warmup=warmup,
                                    max_seconds=max_seconds / sets, clock=clock)
        for label, blocks in zip(labels, medians, strict=True):
            pooled.setdefault(label, []).extend(blocks)
        for label, verdict in zip(labels[1:], verdicts, strict=True):
            own.setdefault(label, []).append(verdict.ratio)
    return pooled, {label: speedup(pooled[baseline], blocks).spanning(own[label])
                    for label, blocks in pooled.items() if label != baseline}
