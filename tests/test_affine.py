"""--substitute affine: a removed activation's per-unit least-squares line, absorbed into the layer before it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from easier_export.load.arch import DemoNet
from easier_export.load.data import digits
from easier_export.loop.affine import Moments, stand_ins
from easier_export.loop.config import LoopConfig
from easier_export.loop.linearize import run_loop
from easier_export.trace.edits import AffineFit, absorber, blend_sites, fade, remove_sites, settle
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


def _pairs(x: torch.Tensor, act: nn.Module, dim: int, intercept: bool = True) -> AffineFit:
    m = Moments(dim)
    m.add(x, act(x))
    return m.fit(intercept)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([nn.ReLU(), nn.GELU(), nn.ReLU6(), nn.SiLU()]))
def test_fit_is_the_least_squares_line_of_each_unit(seed, act):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g).double() * 3 + torch.randn(5, generator=g).double()
    y = act(x)
    fit = _pairs(x, act, -1)
    origin = _pairs(x, act, -1, intercept=False)
    for u in range(5):
        design = torch.stack([x[:, u], torch.ones(64, dtype=torch.float64)], 1)
        a, b = torch.linalg.lstsq(design, y[:, u:u + 1]).solution.flatten()
        torch.testing.assert_close(fit.scale[u].double(), a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fit.shift[u].double(), b, rtol=1e-4, atol=1e-5)
        through_0 = torch.linalg.lstsq(x[:, u:u + 1], y[:, u:u + 1]).solution.flatten()[0]
        torch.testing.assert_close(origin.scale[u].double(), through_0, rtol=1e-4, atol=1e-5)
    assert not origin.shift.any()


def test_always_on_units_get_the_identity_and_always_off_units_zero():
    """The two kinds of low-entropy unit EASIER removes: the identity is right for one, the fit for both."""
    x = torch.cat([torch.rand(100, 1, 4, 4) + 0.1, -torch.rand(100, 1, 4, 4) - 0.1], 1)  # unit 0 ON, unit 1 OFF
    fit = _pairs(x, nn.ReLU(), 1)
    torch.testing.assert_close(fit.scale, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(fit.shift, torch.tensor([0.0, 0.0]), rtol=0, atol=1e-6)


def test_a_unit_whose_input_never_varies_keeps_slope_one():
    fit = _pairs(torch.full((10, 3), 2.0), nn.ReLU(), -1)
    assert fit.scale.tolist() == [1.0, 1.0, 1.0]


class Mlp(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8, bias=bias), nn.GELU(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6()
        self.conv2, self.relu, self.conv3 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.relu(self.conv2(self.act(self.bn(self.conv1(x))))))


class Shared(nn.Module):
    """Rectifiers whose input no layer can take a per-unit affine into."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.twice, self.ln = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)
        self.act, self.act2, self.act3, self.act4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        y = self.act(h) + h  # fc's output read twice
        z = self.act2(y + x)  # after an add
        return self.act3(self.ln(z)) + self.act4(self.twice(z)) + self.twice(x)  # LayerNorm; a module called twice


def _random_fit(units: int, dim: int, seed: int) -> AffineFit:
    g = torch.Generator().manual_seed(seed)
    return AffineFit(torch.randn(units, generator=g), torch.randn(units, generator=g), dim)


def _with_stand_in(gm, name: str, fit: AffineFit):
    """The reference: the site's activation swapped for the affine map itself, nothing absorbed."""
    blended = blend_sites(gm, [name], fits={name: fit})
    fade(blended, 1.0)
    return blended


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_absorbing_the_stand_in_is_exact_after_linear_conv_and_batchnorm(seed):
    torch.manual_seed(seed)
    for model, name, units, dim, x in [(Mlp(), "act", 8, -1, torch.randn(5, 7, 6)),
                                       (ConvBN(), "act", 4, 1, torch.randn(2, 3, 6, 6)),
                                       (ConvBN(), "relu", 4, 1, torch.randn(2, 3, 6, 6))]:
        gm = trace(model.eval())
        if isinstance(model, ConvBN):
            model.bn.running_mean.normal_()
            model.bn.running_var.uniform_(0.5, 2)
        fit = _random_fit(units, dim, seed)
        shipped = remove_sites(gm, [name], fits={name: fit})
        assert name not in {s.name for s in find_call_sites(shipped)}
        assert sum(isinstance(m, nn.Identity) for m in shipped.modules()) == sum(
            isinstance(m, nn.Identity) for m in gm.modules())  # nothing left in the graph: absorbed into weights
        torch.testing.assert_close(shipped(x), _with_stand_in(gm, name, fit)(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(settle(_with_stand_in(gm, name, fit))(x), shipped(x), rtol=0, atol=0)


def test_absorber_says_why_it_refuses():
    gm = trace(Shared())
    reasons = {s.name: absorber(gm, s.name)[1] for s in find_call_sites(gm)}
    assert "also read by" in reasons["act"]
    assert "comes from add" in reasons["act2"]
    assert "LayerNorm" in reasons["act3"]
    assert "called more than once" in reasons["act4"]
    model, why = absorber(trace(ConvBN()), "act")
    assert isinstance(model, nn.BatchNorm2d) and why == ""


class Tied(nn.Module):
    """Producers whose stored weight is not (only) what the activation's input is computed from."""

    class Scaled(nn.Linear):  # a subclass: its forward may do anything
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        self.sub, self.a, self.b = self.Scaled(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.hooked = nn.Linear(4, 4)
        self.hooked.register_forward_hook(lambda _m, _a, out: out.clamp(0))
        self.act1, self.act2, self.act3, self.act4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.norm(x)) + self.act2(self.sub(x)) + self.act3(self.a(x)) + self.b(x) + self.act4(
            self.hooked(x))


def test_absorber_refuses_weights_that_are_not_what_the_layer_computes_with():
    gm = fx.GraphModule(Tied(), TiedTracer().trace(Tied()))
    reasons = {s.name: absorber(gm, s.name)[1] for s in find_call_sites(gm)}
    assert "ParametrizedLinear, which cannot absorb" in reasons["act1"]
    assert "Scaled, which cannot absorb" in reasons["act2"]
    assert "shared or read elsewhere" in reasons["act3"]
    assert "forward hooks" in reasons["act4"]


class TiedTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Linear) or super().is_leaf_module(m, qualname)


def test_padding_positions_are_left_out_of_the_fit():
    m = Moments(-1)
    x = torch.tensor([[[1.0], [2.0], [-50.0]]])  # the last position is padding
    m.keep = torch.tensor([[True, True, False]])
    m.add(x, nn.ReLU()(x))
    fit = m.fit(True)
    assert m.n == 2 and fit.scale.item() == pytest.approx(1.0) and fit.shift.item() == pytest.approx(0.0)


def test_stand_ins_fit_what_can_be_absorbed_and_explain_the_rest():
    loader = [(torch.randn(16, 4), None) for _ in range(3)]
    fits, refused = stand_ins(trace(Shared()), ["act", "act2"], loader, torch.device("cpu"), 2)
    assert fits == {} and set(refused) == {"act", "act2"}
    gm = trace(Mlp(bias=False))
    fits, refused = stand_ins(gm, ["act"], [(torch.randn(32, 6), None)], torch.device("cpu"), None)
    assert refused == {} and not fits["act"].shift.any()  # no bias to take a shift: the line through 0
    shipped = remove_sites(gm, ["act"], fits=fits)
    assert set(shipped.state_dict()) == set(gm.state_dict())  # a replay (resume) loads it into the identity graph


def test_the_fit_is_a_better_stand_in_than_the_identity_on_the_data_it_saw():
    torch.manual_seed(0)
    gm = trace(Mlp().eval())
    with torch.no_grad():
        gm.fc1.bias.sub_(1.0)  # many units mostly OFF
    x = torch.randn(256, 6)
    fits, _ = stand_ins(gm, ["act"], [(x, None)], torch.device("cpu"), None)
    err_fit = (remove_sites(gm, ["act"], fits=fits)(x) - gm(x)).pow(2).mean()
    err_identity = (remove_sites(gm, ["act"])(x) - gm(x)).pow(2).mean()
    assert err_fit < 0.5 * err_identity


@pytest.mark.parametrize("anneal", [0.0, 0.5])
def test_loop_ships_the_absorbed_stand_in_and_resumes_it(anneal, tmp_path):
    loaders = digits(batch_size=128)
    cfg = LoopConfig(max_drop=100.0, finetune_epochs=0.1, max_removed=2, entropy_batches=2, substitute="affine",
                     anneal=anneal)
    torch.manual_seed(0)
    result = run_loop(trace(DemoNet()), "demo_cnn", loaders.train, loaders.val, cfg, torch.device("cpu"), tmp_path)
    assert len(result.removed) == 2
    for record in result.history:
        assert record.stand_ins is not None and set(record.stand_ins) == set(record.removed)
        assert all(v == "affine" or v.startswith("identity: ") for v in record.stand_ins.values())
    assert "affine" in [v for r in result.history for v in r.stand_ins.values()]
    torch.manual_seed(0)
    resumed = run_loop(trace(DemoNet()), "demo_cnn", loaders.train, loaders.val, cfg, torch.device("cpu"), tmp_path)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(resumed.model.eval()(x), result.model.eval()(x), rtol=0, atol=0)
