"""The stage subcommands on small inputs: entropy, linearize → fold, export (incl. exit 3), bench."""

import json

import numpy as np
import onnx
import pytest
import torch
from _fold_util import WeightCountTable
from conftest import run_cli as run
from onnx import numpy_helper

from easier_export import linearize, pipeline
from easier_export.fold.groups import find_groups
from easier_export.models import build_arch


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
                     "--mode", "all")
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
    code, text = run(capsys, "bench", str(a), str(b), "--batch", "1", "--seconds", "0.2", "--json", str(rows_path))
    assert code == 0, text
    rows = json.loads(rows_path.read_text())
    assert {r["label"] for r in rows} == {"a", "b"} and all(r["p50_ms"] > 0 for r in rows)
    assert "speed-up" in text  # (the old spellings --batch and --seconds still parse)


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


def test_auto_plan_slower_end_to_end_falls_back_to_bn_folding(tmp_path, monkeypatch):
    """The planner times ops alone; if the whole folded model then runs slower, compress must not ship it."""
    from easier_export.demo import run_demo

    real_bench = pipeline.bench

    def pessimistic_bench(onnx_models, *args, **kwargs):
        rows = real_bench(onnx_models, *args, **kwargs)
        for r in rows:  # pretend every merge made the model twice as slow
            if r["label"] == "folded" and r["backend"] == "onnxruntime" and pessimistic_bench.slow:
                r["p50_ms"] = 2 * max(x["p50_ms"] for x in rows if x["label"] == "linearized")
            if r["label"] == "every":  # and the end-to-end check of every merge measures the same
                r["p50_ms"] = 2 * max(x["p50_ms"] for x in rows if x["label"] == "plan")
        pessimistic_bench.slow = False
        return rows

    pessimistic_bench.slow = True
    monkeypatch.setattr(pipeline, "bench", pessimistic_bench)
    # the demo's fold groups costed without the machine's clock (under load every saving may read as noise)
    monkeypatch.setattr(linearize, "find_groups", lambda gm, sites, x, table: find_groups(gm, sites, x,
                                                                                          WeightCountTable()))
    real_fold = pipeline.fold_model  # make the "auto" plan deterministic: every exact merge
    monkeypatch.setattr(pipeline, "fold_model",
                        lambda gm, example, mode, **kw: real_fold(gm, example, "all" if mode == "auto" else mode, **kw))
    report = run_demo(tmp_path, epochs=4, finetune_epochs=1.0, max_drop=100.0, fold="auto")
    merges = [f for f in report["folds"] if f["kind"] in pipeline.MERGE_KINDS]
    assert any("end-to-end check" in f["reason"] for f in merges)
    assert not any(f["applied"] for f in merges)
    assert report["verify"]["passed"]


@pytest.mark.parametrize("every_faster", [True, False])
def test_every_exact_merge_ships_when_faster_end_to_end_than_the_plan(tmp_path, monkeypatch, every_faster):
    """Merges each below the planner's noise can pay together: compress times the shipped plan against every
    exact merge, whole model against whole model, and ships the faster (an ``end_to_end`` fold row says so)."""
    from easier_export.arch import DemoInvRes
    from easier_export.graph import find_call_sites, remove_sites, trace
    from easier_export.linearize import LoopConfig

    torch.manual_seed(0)
    gm = trace(DemoInvRes().eval())
    linear = remove_sites(gm, [s.name for s in find_call_sites(gm)], relocate=True).eval()
    example, inputs = torch.randn(1, 1, 16, 16), [torch.randn(4, 1, 16, 16)]
    cfg = pipeline.CompressConfig(LoopConfig(), fold="auto", device="cpu")
    _, plan, _ = pipeline.fold_and_ship(linear, example, inputs, "none", tmp_path, {}, cfg)  # a plan of no merge
    timed = []

    def bench(onnx_models, *args, **kwargs):
        timed.append({label: path.is_file() for label, path in onnx_models.items()})
        return [{"label": "plan", "p50_ms": 1.0, "spread": 0.01},
                {"label": "every", "p50_ms": 0.5 if every_faster else 0.98, "spread": 0.01}]

    monkeypatch.setattr(pipeline, "bench", bench)
    record, switched = pipeline._every_merge_if_faster(linear, example, inputs, plan, tmp_path, {}, cfg)
    assert timed == [{"plan": True, "every": True}] and not (tmp_path / "onnx" / "every_merge.onnx").exists()
    assert record.kind == "end_to_end" and record.applied is every_faster
    assert (record.us_before, record.us_after) == (1000.0, 500.0 if every_faster else 980.0)
    if every_faster:
        folded, folds, export = switched
        assert export["verify"]["passed"] and sum(f.applied for f in folds if f.kind in pipeline.MERGE_KINDS) > 0
        torch.testing.assert_close(folded(inputs[0]), linear(inputs[0]), rtol=1e-4, atol=1e-4)
    else:
        assert switched is None and "not faster" in record.reason
    # nothing left to merge: no comparison, nothing timed
    assert pipeline._every_merge_if_faster(gm, example, inputs, [], tmp_path, {}, cfg) == (None, None)
    assert len(timed) == 1


def _rows(ratio: float, spread: float = 0.01) -> list[dict]:
    """compress's benchmark rows at two batches: folded runs ``ratio`` times faster than linearized at batch 1."""
    return [{"label": label, "backend": "onnxruntime", "device": "cpu", "batch": batch, "spread": spread,
             "p50_ms": batch * (1.0 if label == "linearized" else 1 / ratio)}
            for label in ("original", "linearized", "folded") for batch in (1, 8)]


def test_auto_plan_that_adds_weights_must_run_measurably_faster():
    """A plan is judged against what ships instead (BatchNorm folding only): a merge through a bottleneck or one
    that needs a bias map stores more numbers and ships only if faster by more than 3 % and the timing spread; a
    plan that stores fewer ships unless it ran slower; nothing measured, nothing refused."""
    from torch import nn

    from easier_export.fold import fold_model
    from easier_export.graph import trace

    torch.manual_seed(0)
    example = torch.randn(1, 16, 8, 8)
    # bias-free convs before BatchNorm: folding the BN adds a bias, and it must not count against the merge
    shrinking = trace(nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1),
                                    nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)).eval())
    bottleneck = trace(nn.Sequential(nn.Conv2d(16, 4, 1, bias=False), nn.BatchNorm2d(4),
                                     nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)).eval())
    padded = trace(nn.Sequential(nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1)).eval())  # bias map
    for gm, grows in ((shrinking, False), (bottleneck, True), (padded, True)):
        merged, folds = fold_model(gm, example, mode="all")
        fallback, _ = fold_model(gm, example, mode="none")
        assert any(f.applied and f.kind == "conv_conv" for f in folds)
        assert (pipeline.stored_numbers(merged) > pipeline.stored_numbers(fallback)) == grows
        assert pipeline.plan_refusal(_rows(0.90), merged, fallback) == "the plan ran ×0.90 end to end"
        assert pipeline.plan_refusal(_rows(1.20), merged, fallback) == ""
        assert pipeline.plan_refusal([], merged, fallback) == ""
        refused = pipeline.plan_refusal(_rows(1.02), merged, fallback)
        assert refused == ("the plan adds weights and ran ×1.02 end to end (needs ×1.03: 3% or the timing spread)"
                           if grows else "")
        assert (pipeline.plan_refusal(_rows(1.20, spread=0.3), merged, fallback) != "") == grows
