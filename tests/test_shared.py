"""Slow tests on ../shared (CIFAR-10 JPEGs and the ResNet-20/32 checkpoints); skipped when it is absent."""

import itertools

import pytest
import torch
from conftest import SHARED

from easier_export.load.data import image_folder
from easier_export.load.models import load_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="needs ../shared checkpoints and data")]


@pytest.mark.parametrize(("depth", "floor"), [(20, 80.0), (32, 82.0)])
def test_shared_checkpoints_load_and_classify_cifar(depth, floor):
    loaded = load_model(f"cifar_resnet{depth}", weights=SHARED / "models" / f"cifar10-resnet{depth}.th")
    loaders = image_folder(SHARED / "datasets" / "cifar10-jpeg", loaded.input_size, loaded.task.mean, loaded.task.std,
                           batch_size=100, workers=0, num_classes=10)
    val = torch.utils.data.DataLoader(loaders.val.dataset, batch_size=100, shuffle=True,
                                      generator=torch.Generator().manual_seed(0))
    correct = total = 0
    with torch.no_grad():
        for x, y in itertools.islice(val, 10):  # 1,000 random val images
            correct += int((loaded.model(x).argmax(1) == y).sum())
            total += len(y)
    assert 100.0 * correct / total > floor  # README: 86.0 % / 88.3 % on all of val/
