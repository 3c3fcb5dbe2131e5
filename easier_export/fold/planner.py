"""Choose which exact merges to apply by measuring them in context (mode "auto").

A merge is exact but not always faster: pw 1x1 -> dw 3x3 merges into a dense 3x3 conv that costs ~C_in times
the depthwise FLOPs, while on small maps every op removed saves a dispatch that single-op timings net out. The
planner takes the *chains* of mergeable ops (``chains``) and times every exact merged *segment* in context
(``LatencyTable``). The saving of a segment is ``t(ops) - t(merged)``; each chain is partitioned by dynamic
programming (LayerMerge-style weighted interval scheduling)::

    best[j] = max(best[j - 1], max_{i < j} best[i] + saving(i..j - 1)),   savings within the timing noise are 0
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.fx import GraphModule, Node

from easier_export.core.quantize import FP32

from .chains import Chain, find_chains
from .fx import finish, fresh_copy, propagate_shapes, replace_subgraph, shape_of
from .latency import LatencyTable, trusted_saving
from .numerics import describe
from .records import FoldRecord, Merge
from .rules import RESIDUAL, chain_rule
from .segments import SegmentSpec

__all__ = ["ChainPlanner", "LatencyTable", "Segment", "best_partition", "plan_and_fold"]

MAX_SEGMENT = 6
"""Longest run of ops the planner tries to merge into one."""


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
    """The exact merges of one chain's segments, their timings, and the partition with the largest saving."""

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
            return RESIDUAL.compose(prefix.module, chain.skip, in_shape)
        return chain_rule(prefix.module).compose(prefix.module, chain.modules[j], in_shape)

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
        return RESIDUAL.kind
    return chain_rule(chain.modules[0]).kind


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
    precision: str = FP32,
) -> tuple[GraphModule, list[FoldRecord]]:
    """Apply the set of exact merges with the largest measured saving on ``target`` in ``precision``.

    ``replay``: the node names of the merges a plan applied (its records' ``nodes``); exactly those are applied
    again and nothing is timed, so a shipped model can be rebuilt on another machine than the one that planned it.
    """
    gm = fresh_copy(gm)
    propagate_shapes(gm, example)
    table = LatencyTable(target, threads, cache, precision=precision) if replay is None else _Untimed()
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
