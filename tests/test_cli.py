"""CLI contract: exit codes and one-line error messages for bad input (no tracebacks)."""

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import make_image_folder
from conftest import run_cli as run

from easier_export.load.models import build_arch


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


def test_max_rounds_below_one_is_usage_error(capsys, image_folder):
    code, out = run(capsys, "compress", "cifar_resnet20", "--data", str(image_folder), "--max-rounds", "0")
    assert code == 2 and "Invalid value for '--max-rounds'" in out and "Traceback" not in out


def test_console_script_prints_one_line_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "easier_export.cli.app", "export", str(tmp_path / "missing.pt")],
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

    from easier_export.ship.schema import validate_report

    report = json.loads((out_dir / "report.json").read_text())
    assert validate_report(report) == []  # the real report keeps the schema's contract
    kept = [r for r in report["rounds"] if r["within_budget"]]
    assert sum(len(r["removed"]) for r in kept) == 2 and all(r["change"]["confidence"] == 0.9 for r in kept)
    assert report["verify"]["passed"]
    # what ships is a kept round measured faster than the original, or the original: which one is timing's call
    shipped = report["shipped"]
    assert shipped["round"] in [0] + [r["round"] for r in kept]
    assert report["compressed"]["removed"] == shipped["removed"]
    assert report["compressed"]["activations"] == report["original"]["activations"] - len(shipped["removed"])
    assert shipped["reason"] == "no speed-up found on this target" or shipped["speedup"]["low"] > 1
    assert report["data"]["preprocessing"]["resize"] is None  # the 16x16 images are used as they are
    meta = {p.key: p.value for p in onnx.load(str(out_dir / "model.onnx")).metadata_props}
    assert json.loads(meta["preprocessing"]) == report["data"]["preprocessing"]
    assert "preprocessing: images used as they are (16x16)" in out


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


def _sized_model(tmp_path: Path) -> Path:
    """A pickled module that declares no input size (like a CIFAR ResNet saved with torch.save(model))."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    path = tmp_path / "net.pt"
    torch.save(net, path)
    return path


def test_ctrl_c_exits_130_with_the_rounds_kept(capsys, image_folder, tmp_path, monkeypatch):
    from easier_export.loop import linearize as loop_mod

    real, calls = loop_mod.finetune, []

    def interrupted_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "finetune", interrupted_in_round_2)
    out = tmp_path / "lin"
    code, text = run(capsys, "linearize", str(_sized_model(tmp_path)), "--trust-pickle", "--data", str(image_folder),
                     "--out", str(out), "--workers", "0", "--batch-size", "4", "--max-drop", "100",
                     "--entropy-batches", "1", "--finetune-epochs", "0.1")
    assert code == 130 and text.strip().splitlines()[-1] == (
        "interrupted: 1 round(s) kept; rerun the same command to resume"), text
    assert "Traceback" not in text


def test_size_from_data_and_near_chance_warning(capsys, image_folder, tmp_path):
    code, text = run(capsys, "linearize", str(_sized_model(tmp_path)), "--trust-pickle", "--data", str(image_folder),
                     "--out", str(tmp_path / "lin"), "--workers", "0", "--batch-size", "4", "--max-removed", "0")
    assert code == 0, text
    flat = " ".join(text.split())
    assert "declares no input size: using 16x16, the size of every image in" in flat
    assert "warning: the original model is near chance" in flat


def test_images_of_several_sizes_without_a_declared_size_is_a_one_line_usage_error(capsys, image_folder, tmp_path):
    from PIL import Image

    Image.new("RGB", (24, 24), (200, 0, 0)).save(image_folder / "train" / "class0" / "big.png")
    out = tmp_path / "lin"
    code, text = run(capsys, "linearize", str(_sized_model(tmp_path)), "--trust-pickle", "--data", str(image_folder),
                     "--out", str(out), "--workers", "0", "--batch-size", "4")
    assert code == 2 and "Traceback" not in text
    assert text.strip().splitlines()[-1].endswith("differ in size: pass --input-size"), text
    assert not (out / "state.pt").exists()


def test_export_dry_runs_at_the_input_size(capsys, tmp_path):
    out = tmp_path / "vit.onnx"
    code, text = run(capsys, "export", "timm:vit_tiny_patch16_224", "--num-classes", "3", "--input-size", "7",
                     "--out", str(out))
    assert code == 2 and "does not run on 3x7x7 inputs" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 2 and not out.exists()  # the random-weights note, then the error


def test_every_loop_setting_is_an_option_of_the_loop_commands():
    """LoopConfig is the one declaration: each field (with its help) is an option of compress and linearize."""
    import dataclasses

    import typer

    from easier_export.cli.app import app
    from easier_export.loop.config import LoopConfig

    group = typer.main.get_command(app)
    for name in ("compress", "linearize"):
        params = {p.name: p for p in group.commands[name].params}
        for f in dataclasses.fields(LoopConfig):
            assert f.metadata.get("help"), f"LoopConfig.{f.name} needs metadata={{'help': ...}}"
            if (name, f.name) == ("linearize", "target_speedup"):  # needs compress's end-to-end probe
                continue
            assert f.name in params and params[f.name].help.startswith(f.metadata["help"]), (name, f.name)


@pytest.mark.parametrize(("flag", "value", "says"), [("--anneal", "1.5", "Invalid value for '--anneal'"),
                                                     ("--distill", "-0.1", "Invalid value for '--distill'"),
                                                     ("--distill-temperature", "0",
                                                      "--distill-temperature': must be positive"),
                                                     ("--substitute", "zero", "Invalid value for '--substitute'")])
def test_bad_loop_option_is_a_one_line_usage_error(capsys, image_folder, flag, value, says):
    code, out = run(capsys, "compress", "cifar_resnet20", "--data", str(image_folder), flag, value)
    assert code == 2 and says in out and "Traceback" not in out
