"""benchmarks/compare.py's verdicts: a method is named ahead of or behind another only where every seed's paired
interval over the val images excludes zero on the same side. Checked on constructed per-image outcomes."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import benchmark_script

N = 2000


@pytest.fixture(scope="module")
def compare():
    with benchmark_script("compare.py", "compare_study") as module:
        yield module


def row(compare, method: str, seed: int, right: int, k: int = 4, first: int = 0) -> dict:
    """A cell whose model at ``k`` removed gets images first..first+right-1 right (of N)."""
    correct = torch.tensor([1.0 if first <= i < first + right else 0.0 for i in range(N)])
    return {"model": "resnet20", "method": method, "seed": seed, "curve": [(k, 100.0 * right / N)],
            "outcomes": {str(k): compare.as_bits(correct)}}


def test_outcomes_survive_packing(compare) -> None:
    """A committed cell keeps per-image outcomes packed: they read back image for image, whatever the count."""
    for n in (1, 7, 8, 9, 5000):
        correct = (torch.arange(n) * 7919 % 3 == 0).to(torch.float32)
        packed = {"outcomes": {"4": compare.as_bits(correct)}}
        assert torch.equal(compare.outcomes(packed, 4), correct.to(torch.float64))
    assert len(compare.as_bits(torch.ones(5000))) < 850


def test_ahead_in_every_seed(compare) -> None:
    a = [row(compare, "a", 0, 1900), row(compare, "a", 1, 1880)]
    b = [row(compare, "b", 0, 1700), row(compare, "b", 1, 1720)]
    pairs = compare.paired(a, b, 4)
    assert [seed for seed, _ in pairs] == [0, 1]
    assert pairs[0][1].change == pytest.approx(10.0) and pairs[1][1].change == pytest.approx(8.0)
    assert compare.verdict(pairs) == "**ahead**"
    assert compare.verdict(compare.paired(b, a, 4)) == "**behind**"


def test_one_seed_against_it_is_noise(compare) -> None:
    """Seed 0 far ahead, seed 1 level: not a property of the method."""
    pairs = compare.paired([row(compare, "a", 0, 1900), row(compare, "a", 1, 1700)],
                           [row(compare, "b", 0, 1700), row(compare, "b", 1, 1700)], 4)
    assert compare.verdict(pairs) == "not distinguishable"


def test_same_accuracy_on_other_images_is_not_a_difference(compare) -> None:
    """Equal top-1 but 200 images swapped: the interval spans zero, however many images disagree."""
    pairs = compare.paired([row(compare, "a", s, 1700, first=200) for s in (0, 1)],
                           [row(compare, "b", s, 1700) for s in (0, 1)], 4)
    assert all(p.change == 0 and p.discordant == 400 and p.bound < 0 for _, p in pairs)
    assert compare.verdict(pairs) == "not distinguishable"


def test_only_shared_seeds_and_counts_pair(compare) -> None:
    """A seed or a removal count one method lacks (a one-shot run has only its K) is not paired."""
    a, b = [row(compare, "a", 0, 1900), row(compare, "a", 2, 1900)], [row(compare, "b", 0, 1700)]
    assert compare.paired(a, b, 4) != []
    assert compare.verdict(compare.paired(a, b, 4)) == "one seed only"
    assert compare.paired([row(compare, "a", 0, 1900, k=6)], [row(compare, "b", 0, 1700)], 4) == []


def test_within_budget_stops_at_the_first_miss(compare) -> None:
    assert compare.within_budget([(1, 91.5), (2, 90.9), (3, 91.6)], 92.0) == (1, 91.5)
    assert compare.within_budget([(6, 91.2)], 92.0) == (6, 91.2)
    assert compare.within_budget([(1, 80.0)], 92.0) == (0, 92.0)


def test_a_winner_needs_someone_to_beat(compare) -> None:
    """One method alone is not called the winner; against a method it leads in both seeds it is."""
    methods = compare.methods(argparse.Namespace(max_removed=6, finetune_epochs=1.0, entropy_reg=[0.1],
                                                 entropy_tau=0.1))
    easier = [row(compare, "easier", s, 1900) for s in (0, 1)]
    assert compare.differences({"easier": easier}, methods, "resnet20", (4,)) == []
    lines = compare.differences({"easier": easier, "random": [row(compare, "random", s, 1700) for s in (0, 1)]},
                                methods, "resnet20", (4,))
    assert any("| random order | 4 |" in line and "**behind**" in line for line in lines)
    assert "the winner." in " ".join(lines)


def test_finetuning_alone_is_the_yardstick_not_a_method(compare) -> None:
    """The control row (nothing removed) is never ranked among the methods; each method is paired against it for
    what its removals cost."""
    methods = compare.methods(argparse.Namespace(max_removed=6, finetune_epochs=1.0, entropy_reg=[0.1],
                                                 entropy_tau=0.1))
    lines = compare.differences({"easier": [row(compare, "easier", s, 1700) for s in (0, 1)],
                                 "random": [row(compare, "random", s, 1600) for s in (0, 1)],
                                 "control": [row(compare, "control", s, 1900) for s in (0, 1)]},
                                methods, "resnet20", (4,))
    split = next(i for i, line in enumerate(lines) if line.startswith("What the removals cost"))
    ranked, cost = " ".join(lines[:split]), lines[split:]
    assert "highest mean top-1 EASIER" in ranked and "finetune only" not in ranked
    assert any("| EASIER (entropy) | 4 |" in line and "**behind**" in line for line in cost)
    assert any("| random order | 4 |" in line and "**behind**" in line for line in cost)


def test_the_control_resumes_where_it_stopped(compare, tmp_path) -> None:
    """Two rounds in one go and one round, stopped, then resumed to two give the same weights and outcomes: each
    round seeds its own data order, as the loop's rounds do."""
    from torch.utils.data import DataLoader, TensorDataset

    from easier_export.trace.tracing import trace

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    loaders = argparse.Namespace(
        train=DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator()),
        val=DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16))

    def model() -> torch.nn.Module:
        torch.manual_seed(1)
        return trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                         torch.nn.Linear(144, 4)))

    def args(rounds: int) -> argparse.Namespace:
        return argparse.Namespace(max_removed=rounds, finetune_epochs=1.0, lr=0.1)

    whole = compare.control_cell(model(), loaders, 3, tmp_path / "whole", args(2))
    compare.control_cell(model(), loaders, 3, tmp_path / "split", args(1))
    resumed = compare.control_cell(model(), loaders, 3, tmp_path / "split", args(2))
    assert [r for r, _ in whole["curve"]] == [1, 2] and whole["removed"] == []
    assert resumed["curve"] == whole["curve"] and resumed["outcomes"] == whole["outcomes"]
    assert whole["curve"][0][1] != whole["curve"][1][1] and whole["sites"] == 1


def test_a_shard_outside_its_range_is_refused(compare) -> None:
    assert compare.shard_arg("1/2") == (1, 2)
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            compare.shard_arg(bad)


def test_the_ablation_swaps_the_rectifier_the_model_was_trained_with(compare) -> None:
    from torch import nn

    from easier_export.trace.sites import find_call_sites
    from easier_export.trace.tracing import trace

    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Conv2d(4, 2, 1),
                             nn.ReLU()))
    assert compare.native_rectifier(gm) == "relu6"
    assert [site.op for site in find_call_sites(compare.swapped(gm, "silu"))] == ["silu", "silu", "relu"]
