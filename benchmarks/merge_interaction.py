"""Do the fold planner's merges add up in the whole model? Each planned merge alone, and all of them, raced against
the unmerged fold of the same model.

The planner (``fold.planner``) times each exact merge as a small graph of its own and keeps the ones faster beyond
the noise, assuming savings add up. The study (compare.md, MobileNetV2) found a model whose planned fold raced
slower than its unmerged fold. This script builds, for one study model (the study's start checkpoint with a
cell's within-budget removals): the unmerged fold, the planner's fold, and one fold per planned merge with only
that merge applied (``--fold auto``'s replay), and races them ``--repeats`` times against the unmerged fold at
batch 1, 1 thread; ``--no-arena`` repeats the races with onnxruntime's memory arena and memory pattern off (a
test of whether buffer placement, not arithmetic, moves the whole model). Writes
``benchmarks/merge_interaction.md``. Timing: run it alone.

    .venv/bin/python benchmarks/merge_interaction.py --cell sparsity-s0 --repeats 2 --no-arena
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_aware import MODELS, weights_of  # noqa: E402

from easier_export.core import ort as core_ort  # noqa: E402
from easier_export.core.ort import cpu_name  # noqa: E402
from easier_export.fold import fold_model  # noqa: E402
from easier_export.load.models import load_model  # noqa: E402
from easier_export.ship import bench  # noqa: E402
from easier_export.ship.export import export_onnx  # noqa: E402
from easier_export.trace.edits import remove_sites  # noqa: E402
from easier_export.trace.tracing import trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def study_model(args: argparse.Namespace) -> torch.fx.GraphModule:
    """The study's start model of ``--model`` with ``--cell``'s within-budget removals (compare.py's cached
    files)."""
    study = args.study / args.model
    gm = trace(load_model(MODELS[args.model][0], weights=weights_of(args.model, args)).model.eval())
    gm.load_state_dict(torch.load(study / "start.pt", weights_only=True))
    row = json.loads((study / f"{args.cell}.json").read_text())
    return remove_sites(gm, row["removed"][:row["within_budget"]]).eval()


def folds(gm: torch.fx.GraphModule, out: Path) -> tuple[dict[str, Path], list[str]]:
    """The unmerged fold, the planner's fold, and one fold per planned merge alone; and what each merge is."""
    example = torch.randn(1, 3, 32, 32)
    planned, records = fold_model(gm, example, mode="auto", target="cpu", threads=1)
    merges = [r for r in records if r.applied and r.us_before is not None]
    models = {"unmerged": fold_model(gm, example, mode="none")[0], "planned (all merges)": planned}
    for i, r in enumerate(merges):
        models[f"merge {i} alone"] = fold_model(gm, example, mode="auto", replay=[r.nodes])[0]
    files = {}
    for i, (label, model) in enumerate(models.items()):
        files[label] = Path(export_onnx(model, example, out / f"fold-{i}.onnx")["path"])
    return files, [f"merge {i}: {r.detail} ({r.us_before:.2f} → {r.us_after:.2f} µs alone)"
                   for i, r in enumerate(merges)]


def without_arena(threads: int) -> ort.SessionOptions:
    options = core_ort.session_options(threads)
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = False
    return options


def races(files: dict[str, Path], repeats: int, seconds: float,
          options: Callable[[int], ort.SessionOptions]) -> list[dict[str, str]]:
    """``repeats`` races of every fold against the unmerged one, sessions built with ``options``."""
    default, bench.session_options = bench.session_options, options
    try:
        found = [bench.race(files, "unmerged", (3, 32, 32), "cpu", 1, 1, max_seconds=seconds) for _ in range(repeats)]
    finally:
        bench.session_options = default
    return [{k: f"×{v.ratio:.3f} [{v.low:.3f}, {v.high:.3f}]" for k, v in r.items()} for r in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=sorted(MODELS))
    parser.add_argument("--cell", default="sparsity-s0", help="a finished study cell: METHOD-sSEED")
    parser.add_argument("--study", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--trained", type=Path, default=ROOT / "runs" / "train_cifar")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=90.0, help="each race's time")
    parser.add_argument("--no-arena", action="store_true", help="one more race with the arena and pattern off")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "merge_interaction.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.study / args.model / "merge_interaction"
    out.mkdir(parents=True, exist_ok=True)
    files, merges = folds(study_model(args), out)
    found = races(files, args.repeats, args.seconds, core_ort.session_options)
    columns = [f"race {i + 1}" for i in range(len(found))]
    if args.no_arena:
        found += races(files, 1, args.seconds, without_arena)
        columns.append(f"race {len(columns) + 1}, arena off")
    lines = [f"| fold | {' | '.join(columns)} |", "|---|" + "---|" * len(columns)]
    lines += [f"| {k} | {' | '.join(r[k] for r in found)} |" for k in files if k != "unmerged"]
    head = textwrap.fill(
        f"Machine: {cpu_name()}, onnxruntime {ort.__version__}, batch 1, 1 thread, each race {args.seconds:.0f} s "
        "(five fresh session pairs, interleaved blocks); speed-up over the unmerged fold with its 95 % interval "
        "(arena off: onnxruntime's memory arena and memory pattern disabled). Generated by "
        "`benchmarks/merge_interaction.py`.", 118)
    args.table.write_text(f"# Do planned merges add up in the whole model? ({args.model}, cell {args.cell})\n\n"
                          f"{head}\n\n" + "\n".join(f"- {m}" for m in merges) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
