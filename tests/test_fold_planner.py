"""Planner: DP over chains picks the cheapest segmentation; timings are cached; chosen merges stay exact."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from _fold_util import assert_same, count_modules, traced
from torch import nn

from easier_export.fold import plan_and_fold
from easier_export.fold._common import propagate_shapes
from easier_export.fold.planner import LatencyTable, _ChainPlanner, find_chains


class Block(nn.Module):
    """MobileNetV2 inverted residual with its activations erased: pw 1x1 -> dw 3x3 -> pw 1x1 (+ x)."""

    def __init__(self, channels: int = 4, hidden: int = 12, residual: bool = True) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(channels, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.pw2 = nn.Conv2d(hidden, channels, 1)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw2(self.dw(self.pw1(x)))
        return x + y if self.residual else y


class WeightCountTable:
    """A deterministic stand-in for measured latency: cost = weight count (an add costs 1)."""

    def latency(self, module: nn.Module | None, in_shape: tuple, out_shape: tuple) -> float:
        return 1.0 if module is None else float(module.weight.numel())


def _planner(residual: bool) -> _ChainPlanner:
    gm = traced(Block(residual=residual))
    propagate_shapes(gm, torch.randn(1, 4, 8, 8, dtype=torch.float64))
    (chain,) = find_chains(gm)
    return _ChainPlanner(chain, WeightCountTable())


def test_dp_prefers_whole_chain_over_slower_pairs() -> None:
    # pw 48 + dw 108 + pw 48 = 204; pw.dw -> dense 3x3 4->12 = 432 (slower); all three -> 3x3 4->4 = 144
    chosen, others = _planner(residual=False).plan()
    assert [(s.start, s.stop) for s in chosen] == [(0, 2)]
    assert (chosen[0].us_before, chosen[0].us_after) == (204.0, 144.0)
    by_span = {(s.start, s.stop): s for s in others}
    assert by_span[(0, 1)].us_after == 432.0 > by_span[(0, 1)].us_before


def test_dp_closes_the_residual() -> None:
    planner = _planner(residual=True)
    chosen, _ = planner.plan()
    assert [(s.start, s.stop) for s in chosen] == [(0, 3)]
    assert [n.name for n in planner.segment_nodes(chosen[0])] == ["pw1", "dw", "pw2", "add"]


def test_plan_and_fold_measures_caches_and_stays_exact(tmp_path: pathlib.Path, monkeypatch) -> None:
    torch.manual_seed(0)
    gm = traced(nn.Sequential(Block(8, 48), Block(8, 48, residual=False)), torch.float32)
    x = torch.randn(2, 8, 16, 16)
    cache = tmp_path / "latency.json"
    folded, records = plan_and_fold(gm, x[:1], cache=cache, threads=1)
    assert_same(gm, folded, x, 1e-4)
    assert records and all(r.us_before is not None and r.us_after is not None for r in records if r.applied)
    assert all(r.reason.startswith(("slower", "less saving")) for r in records if not r.applied)
    merged_away = sum(len([n for n in r.nodes if "add" not in n]) - 1 for r in records if r.applied)
    assert count_modules(folded, nn.Conv2d) == 6 - merged_away
    table = json.loads(cache.read_text())
    assert table and all(v >= 0 for v in table.values())

    def no_timing(*_: object) -> float:
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(LatencyTable, "_time", no_timing)
    monkeypatch.setattr(LatencyTable, "overhead", 0.0)
    again, records_again = plan_and_fold(gm, x[:1], cache=cache, threads=1)
    assert [r.to_dict() for r in records_again] == [r.to_dict() for r in records]


@pytest.mark.parametrize("target", ["cpu"])
def test_latency_table_times_ops(target: str) -> None:
    table = LatencyTable(target, threads=1, repeats=5, warmup=1)
    small = table.latency(nn.Conv2d(8, 8, 1), (1, 8, 8, 8), (1, 8, 8, 8))
    big = table.latency(nn.Conv2d(64, 64, 3, padding=1), (1, 64, 32, 32), (1, 64, 32, 32))
    assert 0 <= small < big
    assert table.latency(nn.Linear(16, 32), (1, 5, 16), (1, 5, 32)) >= 0
    assert table.latency(None, (1, 8, 8, 8), (1, 8, 8, 8)) >= 0
