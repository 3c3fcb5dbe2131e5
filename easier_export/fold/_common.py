"""Shared pieces of the folding passes: the record type, fx graph surgery, and exact float64 conv building.

Every merge is built in float64 and checked against the original subgraph (also run in float64) at the static
input shape before it is accepted: a merge that is not exact to ``EXACT_RTOL`` is refused with a reason, never
shipped.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

ORIGIN_META_KEY = "origin"
"""``node.meta[ORIGIN_META_KEY]``: names of the nodes of the traced model a node stands for, when tracked (fold
groups map merges back to the activations between them); merged nodes carry the union, in order."""

EXACT_RTOL = 1e-9
"""Largest float64 relative error (to the output scale) at which a merged op counts as exact."""

PADDING_REASON = "padding: border values differ (needs padding relocation)"


@dataclass
class FoldRecord:
    """One candidate rewrite, applied or not, for the report."""

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
    """Outcome of building a merged op: the module, or why it was refused (like a rewriter MatchResult)."""

    module: nn.Module | None
    reason: str = ""
    error: float = 0.0

    @property
    def ok(self) -> bool:
        return self.module is not None


def refuse(reason: str) -> Merge:
    return Merge(None, reason)


class BiasMapConv2d(nn.Conv2d):
    """Conv2d plus a per-position bias map of shape (C, H, W), broadcast over the batch.

    It is the exact constant part of a merged conv chain whose inner zero padding made the bias depend on the
    position (the border sees fewer bias taps). Valid only at the static spatial size it was built for.
    """

    def __init__(self, *args, bias_map: Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.bias_map


# ---------------------------------------------------------------------------------------------- fx helpers


def propagate_shapes(gm: GraphModule, example: Tensor) -> None:
    """Annotate every node with ``meta['tensor_meta']`` at the static shape of ``example``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(example)


def shape_of(node: Node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def module_of(gm: GraphModule, node: Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def sole_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def single_input(node: Node) -> Node | None:
    """The node's only tensor input when it is called as ``f(x)``, else None."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], Node):
        return node.args[0]
    return None


def calls_to(gm: GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def private_module(
    gm: GraphModule, node: Node, kind: type[nn.Module] | tuple[type[nn.Module], ...]
) -> nn.Module | None:
    """The module of a ``call_module`` node when it is a ``kind``, called as ``m(x)`` and by no other node.

    A module shared by two call sites must not be rewritten for one of them.
    """
    mod = module_of(gm, node)
    if isinstance(mod, kind) and single_input(node) is not None and calls_to(gm, node.target) == 1:
        return mod
    return None


def add_operands(node: Node) -> tuple[Node, Node] | None:
    """``(a, b)`` when the node computes ``a + b`` for two tensors (``+``, ``torch.add`` without alpha)."""
    is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target == "add"
    )
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    return (a, b) if isinstance(a, Node) and isinstance(b, Node) else None


def unique_name(gm: GraphModule, base: str) -> str:
    base = re.sub(r"(_folded(_\d+)?)+$", "", base.replace(".", "_")) + "_folded"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def replace_subgraph(gm: GraphModule, nodes: list[Node], module: nn.Module, source: Node) -> Node:
    """Replace ``nodes`` (topological order; only the last one used outside) by ``module(source)``."""
    last = nodes[-1]
    name = unique_name(gm, last.target if last.op == "call_module" else last.name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(name, (source,))
    new.meta["tensor_meta"] = last.meta.get("tensor_meta")
    if any(ORIGIN_META_KEY in n.meta for n in nodes):
        new.meta[ORIGIN_META_KEY] = tuple(name for n in nodes for name in n.meta.get(ORIGIN_META_KEY, ()))
    last.replace_all_uses_with(new)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    return new


@dataclass
class Candidate:
    """A subgraph that one merged op could replace."""

    kind: str
    nodes: list[Node]  # topological order; only the last one is used outside the subgraph
    source: Node  # the subgraph's single external input
    modules: list[nn.Module]  # the linear ops to merge, in the order the rule's builder expects
    detail: str
    refusal: str = ""  # the pattern is there but cannot be rewritten in place (onnxscript's MatchResult reason)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def in_shape(self) -> torch.Size:
        return shape_of(self.source)


def fold_to_fixpoint(
    gm: GraphModule,
    example: Tensor,
    match: Callable[[GraphModule, Node], Candidate | None],
    build: Callable[[Candidate], Merge],
) -> tuple[GraphModule, list[FoldRecord]]:
    """Apply every exact merge ``match`` finds, again and again (a merged op may match anew), on a copy; a match
    that comes with a refusal is recorded once, with its reason."""
    gm = fresh_copy(gm)
    propagate_shapes(gm, example)
    records: list[FoldRecord] = []
    refused: set[tuple[str, ...]] = set()
    changed = True
    while changed:
        changed = False
        for node in gm.graph.nodes:
            cand = match(gm, node)
            if cand is None or tuple(cand.names) in refused:
                continue
            if cand.refusal:
                records.append(FoldRecord(cand.kind, cand.names, cand.detail, False, cand.refusal))
                refused.add(tuple(cand.names))
                continue
            merge = build(cand)
            detail = f"{cand.detail} -> {describe(merge.module)}" if merge.ok else cand.detail
            records.append(FoldRecord(cand.kind, cand.names, detail, merge.ok, merge.reason))
            if not merge.ok:
                refused.add(tuple(cand.names))
                continue
            replace_subgraph(gm, cand.nodes, merge.module, cand.source)
            changed = True
            break
    return finish(gm), records


def bypass(gm: GraphModule, node: Node, source: Node) -> None:
    """Erase ``node``, rewiring its users to ``source``."""
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)


def finish(gm: GraphModule) -> GraphModule:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def fresh_copy(gm: GraphModule) -> GraphModule:
    """Passes never mutate the caller's module."""
    return copy.deepcopy(gm)


# ---------------------------------------------------------------------------------------------- numerics


def as_float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double()


def rel_err(got: Tensor, want: Tensor) -> float:
    scale = want.abs().max().clamp_min(1e-300)
    return float((got - want).abs().max() / scale)


def conv_geometry(conv: nn.Conv2d) -> str:
    kh, kw = conv.kernel_size
    kernel = f"{kh}x{kw}"
    if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:
        text = f"conv {kernel} dw {conv.out_channels}"
    else:
        groups = f" g{conv.groups}" if conv.groups > 1 else ""
        text = f"conv {kernel} {conv.in_channels}->{conv.out_channels}{groups}"
    if conv.stride != (1, 1):
        text += f" s{conv.stride[0]}"
    if conv.dilation != (1, 1):
        text += f" d{conv.dilation[0]}"
    if isinstance(conv, BiasMapConv2d):
        text += " +map"
    return text


def describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return conv_geometry(module)
    if isinstance(module, nn.Linear):
        return f"linear {module.in_features}->{module.out_features}"
    return type(module).__name__


def plain_conv2d_reason(conv: nn.Module) -> str:
    """Why a module cannot take part in a conv merge, or "" when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} is not zero padding"
    if isinstance(conv.padding, str):
        return f"padding {conv.padding!r} is not numeric"
    return ""


def bias64(module: nn.Module) -> Tensor:
    """float64 bias of a conv/linear, zeros when it has none."""
    if module.bias is not None:
        return module.bias.detach().double()
    return torch.zeros(module.weight.shape[0], dtype=torch.float64)


def dilated_weight(conv: nn.Conv2d) -> Tensor:
    """float64 weight with the dilation written into the kernel as zero taps (result dilation 1)."""
    w = conv.weight.detach().double()
    dh, dw = conv.dilation
    if (dh, dw) == (1, 1):
        return w
    o, i, kh, kw = w.shape
    out = w.new_zeros(o, i, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[:, :, ::dh, ::dw] = w
    return out


def expand_groups(w: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return w
    o, ig, kh, kw = w.shape
    og = o // groups
    out = w.new_zeros(o, ig * groups, kh, kw)
    for g in range(groups):
        out[g * og : (g + 1) * og, g * ig : (g + 1) * ig] = w[g * og : (g + 1) * og]
    return out


def verified_conv(
    reference: Callable[[Tensor], Tensor],
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
    in_shape: torch.Size,
    dtype: torch.dtype,
    inexact_reason: str,
) -> Merge:
    """Build the conv with the given float64 linear part whose constant part is ``reference(0)``; accept it
    only if it reproduces ``reference`` (a float64 affine map) on random inputs at the static shape.

    The composite is affine, so ``f(x) = L(x) + f(0)``: ``f(0)`` becomes the conv bias when it is constant per
    channel, else a (C, H, W) bias map. The check catches what the weight algebra cannot see (zero padding
    between merged convs meeting real pixels, a crop by stride).
    """
    probe_shape = (2, *in_shape[1:])
    with torch.no_grad():
        constant = reference(torch.zeros(probe_shape[1:], dtype=torch.float64)[None])[0]
        merged = conv_with_constant(weight, stride, padding, groups, constant)
        x = torch.randn(probe_shape, dtype=torch.float64)
        want, got = reference(x), merged(x)
    if got.shape != want.shape:
        return refuse(f"output size differs: {tuple(want.shape[1:])} -> {tuple(got.shape[1:])}")
    err = rel_err(got, want)
    if err > EXACT_RTOL:
        return Merge(None, inexact_reason, err)
    return Merge(merged.to(dtype), "", err)


def conv_with_constant(
    weight: Tensor, stride: tuple[int, int], padding: tuple[int, int], groups: int, constant: Tensor
) -> nn.Conv2d:
    """float64 Conv2d with ``weight``; ``constant`` (C, H, W) becomes its bias or, if varying, a bias map."""
    out_ch, in_per_group, kh, kw = weight.shape
    spread = (constant - constant[:, :1, :1]).abs().max()
    uniform = bool(spread <= 1e-12 * constant.abs().max().clamp_min(1.0))
    kwargs = dict(stride=stride, padding=padding, groups=groups, dtype=torch.float64)
    if uniform:
        conv = nn.Conv2d(in_per_group * groups, out_ch, (kh, kw), bias=True, **kwargs)
        conv.bias.data.copy_(constant[:, 0, 0])
    else:
        conv = BiasMapConv2d(in_per_group * groups, out_ch, (kh, kw), bias=False, bias_map=constant, **kwargs)
    conv.weight.data.copy_(weight)
    return conv.eval()


def sharing_reason(gm: GraphModule, group: list[Node]) -> str:
    """Why a subgraph cannot be rewritten in place, or "": each module in it must be called from this place only,
    and every output but the last must be read inside the subgraph only."""
    for n in group:
        if n.op == "call_module" and (calls := calls_to(gm, n.target)) > 1:
            return f"module {n.target} is shared: called at {calls} sites"
    for n in group[:-1]:
        if len(n.users) > 1:
            return f"fan-out: {n.name} output has {len(n.users)} users"
    return ""


def match_pair(gm: GraphModule, node: Node, kind: type[nn.Module], name: str,
               explain: bool = False) -> Candidate | None:
    """``second(first(x))`` where both are private ``kind`` modules and ``first``'s output feeds only ``second``.

    ``explain``: a pair that is there but shared or fanned out comes back with its ``refusal`` instead of None.
    """
    src = single_input(node)
    second, first = module_of(gm, node), module_of(gm, src) if src is not None else None
    if not (isinstance(second, kind) and isinstance(first, kind) and single_input(src) is not None):
        return None
    refusal = sharing_reason(gm, [src, node])
    if refusal and not explain:
        return None
    return Candidate(name, [src, node], src.args[0], [first, second], f"{describe(first)} · {describe(second)}",
                     refusal)
