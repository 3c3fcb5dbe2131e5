"""The rectifier *call sites* EASIER measures and removes, found in a traced graph.

A call site is one place in the traced graph where a rectifier runs: a module reused twice (torchvision
ResNet's ``relu``) gives two call sites that are measured and linearized separately, and functional calls
(``F.relu``, ``torch.relu_``, ``aten.relu``) count too. Rectifier modules inside a leaf module are call sites
addressed by module path.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from easier_export.core.errors import UserError

from .rectifiers import ALL_RECTIFIERS, RECTIFIER_FUNCTIONS, RECTIFIER_METHODS, RECTIFIER_MODULES

_aten = torch.ops.aten
_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm)


@dataclass(frozen=True)
class CallSite:
    """``name``: fx node name, or module path for a rectifier inside a leaf module."""

    name: str
    op: str
    in_graph: bool = True


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
    return input_unit_dim(gm, node_named(gm, site.name))


def input_unit_dim(gm: fx.GraphModule, act: fx.Node) -> int:
    """:func:`channel_dim` of the rectifier node ``act``: the first layer upstream that fixes a layout decides;
    through a residual add, its first input's."""
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
    """The graph node called ``name`` (KeyError if none: a site inside a leaf module has no node)."""
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(name)
