"""Other ways to rank call sites than EASIER's entropy, and the paper's ablations (the study, benchmarks/compare.py).

Every criterion maps call sites to a score, lower = removed first, like ``linearize.CRITERIA``; these need more
than one forward pass of ON counts: a backward pass (``gradient``), BatchNorm parameters and no data (``tlc``), a
short training of blend slopes (``layerfold``), pruning (``egp``). Also here: the differentiable entropy proxy
of ``--entropy-reg`` and the rectifier swap of the paper's ablation. Scoring never changes the model it is given.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from easier_export.core.console import info
from easier_export.core.errors import UserError
from easier_export.trace.graph import RECTIFIER_MODULES, CallSite, find_call_sites, node_named

from .entropy import SiteStats, binary_entropy, instrument, measure, preserved_buffers, unit_dim
from .train import finetune

STUDY_CRITERIA = ("gradient", "tlc", "layerfold", "egp")


def _batches(loader: Iterable, batches: int | None) -> Iterable:
    return itertools.islice(loader, batches)


# --- gradient ----------------------------------------------------------------------------------------
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


def gradient_scores(gm: fx.GraphModule, sites: list[CallSite], loader: Iterable, device: torch.device,
                    batches: int | None, train_mode: bool) -> dict[str, float]:
    """Mean gradient magnitude at each call site: E|∂L/∂x| over the elements of the pre-activation x, L the
    cross-entropy of ``batches`` batches (gradient saliency, cf. Molchanov et al., ICLR 2017; the study's
    "gradient magnitude" question). A site the loss barely depends on goes first; a unit always OFF has zero
    gradient there, so this also ranks dead sites first, but an always-ON (linear) site ranks by its influence."""
    probed, meters, handles = instrument(gm, sites, make_probe=_GradMeter)
    was_training = gm.training
    probed.train(train_mode)
    try:
        with preserved_buffers(gm):
            for x, y in _batches(loader, batches):
                F.cross_entropy(probed(x.to(device)), y.to(device)).backward()
    finally:
        for h in handles:
            h.remove()
        gm.zero_grad(set_to_none=True)
        gm.train(was_training)
    return {name: m.total / max(m.count, 1) for name, m in meters.items()}


# --- TLC ---------------------------------------------------------------------------------------------
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
    """Till the Layers Collapse (Liao et al., AAAI 2025): the ON/OFF state read from BatchNorm, no data pass.

    For BN → act, the pre-activation of channel c is modelled as N(β_c, γ_c²), so P(ON) = Φ((β_c − t)/|γ_c|);
    the score is the mean binary entropy over channels, EASIER's score with p_on predicted instead of counted.
    None for a site not fed by a BatchNorm directly (after a residual add, a linear, a LayerNorm...).
    """
    out: dict[str, float | None] = {}
    for site in sites:
        bn = batchnorm_before(gm, site)
        out[site.name] = None if bn is None else float(binary_entropy(bn_on_probability(bn, threshold)).mean())
    return out


# --- Layer Folding -----------------------------------------------------------------------------------
LAYERFOLD_PENALTY = 0.1  # λ in L = CE + λ·Σ(1 − α)²


def layerfold_lr(steps: int) -> float:
    """SGD step size with which a slope the task never resists ends at α = 1/2 exactly after ``steps`` steps:
    each step multiplies 1 − α by (1 − 2λ·lr), so (1 − 2λ·lr)^steps = 1/2."""
    return (1.0 - 0.5 ** (1.0 / steps)) / (2.0 * LAYERFOLD_PENALTY)


class _Blend(nn.Module):
    """α·x + (1 − α)·act(x): the rectifier at α = 0, the identity at α = 1 (a PReLU-like slope toward linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + (1 - self.alpha) * y


_OUT_OF_PLACE: dict[object, object] = {torch.relu_: torch.relu, F.relu_: F.relu,
                                        torch.ops.aten.relu_.default: torch.ops.aten.relu.default,
                                        torch.ops.aten.silu_.default: torch.ops.aten.silu.default}


def _out_of_place(gm: fx.GraphModule) -> None:
    """The blend reads the rectifier's input after the rectifier ran: no rectifier may overwrite it."""
    for mod in gm.modules():
        if type(mod) in RECTIFIER_MODULES and hasattr(mod, "inplace"):
            mod.inplace = False
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.target = _OUT_OF_PLACE.get(node.target, node.target)
            if node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target == "relu_":
            node.target = "relu"
    gm.recompile()


def _blended(gm: fx.GraphModule, sites: list[CallSite]) -> tuple[fx.GraphModule, dict[str, _Blend]]:
    """A copy of ``gm`` in which every site's output is blended with its input by its own slope."""
    model = copy.deepcopy(gm)
    _out_of_place(model)
    blends: dict[str, _Blend] = {}
    for site in sites:
        blend = blends[site.name] = _Blend()
        if site.in_graph:
            node = node_named(model, site.name)
            target = f"_layerfold_{len(blends)}"
            model.add_submodule(target, blend)
            with model.graph.inserting_after(node):
                mixed = model.graph.call_module(target, (node.args[0], node))
            node.replace_all_uses_with(mixed, delete_user_cb=lambda user, mixed=mixed: user is not mixed)
        else:  # inside a leaf module: a forward hook replaces the rectifier's output
            model.get_submodule(site.name).register_forward_hook(lambda _m, args, out, b=blend: b(args[0], out))
    model.recompile()
    return model, blends


def layerfold_scores(gm: fx.GraphModule, sites: list[CallSite], loader: Iterable, device: torch.device,
                     batches: int | None, train_mode: bool) -> dict[str, float]:
    """Layer Folding (Dror et al., 2021, "Layer Folding: Neural Network Depth Reduction using Activation
    Linearization"), as the EASIER authors ran it for their comparison: every rectifier becomes
    α·x + (1 − α)·act(x), and the slopes α (from 0) are trained on CE + λ·Σ(1 − α)² (λ = LAYERFOLD_PENALTY,
    plain SGD, ``batches`` steps of :func:`layerfold_lr`); the score is 1 − α (unclamped, so no ties), and the
    most linear site goes first. Here only the slopes train (weights frozen): it ranks sites in a few steps,
    where the paper trains weights and slopes together. A site whose pre-activations are all ≥ 0 is already
    linear: the task gradient on its α is exactly zero and it ends at α = 1/2; a site the task needs ends lower."""
    model, blends = _blended(gm, sites)
    model.to(device).train(train_mode)
    model.requires_grad_(False)
    alphas = [b.alpha.requires_grad_(True) for b in blends.values()]
    steps = max(batches if batches is not None else len(loader), 1)  # type: ignore[arg-type]
    opt = torch.optim.SGD(alphas, lr=layerfold_lr(steps))
    for x, y in _batches(loader, steps):
        penalty = sum((1 - a) ** 2 for a in alphas)
        loss = F.cross_entropy(model(x.to(device)), y.to(device)) + LAYERFOLD_PENALTY * penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {name: 1.0 - float(b.alpha.detach()) for name, b in blends.items()}


# --- EGP ---------------------------------------------------------------------------------------------
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


def egp_scores(gm: fx.GraphModule, sites: list[CallSite], stats: dict[str, SiteStats], loader: Iterable,
               device: torch.device, batches: int | None, threshold: float) -> dict[str, float]:
    """Entropy-Guided Pruning (Liao et al., 2023, "Can Unstructured Pruning Reduce the Depth in Deep Neural
    Networks?"): unstructured magnitude pruning whose budget goes to the low-entropy layers, so that their units
    collapse to one state and the layer becomes removable. One pruning step per round on a copy: the layer that
    produces each site loses its smallest-|w| share ``egp_rates(H)``; the score is the entropy re-measured on
    the pruned copy in eval mode (BatchNorm with its running statistics, as the pruned network would run), so
    the sites whose units collapse go first."""
    pruned = copy.deepcopy(gm)
    rates = egp_rates(torch.tensor([stats[s.name].entropy for s in sites]))
    for site, rate in zip(sites, rates.tolist(), strict=True):
        layer = producer(pruned, site)
        k = int(rate * layer.weight.numel()) if layer is not None else 0
        if k > 0:
            with torch.no_grad():
                w = layer.weight
                w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0.0
    after = measure(pruned, sites, loader, device, batches, train_mode=False, threshold=threshold)
    return {name: s.entropy for name, s in after.items()}


def study_scores(criterion: str, gm: fx.GraphModule, sites: list[CallSite], stats: dict[str, SiteStats],
                 loader: Iterable, device: torch.device, batches: int | None, train_mode: bool,
                 threshold: float) -> dict[str, float]:
    """Scores of one of STUDY_CRITERIA (``stats``: this round's measured entropy pass)."""
    if criterion == "gradient":
        return gradient_scores(gm, sites, loader, device, batches, train_mode)
    if criterion == "layerfold":
        return layerfold_scores(gm, sites, loader, device, batches, train_mode)
    if criterion == "egp":
        return egp_scores(gm, sites, stats, loader, device, batches, threshold)
    if criterion != "tlc":
        raise UserError(f"unknown criterion '{criterion}'")
    predicted = tlc_scores(gm, sites, threshold)
    measured = [n for n, v in predicted.items() if v is None]
    if measured:
        info(f"tlc: {len(measured)} of {len(sites)} call sites have no BatchNorm right before them; "
             "their measured entropy stands in")
    return {n: stats[n].entropy if v is None else v for n, v in predicted.items()}


# --- --entropy-reg: a differentiable proxy of the entropy --------------------------------------------
class _SoftEntropy(nn.Module):
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
    """A copy of ``gm`` finetuned on CE + λ·Σ_sites H_soft(site) (see _SoftEntropy, temperature τ): one training
    that pushes many sites toward a single state, so that the K lowest can then go at once (the EASIER
    paper's open question: a differentiable proxy of the entropy in the loss for a one-shot method)."""
    model = copy.deepcopy(gm)
    probed, probes, handles = instrument(model, sites, make_probe=lambda dim: _SoftEntropy(dim, tau, threshold))

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


# --- the rectifier ablation --------------------------------------------------------------------------
RECTIFIER_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
}


def swap_rectifiers(gm: fx.GraphModule, old: str, new: str) -> fx.GraphModule:
    """A copy of ``gm`` in which every call site of kind ``old`` computes ``new`` instead (the EASIER paper's
    rectifier ablation: ReLU → LeakyReLU(0.01) / GELU / SiLU, then finetune to recover). Each site gets its own
    fresh module, so sites stay separately removable; everything else is untouched."""
    if new not in RECTIFIER_FACTORIES:
        raise UserError(f"cannot swap to '{new}'; choose from {', '.join(RECTIFIER_FACTORIES)}")
    out = copy.deepcopy(gm)
    for i, site in enumerate(find_call_sites(out, [old])):
        if site.in_graph:
            node = node_named(out, site.name)
            target = f"_{new}_{i}"
            out.add_submodule(target, RECTIFIER_FACTORIES[new]())
            with out.graph.inserting_after(node):
                swapped = out.graph.call_module(target, (node.args[0],))
            node.replace_all_uses_with(swapped)
            out.graph.erase_node(node)
        else:
            parent, _, attr = site.name.rpartition(".")
            setattr(out.get_submodule(parent), attr, RECTIFIER_FACTORIES[new]())
    out.graph.lint()
    out.recompile()
    return out
