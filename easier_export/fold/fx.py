"""torch.fx graph surgery shared by the folding rules: reading the pattern around a node, replacing a subgraph.

Every rewrite works on a copy (``fresh_copy``), so a pass never mutates its caller's module.
"""

from __future__ import annotations

import copy
import operator
import re

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

ORIGIN_META_KEY = "origin"
"""``node.meta[ORIGIN_META_KEY]``: names of the nodes of the traced model a node stands for, when tracked (fold
groups map merges back to the activations between them); merged nodes carry the union, in order."""


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


def sharing_reason(gm: GraphModule, group: list[Node]) -> str | None:
    """Why a subgraph cannot be rewritten in place, or None: each module in it must be called from this place
    only, and every output but the last must be read inside the subgraph only."""
    for n in group:
        if n.op == "call_module" and (calls := calls_to(gm, n.target)) > 1:
            return f"module {n.target} is shared: called at {calls} sites"
    for n in group[:-1]:
        if len(n.users) > 1:
            return f"fan-out: {n.name} output has {len(n.users)} users"
    return None


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
