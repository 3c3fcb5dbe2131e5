"""INT8 and FP16 files made from a verified FP32 ONNX file by onnxruntime's own tools.

Nothing of the quantization is written here: ``quant_pre_process`` (shape inference and graph optimisation, which
ORT's quantizer expects), ``quantize_static`` in the QDQ format with per-channel weights for float inputs,
calibrated on batches the caller gives (DATA's train split, or seeded stand-ins for timing only), and
``quantize_dynamic`` for token-id models (their Linear weights; activations are quantized at run time, so no
calibration). FP16 is onnxruntime's ``convert_float_to_float16`` with the FP32 input and output kept, so a caller
feeds the file as it fed the FP32 one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from easier_export.core.errors import UserError, first_line
from easier_export.core.io import atomic_write
from easier_export.core.onnx_graph import op_counts, takes_token_ids

FP32, INT8, FP16, AUTO = "fp32", "int8", "fp16", "auto"
PRECISIONS = (FP32, INT8, FP16, AUTO)
"""What ``--precision`` takes: a precision, or ``auto`` (the fastest on the target within the budget)."""

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
ACTIVATIONS = {"cpu": QuantType.QUInt8, "cuda": QuantType.QInt8}
"""INT8 activations per target (weights are int8 everywhere): unsigned on a CPU, where onnxruntime's x86 kernels
multiply uint8 activations by int8 weights (U8S8) fast and int8 by int8 (S8S8) slowly (MobileNetV2 at 224: ×1.22
against ×0.71 of FP32, benchmarks/precision.md); signed on CUDA, where TensorRT takes symmetric int8 only."""


@dataclass(frozen=True)
class Calibration:
    """How an INT8 file is calibrated: float input batches (N, C, H, W) and the range estimator."""

    batches: tuple[np.ndarray, ...]
    method: str = "minmax"

    @classmethod
    def of(cls, batches: Sequence[torch.Tensor], method: str = "minmax") -> Calibration:
        if method not in CALIBRATION_METHODS:
            raise UserError(f"--calib-method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
        return cls(tuple(b.detach().cpu().float().numpy() for b in batches), method)

    @classmethod
    def stand_ins(cls, shape: Sequence[int], batches: int = 2) -> Calibration:
        """Seeded normal inputs: ranges that give the quantized graph its kernels, for timing it, not for
        shipping it (its accuracy is meaningless)."""
        rng = np.random.default_rng(0)
        return cls(tuple(rng.standard_normal(tuple(shape), dtype=np.float32) for _ in range(batches)))

    def describe(self) -> dict:
        return {"method": self.method, "batches": len(self.batches),
                "samples": int(sum(b.shape[0] for b in self.batches))}


class BatchReader(CalibrationDataReader):
    """The calibration batches under the graph's input name, one per ``get_next`` (ORT's reader protocol)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


def edge_layers(path: Path) -> list[str]:
    """The first and the last weighted node (conv, matmul): the layers quantization hurts most (the input's and
    the logits' ranges), kept in FP32 when the whole graph in INT8 breaks the budget."""
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in WEIGHTED_OPS]
    return list(dict.fromkeys(n.name for n in (nodes[:1] + nodes[-1:]) if n.name))


def quantize_int8(src: Path, dst: Path, calibration: Calibration | None, exclude: Sequence[str] = (),
                  target: str = "cpu") -> dict:
    """``src`` in INT8 at ``dst`` (written atomically) for ``target`` (``ACTIVATIONS``); ``exclude``: node names
    left in FP32. A float-input model needs ``calibration``; a model ORT cannot quantize is a user error in one
    line."""
    with tempfile.TemporaryDirectory(prefix="easier-int8-") as tmp:
        try:
            proto = onnx.load(str(src), load_external_data=False)
            tokens = takes_token_ids(proto)
            if not tokens and calibration is None:
                raise UserError("INT8 needs calibration data: give --data (its train split calibrates the ranges)")
            if tokens:
                _to_file(dst, lambda p: quantize_dynamic(src, p, weight_type=QuantType.QInt8,
                                                         nodes_to_exclude=list(exclude)))
            else:
                prepared = Path(tmp) / "prepared.onnx"
                quant_pre_process(str(src), str(prepared))
                reader = BatchReader(proto.graph.input[0].name, calibration.batches)
                _to_file(dst, lambda p: quantize_static(
                    prepared, p, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=ACTIVATIONS[target], weight_type=QuantType.QInt8,
                    calibrate_method=CALIBRATION_METHODS[calibration.method], nodes_to_exclude=list(exclude),
                    extra_options={"CalibTensorRangeSymmetric": False}))
        except UserError:
            raise
        except Exception as e:  # ORT's quantizer raises anything from shape inference to unsupported ops
            raise UserError(f"onnxruntime cannot quantize {Path(src).name} to INT8: {first_line(e)}") from e
    activations = "uint8" if ACTIVATIONS[target] == QuantType.QUInt8 else "int8"
    return describe(dst, INT8, mode="dynamic" if tokens else f"static QDQ, per-channel weights, {activations} "
                                                             "activations",
                    calibration=None if tokens else calibration.describe(), fp32_nodes=list(exclude))


def convert_fp16(src: Path, dst: Path) -> dict:
    """``src`` in FP16 at ``dst``, FP32 input and output kept (meant for CUDA; ORT's CPU kernels for FP16 are
    few, so the CPU provider casts around most nodes)."""
    try:
        half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    except Exception as e:
        raise UserError(f"onnxruntime cannot convert {Path(src).name} to FP16: {first_line(e)}") from e
    atomic_write(Path(dst), lambda p: onnx.save_model(half, p))
    return describe(dst, FP16, mode="float16 weights and activations, FP32 input and output")


def convert(src: Path, dst: Path, precision: str, calibration: Calibration | None,
            exclude: Sequence[str] = (), target: str = "cpu") -> dict:
    """``src`` in ``precision`` (``int8`` or ``fp16``) at ``dst``, for ``target``."""
    if precision == INT8:
        return quantize_int8(src, dst, calibration, exclude, target)
    if precision == FP16:
        return convert_fp16(src, dst)
    raise UserError(f"no conversion to {precision!r}: choose int8 or fp16")


def _to_file(dst: Path, write: Callable[[str], object]) -> None:
    """Run ``write(path)`` (an ORT function that saves a model) through ``atomic_write``."""
    atomic_write(Path(dst), lambda p: write(str(p)))


def describe(path: Path, precision: str, **extra: object) -> dict:
    """What was written, as the report records an export."""
    proto = onnx.load(str(path), load_external_data=False)
    return {"path": str(path), "precision": precision, "size_bytes": os.path.getsize(path),
            "nodes": len(proto.graph.node), "op_counts": op_counts(proto), **extra}
