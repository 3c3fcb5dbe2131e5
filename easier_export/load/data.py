"""Data: an ImageFolder with train/ and val/, or the scikit-learn digits the demo ships with."""

from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from easier_export.core.errors import UserError, first_line
from easier_export.core.io import resolved


@dataclass(frozen=True)
class Preprocessing:
    """What an evaluation image goes through before the model: the budget is measured under exactly this, so it
    is printed and recorded (report.json, ONNX metadata). ``resize`` None: images used at their own size."""

    resize: int | None
    interpolation: str
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"resize": self.resize, "interpolation": self.interpolation if self.resize else None,
                "center_crop": list(self.crop) if self.resize else None, "mean": list(self.mean),
                "std": list(self.std)}

    def describe(self) -> str:
        shape = (f"resize shorter side to {self.resize} ({self.interpolation}), centre crop "
                 f"{self.crop[0]}x{self.crop[1]}" if self.resize else
                 f"images used as they are ({self.crop[0]}x{self.crop[1]})")
        return f"{shape}, mean {_numbers(self.mean)}, std {_numbers(self.std)}"


def _numbers(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (skip_bad)
    preprocessing: Preprocessing | None = None  # what val images go through (images; None for text, digits)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    sampler = None
    if dist.is_available() and dist.is_initialized():  # torchrun: each rank reads its shard
        sampler = DistributedSampler(ds, shuffle=shuffle, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # Training drops a last partial batch: a batch of one breaks BatchNorm in train mode. Workers are not
    # persistent so that each round's seeding reaches them (resume replays the same data order).
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, generator=gen, drop_last=shuffle and len(ds) > batch_size,
                      worker_init_fn=quiet_worker if workers else None)


def quiet_worker(_worker_id: int) -> None:
    """In a loader worker: when the main process is interrupted, its connections close while the worker's
    multiprocessing resource sharer is handing it a batch, and that thread reports it through ``sys.excepthook``
    as a traceback fragment after the "interrupted" line. A worker's own errors reach the main process anyway."""
    sys.excepthook = _closed_connections_quiet


def _closed_connections_quiet(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if not issubclass(kind, (EOFError, OSError, multiprocessing.AuthenticationError)):
        sys.__excepthook__(kind, value, tb)


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def image_problem(path: str) -> tuple[str, tuple[int, int] | None]:
    """("", (width, height)) for a readable image, (why, None) otherwise.

    Reads the header and the last bytes only (about 50 µs an image: seconds for 50k): a JPEG or PNG cut short
    lacks its end marker, which a decode would only notice mid-run, in a worker process, as a traceback.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as image:
            size, marker = image.size, _END_MARKERS.get(image.format or "")
            if marker is not None:
                f.seek(max(f.seek(0, os.SEEK_END) - 64, 0))
                if not f.read().rstrip(b"\0\r\n ").endswith(marker):
                    return f"truncated {image.format} (no end marker)", None
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError... for hostile files
        return f"not a readable image ({_without(first_line(e), path)})", None
    return "", size


def _without(reason: str, path: str) -> str:
    """An error's text without the path it repeats (the line names the file once, however long its path)."""
    return reason.replace(f": '{path}'", "").replace(f" '{path}'", "").replace(path, "it")


@dataclass
class ImageFolderData:
    """``root/train`` and ``root/val`` opened and checked; loaders are made once the input size is known."""

    root: Path
    train: Dataset
    val: Dataset
    sizes: set[tuple[int, int]]  # (height, width) of the images
    skipped: list[str]

    @property
    def common_size(self) -> tuple[int, int] | None:
        """(height, width) when every image has it: the size a model that declares none was trained at."""
        return next(iter(self.sizes)) if len(self.sizes) == 1 else None

    def loaders(self, input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
                batch_size: int = 128, workers: int = 2, seed: int = 0, crop_pct: float | None = None,
                interpolation: str = "bilinear", crop_native: bool = False) -> Loaders:
        """Loaders with the model's preprocessing; ``crop_pct``/``interpolation`` as in timm's pretrained_cfg
        (default: 0.875 and bilinear at ImageNet sizes, no crop at CIFAR sizes). Images that already have the
        input size are used as they are: a pretrained config's centre crop would zoom them, and the model would
        be finetuned and judged on a view its users never feed it (unless ``crop_native``: --crop-pct given)."""
        from torchvision import transforms

        channels, h, w = input_size
        small = max(h, w) <= 64  # CIFAR-style: resize to the input, pad-and-crop; else ImageNet-style resize + crop
        crop = crop_pct or (1.0 if small else 0.875)
        modes = {m.value: m for m in transforms.InterpolationMode}
        native = self.common_size == (h, w) and not crop_native
        size = None if native else int(round(min(h, w) / crop))
        resize = [] if size is None else [transforms.Resize(size, modes.get(interpolation, modes["bilinear"]))]
        gray = [transforms.Grayscale()] if channels == 1 else []
        norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        self.train.transform = transforms.Compose([
            *gray, *resize, transforms.RandomCrop((h, w), padding=h // 8 if small else 0, pad_if_needed=True),
            transforms.RandomHorizontalFlip(), *norm])
        self.val.transform = transforms.Compose([*gray, *resize, transforms.CenterCrop((h, w)), *norm])
        described = Preprocessing(size, interpolation, (h, w), tuple(mean), tuple(std))
        return Loaders(make_loader(self.train, batch_size, True, workers, seed),
                       make_loader(self.val, batch_size, False, workers, seed), self.train.classes, self.skipped,
                       described)


def open_image_folder(root: str | Path, num_classes: int | None = None, skip_bad: bool = False,
                      rehead_advice: str = "pass --num-classes to re-head it") -> ImageFolderData:
    """Open ``root/train`` and ``root/val`` with one-line errors; every image's header and end are checked here,
    so a corrupt file is named now (or left out and counted, with ``skip_bad``) instead of crashing a round.
    ``rehead_advice``: what gives the model another class count (it depends on the form it was loaded from)."""
    from torchvision import datasets

    root = resolved(root)  # the resume fingerprint records it: relative and absolute spellings agree
    if not root.is_dir():
        raise UserError(f"data directory {root} {'is not a directory' if root.exists() else 'does not exist'}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"data directory {root} has no '{split}/' folder (expected {root}/{split}/<class>/*.jpg)")
    try:
        train = datasets.ImageFolder(str(root / "train"))
        val = datasets.ImageFolder(str(root / "val"))
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"bad image folder under {root}: {first_line(e)}") from e
    if len(train.classes) < 2:
        raise UserError(f"{root}/train has {len(train.classes)} class folder(s): classifying needs 2 or more "
                        "(top-1 on one class is 100 % by construction)")
    if train.classes != val.classes:
        raise UserError(f"train/ and val/ have different classes: {train.classes} vs {val.classes}")
    if num_classes is not None and len(train.classes) != num_classes:
        raise UserError(f"{root} has {len(train.classes)} classes but the model predicts {num_classes} "
                        f"({rehead_advice})")
    sizes: set[tuple[int, int]] = set()
    skipped: list[str] = []
    for ds in (train, val):
        good = []
        for path, target in ds.samples:
            problem, size = image_problem(path)
            if size is not None:
                sizes.add((size[1], size[0]))
                good.append((path, target))
            elif skip_bad:
                skipped.append(path)
            else:
                raise UserError(f"{path}: {problem}; fix or remove it, or pass --skip-bad-images")
        ds.samples = ds.imgs = good
        ds.targets = [t for _, t in good]
    return ImageFolderData(root, train, val, sizes, skipped)


def image_folder(root: str | Path, input_size: tuple[int, int, int], mean: tuple[float, ...],
                 std: tuple[float, ...], batch_size: int = 128, workers: int = 2, seed: int = 0,
                 num_classes: int | None = None) -> Loaders:
    """``root/train`` and ``root/val`` ImageFolders, validated with one-line errors."""
    return open_image_folder(root, num_classes).loaders(input_size, mean, std, batch_size, workers, seed)


def digits(size: int = 16, batch_size: int = 64, seed: int = 0, val_share: float = 0.2) -> Loaders:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package), upsampled, fixed seeded split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * val_share)
    val, train = perm[:n_val], perm[n_val:]
    return Loaders(make_loader(TensorDataset(x[train], y[train]), batch_size, True, 0, seed),
                   make_loader(TensorDataset(x[val], y[val]), 256, False, 0, seed), [str(i) for i in range(10)])
