"""The commands that run the EASIER loop or its entropy passes: compress, entropy, linearize, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from easier_export.core.console import console
from easier_export.loop.config import LoopConfig
from easier_export.ship.export import MIN_OPSET

from . import values
from .groups import grouped, loop_options, options_of
from .loading import load, with_data
from .options import (
    FOLD,
    BenchBatches,
    BenchDevices,
    BenchSeconds,
    CalibBatches,
    CalibMethod,
    DataOptions,
    Device,
    Fold,
    LatencyTableFile,
    ModelOptions,
    NoSimplify,
    Opset,
    Out,
    Precision,
    Target,
    Threads,
    VerifyOptions,
    flag,
    typed,
)
from .runs import distributed, no_empty_out, resumable, tidy

MODEL_OPTIONS, DATA_OPTIONS = options_of(ModelOptions), options_of(DataOptions)


@grouped(model=MODEL_OPTIONS, data=DATA_OPTIONS, loop=loop_options(select="latency"),
         verify=options_of(VerifyOptions))
def compress(model: ModelOptions, data: DataOptions, loop: LoopConfig, out: Out = Path("runs/compress"),
             device: Device = "auto", fold: Fold = "auto", target: Target = "cpu",
             latency_table: LatencyTableFile = None,
             verify: VerifyOptions = VerifyOptions(), no_simplify: NoSimplify = False, opset: Opset = MIN_OPSET,
             precision: Precision = "fp32", calib_batches: CalibBatches = 8, calib_method: CalibMethod = "minmax",
             bench_devices: BenchDevices = "cpu",
             bench_batches: BenchBatches = "1,8", bench_seconds: BenchSeconds = 2.0, threads: Threads = None) -> None:
    """Run the whole pipeline: entropy → linearize/finetune rounds → fold → ONNX → verify → bench → report."""
    from easier_export.pipeline import CompressConfig, ensure_writable_file
    from easier_export.pipeline import compress as run

    cfg = CompressConfig(loop, fold, values.target(target), device, not no_simplify, tolerances=verify.tolerances(),
                         bench_devices=values.bench_devices(bench_devices),
                         bench_batches=values.ints(bench_batches, "bench-batches"), threads=threads,
                         bench_seconds=bench_seconds, opset=opset, latency_table=latency_table, precision=precision,
                         calib_batches=calib_batches, calib_method=calib_method)
    if latency_table is not None:
        ensure_writable_file(latency_table, "--latency-table")
    with distributed(device), no_empty_out(out), resumable(out):
        loaded = load(model)
        run(loaded, with_data(loaded, data, loop.seed), out, cfg)
    tidy(out)
    console.print(f"outputs in [bold]{out}[/]")


Groups = Annotated[bool, flag("no-groups", "skip timing and listing the fold groups: activations whose joint "
                                           "removal completes a merge", FOLD)]


@grouped(model=MODEL_OPTIONS, data=DATA_OPTIONS,
         loop=loop_options("rectifiers", "entropy_batches", "entropy_mode", "threshold"))
def entropy(model: ModelOptions, data: DataOptions, loop: LoopConfig,
            out: typed(Path, "JSON file", None) = Path("entropy.json"),
            plot: typed(Path | None, "also draw the per-site entropy to this PNG", None) = None,
            device: Device = "auto", target: Target = "cpu", no_groups: Groups = False,
            threads: Threads = None) -> None:
    """Measure the per-unit binary entropy of every activation call site and print the table (and fold groups)."""
    from rich.table import Table

    from easier_export.core.io import save_json
    from easier_export.fold import LatencyTable
    from easier_export.pipeline import ensure_writable_file
    from easier_export.ship.plots import plot_entropy
    from easier_export.stages import entropy_survey

    ensure_writable_file(out, "--out")
    if plot is not None:
        ensure_writable_file(plot, "--plot")
    target = values.target(target)
    loaded = load(model)
    loaders = with_data(loaded, data, trains=loop.entropy_mode == "train")
    rows, found = entropy_survey(loaded, loaders, loop, device, None if no_groups else LatencyTable(target, threads))
    table = Table("#", "call site", "op", "units", "entropy (bits)", "mean p_on", title=f"{model.model}: entropy")
    for i, r in enumerate(rows):
        table.add_row(str(i), r["name"], r["op"], str(r["units"]), f"{r['entropy']:.4f}", f"{r['mean_p_on']:.3f}")
    console.print(table)
    if not no_groups:
        _print_groups(found, target)
    save_json({"model": model.model, "mode": loop.entropy_mode, "sites": rows, "groups": found}, out)
    if plot is not None:
        plot_entropy([{**r, "removed_round": None} for r in rows], plot)
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


def _print_groups(rows: list[dict], target: str) -> None:
    from rich.table import Table

    table = Table("group", "call sites", "entropy (sum)", f"µs saved ({target}, batch 1)", "merge",
                  title="fold groups (latency selection order)")
    for i, r in enumerate(rows):
        table.add_row(str(i), ", ".join(r["sites"]), f"{r['entropy']:.4f}", f"{r['us_saved']:.1f}", r["detail"])
    console.print(table if rows else "no fold group saves time on this target")


@grouped(model=MODEL_OPTIONS, data=DATA_OPTIONS,
         loop=loop_options(exclude=("target_speedup",)))  # the shipped model's speed-up needs `compress`
def linearize(model: ModelOptions, data: DataOptions, loop: LoopConfig, out: Out = Path("runs/linearize"),
              device: Device = "auto", target: Target = "cpu", threads: Threads = None) -> None:
    """Only the EASIER loop: writes linearized.pt (resumable; rerun to continue)."""
    from easier_export.core.dist import is_main_process, resolve_device
    from easier_export.fold import LATENCY_FILE, LatencyTable
    from easier_export.loop.linearize import run_loop
    from easier_export.pipeline import (
        check_continuation,
        ensure_writable,
        latest_within_holdout,
        save_linearized,
        say_preprocessing,
        task_of,
    )
    from easier_export.trace.tracing import trace

    target = values.target(target)
    with distributed(device), no_empty_out(out), resumable(out):
        loaded = load(model)
        check_continuation(loaded, loop.relocates)
        loaders = with_data(loaded, data, loop.seed)
        dev = resolve_device(device)
        say_preprocessing(loaders)
        table = LatencyTable(target, threads, ensure_writable(out) / LATENCY_FILE)
        gm = trace(loaded.model)
        result = run_loop(gm, loaded.source, loaders.train, loaders.val, loop, dev, out, table, task=task_of(loaded))
        if is_main_process():
            result = latest_within_holdout(gm.cpu().eval(), result, out, loop, task_of(loaded))
            save_linearized(out / "linearized.pt", loaded, result, loop.relocates)
            tidy(out)
            console.print(f"removed {len(result.removed)} activations, top-1 {result.base_top1:.2f}% → "
                          f"{result.final_top1:.2f}%; wrote {out / 'linearized.pt'}")


Epochs = typed(int, "training epochs of the demo model", None, min=1)


@grouped(loop=loop_options("max_drop", "finetune_epochs", "seed", "select", select="latency"))
def demo(loop: LoopConfig, out: Out = Path("runs/demo"), epochs: Epochs = 12, fold: Fold = "auto") -> None:
    """Train a small inverted-residual CNN on scikit-learn's digits, then run the whole `compress` pipeline."""
    from easier_export.demo import run_demo

    with no_empty_out(out), resumable(out):
        run_demo(out, epochs, loop.finetune_epochs, loop.max_drop, fold, loop.seed, loop.select)
    tidy(out)

