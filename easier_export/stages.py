"""Opening DATA for a model, and single stages run on their own (``entropy`` and ``fold`` commands): the same
calls ``compress`` makes, without the loop, so the CLI only parses, loads and prints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from easier_export.core.console import console, progress
from easier_export.core.dist import resolve_device
from easier_export.core.errors import UserError
from easier_export.core.io import atomic_write, save_json
from easier_export.fold import LATENCY_FILE, FoldRecord, LatencyTable, fold_model
from easier_export.load.data import Loaders, open_image_folder
from easier_export.load.models import LoadedModel
from easier_export.load.task import TextTask
from easier_export.load.text import text_loaders
from easier_export.loop.config import LoopConfig
from easier_export.loop.entropy import measure
from easier_export.loop.group_order import fold_groups_in_order
from easier_export.loop.train import check_batch_of_one
from easier_export.normalization import check_normalization
from easier_export.pipeline import (
    CompressConfig,
    dry_run,
    ensure_writable,
    export_and_verify,
    onnx_metadata,
    task_of,
)
from easier_export.ship.export import dynamic_dims
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


def open_data(loaded: LoadedModel, root: Path, batch_size: int, workers: int, seed: int = 0,
              skip_bad_images: bool = False, trains: bool = True) -> Loaders:
    """Open DATA (every image checked), settle the input size, prove the model runs at it (and, when it ``trains``
    on batches of one, that it can), check the normalization when none was given, then make loaders. A text model
    reads ``train.txt``/``val.txt`` in blocks of its sequence length."""
    if isinstance(loaded.task, TextTask):
        dry_run(loaded.model, loaded.input_size, loaded.task.dtype)
        loaders = text_loaders(root, loaded.task.spec, loaded.input_size[0], batch_size, seed)
    else:
        loaders = _image_loaders(loaded, root, batch_size, workers, seed, skip_bad_images)
    if trains and min(batch_size, len(loaders.train.dataset)) == 1:
        check_batch_of_one(loaded.model, loaders.train.dataset[0][0][None])
    return loaders


def _image_loaders(loaded: LoadedModel, root: Path, batch_size: int, workers: int, seed: int,
                   skip_bad_images: bool) -> Loaders:
    folder = open_image_folder(root, loaded.num_classes, skip_bad_images, loaded.rehead_advice)
    if folder.skipped:
        console.print(f"[yellow]warning:[/] left out {len(folder.skipped)} unreadable image(s), e.g. "
                      f"{folder.skipped[0]}", soft_wrap=True)
    if not loaded.size_declared:
        if folder.common_size is None:
            raise UserError(f"{loaded.source} declares no input size and the images in {root} differ in size: "
                            "pass --input-size")
        loaded.input_size = (loaded.input_size[0], *folder.common_size)
        console.print(f"[yellow]note:[/] {loaded.source} declares no input size: using "
                      f"{'x'.join(map(str, folder.common_size))}, the size of every image in {root} "
                      "(--input-size overrides)", soft_wrap=True)
    dry_run(loaded.model, loaded.input_size)
    if not loaded.task.normalization_given:
        check_normalization(loaded, folder, batch_size, seed)
    return loaded.task.loaders(folder, loaded.input_size, batch_size, workers, seed)


def entropy_survey(loaded: LoadedModel, loaders: Loaders, loop: LoopConfig, device: str,
                   latency: LatencyTable | None) -> tuple[list[dict], list[dict]]:
    """Each call site's entropy on the train split (one row each), and, given a ``latency`` table, the fold
    groups in the order latency selection would try them."""
    dev = resolve_device(device)
    gm = trace(loaded.model).to(dev)
    sites = find_call_sites(gm, loop.rectifiers)
    batches = min(loop.entropy_batches or len(loaders.train), len(loaders.train))
    with progress("entropy", batches) as advance:
        stats = measure(gm, sites, loaders.train, dev, loop.entropy_batches, loop.entropy_mode == "train",
                        loop.threshold, advance, task_of(loaded).pad_id)
    groups = [] if latency is None else fold_groups_in_order(
        gm, loop, loaded.task.dummy_inputs(loaded.input_size)[0][:1],
        {name: s.entropy for name, s in stats.items()}, latency)
    return [s.to_dict() for s in stats.values()], groups


@dataclass
class Folded:
    """What ``fold_only`` did: the folds (applied or refused, with why), the folded model and its export (with
    ``verify``)."""

    records: list[FoldRecord]
    model: torch.nn.Module
    export: dict

    @property
    def verify(self) -> dict:
        return self.export["verify"]


def fold_only(loaded: LoadedModel, source: str, out: Path, cfg: CompressConfig,
              inputs: list[torch.Tensor] | None = None) -> Folded:
    """Fold ``loaded`` as ``cfg`` asks (merges timed in ``cfg.planning_precision``) and write
    ``fold_plan.json``, ``folded.pt2`` and a ``model.onnx`` verified on ``inputs`` (seeded stand-ins when
    None) to ``out``."""
    gm = trace(loaded.model)
    ensure_writable(out)
    inputs = inputs or loaded.task.dummy_inputs(loaded.input_size)
    example = inputs[0][:1]
    folded, records = fold_model(gm, example, mode=cfg.fold, target=cfg.target, cache=out / LATENCY_FILE,
                                 threads=cfg.threads, precision=cfg.planning_precision)
    save_json([r.to_dict() for r in records], out / "fold_plan.json")
    program = torch.export.export(folded, (example.expand(2, *example.shape[1:]),),
                                  dynamic_shapes=(dynamic_dims(example),))
    atomic_write(out / "folded.pt2", lambda p: _save_program(program, p))
    exported = export_and_verify(folded, gm, example, out / "model.onnx", inputs,
                                 {**onnx_metadata(loaded), "source": source}, cfg)
    return Folded(records, folded, exported)


def _save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """``torch.export.save`` through an open file: given a path, torch warns about the temp name's suffix."""
    with open(path, "wb") as f:
        torch.export.save(program, f)
