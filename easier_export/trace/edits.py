"""Editing call sites: removing them (the identity or an absorbed affine stand-in), blending them out over a
round (``--anneal``), moving padding so that removed ones merge exactly, and swapping their kind (the
rectifier ablation).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn

from easier_export.core.errors import UserError

from .rectifiers import MODULE_OF_KIND
from .sites import find_call_sites, input_unit_dim, node_named


def _sole_conv(gm: fx.GraphModule, node: object) -> nn.Conv2d | None:
    """The Conv2d a call_module node runs, if that module is called from this node only."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return None
    mod = gm.get_submodule(node.target)
    calls = sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes)
    return mod if isinstance(mod, nn.Conv2d) and calls == 1 else None


def relocate_padding(gm: fx.GraphModule, act: fx.Node) -> bool:
    """conv1 [→ BN] → act → conv2: move conv2's zero padding onto conv1 (p1 += s1·p2, p2 = 0).

    Once ``act`` is gone, conv1·conv2 merge exactly only if conv2 pads nothing (its padding would otherwise
    see conv1's real border outputs in the merged kernel). Moving the padding changes border values, so the
    loop applies it *before* finetuning. Returns whether it applied.
    """
    users = list(act.users)
    conv2 = _sole_conv(gm, users[0]) if len(users) == 1 else None
    producer = act.args[0]
    if isinstance(producer, fx.Node) and producer.op == "call_module" and len(producer.users) == 1 and isinstance(
            gm.get_submodule(producer.target), nn.BatchNorm2d):
        producer = producer.args[0]
    conv1 = _sole_conv(gm, producer)
    if conv1 is None or conv2 is None or isinstance(conv2.padding, str) or isinstance(conv1.padding, str):
        return False
    if conv1.padding_mode != "zeros" or conv2.padding_mode != "zeros" or not any(conv2.padding):
        return False
    conv1.padding = tuple(p1 + s1 * p2 for p1, s1, p2 in zip(conv1.padding, conv1.stride, conv2.padding,
                                                              strict=True))
    conv2.padding = (0, 0)
    return True


@dataclass
class AffineFit:
    """A removed activation's per-unit stand-in ``scale·x + shift`` along ``dim`` of its input (``--substitute
    affine``; fitted by :mod:`easier_export.loop.affine`)."""

    scale: torch.Tensor
    shift: torch.Tensor
    dim: int


_ABSORBERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def absorber(gm: fx.GraphModule, name: str) -> tuple[nn.Module | None, str]:
    """The module that can take call site ``name``'s affine stand-in into its weights, or None and why not.

    Exact when the activation's input is that module's output and nothing else reads it: scaling a Linear's
    rows, a conv's output channels or a BatchNorm's affine by ``a`` and shifting its bias by ``b`` turns its
    output y into a·y + b (per unit) everywhere that output goes.
    """
    try:
        act = node_named(gm, name)
    except KeyError:
        return None, "it runs inside a module torch.fx could not trace"
    x = act.args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_module"):
        return None, f"its input comes from {getattr(x, 'name', x)}, not from a layer with weights"
    mod = gm.get_submodule(x.target)
    # the exact types: a subclass (a parametrized module, weight_norm, QAT fused modules) or a hooked module may not
    # compute weight·x + bias from the stored weight, and scaling it would be silently lost
    if type(mod) not in _ABSORBERS or getattr(mod, "weight", None) is None:
        return None, f"its input comes from a {type(mod).__name__}, which cannot absorb a per-unit scale"
    if mod._forward_hooks or mod._forward_pre_hooks:
        return None, f"{x.target} has forward hooks: its output may not be weight·x + bias"
    if len(x.users) != 1:
        return None, f"{x.target}'s output is also read by {', '.join(u.name for u in x.users if u is not act)}"
    if sum(n.op == "call_module" and n.target == x.target for n in gm.graph.nodes) != 1:
        return None, f"{x.target} is called more than once"
    own = {id(p) for p in mod.parameters()}
    if sum(id(p) in own for _, p in gm.named_parameters(remove_duplicate=False)) != len(own) or any(
            n.op == "get_attr" and n.target.startswith(f"{x.target}.") for n in gm.graph.nodes):
        return None, f"{x.target}'s weights are shared or read elsewhere"
    return mod, ""


def absorb(module: nn.Module, fit: AffineFit) -> None:
    """``scale·module(x) + shift`` → ``module'(x)`` in place: output units scaled, bias shifted (a module without
    bias was fitted with shift 0). Exact; :func:`absorber` chose ``module``."""
    with torch.no_grad():
        module.weight.mul_(fit.scale.to(module.weight).reshape(-1, *[1] * (module.weight.dim() - 1)))
        if module.bias is not None:
            module.bias.mul_(fit.scale.to(module.bias)).add_(fit.shift.to(module.bias))


class Blend(nn.Module):
    """``(1 − α)·act(x) + α·s(x)``: a removed activation faded out during finetuning (α from 0 to 1) rather
    than switched off at once, so the network adapts along a path instead of after a jump (``--anneal``).
    ``s`` is the identity, or the site's :class:`AffineFit` (``--substitute affine``).

    In the graph it receives the activation's input and output (``act`` runs on a clone of the input, so an
    in-place rectifier cannot overwrite the x it is blended with); inside a leaf module it wraps ``act``.
    """

    def __init__(self, act: nn.Module | None = None, dim: int | None = None, fit: AffineFit | None = None) -> None:
        super().__init__()
        self.act, self.alpha, self.dim, self.fit = act, 0.0, dim, fit

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = self.act(x.clone())  # type: ignore[misc]
        if self.fit is None:
            return y + self.alpha * (x - y)
        shape = [1] * x.dim()
        shape[self.fit.dim] = -1
        stand_in = x * self.fit.scale.to(x).reshape(shape) + self.fit.shift.to(x).reshape(shape)
        return y + self.alpha * (stand_in - y)


def blend_sites(gm: fx.GraphModule, names: Iterable[str], relocate: bool = False,
                fits: Mapping[str, AffineFit] | None = None) -> fx.GraphModule:
    """A copy of ``gm`` whose named call sites run through a :class:`Blend` at α = 0 (the same function as
    ``gm``); :func:`settle` turns them into their stand-in: the identity, or for a site in ``fits`` (in the
    graph, :func:`absorber` accepted) its affine fit. ``relocate``: see :func:`remove_sites`."""
    names = list(names)
    fits = fits or {}
    out = copy.deepcopy(gm)
    out.meta["blended"] = names
    in_graph = {n.name: n for n in out.graph.nodes}
    for name in names:
        if name not in in_graph:
            try:
                out.get_submodule(name)
            except AttributeError:
                raise UserError(f"no activation call site named '{name}' in the model") from None
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, Blend(out.get_submodule(name)))
            continue
        act = in_graph[name]
        if relocate:
            relocate_padding(out, act)
        x = act.args[0]
        target = f"blend_{name}"
        out.add_submodule(target, Blend(dim=input_unit_dim(out, act), fit=fits.get(name)))
        with out.graph.inserting_before(act):
            act.update_arg(0, out.graph.call_method("clone", (x,)))
        with out.graph.inserting_after(act):
            blend = out.graph.call_module(target, (x, act))
        act.replace_all_uses_with(blend, delete_user_cb=lambda user, blend=blend: user is not blend)
    out.graph.lint()
    out.recompile()
    return out


def fade(gm: nn.Module, alpha: float) -> None:
    """Set α of every :class:`Blend` in ``gm`` (0: the activations as they were, 1: removed)."""
    for mod in gm.modules():
        if isinstance(mod, Blend):
            mod.alpha = alpha


def settle(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with every :class:`Blend` replaced by its stand-in, an affine one absorbed into the layer
    before it: at α = 1 the function it computes (up to rounding), minus the activation, its input clone and the
    blend itself. Adds the blended sites to ``meta['removed']`` in the order they were blended."""
    return _settle_in_place(copy.deepcopy(gm))


def _settle_in_place(out: fx.GraphModule) -> fx.GraphModule:
    """:func:`settle` on ``out`` itself (for a copy nobody else holds: :func:`remove_sites` copies once, not twice)."""
    for node in list(out.graph.nodes):
        mod = out.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, Blend):
            x, act = node.args
            if mod.fit is not None:
                absorb(out.get_submodule(x.target), mod.fit)
            clone = act.args[0]
            node.replace_all_uses_with(x)
            for dead in (node, act, clone):
                out.graph.erase_node(dead)
            out.delete_submodule(node.target)
    for path, mod in list(out.named_modules()):
        if isinstance(mod, Blend):
            parent, _, attr = path.rpartition(".")
            setattr(out.get_submodule(parent), attr, nn.Identity())
    out.graph.lint()
    out.recompile()
    out.meta["removed"] = list(out.meta.get("removed", [])) + out.meta.pop("blended", [])
    return out


def remove_sites(gm: fx.GraphModule, names: Iterable[str], relocate: bool = False,
                 fits: Mapping[str, AffineFit] | None = None) -> fx.GraphModule:
    """A copy of ``gm`` with the named call sites replaced by the identity, or for a site in ``fits`` by its
    affine stand-in absorbed into the layer before it (the rest untouched).

    ``relocate``: also move padding across each removed activation between two convs (see
    :func:`relocate_padding`); the order of ``names`` matters then, so replay them in removal order.
    """
    return _settle_in_place(blend_sites(gm, names, relocate, fits))


def swap_rectifiers(gm: fx.GraphModule, old: str, new: str) -> fx.GraphModule:
    """A copy of ``gm`` in which every call site of kind ``old`` computes ``new`` instead (the EASIER paper's
    rectifier ablation: ReLU → LeakyReLU(0.01) / GELU / SiLU, then finetune to recover). Each site gets its own
    fresh module, so sites stay separately removable; everything else is untouched."""
    if new not in MODULE_OF_KIND:
        raise UserError(f"cannot swap to '{new}'; choose from {', '.join(MODULE_OF_KIND)}")
    out = copy.deepcopy(gm)
    for i, site in enumerate(find_call_sites(out, [old])):
        if site.in_graph:
            node = node_named(out, site.name)
            target = f"_{new}_{i}"
            out.add_submodule(target, MODULE_OF_KIND[new]())
            with out.graph.inserting_after(node):
                swapped = out.graph.call_module(target, (node.args[0],))
            node.replace_all_uses_with(swapped)
            out.graph.erase_node(node)
        else:
            parent, _, attr = site.name.rpartition(".")
            setattr(out.get_submodule(parent), attr, MODULE_OF_KIND[new]())
    out.graph.lint()
    out.recompile()
    return out
