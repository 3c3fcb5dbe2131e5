"""Fold groups in the order latency selection tries them, for a model's entropy table."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx

from easier_export.fold import LatencyTable

from .config import LoopConfig
from .selection import measure_groups, risk


def fold_groups_in_order(gm: fx.GraphModule, loop: LoopConfig, example: torch.Tensor, entropy: Mapping[str, float],
                         table: LatencyTable) -> list[dict]:
    """Every fold group timed on the table's target, least accuracy risk first (the order ``--select latency``
    tries them in): its call sites, their summed entropy, its saving (µs) and the merge it completes."""
    found = measure_groups(gm, loop, example, table).candidates(set())
    found.sort(key=lambda g: (risk(g, dict(entropy)), g.sites))
    return [{"sites": list(g.sites), "entropy": sum(entropy[s] for s in g.sites), "us_saved": g.us_saved,
             "detail": g.detail} for g in found]
