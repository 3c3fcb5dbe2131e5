"""The study, side by side: EASIER vs Layer Folding, EGP, TLC, gradient, sparsity and random orders, the
differentiable-entropy one-shot (--entropy-reg), one-shot vs iterative, and the rectifier ablation.

One data set (../shared CIFAR-10 JPEGs), one start per model (the original after one cached baseline finetune),
the same finetune budget per round for every method; each (model, method, seed) runs the loop with
``--max-drop`` out of the way (every round kept, up to ``--max-removed``), so each method draws a curve of top-1
vs activations removed (the paper's figure); "removed within budget" then applies EASIER's rule to the curve
(the rounds before the first one more than 1 point below the start). A finished cell is a small JSON under
benchmarks/compare_cells/<model>/, committed, so the study survives a fresh checkout (a rerun skips it); the heavy
state (the cached start, an interrupted cell's state.pt, which it resumes from) lives under runs/compare/<model>/.
The shipped ORT speed-up per cell: the start with the within-budget removals, folded the ways `compress` tries
(the planner's merges, every merge, BatchNorm only), exported and raced against the original (batch 1, 1 thread).

Per-image val outcomes at each removal count give paired differences between methods per seed; a method is called
ahead or behind only where every seed agrees beyond its interval. Cells run side by side (``--shard K/N``, one core
each); ``--speed`` then times them alone:

    OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/compare.py --shard 0/2 > runs/compare-0.log 2>&1 &
    OMP_NUM_THREADS=1 nohup .venv/bin/python benchmarks/compare.py --shard 1/2 > runs/compare-1.log 2>&1 &
    .venv/bin/python benchmarks/compare.py --speed
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
import textwrap
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_resnets import common_args, parse  # noqa: E402
from latency_aware import MODELS, _load  # noqa: E402  (one list of the trained CIFAR models)

from easier_export.core.io import save_json, save_torch
from easier_export.core.ort import cpu_name
from easier_export.core.stats import PairedChange, paired_accuracy_change
from easier_export.loop.config import LoopConfig, Task
from easier_export.loop.criteria.tlc import tlc_scores
from easier_export.loop.entropy import measure
from easier_export.loop.linearize import round_seed, run_loop
from easier_export.loop.state import cpu_state
from easier_export.loop.train import evaluate_metrics, finetune, seed_everything
from easier_export.pipeline import CompressConfig, kept_steps, speedup_probe
from easier_export.trace.edits import remove_sites, swap_rectifiers
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")
BUDGET = 1.0  # points of top-1 below the start: EASIER's rule, applied to each curve


@dataclass(frozen=True)
class Method:
    """One line of the figure: LoopConfig overrides, and a rectifier to swap the model's own for before the loop."""

    label: str
    loop: dict = field(default_factory=dict)
    swap: str | None = None
    one_shot: bool = False  # its budget is K rounds' worth of finetuning in one go
    control: bool = False  # the rounds' finetuning with nothing removed: what removing costs is measured against it


def methods(args: argparse.Namespace) -> dict[str, Method]:
    k, e = args.max_removed, args.finetune_epochs
    return {
        "easier": Method("EASIER (entropy)"),
        "control": Method("finetune only (control)", control=True),
        "random": Method("random order", {"criterion": "random"}),
        "layerfold": Method("Layer Folding", {"criterion": "layerfold"}),
        "egp": Method("EGP", {"criterion": "egp"}),
        "tlc": Method("TLC (BatchNorm)", {"criterion": "tlc"}),
        "gradient": Method("gradient magnitude", {"criterion": "gradient"}),
        "sparsity": Method("sparsity", {"criterion": "sparsity"}),
        "one-shot": Method(f"one-shot entropy, K={k}", {"one_shot": k, "finetune_epochs": k * e}, one_shot=True),
        **{f"entropy-reg-{reg:g}": Method(f"entropy-reg {reg:g}, one-shot K={k}",
                                          {"one_shot": k, "entropy_reg": reg, "entropy_tau": args.entropy_tau,
                                           "finetune_epochs": k * e / 2}, one_shot=True)
           for reg in args.entropy_reg},
        "leaky_relu": Method("EASIER, rectifier → LeakyReLU", swap="leaky_relu"),
        "gelu": Method("EASIER, rectifier → GELU", swap="gelu"),
        "silu": Method("EASIER, rectifier → SiLU", swap="silu"),
    }


def data(name: str, args: argparse.Namespace):
    """The model (the shared ResNets, or the checkpoint train_cifar.py wrote under ``--trained``), its loaders and
    its baseline finetune epochs."""
    loaded, loaders = _load(name, args)
    return loaded, loaders, MODELS[name][2]


def start(name: str, loaded, loaders, epochs: float, out: Path, swap: str | None, args) -> torch.nn.Module:
    """The traced original after its baseline finetune (and a rectifier swap + recovery), cached once."""
    path = out / ("start.pt" if swap is None else f"start-{swap}.pt")
    gm = trace(loaded.model.eval()) if swap is None else swapped(start(name, loaded, loaders, epochs, out, None,
                                                                       args), swap)
    if path.is_file():
        gm.load_state_dict(torch.load(path, weights_only=True))
        return gm
    seed_everything(12345, loaders.train)
    finetune(gm, loaders.train, DEVICE, epochs if swap is None else args.recover_epochs, args.lr)
    save_torch(cpu_state(gm), path)
    return gm


def native_rectifier(gm: torch.fx.GraphModule) -> str:
    """The rectifier the model was trained with (its most common call-site kind): what the ablation swaps out."""
    return Counter(site.op for site in find_call_sites(gm)).most_common(1)[0][0]


def swapped(gm: torch.fx.GraphModule, swap: str) -> torch.fx.GraphModule:
    """``gm`` with its own rectifier swapped for ``swap`` at every call site (ReLU in the ResNets, ReLU6 in
    MobileNetV2)."""
    return swap_rectifiers(gm, native_rectifier(gm), swap)


def within_budget(curve: list[tuple[int, float]], base: float) -> tuple[int, float]:
    """EASIER's rule on a curve: removals (and top-1) before the first point more than BUDGET below ``base``."""
    kept, top1 = 0, base
    for removed, acc in curve:
        if acc < base - BUDGET:
            break
        kept, top1 = removed, acc
    return kept, top1


def cell_file(cells: Path, name: str, key: str, seed: int) -> Path:
    """Where a finished cell of ``name`` lives (committed, so the study survives a fresh checkout)."""
    return cells / name / f"{key}-s{seed}.json"


def tlc_file(cells: Path, name: str) -> Path:
    """Where TLC's prediction vs the measured entropy of ``name`` lives, beside its cells."""
    return cells / name / "tlc_vs_entropy.json"


def read_cells(cells: Path) -> list[dict]:
    """Every finished cell under ``cells``, one folder per model."""
    return [json.loads(p.read_text()) for p in sorted(cells.glob("*/*-s*.json"))]


def cell(name: str, key: str, method: Method, seed: int, args: argparse.Namespace) -> dict | None:
    """One (model, method, seed): its curve, the removals within budget, and per removal count the per-image
    val outcomes (from the round's saved weights), for paired differences between methods; None for a swap to the
    model's own rectifier (nothing to ablate). No timing: cells run side by side; ``--speed`` times them
    afterwards, alone."""
    out = args.out / name
    done = cell_file(args.cells, name, key, seed)
    if done.is_file():
        return json.loads(done.read_text())
    print(f"== {name} {key} seed {seed}", flush=True)
    loaded, loaders, baseline = data(name, args)
    if method.swap is not None and method.swap == native_rectifier(trace(loaded.model.eval())):
        print(f"skipped: {name} already runs {method.swap}", flush=True)
        return None
    gm = start(name, loaded, loaders, baseline, out, method.swap, args)
    if method.control:
        row = control_cell(gm, loaders, seed, out / f"{key}-s{seed}", args)
        save_json({"model": name, "method": key, "seed": seed, **row}, done)
        return json.loads(done.read_text())
    cfg = LoopConfig(**{"max_drop": 100.0, "finetune_epochs": args.finetune_epochs, "lr": args.lr,
                        "entropy_batches": args.entropy_batches, "max_removed": args.max_removed, "patience": 0,
                        "seed": seed, **method.loop})
    run_dir = out / f"{key}-s{seed}"
    result = run_loop(gm, f"{name}:{key}", loaders.train, loaders.val, cfg, DEVICE, run_dir)
    curve, removed = [], 0
    for r in result.history:
        removed += len(r.removed)
        curve.append((removed, r.val_top1))
    outcomes = {str(len(step.removed)): as_bits(evaluate_metrics(step.model, loaders.val, DEVICE)["correct"])
                for step in kept_steps(gm, result, run_dir, cfg, Task()) if step.round}  # every round is kept
    kept, top1 = within_budget(curve, result.base_top1)
    row = {"model": name, "method": key, "seed": seed, "base_top1": result.base_top1, "curve": curve,
           "removed": result.removed, "sites": len(find_call_sites(gm)), "within_budget": kept,
           "top1_within": top1, "rounds": len(result.history), "wall_s": sum(r.seconds for r in result.history),
           "finetune_epochs_total": cfg.finetune_epochs * len(result.history) * (2 if cfg.entropy_reg else 1),
           "outcomes": outcomes}
    save_json(row, done)
    return row


def as_bits(correct: torch.Tensor) -> str:
    """Per-image val outcomes packed 8 to a byte, in base64 after their count: what a committed cell keeps for
    paired tests (5,000 images in 840 characters)."""
    flags = (correct > 0.5).numpy().astype(np.uint8)
    return f"{len(flags)}:" + base64.b64encode(np.packbits(flags, bitorder="little").tobytes()).decode()


def control_cell(gm: torch.nn.Module, loaders, seed: int, run_dir: Path, args: argparse.Namespace) -> dict:
    """The loop's rounds with nothing removed: round r finetunes with the data order the loop's round r uses
    (``round_seed``), so a method minus this row at r removed is what its r removals cost beyond the finetuning
    they came with (a start that is still learning gains in every round). Resumes from the last finished round."""
    path = run_dir / "state.pt"
    saved = torch.load(path, weights_only=True) if path.is_file() else {"curve": [], "outcomes": {}, "wall_s": 0.0}
    if saved["curve"]:
        gm.load_state_dict(saved["model"])
    base = evaluate_metrics(gm, loaders.val, DEVICE)["top1"] if not saved["curve"] else saved["base_top1"]
    for rnd in range(len(saved["curve"]) + 1, args.max_removed + 1):
        t0 = time.perf_counter()
        seed_everything(round_seed(seed, rnd), loaders.train)
        finetune(gm, loaders.train, DEVICE, args.finetune_epochs, args.lr)
        metrics = evaluate_metrics(gm, loaders.val, DEVICE)
        saved["curve"].append((rnd, metrics["top1"]))
        saved["outcomes"][str(rnd)] = as_bits(metrics["correct"])
        saved.update(model=cpu_state(gm), base_top1=base, wall_s=saved["wall_s"] + time.perf_counter() - t0)
        save_torch(saved, path)
        print(f"control round {rnd}: {metrics['top1']:.2f}", flush=True)
    return {"base_top1": base, "curve": saved["curve"], "removed": [], "sites": len(find_call_sites(gm)),
            "within_budget": math.nan, "top1_within": math.nan, "rounds": args.max_removed,
            "wall_s": saved["wall_s"], "finetune_epochs_total": args.max_removed * args.finetune_epochs,
            "outcomes": saved["outcomes"]}


def measure_speed(name: str, rows: list[dict], all_methods: dict[str, Method], args: argparse.Namespace) -> None:
    """The shipped speed-up of each finished cell of ``name`` that has none: its start with the within-budget
    removals, folded the ways shipping tries and exported, raced against the original model. Cells that ship
    the same structure (same rectifier, same removed sites) share one measurement. Run alone: a race beside a
    training is noise."""
    todo = [r for r in rows if r["model"] == name and "speedup_b1" not in r and not all_methods[r["method"]].control]
    if not todo:
        return
    loaded, loaders, baseline = data(name, args)
    original = start(name, loaded, loaders, baseline, args.out / name, None, args).cpu().eval()
    example = next(iter(loaders.val))[0][:1]
    cfg = CompressConfig(fold="auto", threads=1, bench_batches=(1,), bench_seconds=args.bench_seconds)
    probe = speedup_probe(original, example, args.out / name / "probe" / "work", cfg)
    measured: dict[tuple, float] = {}
    for row in todo:
        swap = all_methods[row["method"]].swap
        sites = tuple(sorted(row["removed"][:row["within_budget"]]))
        if (swap, sites) not in measured:
            gm = original if swap is None else swapped(original, swap)
            measured[swap, sites] = probe((remove_sites(gm, list(sites)) if sites else gm).eval())
            print(f"{name} {swap or 'own rectifier'} {len(sites)} removed: ×{measured[swap, sites]:.2f}", flush=True)
        row["speedup_b1"] = measured[swap, sites]
        save_json(row, cell_file(args.cells, name, row["method"], row["seed"]))


def tlc_vs_entropy(name: str, args: argparse.Namespace) -> dict:
    """TLC's predicted entropy vs the measured one on the start model's BN → act sites (Spearman ρ)."""
    path = tlc_file(args.cells, name)
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

    rho = float(torch.corrcoef(torch.stack([ranks(predicted), ranks(measured)]))[0, 1]) if len(names) > 1 else None
    row = {"sites_with_bn": len(names), "sites": len(sites), "spearman": rho,
           "predicted": predicted, "measured": measured}
    save_json(row, path)
    return row


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    """Mean, and min–max over seeds where they differ; — where the curve has no such point (one-shot)."""
    if any(math.isnan(x) for x in xs):
        return "—"
    low, high = fmt.format(min(xs)), fmt.format(max(xs))
    return fmt.format(mean(xs)) + (f" ({low}–{high})" if low != high else "")


def at(curve: list, k: int) -> float:
    return next((acc for removed, acc in curve if removed == k), math.nan)


def outcomes(row: dict, k: int) -> torch.Tensor | None:
    """``as_bits`` read back: 1.0 where the image was classified correctly at ``k`` removed."""
    packed = row.get("outcomes", {}).get(str(k))
    if packed is None:
        return None
    count, payload = packed.split(":")
    flags = np.unpackbits(np.frombuffer(base64.b64decode(payload), np.uint8), count=int(count), bitorder="little")
    return torch.from_numpy(flags.astype(np.float64))


def paired(a: list[dict], b: list[dict], k: int) -> list[tuple[int, PairedChange]]:
    """Method a minus method b at ``k`` removed, per seed both ran (the same finetuning data order), over the val
    images: the change in points, with a bound that makes ``interval`` two-sided 95 %."""
    pairs = []
    for ra in sorted(a, key=lambda r: r["seed"]):
        rb = next((r for r in b if r["seed"] == ra["seed"]), None)
        xa, xb = outcomes(ra, k), None if rb is None else outcomes(rb, k)
        if xa is not None and xb is not None:
            pairs.append((ra["seed"], paired_accuracy_change(xb, xa, 0.975)))
    return pairs


def interval(change: PairedChange) -> tuple[float, float]:
    """The two-sided interval of a change whose one-sided ``bound`` was taken at 97.5 % (``paired``)."""
    return change.bound, 2 * change.change - change.bound


def verdict(pairs: list[tuple[int, PairedChange]]) -> str:
    """Ahead / behind only when every seed's interval excludes zero on the same side: a difference that one seed
    shows and the other does not is training noise, not a property of the method."""
    if len(pairs) < 2:
        return "one seed only"
    if all(interval(p)[0] > 0 for _, p in pairs):
        return "**ahead**"
    if all(interval(p)[1] < 0 for _, p in pairs):
        return "**behind**"
    return "not distinguishable"


def plot(rows: list[dict], all_methods: dict[str, Method], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=list(MODELS).index)
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.8), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        base = next(r["base_top1"] for r in rows if r["model"] == name and all_methods[r["method"]].swap is None)
        for key, method in all_methods.items():
            mine = [r for r in rows if r["model"] == name and r["method"] == key]
            if not mine:
                continue
            xs = [0] + [k for k, _ in mine[0]["curve"]]
            ys = [mean([r["base_top1"] for r in mine])] + [mean([at(r["curve"], k) for r in mine]) for k in xs[1:]]
            style = {"marker": "*", "markersize": 12, "linestyle": "none"} if method.one_shot else \
                {"color": "black", "linestyle": ":"} if method.control else \
                {"marker": "o", "linestyle": "--" if method.swap else "-"}
            ax.plot(xs, ys, label=method.label + (f" ({len(mine)} seeds)" if len(mine) > 1 else ""), **style)
        ax.axhline(base - BUDGET, color="grey", linestyle="--", linewidth=1, label=f"budget ({BUDGET} point)")
        ax.set(title=f"{name} (CIFAR-10)", xlabel="activations removed", ylabel="val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def wrapped(text: str, indent: str = "") -> list[str]:
    """A paragraph (or a bullet, continued under ``indent``) in lines the docs' 120-character limit allows."""
    return textwrap.wrap(text, 120, subsequent_indent=indent, break_on_hyphens=False)


def method_rows(mine: dict[str, list[dict]], all_methods: dict[str, Method],
                cells: Callable[[list[dict]], list[str]]) -> list[str]:
    """One table row per method: its label, then ``cells(its rows)``."""
    return [f"| {all_methods[key].label} | {' | '.join(cells(rs))} |" for key, rs in mine.items()]


def paired_table(mine: dict[str, list[dict]], all_methods: dict[str, Method], ks: tuple[int, ...], reference: str,
                 title: str) -> list[str]:
    """Every method of ``mine`` (one model's cells by method) minus ``reference`` at each removal count, per seed;
    the control is only ever a reference, and the swapped-rectifier rows only against EASIER (against the
    control their difference would mix the swap's cost with the removals')."""
    compared = []
    for key, rs in mine.items():
        if key == reference or all_methods[key].control or (all_methods[key].swap and reference != "easier"):
            continue
        for k in ks:
            pairs = paired(rs, mine[reference], k)
            if pairs:
                per_seed = "; ".join(f"s{seed} {p.change:+.2f} [{interval(p)[0]:+.2f}, {interval(p)[1]:+.2f}]"
                                     for seed, p in pairs)
                compared.append(f"| {all_methods[key].label} | {k} | {per_seed} | {verdict(pairs)} |")
    if not compared:
        return []
    return ["", *wrapped(title + ", per seed both ran (in points, 95 % interval over the 5,000 val images)."), "",
            "| method | removed | per seed | verdict |", "|---|---|---|---|", *compared]


def differences(mine: dict[str, list[dict]], all_methods: dict[str, Method], name: str,
                ks: tuple[int, ...]) -> list[str]:
    """Every method against EASIER at each removal count, the best unswapped method against the others, then what
    each method's removals cost against finetuning alone."""
    lines = []
    if "easier" in mine:
        lines += paired_table(mine, all_methods, ks, "easier",
                              f"Paired differences ({name}): method minus EASIER at the same number removed")
    best_lines = []
    for k in ks if lines else ():
        top1 = {key: mean([at(r["curve"], k) for r in rs]) for key, rs in mine.items()
                if all_methods[key].swap is None and not all_methods[key].control
                and all(outcomes(r, k) is not None for r in rs)}
        if len(top1) < 2:
            continue
        best = max(top1, key=top1.get)
        others = [key for key in top1 if key != best]
        ahead = [key for key in others if verdict(paired(mine[best], mine[key], k)) == "**ahead**"]
        tied = [key for key in others if key not in ahead]
        best_lines += wrapped(
            f"- **Best at {k} removed** (named only where every seed's interval supports it): highest mean top-1 "
            f"{all_methods[best].label} ({top1[best]:.2f}%); "
            + (f"ahead in every seed of {', '.join(all_methods[key].label for key in ahead)}; " if ahead else "")
            + ("the winner." if not tied else
               f"not distinguishable from {', '.join(all_methods[key].label for key in tied)}: no winner."), "  ")
    lines += ["", *best_lines] if best_lines else []
    if "control" in mine:
        lines += paired_table(mine, all_methods, ks, "control",
                              f"What the removals cost ({name}): method at k removed minus the same start finetuned "
                              "as many epochs with nothing removed (negative: the removals cost that much)")
    return lines


def table(rows: list[dict], all_methods: dict[str, Method], args: argparse.Namespace) -> str:
    k = args.max_removed
    lines = ["# The study: EASIER vs Layer Folding, EGP, TLC and other orders, side by side (CIFAR-10)", ""]
    lines += wrapped(
        f"Machine: {cpu_name()}, 1 thread per cell ({os.cpu_count()} cores: two cells side by side), no GPU; "
        f"torch {torch.__version__}. Script: `benchmarks/compare.py`; figure: `compare.png`.")
    lines.append("")
    lines += wrapped(
        f"Settings: every model starts from one cached baseline (the shared ResNets: the checkpoint finetuned "
        f"{MODELS['resnet20'][2]} epoch on the ../shared JPEGs, seed 12345); every method then runs the loop "
        f"with `--finetune-epochs {args.finetune_epochs} --lr {args.lr} --entropy-batches {args.entropy_batches} "
        f"--max-removed {k} --patience 0 --max-drop 100` (every round kept, so each method draws its curve to {k} "
        f"removed), batch {args.batch_size}, val = the full ../shared `val/` (5,000 images) after every round. "
        f"'Within budget' applies EASIER's rule to the curve: the removals before the first round more than "
        f"{BUDGET} point below the start. One-shot methods get the iterative runs' total finetuning ({k} × "
        f"{args.finetune_epochs} epoch) in one go (`--entropy-reg`: half with the penalty, half after the "
        f"removal). The rectifier ablation swaps every rectifier (ReLU in the "
        f"ResNets, ReLU6 in MobileNetV2) for another, finetunes {args.recover_epochs} epoch to recover, and "
        "measures its budget from that model. Values: mean over seeds (min–max). Speed-up: the within-budget model "
        "folded the three ways `compress` tries (`--fold auto`, every merge, BatchNorm only), exported and raced "
        "against the original model (batch 1, 1 thread; the best low end of a 95 % interval), afterwards and "
        "alone on the machine (`--speed`). Wall: the rounds' time.")
    for name in MODELS:
        mine = {key: [r for r in rows if r["model"] == name and r["method"] == key] for key in all_methods}
        mine = {key: rs for key, rs in mine.items() if rs}
        if not mine:
            continue
        sites = next(iter(mine.values()))[0]["sites"]
        lines += ["", f"### {name} ({sites} rectifier call sites)", "",
                  f"| method | seeds | removed within budget | top-1 at 4 removed | top-1 at {k} removed | "
                  "mean over the curve |", "|---|---|---|---|---|---|"]
        lines += method_rows(mine, all_methods, lambda rs: [
            str(len(rs)), spread([r["within_budget"] for r in rs], "{:.1f}"), spread([at(r["curve"], 4) for r in rs]),
            spread([at(r["curve"], k) for r in rs]), spread([mean([a for _, a in r["curve"]]) for r in rs])])
        lines += ["", "| method | start top-1 | finetune epochs | wall (min) | speed-up b1 |", "|---|---|---|---|---|"]
        lines += method_rows(mine, all_methods, lambda rs: [
            f"{mean([r['base_top1'] for r in rs]):.2f}", f"{rs[0]['finetune_epochs_total']:.2f}",
            spread([r["wall_s"] / 60 for r in rs], "{:.1f}"),
            f"×{spread([r.get('speedup_b1', math.nan) for r in rs])}"])
        lines += ["", "Removed, in order (first seed):", ""]
        for key, rs in mine.items():
            if not all_methods[key].control:
                lines += wrapped(f"- {all_methods[key].label}: {' '.join(rs[0]['removed'])}", "  ")
        lines += differences(mine, all_methods, name, (4, k))
        path = tlc_file(args.cells, name)
        if path.is_file():
            t = json.loads(path.read_text())
            if t["spearman"] is None:
                finding = (f"{t['sites_with_bn']} of the {t['sites']} call sites are fed directly by a BatchNorm, too "
                           "few to rank; `--criterion tlc` uses the measured entropy at the other "
                           f"{t['sites'] - t['sites_with_bn']}.")
            else:
                finding = (f"on the {t['sites_with_bn']} of {t['sites']} call sites fed directly by a BatchNorm, the "
                           "rank correlation (Spearman ρ) between Φ(β/|γ|)-predicted and measured entropy (20 "
                           f"batches, train mode) is **{t['spearman']:.2f}**.")
                if t["sites_with_bn"] < t["sites"]:
                    finding += (" The other sites (after a residual add) have no BatchNorm to read: `--criterion tlc` "
                                "uses their measured entropy.")
            lines += [""] + wrapped(f"TLC's prediction vs the measured entropy: {finding}")
    return "\n".join(lines) + "\n"


def agreement(outs: list[Path], k: int) -> str:
    """Do two seeds of one method agree at ``k`` removed? Per finetune budget (one ``--cells`` folder each), method and
    seed: top-1 at 1..k removed, the gap between the method's seeds at ``k``, the sites and the cell's wall time.
    Measured before the study, to choose its finetune budget."""
    lines = ["| epochs / round | method | seed | top-1 at 1..k removed | gap at k (seeds) | removed, in order | wall |",
             "|---|---|---|---|---|---|---|"]
    for out in outs:
        rows = read_cells(out)
        for key in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == key), key=lambda r: r["seed"])
            gap = max(at(r["curve"], k) for r in mine) - min(at(r["curve"], k) for r in mine)
            for r in mine:
                curve = " ".join(f"{at(r['curve'], i):.2f}" for i in range(1, k + 1))
                lines.append(f"| {r['finetune_epochs_total'] / r['rounds']:g} | {key} | {r['seed']} | {curve} | "
                             f"{gap:.2f} | {' '.join(r['removed'][:k])} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def shard_arg(text: str) -> tuple[int, int]:
    """``K/N`` with 0 ≤ K < N: a shard outside the range would run nothing and say nothing."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (two integers)") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"{text!r}: K must be in 0..N-1")
    return k, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet20"], choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, help="keys of methods() (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--extra-seeds", type=int, nargs="*", default=[2, 3, 4],
                        help="run after everything else, for --extra-methods only")
    parser.add_argument("--extra-methods", nargs="+", default=["random"])
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--recover-epochs", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--max-removed", type=int, default=6)
    parser.add_argument("--entropy-reg", type=float, nargs="+", default=[0.1, 0.5],
                        help="strengths of the --entropy-reg rows (one row each)")
    parser.add_argument("--entropy-tau", type=float, default=0.1)
    parser.add_argument("--report-only", action="store_true", help="no new runs: rewrite table and plot")
    parser.add_argument("--shard", type=shard_arg, default=(0, 1),
                        help="K/N: run every N-th cell from the K-th (N side by side)")
    parser.add_argument("--speed", action="store_true",
                        help="no new runs: time the finished cells that have no speed-up yet (alone on the machine)")
    parser.add_argument("--bench-seconds", type=float, default=2.0)
    parser.add_argument("--agreement", type=Path, nargs="+", default=None,
                        help="no new runs: print the seed-agreement table of these --cells folders (one per budget)")
    parser.add_argument("--cells", type=Path, default=ROOT / "benchmarks" / "compare_cells",
                        help="finished cells (small JSON, committed); --out keeps the heavy state")
    common_args(parser, "compare", "compare", entropy_batches=5, workers=1)
    args = parse(parser)
    if args.agreement:
        print(agreement(args.agreement, args.max_removed))
        return
    torch.set_num_threads(1)
    all_methods = methods(args)
    todo = [(m, k, s) for m in args.models for k in (args.methods or all_methods) for s in args.seeds]
    todo += [(m, k, s) for m in args.models for s in args.extra_seeds for k in args.extra_methods]
    shard, shards = args.shard

    def write() -> None:
        rows = read_cells(args.cells)
        if rows:
            args.table.write_text(table(rows, all_methods, args))
            plot(rows, all_methods, args.table.with_name("compare.png"))

    if args.speed:
        for name in args.models:
            measure_speed(name, read_cells(args.cells), all_methods, args)
    elif not args.report_only:
        for name in args.models:
            tlc_vs_entropy(name, args)
        for name, key, seed in todo[shard::shards]:  # the table is rewritten after each cell: a run keeps its cells
            try:
                cell(name, key, all_methods[key], seed, args)
            except Exception:  # one failed cell (reported in the log) must not cost the others their time
                traceback.print_exc()
            write()
    write()
    print(args.table.read_text())


if __name__ == "__main__":
    main()
