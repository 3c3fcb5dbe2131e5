"""Which ONNX opset to ship: the same original and compressed models exported at opsets 18, 20 and 23, verified
against PyTorch and timed side by side (ORT CPU, one interleaved `bench` call, 5 repeats).

Opset 20 writes GELU as one `Gelu` op (at 18 the exporter spells it Div/Erf/Add/Mul/Mul, which onnxruntime does
not fuse back), opset 23 attention as one `Attention` op. That makes the *original* faster too, so the speed-up a
removal buys is measured against the original exported the same way: a newer opset is a faster file, not a
larger compression ratio.

    .venv/bin/python benchmarks/export_opset.py   # table to runs/export_opset/table.md

Needs the checkpoints and runs named in MODELS (benchmarks/train_cifar.py, latency_aware.py); the compressed
model is the run's linearized.pt folded by the planner (`--fold auto`) from the run's cached timings: the same
model at every opset.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_aware import ROOT  # noqa: E402

from easier_export.core.ort import cpu_name
from easier_export.fold import fold_model
from easier_export.load.models import load_model
from easier_export.ship.bench import bench
from easier_export.ship.export import eval_copy, export_onnx, verify_onnx
from easier_export.trace.tracing import trace

OPSETS = (18, 20, 23)
# name: (architecture, trained weights, the latency-aware run whose linearized.pt and fold plan shipped)
MODELS = {
    "vit": ("cifar_vit", "runs/train_cifar_long/cifar_vit.pt", "runs/la_vit18_affine/vit-latency"),
    "mobilenet_v2": ("cifar_mobilenet_v2", "runs/train_cifar/cifar_mobilenet_v2.pt",
                     "runs/la_e1/mobilenet_v2-latency"),
}


def measure(name: str, work: Path, seconds: float) -> list[str]:
    """Rows for one model: per opset, what the file holds, both latencies, the speed-up and the verification."""
    arch, weights, run = MODELS[name]
    original = load_model(arch, weights=ROOT / weights).model.eval()
    linearized = trace(load_model(str(ROOT / run / "linearized.pt")).model.eval())
    example = torch.randn(1, 3, 32, 32)
    folded, _ = fold_model(eval_copy(linearized), example, mode="auto", cache=ROOT / run / "latency_table.json")
    inputs = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    files, held, worst = {}, {}, {}
    for opset in OPSETS:
        for label, model, reference in (("original", original, original), ("compressed", folded, linearized)):
            path = work / f"{name}-{label}-{opset}.onnx"
            info = export_onnx(model, example, path, opset=opset)
            check = verify_onnx(path, reference, inputs)
            assert check.passed, f"{path}: {check.reason}"
            files[f"{label}-{opset}"] = path
            held[(label, opset)] = info
            worst[opset] = max(worst.get(opset, 0.0), check.max_abs)
    rows = bench(files, (3, 32, 32), ("cpu",), (1, 8), max_seconds=seconds, repeats=5)
    p50 = {(r["label"], r["batch"]): r["p50_ms"] for r in rows}
    spread = {(r["label"], r["batch"]): r["spread"] for r in rows}
    lines = []
    for opset in OPSETS:
        ops = held[("original", opset)]["op_counts"]
        cells = [name, str(opset), f"{held[('original', opset)]['nodes']} → {held[('compressed', opset)]['nodes']}",
                 f"{ops.get('Gelu', 0)} / {ops.get('Attention', 0)}"]
        for batch in (1, 8):
            o, c = p50[(f"original-{opset}", batch)], p50[(f"compressed-{opset}", batch)]
            noise = max(spread[(f"original-{opset}", batch)], spread[(f"compressed-{opset}", batch)])
            cells += [f"{o:.3f} → {c:.3f}", f"×{o / c:.2f}", f"±{noise:.0%}"]
        base = p50[("original-18", 1)]
        cells += [f"×{base / p50[(f'original-{opset}', 1)]:.2f}", f"×{base / p50[(f'compressed-{opset}', 1)]:.2f}",
                  f"{worst[opset]:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "export_opset" / "table.md",
                        help="the table (benchmarks/export_opset.md is that table with its reading)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "export_opset")
    parser.add_argument("--seconds", type=float, default=3.0, help="bench time per file and batch")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [row for name in args.models for row in measure(name, args.work, args.seconds)]
    table = "\n".join([
        "# ONNX opset of the shipped file: 18 vs 20 vs 23",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads ({os.cpu_count()} cores), no GPU; torch "
        f"{torch.__version__}; ORT CPU, p50 ms, all files of a model timed in one interleaved call (5 repeats), "
        "machine otherwise idle. Original = the trained checkpoint, compressed = the latency-aware run's "
        "removals folded by the planner from that run's cached timings (the same model at every opset). "
        "Generated by `benchmarks/export_opset.py`.",
        "",
        "| model | opset | nodes original → compressed | Gelu / Attention ops (original) | b1 ms original → "
        "compressed | speed-up b1 | spread b1 | b8 ms | speed-up b8 | spread b8 | original vs opset 18 b1 | "
        "compressed vs original at 18, b1 | verify max abs |",
        "|" + "---|" * 13,
        *rows,
        "",
    ])
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
