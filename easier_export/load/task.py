"""One task config per input modality: what a model reads and how it is judged, so that no stage asks "text or
image?" itself.

Each task says the dtype of its inputs, the seeded stand-in batches used without DATA, the validation batches an
export is verified on, the budget metric (``top1`` or ``ppl``), what the ONNX file and the report record about it,
and (images) the preprocessing the budget is measured under. The verification tolerances are ``FLOAT32`` for
every task.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .data import ImageFolderData, Loaders
from .text import TextSpec, random_token_batches, two_lengths

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_POSITIONS_KEY = "easier_export.max_positions"
BENCH_SEQUENCE = 128


def bench_sequence(max_positions: int | None) -> int:
    """The sequence length a token-id ONNX file with a dynamic sequence axis is timed at: ``BENCH_SEQUENCE``, or
    the positions its metadata records when fewer."""
    return min(BENCH_SEQUENCE, max_positions or BENCH_SEQUENCE)


@dataclass(frozen=True)
class Tolerances:
    """When an exported file reproduces its PyTorch model: every element within ``atol + rtol * |ref| +
    scale_tol * max|ref|`` and top-1 agreement of at least ``min_top1``. The scale term makes the bound follow
    the output's magnitude: an absolute 1e-4 is noise on logits of 1e3 and everything on logits of 1e-3.
    ``numeric`` False: no elementwise bound (an INT8 file's logits move by its quantization steps), only the
    agreement; its accuracy is then held to the budget on val instead."""

    atol: float
    rtol: float
    scale_tol: float
    min_top1: float
    numeric: bool = True


FLOAT32 = Tolerances(atol=1e-4, rtol=1e-3, scale_tol=1e-4, min_top1=0.99)
"""The float32 tolerances every export is verified to, and every rewrite of a model checked against."""

FLOAT16 = Tolerances(atol=1e-2, rtol=1e-2, scale_tol=1e-2, min_top1=0.98)
"""An FP16 file against its FP32 model: float16 keeps about 3 decimal digits, so 1e-2 of the logits' scale."""

INT8 = Tolerances(atol=0.0, rtol=0.0, scale_tol=0.0, min_top1=0.9, numeric=False)
"""An INT8 file against its FP32 model: top-1 agreement only, low enough for a correct quantization of a model
whose val accuracy is modest (near decision boundaries INT8 flips a few percent of images) and high enough to
catch a broken one; what decides whether it ships is its accuracy on val (``ship.precision``)."""

TOLERANCES = {"fp32": FLOAT32, "fp16": FLOAT16, "int8": INT8}
"""The verification tolerances of each precision a file ships in."""


def first_batches(loaders: Loaders, n: int) -> list[Tensor]:
    """The inputs of the first ``n`` validation batches."""
    return [x for x, _ in itertools.islice(iter(loaders.val), n)]


@dataclass
class ImageTask:
    """An image classifier: float (N, C, H, W) batches, judged on top-1, fed through a preprocessing that the
    user's pipeline must repeat (timm's ``pretrained_cfg`` names: ``crop_pct``, ``interpolation``)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float | None = None  # centre crop share at evaluation (None: ImageFolderData.loaders' default)
    interpolation: str = "bilinear"
    normalization_given: bool = False  # --mean/--std given: trusted as they are, never second-guessed
    crop_asked: bool = False  # --crop-pct given: the crop applies to images of the input size too

    metric: ClassVar[str] = "top1"
    dtype: ClassVar[torch.dtype] = torch.float32
    pad_id: ClassVar[int | None] = None

    def dummy_inputs(self, input_size: tuple[int, ...]) -> list[Tensor]:
        """Seeded stand-ins for validation images, for verifying without DATA."""
        return [torch.randn(4, *input_size, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def verification_inputs(self, loaders: Loaders, n: int) -> list[Tensor]:
        """The first ``n`` validation batches: what an export is verified on."""
        return first_batches(loaders, n)

    def onnx_metadata(self) -> dict[str, str]:
        return {}

    def report_section(self, example: Tensor) -> dict:
        return {}

    def recipe(self) -> dict:
        """The preprocessing a linearized checkpoint records, to be rebuilt with ``from_recipe``."""
        return {"mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
                "interpolation": self.interpolation}

    def from_recipe(self, recipe: dict) -> ImageTask:
        return dataclasses.replace(self, mean=tuple(recipe["mean"]), std=tuple(recipe["std"]),
                                   crop_pct=recipe["crop_pct"], interpolation=recipe["interpolation"])

    def loaders(self, folder: ImageFolderData, input_size: tuple[int, int, int], batch_size: int, workers: int,
                seed: int) -> Loaders:
        """``folder``'s loaders under this preprocessing."""
        return folder.loaders(input_size, self.mean, self.std, batch_size, workers, seed, self.crop_pct,
                              self.interpolation, self.crop_asked)


@dataclass
class TextTask:
    """A Hugging Face text model: token-id (N, T) batches with a dynamic sequence axis, verified at two lengths;
    judged on perplexity (causal LMs) or top-1 (classifiers)."""

    spec: TextSpec

    dtype: ClassVar[torch.dtype] = torch.long

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def pad_id(self) -> int | None:
        """Token id whose positions the entropy counts leave out (padded classification batches)."""
        return self.spec.entropy_pad_id

    def dummy_inputs(self, input_size: tuple[int, ...]) -> list[Tensor]:
        """Seeded token batches at the two verified lengths, for verifying without DATA."""
        return random_token_batches(self.spec, input_size[0])

    def verification_inputs(self, loaders: Loaders, n: int) -> list[Tensor]:
        """``n`` validation batches, then the same cut to the shorter verified length: the export's dynamic
        sequence axis is verified at two lengths."""
        batches = first_batches(loaders, n)
        return batches + [x[:, : two_lengths(x.shape[1])[1]] for x in batches]

    def onnx_metadata(self) -> dict[str, str]:
        """The positions: ``bench`` reads them to time the file at a sequence the model takes."""
        return {MAX_POSITIONS_KEY: str(self.spec.max_positions)}

    def report_section(self, example: Tensor) -> dict:
        """``report.json``'s ``text``: what the model reads and which metric the budget holds."""
        length = int(example.shape[1])
        return {"text": {"task": self.spec.task, "metric": self.metric, "sequence_length": length,
                         "verified_lengths": list(two_lengths(length)),
                         "tokenizer": self.spec.tokenizer or "utf-8 bytes", "vocab_size": self.spec.vocab_size}}

    def recipe(self) -> dict:
        return {}

    def from_recipe(self, recipe: dict) -> TextTask:
        return self


TaskConfig = ImageTask | TextTask
