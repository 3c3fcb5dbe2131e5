"""Folding: collapse the linear ops left adjacent once EASIER removed rectifiers.

Passes (each ``GraphModule -> (GraphModule, records)`` on a copy, each merge exact in float64 or refused):
identity, batchnorm (+ LayerNorm affine), conv_conv, linear_linear, residual; ``planner`` picks, by measured
latency, which merges are worth applying.
"""

from __future__ import annotations

import pathlib
from collections.abc import Collection, Sequence

import torch
from torch.fx import GraphModule

from ._common import PADDING_REASON, BiasMapConv2d, FoldRecord
from .batchnorm import fold_batchnorm, fold_layernorm_affine
from .conv_conv import fold_conv_conv, match_conv_pair
from .identity import fold_identity
from .linear_linear import fold_linear_linear, match_linear_pair
from .planner import plan_and_fold
from .residual import fold_residual, match_residual

__all__ = [
    "PADDING_REASON",
    "BiasMapConv2d",
    "FoldRecord",
    "fold_batchnorm",
    "fold_conv_conv",
    "fold_identity",
    "fold_layernorm_affine",
    "fold_linear_linear",
    "fold_model",
    "fold_residual",
    "plan_and_fold",
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
) -> tuple[GraphModule, list[FoldRecord]]:
    """Run all passes on an eval-mode GraphModule at the static input shape of `example` (batch dim may
    vary at run time; spatial size is static). 'none' still removes identities and folds BN (always a win,
    exact); 'all' applies every exact merge; 'auto' applies a merge only when the planner measured it faster
    on `target`, or, given `replay` (the node names of the merges a recorded 'auto' plan applied), exactly those.
    """
    if mode not in MODES:
        raise ValueError(f"fold mode {mode!r} is not one of {MODES}")
    gm, records = fold_identity(gm)
    gm, bn_records = fold_batchnorm(gm, example)
    gm, ln_records = fold_layernorm_affine(gm)
    records += bn_records + ln_records
    if mode == "auto":
        records += _refusals(gm)
        gm, planned = plan_and_fold(gm, example, target=target, cache=cache, threads=threads, replay=replay)
        records += planned
    elif mode == "all":
        gm, merged = _merge_all(gm, example)
        records += merged
    return gm, records


def _refusals(gm: GraphModule) -> list[FoldRecord]:
    """Merge patterns that cannot be rewritten in place (shared modules, fan-out), with why: the planner only
    considers chains that can, so without this they would be missing from the fold plan."""
    matches = (match_conv_pair, match_linear_pair, match_residual)
    found = (match(gm, node, explain=True) for node in gm.graph.nodes for match in matches)
    return [FoldRecord(c.kind, c.names, c.detail, False, c.refusal) for c in found if c is not None and c.refusal]


def _merge_all(gm: GraphModule, example: torch.Tensor) -> tuple[GraphModule, list[FoldRecord]]:
    """Every exact merge, repeated until none applies (a residual merge can open a new conv -> conv pair)."""
    latest: dict[tuple, FoldRecord] = {}
    applied = True
    while applied:
        applied = False
        for fold in (fold_conv_conv, fold_linear_linear, fold_residual):
            gm, records = fold(gm, example)
            for rec in records:
                latest[(rec.kind, tuple(rec.nodes))] = rec
                applied |= rec.applied
    return gm, list(latest.values())
