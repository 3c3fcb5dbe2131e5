"""The stage subcommands on small inputs: entropy, linearize → fold, export (incl. exit 3), bench."""

import json

import numpy as np
import onnx
import torch
from conftest import run_cli as run
from onnx import numpy_helper

from easier_export import pipeline
from easier_export.load.models import build_arch


def _weights(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(build_arch("cifar_resnet20", num_classes=3).state_dict(), path)
    return path


def test_entropy_command_writes_table_json_and_plot(capsys, image_folder, tmp_path):
    out, plot = tmp_path / "e.json", tmp_path / "e.png"
    code, text = run(capsys, "entropy", "cifar_resnet20", "--weights", str(_weights(tmp_path)), "--num-classes", "3",
                     "--data", str(image_folder), "--input-size", "16", "--workers", "0", "--out", str(out),
                     "--plot", str(plot))
    assert code == 0, text
    sites = json.loads(out.read_text())["sites"]
    assert len(sites) == 19 and all(0.0 <= s["entropy"] <= 1.0 for s in sites)
    assert "relu" in text and plot.stat().st_size > 1000


def test_linearize_then_fold_commands(capsys, image_folder, tmp_path):
    args = ["--num-classes", "3", "--data", str(image_folder), "--input-size", "16", "--workers", "0"]
    code, text = run(capsys, "linearize", "cifar_resnet20", "--weights", str(_weights(tmp_path)), *args,
                     "--out", str(tmp_path / "lin"), "--max-drop", "100", "--max-removed", "3",
                     "--entropy-batches", "1", "--batch-size", "4")
    assert code == 0, text
    code, text = run(capsys, "fold", str(tmp_path / "lin" / "linearized.pt"), "--out", str(tmp_path / "fold"),
                     "--fold", "all")
    assert code == 0, text
    plan = json.loads((tmp_path / "fold" / "fold_plan.json").read_text())
    assert any(r["kind"] == "batchnorm" and r["applied"] for r in plan)
    assert (tmp_path / "fold" / "folded.pt2").is_file() and (tmp_path / "fold" / "model.onnx").is_file()


def test_export_corrupted_onnx_fails_verification_with_exit_3(capsys, tmp_path, monkeypatch):
    real_export = pipeline.export_onnx

    def corrupting_export(*args, **kwargs):
        info = real_export(*args, **kwargs)
        model = onnx.load(info["path"])
        weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
        onnx.save(model, info["path"])
        return info

    monkeypatch.setattr(pipeline, "export_onnx", corrupting_export)
    out = tmp_path / "m.onnx"
    code, text = run(capsys, "export", "demo_cnn", "--out", str(out))
    assert code == 3, text
    assert "✗" in text and "does not reproduce" in text
    assert not out.exists() and (tmp_path / "m.unverified.onnx").is_file()


def test_export_and_bench_commands(capsys, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for path in (a, b):
        code, text = run(capsys, "export", "demo_cnn", "--out", str(path))
        assert code == 0 and "✓" in text
    rows_path = tmp_path / "rows.json"
    code, text = run(capsys, "bench", str(a), str(b), "--bench-batches", "1", "--bench-seconds", "0.2", "--json",
                     str(rows_path))
    assert code == 0, text
    rows = json.loads(rows_path.read_text())
    assert {r["label"] for r in rows} == {"a", "b"} and all(r["p50_ms"] > 0 for r in rows)
    assert "speed-up" in text


def test_export_opset_option(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    code, text = run(capsys, "export", "demo_cnn", "--out", str(out), "--opset", "20")
    assert code == 0 and "✓" in text
    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")) == 20
    code, text = run(capsys, "fold", "demo_cnn", "--out", str(tmp_path / "fold"), "--fold", "none", "--opset", "20")
    assert code == 0, text
    assert next(o.version for o in onnx.load(str(tmp_path / "fold" / "model.onnx")).opset_import
                if o.domain in ("", "ai.onnx")) == 20
    code, text = run(capsys, "export", "demo_cnn", "--out", str(tmp_path / "old.onnx"), "--opset", "17")
    assert code == 2 and "Invalid value for '--opset'" in text and "Traceback" not in text
    assert not (tmp_path / "old.onnx").exists()
