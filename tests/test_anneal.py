"""--anneal: a removed activation faded out over finetuning, (1 − α)·act(x) + α·x, then settled to the identity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from easier_export.load.arch import DemoNet
from easier_export.load.data import digits
from easier_export.loop import linearize as loop_mod
from easier_export.loop.config import LoopConfig
from easier_export.loop.linearize import run_loop
from easier_export.trace.edits import Blend, blend_sites, fade, remove_sites, settle
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


class Leaf(nn.Module):
    """Traced as a leaf: its activation is a call site outside the graph (addressed by module path)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(6, 6), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class Net(nn.Module):
    """An in-place ReLU (it would overwrite the x a blend mixes in), a functional one, a leaf GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2, self.leaf, self.fc3 = (nn.Linear(5, 6), nn.ReLU(inplace=True),
                                                              nn.Linear(6, 6), Leaf(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.leaf(torch.relu(self.fc2(self.relu(self.fc1(x))))))


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Leaf) or super().is_leaf_module(m, qualname)


def _traced() -> fx.GraphModule:
    torch.manual_seed(0)
    model = Net()
    return fx.GraphModule(model, LeafTracer().trace(model))


def test_sites_of_every_kind_blend_from_the_original_to_the_removal():
    gm = _traced()
    names = [s.name for s in find_call_sites(gm)]
    assert names == ["relu", "relu_1", "leaf.act"]
    x = torch.randn(16, 5)
    blended = blend_sites(gm, names)
    assert len([m for m in blended.modules() if isinstance(m, Blend)]) == 3
    fade(blended, 0.0)
    torch.testing.assert_close(blended(x), gm(x), rtol=0, atol=0)
    removed = remove_sites(gm, names)
    fade(blended, 1.0)
    torch.testing.assert_close(blended(x), removed(x), rtol=1e-6, atol=1e-6)
    settled = settle(blended)
    assert not [m for m in settled.modules() if isinstance(m, Blend)] and find_call_sites(settled) == []
    assert settled.meta["removed"] == names == removed.meta["removed"]
    torch.testing.assert_close(settled(x), removed(x), rtol=0, atol=0)
    assert str(settled.graph) == str(removed.graph)


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(0.0, 1.0))
def test_one_blended_site_mixes_the_two_functions_linearly(alpha):
    """Linear → ReLU → Linear is affine after the ReLU, so the blended model is exactly the α-mix of the two."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)))
    x = torch.randn(8, 5)
    blended = blend_sites(gm, ["_1"])
    fade(blended, alpha)
    expected = (1 - alpha) * gm(x) + alpha * remove_sites(gm, ["_1"])(x)
    torch.testing.assert_close(blended(x), expected, rtol=1e-5, atol=1e-5)


def test_blend_keeps_the_removal_order_of_relocated_groups():
    """The order names are given in is the order they are recorded and relocated in (replayed on resume)."""
    gm = trace(DemoNet().eval())
    names = [s.name for s in find_call_sites(gm)][-3:][::-1]
    settled = settle(blend_sites(gm, names, relocate=True))
    assert settled.meta["removed"] == names
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(settled(x), remove_sites(gm, names, relocate=True)(x), rtol=0, atol=0)


@pytest.mark.parametrize("anneal", [0.5, 1.0])
def test_loop_fades_alpha_from_0_to_1_and_ships_the_activation_removed(anneal, tmp_path, monkeypatch):
    loaders = digits(batch_size=128)
    alphas = []
    real_fade = loop_mod.fade
    monkeypatch.setattr(loop_mod, "fade", lambda gm, a: (alphas.append(a), real_fade(gm, a)))
    cfg = LoopConfig(max_drop=100.0, finetune_epochs=0.3, max_removed=1, entropy_batches=2, anneal=anneal)
    torch.manual_seed(0)
    result = run_loop(trace(DemoNet()), "demo_cnn", loaders.train, loaders.val, cfg, torch.device("cpu"), tmp_path)
    steps = round(0.3 * len(loaders.train) + 0.5)
    ramp = anneal * steps
    assert alphas == [0.0] + [min(1.0, i / ramp) for i in range(1, steps + 1)]
    assert len(result.removed) == 1 and len(find_call_sites(result.model)) == 5
    assert not [m for m in result.model.modules() if isinstance(m, Blend)]
    torch.manual_seed(0)
    resumed = run_loop(trace(DemoNet()), "demo_cnn", loaders.train, loaders.val, cfg, torch.device("cpu"), tmp_path)
    assert resumed.removed == result.removed and resumed.final_top1 == result.final_top1
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(resumed.model(x), result.model(x), rtol=0, atol=0)
