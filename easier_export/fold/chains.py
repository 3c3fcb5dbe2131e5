"""Chains: runs of linear ops each solely feeding the next, the unit the planner partitions into merges."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.fx import GraphModule, Node

from .fx import add_operands, private_module, single_input, sole_user
from .rules import chain_rule


@dataclass
class Chain:
    """Linear ops each solely feeding the next, optionally closed by ``add(last, skip)`` over the chain input.

    Elements are the ops, then the add (if any); a segment that includes the add must start at element 0.
    """

    nodes: list[Node]
    modules: list[nn.Module]
    add: Node | None = None
    skip_node: Node | None = None  # a conv on the chain input feeding the add; None: identity skip
    skip: nn.Module | None = None

    @property
    def source(self) -> Node:
        return self.nodes[0].args[0]

    @property
    def length(self) -> int:
        return len(self.nodes) + (self.add is not None)


def _next_in_chain(gm: GraphModule, node: Node) -> Node | None:
    """The op after ``node`` in its chain: the sole user that a pair rule merges with it, in place."""
    user = sole_user(node)
    rule = chain_rule(gm.get_submodule(user.target)) if user is not None and user.op == "call_module" else None
    cand = rule.accepted(gm, user) if rule is not None else None
    return user if cand is not None and cand.nodes[0] is node else None


def _closing_add(gm: GraphModule, chain: Chain) -> None:
    """Attach ``add(chain_out, x)`` or ``add(chain_out, conv(x))`` to a conv chain over input ``x``."""
    last = chain.nodes[-1]
    add = sole_user(last)
    operands = add_operands(add) if add is not None else None
    if operands is None or not isinstance(chain.modules[0], nn.Conv2d):
        return
    skip = operands[1] if operands[0] is last else operands[0]
    if skip is chain.source:
        chain.add = add
        return
    conv = private_module(gm, skip, nn.Conv2d)
    if conv is not None and skip is not last and sole_user(skip) is add and single_input(skip) is chain.source:
        chain.add, chain.skip_node, chain.skip = add, skip, conv


def find_chains(gm: GraphModule) -> list[Chain]:
    """Maximal chains in graph order; a conv that is another chain's parallel skip branch starts none."""
    chains, claimed = [], set()
    for node in gm.graph.nodes:
        first = private_module(gm, node, (nn.Conv2d, nn.Linear))
        if first is None or node in claimed:
            continue
        prev = single_input(node)
        if prev is not None and _next_in_chain(gm, prev) is node:
            continue  # not a head
        chain = Chain([node], [first])
        while (nxt := _next_in_chain(gm, chain.nodes[-1])) is not None:
            chain.nodes.append(nxt)
            chain.modules.append(gm.get_submodule(nxt.target))
        _closing_add(gm, chain)
        if chain.length > 1:
            chains.append(chain)
            claimed.update(chain.nodes)
            if chain.skip_node is not None:
                claimed.add(chain.skip_node)
    return chains
