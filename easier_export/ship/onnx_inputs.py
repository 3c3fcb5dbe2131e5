"""What ONNX files take and give, read from the file alone: the benchmark compares only files of one input shape
that compute outputs of one shape, and times a language model at a fixed sequence length."""

from __future__ import annotations

from pathlib import Path

from easier_export.core.errors import UserError
from easier_export.core.io import resolved
from easier_export.load.task import MAX_POSITIONS_KEY, bench_sequence


def dims(shape: tuple) -> str:
    """A shape as ``3x32x32`` (``scalar`` when empty)."""
    return "x".join(map(str, shape)) or "scalar"


def onnx_shapes(path: Path) -> tuple[tuple[int, ...], tuple[int | str, ...]]:
    """The static (C, H, W) of a valid ONNX model's input (for token ids with a dynamic sequence axis, the length
    :func:`~easier_export.load.task.bench_sequence` gives) and its first output's non-batch dimensions ("?" where
    dynamic), with one-line errors for anything else."""
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
    inputs = tensor.shape.dim[1:]
    outputs = tuple(d.dim_value if d.dim_value > 0 else "?"
                    for d in (proto.graph.output[0].type.tensor_type.shape.dim[1:] if proto.graph.output else ()))
    if tensor.elem_type == onnx.TensorProto.INT64 and len(inputs) == 1 and not inputs[0].dim_value > 0:
        positions = {p.key: p.value for p in proto.metadata_props}.get(MAX_POSITIONS_KEY)
        return (bench_sequence(int(positions) if positions else None),), outputs  # token ids, dynamic sequence
    if not inputs or not all(d.dim_value > 0 for d in inputs):
        raise UserError(f"{path}: the ONNX input needs static non-batch dimensions to be benchmarked")
    return tuple(d.dim_value for d in inputs), outputs


def distinct(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """``paths`` with each file once (the first spelling kept), and the files given more than once."""
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(resolved(path), path)
    repeated = [p for key, p in unique.items() if sum(resolved(q) == key for q in paths) > 1]
    return list(unique.values()), repeated


def common_input(paths: list[Path]) -> tuple[int, ...]:
    """The input shape every model in ``paths`` takes, refusing models that take or give other shapes than the
    first."""
    io = {path: onnx_shapes(path) for path in paths}
    first = paths[0]
    shape, outputs = io[first]
    for path, (other, other_outputs) in io.items():
        if other != shape:
            raise UserError(f"{path} takes {dims(other)} inputs but {first} takes {dims(shape)}: only models of one "
                            "input shape compare")
        if other_outputs != outputs:
            raise UserError(f"{path} outputs {dims(other_outputs)} per input but {first} outputs {dims(outputs)}: "
                            "only models computing the same thing compare")
    return shape


def labels(paths: list[Path]) -> dict[str, Path]:
    """Each model's name in the benchmark's rows: its file's stem, or its path where stems repeat."""
    return {path.stem if path.stem not in {p.stem for p in paths if p != path} else str(path): path
            for path in paths}
