"""Till the Layers Collapse (Liao et al., AAAI 2025): the ON/OFF state read from BatchNorm, no data pass."""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from easier_export.core.console import info
from easier_export.trace.sites import CallSite, node_named

from ..entropy import binary_entropy
from .registry import Evidence, register_criterion


def bn_on_probability(bn: nn.modules.batchnorm._BatchNorm, threshold: float = 0.0) -> torch.Tensor:
    """P(y ≥ t) per channel for y = γ·x̂ + β, x̂ ~ N(0, 1) (what BatchNorm makes of its input): Φ((β − t)/|γ|)."""
    gamma = bn.weight.detach() if bn.affine else torch.ones(bn.num_features)
    beta = bn.bias.detach() if bn.affine else torch.zeros(bn.num_features)
    z = (beta.double() - threshold) / gamma.double().abs().clamp_min(1e-12)
    return (0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).cpu()


def batchnorm_before(gm: fx.GraphModule, site: CallSite) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm whose output is the site's input, if any (BN → act, nothing in between)."""
    if not site.in_graph:
        return None
    x = node_named(gm, site.name).args[0]
    if isinstance(x, fx.Node) and x.op == "call_module":
        mod = gm.get_submodule(x.target)
        return mod if isinstance(mod, nn.modules.batchnorm._BatchNorm) else None
    return None


def tlc_scores(gm: fx.GraphModule, sites: list[CallSite], threshold: float = 0.0) -> dict[str, float | None]:
    """TLC's prediction per site. For BN → act, the pre-activation of channel c is modelled as N(β_c, γ_c²), so
    P(ON) = Φ((β_c − t)/|γ_c|); the score is the mean binary entropy over channels, EASIER's score with p_on
    predicted instead of counted. None for a site not fed by a BatchNorm directly (after a residual add, a
    linear, a LayerNorm...)."""
    out: dict[str, float | None] = {}
    for site in sites:
        bn = batchnorm_before(gm, site)
        out[site.name] = None if bn is None else float(binary_entropy(bn_on_probability(bn, threshold)).mean())
    return out


@register_criterion("tlc")
def tlc_or_measured(ev: Evidence) -> dict[str, float]:
    """TLC's prediction, and the round's measured entropy where it predicts nothing."""
    predicted = tlc_scores(ev.gm, ev.sites, ev.threshold)
    measured = [n for n, v in predicted.items() if v is None]
    if measured:
        info(f"tlc: {len(measured)} of {len(ev.sites)} call sites have no BatchNorm right before them; "
             "their measured entropy stands in")
    return {n: ev.stats[n].entropy if v is None else v for n, v in predicted.items()}
