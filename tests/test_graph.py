import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from easier_export.core.errors import UserError
from easier_export.load.models import build_arch
from easier_export.trace.edits import remove_sites
from easier_export.trace.rectifiers import EAGER_RECTIFIERS, RECTIFIER_MODULES
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


@pytest.mark.parametrize(("arch", "count"), [
    ("timm:resnet18", 17), ("torchvision:resnet18", 17), ("timm:mobilenetv2_100", 35),
    ("torchvision:mobilenet_v2", 35), ("timm:vgg16_bn", 15), ("torchvision:vgg16_bn", 15),
    ("timm:swin_tiny_patch4_window7_224", 12), ("torchvision:swin_t", 12), ("cifar_resnet20", 19),
    ("cifar_resnet32", 31),
])
def test_call_site_counts(arch, count):
    gm = trace(build_arch(arch, num_classes=10))
    assert len(find_call_sites(gm)) == count


class Reused(nn.Module):
    """One ReLU module called twice plus functional and in-place calls: four call sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.conv(x))
        x = self.relu(self.conv(x))
        x = F.relu(x)
        return torch.relu_(x - 1)


def test_reused_module_is_two_call_sites_and_functional_calls_count():
    gm = trace(Reused())
    names = [s.name for s in find_call_sites(gm)]
    assert len(names) == 4
    only_first = remove_sites(gm, [names[0]])
    assert len(find_call_sites(only_first)) == 3
    assert len(find_call_sites(gm)) == 4  # the input module is untouched


def test_rectifier_selection():
    gm = trace(build_arch("torchvision:swin_t", num_classes=10))
    assert find_call_sites(gm, ["relu"]) == []
    with pytest.raises(UserError, match="unknown rectifier"):
        find_call_sites(gm, ["tanh"])


def test_linearized_equals_original_where_removed_activations_never_fired():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        model[0].bias.fill_(100.0)  # first ReLU always ON: the identity
    gm = trace(model)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(remove_sites(gm, ["_1"])(x), model(x))
    assert not torch.allclose(remove_sites(gm, ["_3"])(x), model(x))


def test_untraceable_submodule_becomes_leaf_with_call_sites_inside():
    gm = trace(build_arch("timm:vgg16_bn", num_classes=10))
    leaf_sites = [s for s in find_call_sites(gm) if not s.in_graph]
    assert [s.name for s in leaf_sites] == ["pre_logits.act1", "pre_logits.act2"]
    x = torch.randn(1, 3, 32, 32)
    out = remove_sites(gm, ["pre_logits.act1"]).eval()(x)
    assert out.shape == (1, 10)


def test_unknown_call_site_is_a_user_error():
    with pytest.raises(UserError, match="no activation call site"):
        remove_sites(trace(nn.Sequential(nn.ReLU())), ["nope"])


def test_timm_fused_batchnorm_act_is_split_so_bn_folds():
    from easier_export.fold import fold_model

    model = build_arch("timm:mobilenetv2_100", num_classes=10).eval()
    gm = trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gm(x), model(x))
    assert type(model.bn1).__name__ == "BatchNormAct2d"  # the caller's model is not modified
    names = [s.name for s in find_call_sites(gm)][2:8]  # both activations of three inverted-residual blocks
    lin = remove_sites(gm, names).eval()
    folded, records = fold_model(lin, x[:1], mode="all")
    assert any(r.kind == "conv_conv" and r.applied for r in records)
    torch.testing.assert_close(folded(x), lin(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", list(RECTIFIER_MODULES))
def test_every_rectifier_module_runs_a_call_the_eager_table_counts(cls):
    """The model statistics count rectifiers at the torch-function level: each kind's module must show up there."""
    seen = []

    class Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Seen():
        cls()(torch.randn(2, 3))
    assert any(f in EAGER_RECTIFIERS for f in seen)
    assert torch.relu in EAGER_RECTIFIERS and torch.Tensor.relu_ in EAGER_RECTIFIERS
