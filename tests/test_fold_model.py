"""fold_model on whole networks with activations erased: output unchanged, fewer ops, exportable to ONNX."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torchvision
from _fold_util import (
    Fork,
    WeightCountTable,
    activation_nodes,
    count_modules,
    erase_activations,
    randomize_batchnorms,
    rel_err,
)
from torch import nn
from torch.fx import GraphModule, symbolic_trace

from easier_export.fold import PADDING_REASON, fold_model
from easier_export.fold.planner import LatencyTable


def _erased(model: nn.Module, keep: slice) -> GraphModule:
    """Trace an eval-mode model with random BN statistics and erase the activations outside ``keep``."""
    torch.manual_seed(0)
    gm = symbolic_trace(randomize_batchnorms(model).eval())
    acts = [n.name for n in activation_nodes(gm)]
    return erase_activations(gm, [a for a in acts if a not in acts[keep]])


def _check(gm: GraphModule, folded: GraphModule, x: torch.Tensor) -> float:
    with torch.no_grad():
        err = rel_err(folded(x), gm(x))
    assert err <= 1e-4, err
    return err


@pytest.fixture(scope="module")
def mobilenet() -> GraphModule:
    # every ReLU6 erased except the stem's
    return _erased(torchvision.models.mobilenet_v2(num_classes=10), slice(0, 1))


@pytest.mark.slow
def test_mobilenet_v2_all(mobilenet: GraphModule) -> None:
    gm = _erased(torchvision.models.mobilenet_v2(num_classes=10), slice(12, None))
    x = torch.randn(2, 3, 32, 32)
    folded, records = fold_model(gm, x[:1], mode="all")
    _check(gm, folded, x)
    assert count_modules(folded, nn.BatchNorm2d) == 0
    assert count_modules(folded, nn.Conv2d) < count_modules(gm, nn.Conv2d)
    kinds = {r.kind for r in records if r.applied}
    assert {"identity", "batchnorm", "conv_conv", "residual"} <= kinds
    assert any(r.reason == PADDING_REASON for r in records)


@pytest.mark.slow
def test_mobilenet_v2_none_and_auto(mobilenet: GraphModule, tmp_path: pathlib.Path, monkeypatch) -> None:
    x = torch.randn(2, 3, 32, 32)
    folded, records = fold_model(mobilenet, x[:1], mode="none")
    _check(mobilenet, folded, x)
    assert count_modules(folded, nn.Conv2d) == count_modules(mobilenet, nn.Conv2d)
    assert {r.kind for r in records} <= {"identity", "batchnorm", "layernorm_affine"}
    monkeypatch.setattr(LatencyTable, "times", WeightCountTable.times)  # a cost that depends on no clock
    auto, records = fold_model(mobilenet, x[:1], mode="auto", cache=tmp_path / "lat.json", threads=1)
    _check(mobilenet, auto, x)
    timed = [r for r in records if r.kind in ("conv_conv", "residual") and r.us_before is not None]
    assert timed, "the planner timed no merge candidate"
    assert all(r.us_after <= r.us_before for r in timed if r.applied)  # a chosen merge is never the slower one


@pytest.mark.parametrize("mode", ["all", "auto"])
def test_fan_out_is_in_the_plan_with_its_reason(mode: str, tmp_path: pathlib.Path) -> None:
    gm = symbolic_trace(Fork().eval())
    _, records = fold_model(gm, torch.randn(1, 3, 5, 5), mode=mode, cache=tmp_path / "lat.json", threads=1)
    assert [(r.kind, r.nodes, r.applied, r.reason) for r in records if r.kind == "conv_conv"] == [
        ("conv_conv", ["a", "b"], False, "fan-out: a output has 2 users")]


@pytest.mark.slow
def test_resnet18_all_refuses_padding_merges() -> None:
    gm = _erased(torchvision.models.resnet18(num_classes=10), slice(0, 17, 2))
    x = torch.randn(2, 3, 32, 32)
    folded, records = fold_model(gm, x[:1], mode="all")
    _check(gm, folded, x)
    assert count_modules(folded, nn.BatchNorm2d) == 0
    refused = [r for r in records if r.kind == "conv_conv" and not r.applied]
    assert refused and all(r.reason == PADDING_REASON for r in refused)


@pytest.mark.slow
def test_swin_t_all_merges_mlps() -> None:
    gm = _erased(torchvision.models.swin_t(num_classes=10), slice(0, 12, 3))
    x = torch.randn(2, 3, 32, 32)
    folded, records = fold_model(gm, x[:1], mode="all")
    _check(gm, folded, x)
    merged = [r for r in records if r.kind == "linear_linear" and r.applied]
    assert len(merged) == 8  # the MLPs whose GELU was erased
    assert count_modules(folded, nn.Linear) == count_modules(gm, nn.Linear) - 8
    assert any(r.kind == "layernorm_affine" and r.applied for r in records)


@pytest.mark.slow
def test_folded_mobilenet_exports_with_dynamic_batch(mobilenet: GraphModule) -> None:
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(1, 3, 32, 32)
    folded, _ = fold_model(mobilenet, x, mode="all")
    assert any(n.op == "call_module" and "map" in str(type(folded.get_submodule(n.target)).__name__).lower()
               for n in folded.graph.nodes)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(folded, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 32, 32)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})
    assert rel_err(torch.from_numpy(got), folded(x3)) <= 1e-4


def test_unknown_mode_is_rejected(mobilenet: GraphModule) -> None:
    with pytest.raises(ValueError, match="fold mode"):
        fold_model(mobilenet, torch.randn(1, 3, 32, 32), mode="some")
