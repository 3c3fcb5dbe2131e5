"""Planner: DP over chains picks the cheapest segmentation; timings are cached; chosen merges stay exact."""

from __future__ import annotations

import json
import math
import pathlib
import warnings
from collections.abc import Callable

import onnx
import pytest
import torch
from _fold_util import assert_same, count_modules, traced
from torch import nn

from easier_export.core import timing as timing_module
from easier_export.core.timing import SESSION_SETS
from easier_export.fold import fold_model, plan_and_fold
from easier_export.fold.chains import find_chains
from easier_export.fold.fx import propagate_shapes
from easier_export.fold.latency import TIMING_VERSION, LatencyTable, trusted_saving
from easier_export.fold.planner import ChainPlanner, Segment, best_partition
from easier_export.fold.records import Merge
from easier_export.fold.segments import SegmentSpec, segment_graph


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
    """A deterministic stand-in for measured latency: cost = weight count (an add costs 1), no noise."""

    def times(self, spec: SegmentSpec, merged: nn.Module) -> tuple[float, float, float]:
        before = sum(m.weight.numel() for m in spec.ops) + spec.add + (spec.skip.weight.numel() if spec.skip else 0)
        return float(before), float(merged.weight.numel()), 0.0


def _planner(residual: bool) -> ChainPlanner:
    gm = traced(Block(residual=residual))
    propagate_shapes(gm, torch.randn(1, 4, 8, 8, dtype=torch.float64))
    (chain,) = find_chains(gm)
    return ChainPlanner(chain, WeightCountTable())


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


def test_partition_keeps_savings_above_noise_and_never_overlaps() -> None:
    merge = Merge(nn.Identity())
    segs = [Segment(0, 1, merge, 10, 4), Segment(1, 2, merge, 10, 3), Segment(0, 2, merge, 20, 9),
            Segment(2, 3, merge, 10, 9, us_spread=2.0)]  # the last saving (1us) is within its noise (2us)
    total, chosen = best_partition(segs, 4)
    assert total == 11 and [(s.start, s.stop) for s in chosen] == [(0, 2)]
    assert best_partition(segs[:2], 3) == (7, [segs[1]])


class FakeClock:
    """A stand-in for ``time``: each ORT run advances it by its graph's cost (10 us a node, 1 ns a weight), plus
    noise per timed block of ten runs (``noise[i % len(noise)]`` repeats over the i-th session's blocks: a race
    opens the baseline's session, then the candidate's, for each fresh pair), so the timing loop is tested without
    depending on the machine's load."""

    def __init__(self, *noise: tuple[float, ...]) -> None:
        self.now, self.noise, self.calls, self.sessions = 0.0, noise, 0, 0

    def perf_counter(self) -> float:
        return self.now

    def runner(self, model: onnx.ModelProto) -> Callable[[], None]:
        cost = 10.0 * len(model.graph.node) + 1e-3 * sum(math.prod(t.dims) for t in model.graph.initializer)
        clock, pattern = self, (self.noise[self.sessions % len(self.noise)] if self.noise else (0.0,))
        self.sessions += 1

        class Session:
            runs = 0

            def run(self, *_: object) -> None:
                block = max(0, self.runs - 3) // LatencyTable.block  # after three warm-up runs
                clock.now += (cost + pattern[block % len(pattern)]) * 1e-6
                clock.calls, self.runs = clock.calls + 1, self.runs + 1

        return Session().run


def _fake_timing(monkeypatch, clock: FakeClock) -> None:
    monkeypatch.setattr(timing_module, "time", clock)
    monkeypatch.setattr(LatencyTable, "_runner", lambda _self, model: clock.runner(model))


def test_plan_and_fold_measures_caches_and_stays_exact(tmp_path: pathlib.Path, monkeypatch) -> None:
    torch.manual_seed(0)
    gm = traced(nn.Sequential(Block(8, 48), Block(8, 48, residual=False)), torch.float32)
    x = torch.randn(2, 8, 16, 16)
    cache = tmp_path / "latency.json"
    _fake_timing(monkeypatch, FakeClock())
    folded, records = plan_and_fold(gm, x[:1], cache=cache, threads=1)
    assert_same(gm, folded, x, 1e-4)
    applied = [r for r in records if r.applied]
    assert applied and all(r.us_before > r.us_after for r in applied)
    assert all(r.reason.startswith(("slower", "less saving", "saving within")) for r in records if not r.applied)
    merged_away = sum(len([n for n in r.nodes if "add" not in n]) - 1 for r in applied)
    assert count_modules(folded, nn.Conv2d) == 6 - merged_away
    table = json.loads(cache.read_text())
    assert table and all(v["before"] > 0 and v["after"] > 0 for v in table.values())

    def no_timing(*_: object) -> tuple:
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(LatencyTable, "_time_pair", no_timing)
    again, records_again = plan_and_fold(gm, x[:1], cache=cache, threads=1)
    assert [r.to_dict() for r in records_again] == [r.to_dict() for r in records]


def test_a_recorded_plan_is_replayed_without_timing(monkeypatch) -> None:
    """Rebuilding a shipped model elsewhere: exactly the recorded merges come back, and nothing is timed."""
    torch.manual_seed(0)
    gm = traced(nn.Sequential(Block(8, 48), Block(8, 48, residual=False)), torch.float32)
    x = torch.randn(2, 8, 16, 16)
    _fake_timing(monkeypatch, FakeClock())
    planned, records = plan_and_fold(gm, x[:1], threads=1)
    recorded = [r.nodes for r in records if r.applied]
    assert recorded

    def no_timing(*_: object) -> tuple:
        raise AssertionError("a replay timed a merge")

    monkeypatch.setattr(LatencyTable, "_time_pair", no_timing)
    replayed, again = plan_and_fold(gm, x[:1], replay=recorded)
    assert [r.nodes for r in again if r.applied] == recorded
    assert all(r.us_before is None for r in again if r.applied)
    assert str(replayed.graph) == str(planned.graph)
    assert_same(planned, replayed, x, 1e-6)
    nothing, none_applied = plan_and_fold(gm, x[:1], replay=[])
    assert not any(r.applied for r in none_applied) and count_modules(nothing, nn.Conv2d) == 6


def test_in_context_timing_sees_the_ops_removed(monkeypatch) -> None:
    """Three 1x1 convs against their merge, timed as graphs: the merge saves two dispatches (two nodes), which
    single-op timings minus their call overhead net out; the loop stops as soon as the difference is stable."""
    ops = [nn.Conv2d(8, 8, 1) for _ in range(3)]
    spec = SegmentSpec(ops, (1, 8, 4, 4))
    assert [n.op_type for n in segment_graph(spec).graph.node] == ["Conv"] * 3
    clock = FakeClock()
    _fake_timing(monkeypatch, clock)
    before, after, spread = LatencyTable("cpu", threads=1).times(spec, nn.Conv2d(8, 8, 1))
    assert (round(before, 3), round(after, 3), round(spread, 6)) == (30.216, 10.072, 0.0)
    # each of the fresh session pairs: warm-up, then the six blocks an interval needs
    assert clock.calls == SESSION_SETS * (2 * 3 + 2 * 6 * LatencyTable.block)


@pytest.mark.parametrize("max_seconds", [0.05, 0.051, 0.07])  # stopping after an even or an odd block count
def test_noisy_timing_runs_to_its_time_limit_and_is_not_trusted(monkeypatch, max_seconds: float) -> None:
    """Block differences split evenly between +20 and -20 us leave the median undetermined: timed until
    ``max_seconds``, and the saving is not trusted, whichever side the median lands on."""
    clock = FakeClock((0.0,), (0.0, 40.0))  # the merged graph's every other block is slow
    _fake_timing(monkeypatch, clock)
    table = LatencyTable("cpu", threads=1, max_seconds=max_seconds)
    timed = table.times(SegmentSpec([nn.Conv2d(8, 8, 1)] * 3, (1, 8, 4, 4)), nn.Conv2d(8, 8, 1))
    assert clock.now > max_seconds and trusted_saving(*timed) == 0.0


def test_a_consistent_saving_is_trusted_however_noisy_single_blocks_are(monkeypatch) -> None:
    """Block differences of 20 us, with one block in four 30 us off either way: single blocks spread over 60 us
    (the old rule, their interquartile range, called the saving noise), but the median is 20 us for sure."""
    clock = FakeClock((0.0, 0.0, 0.0, 30.0), (0.0, 30.0, 0.0, 0.0))
    _fake_timing(monkeypatch, clock)
    table = LatencyTable("cpu", threads=1, max_seconds=10.0)
    timed = table.times(SegmentSpec([nn.Conv2d(8, 8, 1)] * 3, (1, 8, 4, 4)), nn.Conv2d(8, 8, 1))
    assert trusted_saving(*timed) == pytest.approx(20.144) and clock.now < 0.1


def test_timings_of_an_older_rule_are_timed_again(tmp_path: pathlib.Path, monkeypatch) -> None:
    _fake_timing(monkeypatch, FakeClock())
    cache = tmp_path / "latency.json"
    spec, merged = SegmentSpec([nn.Conv2d(8, 8, 1)] * 3, (1, 8, 4, 4)), nn.Conv2d(8, 8, 1)
    table = LatencyTable("cpu", threads=1, cache=cache)
    table.times(spec, merged)
    (key,) = table.table
    unversioned = key.split("|", 1)[1]
    cache.write_text(json.dumps({key: table.table[key], unversioned: {"before": 1.0, "after": 0.0, "spread": 0.0}}))
    assert list(LatencyTable("cpu", threads=1, cache=cache).table) == [key]


def test_a_segment_slower_than_the_budget_still_gets_an_interval(monkeypatch) -> None:
    """Big segments (tens of ms a run) are timed over enough blocks for a finite interval, so they can merge."""
    clock = FakeClock()
    _fake_timing(monkeypatch, clock)
    timed = LatencyTable("cpu", threads=1, max_seconds=1e-9).times(SegmentSpec([nn.Conv2d(8, 8, 1)] * 3, (1, 8, 4, 4)),
                                                                   nn.Conv2d(8, 8, 1))
    assert trusted_saving(*timed) == pytest.approx(20.144)
    assert clock.calls == SESSION_SETS * (2 * 3 + 2 * 6 * LatencyTable.block)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", f'{{"{TIMING_VERSION}|k": 3}}'])
def test_a_damaged_latency_cache_only_costs_time(tmp_path: pathlib.Path, content: str) -> None:
    cache = tmp_path / "latency.json"
    cache.write_text(content)
    assert LatencyTable("cpu", threads=1, cache=cache).table == {}


class Doubled(nn.Module):
    """``conv(x) + conv(x)`` (what ``relu(y + y)`` leaves once the activation is removed): one node on both sides."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y + y)


def test_an_add_of_one_node_to_itself_is_no_parallel_skip() -> None:
    """The chain's last conv was taken as its own skip branch: the merge listed it twice and erasing it twice made
    torch.fx warn (``erase_node … already erased``)."""
    gm = traced(Doubled())
    assert all(chain.skip_node not in chain.nodes for chain in find_chains(gm))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, _ = fold_model(gm, x, mode="auto")
    assert_same(gm, folded, x, 1e-9)


def test_timings_are_shared_with_every_run_on_this_machine(tmp_path: pathlib.Path, monkeypatch) -> None:
    """A second run (another output folder) reuses the first run's timings through the machine's table, so it
    makes the same latency decisions; a pinned file's own entries win over the machine's."""
    clock = FakeClock()
    _fake_timing(monkeypatch, clock)
    spec, merged = SegmentSpec([nn.Conv2d(8, 8, 1)] * 3, (1, 8, 4, 4)), nn.Conv2d(8, 8, 1)
    first = LatencyTable("cpu", threads=1, cache=tmp_path / "run1" / "latency.json")
    timed = first.times(spec, merged)
    first.save()
    calls = clock.calls
    second = LatencyTable("cpu", threads=1, cache=tmp_path / "run2" / "latency.json")
    assert second.times(spec, merged) == timed and clock.calls == calls  # nothing timed again
    assert first.shared == second.shared and first.shared.is_file()
    (key,) = first.table
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps({key: {"before": 5.0, "after": 1.0, "spread": 0.0}}))
    assert LatencyTable("cpu", threads=1, cache=pinned).times(spec, merged) == (5.0, 1.0, 0.0)
    assert LatencyTable("cpu", threads=1).table == {}  # a table that keeps nothing shares nothing


def test_a_machine_table_that_cannot_be_written_only_costs_time(tmp_path: pathlib.Path, monkeypatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """$XDG_CACHE_HOME on a read-only or odd path (here: a file) must not fail the run: its own table is written,
    the machine's is skipped with a warning."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    _fake_timing(monkeypatch, FakeClock())
    table = LatencyTable("cpu", threads=1, cache=tmp_path / "run" / "latency.json")
    table.times(SegmentSpec([nn.Conv2d(8, 8, 1)] * 3, (1, 8, 4, 4)), nn.Conv2d(8, 8, 1))
    table.save()
    assert json.loads((tmp_path / "run" / "latency.json").read_text()) == table.table
    assert "could not add to this machine's latency table" in caplog.text
