"""What the folding rules exchange: the candidate a rule matched, the merge it built, the record it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.fx import Node

from .fx import shape_of


@dataclass
class FoldRecord:
    """One candidate rewrite, applied or not (``reason`` says why not), for the report."""

    kind: str
    nodes: list[str]
    detail: str
    applied: bool
    reason: str
    us_before: float | None = None
    us_after: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Merge:
    """Outcome of building a merged op: the module, or why it was refused (like a rewriter's MatchResult)."""

    module: nn.Module | None
    reason: str = ""
    error: float = 0.0

    @property
    def ok(self) -> bool:
        return self.module is not None


def refuse(reason: str) -> Merge:
    return Merge(None, reason)


@dataclass
class Candidate:
    """A subgraph a rule matched: what one rewrite would replace."""

    nodes: list[Node]  # topological order; only the last one is used outside the subgraph
    source: Node | None  # the subgraph's single external input
    modules: list[nn.Module | None]  # the ops the rule's builder reads, in the order it expects
    detail: str

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def in_shape(self) -> torch.Size:
        return shape_of(self.source)
