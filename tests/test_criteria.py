"""The study's criteria and ablations on constructed cases whose right answer is known."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from test_loop import _run
from torch import nn

from easier_export.core.errors import UserError
from easier_export.load.arch import DemoNet
from easier_export.load.data import digits
from easier_export.loop.config import LoopConfig
from easier_export.loop.criteria import CRITERIA, Evidence, register_criterion
from easier_export.loop.criteria.egp import EGP_RATE, egp_rates, egp_scores, producer
from easier_export.loop.criteria.gradient import gradient_scores
from easier_export.loop.criteria.layerfold import layerfold_scores, with_slopes
from easier_export.loop.criteria.tlc import bn_on_probability, tlc_scores
from easier_export.loop.entropy import SiteStats, binary_entropy, measure
from easier_export.loop.regularise import SoftEntropy, entropy_regularised
from easier_export.trace.edits import remove_sites, swap_rectifiers
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

CPU = torch.device("cpu")
STUDY_CRITERIA = ("gradient", "tlc", "layerfold", "egp")


def _evidence(gm, sites, loader, batches: int | None = None, stats: dict[str, SiteStats] | None = None) -> Evidence:
    return Evidence(gm, sites, loader, CPU, batches, True, 0.0, 0, stats or {})


def _batches(x: torch.Tensor, y: torch.Tensor, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.chunk(n), y.chunk(n), strict=True))


class ThreeBN(nn.Module):
    """Three BN → ReLU sites on the same input, and a residual-add site that no BatchNorm feeds."""

    def __init__(self) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(3))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = (F.relu(bn(x)) for bn in self.bns)
        return self.head(F.relu(a + b + c - 1.0).mean((2, 3)))


def _three_bn() -> nn.Module:
    model = ThreeBN()
    with torch.no_grad():  # β/|γ| = 0, 1, 3: P(ON) = 0.5, 0.841, 0.9987
        for bn, beta, gamma in zip(model.bns, (0.0, 1.0, 3.0), (1.0, -1.0, 1.0), strict=True):
            bn.bias.fill_(beta)
            bn.weight.fill_(gamma)
    return model


def test_bn_on_probability_is_phi_of_beta_over_abs_gamma():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
        bn.weight.copy_(torch.tensor([1.0, 1.0, 2.0, -0.5]))
    p = bn_on_probability(bn)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.841344746, 0.308537539, 0.999968329], dtype=torch.float64))
    assert bn_on_probability(bn, threshold=1.0)[1] == pytest.approx(0.5)


def test_tlc_predicts_the_measured_entropy_order_without_data():
    gm = trace(_three_bn())
    sites = find_call_sites(gm)
    predicted = tlc_scores(gm, sites)
    names = [s.name for s in sites]
    assert predicted[names[3]] is None  # after the add: no BatchNorm to read
    expected = [float(binary_entropy(torch.tensor(0.5 * (1 + math.erf(z / math.sqrt(2)))))) for z in (0, 1, 3)]
    assert [predicted[n] for n in names[:3]] == pytest.approx(expected, rel=1e-4)
    x = torch.randn(256, 4, 6, 6)  # train-mode BN makes every channel N(β, γ²): what TLC assumes
    measured = measure(gm, sites, _batches(x, torch.zeros(256, dtype=torch.long)), CPU)
    assert sorted(names[:3], key=lambda n: measured[n].entropy) == sorted(names[:3], key=lambda n: predicted[n])
    assert [measured[n].entropy for n in names[:3]] == pytest.approx(expected, abs=0.02)
    scores = CRITERIA["tlc"].score(_evidence(gm, sites, [], stats=measured))
    assert scores[names[3]] == measured[names[3]].entropy  # the measured entropy stands in


class DeadBranch(nn.Module):
    """Site ``b``'s output is multiplied by zero: the loss cannot depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.l1(x)) + 0.0 * F.relu(self.l2(x)))


def test_gradient_is_zero_where_the_loss_cannot_see_the_site_and_the_model_is_untouched():
    gm = trace(DeadBranch())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    sites = find_call_sites(gm)
    scores = gradient_scores(_evidence(gm, sites, _batches(torch.randn(64, 6), torch.randint(0, 3, (64,)))))
    assert scores[sites[1].name] == 0.0 and scores[sites[0].name] > 1e-4
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert all(p.grad is None for p in gm.parameters())


class FoldCase(nn.Module):
    """Site ``a`` only ever sees x² + 0.1 ≥ 0 (already linear); site ``b`` computes |x| = relu(x) + relu(−x),
    which the head needs to tell |x| > 1 from |x| < 1 (linearizing b turns |x| into 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.1]]))
            self.head.bias.copy_(torch.tensor([0.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(x * x + 0.1)
        b = F.relu(torch.cat([x, -x], 1)).sum(1, keepdim=True)
        return self.head(torch.cat([b, a], 1))


def test_layerfold_ranks_an_always_positive_site_most_linear_and_a_needed_one_last():
    gm = trace(FoldCase())
    sites = find_call_sites(gm)
    x = torch.tensor([[2.0], [-2.5], [3.0], [-0.3], [0.2], [-1.5]]).repeat(8, 1)
    loader = _batches(x, (x.abs() > 1).long().squeeze(1))
    scores = layerfold_scores(_evidence(gm, sites, loader, 4))
    a, b = (s.name for s in sites)
    assert scores[a] == pytest.approx(0.5, abs=1e-6)  # no task gradient: the penalty alone, by construction
    assert scores[b] > scores[a] + 0.05
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1  # the blends live in a copy


def test_layerfold_slopes_do_not_read_an_input_an_inplace_rectifier_overwrote():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    gm = trace(model)
    blended, slopes = with_slopes(gm, find_call_sites(gm))
    next(iter(slopes.values())).alpha.data.fill_(1.0)  # α = 1: the identity
    x = torch.randn(5, 3)
    torch.testing.assert_close(blended(x), model[2](model[0](x)))


def test_egp_prunes_low_entropy_layers_harder_and_their_units_collapse():
    rates = egp_rates(torch.tensor([0.05, 0.9, 0.95]))
    assert rates[0] > 0.9 and rates[1] < 0.1 and rates.mean() < EGP_RATE + 1e-9
    gm = trace(DemoNet())
    sites = find_call_sites(gm)
    loader = digits(batch_size=64).train
    stats = measure(gm, sites, loader, CPU, 2)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    scores = egp_scores(_evidence(gm, sites, loader, 2, stats))
    assert set(scores) == {s.name for s in sites} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # pruned a copy
    lowest = min(sites, key=lambda s: stats[s.name].entropy).name
    assert scores[lowest] <= stats[lowest].entropy + 1e-9


def test_producer_walks_back_through_batchnorm_and_residual_adds():
    gm = trace(DemoNet())
    for site in find_call_sites(gm):
        assert isinstance(producer(gm, site), (nn.Conv2d, nn.Linear))


def test_swap_rectifiers_changes_every_site_of_one_kind_and_nothing_else():
    model = DemoNet().eval()
    gm = trace(model)
    swapped = swap_rectifiers(gm, "relu", "gelu")
    assert {s.op for s in find_call_sites(swapped)} == {"gelu"}
    assert len(find_call_sites(swapped)) == len(find_call_sites(gm))
    by_hand = copy.deepcopy(model)  # the same network written with GELU
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ReLU):
            setattr(by_hand, name, nn.GELU())
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(swapped(x), by_hand(x))
    assert not torch.allclose(swapped(x), gm(x))
    assert len(find_call_sites(remove_sites(swapped, [find_call_sites(swapped)[0].name]))) == 5
    with pytest.raises(UserError, match="cannot swap"):
        swap_rectifiers(gm, "relu", "tanh")


def test_soft_entropy_penalty_is_the_binary_entropy_of_the_mean_sigmoid():
    probe = SoftEntropy(1, tau=0.5, threshold=0.0)
    x = torch.tensor([[[[1.0]], [[-1.0]]], [[[-1.0]], [[100.0]]]])  # 2 samples x 2 channels
    probe(x)
    p = torch.sigmoid(torch.tensor([[2.0, -2.0], [-2.0, 200.0]])).mean(0)
    assert float(probe.value) == pytest.approx(float(binary_entropy(p).mean()), rel=1e-5)


@pytest.fixture(scope="module")
def loaders():
    return digits(batch_size=128)


def _loop(loaders, out, **overrides):
    """test_loop's run, one cheap round."""
    return _run(loaders, out, **{"finetune_epochs": 0.1, "max_removed": 1, "entropy_batches": 1, **overrides})


@pytest.mark.parametrize("criterion", STUDY_CRITERIA)
def test_every_study_criterion_runs_the_loop_on_an_unseen_model(loaders, tmp_path, criterion):
    result = _loop(loaders, tmp_path, criterion=criterion)
    assert len(result.removed) == 1 and len(find_call_sites(result.model)) == 5


class Mlp(nn.Module):
    """Two Linear → BN → ReLU sites whose units start mostly ON (β = 0.5): off the entropy maximum at p = 1/2,
    where the penalty's gradient vanishes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                                  nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        with torch.no_grad():
            self.body[1].bias.fill_(0.5)
            self.body[4].bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_entropy_reg_drives_the_measured_entropy_down(loaders, tmp_path):
    x = torch.randn(256, 8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()),
                                       batch_size=64)
    gm = trace(Mlp())
    sites = find_call_sites(gm)

    def entropies(lam: float) -> list[float]:
        torch.manual_seed(0)
        model = entropy_regularised(gm, sites, data, CPU, 10.0, 0.05, lam, 0.1, 0.0)
        return [s.entropy for s in measure(model, sites, data, CPU).values()]

    plain, pushed = entropies(0.0), entropies(5.0)
    assert min(plain) > 0.8 and max(pushed) < 0.1
    result = _loop(loaders, tmp_path, one_shot=3, max_removed=None, entropy_reg=1.0)
    assert len(result.history) == 1 and len(result.removed) == 3


@pytest.mark.parametrize("bad", [{"entropy_reg": 0.1}, {"entropy_reg": 0.1, "one_shot": 2, "entropy_tau": 0.0},
                                 {"criterion": "layerfolding"}])
def test_bad_study_settings_are_refused(bad):
    with pytest.raises(UserError):
        LoopConfig(**bad)


def test_cli_refuses_entropy_reg_without_one_shot_in_one_line(capsys, image_folder, tmp_path):
    code, text = run_cli(capsys, "linearize", "demo_cnn", "--num-classes", "3", "--data", str(image_folder),
                         "--out", str(tmp_path / "lin"), "--entropy-reg", "0.1", "--criterion", "layerfold")
    assert code == 2 and "give --one-shot" in text and "Traceback" not in text
    assert not (tmp_path / "lin" / "state.pt").exists()


def test_criterion_choices_are_the_registry_and_an_unknown_one_is_refused_in_one_line():
    choices = next(f for f in dataclasses.fields(LoopConfig) if f.name == "criterion").metadata["choices"]
    assert tuple(choices) == tuple(CRITERIA) == ("entropy", "sparsity", "random", *STUDY_CRITERIA)
    with pytest.raises(UserError) as refused:
        LoopConfig(criterion="entorpy")
    assert str(refused.value) == f"--criterion must be one of {', '.join(CRITERIA)}, got 'entorpy'"


def test_a_criterion_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'entropy' is registered twice"):
        register_criterion("entropy")(lambda ev: {})
    assert CRITERIA["entropy"].score.__name__ == "entropy_scores"


def test_counting_criteria_read_the_entropy_pass_and_random_reads_none():
    stats = {"a": SiteStats("a", "relu", torch.tensor([0.0, 1.0], dtype=torch.float64)),
             "b": SiteStats("b", "relu", torch.tensor([0.5, 0.9], dtype=torch.float64))}
    evidence = _evidence(None, [], [], stats=stats)
    assert CRITERIA["entropy"].score(evidence) == {"a": 0.0, "b": pytest.approx((1.0 + 0.4689956) / 2)}
    assert CRITERIA["sparsity"].score(evidence) == {"a": 0.0, "b": pytest.approx(0.3)}
    assert [name for name, c in CRITERIA.items() if not c.counts] == ["random"]
