"""EASIER's criterion and its simple baselines: read from the round's ON counts, or from chance."""

from __future__ import annotations

import torch

from .registry import Evidence, register_criterion


@register_criterion("entropy")
def entropy_scores(ev: Evidence) -> dict[str, float]:
    """EASIER: the mean binary entropy of a site's units, in bits."""
    return {name: s.entropy for name, s in ev.stats.items()}


@register_criterion("sparsity")
def sparsity_scores(ev: Evidence) -> dict[str, float]:
    """Mean share of the minority state (ON or OFF): 0 for units that never switch."""
    return {name: float(torch.minimum(s.p_on, 1 - s.p_on).mean()) if s.units else 0.0
            for name, s in ev.stats.items()}


@register_criterion("random", counts=False)
def random_scores(ev: Evidence) -> dict[str, float]:
    """A uniform draw per site from the round's seed: the order any criterion must beat."""
    draws = torch.rand(len(ev.sites), generator=torch.Generator().manual_seed(ev.seed))
    return {s.name: float(v) for s, v in zip(ev.sites, draws, strict=True)}
