from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from easier_export.core import ort as ort_facts
from easier_export.core import timing
from easier_export.core.errors import UserError
from easier_export.ship import bench as bm
from easier_export.ship.export import export_onnx

SHAPE = (3, 16, 16)
FAST = {"warmup": 1, "min_iters": 4, "max_seconds": 0.02, "repeats": 2}
ROW_KEYS = {"label", "backend", "provider", "device", "batch", "threads", "p50_ms", "p90_ms", "mean_ms",
            "iters", "spread", "noisy", "versions", "cpu"}


def net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 10))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    out = {}
    for label, width in (("original", 16), ("folded", 4)):
        torch.manual_seed(0)
        model = net(width).eval()
        path = tmp_path_factory.mktemp("bench") / f"{label}.onnx"
        export_onnx(model, torch.randn(1, *SHAPE), path, simplify=False)
        out[label] = (model, path)
    return out


def test_bench_rows(models) -> None:
    torch_threads = torch.get_num_threads()
    rows = bm.bench({k: p for k, (_, p) in models.items()}, SHAPE, batches=(1, 2), threads=1,
                    torch_models={"original": models["original"][0]}, **FAST)
    assert len(rows) == 2 * 3
    for row in rows:
        assert set(row) == ROW_KEYS
        assert 0 < row["p50_ms"] <= row["p90_ms"] and row["mean_ms"] > 0
        assert row["iters"] >= FAST["min_iters"] and row["threads"] == 1 and row["device"] == "cpu"
        assert row["versions"]["onnxruntime"] and row["versions"]["torch"] == torch.__version__
    assert {(r["backend"], r["provider"]) for r in rows} == {("onnxruntime", "CPUExecutionProvider"),
                                                             ("torch", "eager")}
    assert sorted((r["label"], r["batch"]) for r in rows if r["backend"] == "onnxruntime") == [
        ("folded", 1), ("folded", 2), ("original", 1), ("original", 2)]
    assert torch.get_num_threads() == torch_threads  # restored after timing


def test_time_budget_adds_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock that each run advances by 125 ms: a 1 s budget over 2 repeats is 4 runs a repeat."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def run() -> None:
        now[0] += 0.125

    (row,) = bm.time_runners([run], warmup=0, min_iters=2, max_seconds=1.0, repeats=2)
    assert row["iters"] == 8 and row["p50_ms"] == 125.0 and row["repeat_p50_ms"] == [125.0, 125.0]
    (row,) = bm.time_runners([run], warmup=0, min_iters=2, max_seconds=0.0, repeats=2)
    assert row["iters"] == 2


def test_cuda_without_gpu_is_skipped(models, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(bm, "cuda_usable", lambda: False)
    with caplog.at_level(logging.WARNING, logger="easier_export.ship.bench"):
        rows = bm.bench({"original": models["original"][1]}, SHAPE, devices=("cpu", "cuda"), threads=1,
                        **FAST)
    assert [r["device"] for r in rows] == ["cpu"]
    assert "cuda" in caplog.text and "skipped" in caplog.text


@pytest.mark.cuda
@pytest.mark.skipif(not bm.cuda_usable(), reason="needs onnxruntime CUDA EP and torch.cuda")
def test_cuda_rows(models) -> None:
    rows = bm.bench({k: p for k, (_, p) in models.items()}, SHAPE, devices=("cuda",), batches=(1, 4),
                    torch_models={"original": models["original"][0]}, **FAST)
    assert len(rows) == 2 * 3 and {r["device"] for r in rows} == {"cuda"}
    assert {r["provider"] for r in rows if r["backend"] == "onnxruntime"} <= {
        "CUDAExecutionProvider", "TensorrtExecutionProvider"}
    assert all(r["p50_ms"] > 0 for r in rows)


def test_bad_requests(models, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tpu"):
        bm.bench({"original": models["original"][1]}, SHAPE, devices=("tpu",), **FAST)
    with pytest.raises(UserError, match="missing.onnx"):
        bm.bench({"original": tmp_path / "missing.onnx"}, SHAPE, **FAST)


def test_spread_marks_rows_whose_repeats_disagree() -> None:
    steady = bm._stats([[1.0, 1.0], [1.02, 1.02], [0.99, 0.99]])
    assert steady["spread"] == pytest.approx(0.03) and not steady["noisy"]
    contended = bm._stats([[1.0, 1.0], [3.0, 3.0], [1.0, 1.0]])  # a neighbour took the cores for one repeat
    assert contended["spread"] == pytest.approx(2.0) and contended["noisy"]


def test_speedups() -> None:
    def row(label: str, p50: float, device: str = "cpu", backend: str = "onnxruntime") -> dict:
        return {"label": label, "backend": backend, "device": device, "batch": 1, "p50_ms": p50}

    rows = [row("original", 4.0), row("folded", 2.0), row("linearized", 3.0),
            row("folded", 1.0, device="cuda"),  # no cuda baseline: no ratio
            row("original", 8.0, backend="torch"), row("folded", 2.0, backend="torch")]
    assert bm.speedups(rows, "original") == {
        ("onnxruntime", "cpu", 1): {"folded": 2.0, "linearized": 4 / 3},
        ("torch", "cpu", 1): {"folded": 4.0},
    }


CPUINFO = """processor\t: {n}
model name\t: Fake CPU @ 3.00GHz
physical id\t: {socket}
core id\t\t: {core}
"""


def test_machine_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 sockets x 2 cores x 2 hyper-threads: 4 physical cores, capped by the CPUs this process may use."""
    info = tmp_path / "cpuinfo"
    info.write_text("\n".join(CPUINFO.format(n=n, socket=n // 4, core=n % 4 // 2) for n in range(8)))
    monkeypatch.setattr(ort_facts, "CPUINFO", info)
    monkeypatch.setattr(ort_facts.os, "sched_getaffinity", lambda _: set(range(8)))
    assert ort_facts.physical_cores() == 4 and ort_facts.cpu_name() == "Fake CPU @ 3.00GHz"
    monkeypatch.setattr(ort_facts.os, "sched_getaffinity", lambda _: {0, 1, 2})
    assert ort_facts.physical_cores() == 3
    monkeypatch.setattr(ort_facts, "CPUINFO", tmp_path / "missing")
    assert ort_facts.physical_cores() == (ort_facts.os.cpu_count() or 1)
