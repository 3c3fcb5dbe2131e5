"""Segments as small ONNX graphs, for timing a merge in context: the ops as the running model executes them,
against the one merged op. Weights are random with nonzero biases (zero biases would hide bias-map adds)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .numerics import BiasMapConv2d

_OPSET = 17
Shape = tuple[int, ...]


@dataclass
class SegmentSpec:
    """What a segment computes before merging: ``ops`` in sequence, then optionally ``+ skip(x)``.

    ``add``: the segment ends with the chain's residual add; ``skip``: the conv on that add's other branch
    (None: the identity).
    """

    ops: list[nn.Module]
    in_shape: Shape
    add: bool = False
    skip: nn.Module | None = None

    def signature(self) -> str:
        parts = [op_signature(m) for m in self.ops]
        if self.add:
            parts.append("add:" + ("identity" if self.skip is None else op_signature(self.skip)))
        return f"{tuple(self.in_shape)}|" + "|".join(parts)


class _GraphBuilder:
    """Builds one small ONNX graph, node by node."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def _init(self, shape: Shape) -> str:
        name = f"w{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(
            (0.1 * self.rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def add_node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def op(self, module: nn.Module, x: str) -> str:
        if isinstance(module, nn.Conv2d):
            inputs = [x, self._init(tuple(module.weight.shape)), self._init((module.out_channels,))]
            y = self.add_node("Conv", inputs, kernel_shape=list(module.kernel_size), strides=list(module.stride),
                           pads=_onnx_pads(module), dilations=list(module.dilation), group=module.groups)
            if isinstance(module, BiasMapConv2d):
                y = self.add_node("Add", [y, self._init(tuple(module.bias_map.shape))])
            return y
        y = self.add_node("MatMul", [x, self._init((module.in_features, module.out_features))])
        return self.add_node("Add", [y, self._init((module.out_features,))])

    def add(self, a: str, b: str) -> str:
        return self.add_node("Add", [a, b])

    def model(self, in_shape: Shape, out: str) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)]
        outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
        graph = helper.make_graph(self.nodes, "segment", inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=8)


def segment_graph(spec: SegmentSpec) -> onnx.ModelProto:
    """The unmerged segment as one ONNX graph: what the running model executes for it."""
    g = _GraphBuilder()
    y = "x"
    for module in spec.ops:
        y = g.op(module, y)
    if spec.add:
        y = g.add(y, "x" if spec.skip is None else g.op(spec.skip, "x"))
    return g.model(spec.in_shape, y)


def merged_graph(module: nn.Module, in_shape: Shape) -> onnx.ModelProto:
    g = _GraphBuilder()
    return g.model(in_shape, g.op(module, "x"))


def _onnx_pads(conv: nn.Conv2d) -> list[int]:
    """ONNX pads (begin..., end...); a string padding ("same"/"valid") is approximated for timing only."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        pad = [d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return pad + pad
    return [*conv.padding, *conv.padding]


def op_signature(module: nn.Module) -> str:
    """What makes two ops time alike: their type, shapes and geometry, not their weights."""
    if isinstance(module, nn.Conv2d):
        return (f"conv|w{tuple(module.weight.shape)}|s{module.stride}|p{module.padding}"
                f"|d{module.dilation}|g{module.groups}|map{isinstance(module, BiasMapConv2d)}")
    return f"linear|{module.in_features}x{module.out_features}"
