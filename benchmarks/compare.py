"""The study, side by side: EASIER vs Layer Folding, EGP, TLC, gradient, sparsity and random orders, the
differentiable-entropy one-shot (--entropy-reg), one-shot vs iterative, and the rectifier ablation.

One data set (../shared CIFAR-10 JPEGs), one start per model (the original after one cached baseline finetune),
the same finetune budget per round for every method; each (model, method, seed) runs the loop with
``--max-drop`` out of the way (every round kept, up to ``--max-removed``), so each method draws a curve of top-1
vs activations removed (the paper's figure); "removed within budget" then applies EASIER's rule to the curve
(the rounds before the first one more than 1 point below the start). Every cell is cached under
runs/compare/<model>/ (a rerun skips finished cells; an interrupted cell resumes from its state.pt).
The shipped ORT speed-up per cell: the start with the within-budget removals, folded (auto), exported and timed
against the original (batch 1, 1 thread).

    OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/compare.py > runs/compare.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_resnets import common_args, parse  # noqa: E402
from latency_aware import MODELS, _load  # noqa: E402  (one list of the trained CIFAR models)

from easier_export.core.io import save_json, save_torch
from easier_export.core.ort import cpu_name
from easier_export.loop.config import LoopConfig
from easier_export.loop.criteria.tlc import tlc_scores
from easier_export.loop.entropy import measure
from easier_export.loop.linearize import run_loop
from easier_export.loop.state import cpu_state
from easier_export.loop.train import finetune, seed_everything
from easier_export.pipeline import CompressConfig, speedup_probe
from easier_export.trace.edits import remove_sites, swap_rectifiers
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")
BUDGET = 1.0  # points of top-1 below the start: EASIER's rule, applied to each curve


@dataclass(frozen=True)
class Method:
    """One line of the figure: LoopConfig overrides, and a rectifier to swap ReLU for before the loop."""

    label: str
    loop: dict = field(default_factory=dict)
    swap: str | None = None
    one_shot: bool = False  # its budget is K rounds' worth of finetuning in one go


def methods(args: argparse.Namespace) -> dict[str, Method]:
    k, e = args.max_removed, args.finetune_epochs
    return {
        "easier": Method("EASIER (entropy, iterative)"),
        "random": Method("random order", {"criterion": "random"}),
        "layerfold": Method("Layer Folding (slopes → linear)", {"criterion": "layerfold"}),
        "egp": Method("EGP (entropy-guided pruning → collapse)", {"criterion": "egp"}),
        "tlc": Method("TLC (BatchNorm statistics)", {"criterion": "tlc"}),
        "gradient": Method("gradient magnitude", {"criterion": "gradient"}),
        "sparsity": Method("activation sparsity", {"criterion": "sparsity"}),
        "one-shot": Method(f"one-shot entropy, K={k}", {"one_shot": k, "finetune_epochs": k * e}, one_shot=True),
        "entropy-reg": Method(f"--entropy-reg {args.entropy_reg} (τ {args.entropy_tau}) + one-shot K={k}",
                              {"one_shot": k, "entropy_reg": args.entropy_reg, "entropy_tau": args.entropy_tau,
                               "finetune_epochs": k * e / 2}, one_shot=True),
        "leaky_relu": Method("EASIER after ReLU → LeakyReLU", swap="leaky_relu"),
        "gelu": Method("EASIER after ReLU → GELU", swap="gelu"),
        "silu": Method("EASIER after ReLU → SiLU", swap="silu"),
    }


def data(name: str, args: argparse.Namespace):
    """The model (the shared ResNets, or the checkpoint train_cifar.py wrote under ``--trained``), its loaders and
    its baseline finetune epochs."""
    loaded, loaders = _load(name, args)
    return loaded, loaders, MODELS[name][2]


def start(name: str, loaded, loaders, epochs: float, out: Path, swap: str | None, args) -> torch.nn.Module:
    """The traced original after its baseline finetune (and a rectifier swap + recovery), cached once."""
    path = out / ("start.pt" if swap is None else f"start-{swap}.pt")
    gm = trace(loaded.model.eval()) if swap is None else swap_rectifiers(start(name, loaded, loaders, epochs, out,
                                                                               None, args), "relu", swap)
    if path.is_file():
        gm.load_state_dict(torch.load(path, weights_only=True))
        return gm
    seed_everything(12345, loaders.train)
    finetune(gm, loaders.train, DEVICE, epochs if swap is None else args.recover_epochs, args.lr)
    save_torch(cpu_state(gm), path)
    return gm


def within_budget(curve: list[tuple[int, float]], base: float) -> tuple[int, float]:
    """EASIER's rule on a curve: removals (and top-1) before the first point more than BUDGET below ``base``."""
    kept, top1 = 0, base
    for removed, acc in curve:
        if acc < base - BUDGET:
            break
        kept, top1 = removed, acc
    return kept, top1


def cell(name: str, key: str, method: Method, seed: int, args: argparse.Namespace) -> dict:
    out = args.out / name
    done = out / f"{key}-s{seed}.json"
    if done.is_file():
        return json.loads(done.read_text())
    print(f"== {name} {key} seed {seed}", flush=True)
    loaded, loaders, baseline = data(name, args)
    gm = start(name, loaded, loaders, baseline, out, method.swap, args)
    cfg = LoopConfig(**{"max_drop": 100.0, "finetune_epochs": args.finetune_epochs, "lr": args.lr,
                        "entropy_batches": args.entropy_batches, "max_removed": args.max_removed, "patience": 0,
                        "seed": seed, **method.loop})
    t0 = time.perf_counter()
    result = run_loop(gm, f"{name}:{key}", loaders.train, loaders.val, cfg, DEVICE, out / f"{key}-s{seed}")
    wall = time.perf_counter() - t0
    curve, removed = [], 0
    for r in result.history:
        removed += len(r.removed)
        curve.append((removed, r.val_top1))
    kept, top1 = within_budget(curve, result.base_top1)
    example = next(iter(loaders.val))[0][:1]
    ship = remove_sites(gm, result.removed[:kept]) if kept else gm
    probe = speedup_probe(gm.cpu().eval(), example, out / f"{key}-s{seed}" / "probe",
                          CompressConfig(fold="auto", threads=1, bench_batches=(1,), bench_seconds=2.0))
    row = {"model": name, "method": key, "seed": seed, "base_top1": result.base_top1, "curve": curve,
           "removed": result.removed, "sites": len(find_call_sites(gm)), "within_budget": kept,
           "top1_within": top1, "rounds": len(result.history), "wall_s": wall,
           "finetune_epochs_total": cfg.finetune_epochs * len(result.history) * (2 if cfg.entropy_reg else 1),
           "speedup_b1": probe(ship.eval())}
    save_json(row, done)
    return row


def tlc_vs_entropy(name: str, args: argparse.Namespace) -> dict:
    """TLC's predicted entropy vs the measured one on the start model's BN → act sites (Spearman ρ)."""
    path = args.out / name / "tlc_vs_entropy.json"
    if path.is_file():
        return json.loads(path.read_text())
    loaded, loaders, baseline = data(name, args)
    gm = start(name, loaded, loaders, baseline, args.out / name, None, args)
    sites = find_call_sites(gm)
    predicted = {n: v for n, v in tlc_scores(gm, sites).items() if v is not None}
    measured = {n: s.entropy for n, s in measure(gm, sites, loaders.train, DEVICE, 20).items() if n in predicted}
    names = list(predicted)

    def ranks(d: dict) -> torch.Tensor:
        return torch.tensor([sorted(names, key=lambda n: d[n]).index(n) for n in names], dtype=torch.float64)

    rho = float(torch.corrcoef(torch.stack([ranks(predicted), ranks(measured)]))[0, 1])
    row = {"sites_with_bn": len(names), "sites": len(sites), "spearman": rho,
           "predicted": predicted, "measured": measured}
    save_json(row, path)
    return row


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    """Mean, and min–max over seeds when there are several; — where the curve has no such point (one-shot)."""
    if any(math.isnan(x) for x in xs):
        return "—"
    text = fmt.format(mean(xs))
    return text + (f" ({fmt.format(min(xs))}–{fmt.format(max(xs))})" if len(xs) > 1 else "")


def at(curve: list, k: int) -> float:
    return next((acc for removed, acc in curve if removed == k), math.nan)


def plot(rows: list[dict], all_methods: dict[str, Method], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=list(MODELS).index)
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.8), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        base = next(r["base_top1"] for r in rows if r["model"] == name and r["method"] == "easier")
        for key, method in all_methods.items():
            mine = [r for r in rows if r["model"] == name and r["method"] == key]
            if not mine:
                continue
            xs = [0] + [k for k, _ in mine[0]["curve"]]
            ys = [mean([r["base_top1"] for r in mine])] + [mean([at(r["curve"], k) for r in mine]) for k in xs[1:]]
            style = {"marker": "*", "markersize": 12, "linestyle": "none"} if method.one_shot else \
                {"marker": "o", "linestyle": "--" if method.swap else "-"}
            ax.plot(xs, ys, label=method.label + (f" ({len(mine)} seeds)" if len(mine) > 1 else ""), **style)
        ax.axhline(base - BUDGET, color="grey", linestyle="--", linewidth=1, label=f"budget ({BUDGET} point)")
        ax.set(title=f"{name} (CIFAR-10)", xlabel="activations removed", ylabel="val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def table(rows: list[dict], all_methods: dict[str, Method], args: argparse.Namespace) -> str:
    lines = [
        "# The study: EASIER vs Layer Folding, EGP, TLC and other orders, side by side (CIFAR-10)",
        "",
        f"Machine: {cpu_name()}, 1 thread ({os.cpu_count()} cores, shared with other jobs), no GPU; "
        f"torch {torch.__version__}. Script: `benchmarks/compare.py`; figure: `compare.png`.",
        "",
        f"Settings: every model starts from one cached baseline (the shared ResNets: the checkpoint finetuned "
        f"{MODELS['resnet20'][2]} epoch on the ../shared JPEGs, seed 12345); every method then runs the loop "
        f"with `--finetune-epochs {args.finetune_epochs} --lr {args.lr} --entropy-batches {args.entropy_batches} "
        f"--max-removed {args.max_removed} --patience 0 --max-drop 100` (every round kept, so each method "
        f"draws its curve to {args.max_removed} removed), batch {args.batch_size}, val = the full ../shared "
        f"`val/` (5,000 images) after every round. 'within budget' applies EASIER's rule to the curve: the "
        f"removals before the first round more than {BUDGET} point below the start. One-shot methods get the "
        f"iterative runs' total finetuning ({args.max_removed} × {args.finetune_epochs} epoch) in one go "
        f"(`--entropy-reg`: half with the penalty, half after the removal). The rectifier ablation swaps every "
        f"ReLU, finetunes {args.recover_epochs} epoch to recover, and measures its budget from that model. "
        "ORT speed-up: the within-budget model folded (`--fold auto`, padding not relocated), exported and "
        "timed against the original, batch 1, 1 thread, 2 s interleaved (noise about ±3 %).",
        "",
        "| model | method | seeds | start top-1 | removed within budget | top-1 there | top-1 at 4 removed | "
        f"top-1 at {args.max_removed} removed | mean top-1 over the curve | rounds | finetune epochs | wall | "
        "ORT speed-up b1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    winners = []
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        scored = []
        for key, method in all_methods.items():
            rs = [r for r in mine if r["method"] == key]
            if not rs:
                continue
            lines.append(
                f"| {name} | {method.label} | {', '.join(str(r['seed']) for r in rs)} | "
                f"{spread([r['base_top1'] for r in rs])} | {spread([r['within_budget'] for r in rs], '{:.1f}')} | "
                f"{spread([r['top1_within'] for r in rs])} | {spread([at(r['curve'], 4) for r in rs])} | "
                f"{spread([at(r['curve'], args.max_removed) for r in rs])} | "
                f"{spread([mean([a for _, a in r['curve']]) for r in rs])} | {rs[0]['rounds']} | "
                f"{rs[0]['finetune_epochs_total']:.2f} | {spread([r['wall_s'] / 60 for r in rs], '{:.1f}')} min | "
                f"×{spread([r['speedup_b1'] for r in rs])} |")
            if method.swap is None:
                scored.append((mean([r["within_budget"] for r in rs]),
                               mean([mean([a for _, a in r["curve"]]) for r in rs]), method.label))
        best = max(scored, key=lambda s: (s[0], -math.inf if math.isnan(s[1]) else s[1]))
        winners.append(f"- **{name}**: {best[2]} ({best[0]:.1f} removed within budget, mean top-1 {best[1]:.2f} % "
                       "over its curve), among the ReLU methods.")
    lines += ["", "## Winner per model (most removed within budget; ties: mean top-1 over the curve)", "",
              *winners]
    for name in MODELS:
        path = args.out / name / "tlc_vs_entropy.json"
        if path.is_file():
            t = json.loads(path.read_text())
            lines += ["", f"## TLC's prediction vs the measured entropy ({name}, start model)", "",
                      f"On the {t['sites_with_bn']} of {t['sites']} call sites fed directly by a BatchNorm, the "
                      f"rank correlation (Spearman ρ) between Φ(β/|γ|)-predicted and measured entropy (20 batches, "
                      f"train mode) is **{t['spearman']:.2f}**. The other sites (after a residual add) have no "
                      "BatchNorm to read: `--criterion tlc` uses their measured entropy."]
    notes = ROOT / "benchmarks" / "compare_notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def agreement(outs: list[Path], k: int) -> str:
    """Do two seeds of one method agree at ``k`` removed? Per finetune budget (one ``--out`` each), method and
    seed: top-1 at 1..k removed, the gap between the method's seeds at ``k``, the sites and the cell's wall time.
    Measured before the study, to choose its finetune budget."""
    lines = ["| epochs / round | method | seed | top-1 at 1..k removed | gap at k (seeds) | removed, in order | wall |",
             "|---|---|---|---|---|---|---|"]
    for out in outs:
        rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/*-s*.json"))]
        for key in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == key), key=lambda r: r["seed"])
            gap = max(at(r["curve"], k) for r in mine) - min(at(r["curve"], k) for r in mine)
            for r in mine:
                curve = " ".join(f"{at(r['curve'], i):.2f}" for i in range(1, k + 1))
                lines.append(f"| {r['finetune_epochs_total'] / r['rounds']:g} | {key} | {r['seed']} | {curve} | "
                             f"{gap:.2f} | {' '.join(r['removed'][:k])} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet20"], choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, help="keys of methods() (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--extra-seeds", type=int, nargs="+", default=[1],
                        help="run after everything else, for --extra-methods only")
    parser.add_argument("--extra-methods", nargs="+", default=["easier", "random"])
    parser.add_argument("--finetune-epochs", type=float, default=0.05)
    parser.add_argument("--recover-epochs", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--max-removed", type=int, default=6)
    parser.add_argument("--entropy-reg", type=float, default=0.5)
    parser.add_argument("--entropy-tau", type=float, default=0.1)
    parser.add_argument("--report-only", action="store_true", help="no new runs: rewrite table and plot")
    parser.add_argument("--agreement", type=Path, nargs="+", default=None,
                        help="no new runs: print the seed-agreement table of these --out folders (one per budget)")
    common_args(parser, "compare", "compare", entropy_batches=5, workers=1)
    args = parse(parser)
    if args.agreement:
        print(agreement(args.agreement, args.max_removed))
        return
    torch.set_num_threads(1)
    all_methods = methods(args)
    todo = [(m, k, s) for m in args.models for s in args.seeds for k in (args.methods or all_methods)]
    todo += [(m, k, s) for m in args.models for s in args.extra_seeds for k in args.extra_methods]

    def finished() -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(args.out.glob("*/*-s*.json"))]

    def write() -> None:
        rows = finished()
        if rows:
            args.table.write_text(table(rows, all_methods, args))
            plot(rows, all_methods, args.table.with_name("compare.png"))

    if not args.report_only:
        for name in args.models:
            tlc_vs_entropy(name, args)
        for name, key, seed in todo:  # the table is rewritten after each cell: a long run keeps what it finished
            try:
                cell(name, key, all_methods[key], seed, args)
            except Exception:  # one failed cell (reported in the log) must not cost the others their time
                traceback.print_exc()
            write()
    write()
    print(args.table.read_text())


if __name__ == "__main__":
    main()
