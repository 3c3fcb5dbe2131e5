"""The shape of a folding rule, after onnxscript's rewriter rules: a pattern, a check, a rewrite.

``match`` finds the fx nodes that form a candidate, ``check`` says why a candidate cannot be rewritten in place
(None: it can), ``build`` makes the replacement in float64 (itself refused when not exact), ``rewrite`` puts it
in the graph. ``Rule.apply`` runs that to a fixed point on a copy and records every candidate once, applied or
refused with its reason. Each rule's class docstring states the algebra its ``build`` is exact by.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from .fx import (
    finish,
    fresh_copy,
    module_of,
    propagate_shapes,
    replace_subgraph,
    sharing_reason,
    single_input,
)
from .numerics import describe
from .records import Candidate, FoldRecord, Merge, refuse


class Rule(ABC):
    """One exact rewrite of an fx graph (see the module docstring)."""

    kind: ClassVar[str]
    """The name the records and the report give this rule's rewrites."""

    needs_shapes: ClassVar[bool] = True
    """Whether ``check`` or ``build`` read the static shapes (``meta['tensor_meta']``)."""

    @abstractmethod
    def match(self, gm: GraphModule, node: Node) -> Candidate | None:
        """The candidate that ends at ``node``, or None when the pattern is not there."""

    def check(self, gm: GraphModule, cand: Candidate) -> str | None:
        """Why ``cand`` cannot be rewritten in place; None when it can."""
        return None

    @abstractmethod
    def build(self, cand: Candidate) -> Merge:
        """The exact replacement of ``cand``, or why there is none."""

    def rewrite(self, gm: GraphModule, cand: Candidate, merge: Merge) -> None:
        replace_subgraph(gm, cand.nodes, merge.module, cand.source)

    def detail(self, cand: Candidate, merge: Merge) -> str:
        return cand.detail

    def accepted(self, gm: GraphModule, node: Node) -> Candidate | None:
        """The candidate at ``node`` when there is one and it passes ``check``."""
        cand = self.match(gm, node)
        return cand if cand is not None and self.check(gm, cand) is None else None

    def refusal(self, gm: GraphModule, node: Node) -> FoldRecord | None:
        """The record of the candidate at ``node`` when ``check`` refuses it, else None."""
        cand = self.match(gm, node)
        reason = self.check(gm, cand) if cand is not None else None
        return None if reason is None else FoldRecord(self.kind, cand.names, cand.detail, False, reason)

    def apply(self, gm: GraphModule, example: Tensor | None = None) -> tuple[GraphModule, list[FoldRecord]]:
        """Every exact rewrite this rule finds, again and again (a merged op may match anew), on a copy of ``gm``
        at the static input shape of ``example``; one record per candidate, in the order they were met."""
        gm = fresh_copy(gm)
        if self.needs_shapes and example is not None:
            propagate_shapes(gm, example)
        records: list[FoldRecord] = []
        seen: set[tuple[str, ...]] = set()
        while (record := self._step(gm, seen)) is not None:
            records.append(record)
        return finish(gm), records

    def _step(self, gm: GraphModule, seen: set[tuple[str, ...]]) -> FoldRecord | None:
        """Decide the first candidate in graph order not seen yet, rewriting it when it passes."""
        for node in gm.graph.nodes:
            cand = self.match(gm, node)
            if cand is None or tuple(cand.names) in seen:
                continue
            seen.add(tuple(cand.names))
            reason = self.check(gm, cand)
            merge = self.build(cand) if reason is None else refuse(reason)
            if merge.ok:
                self.rewrite(gm, cand, merge)
            return FoldRecord(self.kind, cand.names, self.detail(cand, merge), merge.ok, merge.reason)
        return None


class MergeRule(Rule):
    """A merge of linear ops into one: exact, but not always faster, so the planner times it (mode "auto").

    ``compose`` is the algebra on modules, which the planner also uses to merge longer chains step by step."""

    @abstractmethod
    def compose(self, first: nn.Module, second: nn.Module | None, in_shape: torch.Size) -> Merge:
        """One op equal to the pair, at the static input shape ``in_shape``, or why there is none."""

    def check(self, gm: GraphModule, cand: Candidate) -> str | None:
        return sharing_reason(gm, cand.nodes)

    def build(self, cand: Candidate) -> Merge:
        return self.compose(*cand.modules, cand.in_shape)

    def detail(self, cand: Candidate, merge: Merge) -> str:
        return f"{cand.detail} -> {describe(merge.module)}" if merge.ok else cand.detail


class PairRule(MergeRule):
    """``second(first(x))`` for two ``op`` modules: the links of the planner's chains."""

    op: ClassVar[type[nn.Module]]

    def match(self, gm: GraphModule, node: Node) -> Candidate | None:
        src = single_input(node)
        second, first = module_of(gm, node), module_of(gm, src) if src is not None else None
        if not (isinstance(second, self.op) and isinstance(first, self.op) and single_input(src) is not None):
            return None
        return Candidate([src, node], src.args[0], [first, second], f"{describe(first)} · {describe(second)}")
