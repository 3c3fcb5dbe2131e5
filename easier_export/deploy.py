"""The shipped FP32 file in the precision it is deployed in (``--precision``): calibrated on DATA's train split,
judged with onnxruntime on val against the FP32 original, and the original converted alike ("quantize only"),
so the report separates what depth reduction, quantization and both give."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from easier_export.core.console import info
from easier_export.core.onnx_graph import file_takes_token_ids
from easier_export.core.quantize import FP16, FP32, INT8, Calibration, convert
from easier_export.core.stats import held_out
from easier_export.load.data import Loaders
from easier_export.load.task import TOLERANCES
from easier_export.loop.config import LoopConfig, Task
from easier_export.loop.train import evaluate_metrics, seed_everything
from easier_export.ship.bench import race
from easier_export.ship.export import verify_onnx
from easier_export.ship.precision import Converted, Judge, Judged, PrecisionChoice, Race, Verify, choose_precision
from easier_export.ship.shipping import RACE_SECONDS


class OrtModel(nn.Module):
    """An ONNX file behind ``nn.Module``'s call, on onnxruntime's CPU provider: evaluated by the same code, on the
    same batches, as the PyTorch models it is compared with."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().cpu().numpy()
        return torch.from_numpy(np.asarray(self.session.run(None, {self.input_name: feed})[0]))


def outcomes(path: Path, loader: torch.utils.data.DataLoader) -> dict:
    """``evaluate_metrics`` of the ONNX file: top-1, perplexity and per-sample outcomes."""
    return evaluate_metrics(OrtModel(path), loader, torch.device("cpu"))


def calibration_of(loaders: Loaders, batches: int, method: str, seed: int) -> Calibration:
    """The first ``batches`` batches of the train split in the order ``seed`` gives, whatever the rounds drew
    from the loader before: the same calibration for the same command."""
    seed_everything(seed, loaders.train)
    return Calibration.of([x for x, _ in itertools.islice(iter(loaders.train), batches)], method)


def judge_against(original: Path, loaders: Loaders, loop: LoopConfig, task: Task) -> Judge:
    """A file's metric on all of val and its paired change against the FP32 ``original`` on the val samples the
    rounds never saw (all of val when nothing is held out): the budget's own test."""
    base = outcomes(original, loaders.val)
    n = len(base["correct"])
    samples = held_out(n, loop.holdout) if loop.holdout > 0 else torch.ones(n, dtype=torch.bool)

    def judge(path: Path) -> Judged:
        found = outcomes(path, loaders.val)
        change = task.change(loop, base, found, samples)
        return Judged(found[task.metric], change, task.within(loop, change))

    return judge


def verifier(model: nn.Module, inputs: list[torch.Tensor]) -> Verify:
    """Each precision's file against ``model`` under that precision's tolerances (``load.task.TOLERANCES``)."""
    return lambda path, precision: verify_onnx(path, model, inputs, TOLERANCES[precision]).to_dict()


def racer(input_shape: tuple[int, ...], target: str, batch: int, threads: int | None) -> Race:
    return lambda files, baseline: race(files, baseline, input_shape, target, batch, threads, RACE_SECONDS)


@dataclass
class Deployment:
    choice: PrecisionChoice
    quantized_original: Converted | None  # the FP32 original converted alike: "quantize only"
    calibration: dict | None

    def bench_files(self) -> dict[str, Path]:
        """The converted files timed beside the FP32 ones, by bench label."""
        files = {f"original-{self.quantized_original.precision}": Path(self.quantized_original.export["path"])} \
            if self.quantized_original else {}
        best = {c.precision: c for c in self.choice.tried if c.export["verify"]["passed"]}
        return {**files, **{f"folded-{p}": Path(c.export["path"]) for p, c in best.items()}}

    def to_dict(self) -> dict:
        original = None if self.quantized_original is None else self.quantized_original.to_dict()
        return {**self.choice.to_dict(), "quantized_original": original, "calibration": self.calibration}


@dataclass(frozen=True)
class Subject:
    """An FP32 ONNX file and the PyTorch model it reproduces (what a conversion of it is verified against)."""

    file: Path
    model: nn.Module


def deploy(asked: str, shipped: Subject, original: Subject, inputs: list[torch.Tensor], loaders: Loaders,
           loop: LoopConfig, task: Task, calib: tuple[int, str], timing: Race, target: str,
           work: Path, quantize_original: bool = True) -> Deployment:
    """Choose the precision that ships (``ship.precision.choose_precision``); the converted files are written
    to ``work``. ``calib``: (train batches, method) for INT8; ``quantize_original``: also convert the original,
    for the report's "quantize only" (not when it is the file shipped)."""
    tokens = file_takes_token_ids(shipped.file)
    calibration = None if tokens or asked in (FP32, FP16) else calibration_of(loaders, *calib, loop.seed)
    judge = judge_against(original.file, loaders, loop, task)
    choice = choose_precision(asked, shipped.file, target, work, calibration, verifier(shipped.model, inputs),
                              judge, timing)
    quantized_original = None
    if quantize_original and any(c.precision == INT8 for c in choice.tried):
        path = work / "original.int8.onnx"
        export = convert(original.file, path, INT8, calibration, target=target)
        export["verify"] = verifier(original.model, inputs)(path, INT8)
        quantized_original = Converted(INT8, export, judge(path))
        info(f"quantize only: the original in INT8 changes val by {quantized_original.judged.change.change:+.2f}")
    return Deployment(choice, quantized_original, None if calibration is None else calibration.describe())


def settle(deployment: Deployment, shipped_file: Path, fp32_export: dict, kept: Path) -> dict:
    """Put the chosen file at ``shipped_file`` (the FP32 one moves to ``kept``) and return the shipped export's
    description (the FP32 export's keys, the conversion's over them)."""
    chosen = deployment.choice.chosen
    if chosen is None:
        return fp32_export
    os.replace(shipped_file, kept)
    os.replace(chosen.export["path"], shipped_file)
    fp32_export["path"] = str(kept)
    chosen.export["path"] = str(shipped_file)
    return {**fp32_export, **chosen.export}
