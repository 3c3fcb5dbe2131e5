"""Why latency selection ranks fold groups by summed entropy per microsecond saved: the alternatives, measured.

`--select latency` removes, each round, the fold group with the least *risk per µs*, risk being the summed
entropy of the group's activations. This script checks that formula without the cost of finetuning rounds:
for each ranking rule it removes groups greedily (the loop's own candidate set: paying groups only, marginal
gains re-computed after each removal), recalibrates BatchNorm statistics on a few training batches (no gradient
step), and records val top-1 and the planner's µs saved after every group. A rule is better when it reaches a
given saving for less accuracy lost. Rules:

- ``entropy/us`` (shipped): summed entropy / marginal µs saved;
- ``entropy``: summed entropy only (EASIER's risk, blind to the gain among paying groups);
- ``us``: largest marginal saving first (blind to the risk);
- ``random``: a seeded shuffle of the paying groups (the floor).

It also reports, for every group removed alone, its zero-shot drop, and the rank correlation between the group's
summed entropy and that drop (is entropy a usable risk measure at all?).

    .venv/bin/python benchmarks/select_formula.py --models mobilenet_v2 vit \
        --groups-from runs/la_e1            # reuse the fold groups the latency runs measured (else: timed here)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_resnets import common_args, parse  # noqa: E402
from latency_aware import MODELS, SHARED  # noqa: E402  (one list of trained models)

from easier_export.core.ort import cpu_name
from easier_export.fold.groups import FoldGroups, Group
from easier_export.fold.planner import LatencyTable
from easier_export.load.data import image_folder
from easier_export.load.models import load_model
from easier_export.loop.config import LoopConfig
from easier_export.loop.selection import measure_groups, risk, score_sites
from easier_export.loop.train import evaluate
from easier_export.trace.edits import remove_sites
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

Rule = Callable[[Group, dict[str, float]], float]
RULES: dict[str, Rule] = {
    "entropy/us": lambda g, s: risk(g, s) / g.us_saved,
    "entropy": risk,
    "us": lambda g, s: -g.us_saved,
}


@torch.no_grad()
def recalibrate(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate BatchNorm running statistics for the new (shallower) function: removing an activation shifts
    every later layer's input distribution, and stale statistics would charge that to the rule, not the removal."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for x in batches:
        model(x)
    model.eval()


def zero_shot(gm, removed: list[str], batches: list[torch.Tensor], val, fits: dict | None = None) -> float:
    """Val top-1 with ``removed`` gone (padding relocated as the loop does; ``fits``: their affine stand-ins),
    after BN recalibration."""
    model = remove_sites(gm, removed, relocate=True, fits=fits)
    recalibrate(model, batches)
    return evaluate(model, val, torch.device("cpu"))


def walk(gm, groups: FoldGroups, scores: dict[str, float], order: Callable[[list[Group]], Group],
         steps: int, batches: list[torch.Tensor], val) -> list[tuple[int, float, float]]:
    """(activations removed, µs saved, top-1) after each greedily chosen group."""
    removed: list[str] = []
    curve = []
    for _ in range(steps):
        offered = groups.candidates(set(removed), allowed=set(scores))
        if not offered:
            break
        removed += list(order(offered).sites)
        curve.append((len(removed), groups.saving(set(removed)), zero_shot(gm, removed, batches, val)))
    return curve


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def study(name: str, args: argparse.Namespace) -> list[str]:
    arch, weights, _ = MODELS[name]
    loaded = load_model(arch, weights=weights)
    loaders = image_folder(SHARED / "datasets" / "cifar10-jpeg", loaded.input_size, loaded.task.mean, loaded.task.std,
                           args.batch_size, args.workers, num_classes=10)
    gm = trace(loaded.model.eval())
    cfg = LoopConfig(entropy_batches=args.entropy_batches, select="latency")
    sites = [s for s in find_call_sites(gm, cfg.rectifiers) if s.in_graph]
    scores, _ = score_sites(gm, sites, loaders.train, torch.device("cpu"), cfg, 0)
    state = args.groups_from / f"{name}-latency" / "state.pt" if args.groups_from else None
    if state is not None and state.is_file():
        groups = FoldGroups.from_dict(torch.load(state, weights_only=False)["groups"])
    else:
        example = next(iter(loaders.val))[0][:1]
        groups = measure_groups(gm, cfg, example, LatencyTable("cpu", None, args.out / f"{name}-latency.json"))
    batches = [x for x, _ in zip((b[0] for b in loaders.train), range(args.recal_batches), strict=False)]
    base = evaluate(gm, loaders.val, torch.device("cpu"))
    alone = groups.candidates(set(), allowed=set(scores))
    drops = [base - zero_shot(gm, list(g.sites), batches, loaders.val) for g in alone]
    rho = spearman([sum(scores[s] for s in g.sites) for g in alone], drops)
    lines = [f"## {name}: {len(sites)} activations, {len(alone)} paying groups, original top-1 {base:.2f} %", "",
             f"Each group removed alone (zero-shot, BN recalibrated): drop {min(drops):.2f} … {max(drops):.2f} "
             f"points; Spearman ρ(summed entropy, drop) = {rho:+.2f}.", "",
             "| rule | step | activations removed | µs saved (planner, b1) | top-1 | Δ |", "|---|---|---|---|---|---|"]
    rng = random.Random(args.seed)
    orders = {rule: (lambda offered, f=f: min(offered, key=lambda g: (f(g, scores), g.sites)))
              for rule, f in RULES.items()}
    orders["random"] = lambda offered: rng.choice(offered)
    for rule, order in orders.items():
        for step, (k, us, top1) in enumerate(walk(gm, groups, scores, order, args.steps, batches, loaders.val), 1):
            lines.append(f"| {rule} | {step} | {k} | {us:.0f} | {top1:.2f} | {top1 - base:+.2f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "vit"], choices=list(MODELS))
    parser.add_argument("--groups-from", type=Path, default=None, help="a latency_aware.py --out folder")
    parser.add_argument("--steps", type=int, default=8, help="groups removed per rule")
    parser.add_argument("--recal-batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    common_args(parser, "select_formula", "select_formula", entropy_batches=5, workers=2)
    args = parse(parser)
    args.out.mkdir(parents=True, exist_ok=True)
    body = [line for name in args.models for line in study(name, args)]
    head = ["# Which fold group first? The ranking rule of `--select latency`, measured", "",
            f"Machine: {cpu_name()}, {torch.get_num_threads()} threads ({os.cpu_count()} cores), no GPU; torch "
            f"{torch.__version__}. Zero-shot: groups removed greedily by each rule (paying groups only, marginal "
            f"gains re-computed after each removal), no finetuning, BatchNorm statistics re-estimated on "
            f"{args.recal_batches} training batches of {args.batch_size}; entropy measured once on the original "
            f"({args.entropy_batches} batches); random rule seed {args.seed}. µs are the planner's in-context "
            "segment timings (batch 1), not end-to-end latency.", ""]
    args.table.write_text("\n".join(head + body))
    print(args.table.read_text())


if __name__ == "__main__":
    main()
