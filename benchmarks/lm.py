"""EASIER on a small byte-level GPT-2 trained here, on text every fresh machine has (issue: beyond images).

Phase ``train``: writes a corpus (the Python standard library's ``.py`` sources, files sorted by path, every
50th file to ``val.txt``, capped) under ``runs/lm/data`` and trains a Hugging Face ``GPT2LMHeadModel`` from a
config (byte vocabulary 256, ~1.8 M parameters) on one CPU thread for ``--minutes``; ``save_pretrained`` to
``runs/lm/gpt2-stdlib`` (no tokenizer files: the tool reads text as UTF-8 bytes).

Phase ``easier``: `compress` on that directory with EASIER order and with a random order (same budget,
``--max-ppl-increase``), then ``benchmarks/lm.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm.py train --minutes 35
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm.py easier
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "lm"
DATA = RUNS / "data"
MODEL = RUNS / "gpt2-stdlib"
TRAIN_BYTES, VAL_BYTES = 8_000_000, 96_000
CONFIG = {"vocab_size": 256, "n_positions": 256, "n_embd": 192, "n_layer": 4, "n_head": 4,
          "activation_function": "gelu_new", "bos_token_id": None, "eos_token_id": None,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def write_corpus(out: Path) -> None:
    """Standard-library sources, deterministic split: sorted paths, every 50th file is validation text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    parts: dict[str, list[str]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    caps = {"train": TRAIN_BYTES, "val": VAL_BYTES}
    for i, path in enumerate(files):
        split = "val" if i % 50 == 0 else "train"
        if sizes[split] >= caps[split]:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts[split].append(text)
        sizes[split] += len(text.encode())
    out.mkdir(parents=True, exist_ok=True)
    for split, texts in parts.items():
        (out / f"{split}.txt").write_text("\n".join(texts)[: caps[split]], encoding="utf-8")


def train(minutes: float, seq: int = 128, batch: int = 16, lr: float = 2e-3, seed: int = 0) -> None:
    """AdamW, warm-up then cosine over the time budget (the schedule assumes the measured step rate)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    if not (DATA / "train.txt").exists():
        write_corpus(DATA)
    data = {s: torch.frombuffer(bytearray((DATA / f"{s}.txt").read_bytes()), dtype=torch.uint8).long()
            for s in ("train", "val")}
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(data['train']) / 1e6:.1f} M train bytes", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    start, step, budget = time.time(), 0, minutes * 60
    est_steps = None
    while time.time() - start < budget:
        idx = torch.randint(len(data["train"]) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data["train"][i: i + seq] for i in idx])
        frac = (time.time() - start) / budget
        scale = min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr * max(scale, 0.02)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            est_steps = est_steps or int(budget / ((time.time() - start) / step))
            print(f"step {step} (~{est_steps} in budget) loss {loss.item():.3f} ({time.time() - start:.0f}s)",
                  flush=True)
        if step % 500 == 0:
            model.save_pretrained(MODEL)
    model.eval()
    val = data["val"][: (len(data["val"]) - 1) // seq * seq + 1]
    with torch.no_grad():
        x = val[:-1].view(-1, seq)
        loss = model(input_ids=x, labels=x).loss
    print(f"done: {step} steps, val loss {loss.item():.3f} (ppl {math.exp(loss.item()):.2f} per byte)", flush=True)
    model.save_pretrained(MODEL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    t = sub.add_parser("train")
    t.add_argument("--minutes", type=float, default=35.0)
    args = parser.parse_args()
    if args.phase == "train":
        train(args.minutes)


if __name__ == "__main__":
    main()
