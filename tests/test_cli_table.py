"""Every command through missing, garbage, truncated, wrong-shape and hostile inputs: the exit code, one line, no
traceback, and nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import make_image_folder
from conftest import run_cli as run
from PIL import Image

from easier_export.load.models import build_arch, load_model
from easier_export.load.task import IMAGENET_MEAN
from easier_export.ship.export import export_onnx

MARKER = "pwned"


class Hostile:
    """Unpickling this runs a shell command: weights_only loading must refuse it, never run it."""

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {MARKER}",)


class Flip(torch.nn.Module):
    """A data-dependent branch: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x if x.mean() > 0 else x


class Branchy(torch.nn.Module):
    """Data-dependent branches in its own forward and in a child's: torch.fx cannot trace it, not even with the
    child as a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.flip = torch.nn.Conv2d(3, 3, 3), Flip()
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.flip(self.conv(x))
        if y.mean() > 0:
            y = 2 * y
        return self.head(y)


def _pickled_from_a_module_gone(root: Path) -> Path:
    """A pickled module whose class lived in a module that cannot be imported any more (a training script's)."""
    src = root / "gone_models.py"
    src.write_text("import torch\n\n\nclass GoneNet(torch.nn.Sequential):\n    pass\n")
    spec = importlib.util.spec_from_file_location("gone_models", src)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gone_models"] = module
    try:
        spec.loader.exec_module(module)
        torch.save(module.GoneNet(torch.nn.Conv2d(3, 3, 3), torch.nn.ReLU()), root / "gone.pt")
    finally:
        del sys.modules["gone_models"]
    src.unlink()
    return root / "gone.pt"


def _hf_with_pickled_weights(root: Path) -> Path:
    """A GPT-2 directory whose pytorch_model.bin pickles an object besides the tensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    model.save_pretrained(root)
    (root / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "extra": Hostile()}, root / "pytorch_model.bin")
    return root


def _cut(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def _folder_with(root: Path, name: str, content: bytes | None) -> Path:
    """A good 3-class ImageFolder plus one bad file in train/class0 (``None``: a JPEG cut in half)."""
    make_image_folder(root)
    jpeg = root / "train" / "class0" / name
    if content is None:  # headers intact, the end of the scan missing
        noise = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        Image.fromarray(noise.numpy()).save(jpeg)
        jpeg.write_bytes(jpeg.read_bytes()[:-500])
    else:
        jpeg.write_bytes(content)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    files = {"sd": root / "sd.pt", "garbage": root / "garbage.pt", "missing": root / "missing.pt",
             "wrong_shape": root / "demo.pt", "hostile": root / "hostile.pt"}
    torch.save(build_arch("cifar_resnet20", num_classes=3).state_dict(), files["sd"])
    files["garbage"].write_text("this is not a model\n")
    files["truncated"] = _cut(files["sd"], root / "truncated.pt")
    torch.save(build_arch("demo_cnn").state_dict(), files["wrong_shape"])
    torch.save({"conv1.weight": Hostile()}, files["hostile"])
    files["data"] = make_image_folder(root / "data")
    files["data_truncated"] = _folder_with(root / "data_truncated", "cut.jpg", None)
    files["data_hostile"] = _folder_with(root / "data_hostile", "evil.jpg", os.urandom(2048))
    files["data_wrong_shape"] = make_image_folder(root / "data_2classes", classes=2)
    files["data_one_class"] = make_image_folder(root / "data_1class", classes=1)
    files["state_dir"] = root / "state"
    files["state_dir"].mkdir()
    (files["state_dir"] / "state.pt").write_bytes(b"")
    files["bn1d"] = root / "bn1d.pt"  # BatchNorm over features alone: cannot train on batches of one
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, 3)), files["bn1d"])
    files["one_out"] = root / "one_out.pt"  # a single-class "classifier"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 1)), files["one_out"])
    files["three_out"] = root / "three_out.pt"  # a pickled 3-class module: its head is fixed
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 3)), files["three_out"])
    files["static_pt2"] = root / "static.pt2"  # nn.Sequential's forward argument is `input`, not `x`
    torch.export.save(torch.export.export(torch.load(files["three_out"], weights_only=False).eval(),
                                          (torch.randn(1, 3, 16, 16),)), files["static_pt2"])
    files["unimportable"] = _pickled_from_a_module_gone(root)
    files["branchy"] = root / "branchy.pt"
    torch.save(Branchy(), files["branchy"])
    files["hf_pickled"] = _hf_with_pickled_weights(root / "hf_pickled")
    files["symlink_loop"] = root / "loop.pt"
    files["symlink_loop"].symlink_to(files["symlink_loop"].name)
    files["data_image_loop"] = _folder_with(root / "data_image_loop", "loop.png", b"")
    (files["data_image_loop"] / "train" / "class0" / "loop.png").unlink()
    (files["data_image_loop"] / "train" / "class0" / "loop.png").symlink_to("loop.png")
    files["demo_dir"] = root / "demo"
    files["demo_dir"].mkdir()
    _cut(files["sd"], files["demo_dir"] / "demo_invres.pt")

    net = build_arch("demo_cnn").eval()
    files["onnx"] = root / "a.onnx"
    export_onnx(net, torch.randn(1, 1, 16, 16), files["onnx"], simplify=False)
    export_onnx(net, torch.randn(1, 1, 12, 12), root / "b12.onnx", simplify=False)
    files["onnx_wrong_shape"] = root / "b12.onnx"
    files["onnx_other_outputs"] = root / "five.onnx"
    export_onnx(build_arch("demo_cnn", num_classes=5).eval(), torch.randn(1, 1, 16, 16), files["onnx_other_outputs"],
                simplify=False)
    files["onnx_truncated"] = _cut(files["onnx"], root / "cut.onnx")
    files["onnx_garbage"] = root / "garbage.onnx"
    files["onnx_garbage"].write_bytes(os.urandom(4096))
    proto = onnx.load(str(files["onnx"]))
    weight = proto.graph.initializer[0]  # points its data at a file outside the model's folder
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../../../../../etc/passwd")
    files["onnx_hostile"] = root / "hostile.onnx"
    onnx.save(proto, str(files["onnx_hostile"]))
    return files


MODEL = {  # MODEL inputs: the args that select it, what the one line must say
    "missing": (["{missing}", "--arch", "cifar_resnet20"], "no such file"),
    "garbage": (["{garbage}", "--arch", "cifar_resnet20"], "is not a PyTorch file"),
    "truncated": (["{truncated}", "--arch", "cifar_resnet20"], "cannot read"),
    "wrong_shape": (["{wrong_shape}", "--arch", "cifar_resnet20", "--num-classes", "3"], "does not match"),
    "hostile": (["{hostile}", "--arch", "cifar_resnet20"], "--trust-pickle"),
    "unimportable": (["{unimportable}", "--trust-pickle"], "class gone_models.GoneNet cannot be imported here"),
    "static_batch": (["{static_pt2}"], "dynamic_shapes=({0: torch.export.Dim('batch')},)"),
    "symlink_loop": (["{symlink_loop}"], "loop.pt is a symlink to nothing (a loop or a missing target)"),
}
GOOD_MODEL = ["{sd}", "--arch", "cifar_resnet20", "--num-classes", "3"]
DATA = {
    "missing": ("{missing}", "does not exist"),
    "garbage": ("{garbage}", "is not a directory"),
    "truncated": ("{data_truncated}", "cut.jpg: truncated JPEG"),
    "wrong_shape": ("{data_wrong_shape}", "2 classes but the model predicts 3"),
    "hostile": ("{data_hostile}", "evil.jpg: not a readable image"),
    "symlink_loop": ("{symlink_loop}", "loop.pt leads into a symlink loop"),
    "image_symlink_loop": ("{data_image_loop}", "Too many levels of symbolic links); fix or remove it"),
}
ONNX = {
    "missing": (["{onnx}", "{missing}"], "no such file"),
    "garbage": (["{onnx}", "{onnx_garbage}"], "is not a valid ONNX model"),
    "truncated": (["{onnx}", "{onnx_truncated}"], "is not a valid ONNX model"),
    "wrong_shape": (["{onnx}", "{onnx_wrong_shape}"], "only models of one input shape compare"),
    "other_outputs": (["{onnx}", "{onnx_other_outputs}"], "outputs 5 per input but"),
    "hostile": (["{onnx_hostile}"], "is not a valid ONNX model"),
    "symlink_loop": (["{onnx}", "{symlink_loop}"], "loop.pt leads into a symlink loop"),
}
OUT = "{tmp}/out"


def _cases() -> list:
    cases = []
    for command in ("compress", "entropy", "linearize"):
        out = ["--out", OUT + (".json" if command == "entropy" else "")]
        for kind, (model, says) in MODEL.items():
            cases.append((command, f"model-{kind}", [*model, "--data", "{data}", *out], says))
        for kind, (data, says) in DATA.items():
            cases.append((command, f"data-{kind}", [*GOOD_MODEL, "--data", data, *out], says))
        cases.append((command, "garbage-option", [*GOOD_MODEL, "--data", "{data}", "--batch-size", "abc", *out],
                      "Invalid value for '--batch-size'"))
        cases.append((command, "one-class", [*GOOD_MODEL[:-1], "1", "--data", "{data_one_class}", *out],
                      "Invalid value for '--num-classes'"))
        cases.append((command, "one-class-data", ["{one_out}", "--trust-pickle", "--input-size", "16", "--data",
                                                  "{data_one_class}", *out], "classifying needs 2 or more"))
        cases.append((command, "classes-of-a-fixed-head", ["{three_out}", "--trust-pickle", "--input-size", "16",
                                                          "--data", "{data_wrong_shape}", *out],
                      "2 classes but the model predicts 3 (its head is fixed in this form: replace the head"))
        cases.append((command, "batchnorm1d-batch-of-one", ["{bn1d}", "--trust-pickle", "--input-size", "16",
                                                            "--data", "{data}",
                                                            "--batch-size", "1", "--workers", "0", *out],
                      "use --batch-size 2 or more"))
    for command in ("compress", "linearize"):
        cases.append((command, "unknown-device", [*GOOD_MODEL, "--data", "{data}", "--workers", "0", "--device", "gpu",
                                                  "--out", OUT], "unknown --device 'gpu'"))
    cases.append(("compress", "zero-std", [*GOOD_MODEL, "--data", "{data}", "--std", "0,0,0"],
                  "--std values must be positive"))
    for command in ("compress", "linearize"):
        cases.append((command, "corrupt-state", [*GOOD_MODEL, "--data", "{data}", "--workers", "0",
                                                 "--out", "{state_dir}"], "delete it to start over"))
    for command in ("fold", "export"):
        out = ["--out", OUT + (".onnx" if command == "export" else "")]
        for kind, (model, says) in MODEL.items():
            cases.append((command, f"model-{kind}", [*model, *out], says))
        cases.append((command, "garbage-option", [*GOOD_MODEL, "--input-size", "big", *out], "--input-size takes"))
        cases.append((command, "pickled-hf-weights", ["{hf_pickled}", "--trust-pickle", *out],
                      "cannot load here even with --trust-pickle"))
    cases.append(("fold", "untraceable", ["{branchy}", "--trust-pickle", "--input-size", "16", "--out", OUT],
                  "or move the Python control flow into a sub-module"))
    cases.append(("fold", "precision-without-data", [*GOOD_MODEL, "--precision", "int8", "--out", OUT],
                  "--precision int8 needs --data"))
    cases.append(("bench", "data-option", ["{onnx}", "--data", "{data}"],
                  "bench takes no --data (compress, entropy, export, fold, linearize take it)"))
    cases.append(("export", "out-is-a-directory", [*GOOD_MODEL, "--out", "{tmp}"], "is a directory"))
    for kind, (files, says) in ONNX.items():
        cases.append(("bench", f"onnx-{kind}", [*files, "--bench-seconds", "0"], says))
    cases.append(("bench", "json-is-a-directory", ["{onnx}", "--json", "{tmp}"], "is a directory"))
    cases.append(("bench", "garbage-option", ["{onnx}", "--threads", "0"], "Invalid value for '--threads'"))
    cases.append(("demo", "garbage-option", ["--epochs", "abc", "--out", OUT], "Invalid value for '--epochs'"))
    cases.append(("demo", "negative-budget", ["--max-drop", "-1", "--out", OUT], "Invalid value for '--max-drop'"))
    cases.append(("demo", "truncated-model", ["--out", "{demo_dir}"], "delete it to train the demo model again"))
    cases.append(("demo", "out-is-a-file", ["--out", "{garbage}/sub"], "not writable"))
    return cases


@pytest.mark.parametrize(("command", "case", "args", "says"), _cases(),
                         ids=[f"{c[0]}-{c[1]}" for c in _cases()])
def test_bad_input_gives_one_line_and_writes_nothing(capsys, inputs, tmp_path, monkeypatch, command, case, args,
                                                     says) -> None:
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in inputs["state_dir"].parent.rglob("*") if p.is_file()}
    argv = [command, *(a.format(tmp=tmp_path, **inputs) for a in args)]
    code, out = run(capsys, *argv)
    lines = out.strip().splitlines()
    assert code == 2, out
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], out
    assert "Traceback" not in out
    assert not (tmp_path / MARKER).exists(), "the hostile pickle ran"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [], "partial outputs"
    assert not (tmp_path / "out").exists(), "an empty --out left behind"
    after = {p: p.stat().st_mtime_ns for p in inputs["state_dir"].parent.rglob("*") if p.is_file()}
    assert after == before, "an input was changed or an output written beside the inputs"


def test_cuda_benchmark_without_a_gpu_is_refused(capsys, inputs) -> None:
    from easier_export.core.ort import cuda_usable

    if cuda_usable():
        pytest.skip("a GPU is present")
    code, out = run(capsys, "bench", str(inputs["onnx"]), "--bench-devices", "cpu,cuda")
    assert code == 2 and out.strip().splitlines() == [
        "error: --bench-devices cuda needs a usable GPU (torch.cuda and onnxruntime's CUDA provider)"]


@pytest.mark.parametrize("argv", [[], ["nope"], ["compress"], ["compress", "m", "--data", "d", "--max-removed", "abc"],
                                  ["fold", "m", "--frobnicate"], ["export", "m", "--min-top1", "1.5"]])
def test_parser_errors_are_usage_errors(capsys, argv) -> None:
    code, out = run(capsys, *argv)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out
    assert "--help" in lines[0]


BOUNDS = [  # every numeric option has a finite range: inf never ends a loop, nan compares false everywhere
    (["compress", "m", "--data", "d", "--finetune-epochs", "inf"], "--finetune-epochs': must be a finite number"),
    (["compress", "m", "--data", "d", "--baseline-epochs", "inf"], "--baseline-epochs': must be a finite number"),
    (["linearize", "m", "--data", "d", "--threshold", "nan"], "--threshold': must be a finite number"),
    (["compress", "m", "--data", "d", "--lr", "inf"], "--lr': must be a finite number"),
    (["compress", "m", "--data", "d", "--target-speedup", "0"], "--target-speedup': must be positive"),
    (["compress", "m", "--data", "d", "--entropy-tau", "0"], "--entropy-tau': must be positive"),
    (["bench", "a.onnx", "--bench-seconds", "inf"], "--bench-seconds': must be a finite number"),
    (["bench", "a.onnx", "--threads", "100000"], "Invalid value for '--threads'"),
    (["export", "m", "--atol", "inf"], "--atol': must be a finite number"),
    (["fold", "m", "--scale-tol", "inf"], "--scale-tol': must be a finite number"),
]


@pytest.mark.parametrize(("argv", "says"), BOUNDS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BOUNDS])
def test_numeric_options_are_finite_and_bounded(capsys, tmp_path, monkeypatch, argv, says) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = run(capsys, *argv)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0] and "--help" in lines[0], out
    assert list(tmp_path.iterdir()) == []


def test_threads_are_bounded_by_the_cores(capsys, inputs) -> None:
    code, out = run(capsys, "bench", str(inputs["onnx"]), "--threads", str((os.cpu_count() or 1) * 4 + 1))
    assert code == 2 and "Invalid value for '--threads'" in out and len(out.strip().splitlines()) == 1


def test_help_shows_the_range_it_enforces(capsys) -> None:
    """--target-speedup refuses 0 and says so; --num-classes refuses 1 and says so."""
    import typer

    from easier_export.cli.app import app

    params = {p.name: p for p in typer.main.get_command(app).commands["compress"].params}
    assert params["target_speedup"].help.endswith("(positive)")
    assert params["num_classes"].help.endswith("(at least 2)")
    code, out = run(capsys, "compress", "m", "--data", "d", "--target-speedup", "0")
    assert code == 2 and "must be positive" in out


@pytest.mark.parametrize("field", ["threshold", "finetune_epochs", "baseline_epochs", "max_drop", "lr"])
def test_loop_config_refuses_non_finite_values(field) -> None:
    from easier_export.core.errors import UserError
    from easier_export.loop.config import LoopConfig

    for value in (float("inf"), float("nan")):
        with pytest.raises(UserError, match="must be a finite number"):
            LoopConfig(**{field: value})


def test_an_output_that_cannot_be_replaced_is_one_line(capsys, tmp_path) -> None:
    """The file system refuses the rename (here: a folder where the file goes; also an immutable file)."""
    out = tmp_path / "fold"
    (out / "fold_plan.json").mkdir(parents=True)
    code, text = run(capsys, "fold", "demo_cnn", "--out", str(out), "--fold", "none", "--no-simplify")
    lines = text.strip().splitlines()
    assert code == 2 and "Traceback" not in text, text
    assert lines[-1].startswith(f"error: cannot write {out / 'fold_plan.json'} (") and len(lines) <= 2, text
    assert not list(out.glob(".*.tmp"))


def test_bench_of_the_same_file_twice_says_so(capsys, inputs, tmp_path) -> None:
    rows = tmp_path / "rows.json"
    code, out = run(capsys, "bench", str(inputs["onnx"]), str(inputs["onnx"]), "--bench-seconds", "0",
                    "--bench-batches", "1", "--json", str(rows))
    assert code == 0, out
    assert "the same file given more than once, timed once" in " ".join(out.split())
    assert len(json.loads(rows.read_text())) == 1


def test_version(capsys) -> None:
    from easier_export import __version__

    code, out = run(capsys, "--version")
    assert code == 0 and out.strip() == f"easier-export {__version__}"


def test_the_static_batch_advice_works_for_nn_sequential(capsys, inputs, tmp_path) -> None:
    """The re-export the message suggests, run as written on an nn.Sequential (whose argument is `input`)."""
    code, out = run(capsys, "fold", str(inputs["static_pt2"]), "--out", str(tmp_path / "out"))
    assert code == 2, out
    advice = re.search(r"dynamic_shapes=(\(.*?\},\))", out)
    assert advice, out
    net = torch.load(inputs["three_out"], weights_only=False).eval()
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=eval(advice[1], {"torch": torch}))
    torch.export.save(program, tmp_path / "dynamic.pt2")
    assert load_model(str(tmp_path / "dynamic.pt2")).input_size == (3, 16, 16)


def test_safetensors_weights_load(tmp_path) -> None:
    """timm's usual format: as --weights for a named architecture and as a state-dict MODEL with --arch."""
    from safetensors.torch import save_file

    net = build_arch("cifar_resnet20", num_classes=3)
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    for loaded in (load_model("cifar_resnet20", 3, weights=tmp_path / "w.safetensors"),
                   load_model(str(tmp_path / "w.safetensors"), arch="cifar_resnet20", num_classes=3)):
        got = loaded.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())


def test_fold_refolds_its_own_one_channel_output(capsys, tmp_path) -> None:
    """A 1-channel .pt2 declares no normalization and `fold` takes none: the ImageNet default must not stop it."""
    first, second = tmp_path / "first", tmp_path / "second"
    for model, out in (("demo_cnn", first), (str(first / "folded.pt2"), second)):
        code, text = run(capsys, "fold", model, "--out", str(out), "--fold", "none", "--no-simplify")
        assert code == 0, text
    assert load_model(str(first / "folded.pt2")).task.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
