"""CLI contract: exit codes and one-line error messages for bad input (no tracebacks)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from conftest import run_cli as run

from easier_export.models import build_arch


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "resnet20.pt"
    torch.save(build_arch("cifar_resnet20", num_classes=3).state_dict(), path)
    return path


def test_missing_weights_file(capsys, image_folder, tmp_path):
    code, out = run(capsys, "compress", "cifar_resnet20", "--data", str(image_folder),
                    "--weights", str(tmp_path / "nope.pt"))
    assert code == 2 and "no such file" in out and "Traceback" not in out


def test_unknown_model_suggests(capsys, image_folder):
    code, out = run(capsys, "compress", "timm:resnet1", "--data", str(image_folder))
    assert code == 2 and "unknown timm model 'resnet1'" in out and "Did you mean" in out


def test_state_dict_mismatch(capsys, image_folder, weights):
    code, out = run(capsys, "compress", str(weights), "--arch", "demo_cnn", "--data", str(image_folder))
    assert code == 2 and "does not match the architecture" in out and "missing" in out


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split(capsys, tmp_path, missing, weights):
    root = make_image_folder(tmp_path / "d", splits=tuple(s for s in ("train", "val") if s != missing))
    code, out = run(capsys, "compress", "cifar_resnet20", "--weights", str(weights), "--num-classes", "3",
                    "--data", str(root))
    assert code == 2 and f"no '{missing}/' folder" in out


def test_empty_class_folder(capsys, image_folder, weights):
    (image_folder / "train" / "class9").mkdir()
    (image_folder / "val" / "class9").mkdir()
    code, out = run(capsys, "compress", "cifar_resnet20", "--weights", str(weights), "--num-classes", "3",
                    "--data", str(image_folder))
    assert code == 2 and "class9" in out


def test_class_count_differs_from_head(capsys, image_folder):
    code, out = run(capsys, "compress", "cifar_resnet20", "--data", str(image_folder))
    assert code == 2 and "3 classes but the model predicts 10" in out and "--num-classes" in out


def test_pickle_without_trust(capsys, image_folder, tmp_path):
    path = tmp_path / "net.pt"
    torch.save(build_arch("cifar_resnet20", num_classes=3), path)
    code, out = run(capsys, "compress", str(path), "--data", str(image_folder))
    assert code == 2 and "--trust-pickle" in out and "weights_only" in out


def test_output_dir_not_writable(capsys, image_folder, weights, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = run(capsys, "compress", "cifar_resnet20", "--weights", str(weights), "--num-classes", "3",
                    "--data", str(image_folder), "--out", str(blocker / "out"))
    assert code == 2 and "not writable" in out


def test_bad_option_value_is_usage_error(capsys, image_folder):
    code, out = run(capsys, "compress", "cifar_resnet20", "--data", str(image_folder), "--fold", "sometimes")
    assert code == 2 and "Invalid value for '--fold'" in out and "'auto', 'all', 'none'" in out


def test_console_script_prints_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "easier_export.cli", "export", str(tmp_path / "missing.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == [f"error: no such file: {tmp_path / 'missing.pt'}"]


def test_compress_end_to_end_on_image_folder(capsys, image_folder, weights, tmp_path):
    out_dir = tmp_path / "run"
    code, out = run(capsys, "compress", "cifar_resnet20", "--weights", str(weights), "--num-classes", "3",
                    "--data", str(image_folder), "--input-size", "16", "--out", str(out_dir),
                    "--max-drop", "100", "--max-removed", "2", "--finetune-epochs", "1", "--batch-size", "4",
                    "--workers", "0", "--bench-batches", "1", "--fold", "all", "--entropy-batches", "2",
                    "--select", "entropy")
    assert code == 0, out
    for name in ("model.onnx", "linearized.pt", "report.json", "report.md", "state.pt"):
        assert (out_dir / name).is_file(), name
    import json

    report = json.loads((out_dir / "report.json").read_text())
    assert len(report["compressed"]["removed"]) == 2
    assert report["verify"]["passed"]
    assert report["compressed"]["activations"] == report["original"]["activations"] - 2


def test_cuda_device_without_gpu_is_a_usage_error(capsys, image_folder, weights):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out = run(capsys, "compress", "cifar_resnet20", "--weights", str(weights), "--num-classes", "3",
                    "--data", str(image_folder), "--device", "cuda")
    assert code == 2 and "no such CUDA device" in out


def test_input_size_the_model_cannot_take(capsys, image_folder):
    code, out = run(capsys, "compress", "torchvision:vgg16_bn", "--num-classes", "3", "--data", str(image_folder),
                    "--input-size", "8")
    assert code == 2 and "does not run on 3x8x8 inputs" in out and "Traceback" not in out


def test_cuda_fold_target_without_gpu_is_a_usage_error(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out = run(capsys, "fold", "demo_cnn", "--out", str(tmp_path), "--target", "cuda")
    assert code == 2 and "--target cuda needs a usable GPU" in out
