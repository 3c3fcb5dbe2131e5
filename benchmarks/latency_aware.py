"""EASIER order vs latency-aware selection, side by side, on trained CIFAR-10 models (issue: speed you can ship).

For each model, `compress` runs twice with the same budget (`--max-drop`, finetune epochs per round, patience):
`--select entropy` (one lowest-entropy activation per round, as EASIER) and `--select latency` (the fold group
with the least entropy per microsecond saved). The table reports activations removed, val top-1, the ORT CPU
p50 speed-up of the shipped `model.onnx` over the original at batch 1 and 8, the planner's predicted saving,
and wall time.

Two phases, so that speed is measured on an idle machine even when the rounds ran beside other work: the runs
(skipped when their report exists), then one interleaved `bench` of every run's `onnx/original.onnx` against its
`model.onnx`, after which the table is written.

`--control` adds the accuracy the *unchanged* original reaches with the same finetuning (as many 1-round
finetunes as the longest run of that model had rounds, same seeds): an under-trained checkpoint gains top-1 from
any extra epochs, and this row separates that gain from what removing activations cost. `--ceiling` times the
most any selection could ship: every activation removed (no finetuning, accuracy not measured), folded with
`--fold auto`, exported, verified against the linearized model.

    .venv/bin/python benchmarks/latency_aware.py --models mobilenet_v2 vit --finetune-epochs 0.3
    .venv/bin/python benchmarks/latency_aware.py --bench-only       # re-time every finished run, rewrite the table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_resnets import common_args, p50, parse  # noqa: E402  (one place for reading the benchmark rows)

from easier_export.core.io import save_json
from easier_export.core.ort import cpu_name
from easier_export.fold import fold_model
from easier_export.load.data import image_folder
from easier_export.load.models import load_model
from easier_export.loop.affine import SUBSTITUTES
from easier_export.loop.config import LoopConfig
from easier_export.loop.train import Teacher, evaluate_metrics, finetune, seed_everything
from easier_export.pipeline import CompressConfig, compress, export_and_verify
from easier_export.ship.bench import bench
from easier_export.trace.edits import remove_sites
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# name: (builtin arch, weights or None for `<--trained>/<arch>.pt`, baseline finetune epochs: the shared ResNets
# were trained on other pixels)
MODELS = {
    "resnet20": ("cifar_resnet20", SHARED / "models" / "cifar10-resnet20.th", 0.5),
    "resnet32": ("cifar_resnet32", SHARED / "models" / "cifar10-resnet32.th", 0.5),
    "mobilenet_v2": ("cifar_mobilenet_v2", None, 0.0),
    "vit": ("cifar_vit", None, 0.0),
}


def weights_of(name: str, args: argparse.Namespace) -> Path:
    """The checkpoint a model row uses: the shared file, or the one train_cifar.py wrote under ``--trained``."""
    arch, weights, _ = MODELS[name]
    return weights or args.trained / f"{arch}.pt"


def _load(name: str, args: argparse.Namespace):
    loaded = load_model(MODELS[name][0], weights=weights_of(name, args))
    return loaded, image_folder(SHARED / "datasets" / "cifar10-jpeg", loaded.input_size, loaded.task.mean,
                                loaded.task.std, args.batch_size, args.workers, num_classes=10)


def run(name: str, select: str, args: argparse.Namespace) -> dict:
    """The compress report of this (model, selection), running it unless it has finished before."""
    done = args.out / f"{name}-{select}" / "report.json"
    if done.is_file():
        return json.loads(done.read_text())
    loaded, loaders = _load(name, args)
    loop = LoopConfig(max_drop=args.max_drop, finetune_epochs=args.finetune_epochs, lr=args.lr,
                      entropy_batches=args.entropy_batches, baseline_epochs=MODELS[name][2], select=select,
                      patience=args.patience, max_removed=args.max_removed, max_rounds=args.max_rounds,
                      optimizer=args.optimizer, anneal=args.anneal, distill=args.distill,
                      substitute=args.substitute)
    cfg = CompressConfig(loop, fold="auto", device="cpu", bench_seconds=args.bench_seconds)
    t0 = time.perf_counter()
    report = compress(loaded, loaders, args.out / f"{name}-{select}", cfg)
    report["wall_s"] = time.perf_counter() - t0
    save_json(report, done)  # with the wall time, which compress's own report.json lacks
    return report


CONTROL_DEFAULTS = {"distill": 0.0}  # a control cached before the setting existed was run with this


def control(name: str, rounds: int, args: argparse.Namespace) -> dict:
    """Top-1 of the unchanged original after ``rounds`` finetunes of ``--finetune-epochs`` each, seeded like the
    loop's rounds (cached in ``<out>/<name>-control.json``; recomputed if the round count or a finetuning setting
    changed, so an SGD control is never read against an AdamW run)."""
    path = args.out / f"{name}-control.json"
    settings = {"rounds": rounds, "finetune_epochs": args.finetune_epochs, "lr": args.lr, "optimizer": args.optimizer,
                "distill": args.distill}
    cached = json.loads(path.read_text()) if path.is_file() else None
    if cached is not None and all(cached.get(k, CONTROL_DEFAULTS.get(k)) == v for k, v in settings.items()):
        return cached
    loaded, loaders = _load(name, args)
    model, top1 = loaded.model, []
    if MODELS[name][2] > 0:  # the loop's baseline finetune (seed 0), as in run()
        seed_everything(0, loaders.train)
        finetune(model, loaders.train, torch.device("cpu"), MODELS[name][2], args.lr, optimizer=args.optimizer)
    teacher = Teacher.frozen(model, args.distill) if args.distill > 0 else None
    for rnd in range(1, rounds + 1):
        seed_everything(rnd, loaders.train)  # the loop's round seed at --seed 0
        finetune(model, loaders.train, torch.device("cpu"), args.finetune_epochs, args.lr, optimizer=args.optimizer,
                 teacher=teacher)
        top1.append(evaluate_metrics(model, loaders.val, torch.device("cpu"))["top1"])
        print(f"{name} control: round {rnd}/{rounds} top-1 {top1[-1]:.2f}%", flush=True)
    result = {**settings, "top1": top1}
    save_json(result, path)
    return result


def control_row(name: str, args: argparse.Namespace) -> str | None:
    """The control table's row of one model (None without a finished run to compare with)."""
    reports = {select: json.loads(p.read_text()) for select in ("entropy", "latency")
               if (p := args.out / f"{name}-{select}" / "report.json").is_file()}
    if not reports:
        return None
    c = control(name, max(len(r["rounds"]) for r in reports.values()), args)
    costs = [f"{r['compressed']['top1'] - c['top1'][len(r['rounds']) - 1]:+.2f}"
             if (r := reports.get(select)) and r["rounds"] else "—" for select in ("entropy", "latency")]
    return (f"| {name} | {next(iter(reports.values()))['original']['top1']:.2f} | {c['rounds']} × "
            f"{c['finetune_epochs']} | {c['top1'][-1]:.2f} | " + " ".join(f"{t:.2f}" for t in c["top1"])
            + f" | {costs[0]} | {costs[1]} |")


def ceiling(name: str, args: argparse.Namespace) -> tuple[int, list[dict]]:
    """Every in-graph activation of the original removed, folded (auto), exported and verified (``<out>/<name>-
    ceiling``, reused when there), then timed against the original: (folds applied, bench rows)."""
    run_dir = args.out / f"{name}-ceiling"
    files = onnx_pair(run_dir)
    loaded = load_model(MODELS[name][0], weights=weights_of(name, args))
    example = torch.randn(1, *loaded.input_size)
    if not all(f.is_file() for f in files.values()) or not (run_dir / "folds.json").is_file():
        gm = trace(loaded.model.eval())
        linear = remove_sites(gm, [s.name for s in find_call_sites(gm) if s.in_graph], True)
        folded, folds = fold_model(linear, example, mode="auto", target="cpu", cache=run_dir / "latency_table.json")
        cfg = CompressConfig()
        export_and_verify(gm, gm, example, files["original"], [example], {}, cfg)
        if not export_and_verify(folded, linear, example, files["folded"], [example], {}, cfg)["verify"]["passed"]:
            raise SystemExit(f"{name} ceiling: model.onnx failed verification")
        save_json({"applied": sum(f.applied for f in folds)}, run_dir / "folds.json")
    applied = json.loads((run_dir / "folds.json").read_text())["applied"]
    return applied, bench(files, tuple(example.shape[1:]), ("cpu",), (1, 8), max_seconds=args.bench_seconds,
                          repeats=5)


def onnx_pair(run_dir: Path) -> dict[str, Path]:
    """A run folder's original and shipped ONNX files, labelled as the bench rows name them."""
    return {"original": run_dir / "onnx" / "original.onnx", "folded": run_dir / "model.onnx"}


def p50s(timed: list[dict]) -> tuple[float, float, float, float]:
    """p50 ms of (original b1, folded b1, original b8, folded b8)."""
    return tuple(p50({"bench": timed}, lab, b) for b in (1, 8) for lab in ("original", "folded"))


def rebench(run_dir: Path, seconds: float) -> list[dict]:
    """Original vs shipped ONNX, interleaved, batch 1 and 8, on this (idle) machine."""
    files = onnx_pair(run_dir)
    shape = tuple(json.loads((run_dir / "report.json").read_text())["model"]["input_size"])
    return bench(files, shape, ("cpu",), (1, 8), max_seconds=seconds, repeats=5)


def row(name: str, select: str, r: dict, timed: list[dict]) -> str:
    o, c = r["original"], r["compressed"]
    b1o, b1f, b8o, b8f = p50s(timed)
    saved = sum(x["us_saved"] or 0.0 for x in r["rounds"] if x["within_budget"])
    kept = sum(x["within_budget"] for x in r["rounds"])
    return (f"| {name} | {select} | {o['top1']:.2f} | {c['top1']:.2f} | {c['top1'] - o['top1']:+.2f} | "
            f"{len(c['removed'])} / {o['activations']} | {kept} / {len(r['rounds'])} | "
            f"{o['conv_linear_depth']} → {c['conv_linear_depth']} | {b1o:.3f} → {b1f:.3f} | ×{b1o / b1f:.2f} | "
            f"×{b8o / b8f:.2f} | {saved:.0f} | {r['settings']['finetune_epochs']} | {r['verify']['max_abs']:.1e} | "
            f"{r.get('wall_s', float('nan')) / 60:.1f} min |")


def header(args: argparse.Namespace) -> str:
    return "\n".join([
        "# Latency-aware EASIER vs EASIER order (CIFAR-10, ../shared data)",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads ({os.cpu_count()} cores), no GPU; "
        f"torch {torch.__version__}. Settings: `--max-drop {args.max_drop} --optimizer {args.optimizer} --lr {args.lr} "
        f"--anneal {args.anneal} --distill {args.distill} --substitute {args.substitute} "
        f"--entropy-batches {args.entropy_batches} --patience "
        f"{args.patience} --max-removed {args.max_removed} --max-rounds {args.max_rounds} --fold auto`, batch 128; "
        "the shared ResNets get `--baseline-epochs 0.5` first (JPEG domain shift). Speed-ups: ORT CPU p50 of "
        "`model.onnx` vs the "
        "original ONNX, re-timed together after all runs (interleaved, 5 repeats) with the machine otherwise idle; "
        "'predicted µs' is the sum of the kept groups' measured savings (batch 1); 'wall' includes any "
        "contention during the rounds.",
        "",
        "| model | select | original top-1 | final top-1 | Δ | removed / sites | rounds kept / run | "
        "conv/linear depth | ORT p50 b1 ms | speed-up b1 | speed-up b8 | predicted µs | finetune epochs / round | "
        "verify max abs | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--selects", nargs="+", default=["entropy", "latency"], choices=["entropy", "latency"])
    parser.add_argument("--finetune-epochs", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="finetuning, runs and control")
    parser.add_argument("--anneal", type=float, default=0.0, help="fade removed activations out over this fraction "
                        "of each round (the loop's --anneal; the control is unaffected)")
    parser.add_argument("--distill", type=float, default=0.0, help="the loop's --distill, for the runs and (from "
                        "the frozen original, i.e. self-distillation) the control alike")
    parser.add_argument("--substitute", default="identity", choices=list(SUBSTITUTES),
                        help="the loop's --substitute (the control is unaffected)")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--max-removed", type=int, default=None)
    parser.add_argument("--max-rounds", type=int, default=None, help="the same finetuning budget for every run")
    parser.add_argument("--control", action="store_true", help="also finetune the unchanged original as long")
    parser.add_argument("--ceiling", nargs="*", default=[], choices=list(MODELS),
                        help="also time these models with every activation removed (the most a selection can ship)")
    parser.add_argument("--bench-seconds", type=float, default=3.0)
    parser.add_argument("--bench-only", action="store_true", help="no new runs: re-time the finished ones")
    common_args(parser, "latency_aware", "latency_aware", entropy_batches=5, workers=2)
    args = parse(parser)
    if not args.bench_only:
        for name in args.models:
            for select in args.selects:
                run(name, select, args)
    rows = []
    for name in MODELS:  # every finished run, in a fixed order
        for select in ("entropy", "latency"):
            run_dir = args.out / f"{name}-{select}"
            if (run_dir / "report.json").is_file() and (run_dir / "model.onnx").is_file():
                rows.append(row(name, select, json.loads((run_dir / "report.json").read_text()),
                                rebench(run_dir, args.bench_seconds)))
    controls = [r for r in (control_row(name, args) for name in MODELS) if r] if args.control else []
    control_table = ["", "Control: the unchanged original finetuned as long as the longest run of that model "
                     "(one cosine schedule per round, the rounds' seeds); 'run − control': a run's final top-1 "
                     "minus the control's after as many rounds (what removing activations cost, net of the "
                     "training the rounds added):", "",
                     "| model | original top-1 | finetune rounds × epochs | top-1 after | top-1 per round | "
                     "entropy run − control | latency run − control |",
                     "|---|---|---|---|---|---|---|", *controls] if controls else []
    ceilings = []
    for name in args.ceiling:
        applied, timed = ceiling(name, args)
        b1o, b1f, b8o, b8f = p50s(timed)
        ceilings.append(f"| {name} | {applied} | {b1o:.3f} → {b1f:.3f} | ×{b1o / b1f:.2f} | ×{b8o / b8f:.2f} |")
    ceiling_table = ["", "Ceiling: every activation removed (no finetuning, accuracy not measured), folded "
                     "(`--fold auto`), verified, timed in the same session:", "",
                     "| model | folds applied | ORT p50 b1 ms | speed-up b1 | speed-up b8 |", "|---|---|---|---|---|",
                     *ceilings] if ceilings else []
    args.table.write_text(header(args) + "\n" + "\n".join(rows + control_table + ceiling_table) + "\n")
    print(args.table.read_text())


if __name__ == "__main__":
    main()
