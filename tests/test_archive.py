"""A .pt2 archive must not run code at load time without --trust-pickle (torch.export.load unpickles entries)."""

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torch import nn

from easier_export.load.archive import pickled_entries
from easier_export.load.models import LINEARIZED_FORMAT, load_model


class _Payload:
    """Unpickling this writes the file named in MARKER: proof that loading ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _genuine(path: Path) -> Path:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    net(x)
    program = torch.export.export(net.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy the zip, letting ``change(name, data) -> data | None`` edit (or drop) entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dst


def _evil_weight(src: Path, dst: Path, marker: Path) -> Path:
    """The issue's reproduction: mark the conv weight ``use_pickle`` and replace its file with a pickle."""
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return pickle.dumps(_Payload(str(marker)))
        return data

    return _rewrite(src, dst, change)


def test_genuine_archive_has_no_pickled_entries_and_loads(tmp_path):
    path = _genuine(tmp_path / "ok.pt2")
    assert pickled_entries(path) == []
    assert load_model(str(path)).input_size == (3, 8, 8)


def test_pickled_weight_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _evil_weight(_genuine(tmp_path / "ok.pt2"), tmp_path / "evil.pt2", marker)
    code, out = run_cli(capsys, "export", str(evil), "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "--trust-pickle" in out and "0.weight" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_trusted_pickled_weight_is_loaded(tmp_path):
    """With the flag the user takes responsibility: the archive is loaded as torch would (and the code runs)."""
    marker = tmp_path / "pwned"
    evil = _evil_weight(_genuine(tmp_path / "ok.pt2"), tmp_path / "evil.pt2", marker)
    with pytest.raises(Exception):  # noqa: B017 - the payload is no tensor; what matters is that it ran
        load_model(str(evil), trust_pickle=True)
    assert marker.exists()


def test_unsafe_sample_inputs_are_refused(tmp_path):
    """torch retries a failed weights_only load of the sample inputs with weights_only=False."""
    marker = tmp_path / "pwned"
    evil = _rewrite(_genuine(tmp_path / "ok.pt2"), tmp_path / "evil.pt2",
                    lambda n, d: pickle.dumps(_Payload(str(marker))) if "sample_inputs" in n else d)
    assert [e for e in pickled_entries(evil) if "sample_inputs" in e]
    with pytest.raises(Exception, match="--trust-pickle"):
        load_model(str(evil))
    assert not marker.exists()


@pytest.mark.parametrize("extra", ["data/weights/model.pt", "data/aotinductor/model/model.so",
                                   "data/constants/opaque_obj_0"])
def test_entries_with_code_running_loaders_are_refused(tmp_path, extra):
    src = _genuine(tmp_path / "ok.pt2")
    root = zipfile.ZipFile(src).namelist()[0].split("/")[0]
    dst = tmp_path / "evil.pt2"
    _rewrite(src, dst, lambda n, d: d)
    with zipfile.ZipFile(dst, "a") as zf:
        zf.writestr(f"{root}/{extra}", b"x")
    assert extra in pickled_entries(dst)


def test_constant_config_pointing_at_opaque_object_is_refused(tmp_path):
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("model_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "use_pickle": False}}}).encode()
        return data

    evil = _rewrite(_genuine(tmp_path / "ok.pt2"), tmp_path / "evil.pt2", change)
    assert any(e.endswith(": c") for e in pickled_entries(evil))


def test_not_a_zip_is_one_line(tmp_path, capsys):
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"definitely not a zip")
    code, out = run_cli(capsys, "export", str(path), "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "not a torch.export archive" in out and "Traceback" not in out


def test_linearized_checkpoint_pointing_at_evil_archive_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_weight(_genuine(tmp_path / "ok.pt2"), tmp_path / "evil.pt2", marker)
    ckpt = tmp_path / "linearized.pt"
    recipe = {"arch": str(evil), "num_classes": 2, "removed": [], "input_size": [3, 8, 8],
              "mean": [0.5] * 3, "std": [0.5] * 3}
    torch.save({"format": LINEARIZED_FORMAT, "recipe": recipe, "state_dict": {}}, ckpt)
    with pytest.raises(Exception, match="--trust-pickle"):
        load_model(str(ckpt))
    assert not marker.exists()
