"""Loading what the options name: the model (with the preprocessing options applied and checked) and DATA,
proved to run together before any work."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from easier_export.core.console import console
from easier_export.core.errors import UserError

from .options import DataOptions, ModelOptions
from .values import floats, size

if TYPE_CHECKING:
    from easier_export.load.data import Loaders
    from easier_export.load.models import LoadedModel


def load(source: ModelOptions) -> LoadedModel:
    """The model ``source`` names, its notes printed as warnings, ``--mean``/``--std``/``--crop-pct`` applied."""
    from easier_export.load.models import load_model
    from easier_export.load.task import ImageTask

    loaded = load_model(source.model, source.num_classes, source.weights, source.arch, source.trust_pickle,
                        size(source.input_size))
    task = loaded.task
    if not isinstance(task, ImageTask):
        _refuse_image_options(loaded.source, source)
    for note in loaded.notes:
        console.print(f"[yellow]warning:[/] {escape(note)}", soft_wrap=True)
    if not isinstance(task, ImageTask):
        return loaded
    task.normalization_given = source.mean is not None or source.std is not None
    if source.crop_pct is not None:
        task.crop_pct, task.crop_asked = source.crop_pct, True
    task.mean = floats(source.mean, "mean") or task.mean
    task.std = floats(source.std, "std") or task.std
    if len(task.mean) != loaded.input_size[0] or len(task.std) != loaded.input_size[0]:
        raise UserError(f"--mean/--std need {loaded.input_size[0]} values (one per input channel)")
    if min(task.std) <= 0:
        raise UserError(f"--std values must be positive, got {','.join(map(str, task.std))}")
    return loaded


def _refuse_image_options(name: str, source: ModelOptions) -> None:
    """A Hugging Face directory brings its own head, weights and token input: options for image models would be
    silently ignored, so they are refused."""
    given = {key: getattr(source, key) for key in ("num_classes", "weights", "arch", "mean", "std")}
    named = [f"--{key.replace('_', '-')}" for key, value in given.items() if value is not None]
    if named:
        raise UserError(f"{', '.join(named)}: not for a Hugging Face directory ({name} brings its own head, "
                        "weights and token-id input)")
    if source.input_size is not None and "x" in source.input_size.lower():
        raise UserError(f"--input-size {source.input_size}: a text model's input size is one number, its sequence "
                        "length")


def ready(loaded: LoadedModel) -> LoadedModel:
    """A model used without DATA: prove it runs at its input size before any work."""
    from easier_export.pipeline import dry_run

    dry_run(loaded.model, loaded.input_size, loaded.task.dtype)
    return loaded


def verification_data(path: Path, skip_bad_images: bool) -> DataOptions:
    """DATA read only to verify an export: small batches, no worker processes."""
    return DataOptions(path, batch_size=16, workers=0, skip_bad_images=skip_bad_images)


def with_data(loaded: LoadedModel, data: DataOptions, seed: int = 0, trains: bool = True) -> Loaders:
    """DATA as the options name it, opened and checked against the model (``stages.open_data``)."""
    from easier_export.stages import open_data

    return open_data(loaded, data.data, data.batch_size, data.workers, seed, data.skip_bad_images, trains)
