"""The rule registry: every registered rule refuses a constructed match it cannot rewrite, with a reason."""

from __future__ import annotations

import pytest
import torch
from _fold_util import Fork, ReadTwice, traced
from torch import nn
from torch.fx import GraphModule

from easier_export.fold import MERGE_KINDS, RULES, rule
from easier_export.fold.fx import propagate_shapes


class Shared(nn.Module):
    """One Linear called twice in a row: a module shared by two call sites."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


def _training(module: nn.Module) -> GraphModule:
    gm = traced(module)
    gm.train()
    return gm


REFUSED = {  # kind -> (graph with a refused match, example input, words of the reason)
    "identity": (lambda: _training(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))), (2, 4), "training"),
    "batchnorm": (lambda: _training(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))), (2, 3, 5, 5),
                  "batch statistics"),
    "layernorm_affine": (lambda: traced(nn.Sequential(nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 2))),
                         (2, 4), "no affine"),
    "conv_conv": (lambda: traced(Fork()), (1, 3, 5, 5), "fan-out"),
    "linear_linear": (lambda: traced(Shared()), (2, 4), "shared"),
    "residual": (lambda: traced(ReadTwice()), (1, 4, 5, 5), "fan-out"),
}


def test_every_registered_rule_has_a_refusal_case() -> None:
    assert sorted(r.kind for r in RULES) == sorted(REFUSED)
    assert set(MERGE_KINDS) < set(REFUSED)


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_check_gives_a_reason_for_a_refused_match(kind: str) -> None:
    build, shape, words = REFUSED[kind]
    gm, registered = build(), rule(kind)
    propagate_shapes(gm, torch.randn(shape, dtype=torch.float64))
    matches = [c for c in (registered.match(gm, n) for n in gm.graph.nodes) if c is not None]
    reasons = [registered.check(gm, c) for c in matches]
    assert matches and all(isinstance(r, str) and r for r in reasons), reasons
    assert any(words in r for r in reasons), reasons
    folded, records = registered.apply(gm, torch.randn(shape, dtype=torch.float64))
    assert records and not any(r.applied for r in records) and all(r.reason for r in records)
    assert str(folded.graph) == str(gm.graph)


def test_an_unknown_kind_is_named() -> None:
    with pytest.raises(KeyError, match="conv_conv"):
        rule("nope")
