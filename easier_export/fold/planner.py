"""Choose which exact merges to apply by measuring them (mode "auto").

A merge is exact but not always faster: pw 1x1 -> dw 3x3 merges into a dense 3x3 conv that costs ~C_in/1 times
the depthwise FLOPs. The planner finds *chains* of mergeable ops (conv -> conv -> ... or linear -> linear ...,
each the sole user of the previous, optionally closed by a residual add over the chain), times every element
and every exact merged segment as a tiny ONNX graph in onnxruntime on the target at batch 1, and partitions
each chain by dynamic programming (LayerMerge-style)::

    best[j] = min_{i <= j} best[i - 1] + cost(i..j),   cost(i..i) = original op,  cost(i..j) = merged op

Timings are cached in a JSON latency table keyed by the op signature, so reruns measure nothing twice.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ..io import save_json
from ._common import (
    BiasMapConv2d,
    FoldRecord,
    Merge,
    add_operands,
    describe,
    finish,
    fresh_copy,
    private_module,
    propagate_shapes,
    replace_subgraph,
    shape_of,
    single_input,
    sole_user,
)
from .conv_conv import compose_convs, match_conv_pair
from .linear_linear import compose_linears, match_linear_pair
from .residual import merge_parallel

logger = logging.getLogger(__name__)

MAX_SEGMENT = 6
"""Longest run of ops the planner tries to merge into one."""

_OPSET = 17


# ---------------------------------------------------------------------------------------------- timing


def _tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


Shape = tuple[int, ...]


def _op_graph(module: nn.Module | None, in_shape: Shape, out_shape: Shape) -> onnx.ModelProto:
    """A one-op ONNX model with random initializers; ``module=None`` times ``Add(x, y)``."""
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)]
    inits, nodes = [], []
    if module is None:
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, in_shape))
        nodes.append(helper.make_node("Add", ["x", "y"], ["out"]))
    elif isinstance(module, nn.Conv2d):
        inits.append(_tensor("w", rng.standard_normal(tuple(module.weight.shape))))
        conv_in = ["x", "w"]
        if module.bias is not None:
            inits.append(_tensor("b", rng.standard_normal(module.out_channels)))
            conv_in.append("b")
        map_ = isinstance(module, BiasMapConv2d)
        nodes.append(helper.make_node(
            "Conv", conv_in, ["conv" if map_ else "out"], kernel_shape=list(module.kernel_size),
            strides=list(module.stride), pads=_onnx_pads(module),
            dilations=list(module.dilation), group=module.groups))
        if map_:
            inits.append(_tensor("map", rng.standard_normal(tuple(module.bias_map.shape))))
            nodes.append(helper.make_node("Add", ["conv", "map"], ["out"]))
    else:  # nn.Linear
        inits.append(_tensor("w", rng.standard_normal((module.in_features, module.out_features))))
        inits.append(_tensor("b", rng.standard_normal(module.out_features)))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["mm"]))
        nodes.append(helper.make_node("Add", ["mm", "b"], ["out"]))
    graph = helper.make_graph(nodes, "op", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                     out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=8)


def _onnx_pads(conv: nn.Conv2d) -> list[int]:
    """ONNX pads (begin..., end...); a string padding ("same"/"valid") is approximated for timing only."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        pad = [d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return pad + pad
    return [*conv.padding, *conv.padding]


def _signature(module: nn.Module | None, in_shape: Shape) -> str:
    if module is None:
        return f"add|{in_shape}"
    if isinstance(module, nn.Conv2d):
        return (f"conv|{in_shape}|w{tuple(module.weight.shape)}|s{module.stride}|p{module.padding}"
                f"|d{module.dilation}|g{module.groups}|b{module.bias is not None}"
                f"|map{isinstance(module, BiasMapConv2d)}")
    return f"linear|{in_shape}|{module.in_features}x{module.out_features}"


@dataclass
class LatencyTable:
    """Median onnxruntime latency (us, net of the per-call overhead) of single ops, cached as JSON."""

    target: str = "cpu"
    threads: int | None = None
    cache: pathlib.Path | None = None
    warmup: int = 5
    repeats: int = 25
    table: dict[str, float] = field(default_factory=dict)
    _overhead: float | None = None

    def __post_init__(self) -> None:
        if self.cache is not None and self.cache.exists():
            try:
                self.table = dict(json.loads(self.cache.read_text()))
            except (ValueError, TypeError, OSError) as e:  # a damaged cache only costs re-measuring
                logger.warning("ignoring unreadable latency table %s (%s)", self.cache, e)

    @property
    def providers(self) -> list[str]:
        if self.target == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _prefix(self) -> str:
        return f"{self.providers[0]}|t{self.threads}|"

    def latency(self, module: nn.Module | None, in_shape: Shape, out_shape: Shape) -> float:
        in_shape, out_shape = (1, *in_shape[1:]), (1, *out_shape[1:])
        key = self._prefix() + _signature(module, in_shape)
        if key not in self.table:
            self.table[key] = max(self._time(_op_graph(module, in_shape, out_shape)) - self.overhead, 0.0)
        return self.table[key]

    @property
    def overhead(self) -> float:
        """Cost of one session call on a trivial graph, subtracted so k ops are not charged k calls."""
        if self._overhead is None:
            self._overhead = self._time(_op_graph(None, (1, 1), (1, 1)))
        return self._overhead

    def _time(self, model: onnx.ModelProto) -> float:
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=self.providers)
        feeds = {
            i.name: np.random.default_rng(1).standard_normal(
                [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input
        }
        for _ in range(self.warmup):
            sess.run(None, feeds)
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            sess.run(None, feeds)
            samples.append((time.perf_counter() - start) * 1e6)
        return statistics.median(samples)

    def save(self) -> None:
        if self.cache is not None:
            save_json(dict(sorted(self.table.items())), self.cache)


# ---------------------------------------------------------------------------------------------- chains


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
    user = sole_user(node)
    if user is None:
        return None
    cand = match_conv_pair(gm, user) or match_linear_pair(gm, user)
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
    if conv is not None and sole_user(skip) is add and single_input(skip) is chain.source:
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


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class _Segment:
    start: int
    stop: int  # inclusive
    merge: Merge
    us_before: float
    us_after: float


class _ChainPlanner:
    def __init__(self, chain: Chain, table: LatencyTable) -> None:
        self.chain, self.table = chain, table
        self.merges: dict[tuple[int, int], Merge] = {}

    def element_cost(self, i: int) -> float:
        chain = self.chain
        if i < len(chain.nodes):
            node = chain.nodes[i]
            return self.table.latency(chain.modules[i], shape_of(node.args[0]), shape_of(node))
        out = shape_of(chain.add)
        skip = self.table.latency(chain.skip, shape_of(chain.source), out) if chain.skip is not None else 0.0
        return self.table.latency(None, out, out) + skip

    def merged(self, i: int, j: int) -> Merge:
        """The exact merge of elements i..j (i < j), built incrementally from i..j-1; a refused prefix is
        returned as is (its reason is recorded once, at the pair that failed)."""
        if (i, j) not in self.merges:
            self.merges[(i, j)] = self._build(i, j)
        return self.merges[(i, j)]

    def _build(self, i: int, j: int) -> Merge:
        chain = self.chain
        prefix = Merge(chain.modules[i]) if j == i + 1 else self.merged(i, j - 1)
        if not prefix.ok:
            return prefix
        in_shape = shape_of(chain.nodes[i].args[0])
        if j == len(chain.nodes):  # the closing add
            return merge_parallel(prefix.module, chain.skip, in_shape)
        if isinstance(prefix.module, nn.Conv2d):
            return compose_convs(prefix.module, chain.modules[j], in_shape)
        return compose_linears(prefix.module, chain.modules[j])

    def plan(self) -> tuple[list[_Segment], list[_Segment]]:
        """(chosen segments, exact segments not chosen); refused merges are in ``self.merges``."""
        n = self.chain.length
        single = [self.element_cost(i) for i in range(n)]
        best = [0.0] + [math.inf] * n
        back = [0] * (n + 1)
        segments: dict[tuple[int, int], _Segment] = {}
        for j in range(n):
            for i in range(max(0, j - MAX_SEGMENT + 1), j + 1):
                if i == j:
                    cost = single[i]
                elif j == len(self.chain.nodes) and i > 0:
                    continue  # the add can only close a merge of the whole chain
                else:
                    merge = self.merged(i, j)
                    if not merge.ok:
                        continue
                    out = shape_of(self.chain.add if j == len(self.chain.nodes) else self.chain.nodes[j])
                    cost = self.table.latency(merge.module, shape_of(self.chain.nodes[i].args[0]), out)
                    segments[(i, j)] = _Segment(i, j, merge, sum(single[i : j + 1]), cost)
                if best[i] + cost < best[j + 1]:
                    best[j + 1], back[j + 1] = best[i] + cost, i
        chosen, j = [], n
        while j > 0:
            i = back[j]
            if j - 1 > i:
                chosen.append(segments[(i, j - 1)])
            j = i
        picked = {(s.start, s.stop) for s in chosen}
        return chosen[::-1], [s for key, s in segments.items() if key not in picked]

    def segment_nodes(self, seg: _Segment) -> list[Node]:
        chain = self.chain
        nodes = chain.nodes[seg.start : seg.stop + 1]
        if seg.stop == len(chain.nodes):
            nodes = nodes + ([chain.skip_node] if chain.skip_node is not None else []) + [chain.add]
        return nodes

    def describe(self, seg: _Segment) -> str:
        chain = self.chain
        parts = [describe(m) for m in chain.modules[seg.start : seg.stop + 1]]
        if seg.stop == len(chain.nodes):
            parts.append("identity" if chain.skip is None else describe(chain.skip))
        text = " · ".join(parts)
        return f"{text} -> {describe(seg.merge.module)}" if seg.merge.ok else text


def _kind(chain: Chain, seg: _Segment) -> str:
    if seg.stop == len(chain.nodes):
        return "residual"
    return "conv_conv" if isinstance(chain.modules[0], nn.Conv2d) else "linear_linear"


def plan_and_fold(
    gm: GraphModule,
    example: Tensor,
    target: str = "cpu",
    cache: pathlib.Path | None = None,
    threads: int | None = None,
) -> tuple[GraphModule, list[FoldRecord]]:
    """Apply the set of exact merges with the lowest measured latency on ``target``."""
    gm = fresh_copy(gm)
    propagate_shapes(gm, example)
    table = LatencyTable(target, threads, cache)
    records: list[FoldRecord] = []
    for chain in find_chains(gm):
        planner = _ChainPlanner(chain, table)
        chosen, others = planner.plan()
        for seg in chosen:
            names = [n.name for n in planner.segment_nodes(seg)]
            records.append(FoldRecord(_kind(chain, seg), names, planner.describe(seg), True, "",
                                      seg.us_before, seg.us_after))
        for seg in others:
            names = [n.name for n in planner.segment_nodes(seg)]
            verdict = "slower" if seg.us_after >= seg.us_before else "less saving than the chosen plan"
            reason = f"{verdict} on {target}: {seg.us_before:.1f}us -> {seg.us_after:.1f}us"
            records.append(FoldRecord(_kind(chain, seg), names, planner.describe(seg), False, reason,
                                      seg.us_before, seg.us_after))
        for (i, j), merge in planner.merges.items():
            if not merge.ok and (j == i + 1 or planner.merges[(i, j - 1)].ok):
                seg = _Segment(i, j, merge, 0.0, 0.0)
                names = [n.name for n in planner.segment_nodes(seg)]
                records.append(FoldRecord(_kind(chain, seg), names, planner.describe(seg), False,
                                          merge.reason))
        for seg in chosen:
            replace_subgraph(gm, planner.segment_nodes(seg), seg.merge.module,
                             chain.nodes[seg.start].args[0])
    table.save()
    return finish(gm), records
