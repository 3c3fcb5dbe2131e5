"""Facts read off an ONNX graph, in one place: what it takes as input and what it is made of."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx


def takes_token_ids(proto: onnx.ModelProto) -> bool:
    """Whether the graph's input is token ids (int64), not pixels."""
    return proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def file_takes_token_ids(path: Path) -> bool:
    """``takes_token_ids`` of an ONNX file, its weights left unread."""
    return takes_token_ids(onnx.load(str(path), load_external_data=False))


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the top-level graph holds, by op type."""
    return dict(sorted(Counter(node.op_type for node in proto.graph.node).items()))
