"""Before finetuning an image model: does it score clearly better under another common normalization than the
configured one? Then the configured one is wrong, and the run stops before adapting the model to it."""

from __future__ import annotations

import dataclasses
import itertools

import torch

from easier_export.core.errors import UserError
from easier_export.core.stats import better_beyond_chance
from easier_export.load.data import ImageFolderData
from easier_export.load.models import LoadedModel
from easier_export.load.task import IMAGENET_MEAN, IMAGENET_STD, ImageTask
from easier_export.loop.train import evaluate_metrics

NORMALIZATION_MARGIN = 5.0
"""Points by which another common normalization must beat the configured one on val before the run is stopped:
well above the val noise of a few hundred images, far below what a wrong normalization costs (tens of points)."""
NORMALIZATION_BATCHES = 8


def check_normalization(loaded: LoadedModel, folder: ImageFolderData, batch_size: int, seed: int) -> None:
    """Without --mean/--std, evaluate the original on a few val batches under the configured normalization and
    the common others; stop (one line) when another scores clearly higher (by the margin, and beyond the paired
    noise of those images: a random or tiny model's differences are not a finding): finetuning would otherwise "recover"
    the model to the wrong normalization and ship it adapted to inputs its users never feed it."""
    task = loaded.task
    assert isinstance(task, ImageTask), "only image models read an image folder"
    channels = loaded.input_size[0]
    configured = (tuple(task.mean), tuple(task.std))
    others = {"ImageNet": (IMAGENET_MEAN, IMAGENET_STD), "0.5/0.5": ((0.5,) * channels, (0.5,) * channels),
              "none (0 and 1)": ((0.0,) * channels, (1.0,) * channels)}
    scores, correct = {}, {}
    for name, (mean, std) in {"configured": configured, **others}.items():
        if len(mean) != channels or (name != "configured" and (mean, std) == configured):
            continue
        trial = dataclasses.replace(task, mean=mean, std=std, crop_asked=False)
        loaders = trial.loaders(folder, loaded.input_size, batch_size, 0, seed)
        batches = list(itertools.islice(iter(loaders.val), NORMALIZATION_BATCHES))  # (images, labels)
        metrics = evaluate_metrics(loaded.model, batches, torch.device("cpu"))
        scores[name], correct[name] = metrics["top1"], metrics["correct"]
    best = max(scores, key=lambda k: scores[k])
    clearly = better_beyond_chance(correct["configured"], correct[best])  # not a few lucky images
    if scores[best] > scores["configured"] + NORMALIZATION_MARGIN and clearly:
        mean, std = {"configured": configured, **others}[best]
        raise UserError(f"{loaded.source} scores {scores['configured']:.1f}% on val with its configured mean/std "
                        f"but {scores[best]:.1f}% with {best} normalization: pass the normalization it was trained "
                        f"with, e.g. --mean {','.join(f'{v:g}' for v in mean)} --std "
                        f"{','.join(f'{v:g}' for v in std)}")
