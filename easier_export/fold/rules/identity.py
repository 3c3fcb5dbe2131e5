"""Erase ops that are the identity in eval mode, so the linear ops around them become adjacent.

- ``nn.Identity``; dropout modules (``nn.Dropout*``, ``nn.AlphaDropout``, timm ``DropPath``, torchvision
  ``StochasticDepth``) that are not training;
- dropout / stochastic-depth *functions* called with ``training=False``.

(Rectifiers removed by the EASIER stage are already gone from the graph: ``graph.remove_sites`` erases them.)

Every erased node ``y = f(x)`` has its users rewired to ``x``. A dropout still in training mode is refused:
it is random, not the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torchvision.ops import stochastic_depth

from ..fx import bypass, module_of
from ..records import Candidate, Merge
from ..rule import Rule

_DROP_MODULES = (nn.modules.dropout._DropoutNd,)
_DROP_MODULE_NAMES = ("DropPath", "StochasticDepth", "DropBlock2d")

# function -> (position, keyword, default) of its "training" argument
_DROP_FUNCTIONS = {
    F.dropout: (2, "training", True),
    F.dropout1d: (2, "training", True),
    F.dropout2d: (2, "training", True),
    F.dropout3d: (2, "training", True),
    F.alpha_dropout: (2, "training", False),
    F.feature_alpha_dropout: (2, "training", False),
    torch.dropout: (2, "train", None),
    stochastic_depth: (3, "training", True),
}


def _training_flag(node: Node) -> object:
    pos, key, default = _DROP_FUNCTIONS[node.target]
    if key in node.kwargs:
        return node.kwargs[key]
    return node.args[pos] if len(node.args) > pos else default


def identity_reason(gm: GraphModule, node: Node) -> str | None:
    """"" when the node is an eval-mode identity that can be erased, a refusal reason when it is a dropout
    that is not the identity, None when the node is no identity candidate at all."""
    if not node.args or not isinstance(node.args[0], Node):
        return None
    if node.op == "call_function" and node.target in _DROP_FUNCTIONS:
        flag = _training_flag(node)
        return "" if flag is False else f"dropout training={flag!r}: random, not the identity"
    mod = module_of(gm, node)
    if isinstance(mod, nn.Identity):
        return ""
    if isinstance(mod, _DROP_MODULES) or type(mod).__name__ in _DROP_MODULE_NAMES:
        return "dropout module in training mode" if mod.training else ""
    return None


class IdentityRule(Rule):
    """``f(x) = x`` in eval mode: the node is erased and its users read ``x``."""

    kind = "identity"
    needs_shapes = False

    def match(self, gm: GraphModule, node: Node) -> Candidate | None:
        if identity_reason(gm, node) is None:
            return None
        mod = module_of(gm, node)
        detail = type(mod).__name__ if mod is not None else getattr(node.target, "__name__", str(node.target))
        return Candidate([node], node.args[0], [mod], detail)

    def check(self, gm: GraphModule, cand: Candidate) -> str | None:
        return identity_reason(gm, cand.nodes[0]) or None

    def build(self, cand: Candidate) -> Merge:
        return Merge(nn.Identity())

    def rewrite(self, gm: GraphModule, cand: Candidate, merge: Merge) -> None:
        bypass(gm, cand.nodes[0], cand.source)
