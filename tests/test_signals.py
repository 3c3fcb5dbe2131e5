"""Ctrl-C and SIGTERM: one line, a fixed exit code (130, 143), no temp file left, the rounds kept; also while
the heavy modules are still being imported."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run

from easier_export.cli.launch import main as launch
from easier_export.core.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Interrupted, Terminated
from easier_export.core.signals import sigterm_as_interrupt


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _net(tmp_path: Path) -> Path:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    path = tmp_path / "net.pt"
    torch.save(net, path)
    return path


def test_sigterm_in_a_round_exits_143_with_the_rounds_kept(capsys, image_folder, tmp_path, monkeypatch) -> None:
    from easier_export.loop import linearize as loop_mod

    real, calls = loop_mod.finetune, []

    def terminated_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _sigterm()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "finetune", terminated_in_round_2)
    out = tmp_path / "lin"
    argv = ["linearize", str(_net(tmp_path)), "--trust-pickle", "--input-size", "16", "--data", str(image_folder),
            "--out", str(out), "--workers", "0", "--batch-size", "4", "--max-drop", "100", "--entropy-batches", "1",
            "--finetune-epochs", "0.1"]
    before = signal.getsignal(signal.SIGTERM)
    code, text = run(capsys, *argv)
    assert signal.getsignal(signal.SIGTERM) == before, "the handler outlived the command"
    assert code == EXIT_TERMINATED and text.strip().splitlines()[-1] == (
        "terminated (SIGTERM): 1 round(s) kept; rerun the same command to resume"), text
    assert "Traceback" not in text and not list(out.glob(".*.tmp"))


def test_sigterm_during_an_atomic_write_removes_its_temp_file(tmp_path) -> None:
    from easier_export.core.io import atomic_write

    def write(path: Path) -> None:
        path.write_bytes(b"half")
        _sigterm()

    with pytest.raises(Terminated), sigterm_as_interrupt():
        atomic_write(tmp_path / "model.onnx", write)
    assert list(tmp_path.iterdir()) == []


def test_a_successful_rerun_removes_temp_files_of_a_killed_run(capsys, tmp_path) -> None:
    out = tmp_path / "fold"
    out.mkdir()
    stale = out / ".folded.pt2.ab12cd34.tmp"  # what SIGKILL (no cleanup possible) leaves
    stale.write_bytes(b"x")
    mine = out / ".notes.tmp"  # not an atomic write's name: not ours to remove
    mine.write_text("keep")
    code, text = run(capsys, "fold", "demo_cnn", "--out", str(out), "--fold", "none", "--no-simplify")
    assert code == 0, text
    assert not stale.exists() and mine.exists()


@pytest.mark.parametrize(("raise_it", "code", "says"), [
    (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), EXIT_INTERRUPTED, "interrupted: "),
    (_sigterm, EXIT_TERMINATED, "terminated (SIGTERM): ")])
def test_an_interrupt_during_the_imports_is_one_line(capsys, monkeypatch, raise_it, code, says) -> None:
    """The console entry point handles signals before it imports torch and the rest (seconds at start-up)."""
    def slow_import(name: str, *args):
        raise_it()

    monkeypatch.setattr(importlib, "import_module", slow_import)
    with pytest.raises(SystemExit) as exited:
        launch(["--help"])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert exited.value.code == code and len(lines) == 1 and lines[0].startswith(says), lines


def test_the_console_script_is_the_light_entry_point() -> None:
    """Importing the entry point loads none of the heavy modules, so SIGTERM is handled before they load."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'easier-export = "easier_export.cli.launch:main"' in pyproject
    heavy = ["torch", "onnxruntime", "transformers", "typer", "rich"]
    probe = ("import sys, easier_export.cli.launch; "
             f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""


def test_the_message_says_how_many_rounds_were_reverted() -> None:
    assert str(Interrupted((2, 1))) == ("interrupted: 2 round(s) saved (1 kept, 1 reverted); rerun the same command "
                                        "to resume")
    assert Interrupted((2, 2), terminated=True).exit_code == EXIT_TERMINATED


def test_loader_workers_stay_quiet_about_closed_connections(capsys, monkeypatch) -> None:
    from easier_export.load.data import quiet_worker

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    quiet_worker(0)
    sys.excepthook(EOFError, EOFError(), None)
    sys.excepthook(ConnectionResetError, ConnectionResetError(), None)
    assert capsys.readouterr().err == ""


def test_fold_writes_its_archive_without_torch_warnings(capsys, caplog, tmp_path) -> None:
    """torch warns when an archive's file name does not end in .pt2, as the atomic write's temp name does not."""
    import logging

    with caplog.at_level(logging.WARNING):
        code, text = run(capsys, "fold", "demo_cnn", "--out", str(tmp_path), "--fold", "none", "--no-simplify")
    assert code == 0, text
    assert not [r for r in caplog.records if r.name.startswith("torch")], caplog.text
