"""EASIER on the ../shared CIFAR-10 ResNet-20/32 checkpoints (issue: the loop, benchmark table).

Runs the full `compress` pipeline (loop → fold → ONNX → verify → bench) per depth and writes its table (the
machine named) to runs/bench_cifar/table.md; benchmarks/cifar_resnets.md is that table, read. Finetuning uses a
fraction of an epoch per round (--finetune-epochs) so both models fit in a few hours of a 2-core CPU; the table
says so.

    .venv/bin/python benchmarks/cifar_resnets.py --depths 20 32 --finetune-epochs 0.2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from easier_export.core.ort import cpu_name
from easier_export.load.data import image_folder
from easier_export.load.models import load_model
from easier_export.loop.config import LoopConfig
from easier_export.pipeline import CompressConfig, compress
from easier_export.ship.bench import noisy_pair

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def run(depth: int, args: argparse.Namespace) -> dict:
    loaded = load_model(f"cifar_resnet{depth}", weights=SHARED / "models" / f"cifar10-resnet{depth}.th")
    loaders = image_folder(SHARED / "datasets" / "cifar10-jpeg", loaded.input_size, loaded.task.mean, loaded.task.std,
                           args.batch_size, args.workers, num_classes=10)
    cfg = CompressConfig(LoopConfig(max_drop=args.max_drop, finetune_epochs=args.finetune_epochs, lr=args.lr,
                                    entropy_batches=args.entropy_batches, baseline_epochs=args.baseline_epochs),
                         fold=args.fold, device="cpu")
    t0 = time.perf_counter()
    report = compress(loaded, loaders, args.out / f"resnet{depth}", cfg)
    report["wall_s"] = time.perf_counter() - t0
    return report


def p50(report: dict, label: str, batch: int) -> float:
    return next(r["p50_ms"] for r in report["bench"]
                if r["label"] == label and r["batch"] == batch and r["device"] == "cpu")


def speedup(report: dict, batch: int) -> str:
    """Folded over original ORT CPU at ``batch``, marked when either row's repeats disagree."""
    ratio = p50(report, "original", batch) / p50(report, "folded", batch)
    noisy = noisy_pair(report["bench"], ("folded", "onnxruntime", "cpu", batch), "original")
    return f"×{ratio:.2f}" + (" (noisy)" if noisy else "")


def table(reports: dict[int, dict], args: argparse.Namespace) -> str:
    lines = [
        "# EASIER on CIFAR-10 ResNet-20/32 (../shared checkpoints and data)",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads "
        f"({os.cpu_count()} cores), no GPU; torch {torch.__version__}.",
        f"Settings: `--max-drop {args.max_drop} --finetune-epochs {args.finetune_epochs} --lr {args.lr} "
        f"--entropy-batches {args.entropy_batches} --baseline-epochs {args.baseline_epochs} --fold {args.fold}`; "
        "val = ../shared `val/` (5,000 images). The original is first finetuned on `train/` (JPEG domain shift, "
        "see ../shared/README.md) and its accuracy is the baseline; each round then finetunes on a *fraction* "
        "of an epoch of `train/` (45,000 images), to fit a 2-core CPU.",
        "",
        "| model | original top-1 | final top-1 | Δ | removed / total | rounds | wall time | "
        "ORT CPU p50 b1 orig → folded | speed-up b1 | speed-up b8 | verify max abs diff (÷ max abs ref) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for depth, r in reports.items():
        o, c = r["original"], r["compressed"]
        v = r["verify"]
        lines.append(
            f"| ResNet-{depth} | {o['top1']:.2f} | {c['top1']:.2f} | {c['top1'] - o['top1']:+.2f} | "
            f"{len(c['removed'])} / {o['activations']} | {len(r['rounds'])} | {r['wall_s'] / 60:.1f} min | "
            f"{p50(r, 'original', 1):.3f} → {p50(r, 'folded', 1):.3f} ms | {speedup(r, 1)} | {speedup(r, 8)} | "
            f"{v['max_abs']:.1e} ({v['max_rel']:.1e}) |")
    lines += ["", "Removed call sites (in order):", ""]
    lines += [f"- ResNet-{d}: {', '.join(r['compressed']['removed']) or '(none)'}" for d, r in reports.items()]
    return "\n".join(lines) + "\n"


def common_args(parser: argparse.ArgumentParser, runs: str, table: str, entropy_batches: int, workers: int) -> None:
    """Options every CIFAR benchmark script shares (data loading, the entropy pass, where runs and the table go)."""
    parser.add_argument("--entropy-batches", type=int, default=entropy_batches)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / runs)
    parser.add_argument("--trained", type=Path, default=ROOT / "runs" / "train_cifar",
                        help="where train_cifar.py wrote the MobileNetV2 / ViT checkpoints (its --out)")
    parser.add_argument("--table", type=Path, default=None,
                        help=f"default: <out>/table.md (benchmarks/{table}.md is curated: prose around such tables)")


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, and send the table under ``--out`` unless told otherwise, so a rerun never overwrites the curated
    file in benchmarks/ (it once did, prose and all)."""
    args = parser.parse_args()
    args.table = args.table or args.out / "table.md"
    args.table.parent.mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 32])
    parser.add_argument("--finetune-epochs", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--baseline-epochs", type=float, default=0.5)
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--fold", default="auto")
    common_args(parser, "bench_cifar", "cifar_resnets", entropy_batches=10, workers=1)
    args = parse(parser)
    if not SHARED.is_dir():
        raise SystemExit(f"needs {SHARED} (CIFAR-10 data and checkpoints)")
    reports = {}
    for depth in args.depths:  # the table is rewritten after each model: a long run keeps what it finished
        reports[depth] = run(depth, args)
        args.table.write_text(table(reports, args))
    print(args.table.read_text())


if __name__ == "__main__":
    main()
