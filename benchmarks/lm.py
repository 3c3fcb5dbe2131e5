"""EASIER on a small byte-level GPT-2 trained here, on text every fresh machine has (issue: beyond images).

Phase ``train``: writes a corpus (the Python standard library's ``.py`` sources, files sorted by path, every
50th file to ``val.txt``, capped) under ``runs/lm/data`` and trains a Hugging Face ``GPT2LMHeadModel`` from a
config (byte vocabulary 256, ~1.8 M parameters) on one CPU thread for ``--minutes``; ``save_pretrained`` to
``runs/lm/gpt2-stdlib`` (no tokenizer files: the tool reads text as UTF-8 bytes).

Phase ``easier``: `compress` on that directory with EASIER order and with a random order (same budget,
``--max-ppl-increase``), then the table in ``runs/lm/table.md`` (``benchmarks/lm.md`` is that table, read).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm.py train --minutes 35
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm.py easier
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_resnets import p50  # noqa: E402  (one place for reading the benchmark rows)

from easier_export.core.io import save_json
from easier_export.core.ort import cpu_name
from easier_export.load.models import load_model
from easier_export.load.text import text_loaders
from easier_export.loop.config import LoopConfig
from easier_export.pipeline import CompressConfig, compress
from easier_export.ship.bench import bench

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


def run(criterion: str, args: argparse.Namespace) -> dict:
    """The compress report for this removal order (entropy = EASIER, random), run unless finished before."""
    out = RUNS / f"easier-{criterion}"
    if (out / "result.json").is_file():
        return json.loads((out / "result.json").read_text())
    loaded = load_model(str(MODEL), img_size=(args.seq,))
    loaders = text_loaders(DATA, loaded.task.spec, args.seq, args.batch_size, seed=0)
    loop = LoopConfig(max_ppl_increase=args.max_ppl_increase, finetune_epochs=args.steps / len(loaders.train),
                      lr=args.lr, optimizer="adamw", criterion=criterion, select="entropy",
                      entropy_batches=args.entropy_batches, patience=args.patience)
    cfg = CompressConfig(loop, fold="all", device="cpu", bench_batches=(1,), threads=1, bench_seconds=3.0)
    t0 = time.perf_counter()
    report = compress(loaded, loaders, out, cfg)
    report["wall_s"] = time.perf_counter() - t0
    save_json(report, out / "result.json")  # with the wall time, which compress's own report.json lacks
    return report


def ceiling(args: argparse.Namespace) -> dict:
    """Every MLP GELU removed, no finetuning: the speed (and exactness) the folds can give at most, and the
    perplexity that removal costs before any finetuning. Independent of the EASIER rounds."""
    from easier_export.fold import fold_model
    from easier_export.loop.train import evaluate_metrics
    from easier_export.ship.export import export_onnx, verify_onnx
    from easier_export.trace.edits import remove_sites
    from easier_export.trace.sites import find_call_sites
    from easier_export.trace.tracing import trace

    out = RUNS / "ceiling"
    if (out / "result.json").is_file():
        return json.loads((out / "result.json").read_text())
    loaded = load_model(str(MODEL), img_size=(args.seq,))
    loaders = text_loaders(DATA, loaded.task.spec, args.seq, args.batch_size, seed=0)
    gm = trace(loaded.model)
    linear = remove_sites(gm, [s.name for s in find_call_sites(gm)])
    inputs = loaded.task.verification_inputs(loaders, 4)
    folded, _ = fold_model(linear, inputs[0][:1], mode="all")
    files = {"original": out / "original.onnx", "folded": out / "model.onnx"}
    for path, model in zip(files.values(), (gm, folded), strict=True):
        export_onnx(model, inputs[0][:1], path)
    check = verify_onnx(files["folded"], linear, inputs)
    result = {"ppl_before": evaluate_metrics(gm, loaders.val, torch.device("cpu"))["ppl"],
              "ppl_after": evaluate_metrics(linear, loaders.val, torch.device("cpu"))["ppl"],
              "params": [sum(p.numel() for p in m.parameters()) for m in (gm, folded)],
              "verify": check.to_dict()}
    save_json(result, out / "result.json")
    return result


def retime(original: Path, shipped: Path) -> list[dict]:
    """Original vs shipped ONNX, interleaved, batch 1 and 8 at sequence 128, one ORT thread."""
    return bench({"original": original, "folded": shipped}, (128,), ("cpu",), (1, 8), threads=1, max_seconds=3.0,
                 repeats=5)


def speed(timed: list[dict]) -> str:
    """p50 at batch 1 and 8 (original → shipped, speed-up) and tokens/s at batch 8."""
    b1o, b1f, b8o, b8f = (p50({"bench": timed}, lab, b) for b in (1, 8) for lab in ("original", "folded"))
    tps = {t["label"]: t["tokens_per_s"] for t in timed if t["batch"] == 8}
    noisy = " noisy" if any(t["noisy"] for t in timed) else ""
    return (f"{b1o:.2f} → {b1f:.2f} (×{b1o / b1f:.2f}{noisy}) | {b8o:.1f} → {b8f:.1f} (×{b8o / b8f:.2f}) | "
            f"{tps['original']:,.0f} → {tps['folded']:,.0f}")


def partial(criterion: str) -> tuple[str, list[dict]] | None:
    """A run stopped before it finished: its rounds so far, from the loop's state file."""
    path = RUNS / f"easier-{criterion}" / "state.pt"
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    kept = [r for r in state["history"] if r["within_budget"]]
    ppl = kept[-1]["val_ppl"] if kept else state["base_ppl"]
    return (f"| {label(criterion)} (stopped after {len(state['history'])} rounds) | {len(state['removed'])} / 4 | "
            f"{len(kept)} / {len(state['history'])} | {state['base_ppl']:.3f} → {ppl:.3f} "
            f"({ppl / state['base_ppl'] - 1:+.1%}) | – | – | not shipped | – | – | – | – | – |", state["history"])


def label(criterion: str) -> str:
    return "EASIER (entropy)" if criterion == "entropy" else criterion


def row(criterion: str, r: dict, timed: list[dict]) -> str:
    o, c = r["original"], r["compressed"]
    kept = sum(x["within_budget"] for x in r["rounds"])
    v = r["verify"]
    return (f"| {label(criterion)} | {len(c['removed'])} / {o['activations']} | {kept} / {len(r['rounds'])} | "
            f"{o['ppl']:.3f} → {c['ppl']:.3f} ({c['ppl'] / o['ppl'] - 1:+.1%}) | {o['top1']:.2f} → {c['top1']:.2f} | "
            f"{o['params'] / 1e6:.2f} M → {c['params'] / 1e6:.2f} M | {speed(timed)} | {v['max_abs']:.1e} "
            f"({v['max_rel']:.1e} rel.) | {v['top1_agree']:.4f} | {r['wall_s'] / 60:.1f} min |")


def ceiling_row(r: dict, timed: list[dict]) -> str:
    v = r["verify"]
    return (f"| every GELU, no finetuning (speed ceiling) | 4 / 4 | – | {r['ppl_before']:.3f} → {r['ppl_after']:.3f} "
            f"({r['ppl_after'] / r['ppl_before'] - 1:+.1%}) | – | {r['params'][0] / 1e6:.2f} M → "
            f"{r['params'][1] / 1e6:.2f} M | {speed(timed)} | {v['max_abs']:.1e} ({v['max_rel']:.1e} rel.) | "
            f"{v['top1_agree']:.4f} | – |")


def table(args: argparse.Namespace, rows: list[str], rounds: dict[str, list[dict]]) -> str:
    cfg = json.loads((MODEL / "config.json").read_text())
    lines = [
        "# EASIER on a byte-level GPT-2 (Hugging Face directory, Python standard library text)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other work, no GPU; torch {torch.__version__}.",
        "",
        f"Model: `GPT2LMHeadModel` from a config (n_layer {cfg['n_layer']}, n_embd {cfg['n_embd']}, n_head "
        f"{cfg['n_head']}, vocab 256 bytes, `gelu_new`), trained here by `benchmarks/lm.py train` (AdamW, 1 CPU "
        "thread, 30 min budget, batch 16 × 128 bytes) on the standard library's `.py` files (every 50th file is "
        f"validation text, {VAL_BYTES // 1000} kB), saved with `save_pretrained` and read back by the tool as a "
        "Hugging Face directory (no tokenizer files: UTF-8 bytes).",
        "",
        f"Settings: `compress --select entropy --criterion {{entropy, random}} --max-ppl-increase "
        f"{args.max_ppl_increase} --patience {args.patience} --optimizer adamw --lr {args.lr} --entropy-batches "
        f"{args.entropy_batches} --fold all`, {args.steps} finetuning steps per round (AdamW, cosine, batch "
        f"{args.batch_size} × {args.seq}), seed 0. "
        "Perplexity is per byte on the validation text; top-1 is next-byte accuracy. Speed: ORT CPU p50 of the "
        "original ONNX vs the shipped `model.onnx` at sequence 128, one ORT thread, re-timed together after the "
        "runs (interleaved, 5 repeats); tokens/s at batch 8. Exactness: `model.onnx` against the linearized "
        "PyTorch model on validation batches at sequence 128 and 64 (max abs diff of the logits, next-token "
        "agreement).",
        "",
        "| order | GELUs removed / sites | rounds kept / run | val perplexity | next-byte top-1 (%) | params | "
        "ORT p50 b1 ms | ORT p50 b8 ms | tokens/s (b8) | max abs diff | next-token agreement | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Rounds (removed call site (score: entropy in EASIER order, a seeded draw in random order): validation "
        "perplexity, kept or reverted):",
        "",
    ]
    for criterion, rs in rounds.items():
        steps = "; ".join(f"{', '.join(x['removed'])} ({x['entropy']:.3f}): {x['val_ppl']:.3f} "
                          f"{'kept' if x['within_budget'] else 'reverted'}" for x in rs)
        lines.append(f"- {criterion}: {steps}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)  # the settings of the table, shared by its phases
    common.add_argument("--max-ppl-increase", type=float, default=5.0)
    common.add_argument("--steps", type=int, default=250, help="finetuning steps per round")
    common.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    common.add_argument("--patience", type=int, default=2)
    common.add_argument("--entropy-batches", type=int, default=10)
    common.add_argument("--batch-size", type=int, default=16)
    common.add_argument("--seq", type=int, default=128)
    sub = parser.add_subparsers(dest="phase", required=True)
    t = sub.add_parser("train")
    t.add_argument("--minutes", type=float, default=35.0)
    for phase in ("ceiling", "table"):
        sub.add_parser(phase, parents=[common])
    e = sub.add_parser("easier", parents=[common])
    e.add_argument("--criteria", nargs="+", default=["entropy", "random"], choices=["entropy", "random"])
    args = parser.parse_args()
    if args.phase == "train":
        train(args.minutes)
        return
    torch.set_num_threads(1)
    if args.phase == "ceiling":
        ceiling(args)
        return
    if args.phase == "easier":
        for c in args.criteria:
            run(c, args)
    rows, rounds = [], {}
    for c in ("entropy", "random"):
        done = RUNS / f"easier-{c}"
        if (done / "result.json").is_file():
            r = json.loads((done / "result.json").read_text())
            rows.append(row(c, r, retime(done / "onnx" / "original.onnx", done / "model.onnx")))
            rounds[c] = r["rounds"]
        elif partial(c) is not None:
            rows.append(partial(c)[0])
            rounds[c] = [{**x, "entropy": x["score"]} for x in partial(c)[1]]
    if (RUNS / "ceiling" / "result.json").is_file():
        r = ceiling(args)
        rows.append(ceiling_row(r, retime(RUNS / "ceiling" / "original.onnx", RUNS / "ceiling" / "model.onnx")))
    text = table(args, rows, rounds)
    (RUNS / "table.md").write_text(text)  # benchmarks/lm.md is this table with its findings
    print(text)


if __name__ == "__main__":
    main()
