"""How many val outcomes one round's finetuning changes, by loss: the width of the loop's paired bound.

The loop keeps a round when the one-sided bound of its paired change against the original is within budget, and
that bound's margin grows with the square root of the images whose outcome changed (right in one, wrong in the
other). This script finetunes one round as the loop does (one epoch, SGD at ``--lr``, the round's seeds) on the
user split of ``promise.py`` (1,000 train / 100 val images per class of ../shared CIFAR-10), with nothing removed,
with one activation removed and with a whole block's two removed, under cross-entropy (EASIER's finetuning) and
under distillation from the frozen original at several weights (``--distill``), and counts the changed outcomes
on the 1,000 val images, with the change and its 90 % bound as the loop computes them. No timing: it can run
beside other work.

    .venv/bin/python benchmarks/finetune_flips.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from promise import user_split  # noqa: E402

from easier_export.core.ort import cpu_name  # noqa: E402
from easier_export.core.stats import paired_accuracy_change  # noqa: E402
from easier_export.load.data import open_image_folder  # noqa: E402
from easier_export.load.models import load_model  # noqa: E402
from easier_export.loop.train import Teacher, finetune, seed_everything  # noqa: E402
from easier_export.trace.edits import remove_sites  # noqa: E402
from easier_export.trace.tracing import trace  # noqa: E402

REMOVALS = {"nothing": [], "block 16a": ["features_16_conv_0_2"],
            "block 15": ["features_15_conv_0_2", "features_15_conv_1_2"]}


@torch.no_grad()
def outcomes(model: torch.nn.Module, loader) -> torch.Tensor:
    """Per val image: 1 when the model's top-1 is right."""
    model.eval()
    return torch.cat([(model(x).argmax(1) == y).double() for x, y in loader])


def cell(gm, base: torch.Tensor, loaders, sites: list[str], distill: float, seed: int, lr: float) -> dict:
    """One round: remove ``sites``, finetune one epoch (distilled from the original at weight ``distill``)."""
    torch.manual_seed(seed)
    seed_everything(seed, loaders.train)
    model = remove_sites(gm, sites)  # a copy
    teacher = Teacher.frozen(gm, distill) if distill > 0 else None
    finetune(model, loaders.train, torch.device("cpu"), 1.0, lr, teacher=teacher)
    change = paired_accuracy_change(base, outcomes(model, loaders.val), 0.9)
    return {"change": change.change, "bound": change.bound, "discordant": change.discordant}


def cell_key(what: str, distill: float, seed: int, lr: float) -> str:
    """A cell's name in the cache (``cells.json``)."""
    return f"{what}|{distill:g}|{seed}|{lr:g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=ROOT / "runs" / "train_cifar" / "cifar_mobilenet_v2.pt")
    ap.add_argument("--distill", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune_flips")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data, _ = user_split(ROOT / "runs" / "promise", 1000, 100)
    loaded = load_model("cifar_mobilenet_v2", weights=args.weights, img_size=32)
    loaders = open_image_folder(data).loaders((3, 32, 32), loaded.task.mean, loaded.task.std, 128, 0, 0)
    gm = trace(loaded.model)
    base = outcomes(gm, loaders.val)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cells.json"
    cells = json.loads(cache.read_text()) if cache.exists() else {}
    for what, sites in REMOVALS.items():
        for distill in args.distill:
            for seed in args.seeds:
                key = cell_key(what, distill, seed, args.lr)
                if key not in cells:
                    cells[key] = cell(gm, base, loaders, sites, distill, seed, args.lr)
                    cache.write_text(json.dumps(cells, indent=1))
                print(key, cells[key], flush=True)
    lines = [f"Machine: {cpu_name()}; trained cifar_mobilenet_v2 ({100 * float(base.mean()):.2f} % on the "
             f"{len(base)} val images), one epoch of SGD at lr {args.lr:g}, seeds {args.seeds}.", "",
             "| removed | loss | changed outcomes (of 1,000) | change (points) | 90 % bound |", "|---|---|---|---|---|"]
    for what in REMOVALS:
        for distill in args.distill:
            got = [cells[cell_key(what, distill, s, args.lr)] for s in args.seeds]
            loss = "cross-entropy" if distill == 0 else f"`--distill {distill:g}`"
            lines.append(f"| {what} | {loss} | " + " | ".join(
                " / ".join(f"{g[k]:+.1f}" if k != "discordant" else str(g[k]) for g in got)
                for k in ("discordant", "change", "bound")) + " |")
    mean = {d: statistics.mean(cells[cell_key(w, d, s, args.lr)]["discordant"] for w in REMOVALS
                               for s in args.seeds) for d in args.distill}
    lines += ["", "Mean changed outcomes per loss: " + ", ".join(f"{d:g}: {m:.1f}" for d, m in mean.items())]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
