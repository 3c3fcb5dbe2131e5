"""Gradient saliency: how much the loss depends on each call site's pre-activation."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..entropy import instrument, preserved_buffers
from .registry import Evidence, register_criterion


class _GradMeter(nn.Module):
    """Identity on the pre-activation that accumulates mean |dL/dx| over the backward passes that reach it."""

    def __init__(self, _dim: int | None) -> None:
        super().__init__()
        self.total, self.count = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x.register_hook(self._seen)
        return x

    def _seen(self, grad: torch.Tensor) -> None:
        self.total += float(grad.detach().abs().mean())
        self.count += 1


@register_criterion("gradient")
def gradient_scores(ev: Evidence) -> dict[str, float]:
    """Mean gradient magnitude at each call site: E|∂L/∂x| over the elements of the pre-activation x, L the
    cross-entropy of ``ev.batches`` batches (gradient saliency, cf. Molchanov et al., ICLR 2017; the study's
    "gradient magnitude" question). A site the loss barely depends on goes first; a unit always OFF has zero
    gradient there, so this also ranks dead sites first, but an always-ON (linear) site ranks by its influence."""
    gm = ev.gm
    probed, meters, handles = instrument(gm, ev.sites, make_probe=_GradMeter)
    was_training = gm.training
    probed.train(ev.train_mode)
    try:
        with preserved_buffers(gm):
            for x, y in itertools.islice(ev.loader, ev.batches):
                F.cross_entropy(probed(x.to(ev.device)), y.to(ev.device)).backward()
    finally:
        for h in handles:
            h.remove()
        gm.zero_grad(set_to_none=True)
        gm.train(was_training)
    return {name: m.total / max(m.count, 1) for name, m in meters.items()}
