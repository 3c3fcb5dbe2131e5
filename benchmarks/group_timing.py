"""Which fold groups pay, measured again and again: the same command's two runs must offer the same groups.

``--select latency`` removes only groups whose merge measured faster beyond the noise (``fold.latency``). That
verdict is a timing, so two runs can disagree on the groups near the line, and then remove different sets
(benchmarks/promise.md, section 1). This script times every fold group of a trained model ``--repeats`` times
from scratch (no cache), with the segment races on one pair of onnxruntime sessions (``--sessions 1``, the rule
before) and on five fresh pairs (the rule now), and reports per setting: how many groups paid each time, how
many paid every time and in some repeats only, and the seconds one measurement took. Timing: run it alone.

    .venv/bin/python benchmarks/group_timing.py --repeats 3 --sessions 1 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from easier_export.core.ort import cpu_name  # noqa: E402
from easier_export.fold.groups import find_groups  # noqa: E402
from easier_export.fold.latency import LatencyTable  # noqa: E402
from easier_export.load.models import load_model  # noqa: E402
from easier_export.trace.sites import find_call_sites  # noqa: E402
from easier_export.trace.tracing import trace  # noqa: E402


def paying(gm, sites: list[str], example: torch.Tensor, sessions: int, threads: int) -> tuple[set, float]:
    """The groups that pay with nothing removed yet (what the first round chooses among), and the seconds."""
    start = time.perf_counter()
    groups = find_groups(gm, sites, example, LatencyTable("cpu", threads=threads, sessions=sessions))
    return {g.sites for g in groups.candidates(set())}, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="cifar_mobilenet_v2")
    ap.add_argument("--weights", type=Path, default=ROOT / "runs" / "train_cifar" / "cifar_mobilenet_v2.pt")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "group_timing")
    args = ap.parse_args()
    loaded = load_model(args.arch, weights=args.weights, img_size=args.size)
    gm = trace(loaded.model).eval()
    sites = [s.name for s in find_call_sites(gm) if s.in_graph]
    example = torch.randn(1, *loaded.input_size)
    lines = [f"Machine: {cpu_name()}; {args.arch} at {args.size}x{args.size}, {len(sites)} call sites, ORT CPU "
             f"{args.threads} threads; each measurement from scratch.", "",
             "| sessions per race | paying groups per repeat | paying every time | paying in some only | seconds |",
             "|---|---|---|---|---|"]
    for sessions in args.sessions:
        found = [paying(gm, sites, example, sessions, args.threads) for _ in range(args.repeats)]
        sets = [f[0] for f in found]
        every, some = set.intersection(*sets), set.union(*sets)
        lines.append(f"| {sessions} | {' / '.join(str(len(s)) for s in sets)} | {len(every)} | "
                     f"{len(some - every)} | {' / '.join(f'{f[1]:.0f}' for f in found)} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.arch}-{args.size}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
