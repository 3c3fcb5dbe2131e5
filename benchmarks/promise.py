"""The promise checked as a user with a small labelled set meets it (issue 20, item 5).

A trained CIFAR model (``train_cifar.py``) is compressed from the command line on 1,000 train and 100 val images
per class of ../shared CIFAR-10; the other 400 val images per class are never seen by the run and judge the
budget, fed as the user's pipeline feeds them (the images as they are, the declared mean/std) to the shipped
``model.onnx`` and the original's export under onnxruntime. Each setting runs twice with the same command, so the
table shows whether both runs remove the same set. The shipped file is re-timed against the original after all
runs (interleaved blocks, ``bench.race``) at 1 and 2 threads, so run it on an otherwise idle machine.

    .venv/bin/python benchmarks/promise.py --confidence 0.9 0 --runs 2
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from easier_export.core.ort import cpu_name, session_options  # noqa: E402
from easier_export.core.stats import paired_accuracy_change  # noqa: E402
from easier_export.ship.bench import race  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"


def user_split(out: Path, train_per_class: int, val_per_class: int) -> tuple[Path, Path]:
    """DATA (train/, val/) and the unseen rest of val/, as folders of links into ../shared."""
    data, unseen = out / "data", out / "unseen"
    if unseen.exists():
        return data, unseen
    for cls in sorted(p.name for p in (SHARED / "train").iterdir()):
        train = sorted((SHARED / "train" / cls).glob("*.jpg"))[:train_per_class]
        val = sorted((SHARED / "val" / cls).glob("*.jpg"))
        for folder, files in ((data / "train" / cls, train), (data / "val" / cls, val[:val_per_class]),
                              (unseen / cls, val[val_per_class:])):
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                (folder / f.name).symlink_to(f)
    return data, unseen


def unseen_outcomes(onnx_path: Path, unseen: Path, mean: list[float], std: list[float]) -> torch.Tensor:
    """Per-image correctness of an ONNX classifier on the unseen images, as they are, normalized."""
    session = ort.InferenceSession(str(onnx_path), session_options(2), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    m, s = np.array(mean, np.float32).reshape(1, 3, 1, 1), np.array(std, np.float32).reshape(1, 3, 1, 1)
    correct = []
    classes = sorted(p.name for p in unseen.iterdir())
    for label, cls in enumerate(classes):
        files = sorted((unseen / cls).glob("*.jpg"))
        for i in range(0, len(files), 200):
            x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
                          for f in files[i:i + 200]])
            logits = session.run(None, {name: (x - m) / s})[0]
            correct.append(torch.from_numpy(logits.argmax(1) == label))
    return torch.cat(correct).double()


def run(args: argparse.Namespace, data: Path, confidence: float, k: int) -> Path:
    out = args.out / f"{args.arch}-c{confidence:g}-run{k}"
    if (out / "done.json").exists():
        return out
    cmd = [str(ROOT / ".venv" / "bin" / "easier-export"), "compress", args.arch, "--weights", str(args.weights),
           "--data", str(data), "--out", str(out), "--finetune-epochs", str(args.finetune_epochs),
           "--max-drop", str(args.max_drop), "--confidence", str(confidence), "--workers", "0",
           "--batch-size", "128", "--threads", str(args.threads), *args.extra]
    start = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; see {log}")
    (out / "done.json").write_text(json.dumps({"minutes": (time.perf_counter() - start) / 60}))
    return out


def row(out: Path, unseen: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    prep = report["data"]["preprocessing"]
    base = unseen_outcomes(out / "onnx" / "original.onnx", unseen, prep["mean"], prep["std"])
    shipped = unseen_outcomes(out / "model.onnx", unseen, prep["mean"], prep["std"])
    two_sided = paired_accuracy_change(base, shipped, 0.975)
    times = {}
    for threads in (1, 2):
        verdict = race({"original": out / "onnx" / "original.onnx", "shipped": out / "model.onnx"}, "original",
                       tuple(report["model"]["input_size"]), "cpu", 1, threads, 20.0)["shipped"]
        times[threads] = verdict
    kept = [r for r in report["rounds"] if r["within_budget"]]
    return {"run": out.name.removeprefix(f"{report['model']['source']}-"), "removed": report["compressed"]["removed"],
            "shipped": f"round {report['shipped']['round']}, fold {report['shipped']['fold']}",
            "val": f"{report['compressed']['top1'] - report['original']['top1']:+.2f}"
                   + (f" (bound {kept[-1]['change']['bound']:+.2f})" if kept else ""),
            "unseen": f"{100 * float(base.mean()):.2f} → {100 * float(shipped.mean()):.2f} "
                      f"({two_sided.change:+.2f} ± {two_sided.change - two_sided.bound:.2f})",
            "t1": f"×{times[1].ratio:.2f} [{times[1].low:.2f}, {times[1].high:.2f}]",
            "t2": f"×{times[2].ratio:.2f} [{times[2].low:.2f}, {times[2].high:.2f}]",
            "minutes": f"{json.loads((out / 'done.json').read_text())['minutes']:.1f}"}


def removed_text(sites: list[str]) -> str:
    """A count and, for torchvision MobileNetV2 sites, the blocks: ``16`` both activations, ``16a``/``16b`` one."""
    blocks: dict[int, set[str]] = {}
    for site in sites:
        match = re.fullmatch(r"features_(\d+)_conv_(\d)_2", site)
        if match is None:
            return f"{len(sites)}: {', '.join(sites)}"
        blocks.setdefault(int(match[1]), set()).add("ab"[int(match[2])])
    parts = [f"{b}" if len(k) == 2 else f"{b}{''.join(k)}" for b, k in sorted(blocks.items())]
    return f"{len(sites)}: {' '.join(parts)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="cifar_mobilenet_v2")
    ap.add_argument("--weights", type=Path, default=ROOT / "runs" / "train_cifar" / "cifar_mobilenet_v2.pt")
    ap.add_argument("--confidence", type=float, nargs="+", default=[0.9, 0.0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=float, default=1.0)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "promise")
    ap.add_argument("--table-only", action="store_true", help="rows of every finished run under --out, nothing run")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more compress options")
    args = ap.parse_args()
    data, unseen = user_split(args.out, args.train_per_class, args.val_per_class)
    if not args.table_only:
        for c in args.confidence:
            for k in range(1, args.runs + 1):
                run(args, data, c, k)
    rows = [row(done.parent, unseen) for done in sorted(args.out.glob("*/done.json"))]
    head = ["run", "removed", "shipped", "val", "unseen", "t1", "t2", "minutes"]
    lines = [f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads; {args.arch}, "
             f"{args.train_per_class}/{args.val_per_class} train/val per class, --max-drop {args.max_drop}, "
             f"{args.finetune_epochs} finetune epoch(s) per round; unseen: the other val images, paired change "
             "with its 95 % interval; speed-up of model.onnx over the original's export, ORT CPU batch 1, "
             "1 and 2 threads, median of interleaved block ratios [95 % interval].", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(removed_text(r[h]) if h == "removed" else str(r[h]) for h in head) + " |"
              for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
