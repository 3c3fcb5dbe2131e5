"""The built-in CIFAR MobileNetV2 / ViT: buildable by name, traceable, with the call sites the benchmark removes."""

from collections import Counter

import pytest
import torch

from easier_export.load.models import build_arch, load_model
from easier_export.load.task import IMAGENET_MEAN, IMAGENET_STD
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


@pytest.mark.parametrize(("name", "sites"), [("cifar_mobilenet_v2", {"relu6": 35}), ("cifar_vit", {"gelu": 6})])
def test_cifar_builtin_traces_with_its_call_sites(name, sites, tmp_path):
    torch.manual_seed(0)
    net = build_arch(name, num_classes=10).eval()
    gm = trace(net)
    assert Counter(site.op for site in find_call_sites(gm)) == sites
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gm(x), net(x))
    assert net(x).shape == (2, 10)

    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model(name, weights=path)
    assert (loaded.input_size, loaded.task.mean, loaded.task.std) == ((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(loaded.model(x), net(x))
