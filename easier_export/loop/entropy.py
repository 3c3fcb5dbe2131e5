"""Per-unit ON probability and binary entropy at every rectifier call site (EASIER, step 1-2).

A unit that is (almost) always ON passes its input through unchanged, one that is always OFF outputs a
constant: either way the rectifier is (nearly) linear there. The layer score is the mean binary entropy of
its units, in bits, in [0, 1]; the lowest-scoring call site is the cheapest to remove.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import fx, nn

from easier_export.core.errors import UserError
from easier_export.trace.sites import CallSite, channel_dim


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in bits, with H(0) = H(1) = 0."""
    p = p.double().clamp(0.0, 1.0)
    q = 1.0 - p
    h = -(torch.xlogy(p, p) + torch.xlogy(q, q)) / math.log(2.0)
    return h.clamp(0.0, 1.0)


@dataclass
class SiteStats:
    """What one call site's units did over the data seen."""

    name: str
    op: str
    p_on: torch.Tensor  # per unit, float64

    @property
    def units(self) -> int:
        return self.p_on.numel()

    @property
    def entropy(self) -> float:
        return float(binary_entropy(self.p_on).mean()) if self.units else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "units": self.units, "entropy": self.entropy,
                "mean_p_on": float(self.p_on.mean()) if self.units else 0.0}


def unit_dim(dim: int | None, x: torch.Tensor) -> int:
    """``dim`` when the graph told it; otherwise (inside a leaf module) 1 for NCHW maps, else -1 (tokens)."""
    return dim if dim is not None else (1 if x.dim() == 4 else -1)


class OnCounter(nn.Module):
    """Identity that counts, per unit, how often its input is >= ``threshold``.

    ``keep`` (B, T), set per batch for padded token batches: only those positions count (padding is no data).
    """

    def __init__(self, dim: int | None, threshold: float = 0.0) -> None:
        super().__init__()
        self.dim, self.threshold = dim, threshold
        self.on: torch.Tensor | None = None
        self.seen = 0
        self.keep: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dim = unit_dim(self.dim, x)
        with torch.no_grad():
            on = (x.detach() >= self.threshold).movedim(self.dim, -1)
            masked = self.keep is not None and on.shape[:-1] == self.keep.shape
            on = on[self.keep] if masked else on.reshape(-1, x.shape[self.dim])
            counts = on.sum(0, dtype=torch.float64)
            self.on = counts if self.on is None else self.on + counts
            self.seen += on.shape[0]
        return x

    def p_on(self) -> torch.Tensor:
        if self.on is None:
            return torch.zeros(0, dtype=torch.float64)
        return mean_over_ranks(self.on, self.seen)


def mean_over_ranks(sums: torch.Tensor, count: int) -> torch.Tensor:
    """``sums / count`` over every rank's shard of the data (summed under DDP), on the CPU."""
    sums, n = sums.clone(), torch.tensor([float(count)], dtype=torch.float64, device=sums.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(n)
    return (sums / n.clamp_min(1)).cpu()


def instrument(gm: fx.GraphModule, sites: Iterable[CallSite], threshold: float = 0.0,
               make_probe: Callable[[int | None], nn.Module] | None = None
               ) -> tuple[fx.GraphModule, dict[str, nn.Module], list[torch.utils.hooks.RemovableHandle]]:
    """A GraphModule sharing ``gm``'s weights with a probe in front of each call site: an :class:`OnCounter`,
    or ``make_probe(unit_dim)`` (an identity that looks at the pre-activation: other criteria, penalties)."""
    make_probe = make_probe or (lambda dim: OnCounter(dim, threshold))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    counters: dict[str, nn.Module] = {}
    owned: dict[str, object] = {}  # GraphModule root: the targets the new graph refers to
    wanted = {s.name: s for s in sites}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            owned[node.target] = _fetch(gm, node.target)
        site = wanted.get(node.name)
        if site is not None and site.in_graph:
            counter = counters[site.name] = make_probe(channel_dim(gm, site))
            target = f"_easier_probe_{len(counters)}"
            owned[target] = counter
            x = graph.call_module(target, (env[node.args[0]],))
            env[node] = graph.node_copy(node, lambda n, node=node, x=x: x if n is node.args[0] else env[n])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    probed = fx.GraphModule(owned, graph)
    handles = []
    for site in wanted.values():
        if not site.in_graph:  # rectifier inside a leaf module: a forward pre-hook sees its input
            counter = counters[site.name] = make_probe(None)
            handles.append(probed.get_submodule(site.name).register_forward_pre_hook(_counting_hook(counter)))
    return probed, counters, handles


def _counting_hook(counter: nn.Module):
    def hook(_module: nn.Module, args: tuple) -> None:
        counter(args[0])

    return hook


def _fetch(gm: fx.GraphModule, target: str) -> object:
    parent, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(parent), attr)


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Train-mode passes update BatchNorm running stats: measuring must not change the model."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point() or "running" in k}
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)


def feed(model: nn.Module, probes: list, loader: Iterable, device: torch.device, batches: int | None,
         pad_id: int | None = None, progress: Callable[[], None] | None = None) -> None:
    """Run up to ``batches`` batches of ``loader`` through ``model`` without gradients, for the probes inside it
    to read; before each batch every probe's ``keep`` says which token positions count (not ``pad_id``)."""
    with torch.no_grad():
        for i, (x, _y) in enumerate(loader):
            if batches is not None and i >= batches:
                break
            x = x.to(device, non_blocking=True)
            for probe in probes:
                probe.keep = None if pad_id is None else x != pad_id
            model(x)
            if progress is not None:
                progress()


def measure(gm: fx.GraphModule, sites: list[CallSite], loader: Iterable, device: torch.device,
            batches: int | None = None, train_mode: bool = True, threshold: float = 0.0,
            progress=None, pad_id: int | None = None) -> dict[str, SiteStats]:
    """Run data through ``gm`` and return each call site's per-unit ON probability; with ``pad_id`` (token
    batches), padding positions are left out of the counts."""
    probed, counters, handles = instrument(gm, sites, threshold)
    was_training = gm.training
    probed.train(train_mode)
    try:
        with preserved_buffers(gm):
            feed(probed, list(counters.values()), loader, device, batches, pad_id, progress)
    finally:
        for h in handles:
            h.remove()
        gm.train(was_training)
    unseen = [name for name, c in counters.items() if c.on is None]
    if unseen:  # an empty loader, or a branch the data never takes: no statistics is not zero entropy
        raise UserError(f"no data reached activation call site(s) {', '.join(unseen[:3])}: nothing to measure")
    return {s.name: SiteStats(s.name, s.op, counters[s.name].p_on()) for s in sites}
