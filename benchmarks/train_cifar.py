"""Train a built-in CIFAR architecture from scratch on ../shared CIFAR-10 (issue 9, item 6).

The latency-aware benchmark needs trained MobileNetV2 / ViT checkpoints and nothing may be downloaded, so they
are trained here, on a shared 2-core CPU. To make that affordable the JPEGs are decoded once into a uint8 tensor
cache and every epoch runs from tensors (random crop with 4-pixel padding and horizontal flip done on batches).
A checkpoint is written atomically after every epoch and a rerun of the same command resumes from it; the final
state dict goes to ``OUT/<arch>.pt`` and a row is appended to benchmarks/train_cifar.md.

    .venv/bin/python benchmarks/train_cifar.py --arch cifar_mobilenet_v2 --epochs 24 --minutes 30
    .venv/bin/python benchmarks/train_cifar.py --arch cifar_vit --epochs 4 --minutes 35
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from easier_export.core.ort import cpu_name
from easier_export.load.models import build_arch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
TABLE = ROOT / "benchmarks" / "train_cifar.md"
EXTS = {".jpg", ".jpeg", ".png"}


@dataclass
class Recipe:
    """Per-architecture defaults: SGD for the BatchNorm ConvNet, AdamW + warmup + smoothing for the ViT."""

    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    batch: int = 128


RECIPES = {
    "cifar_mobilenet_v2": Recipe("sgd", 0.1, 5e-4, 0.3, 0.0),
    "cifar_vit": Recipe("adamw", 1e-3, 0.05, 0.5, 0.1),
}
DEFAULT_RECIPE = Recipe("sgd", 0.05, 5e-4, 0.0, 0.0)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file then rename: a kill mid-write never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def decode_split(folder: Path) -> dict[str, Any]:
    """Decode an ImageFolder split into uint8 NCHW + labels (classes sorted, as torchvision orders them)."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in EXTS:
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return {"x": x, "y": torch.tensor(labels, dtype=torch.long), "classes": classes}


def load_split(data: Path, split: str, cache_dir: Path) -> dict[str, Any]:
    """The cached tensors of one split, decoding the JPEGs on first use only (~50k files is minutes on 1 core)."""
    cache = cache_dir / f"cache_{split}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    t0 = time.time()
    obj = decode_split(data / split)
    save_atomic(obj, cache)
    print(f"decoded {split}/: {len(obj['y'])} images in {time.time() - t0:.0f} s -> {cache}", flush=True)
    return obj


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip per sample, on a uint8 NCHW batch."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # b, h, 1
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # b, 1, w
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class Normalize:
    """uint8 -> float in [0, 1] -> (x - mean) / std, with the model's pretrained_cfg statistics."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean) / self.std


def batches(n: int, batch: int, gen: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches, shuffled when a generator is given; the last partial batch is dropped only in training."""
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    stop = n - n % batch if gen is not None else n
    for i in range(0, stop, batch):
        yield order[i:i + batch]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norm affines, position embeddings and class tokens (they are not kernels)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup then cosine to zero, planned over the full --epochs even if --minutes stops it earlier."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, Any], norm: Normalize, bf16: bool) -> float:
    """Top-1 in percent over the whole split."""
    model.eval()
    correct = 0
    for idx in batches(len(data["y"]), 500, None):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(norm(data["x"][idx]))
        correct += int((logits.argmax(1) == data["y"][idx]).sum())
    return 100.0 * correct / len(data["y"])


def append_row(args: argparse.Namespace, recipe: Recipe, n_params: int, state: dict[str, Any]) -> None:
    """One table row per finished run; the header (machine-independent) is written on first use."""
    if not TABLE.exists():
        TABLE.write_text(
            "# CIFAR-10 from scratch for the latency-aware benchmark (benchmarks/train_cifar.py)\n\n"
            "Trained on ../shared `train/` (45,000 JPEGs), top-1 on `val/` (5,000), random crop (pad 4) + flip, "
            "nothing pretrained. Epochs = done / planned (the cosine schedule is planned for the planned count; "
            "a `--minutes` budget may stop earlier). Checkpoints are not committed: `runs/train_cifar/<arch>.pt`.\n\n"
            "| arch | params | epochs | minutes | val top-1 | recipe | machine | threads | date |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    opt = (f"{recipe.optimizer} lr {recipe.lr:g} wd {recipe.weight_decay:g} batch {recipe.batch}"
           + (f" warmup {recipe.warmup_epochs:g} ep" if recipe.warmup_epochs else "")
           + (f" ls {recipe.label_smoothing:g}" if recipe.label_smoothing else "")
           + (" bf16" if args.bf16 else ""))
    row = (f"| {args.arch} | {n_params / 1e6:.2f} M | {state['epoch']} / {args.epochs} | "
           f"{state['seconds'] / 60:.1f} | {state['history'][-1]['val_top1']:.2f} | {opt} | {cpu_name()} | "
           f"{args.threads} | {date.today().isoformat()} |\n")
    with TABLE.open("a") as f:
        f.write(row)
    print(row, end="")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar_mobilenet_v2")
    ap.add_argument("--epochs", type=int, default=15, help="length of the cosine schedule")
    ap.add_argument("--minutes", type=float, default=None,
                    help="time budget: stop after the epoch that passes it")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to others)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "train_cifar")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--cache-dir", type=Path, default=None, help="tensor cache (default: --out)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AMX/AVX512-BF16)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="stop each epoch after N steps (timing runs)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    recipe = RECIPES.get(args.arch, DEFAULT_RECIPE)
    recipe = replace(recipe, lr=args.lr or recipe.lr, batch=args.batch or recipe.batch)
    cache_dir = args.cache_dir or args.out
    train, val = load_split(args.data, "train", cache_dir), load_split(args.data, "val", cache_dir)

    torch.manual_seed(args.seed)
    model = build_arch(args.arch, num_classes=len(train["classes"]))
    cfg = model.pretrained_cfg
    norm = Normalize(cfg["mean"], cfg["std"])
    n_params = sum(p.numel() for p in model.parameters())
    groups = param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    else:
        opt = torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(train["y"]) // recipe.batch
    total = args.epochs * steps_per_epoch
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    ckpt_path = args.out / f"{args.arch}.ckpt.pt"
    state: dict[str, Any] = {"epoch": 0, "seconds": 0.0, "history": []}
    if ckpt_path.exists() and not args.fresh:
        ckpt = torch.load(ckpt_path, weights_only=True)
        if ckpt["epochs"] != args.epochs:
            raise SystemExit(f"{ckpt_path} plans {ckpt['epochs']} epochs, not {args.epochs}: pass --fresh")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        print(f"resumed {ckpt_path} after epoch {state['epoch']} ({state['seconds'] / 60:.1f} min)", flush=True)
    print(f"{args.arch}: {n_params:,} params, {steps_per_epoch} steps/epoch, {args.epochs} epochs, {recipe}, "
          f"threads {args.threads}, bf16 {args.bf16}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(state["epoch"], args.epochs):
        if args.minutes is not None and state["seconds"] >= 60 * args.minutes:
            print(f"time budget of {args.minutes} min reached after {epoch} epochs", flush=True)
            break
        gen.manual_seed(args.seed * 1000 + epoch)  # the same data order after a resume
        model.train()
        t0, loss_sum, seen = time.time(), 0.0, 0
        for i, idx in enumerate(batches(len(train["y"]), recipe.batch, gen)):
            if args.max_steps is not None and i >= args.max_steps:
                break
            lr = lr_at(epoch * steps_per_epoch + i, total, warmup, recipe.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            x = norm(augment(train["x"][idx], gen))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = criterion(model(x), train["y"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        train_s = time.time() - t0
        top1 = evaluate(model, val, norm, args.bf16)
        state["seconds"] += time.time() - t0
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "val_top1": top1,
                                 "train_s": train_s, "seconds": state["seconds"]})
        if args.max_steps is None:  # a timing run must not be resumed as if it were a real epoch
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                         "epochs": args.epochs, "arch": args.arch}, ckpt_path)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss_sum / max(1, seen):.3f}  val top-1 {top1:.2f}  "
              f"epoch {train_s / 60:.1f} min  total {state['seconds'] / 60:.1f} min", flush=True)
        if args.max_steps is not None:
            return  # a timing run: no final weights, no table row

    if not state["history"]:
        raise SystemExit("no epoch trained")
    save_atomic(model.state_dict(), args.out / f"{args.arch}.pt")
    print(f"saved {args.out / f'{args.arch}.pt'}", flush=True)
    append_row(args, recipe, n_params, state)


if __name__ == "__main__":
    main()
