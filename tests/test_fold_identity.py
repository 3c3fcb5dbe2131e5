"""Identity pass: eval-mode identities are erased; training dropout is refused."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _fold_util import assert_same
from torch import nn
from torchvision.ops import StochasticDepth

from easier_export.fold import rule

fold_identity = rule("identity").apply


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.ident, self.drop, self.drop2d = nn.Identity(), nn.Dropout(0.3), nn.Dropout2d(0.2)
        self.sd = StochasticDepth(0.2, "row")  # traced to a stochastic_depth(..., training=False) call
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop2d(self.ident(self.conv(x)))
        x = F.dropout(self.act(x), 0.5, training=False)
        return self.drop(self.sd(x)) + x


def _trace(training_dropout: bool = False) -> torch.fx.GraphModule:
    net = Net().eval()
    if training_dropout:
        net.drop.train()
    return torch.fx.symbolic_trace(net)


def test_eval_identities_are_erased_and_output_unchanged() -> None:
    gm = _trace()
    folded, records = fold_identity(gm)
    assert len(records) == 5 and all(r.applied for r in records)
    kinds = {n.op for n in folded.graph.nodes} - {"placeholder", "output"}
    assert [n.target for n in folded.graph.nodes if n.op == "call_module"] == ["conv", "act"]
    assert kinds == {"call_module", "call_function"}
    x = torch.randn(2, 3, 8, 8)
    assert_same(gm, folded, x, 0.0)
    assert len(gm.graph.nodes) > len(folded.graph.nodes)  # the input module is untouched


def test_training_dropout_is_refused() -> None:
    folded, records = fold_identity(_trace(training_dropout=True))
    (refused,) = [r for r in records if not r.applied]
    assert refused.nodes == ["drop"] and "training" in refused.reason
    assert "drop" in [n.target for n in folded.graph.nodes if n.op == "call_module"]
