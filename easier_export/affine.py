"""Least-squares stand-ins for a removed activation (``--substitute affine`` / ``lstsq``).

EASIER replaces a removed rectifier by the identity. That is right for units that are (almost) always ON and
wrong for units that are (almost) always OFF: ReLU outputs ~0 there, the identity passes the negative input on.
Both kinds score low entropy, so EASIER removes both. The least-squares line through each unit's
(input, output) pairs on the data, act(x) ≈ a·x + b per unit, is the best linear stand-in for either kind, and
costs nothing at inference: a per-unit scale and shift is absorbed into the layer that produces x (Linear,
Conv, BatchNorm: rows scaled, bias shifted), so the graph after removal is the same as with the identity.

    a = cov(x, act(x)) / var(x),   b = E[act(x)] − a·E[x]          (with a bias to absorb b)
    a = E[x·act(x)] / E[x²],       b = 0                          (a producer without bias: the line through 0)

Between two Linears (a transformer MLP fc1 → act → fc2, a classifier head) the whole chain can be fitted instead
(``lstsq``): the linear map M z + m of the chain's input z closest to its output on the data, then fc1 refitted
so that fc2·fc1' = (M, m) exactly — W1' = W2⁺ M, b1' = W2⁺ (m − b2), exact when W2 has full row rank (fc2 reads
at least as many units as it writes, as every MLP does). The per-unit line is one point of that family
(M = W2·diag(a)·W1), so the chain fit is never worse on the data it saw. Elsewhere ``lstsq`` fits per unit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import fx, nn

from .entropy import preserved_buffers, unit_dim
from .graph import AffineFit, ChainFit, absorber, blend_sites, linear_chain

SUBSTITUTES = ("identity", "affine", "lstsq")
RANK_TOL = 1e-4  # W2·W2⁺ may differ from the identity by this much (relative): fc1' then represents M exactly


class Moments:
    """Running per-unit sums of x, x², act(x), x·act(x) (float64), fed (x, act(x)) pairs."""

    def __init__(self, dim: int | None) -> None:
        self.dim, self.n, self.sums = dim, 0, None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.dim = unit_dim(self.dim, x)
        x = x.detach().movedim(self.dim, -1).reshape(-1, x.shape[self.dim]).double()
        y = y.detach().movedim(self.dim, -1).reshape(-1, y.shape[self.dim]).double()
        sums = torch.stack([x.sum(0), (x * x).sum(0), y.sum(0), (x * y).sum(0)])
        self.sums = sums if self.sums is None else self.sums + sums
        self.n += x.shape[0]

    def fit(self, intercept: bool) -> AffineFit:
        """The least-squares line per unit; a unit whose input never varies keeps slope 1 (nothing to fit)."""
        sums, n = self.sums.clone(), torch.tensor([float(self.n)], dtype=torch.float64, device=self.sums.device)
        if dist.is_available() and dist.is_initialized():  # every rank saw a shard of the data
            dist.all_reduce(sums)
            dist.all_reduce(n)
        sx, sxx, sy, sxy = (sums / n).cpu()
        if intercept:
            var, cov = sxx - sx * sx, sxy - sx * sy
            scale = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.ones_like(var))
            shift = sy - scale * sx
        else:
            scale = torch.where(sxx > 1e-12, sxy / sxx.clamp_min(1e-12), torch.ones_like(sxx))
            shift = torch.zeros_like(scale)
        return AffineFit(scale.float(), shift.float(), self.dim)


class NormalEquations:
    """Running Zᵀ Z and Zᵀ T (float64) of a regression of targets T on inputs Z with a constant column."""

    def __init__(self) -> None:
        self.zz: torch.Tensor | None = None
        self.zt: torch.Tensor | None = None

    def add(self, z: torch.Tensor, t: torch.Tensor) -> None:
        z = z.detach().reshape(-1, z.shape[-1]).double()
        z = torch.cat([z, torch.ones_like(z[:, :1])], 1)
        t = t.detach().reshape(-1, t.shape[-1]).double()
        zz, zt = z.T @ z, z.T @ t
        self.zz, self.zt = (zz, zt) if self.zz is None else (self.zz + zz, self.zt + zt)

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, m) minimising Σ‖t − M z − m‖², lightly ridged (1e-6 of the mean input energy) for stability."""
        zz, zt = self.zz.clone(), self.zt.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(zz)
            dist.all_reduce(zt)
        ridge = 1e-6 * torch.diagonal(zz).mean()
        solution = torch.linalg.solve(zz + ridge * torch.eye(len(zz), dtype=zz.dtype, device=zz.device), zt).cpu()
        return solution[:-1].T, solution[-1]


def chain_fit(fc1: nn.Linear, fc2: nn.Linear, equations: NormalEquations) -> ChainFit | None:
    """fc1's new weight and bias for the fitted chain map; None when fc2 cannot represent it (rank-deficient)."""
    m_weight, m_bias = equations.solve()
    w2 = fc2.weight.detach().double().cpu()
    pinv = torch.linalg.pinv(w2)
    eye = torch.eye(w2.shape[0], dtype=w2.dtype)
    if torch.linalg.matrix_norm(w2 @ pinv - eye) > RANK_TOL * eye.shape[0] ** 0.5:
        return None
    bias = pinv @ (m_bias - fc2.bias.detach().double().cpu())
    return ChainFit((pinv @ m_weight).to(fc1.weight), bias.to(fc1.bias))


def stand_ins(gm: fx.GraphModule, names: Iterable[str], loader, device: torch.device, batches: int | None,
              train_mode: bool = True, chains: bool = False
              ) -> tuple[dict[str, AffineFit | ChainFit], dict[str, str]]:
    """The least-squares stand-in of each named site, fitted on up to ``batches`` batches of ``loader``: with
    ``chains``, a site between two Linears refits the chain (:func:`chain_fit`; the per-unit line where fc2
    cannot represent it); otherwise the per-unit line, where the producer can absorb it
    (:func:`~easier_export.graph.absorber`). For the others, why they keep the identity.

    The (x, act(x)) pairs are read where the model computes them: in a copy of ``gm`` with each site blended at
    α = 0 (the same function), whose :class:`~easier_export.graph.Blend` sees the activation's input and output;
    a chain's (input, output) pairs by hooks on its two Linears in the same pass.
    """
    refused: dict[str, str] = {}
    intercept: dict[str, bool] = {}
    linked: dict[str, tuple[nn.Linear, nn.Linear]] = {}
    for name in names:
        module, why = absorber(gm, name)
        if module is None:
            refused[name] = why
            continue
        intercept[name] = module.bias is not None
        chain = linear_chain(gm, name) if chains else None
        if isinstance(chain, tuple) and not {id(m) for m in chain} & {id(m) for c in linked.values() for m in c}:
            linked[name] = chain  # (chains sharing a Linear, removed together, would overwrite each other's fit)
    probed = blend_sites(gm, intercept).to(device).train(train_mode)
    moments = {name: Moments(probed.get_submodule(f"blend_{name}").dim) for name in intercept}
    equations = {name: NormalEquations() for name in linked}
    handles = [probed.get_submodule(f"blend_{name}").register_forward_hook(
        lambda _m, args, out, m=m: m.add(args[0], out)) for name, m in moments.items()]
    for name, eq in equations.items():
        fc1, fc2 = (probed.get_submodule(_target(gm, mod)) for mod in linked[name])
        inputs: list[torch.Tensor] = []
        handles += [fc1.register_forward_hook(lambda _m, args, _out, inputs=inputs: inputs.append(args[0])),
                    fc2.register_forward_hook(lambda _m, _a, out, eq=eq, inputs=inputs: eq.add(inputs.pop(), out))]
    try:
        with preserved_buffers(probed), torch.no_grad():
            for i, (x, _y) in enumerate(loader):
                if batches is not None and i >= batches:
                    break
                probed(x.to(device, non_blocking=True))
    finally:
        for h in handles:
            h.remove()
    fits: dict[str, AffineFit | ChainFit] = {
        name: m.fit(intercept[name]) for name, m in moments.items() if m.sums is not None}
    for name, eq in equations.items():  # a chain that cannot be represented keeps its per-unit line
        fit = chain_fit(*linked[name], eq) if eq.zz is not None else None
        if fit is not None:
            fits[name] = fit
    refused.update({name: "no data reached it" for name in intercept if name not in fits})
    return fits, refused


def _target(gm: fx.GraphModule, module: nn.Module) -> str:
    return next(path for path, mod in gm.named_modules() if mod is module)
