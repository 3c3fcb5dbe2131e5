"""Folding: collapse the linear ops left adjacent once EASIER removed rectifiers.

Each fold is a rule (``rule.Rule``: match, check, build, rewrite), exact in float64 or refused with a reason,
registered once in ``rules.RULES``. The identity and normalisation rules always apply; the merges apply all
(mode "all") or where the ``planner`` measured them faster (mode "auto").
"""

from __future__ import annotations

import pathlib
from collections.abc import Collection, Sequence

import torch
from torch.fx import GraphModule

from easier_export.core.quantize import FP32

from .groups import FoldGroups, Group, find_groups
from .latency import LATENCY_FILE, LatencyTable
from .numerics import BiasMapConv2d
from .planner import plan_and_fold
from .records import FoldRecord
from .rules import MERGE_KINDS, MERGES, PADDING_REASON, RULES, clean, rule

__all__ = [
    "MERGE_KINDS",
    "MODES",
    "PADDING_REASON",
    "RULES",
    "BiasMapConv2d",
    "FoldGroups",
    "FoldRecord",
    "Group",
    "LATENCY_FILE",
    "LatencyTable",
    "clean",
    "find_groups",
    "fold_model",
    "plan_and_fold",
    "rule",
]

MODES = ("auto", "all", "none")


def fold_model(
    gm: GraphModule,
    example: torch.Tensor,
    mode: str = "auto",
    target: str = "cpu",
    cache: pathlib.Path | None = None,
    threads: int | None = None,
    replay: Collection[Sequence[str]] | None = None,
    precision: str = FP32,
) -> tuple[GraphModule, list[FoldRecord]]:
    """Run the rules on an eval-mode GraphModule at the static input shape of `example` (batch dim may
    vary at run time; spatial size is static). 'none' still removes identities and folds BN (always a win,
    exact); 'all' applies every exact merge; 'auto' applies a merge only when the planner measured it faster
    on `target` (in the `precision` the model ships in), or, given `replay` (the node names of the merges a
    recorded 'auto' plan applied), exactly those.
    """
    if mode not in MODES:
        raise ValueError(f"fold mode {mode!r} is not one of {MODES}")
    gm, records = clean(gm, example)
    if mode == "auto":
        records += _refusals(gm)
        gm, planned = plan_and_fold(gm, example, target=target, cache=cache, threads=threads, replay=replay,
                                      precision=precision)
        records += planned
    elif mode == "all":
        gm, merged = _merge_all(gm, example)
        records += merged
    return gm, records


def _refusals(gm: GraphModule) -> list[FoldRecord]:
    """Merge patterns that cannot be rewritten in place (shared modules, fan-out), with why: the planner only
    considers chains that can, so without this they would be missing from the fold plan."""
    found = (merge.refusal(gm, node) for node in gm.graph.nodes for merge in MERGES)
    return [record for record in found if record is not None]


def _merge_all(gm: GraphModule, example: torch.Tensor) -> tuple[GraphModule, list[FoldRecord]]:
    """Every exact merge, repeated until none applies (a residual merge can open a new conv -> conv pair)."""
    latest: dict[tuple, FoldRecord] = {}
    applied = True
    while applied:
        applied = False
        for merge in MERGES:
            gm, records = merge.apply(gm, example)
            for rec in records:
                latest[(rec.kind, tuple(rec.nodes))] = rec
                applied |= rec.applied
    return gm, list(latest.values())
