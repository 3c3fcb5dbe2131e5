from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from rich.console import Console
from torch import nn

import easier_export
from easier_export.core.errors import UserError
from easier_export.load.task import FLOAT32, Tolerances
from easier_export.ship import export as ex


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.GELU(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def batches(shape: tuple[int, ...], n: int = 2, batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n)]


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def tolerated(**changes: float) -> Tolerances:
    """The float32 tolerances with ``changes``."""
    return dataclasses.replace(FLOAT32, **changes)


def check_round_trip(model: nn.Module, shape: tuple[int, int, int], path: Path, **verify_kw) -> dict:
    torch.manual_seed(0)
    model.train()  # export must not depend on (or change) the caller's mode
    info = ex.export_onnx(model, torch.randn(1, *shape), path, metadata={"source": "test"})
    assert model.training
    assert path.is_file() and info["size_bytes"] == path.stat().st_size > 0
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "weights must not be split off"
    assert info["exporter"] == "dynamo" and info["opset"] >= 18
    assert info["nodes"] == sum(info["op_counts"].values()) > 0

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["source"] == "test" and props["easier_export.version"] == easier_export.__version__
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == list(shape)
    for b in (1, 3):
        assert run_onnx(path, torch.randn(b, *shape)).shape[0] == b

    result = ex.verify_onnx(path, model, batches(shape), **verify_kw)
    assert result.passed, result.reason
    assert result.batches == 2 and result.top1_agree == 1.0 and result.max_abs < 1e-3
    return info


def test_round_trip_small_net(tmp_path: Path) -> None:
    info = check_round_trip(SmallNet(), (3, 16, 16), tmp_path / "small.onnx")
    assert info["simplified"] and info["notes"] == []
    assert "BatchNormalization" not in info["op_counts"]  # folded into the convs by the exporter / onnxsim


def test_round_trip_timm_resnet18(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    check_round_trip(timm.create_model("resnet18", num_classes=10), (3, 32, 32), tmp_path / "r18.onnx")


def test_round_trip_swin(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=64, window_size=4,
                              depths=(1, 1, 1, 1))
    check_round_trip(model, (3, 64, 64), tmp_path / "swin.onnx")


def test_torchscript_fallback_and_no_simplify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("untraceable\nsecond line")

    monkeypatch.setattr(ex, "_export_dynamo", broken)
    info = ex.export_onnx(SmallNet(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", simplify=False)
    assert info["exporter"] == "torchscript" and not info["simplified"]
    assert len(info["notes"]) == 1 and "untraceable" in info["notes"][0] and "second" not in info["notes"][0]
    assert run_onnx(tmp_path / "m.onnx", torch.randn(3, 3, 16, 16)).shape == (3, 10)


def _simplify_raises(proto, **kwargs):
    raise ValueError("unsupported op")


@pytest.mark.parametrize(("simplify", "note"), [
    (lambda proto, **kw: (proto, False), "onnxsim check failed (outputs differ)"),
    (_simplify_raises, "onnxsim failed (ValueError: unsupported op)"),
])
def test_simplifier_failure_keeps_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, simplify,
                                        note: str) -> None:
    import onnxsim

    monkeypatch.setattr(onnxsim, "simplify", simplify)
    info = ex.export_onnx(SmallNet(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert not info["simplified"] and info["notes"] == [f"{note}; kept the unsimplified model"]
    assert run_onnx(tmp_path / "m.onnx", torch.randn(3, 3, 16, 16)).shape == (3, 10)


@pytest.mark.parametrize(("opset", "says"), [(13, "opset 13 is too old"), (ex.MAX_OPSET + 1, "newer than")])
def test_opset_out_of_range_rejected(tmp_path: Path, opset: int, says: str) -> None:
    with pytest.raises(UserError, match=says):
        ex.export_onnx(SmallNet(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", opset=opset)


class Attend(nn.Module):
    """One self-attention step and a GELU MLP over tokens (what a ViT block runs)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.fc = heads, nn.Linear(dim, 3 * dim), nn.Sequential(nn.Linear(dim, 4 * dim),
                                                                                       nn.GELU(),
                                                                                       nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.fc(x + a)


@pytest.mark.parametrize(("opset", "fused"), [(18, set()), (20, {"Gelu"}), (23, {"Gelu", "Attention"})])
def test_newer_opset_writes_gelu_and_attention_as_one_op_and_reproduces(tmp_path: Path, opset: int,
                                                                         fused: set[str]) -> None:
    model = Attend().eval()
    x = torch.randn(3, 5, 16)
    info = ex.export_onnx(model, x, tmp_path / "m.onnx", opset=opset)
    assert info["opset"] == opset and {"Gelu", "Attention"} & set(info["op_counts"]) == fused
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), model(x).numpy(), atol=1e-5, rtol=1e-4)


def test_torchscript_fallback_caps_the_opset_at_its_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ex, "_export_dynamo", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("untraceable")))
    info = ex.export_onnx(SmallNet(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", opset=ex.MAX_OPSET)
    assert info["exporter"] == "torchscript" and info["opset"] == ex.TORCHSCRIPT_MAX_OPSET
    assert f"at opset {ex.TORCHSCRIPT_MAX_OPSET} (its newest)" in info["notes"][0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = SmallNet().eval()
    path = tmp_path_factory.mktemp("exp") / "m.onnx"
    ex.export_onnx(model, torch.randn(1, 3, 16, 16), path)
    return model, path


def corrupt(src: Path, dst: Path, scale: float) -> Path:
    """Perturb the largest initializer, the kind of damage a bad fold or a wrong transpose does."""
    proto = onnx.load(str(src))
    init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(init)
    rng = np.random.default_rng(0)
    init.CopyFrom(numpy_helper.from_array((arr + scale * rng.standard_normal(arr.shape)).astype(arr.dtype),
                                          init.name))
    onnx.save(proto, str(dst))
    return dst


def test_corrupted_model_fails_tolerance(exported, tmp_path: Path) -> None:
    model, path = exported
    bad = corrupt(path, tmp_path / "bad.onnx", scale=1e-2)
    result = ex.verify_onnx(bad, model, batches((3, 16, 16)), tolerated(min_top1=0.0))
    assert not result.passed and result.violations > 0
    assert result.reason.startswith("tolerance") and "top-1" not in result.reason


def test_tolerance_follows_the_output_scale(exported, tmp_path: Path) -> None:
    model, path = exported
    bad = corrupt(path, tmp_path / "bad.onnx", scale=1e-2)
    inputs = batches((3, 16, 16))
    strict = ex.verify_onnx(bad, model, inputs, tolerated(min_top1=0.0))
    with torch.no_grad():
        scale = max(float(model.eval()(x).abs().max()) for x in inputs)
    assert strict.ref_scale == pytest.approx(scale, rel=1e-6)
    assert strict.max_rel == pytest.approx(strict.max_abs / scale)
    assert not strict.passed and "of max |ref|" in strict.reason
    loose = ex.verify_onnx(bad, model, inputs, tolerated(min_top1=0.0, scale_tol=2 * strict.max_rel))
    assert loose.passed and loose.violations == 0
    no_scale = ex.verify_onnx(bad, model, inputs, tolerated(atol=2 * strict.max_abs, min_top1=0.0, scale_tol=0.0))
    assert no_scale.passed  # --atol alone still decides when the scale term is off


def test_top1_check_fails_on_its_own(exported) -> None:
    model, path = exported
    result = ex.verify_onnx(path, model, batches((3, 16, 16)), tolerated(atol=1.0, min_top1=1.01))
    assert not result.passed and result.violations == 0
    assert result.reason.startswith("top-1 agreement")


def test_verify_to_dict_and_print(exported, tmp_path: Path) -> None:
    model, path = exported
    good = ex.verify_onnx(path, model, batches((3, 16, 16)))
    assert ex.VerifyResult(**good.to_dict()) == good
    bad = ex.verify_onnx(corrupt(path, tmp_path / "bad.onnx", scale=1.0), model, batches((3, 16, 16), n=4))
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    ex.print_verify(good, console)
    ex.print_verify(bad, console)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("✓ max abs diff") and "≤ atol 1e-04" in lines[0] and "1e-04·max|ref|" in lines[0]
    assert f"max |diff| / max |ref| = {good.max_rel:.1e}" in lines[0]
    assert lines[3].startswith("✗ max abs diff") and "> atol" in lines[3]
    assert any(line.startswith("✗ top-1 agreement") and "< 0.99" in line for line in lines[3:])


def test_verify_needs_batches(exported) -> None:
    model, path = exported
    with pytest.raises(UserError, match="at least one"):
        ex.verify_onnx(path, model, [])


def test_mark_unverified(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    target = ex.mark_unverified(path)
    assert target == tmp_path / "model.unverified.onnx" and target.read_bytes() == b"x" and not path.exists()
