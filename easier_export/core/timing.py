"""The one timing loop for things timed side by side (benchmark rows, races between exported models, the fold
planner's segments): the runners take turns, a block of runs each, so a neighbour, a clock boost or thermal drift
hits every runner alike; and the turn order reverses every round (A, B, B, A, A, B, ...), so the cost of running
right after another runner (its thread pool still spinning, its data in the caches) does too. In one order only,
a file raced against its own copy measured ×1.03–×1.10 "faster beyond the noise" (benchmarks/precision.md)."""

from __future__ import annotations

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
