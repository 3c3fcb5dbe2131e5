"""``--entropy-reg``: finetune with a differentiable proxy of the entropy in the loss, so that many call sites
settle into one state and the K lowest can then go at once (``--one-shot``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import fx, nn

from easier_export.trace.sites import CallSite

from .entropy import binary_entropy, instrument, unit_dim
from .train import finetune


class SoftEntropy(nn.Module):
    """Identity that keeps, from its last forward, mean over units of H(p̂), p̂ = mean over the batch (and
    space) of sigmoid((x − t)/τ): the soft ON probability, a differentiable stand-in for EASIER's counted p_on."""

    def __init__(self, dim: int | None, tau: float, threshold: float) -> None:
        super().__init__()
        self.dim, self.tau, self.threshold = dim, tau, threshold
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = unit_dim(self.dim, x)
        p = torch.sigmoid((x - self.threshold) / self.tau).movedim(dim, -1).reshape(-1, x.shape[dim]).mean(0)
        self.value = binary_entropy(p.clamp(1e-6, 1 - 1e-6)).mean().float()
        return x


def entropy_regularised(gm: fx.GraphModule, sites: list[CallSite], loader, device: torch.device, epochs: float,
                        lr: float, lam: float, tau: float, threshold: float,
                        on_step: Callable[[], None] | None = None, optimizer: str = "sgd") -> fx.GraphModule:
    """A copy of ``gm`` finetuned on CE + λ·Σ_sites H_soft(site) (see SoftEntropy, temperature τ): one training
    that pushes many sites toward a single state, so that the K lowest can then go at once (the EASIER
    paper's open question: a differentiable proxy of the entropy in the loss for a one-shot method)."""
    model = copy.deepcopy(gm)
    probed, probes, handles = instrument(model, sites, make_probe=lambda dim: SoftEntropy(dim, tau, threshold))

    def penalty() -> torch.Tensor:
        values = [p.value for p in probes.values() if p.value is not None]
        for p in probes.values():
            p.value = None
        return lam * torch.stack(values).sum() if values else torch.zeros((), device=device)

    try:
        finetune(probed, loader, device, epochs, lr, on_step=on_step, penalty=penalty, optimizer=optimizer)
    finally:
        for h in handles:
            h.remove()
    return model
