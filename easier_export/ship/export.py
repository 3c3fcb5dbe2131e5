"""Export a classifier to one self-contained ONNX file and prove it reproduces the PyTorch model."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from rich.console import Console
from torch import nn

from easier_export import __version__
from easier_export.core.errors import UserError, first_line
from easier_export.core.io import atomic_write
from easier_export.core.onnx_graph import op_counts
from easier_export.load.task import FLOAT32, Tolerances

logger = logging.getLogger(__name__)

MIN_OPSET = 18
# the newest opset torch 2.14's dynamo exporter writes (Gelu from 20, Attention from 23), or the installed onnx's
MAX_OPSET = min(23, onnx.defs.onnx_opset_version())
TORCHSCRIPT_MAX_OPSET = 20  # the legacy exporter's newest
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def eval_copy(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """An eval-mode copy on ``device``: exporting or timing never flips the caller's train flag or device."""
    return copy.deepcopy(model).to(device).eval()


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    metadata: dict[str, str] | None = None,
    simplify: bool = True,
    opset: int = MIN_OPSET,
) -> dict:
    """Export ``model`` to a single ONNX file with a dynamic batch axis and a static spatial size (token ids,
    an integer ``example`` of shape (batch, sequence): dynamic batch and sequence axes).

    The dynamo exporter is tried first; the TorchScript exporter is the fallback for models
    torch.export cannot trace. Returns a JSON-ready description of what was written.
    """
    if opset < MIN_OPSET:
        raise UserError(f"ONNX opset {opset} is too old: use {MIN_OPSET} or newer")
    if opset > MAX_OPSET:
        raise UserError(f"ONNX opset {opset} is newer than the exporter writes: use {MAX_OPSET} or older")
    path = Path(path)
    model = eval_copy(model)
    # torch.export specialises a size-1 dimension, so trace a batch of 2 to keep the batch axis symbolic.
    example = example.detach().cpu()
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    notes: list[str] = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; real failures raise
        try:
            proto, exporter = _export_dynamo(model, example, opset), "dynamo"
        except Exception as e:  # any tracing failure: the legacy exporter handles more Python control flow
            legacy = min(opset, TORCHSCRIPT_MAX_OPSET)
            notice = f"dynamo export failed ({_describe(e)}); used the TorchScript exporter" + (
                f" at opset {legacy} (its newest)" if legacy < opset else "")
            logger.warning(notice)
            notes.append(notice)
            proto, exporter = _export_torchscript(model, example, legacy), "torchscript"

    simplified = False
    if simplify:
        proto, simplified, note = _simplify(proto, example)
        if note:
            notes.append(note)
    onnx.checker.check_model(proto, full_check=True)
    existing = {prop.key: prop.value for prop in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**existing, **(metadata or {}), "easier_export.version": __version__})
    atomic_write(path, lambda p: onnx.save_model(proto, p, save_as_external_data=False))

    return {
        "path": str(path),
        "exporter": exporter,
        "opset": _default_opset(proto),
        "simplified": simplified,
        "notes": notes,
        "size_bytes": path.stat().st_size,
        "nodes": len(proto.graph.node),
        "op_counts": op_counts(proto),
    }


def dynamic_axes(example: torch.Tensor) -> dict[int, str]:
    """Batch is always dynamic; so is the sequence axis of token ids (integer inputs)."""
    return {0: "batch", 1: "sequence"} if not example.is_floating_point() else {0: "batch"}


def dynamic_dims(example: torch.Tensor) -> dict[int, torch.export.Dim]:
    """:func:`dynamic_axes` as torch.export dimensions (a sequence of one token would be specialised: min 2)."""
    return {axis: torch.export.Dim(name, min=2 if axis else 1) for axis, name in dynamic_axes(example).items()}


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    dims = dynamic_dims(example)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        verbose=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=(dims,),
    )
    # Taking the in-memory proto keeps the weights inline (ONNXProgram.save would split them off into .data).
    return program.model_proto


def _export_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (example,),
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: dynamic_axes(example), OUTPUT_NAME: {0: "batch"}},
    )
    return onnx.load_from_string(buffer.getvalue())


def _simplify(proto: onnx.ModelProto, example: torch.Tensor) -> tuple[onnx.ModelProto, bool, str]:
    """onnxsim is an optimisation, never a requirement: any failure keeps the exported graph."""
    import onnxsim

    shapes = {proto.graph.input[0].name: list(example.shape)}
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # onnxsim prints its check progress
            simplified, ok = onnxsim.simplify(proto, check_n=1, test_input_shapes=shapes)
    except Exception as e:
        return proto, False, f"onnxsim failed ({_describe(e)}); kept the unsimplified model"
    if not ok:
        return proto, False, "onnxsim check failed (outputs differ); kept the unsimplified model"
    return simplified, True, ""


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _describe(e: BaseException) -> str:
    """Exception type and first message line: exporter errors can run to hundreds of lines."""
    return f"{type(e).__name__}: {first_line(e)}"


@dataclass
class VerifyResult:
    """Outcome of running the ONNX file and the PyTorch model on the same batches."""

    max_abs: float
    mean_abs: float
    top1_agree: float
    batches: int
    passed: bool
    reason: str
    atol: float
    rtol: float
    min_top1: float
    violations: int  # elements outside atol + rtol * |ref| + scale_tol * max|ref|
    max_rel: float  # max |diff| / max |ref|: the difference on the scale of the output
    ref_scale: float  # max |ref|
    scale_tol: float
    numeric: bool = True  # False: no elementwise bound applied (a quantized file), top-1 agreement only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_onnx(
    path: Path,
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    tolerances: Tolerances = FLOAT32,
    providers: list[str] | None = None,
) -> VerifyResult:
    """Compare onnxruntime with PyTorch eval batch by batch.

    Passing needs both checks of ``tolerances``: every element within ``atol + rtol * |ref| + scale_tol *
    max|ref|`` (numerics) and top-1 agreement of at least ``min_top1`` (what the user actually sees from a
    classifier; for a language model, the next-token agreement over every position). Batches may differ in
    sequence length.
    """
    atol, rtol, scale_tol, min_top1 = tolerances.atol, tolerances.rtol, tolerances.scale_tol, tolerances.min_top1
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    model = eval_copy(model)
    pairs = []
    with torch.no_grad():
        for x in inputs:
            x = x.detach().cpu()
            x = x.float() if x.is_floating_point() else x
            pairs.append((model(x).numpy().astype(np.float64), session.run(None, {input_name: x.numpy()})[0]))
    if not pairs:
        raise UserError("verification needs at least one input batch")
    scale = max(float(np.abs(ref).max()) for ref, _ in pairs)
    elements = violations = agree = samples = 0
    max_abs = sum_abs = 0.0
    for ref, out in pairs:
        diff = np.abs(out - ref)
        max_abs = max(max_abs, float(diff.max()))
        sum_abs += float(diff.sum())
        elements += diff.size
        if tolerances.numeric:
            violations += int((diff > atol + rtol * np.abs(ref) + scale_tol * scale).sum())
        same = out.argmax(-1) == ref.argmax(-1)
        agree += int(same.sum())
        samples += same.size
    batches = len(pairs)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)

    top1_agree = agree / samples
    failures = []
    if violations:
        failures.append(
            f"tolerance: {violations}/{elements} elements exceed atol {atol:.0e} + rtol {rtol:.0e}*|ref| + "
            f"{scale_tol:.0e}*max|ref| (max abs diff {max_abs:.1e}, {max_rel:.1e} of max |ref| {scale:.3g})"
        )
    if top1_agree < min_top1:
        failures.append(f"top-1 agreement {top1_agree:.4f} < {min_top1}")
    return VerifyResult(
        max_abs=max_abs,
        mean_abs=sum_abs / elements,
        top1_agree=top1_agree,
        batches=batches,
        passed=not failures,
        reason="; ".join(failures),
        atol=atol,
        rtol=rtol,
        min_top1=min_top1,
        violations=violations,
        max_rel=max_rel,
        ref_scale=scale,
        scale_tol=scale_tol,
        numeric=tolerances.numeric,
    )


def verify_lines(result: VerifyResult) -> list[tuple[bool, str]]:
    """One (ok, text) line per check, shared by the console output and the Markdown report."""
    tol_ok = result.violations == 0
    top1_ok = result.top1_agree >= result.min_top1
    bound = f"atol {result.atol:.0e} + rtol {result.rtol:.0e}·|ref| + {result.scale_tol:.0e}·max|ref|"
    tol = (f"max abs diff {result.max_abs:.1e} {'≤' if tol_ok else '>'} {bound} "
           f"(max |diff| / max |ref| = {result.max_rel:.1e}, max |ref| {result.ref_scale:.3g})")
    if not tol_ok:
        tol += f" ({result.violations} elements)"
    if not result.numeric:
        tol = (f"max abs diff {result.max_abs:.1e} ({result.max_rel:.1e} of max |ref| {result.ref_scale:.3g}); "
               "no elementwise bound for a quantized file: top-1 agreement here, accuracy on val")
    return [
        (tol_ok, tol),
        (True, f"mean abs diff {result.mean_abs:.1e} over {result.batches} batches"),
        (top1_ok, f"top-1 agreement {result.top1_agree:.4f} {'≥' if top1_ok else '<'} {result.min_top1}"),
    ]


def print_verify(result: VerifyResult, console: Console) -> None:
    for ok, text in verify_lines(result):
        console.print(f"[green]✓[/green] {text}" if ok else f"[red]✗[/red] {text}")


def mark_unverified(path: Path) -> Path:
    """Rename a file that failed verification so nobody ships it by accident."""
    path = Path(path)
    target = path.with_name(f"{path.stem}.unverified.onnx")
    os.replace(path, target)
    return target
