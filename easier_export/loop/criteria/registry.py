"""The criterion registry: each way of scoring call sites registers itself by name, and those names are
``--criterion``'s choices (``LoopConfig.criterion``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import fx

from easier_export.trace.sites import CallSite

from ..entropy import SiteStats


@dataclass(frozen=True)
class Evidence:
    """What a criterion may read to score a round's call sites: the model, its sites, up to ``batches`` batches
    of ``loader`` (in train or eval mode), the ON threshold, the round's seed, and the round's entropy pass
    (``stats``; empty for a criterion registered with ``counts=False``). Scoring never changes ``gm``."""

    gm: fx.GraphModule
    sites: list[CallSite]
    loader: Iterable
    device: torch.device
    batches: int | None
    train_mode: bool
    threshold: float
    seed: int
    stats: dict[str, SiteStats]


Score = Callable[[Evidence], dict[str, float]]


@dataclass(frozen=True)
class Criterion:
    """A registered scoring function: call site name → score, lower = removed first. ``counts``: it reads the
    round's entropy pass, which the loop then runs first."""

    name: str
    score: Score
    counts: bool = True


CRITERIA: dict[str, Criterion] = {}
"""Every criterion, in the order registered: the order of ``--criterion``'s choices."""


def register_criterion(name: str, counts: bool = True) -> Callable[[Score], Score]:
    """Register the decorated function as the criterion ``name``."""
    def register(score: Score) -> Score:
        if name in CRITERIA:
            raise ValueError(f"criterion '{name}' is registered twice")
        CRITERIA[name] = Criterion(name, score, counts)
        return score

    return register
