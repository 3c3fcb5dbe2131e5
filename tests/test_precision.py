"""INT8 / FP16 conversion (onnxruntime's tools), the budget check on the converted file, the fallback order, the
planner's timing in the shipped precision and the four-way latency rows: no wall-clock assertion (races are
scripted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli
from torch import nn

from easier_export.core.errors import UserError
from easier_export.core.quantize import (
    BatchReader,
    Calibration,
    convert_fp16,
    edge_layers,
    quantize_int8,
)
from easier_export.core.stats import Speedup, paired_accuracy_change
from easier_export.load.task import FLOAT16, INT8
from easier_export.ship.export import export_onnx, verify_onnx
from easier_export.ship.precision import Judged, candidates, choose_precision
from easier_export.ship.tables import summary_rows


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("precision") / "net.onnx"
    export_onnx(small_net(), torch.randn(1, 3, 8, 8), path)
    return path


def batches(n: int = 3, size: int = 8) -> list[torch.Tensor]:
    return [torch.randn(size, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_reader_feeds_each_batch_once_under_the_input_name_and_rewinds() -> None:
    data = [np.full((2, 3), i, dtype=np.float32) for i in range(3)]
    reader = BatchReader("pixels", data)
    fed = [reader.get_next() for _ in range(4)]
    assert [None if f is None else float(f["pixels"][0, 0]) for f in fed] == [0.0, 1.0, 2.0, None]
    reader.rewind()
    assert float(reader.get_next()["pixels"][0, 0]) == 0.0


def test_calibration_describes_its_batches_and_refuses_unknown_methods() -> None:
    cal = Calibration.of(batches(2, size=5), "percentile")
    assert cal.describe() == {"method": "percentile", "batches": 2, "samples": 10}
    with pytest.raises(UserError, match="--calib-method must be one of minmax, entropy, percentile"):
        Calibration.of(batches(1), "kl")


def test_int8_is_static_qdq_per_channel_and_agrees_with_fp32(fp32_file: Path, tmp_path: Path) -> None:
    info = quantize_int8(fp32_file, tmp_path / "q.onnx", Calibration.of(batches()))
    ops = info["op_counts"]
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]  # weights dequantized too
    weight_scales = [t for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer
                     if t.name.endswith("scale") and len(t.dims) == 1 and t.dims[0] == 8]
    assert weight_scales  # per-channel: one scale per output channel of the 8-channel convs
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    zero_points = {t.name: t.data_type for t in graph.initializer}
    activation_zps = [zero_points[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert set(activation_zps) == {onnx.TensorProto.UINT8}  # U8S8 on a CPU: onnxruntime's fast x86 kernels
    assert info["mode"] == "static QDQ, per-channel weights, uint8 activations"
    model = small_net()
    result = verify_onnx(tmp_path / "q.onnx", model, batches(4), INT8)
    assert result.passed and not result.numeric and result.max_abs > 0  # judged on agreement, not 1e-4


def test_int8_of_a_float_model_needs_calibration(fp32_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="INT8 needs calibration data: give --data"):
        quantize_int8(fp32_file, tmp_path / "q.onnx", None)
    assert not (tmp_path / "q.onnx").exists()


def test_a_file_onnxruntime_cannot_quantize_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="onnxruntime cannot quantize bad.onnx to INT8"):
        quantize_int8(bad, tmp_path / "q.onnx", Calibration.of(batches(1)))


def test_fp16_keeps_float32_input_and_output(fp32_file: Path, tmp_path: Path) -> None:
    convert_fp16(fp32_file, tmp_path / "h.onnx")
    graph = onnx.load(str(tmp_path / "h.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert verify_onnx(tmp_path / "h.onnx", small_net(), batches(2), FLOAT16).passed


def test_edge_layers_are_the_first_and_last_weighted_nodes(fp32_file: Path) -> None:
    nodes = [n for n in onnx.load(str(fp32_file)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert edge_layers(fp32_file) == [nodes[0].name, nodes[-1].name]


def judged_by(changes: dict[str, float], n: int = 1000) -> object:
    """A judge that gives a file whose name contains a key the paired change of losing that share of ``n``
    images (constructed per-image outcomes), within budget when the bound is above -1 point at 90 %."""
    def judge(path: Path) -> Judged:
        key = next(k for k in sorted(changes, key=len, reverse=True) if k in path.name)
        base = torch.ones(n)
        cand = base.clone()
        cand[: int(changes[key] * n)] = 0
        change = paired_accuracy_change(base, cand, 0.9)
        return Judged(100.0 * float(cand.mean()), change, change.bound >= -1.0)

    return judge


def passing(path: Path, precision: str) -> dict:
    return {"passed": True, "reason": ""}


def no_race(files: dict, baseline: str) -> None:
    raise AssertionError("only auto races")


def test_int8_within_budget_ships(fp32_file: Path, tmp_path: Path) -> None:
    choice = choose_precision("int8", fp32_file, "cpu", tmp_path, Calibration.of(batches()), passing,
                              judged_by({"int8": 0.001}), no_race)
    assert choice.shipped == "int8" and [c.label for c in choice.tried] == ["int8"]
    assert choice.chosen.judged.within


def test_int8_over_budget_keeps_the_edge_layers_in_fp32_then_ships_fp32(fp32_file: Path, tmp_path: Path) -> None:
    """A constructed INT8 file that loses 3 % of the images breaks a 1-point budget: the edge layers go back to
    FP32 (here within budget: it ships); when that loses too, FP32 ships and the reason gives both changes."""
    cal = Calibration.of(batches())
    rescued = choose_precision("int8", fp32_file, "cpu", tmp_path, cal, passing,
                               judged_by({"int8": 0.03, "edges": 0.002}), no_race)
    assert rescued.shipped == "int8" and [c.label for c in rescued.tried] == ["int8", "int8 (2 layers FP32)"]
    assert rescued.chosen.export["fp32_nodes"] == edge_layers(fp32_file)
    lost = choose_precision("int8", fp32_file, "cpu", tmp_path, cal, passing, judged_by({"int8": 0.03}), no_race)
    assert lost.shipped == "fp32" and lost.chosen is None
    assert "no conversion keeps the budget" in lost.reason and "-3.00" in lost.reason


def test_a_conversion_that_fails_verification_never_ships(fp32_file: Path, tmp_path: Path) -> None:
    def failing(path: Path, precision: str) -> dict:
        return {"passed": False, "reason": "top-1 agreement 0.5 < 0.9"}

    choice = choose_precision("int8", fp32_file, "cpu", tmp_path, Calibration.of(batches()), failing,
                              judged_by({"int8": 0.0}), no_race)
    assert choice.shipped == "fp32" and len(choice.tried) == 2


@pytest.mark.parametrize(("speed", "shipped"), [(Speedup(1.5, 1.3, 1.7, 6), "int8"),
                                                 (Speedup(1.05, 0.95, 1.2, 6), "fp32"),
                                                 (Speedup(0.6, 0.55, 0.65, 6), "fp32"),
                                                 (None, "fp32")])
def test_auto_ships_int8_only_when_faster_than_fp32_beyond_the_noise(fp32_file: Path, tmp_path: Path,
                                                                    speed: Speedup | None, shipped: str) -> None:
    raced = []

    def race(files: dict, baseline: str) -> dict | None:
        raced.append((sorted(files), baseline))
        return None if speed is None else {k: speed for k in files if k != baseline}

    choice = choose_precision("auto", fp32_file, "cpu", tmp_path, Calibration.of(batches()), passing,
                              judged_by({"int8": 0.0}), race)
    assert choice.shipped == shipped and raced == [(["fp32", "int8"], "fp32")]
    assert (choice.chosen is None) == (shipped == "fp32")


def test_auto_tries_fp16_only_on_a_gpu_target() -> None:
    assert candidates("auto", "cpu") == ["int8"] and candidates("auto", "cuda") == ["int8", "fp16"]
    assert candidates("fp32", "cuda") == [] and candidates("fp16", "cpu") == ["fp16"]


def test_fp32_asked_converts_nothing(fp32_file: Path, tmp_path: Path) -> None:
    choice = choose_precision("fp32", fp32_file, "cpu", tmp_path, None, passing, judged_by({}), no_race)
    assert choice.shipped == "fp32" and choice.tried == [] and not list(tmp_path.iterdir())


def test_planner_times_merges_in_the_shipped_precision() -> None:
    from easier_export.fold.latency import LatencyTable
    from easier_export.fold.segments import SegmentSpec, segment_graph

    spec = SegmentSpec([nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)], (1, 8, 4, 4))
    graph = segment_graph(spec)
    fp32 = LatencyTable("cpu", threads=1)
    assert fp32._deployed(graph, spec.in_shape) is graph
    int8 = LatencyTable("cpu", threads=1, precision="int8")._deployed(graph, spec.in_shape)
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("Conv") == 2 and "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_four_way_latency_rows_give_compound_and_marginal_speedups() -> None:
    common = {"backend": "onnxruntime", "provider": "CPUExecutionProvider", "device": "cpu", "batch": 1,
              "spread": 0.01, "noisy": False}
    bench = [{"label": label, "p50_ms": ms, **common} for label, ms in
             (("original", 4.0), ("folded", 2.0), ("original-int8", 3.0), ("folded-int8", 1.5))]
    stats = {"activations": 5, "params": 10, "flops": 20, "conv_linear_depth": 3, "onnx_bytes": 100}
    report = {"original": {"top1": 90.0, **stats}, "compressed": {"top1": 89.5, **stats}, "bench": bench,
              "precision": {"asked": "int8", "shipped": "int8", "reason": "asked for int8", "tried": []}}
    rows = {name: (orig, comp, change) for name, orig, comp, change in summary_rows(report)}
    assert rows["precision"] == ("FP32", "INT8", "asked for int8")
    assert rows["p50 latency onnxruntime cpu b1 (ms, compressed INT8)"] == (
        "4.000", "1.500", "×2.67 vs FP32 original; ×2.00 vs INT8 original")
    assert rows["p50 latency onnxruntime cpu b1 (ms, folded)"][2] == "×2.00 speed-up"


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--precision", "int4", "'int4' is not one of 'fp32', 'int8', 'fp16', 'auto'"),
    ("--calib-method", "kl", "'kl' is not one of 'minmax', 'entropy', 'percentile'"),
    ("--calib-batches", "0", "--calib-batches': must be at least 1"),
])
def test_conversion_options_out_of_range_are_one_line_usage_errors(capsys: pytest.CaptureFixture, option: str,
                                                                     value: str, says: str) -> None:
    code, out = run_cli(capsys, "export", "cifar_resnet20", option, value)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], out


def test_export_int8_without_data_is_one_line_and_writes_nothing(capsys: pytest.CaptureFixture,
                                                                 tmp_path: Path) -> None:
    code, out = run_cli(capsys, "export", "cifar_resnet20", "--precision", "int8", "--out",
                        str(tmp_path / "net.onnx"))
    assert code == 2 and out.strip().splitlines() == [
        "error: --precision int8 needs --data: INT8 ranges are calibrated on its train/ split and every "
        "conversion is judged against the FP32 file on its val/ split"]
    assert not list(tmp_path.iterdir())


@pytest.fixture
def resnet_weights(tmp_path: Path) -> Path:
    from easier_export.load.models import build_arch

    path = tmp_path / "resnet20.pt"
    torch.save(build_arch("cifar_resnet20", num_classes=3).state_dict(), path)
    return path


def test_fold_with_a_conversion_but_no_data_is_one_line_and_writes_nothing(capsys: pytest.CaptureFixture,
                                                                          tmp_path: Path) -> None:
    code, out = run_cli(capsys, "fold", "cifar_resnet20", "--precision", "auto", "--out", str(tmp_path / "f"))
    assert code == 2 and out.startswith("error: --precision auto needs --data") and not (tmp_path / "f").exists()


def test_export_int8_ships_int8_and_keeps_the_fp32_file(capsys: pytest.CaptureFixture, image_folder: Path,
                                                        resnet_weights: Path, tmp_path: Path) -> None:
    """A budget the few val images can resolve (--max-drop 100): the INT8 file takes OUT's name, the FP32 file
    stays beside it, the attempts not chosen are removed."""
    out = tmp_path / "out" / "net.onnx"
    code, text = run_cli(capsys, "export", "cifar_resnet20", "--weights", str(resnet_weights), "--num-classes", "3",
                         "--input-size", "16", "--data", str(image_folder), "--out", str(out), "--precision",
                         "int8", "--calib-batches", "1", "--max-drop", "100")
    assert code == 0, text
    assert sorted(p.name for p in out.parent.iterdir()) == ["net.fp32.onnx", "net.onnx"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "QuantizeLinear" not in {n.op_type for n in onnx.load(
        str(out.parent / "net.fp32.onnx")).graph.node}
    assert "INT8 (asked for int8)" in text


def test_compress_int8_ships_int8_with_the_four_files_and_the_report(capsys: pytest.CaptureFixture,
                                                                     image_folder: Path, resnet_weights: Path,
                                                                     tmp_path: Path, merges_ship: None) -> None:
    import json

    from easier_export.ship.schema import validate_report

    out = tmp_path / "run"
    code, text = run_cli(capsys, "compress", "cifar_resnet20", "--weights", str(resnet_weights), "--num-classes",
                         "3", "--data", str(image_folder), "--input-size", "16", "--out", str(out), "--max-drop",
                         "100", "--max-removed", "1", "--finetune-epochs", "0.5", "--batch-size", "4", "--workers",
                         "0", "--bench-batches", "1", "--bench-seconds", "0.2", "--entropy-batches", "1",
                         "--select", "entropy", "--precision", "int8", "--calib-batches", "1")
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert validate_report(report) == []
    precision = report["precision"]
    assert precision["asked"] == precision["shipped"] == "int8" and precision["tried"][0]["judged"]["within_budget"]
    assert precision["quantized_original"]["precision"] == "int8" and precision["calibration"]["batches"] == 1
    assert report["export"]["precision"] == "int8" and report["verify"]["numeric"] is False
    assert {"original", "folded", "original-int8", "folded-int8"} <= {r["label"] for r in report["bench"]}
    assert (out / "onnx" / "model.fp32.onnx").is_file() and (out / "onnx" / "original.int8.onnx").is_file()
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert report["settings"]["precision"] == "int8"


def test_token_id_models_are_quantized_dynamically_without_calibration(tmp_path: Path) -> None:
    """Text models read token ids: their Linear weights go to INT8 and activations are quantized at run time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 50)).eval()
    ids = torch.randint(0, 50, (2, 8))
    export_onnx(model, ids, tmp_path / "lm.onnx")
    info = quantize_int8(tmp_path / "lm.onnx", tmp_path / "lm8.onnx", None)
    assert info["mode"] == "dynamic" and info["calibration"] is None
    assert any(op.startswith("DynamicQuantize") or op == "MatMulInteger" for op in info["op_counts"])
    out = run(tmp_path / "lm8.onnx", ids.numpy())
    assert out.shape == (2, 8, 50) and (out.argmax(-1) == model(ids).argmax(-1).numpy()).mean() > 0.8


def test_calibration_is_the_same_whatever_the_rounds_drew_before(image_folder: Path) -> None:
    from easier_export.deploy import calibration_of
    from easier_export.load.data import open_image_folder
    from easier_export.load.task import ImageTask

    folder = open_image_folder(image_folder, 3)
    loaders = ImageTask().loaders(folder, (3, 16, 16), 4, 0, 7)
    first = calibration_of(loaders, 2, "minmax", 7)
    for _ in range(3):  # rounds of finetuning advance the loader's shuffling
        list(loaders.train)
    again = calibration_of(loaders, 2, "minmax", 7)
    assert all(np.array_equal(a, b) for a, b in zip(first.batches, again.batches, strict=True))
