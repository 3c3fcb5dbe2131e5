"""Move a LayerNorm's affine into the Linear(s) that solely consume it."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ..fx import calls_to, module_of, private_module
from ..numerics import bias64
from ..records import Candidate, Merge
from ..rule import Rule


def _absorb_affine(lin: nn.Linear, gamma: Tensor, beta: Tensor) -> nn.Linear:
    """``lin(gamma * n + beta)`` as a Linear of ``n``."""
    w = lin.weight.detach().double()
    out = nn.Linear(lin.in_features, lin.out_features, bias=True, dtype=lin.weight.dtype)
    out.weight.data.copy_(w * gamma)
    out.bias.data.copy_(w @ beta + bias64(lin))
    return out


class LayerNormAffineRule(Rule):
    """The affine of a LayerNorm before the Linear(s) that solely consume it::

        LN(x) = n(x) * g + beta,   W LN(x) + b = (W diag g) n(x) + (W beta + b)

    so the LayerNorm keeps only its normalisation (``elementwise_affine=False``).
    """

    kind = "layernorm_affine"
    needs_shapes = False

    def match(self, gm: GraphModule, node: Node) -> Candidate | None:
        ln = module_of(gm, node)
        if not isinstance(ln, nn.LayerNorm):
            return None
        users = list(node.users)
        detail = f"LayerNorm {ln.normalized_shape[0]} -> {len(users)} Linear"
        return Candidate([node, *users], None, [ln, *(module_of(gm, u) for u in users)], detail)

    def check(self, gm: GraphModule, cand: Candidate) -> str | None:
        ln_node = cand.nodes[0]
        ln = module_of(gm, ln_node)
        if ln.weight is None and ln.bias is None:
            return "no affine"
        if calls_to(gm, ln_node.target) != 1:
            return "LayerNorm module is called at several sites"
        if len(ln.normalized_shape) != 1:
            return f"normalized_shape {tuple(ln.normalized_shape)} is not the last dim only"
        for user in ln_node.users:
            if private_module(gm, user, nn.Linear) is None:
                return f"output feeds {user.name}, not only private Linears"
        return None

    def build(self, cand: Candidate) -> Merge:
        """The plain LayerNorm, then each Linear with the affine absorbed."""
        ln, *linears = cand.modules
        dim = ln.normalized_shape[0]
        gamma = ln.weight.detach().double() if ln.weight is not None else torch.ones(dim, dtype=torch.float64)
        beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros(dim, dtype=torch.float64)
        plain = nn.LayerNorm(dim, eps=ln.eps, elementwise_affine=False)
        return Merge(nn.ModuleList([plain, *(_absorb_affine(lin, gamma, beta) for lin in linears)]))

    def rewrite(self, gm: GraphModule, cand: Candidate, merge: Merge) -> None:
        for node, module in zip(cand.nodes, merge.module, strict=True):
            gm.set_submodule(node.target, module)
