"""What folding buys for fixed removal patterns (issue: folding) and the study's removal counts (issue: export).

Random weights with trained-like (non-zero) norm affines and running statistics (latency only). For each
architecture and pattern: the linearized model unfolded (`--fold none`,
BatchNorm folded only), `--fold all` and `--fold auto`; ONNX export of each, max abs diff of the folded ONNX
against the unfolded PyTorch model, conv/linear op counts and parameters, onnxruntime CPU p50 at batch 1 and 8,
measured interleaved in one run. Writes runs/fold_patterns/table.md (`--table`; the committed
benchmarks/fold_patterns.md adds the reading).

    .venv/bin/python benchmarks/fold_patterns.py [--quick] [--match 'mobilenet_v2 32']
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from easier_export.core.ort import cpu_name
from easier_export.fold import fold_model
from easier_export.load.models import build_arch
from easier_export.loop.entropy import measure
from easier_export.ship.bench import bench, speedups
from easier_export.ship.export import export_onnx, verify_onnx
from easier_export.trace.edits import remove_sites
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

ROOT = Path(__file__).resolve().parents[1]


def mnv2_blocks(first: int, last: int):
    """Both activations of inverted-residual blocks first..last (torchvision numbering: features.2-17)."""
    return lambda sites: [s for b in range(first, last + 1) for s in sites[2 + 2 * (b - 2): 4 + 2 * (b - 2)]]


def first_in_block(sites):
    return sites[1::2]  # stem, then (first, second) per basic block


def vgg_every_other_and_classifier(sites):
    return sites[1:13:2] + sites[13:]


def lowest_entropy(k: int):
    """The study's removal count, picked by entropy on random inputs (random weights: latency only)."""
    def choose(sites, gm, size):
        x = [(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(i)), None) for i in range(2)]
        stats = measure(gm, sites, x, torch.device("cpu"), train_mode=False)
        return sorted(sites, key=lambda s: stats[s.name].entropy)[:k]
    return choose


CASES = [  # (arch, input size, pattern name, chooser)
    ("torchvision:mobilenet_v2", 224, "blocks 2-8", mnv2_blocks(2, 8)),
    ("torchvision:mobilenet_v2", 224, "blocks 10-16", mnv2_blocks(10, 16)),
    ("torchvision:mobilenet_v2", 224, "all blocks 2-17", mnv2_blocks(2, 17)),
    ("timm:mobilenetv2_100", 224, "blocks 2-8", mnv2_blocks(2, 8)),
    ("timm:mobilenetv2_100", 224, "all blocks 2-17", mnv2_blocks(2, 17)),
    ("torchvision:mobilenet_v2", 32, "blocks 2-8", mnv2_blocks(2, 8)),
    ("torchvision:mobilenet_v2", 32, "all blocks 2-17", mnv2_blocks(2, 17)),
    ("torchvision:mobilenet_v2", 224, "study: 15 lowest entropy", lowest_entropy(15)),
    ("torchvision:swin_t", 224, "blocks 1-8", lambda s: s[:8]),
    ("torchvision:swin_t", 224, "all 12", lambda s: s),
    ("timm:swin_tiny_patch4_window7_224", 224, "all 12", lambda s: s),
    ("torchvision:swin_t", 224, "study: 8 lowest entropy", lowest_entropy(8)),
    ("torchvision:resnet18", 224, "first act of every block", first_in_block),
    ("timm:resnet18", 224, "first act of every block", first_in_block),
    ("torchvision:resnet18", 224, "study: 8 lowest entropy", lowest_entropy(8)),
    ("torchvision:vgg16_bn", 224, "every other conv act + classifier", vgg_every_other_and_classifier),
    ("torchvision:vgg16_bn", 224, "study: 10 lowest entropy", lowest_entropy(10)),
    ("cifar_resnet20", 32, "first act of every block", first_in_block),
    ("cifar_resnet32", 32, "first act of every block", first_in_block),
]
QUICK = {("torchvision:mobilenet_v2", 32, "blocks 2-8"), ("cifar_resnet20", 32, "first act of every block")}


def op_counts(path: Path) -> tuple[int, int]:
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return ops.count("Conv"), sum(ops.count(k) for k in ("Gemm", "MatMul"))


def nonzero_norms(model: nn.Module) -> nn.Module:
    """Random weights leave every BatchNorm/LayerNorm at weight 1, bias 0 (and running stats 0 / 1), so folded
    convs carry no bias and a merge across zero padding never needs a bias map; trained models do. Give the
    norms trained-like values (seeded) so the timings include what trained biases cost."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def run_case(arch: str, size: int, chooser, tmp: Path, threads: int, seconds: float) -> dict:
    torch.manual_seed(0)
    gm = trace(nonzero_norms(build_arch(arch, num_classes=10)).eval())
    sites = find_call_sites(gm)
    chosen = chooser(sites, gm, size) if chooser.__code__.co_argcount == 3 else chooser(sites)
    lin = remove_sites(gm, [s.name for s in chosen]).eval()
    example = torch.randn(1, 3, size, size)
    paths, stats, plans = {}, {}, {}
    for mode in ("none", "all", "auto"):
        t0 = time.perf_counter()
        folded, records = fold_model(lin, example, mode=mode, threads=threads, cache=tmp / "latency.json")
        plans[mode] = (sum(r.applied for r in records if r.kind not in ("identity", "batchnorm",
                                                                         "layernorm_affine")),
                       time.perf_counter() - t0)
        paths[mode] = tmp / f"{mode}.onnx"
        export_onnx(folded, example, paths[mode], simplify=True)
        stats[mode] = (sum(p.numel() for p in folded.parameters()), *op_counts(paths[mode]))
    inputs = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    check = {m: verify_onnx(paths[m], lin, inputs) for m in ("all", "auto")}
    rows = bench({f"fold {m}": p for m, p in paths.items()}, (3, size, size), ("cpu",), (1, 8), threads,
                 max_seconds=seconds)
    ratio = speedups(rows, "fold none")
    p50 = {(r["label"], r["batch"]): r["p50_ms"] for r in rows}
    return {"removed": len(chosen), "sites": len(sites), "stats": stats, "plans": plans, "p50": p50,
            "ratio": {b: ratio[("onnxruntime", "cpu", b)] for b in (1, 8)},
            "max_abs": {m: f"{c.max_abs:.1e} ({c.max_rel:.1e})" for m, c in check.items()},
            "noisy": any(r["noisy"] for r in rows), "passed": all(c.passed for c in check.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two small cases (a smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per model and batch")
    parser.add_argument("--match", default="", help="only cases whose 'arch size pattern' contains this")
    parser.add_argument("--table", type=Path, default=ROOT / "runs" / "fold_patterns" / "table.md",
                        help="benchmarks/fold_patterns.md is this table with its reading around it")
    args = parser.parse_args()
    args.table.parent.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    lines = [
        "# Folding: latency by removal pattern (onnxruntime CPU, random weights, non-zero norm biases)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU; onnxruntime "
        f"intra-op threads {args.threads}; torch {torch.__version__}. p50 of interleaved runs "
        f"({args.seconds:.0f} s budget per model and batch), run with the machine otherwise idle; random weights, norm "
        "layers given non-zero affines and running statistics (so folded biases are non-zero, as in a trained "
        "model). `none` = activations removed, BatchNorm folded, no "
        "merges; `all` = every exact merge; `auto` = merges the planner measured faster. Speed-ups are vs `none`.",
        "",
        "| model | input | pattern | removed | Conv / MatMul+Gemm none → all → auto | params none → all (M) | "
        "merges all / auto | p50 b1 none / all / auto (ms) | ×all b1 | ×auto b1 | ×all b8 | ×auto b8 | "
        "max abs diff (÷ max abs ref) all / auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, size, name, chooser in CASES:
        if (args.quick and (arch, size, name) not in QUICK) or args.match not in f"{arch} {size} {name}":
            continue
        with tempfile.TemporaryDirectory() as tmp:
            r = run_case(arch, size, chooser, Path(tmp), args.threads, args.seconds)
        s, p = r["stats"], r["p50"]
        lines.append(
            f"| {arch} | {size} | {name} | {r['removed']}/{r['sites']} | "
            f"{s['none'][1]}/{s['none'][2]} → {s['all'][1]}/{s['all'][2]} → {s['auto'][1]}/{s['auto'][2]} | "
            f"{s['none'][0] / 1e6:.2f} → {s['all'][0] / 1e6:.2f} | {r['plans']['all'][0]} / {r['plans']['auto'][0]} | "
            f"{p['fold none', 1]:.2f} / {p['fold all', 1]:.2f} / {p['fold auto', 1]:.2f} | "
            f"{r['ratio'][1]['fold all']:.2f} | {r['ratio'][1]['fold auto']:.2f} | "
            f"{r['ratio'][8]['fold all']:.2f} | {r['ratio'][8]['fold auto']:.2f} | "
            f"{r['max_abs']['all']} / {r['max_abs']['auto']}{'' if r['passed'] else ' ✗'}"
            f"{' (timings noisy: repeats disagree by > 10 %)' if r['noisy'] else ''} |")
        print(lines[-1], flush=True)
        args.table.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
