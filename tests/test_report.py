from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from easier_export.ship import markdown, schema, tables
from easier_export.ship.export import VerifyResult
from easier_export.ship.report import write_report
from easier_export.ship.stats import model_stats


class Residual(nn.Module):
    """Long branch of 3 convs, 1-conv shortcut, functional and method rectifiers, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 4, 1), nn.SiLU(),
                                    nn.Conv2d(4, 4, 3, padding=1, groups=2))
        self.shortcut = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = (self.branch(x) + self.shortcut(x)).relu()
        return self.head(x.mean((2, 3)))


def test_model_stats_counts() -> None:
    model = Residual().train()
    stats = model_stats(model, torch.randn(2, 3, 8, 8))
    assert model.training
    hw = 8 * 8
    macs = hw * 4 * 27 + hw * 4 * 36 + hw * 4 * 4 + hw * 4 * 18 + hw * 4 * 4 + 5 * 4
    assert stats == {"params": sum(p.numel() for p in model.parameters()), "flops": 2 * macs,
                     "conv_linear_depth": 1 + 3 + 1, "activations": 4}


def test_model_stats_identity_and_linear_chain() -> None:
    chain = nn.Sequential(nn.Linear(6, 6), nn.Identity(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2))
    assert model_stats(chain, torch.randn(1, 6))["conv_linear_depth"] == 3
    empty = {"params": 0, "flops": 0, "conv_linear_depth": 0, "activations": 0}
    assert model_stats(nn.Identity(), torch.randn(1, 6)) == empty


def test_model_stats_timm_resnet18() -> None:
    timm = pytest.importorskip("timm")
    stats = model_stats(timm.create_model("resnet18", num_classes=10), torch.randn(1, 3, 32, 32))
    assert stats["conv_linear_depth"] == 18 and stats["activations"] == 17
    assert stats["params"] == 11_181_642 and stats["flops"] == pytest.approx(2 * 37.0e6, rel=0.01)


def bench_rows() -> list[dict]:
    common = {"provider": "CPUExecutionProvider", "device": "cpu", "threads": 2, "p90_ms": 99.0,
              "mean_ms": 5.0, "iters": 30, "versions": {"onnxruntime": "1.0", "torch": "2.0"},
              "cpu": "Test CPU", "spread": 0.02, "noisy": False}
    return [{"label": label, "backend": "onnxruntime", "batch": batch, "p50_ms": p50 * batch, **common}
            for label, p50 in (("original", 4.0), ("linearized", 3.0), ("folded", 2.0)) for batch in (1, 8)]


@pytest.fixture
def report() -> dict:
    verify = VerifyResult(max_abs=3e-7, mean_abs=1e-8, top1_agree=1.0, batches=4, passed=True, reason="",
                          atol=1e-4, rtol=1e-3, min_top1=0.99, violations=0, max_rel=1e-7, ref_scale=3.0,
                          scale_tol=1e-4)
    stats = {"activations": 17, "params": 1000, "flops": 20000, "conv_linear_depth": 18, "onnx_bytes": 4096}
    return {
        "schema_version": 2,
        "tool": {"name": "easier-export", "version": "0.1.0"},
        "model": {"source": "timm:resnet18", "input_size": [3, 32, 32], "num_classes": 10},
        "settings": {"max_drop": 1.0},
        "original": {"top1": 91.5, **stats},
        "compressed": {**stats, "top1": 90.9, "activations": 14, "conv_linear_depth": 9, "params": 800,
                       "onnx_bytes": 3500, "removed": ["layer1.0.act1", "layer1.1.act1", "layer2.0.act1"]},
        "entropy": [{"name": f"site{i}", "op": "relu", "units": 64, "entropy": 0.1 * i,
                     "removed_round": 1 if i < 3 else None} for i in range(17)],
        "rounds": [{"round": r, "removed": [f"site{r}"], "entropy": 0.1 * r, "val_top1": 91.5 - 0.3 * r,
                    "delta": -0.3 * r, "within_budget": r < 3, "seconds": 12.5, "us_saved": 4.0 * r,
                    "speedup": None} for r in range(1, 5)],
        "rejected": [{"round": r, "removed": [f"site{r}"], "val_top1": 91.5 - 0.3 * r} for r in (3, 4)],
        "groups": [{"sites": ["site1", "site2"], "us_saved": 12.0, "detail": "conv 1x1 · dw -> conv 3x3",
                    "entropy": 0.3}],
        "folds": [{"kind": "conv_conv", "nodes": ["a", "b"], "detail": "3x3∘1x1 → 3x3", "applied": True,
                   "reason": "", "us_before": 10.0, "us_after": 6.0},
                  {"kind": "conv_conv", "nodes": ["c", "d"], "detail": "3x3∘3x3", "applied": False,
                   "reason": "padding: border values differ", "us_before": None, "us_after": None}],
        "export": {"path": "model.onnx", "exporter": "dynamo", "opset": 18, "simplified": True, "notes": [],
                   "size_bytes": 3500, "nodes": 20, "op_counts": {"Conv": 10, "Relu": 10}},
        "verify": verify.to_dict(),
        "bench": bench_rows(),
        "precision": {"asked": "fp32", "shipped": "fp32", "reason": "asked for FP32", "tried": []},
        "outputs": {"model": "model.onnx"},
    }


def test_good_report_is_valid(report: dict) -> None:
    assert schema.validate_report(report) == []
    assert schema.validate_report({**report, "export": None, "verify": None, "bench": []}) == []


def _object(node: dict) -> dict:
    """The object schema a property holds, through ``$ref``, ``allOf`` and a nullable ``oneOf``."""
    if "$ref" in node:
        return _object(schema.report_schema()["$defs"][node["$ref"].rsplit("/", 1)[1]])
    if "allOf" in node:
        parts = [_object(p) for p in node["allOf"]]
        return {"type": "object", "required": [k for p in parts for k in p.get("required", [])],
                "properties": {k: v for p in parts for k, v in p.get("properties", {}).items()}}
    if "oneOf" in node:
        return next(_object(p) for p in node["oneOf"] if p != schema.NULL)
    return node


def required_paths(node: dict, prefix: str = "") -> list[str]:
    node = _object(node)
    out = []
    for key in node.get("required", []):
        out.append(f"{prefix}{key}")
        if _object(node["properties"][key]).get("type") == "object":
            out += required_paths(node["properties"][key], f"{prefix}{key}.")
    return out


def test_required_paths_reach_nested_keys() -> None:
    paths = required_paths(schema.report_schema())
    assert {"model.num_classes", "compressed.removed", "compressed.top1", "verify.scale_tol"} <= set(paths)


@pytest.mark.parametrize("path", required_paths(schema.report_schema()))
def test_each_missing_key_is_named(report: dict, path: str) -> None:
    *parents, key = path.split(".")
    node = report
    for p in parents:
        node = node[p]
    del node[key]
    assert schema.validate_report(report) == [f"{path}: missing key {key!r}"]


@pytest.mark.parametrize(("mutate", "problem"), [
    (lambda r: r["rounds"][1].pop("val_top1"), "rounds[1].val_top1: missing key 'val_top1'"),
    (lambda r: r["bench"][0].update(batch=True), "bench[0].batch: True is not of type 'integer'"),
    (lambda r: r["original"].update(params="1k"), "original.params: '1k' is not of type 'integer'"),
    (lambda r: r["compressed"].update(top1=None), None),
    (lambda r: r["entropy"][0].update(removed_round="1"), "entropy[0].removed_round: '1' is not of type"),
    (lambda r: r.update(schema_version=1), "schema_version: 2 was expected"),
    (lambda r: r["original"].update(top1=0.915 * 100 * 100), "original.top1: 9150.0 is greater than the maximum"),
    (lambda r: r.update(folds={}), "folds: {} is not of type 'array'"),
    (lambda r: r["verify"].update(passed="yes"), "verify.passed: 'yes' is not of type 'boolean'"),
])
def test_bad_values_are_named(report: dict, mutate, problem: str | None) -> None:
    mutate(report)
    problems = schema.validate_report(report)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_not_a_dict() -> None:
    assert schema.validate_report([]) == ["report: [] is not of type 'object'"]


def test_summary_table(report: dict) -> None:
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(tables.summary_table(report))
    text = out.getvalue()
    assert "timm:resnet18" in text and "-0.60 pp" in text and "-3 (-17.6%)" in text and "-9 (-50.0%)" in text
    assert "p50 latency onnxruntime cpu b1 (ms, folded)" in text and "×2.00 speed-up" in text
    assert "b8" in text


def test_summary_without_bench_or_top1(report: dict) -> None:
    report.update(bench=[])
    report["original"]["top1"] = None
    rows = tables.summary_rows(report)
    assert rows[0] == ("top-1 (%)", "–", "90.90", "") and not any("latency" in r[0] for r in rows)


def test_write_report(report: dict, tmp_path: Path) -> None:
    expected = copy.deepcopy(report)
    written = write_report(report, tmp_path / "out")
    assert report == expected, "the caller's dict is not modified"
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "entropy.png", "latency.png", "report.json", "report.md"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names, "no temp files left behind"
    for png in (tmp_path / "out").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1024

    loaded = json.loads((tmp_path / "out" / "report.json").read_text())
    assert schema.validate_report(loaded) == []
    assert loaded["outputs"] == {"model": "model.onnx", "plot_entropy": "entropy.png",
                                 "plot_accuracy": "accuracy.png", "plot_latency": "latency.png",
                                 "report_md": "report.md", "report_json": "report.json"}
    assert {k: v for k, v in loaded.items() if k != "outputs"} == {k: v for k, v in expected.items()
                                                                    if k != "outputs"}

    md = (tmp_path / "out" / "report.md").read_text()
    for needle in ("| activations | 17 | 14 | -3 (-17.6%) |", "## Rounds", "padding: border values differ",
                   "✓ max abs diff 3.0e-07 ≤ atol 1e-04", "**passed**", "| folded | onnxruntime |",
                   "![entropy](entropy.png)", "![latency](latency.png)", "×2.00 speed-up", "Test CPU"):
        assert needle in md, needle


def test_empty_sections_skip_plots(report: dict, tmp_path: Path) -> None:
    report.update(rounds=[], entropy=[], bench=[], folds=[], verify=None)
    written = write_report(report, tmp_path)
    assert sorted(p.name for p in written) == ["report.json", "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert "## Rounds" not in md and "## Plots" not in md and "## Verification" not in md


def test_failed_verify_in_markdown(report: dict) -> None:
    report["verify"].update(passed=False, violations=5, max_abs=0.2, reason="tolerance: 5/100 exceed")
    md = markdown.render_markdown(report)
    assert "✗ max abs diff 2.0e-01 > atol" in md and "**FAILED: tolerance: 5/100 exceed**" in md


def test_noisy_rows_are_flagged(report: dict) -> None:
    for row in report["bench"]:
        row.update(spread=0.02, noisy=False)
    report["bench"][0].update(spread=0.5, noisy=True)  # original, batch 1: a neighbour took the cores
    change = {r[0]: r[3] for r in tables.summary_rows(report)}
    assert change["p50 latency onnxruntime cpu b1 (ms, folded)"] == "×2.00 speed-up (noisy: repeats disagree)"
    assert change["p50 latency onnxruntime cpu b8 (ms, folded)"] == "×2.00 speed-up"
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(tables.bench_table(report["bench"], "original"))
    lines = out.getvalue().splitlines()
    assert any("50% noisy" in line for line in lines)
    assert sum("(noisy)" in line for line in lines) == 2  # folded and linearized at batch 1
    assert "| 2% |" in markdown.render_markdown(report)


def test_round_rows_say_what_replaced_the_removed_activations():
    from easier_export.ship.tables import ROUND_COLUMNS, round_rows

    base = {"entropy": 0.5, "val_top1": 90.0, "delta": -0.5, "within_budget": True, "seconds": 1.0}
    rounds = [{"round": 1, "removed": ["a"], **base},  # a report written before --substitute
              {"round": 2, "removed": ["b", "c"], "stand_ins": {"b": "affine", "c": "identity: after an add"}, **base},
              {"round": 3, "removed": ["d"], "stand_ins": {"d": "affine"}, **base}]
    column = ROUND_COLUMNS.index("replaced by")
    assert [row[column] for row in round_rows({"rounds": rounds})] == ["identity", "affine, identity", "affine"]


def test_eager_rows_reach_the_summary_only_above_their_noise(report: dict) -> None:
    eager = [{**r, "backend": "torch", "provider": "eager", "spread": 0.02, "noisy": False} for r in bench_rows()]
    eager[0].update(spread=0.6, noisy=True)  # rows: original b1, b8, linearized b1, b8, folded b1, b8
    eager[5].update(p50_ms=8 * 4.0 / 1.01)  # folded at batch 8: ×1.01, inside its 2 % spread
    report["bench"] = report["bench"] + eager
    names = [r[0] for r in tables.summary_rows(report)]
    assert "p50 latency onnxruntime cpu b1 (ms, folded)" in names
    assert not any("torch" in name for name in names), names
    eager[5].update(p50_ms=8 * 2.0)  # ×2.00 on steady rows: shown
    report["bench"] = bench_rows() + eager
    assert "p50 latency torch cpu b8 (ms, folded)" in [r[0] for r in tables.summary_rows(report)]


def test_rounds_table_is_whole_or_replaced_by_a_pointer() -> None:
    """A console too narrow for the rounds table gets a pointer, never cells cut to a few letters."""
    import io

    from rich.console import Console

    from easier_export.ship.tables import print_rounds

    rounds = [{"round": 1, "removed": ["stage1_0_act1", "stage1_0_act2"], "stand_ins": {}, "entropy": 0.9,
               "us_saved": 8.6, "val_top1": 99.0, "delta": 0.0, "within_budget": True, "seconds": 23.8}]
    for width, expected in ((80, "is in report.md"), (250, "stage1_0_act1")):
        out = io.StringIO()
        print_rounds({"rounds": rounds}, Console(file=out, width=width))
        assert expected in out.getvalue() and "…" not in out.getvalue()
