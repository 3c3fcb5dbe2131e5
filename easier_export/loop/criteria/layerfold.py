"""Layer Folding (Dror et al., 2021): trained slopes that turn each rectifier toward the identity."""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import fx, nn

from easier_export.trace.rectifiers import RECTIFIER_MODULES
from easier_export.trace.sites import CallSite, node_named

from .registry import Evidence, register_criterion

LAYERFOLD_PENALTY = 0.1  # λ in L = CE + λ·Σ(1 − α)²


def layerfold_lr(steps: int) -> float:
    """SGD step size with which a slope the task never resists ends at α = 1/2 exactly after ``steps`` steps:
    each step multiplies 1 − α by (1 − 2λ·lr), so (1 − 2λ·lr)^steps = 1/2."""
    return (1.0 - 0.5 ** (1.0 / steps)) / (2.0 * LAYERFOLD_PENALTY)


class Slope(nn.Module):
    """α·x + (1 − α)·act(x): the rectifier at α = 0, the identity at α = 1 (a PReLU-like slope toward linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + (1 - self.alpha) * y


_OUT_OF_PLACE: dict[object, object] = {torch.relu_: torch.relu, F.relu_: F.relu,
                                        torch.ops.aten.relu_.default: torch.ops.aten.relu.default,
                                        torch.ops.aten.silu_.default: torch.ops.aten.silu.default}


def _out_of_place(gm: fx.GraphModule) -> None:
    """The slope reads the rectifier's input after the rectifier ran: no rectifier may overwrite it."""
    for mod in gm.modules():
        if type(mod) in RECTIFIER_MODULES and hasattr(mod, "inplace"):
            mod.inplace = False
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.target = _OUT_OF_PLACE.get(node.target, node.target)
            if node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target == "relu_":
            node.target = "relu"
    gm.recompile()


def with_slopes(gm: fx.GraphModule, sites: list[CallSite]) -> tuple[fx.GraphModule, dict[str, Slope]]:
    """A copy of ``gm`` in which every site's output is mixed with its input by its own :class:`Slope`."""
    model = copy.deepcopy(gm)
    _out_of_place(model)
    slopes: dict[str, Slope] = {}
    for site in sites:
        slope = slopes[site.name] = Slope()
        if site.in_graph:
            node = node_named(model, site.name)
            target = f"_layerfold_{len(slopes)}"
            model.add_submodule(target, slope)
            with model.graph.inserting_after(node):
                mixed = model.graph.call_module(target, (node.args[0], node))
            node.replace_all_uses_with(mixed, delete_user_cb=lambda user, mixed=mixed: user is not mixed)
        else:  # inside a leaf module: a forward hook replaces the rectifier's output
            model.get_submodule(site.name).register_forward_hook(lambda _m, args, out, s=slope: s(args[0], out))
    model.recompile()
    return model, slopes


@register_criterion("layerfold")
def layerfold_scores(ev: Evidence) -> dict[str, float]:
    """Layer Folding ("Layer Folding: Neural Network Depth Reduction using Activation Linearization"), as the
    EASIER authors ran it for their comparison: every rectifier becomes α·x + (1 − α)·act(x), and the slopes α
    (from 0) are trained on CE + λ·Σ(1 − α)² (λ = LAYERFOLD_PENALTY, plain SGD, ``ev.batches`` steps of
    :func:`layerfold_lr`); the score is 1 − α (unclamped, so no ties), and the most linear site goes first. Here
    only the slopes train (weights frozen): it ranks sites in a few steps, where the paper trains weights and
    slopes together. A site whose pre-activations are all ≥ 0 is already linear: the task gradient on its α is
    exactly zero and it ends at α = 1/2; a site the task needs ends lower."""
    model, slopes = with_slopes(ev.gm, ev.sites)
    model.to(ev.device).train(ev.train_mode)
    model.requires_grad_(False)
    alphas = [s.alpha.requires_grad_(True) for s in slopes.values()]
    steps = max(ev.batches if ev.batches is not None else len(ev.loader), 1)  # type: ignore[arg-type]
    opt = torch.optim.SGD(alphas, lr=layerfold_lr(steps))
    for x, y in itertools.islice(ev.loader, steps):
        penalty = sum((1 - a) ** 2 for a in alphas)
        loss = F.cross_entropy(model(x.to(ev.device)), y.to(ev.device)) + LAYERFOLD_PENALTY * penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {name: 1.0 - float(s.alpha.detach()) for name, s in slopes.items()}
