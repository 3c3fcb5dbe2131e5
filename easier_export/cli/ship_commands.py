"""The commands that fold, export and time a model without the loop: fold, export, bench."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from easier_export.core.console import console
from easier_export.core.errors import UserError, VerificationError
from easier_export.core.quantize import FP32
from easier_export.loop.config import LoopConfig
from easier_export.ship.export import MIN_OPSET

from . import values
from .groups import grouped, loop_options, options_of
from .loading import load, ready, verification_data, with_data
from .options import (
    DATA,
    BenchBatches,
    BenchDevices,
    BenchSeconds,
    CalibBatches,
    CalibMethod,
    Fold,
    JsonOut,
    ModelOptions,
    NoSimplify,
    Opset,
    Out,
    Precision,
    SkipBadImages,
    Target,
    Threads,
    VerifyOptions,
    typed,
)
from .runs import tidy

if TYPE_CHECKING:
    from torch import nn

    from easier_export.load.data import Loaders
    from easier_export.load.models import LoadedModel
    from easier_export.pipeline import CompressConfig

IMAGE_FILE = ("model", "weights", "arch", "num_classes", "trust_pickle", "input_size")  # no preprocessing options


VerifyData = typed(Path | None, "verify on these val/ images instead of random inputs (--precision: calibrate on "
                                "train/, judge on val/)", DATA)
BUDGET = loop_options("max_drop", "max_ppl_increase", "confidence")  # what a conversion is judged against


@grouped(model=options_of(ModelOptions, *IMAGE_FILE), verify=options_of(VerifyOptions), loop=BUDGET)
def fold(model: ModelOptions, out: Out = Path("runs/fold"), fold: Fold = "auto", target: Target = "cpu",
         data: VerifyData = None, skip_bad_images: SkipBadImages = False, verify: VerifyOptions = VerifyOptions(),
         no_simplify: NoSimplify = False, opset: Opset = MIN_OPSET, precision: Precision = "fp32",
         calib_batches: CalibBatches = 8, calib_method: CalibMethod = "minmax", loop: LoopConfig = LoopConfig(),
         threads: Threads = None) -> None:
    """Fold a (linearized) model: writes folded.pt2, model.onnx (verified) and fold_plan.json."""
    from easier_export.pipeline import CompressConfig
    from easier_export.stages import fold_only

    need_data(precision, data)
    cfg = CompressConfig(fold=fold, target=values.target(target), simplify=not no_simplify,
                         tolerances=verify.tolerances(), threads=threads, opset=opset, precision=precision,
                         calib_batches=calib_batches, calib_method=calib_method)
    loaded = load(model)
    loaders, inputs = _verification(loaded, data, skip_bad_images, cfg)
    done = fold_only(loaded, model.model, out, cfg, inputs)
    tidy(out)
    applied = sum(r.applied for r in done.records)
    console.print(f"{applied} of {len(done.records)} folds applied; wrote {out}/folded.pt2, {out}/fold_plan.json")
    if not done.verify["passed"]:
        raise VerificationError(f"folded ONNX does not reproduce the model: {done.verify['reason']}")
    if precision != FP32:
        _convert(out / "model.onnx", done.export, done.model, loaded, loaders, inputs, loop, cfg)


def need_data(precision: str, data: Path | None) -> None:
    """A conversion is calibrated and judged on DATA: refused before any work without it."""
    if precision != FP32 and data is None:
        raise UserError(f"--precision {precision} needs --data: INT8 ranges are calibrated on its train/ split and "
                        "every conversion is judged against the FP32 file on its val/ split")


def _verification(loaded: LoadedModel, data: Path | None, skip_bad_images: bool,
                  cfg: CompressConfig) -> tuple[Loaders | None, list]:
    """DATA's loaders and its first val batches to verify on; without DATA, seeded stand-ins."""
    if data is None:
        return None, ready(loaded).task.dummy_inputs(loaded.input_size)
    loaders = with_data(loaded, verification_data(data, skip_bad_images), trains=False)
    return loaders, loaded.task.verification_inputs(loaders, cfg.verify_batches)


@grouped(model=options_of(ModelOptions, *IMAGE_FILE, "mean", "std"), verify=options_of(VerifyOptions),
         loop=BUDGET)
def export(model: ModelOptions, out: typed(Path, "ONNX file", None) = Path("model.onnx"),
           data: VerifyData = None, skip_bad_images: SkipBadImages = False, verify: VerifyOptions = VerifyOptions(),
           no_simplify: NoSimplify = False, opset: Opset = MIN_OPSET, precision: Precision = "fp32",
           calib_batches: CalibBatches = 8, calib_method: CalibMethod = "minmax", loop: LoopConfig = LoopConfig(),
           target: Target = "cpu", threads: Threads = None) -> None:
    """Export any loadable model to one verified ONNX file (no compression), in FP32 or converted."""
    from easier_export.pipeline import (
        CompressConfig,
        ensure_writable_file,
        export_and_verify,
        onnx_metadata,
    )

    ensure_writable_file(out, "--out")
    need_data(precision, data)
    cfg = CompressConfig(simplify=not no_simplify, tolerances=verify.tolerances(), opset=opset, precision=precision,
                         calib_batches=calib_batches, calib_method=calib_method, target=values.target(target),
                         threads=threads)
    loaded = load(model)
    loaders, inputs = _verification(loaded, data, skip_bad_images, cfg)
    exported = export_and_verify(loaded.model, loaded.model, inputs[0][:1], out, inputs,
                                 onnx_metadata(loaded), cfg)
    if not exported["verify"]["passed"]:
        raise VerificationError(f"{out} does not reproduce the model: {exported['verify']['reason']} "
                                f"(kept as {exported['path']})")
    console.print(f"wrote {out} ({exported['size_bytes'] / 1e6:.2f} MB, {exported['exporter']} exporter)")
    if precision != FP32:
        _convert(out, exported, loaded.model, loaded, loaders, inputs, loop, cfg)


def _convert(out: Path, exported: dict, model: nn.Module, loaded: LoadedModel, loaders: Loaders, inputs: list,
             loop: LoopConfig, cfg: CompressConfig) -> None:
    """The verified FP32 file converted as ``compress`` converts what it ships: ``out`` then holds the chosen
    precision, ``OUT.fp32.onnx`` the FP32 file when another one was chosen."""
    import dataclasses

    from easier_export.deploy import Subject, deploy, racer, settle
    from easier_export.pipeline import task_of

    subject = Subject(out, model)
    timing = racer(tuple(inputs[0].shape[1:]), cfg.target, 1, cfg.threads)
    done = deploy(cfg.precision, subject, subject, inputs, loaders, dataclasses.replace(loop, holdout=0.0),
                  task_of(loaded), (cfg.calib_batches, cfg.calib_method), timing, cfg.target, out.parent,
                  quantize_original=False)
    shipped = settle(done, out, exported, out.with_name(f"{out.stem}.fp32.onnx"))
    for tried in done.choice.tried:  # what was not chosen was measured and said; only OUT (and its FP32) stay
        if tried is not done.choice.chosen:
            Path(tried.export["path"]).unlink(missing_ok=True)
    console.print(f"{out}: {done.choice.shipped.upper()} ({done.choice.reason})", soft_wrap=True)
    if done.choice.chosen is not None:
        console.print(f"kept the FP32 file as {exported['path']}; {shipped['size_bytes'] / 1e6:.2f} MB")


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
