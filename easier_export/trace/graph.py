"""Tracing to torch.fx and the rectifier *call sites* EASIER measures and removes.

A call site is one place in the traced graph where a rectifier runs: a module reused twice (torchvision
ResNet's ``relu``) gives two call sites that are measured and linearized separately, and functional calls
(``F.relu``, ``torch.relu_``, ``aten.relu``) count too. Sub-modules whose Python control flow defeats
symbolic tracing (timm VGG's ``ConvMlp``) become leaves; rectifier modules inside them are still call sites,
addressed by module path and linearized by swapping in ``nn.Identity``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from easier_export.core.errors import UserError, first_line

RECTIFIER_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
}
_aten = torch.ops.aten
RECTIFIER_FUNCTIONS: dict[object, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish",
    _aten.relu.default: "relu", _aten.relu_.default: "relu", _aten.gelu.default: "gelu",
    _aten.silu.default: "silu", _aten.silu_.default: "silu", _aten.leaky_relu.default: "leaky_relu",
    _aten.hardtanh.default: "relu6", _aten.hardswish.default: "hardswish",
}
RECTIFIER_METHODS = {"relu": "relu", "relu_": "relu"}
ALL_RECTIFIERS = frozenset(RECTIFIER_MODULES.values())
_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm)


@dataclass(frozen=True)
class CallSite:
    """``name``: fx node name, or module path for a rectifier inside a leaf module."""

    name: str
    op: str
    in_graph: bool = True


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _try_trace(module: nn.Module, leaves: set[str]) -> tuple[fx.GraphModule | None, Exception | None]:
    try:
        tracer = _Tracer(leaves)
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph, module.__class__.__name__), None
    except Exception as e:  # fx raises TraceError, TypeError, AssertionError... for untraceable code
        return None, e


def _untraceable(module: nn.Module, prefix: str = "") -> list[str]:
    """Deepest sub-modules whose own forward cannot be traced (their children trace fine)."""
    if _try_trace(module, set())[0] is not None:
        return []
    deeper = [p for name, child in module.named_children()
              for p in _untraceable(child, f"{prefix}{name}.") if child is not None]
    return deeper or [prefix.rstrip(".")]


_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def split_norm_act(model: nn.Module) -> nn.Module:
    """timm's ``BatchNormAct2d`` runs BatchNorm and its activation in one module; split it into
    ``Sequential(BatchNorm2d, drop, act)`` (same function) so the BN folds and the activation is its own call site.
    Returns a copy when anything was split, ``model`` itself otherwise."""
    fused = [name for name, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d and hasattr(m, "act")]
    if not fused:
        return model
    model = copy.deepcopy(model)
    for name in fused:
        m = model.get_submodule(name)
        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn.load_state_dict({k: v for k, v in m.state_dict().items() if k in _BN_STATE})
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Sequential(bn, m.drop, m.act).train(m.training))
    return model


UNTRACEABLE_ADVICE = ("export it with torch.export (data-dependent branches as torch.cond) and pass the .pt2 "
                      "archive instead, or move the Python control flow into a sub-module, which is then kept whole "
                      "as a leaf")


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolic trace, turning untraceable sub-modules into leaves; a GraphModule is returned as is."""
    if isinstance(model, fx.GraphModule):
        return model
    model = split_norm_act(model)
    gm, err = _try_trace(model, set())
    if gm is not None:
        return gm
    leaves = set(_untraceable(model))
    if "" not in leaves:
        gm, err = _try_trace(model, leaves)
    if gm is None:
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx ({first_line(err)}); {UNTRACEABLE_ADVICE}")
    gm.meta["leaf_modules"] = sorted(leaves)
    return gm


def _node_op(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return RECTIFIER_MODULES.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        return RECTIFIER_FUNCTIONS.get(node.target)  # type: ignore[call-overload]
    if node.op == "call_method":
        return RECTIFIER_METHODS.get(node.target)  # type: ignore[call-overload]
    return None


def find_call_sites(gm: fx.GraphModule, rectifiers: Iterable[str] = ALL_RECTIFIERS) -> list[CallSite]:
    """All rectifier call sites, in execution order, whose kind is in ``rectifiers``."""
    wanted = set(rectifiers)
    unknown = wanted - ALL_RECTIFIERS
    if unknown:
        raise UserError(f"unknown rectifier(s) {sorted(unknown)}; choose from {sorted(ALL_RECTIFIERS)}")
    sites = []
    for node in gm.graph.nodes:
        op = _node_op(gm, node)
        if op in wanted:
            sites.append(CallSite(node.name, op))
        elif node.op == "call_module":  # rectifiers inside a leaf module (one that did not trace)
            for path, mod in gm.get_submodule(node.target).named_modules(prefix=node.target):
                if RECTIFIER_MODULES.get(type(mod)) in wanted:
                    sites.append(CallSite(path, RECTIFIER_MODULES[type(mod)], in_graph=False))
    return sites


def channel_dim(gm: fx.GraphModule, site: CallSite) -> int:
    """Which dim holds units: 1 after conv/BN (NCHW maps), -1 after linear/LayerNorm (tokens)."""
    return _input_unit_dim(gm, node_named(gm, site.name))


def _input_unit_dim(gm: fx.GraphModule, act: fx.Node) -> int:
    node = act.args[0]
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, _CHANNEL_FIRST):
                return 1
            if isinstance(mod, _CHANNEL_LAST):
                return -1
        if node.op == "call_function" and node.target in (F.linear, F.layer_norm, _aten.linear.default):
            return -1
        if node.op == "call_function" and node.target in (F.conv2d, _aten.convolution.default,
                                                          _aten.conv2d.default):
            return 1
        if node.op == "placeholder" or not node.args:
            break
        node = node.args[0] if node.target not in (operator.add, torch.add) else _first_node(node.args)
    return 1


def _first_node(args: tuple) -> fx.Node | None:
    return next((a for a in args if isinstance(a, fx.Node)), None)


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(name)


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
        out.add_submodule(target, Blend(dim=_input_unit_dim(out, act), fit=fits.get(name)))
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
