"""The promise: what ships is faster than the original beyond the noise, or it is the original; a budget judged
on a paired interval; the same choice twice. No wall clock: timings are scripted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from easier_export.core.stats import (
    Speedup,
    better_beyond_chance,
    held_out,
    paired_accuracy_change,
    paired_ppl_change,
    resolvable_drop,
)
from easier_export.fold.groups import Group
from easier_export.loop.config import LoopConfig, Task
from easier_export.loop.selection import pick_group
from easier_export.ship import shipping
from easier_export.trace.edits import remove_sites
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


# ---------------------------------------------------------------------------------------------- statistics
def _outcomes(n: int, lost: int, gained: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image correctness of an original and a candidate that loses ``lost`` and gains ``gained`` images."""
    base = torch.zeros(n)
    base[: n // 2] = 1
    cand = base.clone()
    cand[:lost] = 0
    cand[n // 2: n // 2 + gained] = 1
    return base, cand


def test_paired_change_and_its_bound_on_constructed_outcomes():
    base, cand = _outcomes(1000, lost=30, gained=10)
    observed = paired_accuracy_change(base, cand, confidence=0.0)
    assert observed.change == pytest.approx(-2.0) and observed.bound == observed.change
    assert (observed.n, observed.discordant) == (1000, 40)
    bounded = paired_accuracy_change(base, cand, confidence=0.9)
    # Agresti–Min: (10.5 - 30.5) / 1001 = -0.01998; var = 41 / 1001 - 0.01998² ; z = 1.2816
    var = 41 / 1001 - (20 / 1001) ** 2
    assert bounded.bound == pytest.approx(-2.0 - 100 * 1.2815516 * math.sqrt(var / 1001), rel=1e-5)
    assert paired_accuracy_change(base, cand, 0.95).bound < bounded.bound < bounded.change
    # no changed outcome: still an interval, not a zero-wide one
    same = paired_accuracy_change(base, base, 0.9)
    assert same.change == 0.0 and -0.2 < same.bound < 0.0


def test_budget_judged_on_the_bound_not_on_the_observed_drop():
    """−0.9 observed on 1,000 images is within a 1-point budget at confidence 0 (the old rule) and not at 0.9."""
    base, cand = _outcomes(1000, lost=45, gained=36)
    task, every = Task(), torch.ones(1000, dtype=torch.bool)
    metrics = ({"correct": base, "nll": base}, {"correct": cand, "nll": cand}, every)
    assert task.within(LoopConfig(confidence=0.0), task.change(LoopConfig(confidence=0.0), *metrics))
    assert not task.within(LoopConfig(confidence=0.9), task.change(LoopConfig(confidence=0.9), *metrics))
    assert task.within(LoopConfig(confidence=0.9, max_drop=3.0), task.change(LoopConfig(confidence=0.9), *metrics))
    # judged on a subset only: the 40 lost images are all outside it
    subset = torch.zeros(1000, dtype=torch.bool)
    subset[500:] = True
    assert task.change(LoopConfig(confidence=0.0), *metrics[:2], subset).change >= 0


def test_paired_perplexity_change():
    base = torch.full((400,), 2.0)
    cand = base + 0.01 + 0.02 * torch.linspace(-1, 1, 400)
    change = paired_ppl_change(base, cand, 0.9)
    assert change.change == pytest.approx(100 * math.expm1(0.01), rel=1e-6)
    assert change.bound > change.change
    assert paired_ppl_change(base, cand, 0.0).bound == pytest.approx(change.change)


def test_held_out_samples_are_deterministic_and_spread_over_a_class_sorted_folder():
    mask = held_out(1000, 0.5)
    assert torch.equal(mask, held_out(1000, 0.5)) and 480 <= int(mask.sum()) <= 520
    per_class = mask.view(10, 100).sum(1)  # an ImageFolder lists its classes one after the other
    assert int(per_class.min()) >= 45 and int(per_class.max()) <= 55
    assert not held_out(1000, 0.0).any()
    assert bool((held_out(1000, 0.2) <= held_out(1000, 0.5)).all())  # a smaller share is a subset


def test_unresolvable_budget_is_estimated_before_the_first_round():
    margin, needed = resolvable_drop(67.0, 1000, 0.9)  # the user: 100 val images per class
    assert margin > 1.0 and needed > 1000
    margin, _ = resolvable_drop(67.0, needed, 0.9)
    assert margin == pytest.approx(0.5, abs=0.01)
    assert resolvable_drop(99.4, 360, 0.9)[0] < 0.5  # the demo's digits


def test_better_beyond_chance_is_an_exact_sign_test():
    base = torch.zeros(100)
    assert not better_beyond_chance(base[:3], torch.tensor([1.0, 1.0, 0.0]))  # p = 0.25
    assert better_beyond_chance(base[:5], torch.ones(5))  # p = 1/32
    assert not better_beyond_chance(base[:4], torch.ones(4))  # p = 1/16
    assert not better_beyond_chance(base, base)  # nothing differs


# ---------------------------------------------------------------------------------------------- same order
def test_paying_groups_are_tried_by_risk_whichever_timed_faster():
    """Savings measured 12.6 and 12.1 us in one run, 12.1 and 12.6 in the next: the order must not follow."""
    a, b = ("s1a", "s1b"), ("s2a", "s2b")

    class Groups:
        def __init__(self, groups: list[Group]) -> None:
            self.groups = groups

        def candidates(self, removed: set[str], allowed: set[str] | None = None) -> list[Group]:
            return self.groups

    scores = {"s1a": 0.2, "s1b": 0.2, "s2a": 0.1, "s2b": 0.3}  # equal risk: the name decides
    for first, second in ((12.6, 12.1), (12.1, 12.6), (40.0, 3.0)):
        assert pick_group(scores, Groups([Group(a, first, ""), Group(b, second, "")]), [], [], 10)[0] == list(a)
    scores["s2b"] = 0.05
    assert pick_group(scores, Groups([Group(a, 40.0, ""), Group(b, 3.0, "")]), [], [], 10)[0] == list(b)


# ---------------------------------------------------------------------------------------------- what ships
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _steps() -> list[shipping.Step]:
    torch.manual_seed(0)
    original = trace(Net().eval())
    sites = [s.name for s in find_call_sites(original)]
    return [shipping.Step(2, sites, 90.0, remove_sites(original, sites, relocate=True).eval()),
            shipping.Step(1, sites[:1], 91.0, remove_sites(original, sites[:1], relocate=True).eval()),
            shipping.Step(0, [], 92.0, original)]


def _exporter(folded, folds, step, path: Path) -> dict:
    """Stands in for export + verify: a file per distinct graph (the folded weights' bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(t.detach().numpy().tobytes() for t in folded.state_dict().values()))
    return {"path": str(path), "verify": {"passed": True}}


@pytest.fixture
def no_timed_plan(monkeypatch):
    """The "auto" plan made without the clock: a plan of no merge."""
    real_fold = shipping.fold_model
    monkeypatch.setattr(shipping, "fold_model", lambda gm, example, mode, **kw: real_fold(
        gm, example, mode="none" if mode == "auto" else mode))


def _scripted_race(ratios: dict[str, float]):
    """race() replaced by verdicts per candidate label (any label not named: ×0.90, slower)."""
    calls = []

    def race(models, baseline, *args, **kwargs):
        calls.append(sorted(k for k in models if k != baseline))
        r = {k: ratios.get(k, 0.90) for k in models if k != baseline}
        return {k: Speedup(v, v * 0.97, v * 1.03, 6) for k, v in r.items()}
    return race, calls


def test_a_plan_slower_than_the_original_steps_back_to_a_faster_round(tmp_path, monkeypatch, no_timed_plan):
    race, calls = _scripted_race({"round 1, fold all": 1.2})
    monkeypatch.setattr(shipping, "race", race)
    shipment = shipping.choose(_steps(), tmp_path / "original.onnx", _exporter, torch.randn(1, 3, 8, 8), "auto",
                               True, "cpu", 1, 1, tmp_path / "work", {})
    assert shipment.chosen.step.round == 1 and shipment.chosen.mode == "all"
    assert "×1.20 faster" in shipment.reason
    # relocated padding never ships unmerged: no BatchNorm-only candidate for rounds 2 and 1
    assert all("fold none" not in label for c in calls[:2] for label in c)


def test_nothing_faster_ships_the_original_and_says_so(tmp_path, monkeypatch, no_timed_plan):
    race, calls = _scripted_race({})
    monkeypatch.setattr(shipping, "race", race)
    shipment = shipping.choose(_steps(), tmp_path / "original.onnx", _exporter, torch.randn(1, 3, 8, 8), "auto",
                               True, "cpu", 1, 1, tmp_path / "work", {})
    assert shipment.chosen.step.round == 0 and shipment.chosen.mode == "none"
    assert shipment.reason == shipping.NO_SPEEDUP and shipment.to_dict()["removed"] == []
    assert len(calls) == 3 and all(t["speedup"]["faster"] is False for t in shipment.tried)


def test_an_unmeasurable_speedup_with_more_weights_does_not_ship(tmp_path, monkeypatch):
    """Two candidates faster than the original and alike within the noise: the one storing fewer numbers ships."""
    race, _ = _scripted_race({"round 2, fold auto": 1.30, "round 2, fold all": 1.31})
    monkeypatch.setattr(shipping, "race", race)
    monkeypatch.setattr(shipping, "stored_numbers", lambda m: 10 if m is shipping_models["auto"] else 20)
    shipping_models: dict[str, nn.Module] = {}
    real_fold = shipping.fold_model

    def fold(gm, example, mode, **kw):
        folded, folds = real_fold(gm, example, mode="none" if mode == "auto" else mode)
        shipping_models[mode] = folded
        return folded, folds

    monkeypatch.setattr(shipping, "fold_model", fold)
    shipment = shipping.choose(_steps(), tmp_path / "original.onnx", _exporter, torch.randn(1, 3, 8, 8), "auto",
                               True, "cpu", 1, 1, tmp_path / "work", {})
    assert shipment.chosen.step.round == 2 and shipment.chosen.mode == "auto"


def test_a_round_over_budget_on_held_out_samples_never_ships(tmp_path, monkeypatch, no_timed_plan):
    """Round 2 looked fine on the samples the rounds were judged on but not on the held-out ones: round 1 ships,
    and round 2 is never even timed."""
    race, calls = _scripted_race({"round 2, fold all": 1.5, "round 1, fold all": 1.2})
    monkeypatch.setattr(shipping, "race", race)
    steps = _steps()
    steps[0].within_holdout, steps[0].holdout = False, {"change": -1.4, "bound": -2.5}
    shipment = shipping.choose(steps, tmp_path / "original.onnx", _exporter, torch.randn(1, 3, 8, 8), "auto",
                               True, "cpu", 1, 1, tmp_path / "work", {})
    assert shipment.chosen.step.round == 1 and not any("round 2" in label for c in calls for label in c)
    assert shipment.tried[0] == {"candidate": "round 2", "verified": None, "speedup": None,
                                 "holdout": {"change": -1.4, "bound": -2.5}}


def test_modes_tried_per_step():
    assert shipping.modes_for("auto", relocated=True) == ["auto", "all"]
    assert shipping.modes_for("auto", relocated=False) == ["auto", "all", "none"]
    assert shipping.modes_for("none", relocated=True) == ["none"]
    assert shipping.modes_for("all", relocated=False) == ["all", "none"]


@pytest.mark.parametrize("option, value", [("--confidence", "1"), ("--confidence", "nan"), ("--crop-pct", "0"),
                                           ("--crop-pct", "1.5")])
def test_promise_options_out_of_range_are_one_line(capsys, image_folder, tmp_path, option, value):
    from conftest import run_cli

    code, text = run_cli(capsys, "compress", "demo_cnn", "--data", str(image_folder), "--out", str(tmp_path / "o"),
                         option, value)
    assert code == 2 and "Traceback" not in text and option in text
    assert not (tmp_path / "o").exists()
