"""EASIER order vs latency-aware selection, side by side, on trained CIFAR-10 models (issue: speed you can ship).

For each model, `compress` runs twice with the same budget (`--max-drop`, finetune epochs per round, patience):
`--select entropy` (one lowest-entropy activation per round, as EASIER) and `--select latency` (the fold group
with the least entropy per microsecond saved). The table reports activations removed, val top-1, the ORT CPU
p50 speed-up of the shipped `model.onnx` over the original at batch 1 and 8 (interleaved in the pipeline's
benchmark), the planner's predicted saving, and wall time. Rows are appended as runs finish.

    .venv/bin/python benchmarks/latency_aware.py --models mobilenet_v2 vit resnet20 --finetune-epochs 0.3
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
from cifar_resnets import p50  # noqa: E402  (one place for reading the benchmark rows)

from easier_export.bench import cpu_name  # noqa: E402
from easier_export.data import image_folder  # noqa: E402
from easier_export.linearize import LoopConfig  # noqa: E402
from easier_export.models import load_model  # noqa: E402
from easier_export.pipeline import CompressConfig, compress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TRAINED = ROOT / "runs" / "train_cifar"
# name: (builtin arch, weights, baseline finetune epochs: the shared ResNets were trained on other pixels)
MODELS = {
    "resnet20": ("cifar_resnet20", SHARED / "models" / "cifar10-resnet20.th", 0.5),
    "resnet32": ("cifar_resnet32", SHARED / "models" / "cifar10-resnet32.th", 0.5),
    "mobilenet_v2": ("cifar_mobilenet_v2", TRAINED / "cifar_mobilenet_v2.pt", 0.0),
    "vit": ("cifar_vit", TRAINED / "cifar_vit.pt", 0.0),
}


def run(name: str, select: str, args: argparse.Namespace) -> dict:
    arch, weights, baseline = MODELS[name]
    loaded = load_model(arch, weights=weights)
    loaders = image_folder(SHARED / "datasets" / "cifar10-jpeg", loaded.input_size, loaded.mean, loaded.std,
                           args.batch_size, args.workers, num_classes=10)
    loop = LoopConfig(max_drop=args.max_drop, finetune_epochs=args.finetune_epochs, lr=args.lr,
                      entropy_batches=args.entropy_batches, baseline_epochs=baseline, select=select,
                      patience=args.patience, max_removed=args.max_removed)
    cfg = CompressConfig(loop, fold="auto", device="cpu", bench_seconds=args.bench_seconds)
    t0 = time.perf_counter()
    report = compress(loaded, loaders, args.out / f"{name}-{select}", cfg)
    report["wall_s"] = time.perf_counter() - t0
    return report


def row(name: str, select: str, r: dict) -> str:
    o, c = r["original"], r["compressed"]
    b1o, b1f, b8o, b8f = (p50(r, lab, b) for b in (1, 8) for lab in ("original", "folded"))
    saved = sum(x["us_saved"] or 0.0 for x in r["rounds"] if x["within_budget"])
    kept = sum(x["within_budget"] for x in r["rounds"])
    return (f"| {name} | {select} | {o['top1']:.2f} | {c['top1']:.2f} | {c['top1'] - o['top1']:+.2f} | "
            f"{len(c['removed'])} / {o['activations']} | {kept} / {len(r['rounds'])} | "
            f"{o['conv_linear_depth']} → {c['conv_linear_depth']} | {b1o:.3f} → {b1f:.3f} | ×{b1o / b1f:.2f} | "
            f"×{b8o / b8f:.2f} | {saved:.0f} | {r['verify']['max_abs']:.1e} | {r['wall_s'] / 60:.1f} min |")


def header(args: argparse.Namespace) -> str:
    return "\n".join([
        "# Latency-aware EASIER vs EASIER order (CIFAR-10, ../shared data)",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads ({os.cpu_count()} cores), no GPU; "
        f"torch {torch.__version__}. Settings: `--max-drop {args.max_drop} --finetune-epochs "
        f"{args.finetune_epochs} --lr {args.lr} --entropy-batches {args.entropy_batches} --patience "
        f"{args.patience} --max-removed {args.max_removed} --fold auto`, batch 128; the shared ResNets get "
        "`--baseline-epochs 0.5` first (JPEG domain shift). Speed-ups: ORT CPU p50 of `model.onnx` vs the "
        "original ONNX, interleaved in the same run; 'predicted µs' is the sum of the kept groups' measured "
        "savings (batch 1).",
        "",
        "| model | select | original top-1 | final top-1 | Δ | removed / sites | rounds kept / run | "
        "conv/linear depth | ORT p50 b1 ms | speed-up b1 | speed-up b8 | predicted µs | verify max abs | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--selects", nargs="+", default=["entropy", "latency"], choices=["entropy", "latency"])
    parser.add_argument("--finetune-epochs", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--entropy-batches", type=int, default=5)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--max-removed", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bench-seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "latency_aware")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "latency_aware.md")
    args = parser.parse_args()
    rows_file = args.out / "rows.jsonl"  # finished rows survive a killed run; the table is rebuilt from them
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        for select in args.selects:
            report = run(name, select, args)
            with rows_file.open("a") as f:
                f.write(json.dumps({"model": name, "select": select, "row": row(name, select, report)}) + "\n")
            rows = [json.loads(line)["row"] for line in rows_file.read_text().splitlines()]
            args.table.write_text(header(args) + "\n" + "\n".join(rows) + "\n")
    print(args.table.read_text())


if __name__ == "__main__":
    main()
