"""Data: an ImageFolder with train/ and val/, or the scikit-learn digits the demo ships with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .errors import UserError


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    classes: list[str]


def _loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    sampler = None
    if dist.is_available() and dist.is_initialized():  # torchrun: each rank reads its shard
        sampler = DistributedSampler(ds, shuffle=shuffle, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # Training drops a last partial batch: a batch of one breaks BatchNorm in train mode. Workers are not
    # persistent so that each round's seeding reaches them (resume replays the same data order).
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, generator=gen, drop_last=shuffle and len(ds) > batch_size)


def image_folder(root: str | Path, input_size: tuple[int, int, int], mean: tuple[float, ...],
                 std: tuple[float, ...], batch_size: int = 128, workers: int = 2, seed: int = 0,
                 num_classes: int | None = None) -> Loaders:
    """``root/train`` and ``root/val`` ImageFolders, validated with one-line errors."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data directory {root} has no '{split}/' folder (expected {root}/{split}/<class>/*.jpg)")
    _, h, w = input_size
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    small = max(h, w) <= 64  # CIFAR-style: resize to the input, pad-and-crop; else ImageNet-style resize + crop
    resize = [transforms.Resize(min(h, w) if small else int(round(min(h, w) / 0.875)))]
    train_tf = transforms.Compose([*resize, transforms.RandomCrop((h, w), padding=h // 8 if small else 0,
                                                                  pad_if_needed=True),
                                   transforms.RandomHorizontalFlip(), *norm])
    val_tf = transforms.Compose([*resize, transforms.CenterCrop((h, w)), *norm])
    if input_size[0] == 1:
        train_tf.transforms.insert(0, transforms.Grayscale())
        val_tf.transforms.insert(0, transforms.Grayscale())
    try:
        train = datasets.ImageFolder(str(root / "train"), train_tf)
        val = datasets.ImageFolder(str(root / "val"), val_tf)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"bad image folder under {root}: {str(e).splitlines()[0]}") from e
    if train.classes != val.classes:
        raise UserError(f"train/ and val/ have different classes: {train.classes} vs {val.classes}")
    if num_classes is not None and len(train.classes) != num_classes:
        raise UserError(f"{root} has {len(train.classes)} classes but the model predicts {num_classes} "
                        "(pass --num-classes to re-head it)")
    return Loaders(_loader(train, batch_size, True, workers, seed),
                   _loader(val, batch_size, False, workers, seed), train.classes)


def digits(size: int = 16, batch_size: int = 64, seed: int = 0) -> Loaders:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package), upsampled, fixed seeded split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = len(y) // 5
    val, train = perm[:n_val], perm[n_val:]
    return Loaders(_loader(TensorDataset(x[train], y[train]), batch_size, True, 0, seed),
                   _loader(TensorDataset(x[val], y[val]), 256, False, 0, seed), [str(i) for i in range(10)])
