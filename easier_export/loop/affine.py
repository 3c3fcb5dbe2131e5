"""The affine stand-in for a removed activation (``--substitute affine``).

EASIER replaces a removed rectifier by the identity. That is right for units that are (almost) always ON and
wrong for units that are (almost) always OFF: ReLU outputs ~0 there, the identity passes the negative input on.
Both kinds score low entropy, so EASIER removes both. The least-squares line through each unit's
(input, output) pairs on the data, act(x) ≈ a·x + b per unit, is the best linear stand-in for either kind, and
costs nothing at inference: a per-unit scale and shift is absorbed into the layer that produces x (Linear,
Conv, BatchNorm: rows scaled, bias shifted), so the graph after removal is the same as with the identity.

    a = cov(x, act(x)) / var(x),   b = E[act(x)] − a·E[x]          (with a bias to absorb b)
    a = E[x·act(x)] / E[x²],       b = 0                          (a producer without bias: the line through 0)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

from easier_export.trace.edits import AffineFit, absorber, blend_sites

from .entropy import feed, mean_over_ranks, unit_dim

SUBSTITUTES = ("identity", "affine")


class Moments:
    """Running per-unit sums of x, x², act(x), x·act(x) (float64), fed (x, act(x)) pairs."""

    def __init__(self, dim: int | None) -> None:
        self.dim, self.n, self.sums = dim, 0, None
        self.keep: torch.Tensor | None = None  # (B, T) for padded token batches: only those positions count

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.dim = unit_dim(self.dim, x)
        x, y = (t.detach().movedim(self.dim, -1).double() for t in (x, y))
        masked = self.keep is not None and x.shape[:-1] == self.keep.shape
        x, y = (t[self.keep] if masked else t.reshape(-1, t.shape[-1]) for t in (x, y))
        sums = torch.stack([x.sum(0), (x * x).sum(0), y.sum(0), (x * y).sum(0)])
        self.sums = sums if self.sums is None else self.sums + sums
        self.n += x.shape[0]

    def fit(self, intercept: bool) -> AffineFit:
        """The least-squares line per unit; a unit whose input never varies keeps slope 1 (nothing to fit)."""
        sx, sxx, sy, sxy = mean_over_ranks(self.sums, self.n)
        if intercept:
            var, cov = sxx - sx * sx, sxy - sx * sy
            scale = torch.where(var > 1e-10 * sxx, cov / var.clamp_min(1e-30), torch.ones_like(var))
            shift = sy - scale * sx
        else:
            scale = torch.where(sxx > 0, sxy / sxx.clamp_min(1e-30), torch.ones_like(sxx))
            shift = torch.zeros_like(scale)
        return AffineFit(scale.float(), shift.float(), self.dim)


def stand_ins(gm: fx.GraphModule, names: Iterable[str], loader, device: torch.device, batches: int | None,
              train_mode: bool = True, pad_id: int | None = None) -> tuple[dict[str, AffineFit], dict[str, str]]:
    """The affine stand-in of each named site whose producer can absorb it
    (:func:`~easier_export.trace.edits.absorber`), fitted on up to ``batches`` batches of ``loader``; and, for the
    others, why they keep the identity.

    The (x, act(x)) pairs are read where the model computes them: in a copy of ``gm`` with each site blended at
    α = 0 (the same function), whose :class:`~easier_export.trace.edits.Blend` sees the activation's input and output.
    With ``pad_id`` (token batches), padding positions are left out, as in the entropy counts.
    """
    refused: dict[str, str] = {}
    intercept: dict[str, bool] = {}
    for name in names:
        module, why = absorber(gm, name)
        if module is None:
            refused[name] = why
        else:
            intercept[name] = module.bias is not None
    if not intercept:
        return {}, refused
    probed = blend_sites(gm, intercept).to(device).train(train_mode)
    moments: dict[str, Moments] = {}
    for name in intercept:  # (hooks on a throwaway copy: nothing to remove or restore afterwards)
        blend = probed.get_submodule(f"blend_{name}")
        moments[name] = Moments(blend.dim)
        blend.register_forward_hook(lambda _m, args, out, m=moments[name]: m.add(args[0], out))
    feed(probed, list(moments.values()), loader, device, batches, pad_id)
    fits = {name: m.fit(intercept[name]) for name, m in moments.items() if m.sums is not None}
    refused.update({name: "no data reached it" for name in intercept if name not in fits})
    return fits, refused
