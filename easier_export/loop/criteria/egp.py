"""Entropy-Guided Pruning (Liao et al., 2023): prune where entropy is low, then score what pruning collapsed."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from easier_export.trace.sites import CallSite, node_named

from ..entropy import measure
from .registry import Evidence, register_criterion

EGP_RATE = 0.5  # mean share of a producing layer's weights pruned
EGP_TEMPERATURE = 0.1  # softmax temperature over entropies (bits): lower = pruning more concentrated


def producer(gm: fx.GraphModule, site: CallSite) -> nn.Conv2d | nn.Linear | None:
    """The conv/linear whose output reaches the site (walking back through BN and adds' first input)."""
    if not site.in_graph:
        return None
    node = node_named(gm, site.name).args[0]
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if node.op == "call_module" and isinstance(mod := gm.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            return mod
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return None


def egp_rates(entropies: torch.Tensor) -> torch.Tensor:
    """Pruning rate per site: EGP_RATE · n · softmax(−H / T), at most 0.95 (low entropy → pruned more)."""
    n = entropies.numel()
    return (EGP_RATE * n * torch.softmax(-entropies.double() / EGP_TEMPERATURE, 0)).clamp(max=0.95)


@register_criterion("egp")
def egp_scores(ev: Evidence) -> dict[str, float]:
    """EGP ("Can Unstructured Pruning Reduce the Depth in Deep Neural Networks?"): unstructured magnitude pruning
    whose budget goes to the low-entropy layers, so that their units collapse to one state and the layer becomes
    removable. One pruning step per round on a copy: the layer that produces each site loses its smallest-|w|
    share ``egp_rates(H)``; the score is the entropy re-measured on the pruned copy in eval mode (BatchNorm with
    its running statistics, as the pruned network would run), so the sites whose units collapse go first."""
    pruned = copy.deepcopy(ev.gm)
    rates = egp_rates(torch.tensor([ev.stats[s.name].entropy for s in ev.sites]))
    for site, rate in zip(ev.sites, rates.tolist(), strict=True):
        layer = producer(pruned, site)
        k = int(rate * layer.weight.numel()) if layer is not None else 0
        if k > 0:
            with torch.no_grad():
                w = layer.weight
                w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0.0
    after = measure(pruned, ev.sites, ev.loader, ev.device, ev.batches, train_mode=False, threshold=ev.threshold)
    return {name: s.entropy for name, s in after.items()}
