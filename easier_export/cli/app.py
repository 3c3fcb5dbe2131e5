"""The `easier-export` command line: thin wrappers over the Python API, one-line errors, exit codes.

Exit codes: 0 ok, 2 usage or bad input, 3 ONNX verification failed, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM); both keep the state and remove temp files.

One name per concept in every command (``--fold``, ``--bench-devices``, ``--bench-batches``, ``--bench-seconds``;
``--device`` is always the training device). Older spellings still parse as hidden aliases (``_aliases``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from easier_export.core.console import console
from easier_export.core.errors import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Interrupted,
    Terminated,
    UserError,
    VerificationError,
)
from easier_export.core.ort import DEVICES
from easier_export.core.signals import sigterm_as_interrupt
from easier_export.fold import MODES
from easier_export.loop.config import LoopConfig, field_checks
from easier_export.loop.state import STATE_FILE
from easier_export.ship.export import MAX_OPSET, MIN_OPSET

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Make trained vision networks shallower (EASIER) and ship them as verified, fast ONNX.")


def _aliases(**old_to_new: str) -> dict[str, Any]:
    """context_settings that parse old option names as the new ones without listing them in --help (the parser
    normalises every option name it sees, without its dashes, through this map)."""
    return {"token_normalize_func": lambda name: old_to_new.get(name, name)}


def _finite(value: float | None) -> float | None:
    """A float option's callback: ``inf`` or ``nan`` parse as floats but mean nothing here (``inf`` seconds never
    end, a ``nan`` tolerance passes or fails everything)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _real(help: str, **bounds: float) -> Any:
    """A float option: finite, within ``bounds`` (``min``/``max``)."""
    return typer.Option(help=help, callback=_finite, **bounds)


MAX_THREADS = (os.cpu_count() or 1) * 4  # more only oversubscribes the cores (thousands of threads thrash them)


def _choice(values: tuple[str, ...]) -> Any:
    """A choice type from the one tuple that lists the values (the parser refuses others with exit 2)."""
    return Literal[values]  # type: ignore[valid-type]


ModelArg = Annotated[str, typer.Argument(help="timm:NAME, torchvision:NAME, builtin name, state dict, .pt2, "
                                              "linearized.pt, or pickled module (with --trust-pickle)")]
Weights = Annotated[Path | None, typer.Option(help="state dict for a named architecture")]
Arch = Annotated[str | None, typer.Option(help="architecture of a state-dict MODEL file, e.g. timm:resnet18")]
NumClasses = Annotated[int | None, typer.Option(min=2, help="classes to predict: a checkpoint with another head "
                                                            "size keeps its body and gets a fresh head")]
TrustPickle = Annotated[bool, typer.Option(help="allow loading a pickled nn.Module (runs code from the file)")]
Data = Annotated[Path, typer.Option(help="ImageFolder root with train/ and val/")]
InputSize = Annotated[str | None, typer.Option(help="H, HxW or CxHxW (default: the model's config, else the "
                                                    "size of the images in DATA)")]
Mean = Annotated[str | None, typer.Option(help="normalisation mean, e.g. 0.49,0.48,0.45")]
Std = Annotated[str | None, typer.Option(help="normalisation std (positive)")]
BatchSize = Annotated[int, typer.Option(min=1, help="batch size for finetuning and entropy passes")]
Workers = Annotated[int, typer.Option(min=0, help="data-loading worker processes")]
SkipBadImages = Annotated[bool, typer.Option(help="leave unreadable images in DATA out (counted in the report) "
                                                  "instead of stopping")]
Out = Annotated[Path, typer.Option(help="output directory")]
Device = Annotated[str, typer.Option(help="training device: auto, cpu or cuda[:N]")]
Fold = Annotated[_choice(MODES), typer.Option(help="auto (only merges measured faster), all, or none")]
Target = Annotated[_choice(DEVICES), typer.Option(help="device the fold planner measures on")]
BenchDevices = Annotated[str, typer.Option(help=f"benchmark devices, comma list of {','.join(DEVICES)}")]
BenchBatches = Annotated[str, typer.Option(help="benchmark batch sizes, comma list")]
BenchSeconds = Annotated[float, _real("benchmark time budget per model and setting", min=0.0)]
Threads = Annotated[int | None, typer.Option(min=1, max=MAX_THREADS, help="onnxruntime intra-op threads (default: "
                                                                         "physical cores)")]
CropPct = Annotated[float | None, _real(
    "evaluation centre crop as a share of the resized image, e.g. 0.875 (default: the model's config, applied "
    "only to images larger than the input size; images of the input size are used as they are)", min=0.05,
    max=1.0)]
LatencyTableFile = Annotated[Path | None, typer.Option(
    help="the fold planner's timings: read from and added to this JSON file, so that runs with the same file make "
         "the same latency decisions (default: OUT/latency_table.json, per run)")]
Atol = Annotated[float, _real("verification absolute tolerance", min=0.0)]
Rtol = Annotated[float, _real("verification tolerance relative to each element", min=0.0)]
ScaleTol = Annotated[float, _real("verification tolerance relative to the output's scale (max |reference|)", min=0.0)]
MinTop1 = Annotated[float, _real("minimum top-1 agreement (a fraction)", min=0.0, max=1.0)]
NoSimplify = Annotated[bool, typer.Option("--no-simplify", help="skip onnxsim")]
Opset = Annotated[int, typer.Option(min=MIN_OPSET, max=MAX_OPSET, help="ONNX opset of the file: 20 and newer write "
                                    "GELU as one Gelu op, 23 attention as one Attention op (faster in onnxruntime; "
                                    "the runtime must support the opset)")]


def _version(value: bool) -> None:
    if value:
        from easier_export import __version__

        console.print(f"easier-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                                help="print the version and exit")] = False) -> None:
    """Make trained vision networks shallower (EASIER) and ship them as verified, fast ONNX."""


# ---------------------------------------------------------------------------------------------- the loop's options


def loop_options(*only: str, exclude: tuple[str, ...] = (), **defaults: Any) -> Callable[[Callable], Callable]:
    """Give a command one option per LoopConfig field (``only`` those, when named; not the ``exclude``d ones) and
    call it with the LoopConfig they make, as ``loop``; ``defaults`` overrides a field's default for this command.

    Help, choices and bounds live in the fields' metadata (``linearize.option``), so a new LoopConfig field
    reaches `compress` and `linearize` without touching this module. A ``tuple[str, ...]`` field is a comma list.
    """
    hints = typing.get_type_hints(LoopConfig)
    fields = [f for f in dataclasses.fields(LoopConfig) if (not only or f.name in only) and f.name not in exclude]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "loop"]
        params += [_loop_option(f, hints[f.name], defaults.get(f.name, f.default)) for f in fields]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {f.name: _loop_value(f, hints[f.name], kwargs.pop(f.name)) for f in fields}
            return command(loop=LoopConfig(**values), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _loop_option(f: dataclasses.Field, hint: Any, default: Any) -> inspect.Parameter:
    meta = f.metadata
    help_, choices, annotation, callback = meta["help"], meta.get("choices"), hint, _field_callback(meta)
    if hint == tuple[str, ...]:  # checked item by item in _loop_value
        callback = None
        annotation, default = str, ",".join(default)
        help_ += f", comma list of {','.join(choices)}" if choices else ", comma list"
    elif choices:
        annotation = _choice(tuple(choices))
    if meta.get("positive"):
        help_ += " (positive)"
    option = typer.Option(help=help_, min=meta.get("min"), max=meta.get("max"), callback=callback)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, option])


def _field_callback(meta: Mapping[str, Any]) -> Callable[[Any], Any]:
    """The field's own checks (``linearize.field_checks``) as the parser's, so a bad value is a usage error that
    points at --help."""
    def check(value: Any) -> Any:
        failed = [why for ok, why in field_checks(meta, value) if not ok]
        if failed:
            raise typer.BadParameter(failed[0])
        return value

    return check


def _loop_value(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    if hint != tuple[str, ...]:
        return value
    items = tuple(sorted(v.strip() for v in value.split(",")))  # sorted: the resume fingerprint ignores order
    unknown = sorted(set(items) - set(f.metadata.get("choices", items)))
    if unknown:
        raise UserError(f"--{f.name.replace('_', '-')} takes {','.join(f.metadata['choices'])}, "
                        f"not {','.join(unknown)}")
    return items


# ---------------------------------------------------------------------------------------------- shared steps


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{what} takes comma-separated numbers, got '{text}'") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{what} takes comma-separated integers, got '{text}'") from None
    if min(values) < 1:
        raise UserError(f"--{what} takes positive integers, got '{text}'")
    return values


def _size(text: str | None) -> tuple[int, ...] | None:
    """``H``, ``HxW`` or ``CxHxW`` (timm's input_size is (C, H, W))."""
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if not 1 <= len(size) <= 3 or min(size) < 1:
        raise UserError(f"--input-size takes H, HxW or CxHxW with positive integers, got '{text}'")
    return size * 2 if len(size) == 1 else size


def _usable(devices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A CUDA request without a usable GPU is a usage error everywhere (no silently empty result)."""
    from easier_export.core.ort import cuda_usable

    unknown = sorted(set(devices) - set(DEVICES))
    if unknown:
        raise UserError(f"--{what} takes {','.join(DEVICES)}, not {','.join(unknown)}")
    if "cuda" in devices and not cuda_usable():
        raise UserError(f"--{what} cuda needs a usable GPU (torch.cuda and onnxruntime's CUDA provider)")
    return devices


def _devices(text: str) -> tuple[str, ...]:
    return _usable(tuple(d.strip() for d in text.split(",")), "bench-devices")


def _load(model: str, weights: Path | None, arch: str | None, num_classes: int | None, trust_pickle: bool,
          input_size: str | None, mean: str | None = None, std: str | None = None, crop_pct: float | None = None):
    from easier_export.load.models import load_model
    from easier_export.load.task import ImageTask

    loaded = load_model(model, num_classes, weights, arch, trust_pickle, _size(input_size))
    task = loaded.task
    if not isinstance(task, ImageTask):
        _text_options(loaded.source, num_classes=num_classes, weights=weights, arch=arch, mean=mean, std=std)
        if input_size is not None and "x" in input_size.lower():
            raise UserError(f"--input-size {input_size}: a text model's input size is one number, its sequence "
                            "length")
    for note in loaded.notes:
        console.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
    if not isinstance(task, ImageTask):
        return loaded
    task.normalization_given = mean is not None or std is not None
    if crop_pct is not None:
        task.crop_pct, task.crop_asked = crop_pct, True
    task.mean = _floats(mean, "mean") or task.mean
    task.std = _floats(std, "std") or task.std
    if len(task.mean) != loaded.input_size[0] or len(task.std) != loaded.input_size[0]:
        raise UserError(f"--mean/--std need {loaded.input_size[0]} values (one per input channel)")
    if min(task.std) <= 0:
        raise UserError(f"--std values must be positive, got {','.join(map(str, task.std))}")
    return loaded


def _text_options(source: str, **given: object) -> None:
    """A Hugging Face directory brings its own head, weights and token input: options for image models would be
    silently ignored, so they are refused."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    if named:
        raise UserError(f"{', '.join(named)}: not for a Hugging Face directory ({source} brings its own head, "
                        "weights and token-id input)")


def _with_data(loaded, data: Path, batch_size: int, workers: int, skip_bad_images: bool, seed: int = 0,
               trains: bool = True):
    """Open DATA (every image checked), settle the input size, prove the model runs at it (and, when it
    ``trains`` on batches of one, that it can), then make loaders. A text model reads ``train.txt``/``val.txt`` in
    blocks of its sequence length (``--input-size``)."""
    loaders = _open_data(loaded, data, batch_size, workers, skip_bad_images, seed)
    if trains and min(batch_size, len(loaders.train.dataset)) == 1:
        from easier_export.loop.train import check_batch_of_one

        check_batch_of_one(loaded.model, loaders.train.dataset[0][0][None])
    return loaders


def _open_data(loaded, data: Path, batch_size: int, workers: int, skip_bad_images: bool, seed: int):
    from easier_export.load.data import open_image_folder
    from easier_export.load.task import TextTask
    from easier_export.normalization import check_normalization
    from easier_export.pipeline import dry_run

    if isinstance(loaded.task, TextTask):
        from easier_export.load.text import text_loaders

        dry_run(loaded.model, loaded.input_size, loaded.task.dtype)
        return text_loaders(data, loaded.task.spec, loaded.input_size[0], batch_size, seed)

    folder = open_image_folder(data, loaded.num_classes, skip_bad_images, loaded.rehead_advice)
    if folder.skipped:
        console.print(f"[yellow]warning:[/] left out {len(folder.skipped)} unreadable image(s), e.g. "
                      f"{folder.skipped[0]}", soft_wrap=True)
    if not loaded.size_declared:
        if folder.common_size is None:
            raise UserError(f"{loaded.source} declares no input size and the images in {data} differ in size: "
                            "pass --input-size")
        loaded.input_size = (loaded.input_size[0], *folder.common_size)
        console.print(f"[yellow]note:[/] {loaded.source} declares no input size: using "
                      f"{'x'.join(map(str, folder.common_size))}, the size of every image in {data} "
                      "(--input-size overrides)", soft_wrap=True)
    dry_run(loaded.model, loaded.input_size)
    if not loaded.task.normalization_given:
        check_normalization(loaded, folder, batch_size, seed)
    return loaded.task.loaders(folder, loaded.input_size, batch_size, workers, seed)


def _ready(loaded):
    """A model used without DATA: prove it runs at its input size before any work."""
    from easier_export.pipeline import dry_run

    dry_run(loaded.model, loaded.input_size, loaded.task.dtype)
    return loaded


@contextlib.contextmanager
def _no_empty_out(out: Path) -> Iterator[None]:
    """Bad input found once ``out`` was made (an unknown --device, no activation of --rectifiers, an untraceable
    model) leaves no empty ``out`` behind."""
    existed = out.exists()
    try:
        yield
    except UserError:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


@contextlib.contextmanager
def _resumable(out: Path) -> Iterator[None]:
    """Ctrl-C or SIGTERM in a resumable command: exit 130 or 143 saying how many rounds ``out``'s state file
    keeps. A state file that cannot be read is refused before any work."""
    if _rounds_kept(out / STATE_FILE) is None:
        raise UserError(f"{out / STATE_FILE} is unreadable; delete it to start over")
    try:
        yield
    except KeyboardInterrupt as e:
        raise Interrupted(_rounds_kept(out / STATE_FILE), isinstance(e, Terminated)) from None


def _rounds_kept(path: Path) -> tuple[int, int] | None:
    """(rounds done, rounds kept within budget) in a state file."""
    import torch

    if not path.exists():
        return 0, 0
    try:
        history = torch.load(path, map_location="cpu", weights_only=True)["history"]
        return len(history), sum(bool(r["within_budget"]) for r in history)
    except Exception:  # absent, or interrupted while written: nothing can be said about it
        return None


def _tidy(out: Path) -> None:
    """A successful run leaves no temp files behind, also none of an earlier run killed without cleanup."""
    from easier_export.core.dist import is_main_process
    from easier_export.core.io import remove_stale_temps

    if is_main_process():
        remove_stale_temps(out)


class _distributed:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE set), tear it down after."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> None:
        import os

        import torch.distributed as dist

        self.owner = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
        if self.owner:
            import torch

            backend = "nccl" if torch.cuda.is_available() and self.device != "cpu" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        if self.owner:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- commands


@app.command()
@loop_options(select="latency")
def compress(model: ModelArg, data: Data, loop: LoopConfig, out: Out = Path("runs/compress"),
             weights: Weights = None, arch: Arch = None, num_classes: NumClasses = None,
             trust_pickle: TrustPickle = False, input_size: InputSize = None, mean: Mean = None, std: Std = None,
             crop_pct: CropPct = None,
             batch_size: BatchSize = 128, workers: Workers = 2, skip_bad_images: SkipBadImages = False,
             device: Device = "auto", fold: Fold = "auto", target: Target = "cpu", bench_devices: BenchDevices = "cpu",
             bench_batches: BenchBatches = "1,8", bench_seconds: BenchSeconds = 2.0, threads: Threads = None,
             atol: Atol = 1e-4, rtol: Rtol = 1e-3, scale_tol: ScaleTol = 1e-4, min_top1: MinTop1 = 0.99,
             no_simplify: NoSimplify = False, opset: Opset = MIN_OPSET,
             latency_table: LatencyTableFile = None) -> None:
    """Run the whole pipeline: entropy → linearize/finetune rounds → fold → ONNX → verify → bench → report."""
    from easier_export.pipeline import CompressConfig, ensure_writable_file
    from easier_export.pipeline import compress as run

    cfg = CompressConfig(loop, fold, _usable((target,), "target")[0], device, not no_simplify, atol=atol,
                         rtol=rtol, scale_tol=scale_tol, min_top1=min_top1, bench_devices=_devices(bench_devices),
                         bench_batches=_ints(bench_batches, "bench-batches"), threads=threads,
                         bench_seconds=bench_seconds, opset=opset, latency_table=latency_table)
    if latency_table is not None:
        ensure_writable_file(latency_table, "--latency-table")
    with _distributed(device), _no_empty_out(out), _resumable(out):
        loaded = _load(model, weights, arch, num_classes, trust_pickle, input_size, mean, std, crop_pct)
        run(loaded, _with_data(loaded, data, batch_size, workers, skip_bad_images, loop.seed), out, cfg)
    _tidy(out)
    console.print(f"outputs in [bold]{out}[/]")


@app.command()
@loop_options("rectifiers", "entropy_batches", "entropy_mode", "threshold")
def entropy(model: ModelArg, data: Data, loop: LoopConfig,
            out: Annotated[Path, typer.Option(help="JSON file")] = Path("entropy.json"),
            plot: Annotated[Path | None, typer.Option(help="also draw the per-site entropy to this PNG")] = None,
            weights: Weights = None, arch: Arch = None, num_classes: NumClasses = None,
            trust_pickle: TrustPickle = False, input_size: InputSize = None, mean: Mean = None, std: Std = None,
            crop_pct: CropPct = None,
            batch_size: BatchSize = 128, workers: Workers = 2, skip_bad_images: SkipBadImages = False,
            device: Device = "auto", target: Target = "cpu", threads: Threads = None,
            groups: Annotated[bool, typer.Option(help="also time and list the fold groups: activations whose "
                                                      "joint removal completes a merge")] = True) -> None:
    """Measure the per-unit binary entropy of every activation call site and print the table (and fold groups)."""
    from rich.table import Table

    from easier_export.core.console import progress
    from easier_export.core.dist import resolve_device
    from easier_export.core.io import save_json
    from easier_export.loop.entropy import measure
    from easier_export.pipeline import ensure_writable_file, task_of
    from easier_export.ship.plots import plot_entropy
    from easier_export.trace.sites import find_call_sites
    from easier_export.trace.tracing import trace

    ensure_writable_file(out, "--out")
    if plot is not None:
        ensure_writable_file(plot, "--plot")
    target = _usable((target,), "target")[0]
    loaded = _load(model, weights, arch, num_classes, trust_pickle, input_size, mean, std, crop_pct)
    loaders = _with_data(loaded, data, batch_size, workers, skip_bad_images, trains=loop.entropy_mode == "train")
    dev = resolve_device(device)
    gm = trace(loaded.model).to(dev)
    sites = find_call_sites(gm, loop.rectifiers)
    batches = min(loop.entropy_batches or len(loaders.train), len(loaders.train))
    with progress("entropy", batches) as advance:
        stats = measure(gm, sites, loaders.train, dev, loop.entropy_batches, loop.entropy_mode == "train",
                        loop.threshold, advance, task_of(loaded).pad_id)
    rows = [s.to_dict() for s in stats.values()]
    table = Table("#", "call site", "op", "units", "entropy (bits)", "mean p_on", title=f"{model}: entropy")
    for i, r in enumerate(rows):
        table.add_row(str(i), r["name"], r["op"], str(r["units"]), f"{r['entropy']:.4f}", f"{r['mean_p_on']:.3f}")
    console.print(table)
    found = _fold_groups(gm, loop, _random_batches(loaded)[0][:1], stats, target, threads) if groups else []
    save_json({"model": model, "mode": loop.entropy_mode, "sites": rows, "groups": found}, out)
    if plot is not None:
        plot_entropy([{**r, "removed_round": None} for r in rows], plot)
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


@app.command()
@loop_options(exclude=("target_speedup",))  # measuring the shipped model's speed-up needs `compress`
def linearize(model: ModelArg, data: Data, loop: LoopConfig, out: Out = Path("runs/linearize"),
              weights: Weights = None, arch: Arch = None, num_classes: NumClasses = None,
              trust_pickle: TrustPickle = False, input_size: InputSize = None, mean: Mean = None, std: Std = None,
              crop_pct: CropPct = None,
              batch_size: BatchSize = 128, workers: Workers = 2, skip_bad_images: SkipBadImages = False,
              device: Device = "auto", target: Target = "cpu", threads: Threads = None) -> None:
    """Only the EASIER loop: writes linearized.pt (resumable; rerun to continue)."""
    from easier_export.core.dist import is_main_process, resolve_device
    from easier_export.fold.planner import LatencyTable
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

    target = _usable((target,), "target")[0]
    with _distributed(device), _no_empty_out(out), _resumable(out):
        loaded = _load(model, weights, arch, num_classes, trust_pickle, input_size, mean, std, crop_pct)
        check_continuation(loaded, loop.relocates)
        loaders = _with_data(loaded, data, batch_size, workers, skip_bad_images, loop.seed)
        dev = resolve_device(device)
        say_preprocessing(loaders)
        table = LatencyTable(target, threads, ensure_writable(out) / "latency_table.json")
        gm = trace(loaded.model)
        result = run_loop(gm, loaded.source, loaders.train, loaders.val, loop, dev, out, table, task=task_of(loaded))
        if is_main_process():
            result = latest_within_holdout(gm.cpu().eval(), result, out, loop, task_of(loaded))
            save_linearized(out / "linearized.pt", loaded, result, loop.relocates)
            _tidy(out)
            console.print(f"removed {len(result.removed)} activations, top-1 {result.base_top1:.2f}% → "
                          f"{result.final_top1:.2f}%; wrote {out / 'linearized.pt'}")


@app.command(context_settings=_aliases(mode="fold"))
def fold(model: ModelArg, out: Out = Path("runs/fold"),
         linearized: Annotated[Path | None, typer.Option(hidden=True, help="old spelling: replaces MODEL")] = None,
         weights: Weights = None, arch: Arch = None, num_classes: NumClasses = None,
         trust_pickle: TrustPickle = False, input_size: InputSize = None, fold: Fold = "auto",
         target: Target = "cpu", threads: Threads = None, atol: Atol = 1e-4, rtol: Rtol = 1e-3,
         scale_tol: ScaleTol = 1e-4, min_top1: MinTop1 = 0.99, no_simplify: NoSimplify = False,
         opset: Opset = MIN_OPSET) -> None:
    """Fold a (linearized) model: writes folded.pt2, model.onnx (verified) and fold_plan.json."""
    import torch

    from easier_export.core.io import atomic_write, save_json
    from easier_export.fold import fold_model
    from easier_export.pipeline import CompressConfig, ensure_writable, export_and_verify, onnx_metadata
    from easier_export.ship.export import dynamic_dims
    from easier_export.trace.tracing import trace

    source = str(linearized) if linearized is not None else model
    cfg = CompressConfig(fold=fold, target=_usable((target,), "target")[0], simplify=not no_simplify, atol=atol,
                         rtol=rtol, scale_tol=scale_tol, min_top1=min_top1, threads=threads, opset=opset)
    loaded = _ready(_load(source, weights, arch, num_classes, trust_pickle, input_size))
    gm = trace(loaded.model)
    ensure_writable(out)
    inputs = _random_batches(loaded)
    example = inputs[0][:1]
    folded, records = fold_model(gm, example, mode=cfg.fold, target=cfg.target, cache=out / "latency_table.json",
                                 threads=threads)
    save_json([r.to_dict() for r in records], out / "fold_plan.json")
    program = torch.export.export(folded, (example.expand(2, *example.shape[1:]),),
                                  dynamic_shapes=(dynamic_dims(example),))
    atomic_write(out / "folded.pt2", lambda p: _save_program(program, p))
    exported = export_and_verify(folded, gm, example, out / "model.onnx", inputs,
                                 {**onnx_metadata(loaded), "source": source}, cfg)
    applied = sum(r.applied for r in records)
    _tidy(out)
    console.print(f"{applied} of {len(records)} folds applied; wrote {out}/folded.pt2, {out}/fold_plan.json")
    if not exported["verify"]["passed"]:
        raise VerificationError(f"folded ONNX does not reproduce the model: {exported['verify']['reason']}")


def _save_program(program, path: Path) -> None:
    """``torch.export.save`` through an open file: given a path, torch warns about the temp name's suffix."""
    import torch

    with open(path, "wb") as f:
        torch.export.save(program, f)


@app.command()
def export(model: ModelArg, out: Annotated[Path, typer.Option(help="ONNX file")] = Path("model.onnx"),
           weights: Weights = None, arch: Arch = None, num_classes: NumClasses = None,
           trust_pickle: TrustPickle = False, input_size: InputSize = None, mean: Mean = None, std: Std = None,
           data: Annotated[Path | None, typer.Option(help="verify on these val/ images instead of random "
                                                         "inputs")] = None,
           skip_bad_images: SkipBadImages = False, atol: Atol = 1e-4, rtol: Rtol = 1e-3,
           scale_tol: ScaleTol = 1e-4, min_top1: MinTop1 = 0.99, no_simplify: NoSimplify = False,
           opset: Opset = MIN_OPSET) -> None:
    """Export any loadable model to one verified ONNX file (no compression)."""
    from easier_export.pipeline import (
        CompressConfig,
        ensure_writable_file,
        export_and_verify,
        onnx_metadata,
    )

    ensure_writable_file(out, "--out")
    cfg = CompressConfig(simplify=not no_simplify, atol=atol, rtol=rtol, scale_tol=scale_tol, min_top1=min_top1,
                         opset=opset)
    loaded = _load(model, weights, arch, num_classes, trust_pickle, input_size, mean, std)
    if data is not None:
        loaders = _with_data(loaded, data, 16, 0, skip_bad_images, trains=False)
        inputs = loaded.task.verification_inputs(loaders, cfg.verify_batches)
    else:
        inputs = _random_batches(_ready(loaded))
    exported = export_and_verify(loaded.model, loaded.model, inputs[0][:1], out, inputs,
                                 onnx_metadata(loaded), cfg)
    if not exported["verify"]["passed"]:
        raise VerificationError(f"{out} does not reproduce the model: {exported['verify']['reason']} "
                                f"(kept as {exported['path']})")
    console.print(f"wrote {out} ({exported['size_bytes'] / 1e6:.2f} MB, {exported['exporter']} exporter)")


@app.command(context_settings=_aliases(device="bench-devices", batch="bench-batches", seconds="bench-seconds"))
def bench(models: Annotated[list[Path], typer.Argument(help="ONNX files to compare (the first is the baseline)")],
          bench_devices: BenchDevices = "cpu", bench_batches: BenchBatches = "1,8", threads: Threads = None,
          bench_seconds: BenchSeconds = 2.0,
          json_out: Annotated[Path | None, typer.Option("--json", help="also write the rows here")] = None) -> None:
    """Latency of ONNX models with onnxruntime: p50/p90, interleaved, speed-up vs the first."""
    from easier_export.core.io import save_json
    from easier_export.pipeline import ensure_writable_file
    from easier_export.ship.bench import bench as run_bench
    from easier_export.ship.tables import bench_table

    if json_out is not None:
        ensure_writable_file(json_out, "--json")
    devices, batches = _devices(bench_devices), _ints(bench_batches, "bench-batches")
    from easier_export.core.io import resolved

    unique: dict[Path, Path] = {}
    for path in models:
        unique.setdefault(resolved(path), path)
    if len(unique) < len(models):
        twice = [str(p) for key, p in unique.items() if sum(resolved(q) == key for q in models) > 1]
        console.print(f"[yellow]note:[/] {', '.join(twice)}: the same file given more than once, timed once",
                      soft_wrap=True)
        models = list(unique.values())
    io = {path: _onnx_shapes(path) for path in models}
    shapes = {path: shape for path, (shape, _) in io.items()}
    first = models[0]
    for path, (shape, outputs) in io.items():
        if shape != shapes[first]:
            raise UserError(f"{path} takes {_dims(shape)} inputs but {first} takes {_dims(shapes[first])}: only "
                            "models of one input shape compare")
        if outputs != io[first][1]:
            raise UserError(f"{path} outputs {_dims(outputs)} per input but {first} outputs {_dims(io[first][1])}: "
                            "only models computing the same thing compare")
    labels = {path.stem if path.stem not in {p.stem for p in models if p != path} else str(path): path
              for path in models}
    rows = run_bench(labels, shapes[first], devices, batches, threads, max_seconds=bench_seconds)
    console.print(bench_table(rows, baseline=next(iter(labels))))
    for r in rows:
        if "tokens_per_s" in r:  # language models, at sequence length BENCH_SEQUENCE
            console.print(f"{r['label']} ({r['device']}, batch {r['batch']}, sequence {shapes[first][0]}): "
                          f"{r['tokens_per_s']:,.0f} tokens/s")
    if json_out is not None:
        save_json(rows, json_out)


def _fold_groups(gm, loop, example, stats: dict, target: str, threads: int | None) -> list[dict]:
    """Time the fold groups on ``target`` and print them in latency selection's order."""
    from rich.table import Table

    from easier_export.fold.planner import LatencyTable
    from easier_export.loop.selection import measure_groups, risk

    found = measure_groups(gm, loop, example, LatencyTable(target, threads)).candidates(set())
    entropy = {name: s.entropy for name, s in stats.items()}
    found.sort(key=lambda g: (risk(g, entropy), g.sites))  # the order --select latency tries them in
    rows = [{"sites": list(g.sites), "entropy": sum(entropy[s] for s in g.sites), "us_saved": g.us_saved,
             "detail": g.detail} for g in found]
    table = Table("group", "call sites", "entropy (sum)", f"µs saved ({target}, batch 1)", "merge",
                  title="fold groups (latency selection order)")
    for i, r in enumerate(rows):
        table.add_row(str(i), ", ".join(r["sites"]), f"{r['entropy']:.4f}", f"{r['us_saved']:.1f}", r["detail"])
    console.print(table if rows else "no fold group saves time on this target")
    return rows


def _random_batches(loaded) -> list:
    """Seeded stand-ins for validation images (or token ids, at two sequence lengths) when verifying without
    --data."""
    return loaded.task.dummy_inputs(loaded.input_size)


def _dims(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _onnx_shapes(path: Path) -> tuple[tuple[int, ...], tuple[int | str, ...]]:
    """The static (C, H, W) of a valid ONNX model's input (``BENCH_SEQUENCE`` for token ids with a dynamic
    sequence axis) and its first output's non-batch dimensions ("?" where dynamic), with one-line errors for
    anything else."""
    import onnx

    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as e:  # protobuf's DecodeError, the checker's ValidationError...
        raise UserError(f"{path} is not a valid ONNX model ({type(e).__name__})") from None
    if not proto.graph.input:
        raise UserError(f"{path} has no input")
    tensor = proto.graph.input[0].type.tensor_type
    dims = tensor.shape.dim[1:]
    outputs = tuple(d.dim_value if d.dim_value > 0 else "?"
                    for d in (proto.graph.output[0].type.tensor_type.shape.dim[1:] if proto.graph.output else ()))
    if tensor.elem_type == onnx.TensorProto.INT64 and len(dims) == 1 and not dims[0].dim_value > 0:
        from easier_export.load.task import MAX_POSITIONS_KEY, bench_sequence

        positions = {p.key: p.value for p in proto.metadata_props}.get(MAX_POSITIONS_KEY)
        return (bench_sequence(int(positions) if positions else None),), outputs  # token ids, dynamic sequence
    if not dims or not all(d.dim_value > 0 for d in dims):
        raise UserError(f"{path}: the ONNX input needs static non-batch dimensions to be benchmarked")
    return tuple(d.dim_value for d in dims), outputs


@app.command()
@loop_options("max_drop", "finetune_epochs", "seed", "select", select="latency")
def demo(loop: LoopConfig, out: Out = Path("runs/demo"),
         epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 12, fold: Fold = "auto") -> None:
    """Train a small inverted-residual CNN on scikit-learn's digits, then run the whole `compress` pipeline."""
    from easier_export.demo import run_demo

    with _no_empty_out(out), _resumable(out):
        run_demo(out, epochs, loop.finetune_epochs, loop.max_drop, fold, loop.seed, loop.select)
    _tidy(out)


# ---------------------------------------------------------------------------------------------- entry point


def _usage_line(e: typer.TyperException) -> str:
    """The parser's message on one line, with where to look for help."""
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "easier-export --help"
    message = _option_elsewhere(e, ctx) or e.format_message()
    return f"{' '.join(message.split())} (see '{where}')"


def _option_elsewhere(e: typer.TyperException, ctx: Any) -> str | None:
    """An unknown option that other commands take (``fold --data``): say which, instead of the parser's guesses at
    a similar spelling (``--atol``)."""
    name = getattr(e, "option_name", None)
    group = ctx.find_root().command if ctx is not None else None
    if name is None or not hasattr(group, "commands"):
        return None
    takers = sorted(cmd for cmd, command in group.commands.items()
                    if any(name in param.opts for param in command.params))
    if not takers:
        return None
    return f"{ctx.info_name} takes no {name} ({', '.join(takers)} {'take' if len(takers) > 1 else 'takes'} it)"


def main(argv: list[str] | None = None) -> None:
    """Maps errors to exit codes with one line, never a traceback; SIGTERM is handled as Ctrl-C is."""
    command = typer.main.get_command(app)
    with sigterm_as_interrupt() as received:
        try:
            code = command.main(args=argv, prog_name="easier-export", standalone_mode=False)
        except typer.TyperException as e:  # the parser's errors (typer's own click): bad option, value, argument
            _exit(f"[red]error:[/] {escape(_usage_line(e))}", EXIT_USAGE)
        except typer.Abort:  # end of input at a prompt
            code = EXIT_INTERRUPTED
        except (UserError, VerificationError) as e:
            _exit(f"[red]error:[/] {escape(str(e))}", e.exit_code)
        except Interrupted as e:
            _exit(f"[yellow]{escape(str(e))}[/]", e.exit_code)
    if code == EXIT_INTERRUPTED:  # Ctrl-C or SIGTERM outside a resumable loop (click turns both into this code)
        stopped = Interrupted(None, terminated=bool(received))
        _exit(f"[yellow]{escape(str(stopped))}[/]", stopped.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)


def _exit(line: str, code: int) -> typing.NoReturn:
    console.print(line, soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
