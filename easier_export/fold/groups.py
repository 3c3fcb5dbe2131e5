"""Fold groups: which activations must go *together* for a merge to happen, and what that merge saves.

Removing one activation saves nothing by itself (onnxruntime fuses it into the conv): time is saved only when
the removals complete a chain of linear ops that merges into fewer, cheaper ops. A MobileNetV2 block becomes one
3x3 conv (its residual in the kernel) only when *both* its activations are gone; a transformer MLP's GELU alone
unlocks fc1·fc2. To find these sets on any traced model:

1. remove every candidate activation (padding relocated, as the loop would, so conv·conv merges are exact), fold
   identities and BatchNorm / LayerNorm affines, and find the chains of mergeable ops (the planner's chains);
2. time every exact merged segment of every chain in context (``LatencyTable``: segment vs merged op);
3. map each segment back to the activations that sat between its ops in the original graph: its *group*.

The saving available once a set ``S`` of activations is gone is, per chain, the best non-overlapping choice of
segments whose groups lie inside ``S`` (the planner's interval DP); the *marginal gain* of a group is how much
that total grows when the group is removed too. Groups with no measured gain are never offered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor
from torch.fx import GraphModule, Node

from easier_export.trace.edits import remove_sites

from .chains import Chain, find_chains
from .fx import ORIGIN_META_KEY, propagate_shapes
from .latency import LatencyTable, trusted_saving
from .planner import ChainPlanner, best_partition
from .rules import clean

_MAX_WALK = 32
"""Nodes walked back between two ops of a chain (BN, dropout, identities and activations sit there)."""


@dataclass
class GroupSegment:
    """One exact merge of the all-linear model: the activations it needs gone and what it saves (us, batch 1)."""

    chain: int
    start: int
    stop: int
    sites: tuple[str, ...]
    detail: str
    us_before: float
    us_after: float
    us_spread: float

    @property
    def saving(self) -> float:
        return trusted_saving(self.us_before, self.us_after, self.us_spread)


@dataclass
class Group:
    """Activations to remove in one round, the merge(s) they unlock and the measured marginal gain."""

    sites: tuple[str, ...]
    us_saved: float
    detail: str


@dataclass
class FoldGroups:
    segments: list[GroupSegment]
    chain_lengths: list[int]

    def saving(self, removed: set[str] | frozenset[str]) -> float:
        """Largest total saving (us) the planner can reach once ``removed`` activations are gone."""
        total = 0.0
        for c, length in enumerate(self.chain_lengths):
            usable = [s for s in self.segments if s.chain == c and set(s.sites) <= removed]
            total += best_partition(usable, length)[0]  # type: ignore[arg-type]
        return total

    def candidates(self, removed: set[str] | frozenset[str], allowed: set[str] | None = None) -> list[Group]:
        """Every group not yet removed with a positive marginal gain, largest gain first.

        ``allowed``: activations that may still be removed (e.g. not rejected); a group needing others is skipped.
        """
        removed = frozenset(removed)
        base = self.saving(removed)
        seen: dict[tuple[str, ...], Group] = {}
        for seg in sorted(self.segments, key=lambda s: -s.saving):  # name a group after its best merge
            need = tuple(s for s in seg.sites if s not in removed)
            if not need or need in seen or (allowed is not None and not set(need) <= allowed):
                continue
            gain = self.saving(removed | set(need)) - base
            if gain > 0:
                seen[need] = Group(need, gain, seg.detail)
        return sorted(seen.values(), key=lambda g: (-g.us_saved, g.sites))

    def to_dict(self) -> dict:
        return {"segments": [asdict(s) for s in self.segments], "chain_lengths": self.chain_lengths}

    @classmethod
    def from_dict(cls, data: dict) -> FoldGroups:
        segs = [GroupSegment(**{**s, "sites": tuple(s["sites"])}) for s in data["segments"]]
        return cls(segs, list(data["chain_lengths"]))


def find_groups(gm: GraphModule, sites: list[str], example: Tensor, table: LatencyTable) -> FoldGroups:
    """Fold groups of the eval-mode traced model ``gm`` among the in-graph activation call sites ``sites``."""
    linear = remove_sites(gm, sites, relocate=True)
    for node in linear.graph.nodes:
        node.meta[ORIGIN_META_KEY] = (node.name,)
    linear, _ = clean(linear, example)
    propagate_shapes(linear, example)
    original = {n.name: n for n in gm.graph.nodes}
    wanted = set(sites)
    segments, lengths = [], []
    for c, chain in enumerate(find_chains(linear)):
        lengths.append(chain.length)
        gaps = [_gap(original, chain, k, wanted) for k in range(chain.length)]
        planner = ChainPlanner(chain, table)
        for seg in planner.segments():
            between = gaps[seg.start + 1 : seg.stop + 1]
            if any(g is None for g in between):
                continue  # the merged ops are not linked through activations alone in the original graph
            needed = tuple(sorted({s for g in between for s in g}))  # type: ignore[union-attr]
            segments.append(GroupSegment(c, seg.start, seg.stop, needed, planner.describe(seg),
                                         seg.us_before, seg.us_after, seg.us_spread))
    table.save()
    return FoldGroups(segments, lengths)


def _origin(node: Node) -> tuple[str, ...]:
    return node.meta.get(ORIGIN_META_KEY, (node.name,))


def _gap(original: dict[str, Node], chain: Chain, k: int, sites: set[str]) -> set[str] | None:
    """Activations on the original path from chain element ``k - 1`` to element ``k`` (None: no such path)."""
    if k == 0:
        return set()
    previous = set(_origin(chain.nodes[k - 1]))
    element = chain.add if k == len(chain.nodes) else chain.nodes[k]
    start = original.get(_origin(element)[0])
    if start is None:
        return None
    for arg in start.all_input_nodes:  # the add has two inputs: the chain's and the skip
        found: set[str] = set()
        node: Node | None = arg
        for _ in range(_MAX_WALK):
            if node is None or node.name in previous:
                break
            if node.name in sites:
                found.add(node.name)
            inputs = node.all_input_nodes
            node = inputs[0] if len(inputs) == 1 else None
        if node is not None and node.name in previous:
            return found
    return None
