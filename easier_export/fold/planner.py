"""Choose which exact merges to apply by measuring them in context (mode "auto").

A merge is exact but not always faster: pw 1x1 -> dw 3x3 merges into a dense 3x3 conv that costs ~C_in/1 times
the depthwise FLOPs, while on small maps every op removed saves a dispatch that single-op timings net out. The
planner finds *chains* of mergeable ops (conv -> conv -> ... or linear -> linear ..., each the sole user of the
previous, optionally closed by a residual add over the chain), and times every exact merged *segment* in
context: the segment's ops as one small ONNX graph (nonzero biases, the add included) against the merged op,
interleaved in one onnxruntime setup identical to ``bench``'s, repeated until the difference is stable. The
saving of a segment is ``t(ops) - t(merged)``; each chain is partitioned by dynamic programming
(LayerMerge-style weighted interval scheduling)::

    best[j] = max(best[j - 1], max_{i < j} best[i] + saving(i..j - 1)),   savings below the timing noise are 0

Timings are cached in a JSON latency table keyed by the segment's signature, so reruns measure nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import statistics
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from easier_export.core.io import save_json
from easier_export.core.ort import physical_cores, session_options
from easier_export.core.stats import median_ci

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
Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class SegmentSpec:
    """What a segment computes before merging: ``ops`` in sequence, then optionally ``+ skip(x)``.

    ``add``: the segment ends with the chain's residual add; ``skip``: the conv on that add's other branch
    (None: the identity).
    """

    ops: list[nn.Module]
    in_shape: Shape
    add: bool = False
    skip: nn.Module | None = None

    def signature(self) -> str:
        parts = [_signature(m) for m in self.ops]
        if self.add:
            parts.append("add:" + ("identity" if self.skip is None else _signature(self.skip)))
        return f"{tuple(self.in_shape)}|" + "|".join(parts)


class _GraphBuilder:
    """Small ONNX graphs with random weights and nonzero biases (zero biases would hide bias-map adds)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def _init(self, shape: Shape) -> str:
        name = f"w{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(
            (0.1 * self.rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def add_node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def op(self, module: nn.Module, x: str) -> str:
        if isinstance(module, nn.Conv2d):
            inputs = [x, self._init(tuple(module.weight.shape)), self._init((module.out_channels,))]
            y = self.add_node("Conv", inputs, kernel_shape=list(module.kernel_size), strides=list(module.stride),
                           pads=_onnx_pads(module), dilations=list(module.dilation), group=module.groups)
            if isinstance(module, BiasMapConv2d):
                y = self.add_node("Add", [y, self._init(tuple(module.bias_map.shape))])
            return y
        y = self.add_node("MatMul", [x, self._init((module.in_features, module.out_features))])
        return self.add_node("Add", [y, self._init((module.out_features,))])

    def add(self, a: str, b: str) -> str:
        return self.add_node("Add", [a, b])

    def model(self, in_shape: Shape, out: str) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)]
        outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
        graph = helper.make_graph(self.nodes, "segment", inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=8)


def segment_graph(spec: SegmentSpec) -> onnx.ModelProto:
    """The unmerged segment as one ONNX graph: what the running model executes for it."""
    g = _GraphBuilder()
    y = "x"
    for module in spec.ops:
        y = g.op(module, y)
    if spec.add:
        y = g.add(y, "x" if spec.skip is None else g.op(spec.skip, "x"))
    return g.model(spec.in_shape, y)


def merged_graph(module: nn.Module, in_shape: Shape) -> onnx.ModelProto:
    g = _GraphBuilder()
    return g.model(in_shape, g.op(module, "x"))


def _onnx_pads(conv: nn.Conv2d) -> list[int]:
    """ONNX pads (begin..., end...); a string padding ("same"/"valid") is approximated for timing only."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        pad = [d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return pad + pad
    return [*conv.padding, *conv.padding]


def _signature(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return (f"conv|w{tuple(module.weight.shape)}|s{module.stride}|p{module.padding}"
                f"|d{module.dilation}|g{module.groups}|map{isinstance(module, BiasMapConv2d)}")
    return f"linear|{module.in_features}x{module.out_features}"


TIMING_VERSION = "ci95"
"""Part of every cache key: entries timed under an older rule (the spread of single blocks) are timed again,
and dropped from the cache file."""


@dataclass
class LatencyTable:
    """In-context timings of segments, before and after merging (us at batch 1), cached as JSON.

    Each pair of graphs is timed in alternating blocks. The saving is the median of the block differences,
    with a 95 % confidence interval that narrows as blocks accumulate; timing repeats until the interval's
    half-width is below ``rel_tol`` of the unmerged time (or ``max_seconds`` has passed and the six blocks an
    interval needs are in: a segment slower than the budget was once never trusted). Stored: ``before``
    (median unmerged block), ``after`` (``before`` minus the saving) and ``spread`` (the saving minus the
    interval's lower end), so ``before - after > spread`` exactly when the whole interval lies above 0: noise
    cannot make the planner merge. (The spread of single blocks, used before, does not narrow with more blocks:
    it hid real 10 us savings on a noisy 2-core VM and made the demo's choice of groups differ from run to run.)
    """

    target: str = "cpu"
    threads: int | None = None
    cache: pathlib.Path | None = None
    block: int = 10
    rel_tol: float = 0.03
    max_seconds: float = 1.0
    table: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.threads = self.threads or physical_cores()
        if self.cache is not None and self.cache.exists():
            try:
                loaded = json.loads(self.cache.read_text())
                self.table = {k: v for k, v in loaded.items()
                              if isinstance(v, dict) and k.startswith(f"{TIMING_VERSION}|")}
            except (ValueError, TypeError, OSError, AttributeError) as e:  # a damaged cache only costs time
                logger.warning("ignoring unreadable latency table %s (%s)", self.cache, e)

    @property
    def providers(self) -> list[str]:
        if self.target == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider"]
        return ["CPUExecutionProvider"]

    def times(self, spec: SegmentSpec, merged: nn.Module) -> tuple[float, float, float]:
        """(us before, us after, us spread) of replacing the segment by ``merged``, at batch 1."""
        spec = SegmentSpec(spec.ops, (1, *spec.in_shape[1:]), spec.add, spec.skip)
        key = f"{TIMING_VERSION}|{self.providers[0]}|t{self.threads}|{spec.signature()}->{_signature(merged)}"
        if key not in self.table:
            before, after, spread = self._time_pair(segment_graph(spec), merged_graph(merged, spec.in_shape))
            self.table[key] = {"before": before, "after": after, "spread": spread}
        entry = self.table[key]
        return entry["before"], entry["after"], entry["spread"]

    def _session(self, model: onnx.ModelProto) -> tuple[ort.InferenceSession, dict]:
        sess = ort.InferenceSession(model.SerializeToString(), session_options(self.threads),
                                    providers=self.providers)
        inp = sess.get_inputs()[0]
        return sess, {inp.name: np.random.default_rng(1).standard_normal(inp.shape).astype(np.float32)}

    def _time_pair(self, a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[float, float, float]:
        runs = [self._session(a), self._session(b)]
        for sess, feeds in runs:
            for _ in range(3):
                sess.run(None, feeds)
        blocks: list[list[float]] = [[], []]
        start = time.perf_counter()
        while True:
            for (sess, feeds), out in zip(runs, blocks, strict=True):
                samples = []
                for _ in range(self.block):
                    t0 = time.perf_counter()
                    sess.run(None, feeds)
                    samples.append((time.perf_counter() - t0) * 1e6)
                out.append(statistics.median(samples))
            before = statistics.median(blocks[0])
            saving, low, high = median_ci([x - y for x, y in zip(*blocks, strict=True)])
            settled = (high - low) / 2 <= self.rel_tol * before or time.perf_counter() - start > self.max_seconds
            if settled and math.isfinite(low):  # six blocks at least, however slow: fewer give no interval
                return before, before - saving, saving - low

    def save(self) -> None:
        if self.cache is not None:
            save_json(dict(sorted(self.table.items())), self.cache)


def trusted_saving(before: float, after: float, spread: float) -> float:
    """A measured saving, 0 unless its confidence interval lies above 0 (``LatencyTable`` stores it so)."""
    gain = before - after
    return gain if gain > spread else 0.0


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


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class Segment:
    """Elements ``start..stop`` (inclusive) of a chain, their exact merge and its in-context timing."""

    start: int
    stop: int
    merge: Merge
    us_before: float
    us_after: float
    us_spread: float = 0.0

    @property
    def saving(self) -> float:
        return trusted_saving(self.us_before, self.us_after, self.us_spread)


class ChainPlanner:
    def __init__(self, chain: Chain, table: LatencyTable) -> None:
        self.chain, self.table = chain, table
        self.merges: dict[tuple[int, int], Merge] = {}

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

    def spec(self, i: int, j: int) -> SegmentSpec:
        chain, add = self.chain, j == len(self.chain.nodes)
        return SegmentSpec(chain.modules[i : min(j, len(chain.nodes) - 1) + 1],
                           tuple(shape_of(chain.nodes[i].args[0])), add, chain.skip if add else None)

    def segments(self) -> list[Segment]:
        """Every exact merge of two or more elements, timed in context (the add only closes a whole chain)."""
        out = []
        n = self.chain.length
        for j in range(n):
            for i in range(max(0, j - MAX_SEGMENT + 1), j):
                if j == len(self.chain.nodes) and i > 0:
                    continue
                merge = self.merged(i, j)
                if merge.ok:
                    out.append(Segment(i, j, merge, *self.table.times(self.spec(i, j), merge.module)))
        return out

    def plan(self, usable: list[Segment] | None = None) -> tuple[list[Segment], list[Segment]]:
        """(chosen segments, exact segments not chosen): the non-overlapping set with the largest saving."""
        segments = self.segments() if usable is None else usable
        chosen = best_partition(segments, self.chain.length)[1]
        picked = {(s.start, s.stop) for s in chosen}
        return chosen, [s for s in segments if (s.start, s.stop) not in picked]

    def segment_nodes(self, seg: Segment) -> list[Node]:
        chain = self.chain
        nodes = chain.nodes[seg.start : seg.stop + 1]
        if seg.stop == len(chain.nodes):
            nodes = nodes + ([chain.skip_node] if chain.skip_node is not None else []) + [chain.add]
        return nodes

    def describe(self, seg: Segment) -> str:
        chain = self.chain
        parts = [describe(m) for m in chain.modules[seg.start : seg.stop + 1]]
        if seg.stop == len(chain.nodes):
            parts.append("identity" if chain.skip is None else describe(chain.skip))
        text = " · ".join(parts)
        return f"{text} -> {describe(seg.merge.module)}" if seg.merge.ok else text


def best_partition(segments: list[Segment], length: int) -> tuple[float, list[Segment]]:
    """Weighted interval scheduling: the non-overlapping segments with the largest total saving."""
    ending: dict[int, list[Segment]] = {}
    for seg in segments:
        if seg.saving > 0:
            ending.setdefault(seg.stop, []).append(seg)
    best = [0.0] * (length + 1)
    back: list[Segment | None] = [None] * (length + 1)
    for j in range(1, length + 1):
        best[j] = best[j - 1]
        for seg in ending.get(j - 1, []):
            if best[seg.start] + seg.saving > best[j]:
                best[j], back[j] = best[seg.start] + seg.saving, seg
    chosen, j = [], length
    while j > 0:
        seg = back[j]
        if seg is None:
            j -= 1
        else:
            chosen.append(seg)
            j = seg.start
    return best[length], chosen[::-1]


def _kind(chain: Chain, seg: Segment) -> str:
    if seg.stop == len(chain.nodes):
        return "residual"
    return "conv_conv" if isinstance(chain.modules[0], nn.Conv2d) else "linear_linear"


class _Untimed(LatencyTable):
    """Stands in for ``LatencyTable`` when a recorded plan is replayed: nothing is timed, nothing cached."""

    def times(self, spec: SegmentSpec, merged: nn.Module) -> tuple[float, float, float]:
        return 0.0, 0.0, 0.0

    def save(self) -> None:
        pass


def _verdict(seg: Segment, target: str) -> str:
    """Why a timed exact merge was not chosen."""
    if seg.saving <= 0:
        verdict = "slower" if seg.us_after >= seg.us_before else "saving within timing noise"
    else:
        verdict = "less saving than the chosen plan"
    return (f"{verdict} on {target}: {seg.us_before:.1f}us -> {seg.us_after:.1f}us "
            f"(±{seg.us_spread:.1f}us, in context)")


def plan_and_fold(
    gm: GraphModule,
    example: Tensor,
    target: str = "cpu",
    cache: pathlib.Path | None = None,
    threads: int | None = None,
    replay: Collection[Sequence[str]] | None = None,
) -> tuple[GraphModule, list[FoldRecord]]:
    """Apply the set of exact merges with the largest measured saving on ``target``.

    ``replay``: the node names of the merges a plan applied (its records' ``nodes``); exactly those are applied
    again and nothing is timed, so a shipped model can be rebuilt on another machine than the one that planned it.
    """
    gm = fresh_copy(gm)
    propagate_shapes(gm, example)
    table = LatencyTable(target, threads, cache) if replay is None else _Untimed()
    wanted = None if replay is None else {tuple(names) for names in replay}
    records: list[FoldRecord] = []
    for chain in find_chains(gm):
        planner = ChainPlanner(chain, table)
        usable = None
        if wanted is not None:  # the recorded merges get a saving, every other one none
            usable = [dataclasses.replace(s, us_before=1.0) if tuple(n.name for n in planner.segment_nodes(s))
                      in wanted else s for s in planner.segments()]
        chosen, others = planner.plan(usable)
        timed = (lambda seg: (seg.us_before, seg.us_after)) if wanted is None else (lambda seg: (None, None))
        for seg in chosen:
            names = [n.name for n in planner.segment_nodes(seg)]
            records.append(FoldRecord(_kind(chain, seg), names, planner.describe(seg), True, "", *timed(seg)))
        for seg in others:
            names = [n.name for n in planner.segment_nodes(seg)]
            reason = "not in the replayed plan" if wanted is not None else _verdict(seg, target)
            records.append(FoldRecord(_kind(chain, seg), names, planner.describe(seg), False, reason, *timed(seg)))
        for (i, j), merge in planner.merges.items():
            if not merge.ok and (j == i + 1 or planner.merges[(i, j - 1)].ok):
                seg = Segment(i, j, merge, 0.0, 0.0)
                names = [n.name for n in planner.segment_nodes(seg)]
                records.append(FoldRecord(_kind(chain, seg), names, planner.describe(seg), False,
                                          merge.reason))
        for seg in chosen:
            replace_subgraph(gm, planner.segment_nodes(seg), seg.merge.module,
                             chain.nodes[seg.start].args[0])
    table.save()
    return finish(gm), records
