"""benchmarks/gpu.py, the prepared GPU benchmark: it runs once on a borrowed machine, so it is checked here on the
CPU (its dry run) with the GPU machine's missing onnxsim simulated. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def gpu():
    with benchmark_script("gpu.py", "gpu_benchmark") as module:
        yield module


def test_arguments(gpu) -> None:
    args = gpu.parse_args([])
    assert args.builtin == ["mobilenet_v2"] and args.batches == (1, 32) and args.minutes == 5 and not args.dry_run
    dry = gpu.parse_args(["--dry-run", "--batches", "1,8", "--builtin", "", "--cases"])
    assert dry.builtin == [] and dry.batches == (1, 8) and dry.cases == []
    with pytest.raises(SystemExit):
        gpu.parse_args(["--builtin", "resnet9000"])


@pytest.mark.parametrize(("report", "mode", "replay"), [
    ({"shipped": {"fold": "all"}, "folds": []}, "all", None),
    ({"shipped": {"fold": "auto"}, "folds": [
        {"kind": "batchnorm", "nodes": ["c", "bn"], "applied": True},
        {"kind": "conv_conv", "nodes": ["a", "b"], "applied": True},
        {"kind": "residual", "nodes": ["x", "y", "add"], "applied": False}]}, "auto", [["a", "b"]]),
    ({"shipped": {"fold": "none"}, "folds": [{"kind": "conv_conv", "nodes": ["a", "b"], "applied": False}]},
     "none", None),
])
def test_the_shipped_plan_is_read_from_the_report(gpu, report: dict, mode: str, replay: list | None) -> None:
    got_mode, got_replay, how = gpu.shipped_plan(report)
    assert (got_mode, got_replay) == (mode, replay) and how


def test_a_dry_run_writes_the_table(gpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxsim", None)  # the GPU machine has none: nothing may need it
    monkeypatch.setattr(gpu, "SIMPLIFY", False)
    out = tmp_path / "out"
    assert gpu.main(["--dry-run", "--cases", "--builtin", "demo_invres", "--batches", "1", "--out", str(out)]) == 0
    result = json.loads((out / "gpu.json").read_text())
    (case,) = result["cases"].values()
    assert case["verified"] and case["matches_shipped_graph"] and case["merges"] > 0
    measured = {(r["backend"], r["mode"], r["precision"]) for r in result["rows"]}
    assert {("torch", "eager", "fp32"), ("onnxruntime", "CPUExecutionProvider", "fp32")} <= measured
    assert all(r["batch"] == 1 and r["speedup"] > 0 for r in result["rows"])
    assert any("CUDA graphs" in s for s in result["skipped"])
    table = (out / "gpu.md").read_text()
    assert "DRY RUN" in table and "| built-in demo_invres | torch | eager | fp32 | 1 |" in table


def test_a_case_that_does_not_load_costs_its_rows_only(gpu, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text("{}")
    out = tmp_path / "out"
    assert gpu.main(["--dry-run", "--cases", str(broken), "--builtin", "", "--out", str(out)]) == 0
    result = json.loads((out / "gpu.json").read_text())
    assert "not loaded" in result["cases"]["broken"]["error"] and not result["rows"]
    assert "broken" in (out / "gpu.md").read_text()
