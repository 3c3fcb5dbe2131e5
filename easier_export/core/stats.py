"""The project's statistical decisions in one place: "is it faster" and "is it within budget", each with the
confidence it is made at.

Both compare two things measured side by side on the same material (interleaved timing blocks; the same
validation images), so both are *paired*: the noise that hits both sides alike cancels.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import NormalDist

import torch


def min_blocks(confidence: float = 0.95) -> int:
    """The fewest values whose extremes cover their median at ``confidence`` (the sign test: both extremes
    miss it with probability 2 / 2**n); 6 at 95 %."""
    return math.ceil(math.log2(2 / (1 - confidence)))


def median_ci_rank(n: int, confidence: float = 0.95) -> int | None:
    """0-based rank k such that [k-th, (n-1-k)-th smallest] of n values covers their median with at least
    ``confidence`` (distribution-free: the sign test). The normal approximation's rank, one wider, so coverage
    holds at every n (exactly checked in the tests); None below ``min_blocks(confidence)`` values."""
    if n < min_blocks(confidence):
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return max(0, math.floor((n - z * math.sqrt(n)) / 2) - 1)


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high) with a ``confidence`` interval that assumes no distribution: block timings are
    skewed and heavy-tailed. Infinite bounds below ``min_blocks(confidence)`` values."""
    k = median_ci_rank(len(values), confidence)
    if k is None:
        return statistics.median(values), -math.inf, math.inf
    ordered = sorted(values)
    return statistics.median(ordered), ordered[k], ordered[len(values) - 1 - k]


SETTLED_WIDTH = 0.02
"""An interval narrower than ±2 % of its ratio is settled even when it straddles 1: more blocks would not
change the verdict materially."""


@dataclass(frozen=True)
class Speedup:
    """The one "is it faster" rule: how many times faster a candidate ran than a baseline timed side by side,
    as the median of per-block ratios (baseline block median / candidate block median, the blocks interleaved)
    with its interval at ``confidence``.

    The verdict reads the interval only: "faster" when it lies above 1, "slower" when below, else "alike"
    (within the noise). Per-block ratios cancel what drifts between blocks (a neighbour, a clock boost)."""

    ratio: float
    low: float
    high: float
    blocks: int
    confidence: float = 0.95

    @property
    def verdict(self) -> str:
        if self.low > 1.0:
            return "faster"
        return "slower" if self.high < 1.0 else "alike"

    @property
    def faster(self) -> bool:
        """Faster beyond the noise: the whole interval lies above 1."""
        return self.verdict == "faster"

    def spanning(self, ratios: list[float]) -> Speedup:
        """This speed-up with its interval widened to cover ``ratios`` (the medians of independent repeats, e.g.
        fresh sessions): "faster" then also needs every repeat faster, so an effect that lives in one repeat's
        sessions, not in the files, is not one."""
        return Speedup(self.ratio, min(self.low, *ratios), max(self.high, *ratios), self.blocks, self.confidence)

    def precise(self, tol: float) -> bool:
        """Whether the interval's half-width is at most ``tol`` of the ratio."""
        return (self.high - self.low) / 2 <= tol * self.ratio

    @property
    def settled(self) -> bool:
        """More blocks would not change the verdict materially: it is decided, or the interval is narrower than
        ``SETTLED_WIDTH``."""
        return self.verdict != "alike" or self.precise(SETTLED_WIDTH)

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "blocks": self.blocks,
                "faster": self.faster}


def speedup(base_blocks: list[float], cand_blocks: list[float], confidence: float = 0.95) -> Speedup:
    """Compare two equally long lists of interleaved block medians (any one time unit)."""
    ratio, low, high = median_ci([b / c for b, c in zip(base_blocks, cand_blocks, strict=True)], confidence)
    return Speedup(ratio, low, high, len(base_blocks), confidence)


@dataclass(frozen=True)
class PairedChange:
    """A candidate's change against the original on the same validation samples: ``change`` (candidate minus
    original, in the metric's unit), its one-sided bound on the bad side at ``confidence``, the samples and how
    many of them changed outcome (discordant)."""

    change: float
    bound: float
    confidence: float
    n: int
    discordant: int

    def to_dict(self) -> dict:
        return {"change": self.change, "bound": self.bound, "confidence": self.confidence, "n": self.n,
                "discordant": self.discordant}


def z_one_sided(confidence: float) -> float:
    """The normal quantile of a one-sided bound; 0 at confidence 0 (the point estimate, no margin)."""
    return NormalDist().inv_cdf(confidence) if confidence > 0 else 0.0


def paired_accuracy_change(base: torch.Tensor, cand: torch.Tensor, confidence: float) -> PairedChange:
    """Change of top-1 (points) from per-sample correctness (1/0, or a row's share of correct positions).

    The variance is that of the per-sample differences, with half a sample added to each of the gained and lost
    cells (Agresti–Min), so that a run with few or no changed outcomes still gets an interval that is not zero
    wide. ``bound`` is the lower bound of the change (the worst plausible drop, negative for a loss)."""
    diff = cand.double() - base.double()
    n = diff.numel()
    gained = float(diff.clamp_min(0).sum()) + 0.5
    lost = float((-diff).clamp_min(0).sum()) + 0.5
    m = n + 1
    mean = (gained - lost) / m
    var = max((gained + lost) / m - mean ** 2, 0.0)
    half = z_one_sided(confidence) * math.sqrt(var / m)
    change = 100.0 * float(diff.mean())
    return PairedChange(change, change - 100.0 * half, confidence, n, int((diff != 0).sum()))


def paired_ppl_change(base_nll: torch.Tensor, cand_nll: torch.Tensor, confidence: float) -> PairedChange:
    """Change of perplexity (percent) from per-sequence mean negative log-likelihoods: the mean NLL difference
    with a normal bound over sequences; ``bound`` is the upper bound of the increase (percent)."""
    diff = cand_nll.double() - base_nll.double()
    n = diff.numel()
    mean = float(diff.mean())
    sd = float(diff.std()) if n > 1 else math.inf
    half = z_one_sided(confidence) * sd / math.sqrt(n) if confidence > 0 else 0.0
    return PairedChange(100.0 * math.expm1(mean), 100.0 * math.expm1(mean + half), confidence, n,
                        int((diff != 0).sum()))


def better_beyond_chance(base: torch.Tensor, cand: torch.Tensor, alpha: float = 0.05) -> bool:
    """Whether ``cand`` gets more samples right than ``base`` beyond chance: the exact one-sided sign test on the
    samples whose outcome differs (right in one, wrong in the other), exact where a normal bound is not (a few
    images)."""
    gained = int(((cand > base)).sum())
    lost = int(((cand < base)).sum())
    n = gained + lost
    p = sum(math.comb(n, k) for k in range(gained, n + 1)) / 2 ** n if n else 1.0
    return p < alpha


GOLDEN = (math.sqrt(5) - 1) / 2


def held_out(n: int, share: float) -> torch.Tensor:
    """Which of ``n`` validation samples (in loader order) are held out from the rounds: every sample whose
    index times the golden ratio falls, modulo 1, below ``share``. Deterministic, about ``share`` of the samples,
    and spread evenly along the order, so each class of a class-sorted folder keeps its share."""
    return (torch.arange(n, dtype=torch.float64) * GOLDEN) % 1.0 < share


def resolvable_drop(accuracy: float, n: int, confidence: float) -> tuple[float, int]:
    """Before any round: the margin (points) a paired bound on ``n`` validation images adds to the observed drop,
    assuming a candidate changes the outcome of as many images as a quarter of the original's error rate (what
    near-free rounds did in benchmarks/promise.md: 7-9 % of images at 63 % top-1), and how many images would
    make that margin 0.5 points."""
    discordant = max((100.0 - accuracy) / 400.0, 1.0 / max(n, 1))
    z = z_one_sided(confidence)
    margin = 100.0 * z * math.sqrt(discordant / max(n, 1))
    needed = math.ceil(discordant * (100.0 * z / 0.5) ** 2)
    return margin, needed
