"""The folding rules, in the one registry every part of folding reads (``fold_model``, the planner, the groups).

``RULES`` is also the order the rules run in: the identities first (so linear ops become adjacent), then the
normalisation folds (always a win), then the merges the planner times.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.fx import GraphModule

from ..records import FoldRecord
from ..rule import MergeRule, PairRule, Rule
from .batchnorm import BatchNormRule
from .conv_conv import PADDING_REASON, ConvConvRule
from .identity import IdentityRule
from .layernorm import LayerNormAffineRule
from .linear_linear import LinearLinearRule
from .residual import ResidualRule

__all__ = ["CLEANUPS", "MERGES", "MERGE_KINDS", "PADDING_REASON", "RESIDUAL", "RULES", "chain_rule", "clean", "rule"]

RULES: tuple[Rule, ...] = (
    IdentityRule(),
    BatchNormRule(),
    LayerNormAffineRule(),
    ConvConvRule(),
    LinearLinearRule(),
    ResidualRule(),
)

CLEANUPS: tuple[Rule, ...] = tuple(r for r in RULES if not isinstance(r, MergeRule))
"""Applied in every fold mode: exact and never slower."""

MERGES: tuple[MergeRule, ...] = tuple(r for r in RULES if isinstance(r, MergeRule))
"""Exact but not always faster: applied by mode "all", or where the planner measured them faster."""

MERGE_KINDS: tuple[str, ...] = tuple(r.kind for r in MERGES)

RESIDUAL: MergeRule = next(r for r in MERGES if isinstance(r, ResidualRule))
"""The merge that closes a chain: its last op plus the skip over the chain."""


def chain_rule(module: nn.Module) -> PairRule | None:
    """The pair merge that chains ops like ``module`` (conv -> conv, linear -> linear), if any."""
    return next((r for r in MERGES if isinstance(r, PairRule) and isinstance(module, r.op)), None)


def rule(kind: str) -> Rule:
    """The registered rule of ``kind``."""
    found = [r for r in RULES if r.kind == kind]
    if not found:
        raise KeyError(f"no fold rule {kind!r}: one of {[r.kind for r in RULES]}")
    return found[0]


def clean(gm: GraphModule, example: Tensor) -> tuple[GraphModule, list[FoldRecord]]:
    """The rules every fold mode applies (``CLEANUPS``), in registry order, on a copy of ``gm``."""
    records: list[FoldRecord] = []
    for cleanup in CLEANUPS:
        gm, found = cleanup.apply(gm, example)
        records += found
    return gm, records
