"""The commands that fold, export and time a model without the loop: fold, export, bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from easier_export.core.console import console
from easier_export.core.errors import VerificationError
from easier_export.ship.export import MIN_OPSET

from . import values
from .groups import grouped, options_of
from .loading import load, ready, verification_data, with_data
from .options import (
    DATA,
    BenchBatches,
    BenchDevices,
    BenchSeconds,
    Fold,
    JsonOut,
    ModelOptions,
    NoSimplify,
    Opset,
    Out,
    SkipBadImages,
    Target,
    Threads,
    VerifyOptions,
    typed,
)
from .runs import tidy

IMAGE_FILE = ("model", "weights", "arch", "num_classes", "trust_pickle", "input_size")  # no preprocessing options


@grouped(model=options_of(ModelOptions, *IMAGE_FILE), verify=options_of(VerifyOptions))
def fold(model: ModelOptions, out: Out = Path("runs/fold"), fold: Fold = "auto", target: Target = "cpu",
         verify: VerifyOptions = VerifyOptions(), no_simplify: NoSimplify = False, opset: Opset = MIN_OPSET,
         threads: Threads = None) -> None:
    """Fold a (linearized) model: writes folded.pt2, model.onnx (verified) and fold_plan.json."""
    from easier_export.pipeline import CompressConfig
    from easier_export.stages import fold_only

    cfg = CompressConfig(fold=fold, target=values.target(target), simplify=not no_simplify,
                         tolerances=verify.tolerances(), threads=threads, opset=opset)
    done = fold_only(ready(load(model)), model.model, out, cfg)
    tidy(out)
    applied = sum(r.applied for r in done.records)
    console.print(f"{applied} of {len(done.records)} folds applied; wrote {out}/folded.pt2, {out}/fold_plan.json")
    if not done.verify["passed"]:
        raise VerificationError(f"folded ONNX does not reproduce the model: {done.verify['reason']}")


VerifyData = typed(Path | None, "verify on these val/ images instead of random inputs", DATA)


@grouped(model=options_of(ModelOptions, *IMAGE_FILE, "mean", "std"), verify=options_of(VerifyOptions))
def export(model: ModelOptions, out: typed(Path, "ONNX file", None) = Path("model.onnx"),
           data: VerifyData = None, skip_bad_images: SkipBadImages = False, verify: VerifyOptions = VerifyOptions(),
           no_simplify: NoSimplify = False, opset: Opset = MIN_OPSET) -> None:
    """Export any loadable model to one verified ONNX file (no compression)."""
    from easier_export.pipeline import (
        CompressConfig,
        ensure_writable_file,
        export_and_verify,
        onnx_metadata,
    )

    ensure_writable_file(out, "--out")
    cfg = CompressConfig(simplify=not no_simplify, tolerances=verify.tolerances(), opset=opset)
    loaded = load(model)
    if data is not None:
        loaders = with_data(loaded, verification_data(data, skip_bad_images), trains=False)
        inputs = loaded.task.verification_inputs(loaders, cfg.verify_batches)
    else:
        inputs = ready(loaded).task.dummy_inputs(loaded.input_size)
    exported = export_and_verify(loaded.model, loaded.model, inputs[0][:1], out, inputs,
                                 onnx_metadata(loaded), cfg)
    if not exported["verify"]["passed"]:
        raise VerificationError(f"{out} does not reproduce the model: {exported['verify']['reason']} "
                                f"(kept as {exported['path']})")
    console.print(f"wrote {out} ({exported['size_bytes'] / 1e6:.2f} MB, {exported['exporter']} exporter)")


Models = Annotated[list[Path], typer.Argument(metavar="MODELS", show_default=False,
                                              help="ONNX files to compare (the first is the baseline)")]


def bench(models: Models, bench_devices: BenchDevices = "cpu", bench_batches: BenchBatches = "1,8",
          bench_seconds: BenchSeconds = 2.0, threads: Threads = None, json_out: JsonOut = None) -> None:
    """Latency of ONNX models with onnxruntime: p50/p90, interleaved, speed-up vs the first."""
    from easier_export.core.io import save_json
    from easier_export.pipeline import ensure_writable_file
    from easier_export.ship.bench import bench as run_bench
    from easier_export.ship.onnx_inputs import common_input, distinct, labels
    from easier_export.ship.tables import bench_table

    if json_out is not None:
        ensure_writable_file(json_out, "--json")
    devices, batches = values.bench_devices(bench_devices), values.ints(bench_batches, "bench-batches")
    models, repeated = distinct(models)
    if repeated:
        console.print(f"[yellow]note:[/] {', '.join(map(str, repeated))}: the same file given more than once, "
                      "timed once", soft_wrap=True)
    shape = common_input(models)
    named = labels(models)
    rows = run_bench(named, shape, devices, batches, threads, max_seconds=bench_seconds)
    console.print(bench_table(rows, baseline=next(iter(named))))
    for r in rows:
        if "tokens_per_s" in r:  # language models, timed at the sequence length of their input shape
            console.print(f"{r['label']} ({r['device']}, batch {r['batch']}, sequence {shape[0]}): "
                          f"{r['tokens_per_s']:,.0f} tokens/s")
    if json_out is not None:
        save_json(rows, json_out)
