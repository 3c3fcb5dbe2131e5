"""Every option of the command line, declared once: its type, bounds, help and --help panel.

Commands take these as annotations (``out: Out = Path(...)``) or, for the options every model-loading command
shares, as one object (`ModelOptions`, `DataOptions`, through `groups.grouped`).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from easier_export.core.ort import DEVICES
from easier_export.core.quantize import CALIBRATION_METHODS, PRECISIONS
from easier_export.fold import MODES
from easier_export.load.task import FLOAT32, Tolerances
from easier_export.loop.config import field_checks
from easier_export.ship.export import MAX_OPSET, MIN_OPSET

# --help panels, in the order a compress run goes through them (--out and --help stay in "Options")
MODEL, DATA, LOOP, FOLD, EXPORT, BENCH = "Model", "Data", "Loop", "Fold", "Export", "Bench"
CHOICES_SHOWN = 17  # the widest "[a|b|c]" type label that fits --help's type column at 80 columns
METAVARS: dict[Any, str] = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}
THREADS_PER_CORE = 4  # more only oversubscribes the cores (thousands of threads thrash them)
MAX_THREADS = (os.cpu_count() or 1) * THREADS_PER_CORE


def option(help: str, panel: str | None, *names: str, **settings: Any) -> Any:
    """An option in its --help panel (``None``: the panel of --out and --help)."""
    return typer.Option(*names, help=help, rich_help_panel=panel, **settings)


def checked(bounds: Mapping[str, Any]) -> Callable[[Any], Any]:
    """A callback that refuses values outside ``bounds`` (``min``, ``max``, ``positive``, ``choices``: what
    ``field_checks`` reads) and non-finite floats (``inf`` never ends a loop, ``nan`` passes or fails every
    tolerance), as a usage error that points at --help."""
    def check(value: Any) -> Any:
        failed = [why for ok, why in field_checks(bounds, value) if not ok]
        if failed:
            raise typer.BadParameter(failed[0])
        return value

    return check


def said(bounds: Mapping[str, Any]) -> str:
    """``bounds`` in words for the help text (typer's own range would widen --help's type column)."""
    low, high = bounds.get("min"), bounds.get("max")
    if bounds.get("positive"):
        return " (positive)"
    if low is not None and high is not None:
        return f" ({low} to {high})"
    if low is not None:
        return f" (at least {low})"
    return f" (at most {high})" if high is not None else ""


def typed(hint: Any, help: str, panel: str | None, *names: str, shown: str | None = None,
          show_default: bool | str = True, **bounds: Any) -> Any:
    """``hint`` annotated with its option: shown in --help as INT, FLOAT, TEXT or PATH, its ``bounds``
    (``min``, ``max``, ``positive``) checked and said in the help (``shown``: in these words instead)."""
    base = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    help += said(bounds) if shown is None else f" ({shown})"
    return Annotated[hint, option(help, panel, *names, metavar=METAVARS[base], callback=checked(bounds),
                                  show_default=show_default)]


def flag(name: str, help: str, panel: str) -> Any:
    """An on/off option spelled one way (``--trust-pickle``): no ``--no-`` twin, no type or default in --help."""
    return option(help, panel, f"--{name}", metavar="", show_default=False)


def chosen(values: tuple[str, ...], help: str, panel: str) -> Any:
    """A choice option from the one tuple that lists the values (the parser refuses others with exit 2); a list
    too wide for --help's type column is spelled out in the help instead."""
    shown = f"[{'|'.join(values)}]"
    if len(shown) > CHOICES_SHOWN:
        help, shown = f"{help}; one of {', '.join(values)}", "NAME"
    return Annotated[Literal[values], option(help, panel, metavar=shown)]  # type: ignore[valid-type]


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help="timm:NAME, torchvision:NAME, builtin name, state dict, .pt2, linearized.pt, or pickled module (with "
         "--trust-pickle)")]
Weights = typed(Path | None, "state dict for a named architecture", MODEL)
Arch = typed(str | None, "architecture of a state-dict MODEL file, e.g. timm:resnet18", MODEL)
NumClasses = typed(int | None, "classes to predict: a checkpoint with another head size keeps its body and gets a "
                               "fresh head", MODEL, min=2)
TrustPickle = Annotated[bool, flag("trust-pickle", "allow loading a pickled nn.Module (runs code from the file)",
                                   MODEL)]
InputSize = typed(str | None, "H, HxW or CxHxW (default: the model's config, else the size of the images in DATA)",
                  MODEL)
Mean = typed(str | None, "normalisation mean, e.g. 0.49,0.48,0.45", MODEL)
Std = typed(str | None, "normalisation std (positive)", MODEL)
CropPct = typed(float | None, "evaluation centre crop as a share of the resized image, e.g. 0.875 (default: the "
                             "model's config, applied only to images larger than the input size; images of the "
                             "input size are used as they are)", MODEL, min=0.05, max=1.0)
DataDir = typed(Path, "ImageFolder root with train/ and val/ (a text model: train.txt and val.txt)", DATA)
BatchSize = typed(int, "batch size for finetuning and entropy passes", DATA, min=1)
Workers = typed(int, "data-loading worker processes", DATA, min=0)
SkipBadImages = Annotated[bool, flag("skip-bad-images", "leave unreadable images in DATA out (counted in the "
                                                        "report) instead of stopping", DATA)]
Out = typed(Path, "output directory", None)
JsonOut = typed(Path | None, "also write the rows here", None, "--json")
Device = typed(str, "training device: auto, cpu or cuda[:N]", LOOP)
Fold = chosen(MODES, "auto (only merges measured faster), all, or none", FOLD)
Target = chosen(DEVICES, "device the fold planner measures on", FOLD)
LatencyTableFile = typed(Path | None, "the fold planner's timings: read from and added to this JSON file, so that "
                                      "runs with the same file make the same latency decisions (default: "
                                      "OUT/latency_table.json, which shares its timings with every run on this "
                                      "machine through ~/.cache/easier-export/)", FOLD)
BenchDevices = typed(str, f"benchmark devices, comma list of {', '.join(DEVICES)}", BENCH)
BenchBatches = typed(str, "benchmark batch sizes, comma list", BENCH)
BenchSeconds = typed(float, "benchmark time budget per model and setting", BENCH, min=0.0)
Threads = typed(int | None, "onnxruntime intra-op threads of the fold planner's and the benchmark's timings "
                            "(default: physical cores)", BENCH, min=1, max=MAX_THREADS,
                shown=f"1 to {THREADS_PER_CORE} per CPU core")
Atol = typed(float, "verification absolute tolerance", EXPORT, min=0.0)
Rtol = typed(float, "verification tolerance relative to each element", EXPORT, min=0.0)
ScaleTol = typed(float, "verification tolerance relative to the output's scale (max |reference|)", EXPORT, min=0.0)
MinTop1 = typed(float, "minimum top-1 agreement (a fraction)", EXPORT, min=0.0, max=1.0)
NoSimplify = Annotated[bool, flag("no-simplify", "skip onnxsim", EXPORT)]
Opset = typed(int, "ONNX opset of the file: 20 and newer write GELU as one Gelu op, 23 attention as one Attention op "
                   "(faster in onnxruntime; the runtime must support the opset)", EXPORT, min=MIN_OPSET,
              max=MAX_OPSET)

Precision = chosen(PRECISIONS, "precision of the shipped file: int8 (onnxruntime static QDQ, calibrated on DATA's "
                               "train split), fp16 (for CUDA), or auto (the fastest on --target within the budget)",
                   EXPORT)
CalibBatches = typed(int, "train batches that calibrate INT8 ranges", EXPORT, min=1)
CalibMethod = chosen(tuple(CALIBRATION_METHODS), "how INT8 ranges are estimated from the calibration batches", EXPORT)


@dataclass(frozen=True)
class ModelOptions:
    """MODEL and how to read it: what every command that loads a model takes (``--mean``, ``--std`` and
    ``--crop-pct`` only where images are read)."""

    model: ModelArg
    weights: Weights = None
    arch: Arch = None
    num_classes: NumClasses = None
    trust_pickle: TrustPickle = False
    input_size: InputSize = None
    mean: Mean = None
    std: Std = None
    crop_pct: CropPct = None


@dataclass(frozen=True)
class VerifyOptions:
    """When an export counts as reproducing its model: the float32 tolerances, each of them overridable."""

    atol: Atol = FLOAT32.atol
    rtol: Rtol = FLOAT32.rtol
    scale_tol: ScaleTol = FLOAT32.scale_tol
    min_top1: MinTop1 = FLOAT32.min_top1

    def tolerances(self) -> Tolerances:
        return Tolerances(**asdict(self))


@dataclass(frozen=True)
class DataOptions:
    """DATA and how to read it."""

    data: DataDir
    batch_size: BatchSize = 128
    workers: Workers = 2
    skip_bad_images: SkipBadImages = False
