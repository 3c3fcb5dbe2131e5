"""FP32 and INT8, original and compressed, side by side (issue 23, item 6).

Part 1, what ``compress --precision`` ships: a trained CIFAR model (``train_cifar.py``) compressed from the
command line as a user with a small labelled set would (1,000 train and 100 val images per class, the other 400
val images per class never seen by the run: ``promise.user_split``), once per ``--precisions`` value. Each run's
files are judged on the unseen images as the user feeds them: top-1 of the original and the compressed model, in
FP32 and INT8 (onnxruntime), with the paired change against the FP32 original and its 95 % interval.

Part 2, whether depth savings survive quantization: each run's linearized model is folded again, with the fold
planner timing merges in FP32 and in INT8, at the trained size and at a deployment size (speed only: the same
weights on larger inputs, INT8 calibrated on seeded stand-ins); original FP32, original INT8 and the two plans in
FP32 and INT8 are raced against the original FP32 (interleaved blocks, ``bench.race``) at batch 1 and 8. The
merges each planning chose are listed. Run it on an otherwise idle machine.

    .venv/bin/python benchmarks/precision.py --arch cifar_mobilenet_v2 --precisions fp32 int8 auto
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from promise import unseen_outcomes, user_split  # noqa: E402

from easier_export.core.io import save_json  # noqa: E402
from easier_export.core.quantize import Calibration, quantize_int8  # noqa: E402
from easier_export.core.stats import paired_accuracy_change  # noqa: E402
from easier_export.fold import MERGE_KINDS, fold_model  # noqa: E402
from easier_export.load.models import load_model  # noqa: E402
from easier_export.ship.bench import race  # noqa: E402
from easier_export.ship.export import export_onnx  # noqa: E402
from easier_export.trace.tracing import trace  # noqa: E402

TABLE = ROOT / "benchmarks" / "precision.md"
WEIGHTS = ROOT / "runs" / "train_cifar"


def compress(arch: str, data: Path, precision: str, out: Path, args: argparse.Namespace) -> Path:
    """One ``compress`` run (cached: a folder with ``done.json`` is not run again)."""
    if (out / "done.json").exists():
        return out
    cmd = [str(ROOT / ".venv" / "bin" / "easier-export"), "compress", arch, "--weights", str(WEIGHTS / f"{arch}.pt"),
           "--data", str(data), "--out", str(out), "--precision", precision, "--finetune-epochs", "1",
           "--max-drop", str(args.max_drop), "--holdout", str(args.holdout), "--workers", "0", "--threads",
           str(args.threads)]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; see {out.parent / f'{out.name}.log'}")
    save_json({"minutes": (time.perf_counter() - start) / 60}, out / "done.json")
    return out


def files_of(run: Path) -> dict[str, Path]:
    """The run's four files: original / compressed, FP32 / INT8 (whichever of them it wrote)."""
    shipped = json.loads((run / "report.json").read_text())["precision"]["shipped"]
    fp32 = run / "onnx" / "model.fp32.onnx" if shipped != "fp32" else run / "model.onnx"
    int8 = run / "model.onnx" if shipped == "int8" else run / "onnx" / "model.int8.onnx"
    found = {"original FP32": run / "onnx" / "original.onnx", "original INT8": run / "onnx" / "original.int8.onnx",
             "compressed FP32": fp32, "compressed INT8": int8}
    return {k: v for k, v in found.items() if v.is_file()}


def accuracy(run: Path, unseen: Path) -> dict:
    """Top-1 on the unseen images of each file and its paired change against the original FP32 (95 %)."""
    report = json.loads((run / "report.json").read_text())
    prep = report["data"]["preprocessing"]
    outcomes = {k: unseen_outcomes(p, unseen, prep["mean"], prep["std"]) for k, p in files_of(run).items()}
    base = outcomes["original FP32"]
    rows = {}
    for label, o in outcomes.items():
        change = paired_accuracy_change(base, o, 0.975)
        rows[label] = {"top1": 100 * float(o.mean()), "change": change.change, "half": change.change - change.bound}
    precision = report["precision"]
    return {"run": run.name, "removed": len(report["compressed"]["removed"]), "shipped": precision["shipped"],
            "reason": precision["reason"], "rows": rows,
            "minutes": json.loads((run / "done.json").read_text())["minutes"]}


def speed(run: Path, size: int, threads: int, work: Path) -> dict:
    """Part 2 for one run at ``size``: fold with FP32 and INT8 planning, export, quantize, race (cached in
    ``work/speed.json``)."""
    if (work / "speed.json").exists():
        return json.loads((work / "speed.json").read_text())
    loaded = load_model(str(run / "linearized.pt"))
    original = load_model(loaded.source, loaded.num_classes, WEIGHTS / f"{loaded.source}.pt").model
    example = torch.randn(1, loaded.input_size[0], size, size)
    shape = tuple(example.shape[1:])
    work.mkdir(parents=True, exist_ok=True)
    base = fold_model(trace(original.eval()), example, mode="none")[0]
    files = {"original FP32": Path(export_onnx(base, example, work / "original.onnx")["path"])}
    merges = {}
    for planning in ("fp32", "int8"):
        folded, records = fold_model(loaded.model.eval(), example, mode="auto", precision=planning,
                                     cache=work / "latency_table.json", threads=threads)
        merges[planning] = sorted(r.detail for r in records if r.applied and r.kind in MERGE_KINDS)
        files[f"{planning}-planned FP32"] = Path(export_onnx(folded, example, work / f"{planning}.onnx")["path"])
    calibration = Calibration.stand_ins((8, *shape))
    for label in list(files):
        quantized = work / f"{files[label].stem}.int8.onnx"
        quantize_int8(files[label], quantized, calibration)
        files[label.replace("FP32", "INT8")] = quantized
    ratios = {}
    for batch in (1, 8):
        raced = race(files, "original FP32", shape, "cpu", batch, threads, max_seconds=20.0)
        ratios[batch] = {k: v.to_dict() for k, v in raced.items()}
    found = {"run": run.name, "size": size, "merges": merges, "speedups": ratios}
    save_json(found, work / "speed.json")
    return found


def short(run: str, arch: str) -> str:
    return run.removeprefix(f"{arch}-").removesuffix("-run1")


def interval(v: dict) -> str:
    return f"{v['ratio']:.2f} ({v['low']:.2f}–{v['high']:.2f})"


def markdown(arch: str, acc: list[dict], speeds: list[dict], args: argparse.Namespace) -> str:
    """The tables (lines of at most 120 characters): top-1 on the unseen images, speed-ups, merges."""
    lines = [f"Runs: {args.train_per_class}/{args.val_per_class} train/val images per class, --max-drop "
             f"{args.max_drop}, --holdout {args.holdout}, one finetune epoch per round; {args.threads} threads.", "",
             "Top-1 on the unseen images (paired change against the original FP32, 95 %):", "",
             "| run | removed | shipped | original FP32 | original INT8 | compressed FP32 | compressed INT8 | min |",
             "|---|---|---|---|---|---|---|---|"]
    for a in acc:
        cells = []
        for label in ("original FP32", "original INT8", "compressed FP32", "compressed INT8"):
            r = a["rows"].get(label)
            cells.append("–" if r is None else f"{r['top1']:.2f}" if label == "original FP32"
                         else f"{r['top1']:.2f} ({r['change']:+.2f} ± {r['half']:.2f})")
        lines.append(f"| {short(a['run'], arch)} | {a['removed']} | {a['shipped']} | {' | '.join(cells)} | "
                     f"{a['minutes']:.1f} |")
    lines += [""] + [f"- {short(a['run'], arch)}: {a['reason']}" for a in acc]
    lines += ["", "Speed-up over the original FP32, ORT CPU (median of block ratios, 95 % interval); the last column",
              "is INT8-planned INT8 over the original INT8:", "",
              "| run | size | b | original INT8 | FP32 plan, FP32 | FP32 plan, INT8 | INT8 plan, FP32 | "
              "INT8 plan, INT8 | ÷ |", "|---|---|---|---|---|---|---|---|---|"]
    for s in speeds:
        for batch, r in s["speedups"].items():
            marginal = r["int8-planned INT8"]["ratio"] / r["original INT8"]["ratio"]
            lines.append(f"| {short(s['run'], arch)} | {s['size']} | {batch} | " + " | ".join(
                interval(r[k]) for k in ("original INT8", "fp32-planned FP32", "fp32-planned INT8",
                                         "int8-planned FP32", "int8-planned INT8")) + f" | {marginal:.2f} |")
    lines += ["", "Merges chosen by each planning:", ""]
    for s in speeds:
        for planning, merges in s["merges"].items():
            same = planning == "int8" and merges == s["merges"]["fp32"]
            head = f"- {short(s['run'], arch)}, {s['size']}x{s['size']}, {planning} planning: {len(merges)} merges"
            text = head + (" (same as FP32 planning)" if same else f": {'; '.join(merges) or 'none'}")
            lines += textwrap.wrap(text, 120, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar_mobilenet_v2")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "auto"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--holdout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "precision")
    ap.add_argument("--speed-run", type=Path, nargs="*", default=[],
                    help="also time these compress outputs' linearized models (part 2 only)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    data, unseen = user_split(args.out, args.train_per_class, args.val_per_class)
    runs = [compress(args.arch, data, p, args.out / f"{args.arch}-{p}", args) for p in args.precisions]
    acc = [accuracy(r, unseen) for r in runs]
    speeds = [speed(run, size, args.threads, args.out / f"{run.name}-speed{size}")
              for run in [runs[0], *args.speed_run] for size in args.sizes]
    save_json({"accuracy": acc, "speed": speeds}, args.out / f"{args.arch}.json")
    text = f"## {args.arch}\n\n" + markdown(args.arch, acc, speeds, args)
    (args.out / f"{args.arch}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
