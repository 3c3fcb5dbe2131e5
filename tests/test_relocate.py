"""Padding relocation: after it, a conv·conv merge across a removed activation becomes exact."""

import torch
from torch import nn

from easier_export.fold import fold_model
from easier_export.load.models import build_arch
from easier_export.trace.edits import remove_sites
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.bn1(self.conv1(x))))


def _conv_merges(records):
    return [r for r in records if r.kind == "conv_conv"]


def test_relocation_moves_padding_and_makes_the_merge_exact():
    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():
        block.bn1.running_mean.uniform_(-1, 1)
        block.bn1.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 12, 12)
    gm = trace(block)

    plain = remove_sites(gm, ["act"])
    _, records = fold_model(plain, x[:1], mode="all")
    assert not any(r.applied for r in _conv_merges(records))
    assert any("padding" in r.reason for r in _conv_merges(records))

    moved = remove_sites(gm, ["act"], relocate=True)
    assert moved.conv1.padding == (3, 3) and moved.conv2.padding == (0, 0)  # p1 + s1·p2 = 1 + 2·1
    assert moved(x).shape == block(x).shape
    assert not torch.allclose(moved(x), plain(x))  # border values changed: the loop finetunes after this
    folded, records = fold_model(moved, x[:1], mode="all")
    assert any(r.applied for r in _conv_merges(records))
    torch.testing.assert_close(folded(x), moved(x), atol=1e-5, rtol=1e-4)
    assert block.conv2.padding == (1, 1)  # the caller's model is untouched


def test_resnet_blocks_collapse_to_one_conv_with_relocation():
    gm = trace(build_arch("cifar_resnet20").eval())
    firsts = [s.name for s in find_call_sites(gm)][1::2]
    moved = remove_sites(gm, firsts, relocate=True).eval()
    x = torch.randn(2, 3, 32, 32)
    folded, records = fold_model(moved, x[:1], mode="all")
    merged = [r for r in records if r.kind in ("conv_conv", "residual") and r.applied]
    assert len([r for r in merged if r.kind == "conv_conv"]) == 9
    torch.testing.assert_close(folded(x), moved(x), atol=1e-4, rtol=1e-4)


def test_linearized_checkpoint_replays_relocation(tmp_path):
    from easier_export.load.models import load_model
    from easier_export.loop.state import LoopResult
    from easier_export.pipeline import save_linearized

    loaded = load_model("cifar_resnet20")
    gm = trace(loaded.model)
    names = [s.name for s in find_call_sites(gm)][1:6:2]
    moved = remove_sites(gm, names, relocate=True).eval()
    save_linearized(tmp_path / "lin.pt", loaded, LoopResult(moved, names, 0.0, 0.0, [], []), relocate_padding=True)
    back = load_model(str(tmp_path / "lin.pt")).model
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), moved(x))
