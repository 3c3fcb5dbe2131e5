"""The loop's settings (:class:`LoopConfig`, one field per command-line option, checked on construction) and
the budget metric it keeps (:class:`Task`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from easier_export.core.errors import UserError
from easier_export.core.stats import PairedChange, paired_accuracy_change, paired_ppl_change
from easier_export.trace.rectifiers import ALL_RECTIFIERS

from .affine import SUBSTITUTES
from .criteria import CRITERIA
from .train import OPTIMIZERS

SELECTIONS = ("entropy", "latency")


def option(default: object, help: str, **cli: object) -> Any:
    """A LoopConfig field and its command-line option in one place: ``help``, and for the CLI ``choices``,
    ``min``/``max`` bounds or ``positive``; `compress` and `linearize` generate their loop options from these
    fields. A float field is always finite (``inf`` never ends a loop, ``nan`` compares false everywhere)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class LoopConfig:
    max_drop: float = option(1.0, "accuracy budget: largest allowed top-1 drop, in points", min=0.0)
    max_ppl_increase: float = option(5.0, "language-model budget: largest allowed validation perplexity increase, "
                                          "in percent (causal LMs; classifiers use --max-drop)", min=0.0)
    confidence: float = option(0.9, "keep a round only when the one-sided bound of its paired change against "
                                    "the original on the val split, at this confidence, is within budget (0: "
                                    "the observed change alone)", min=0.0, max=0.999)
    holdout: float = option(0.5, "share of the val split the rounds never see: what ships must also be within "
                                 "budget there (at --confidence), else an earlier kept round ships (0: none held "
                                 "out)", min=0.0, max=0.9)
    finetune_epochs: float = option(1.0, "finetuning epochs per round (fractions allowed)", min=0.0)
    lr: float = option(0.01, "finetuning learning rate (cosine schedule)", positive=True)
    optimizer: str = option("sgd", "finetuning optimizer: sgd (momentum 0.9) or adamw (for transformers and "
                                   "language models)", choices=OPTIMIZERS)
    max_removed: int | None = option(None, "stop after removing this many activations", min=0)
    max_rounds: int | None = option(None, "stop after this many rounds, kept or reverted (a fixed finetuning "
                                          "budget, e.g. to compare selections at equal cost)", min=1)
    one_shot: int | None = option(None, "remove the K lowest-scoring activations at once, finetune once", min=1)
    criterion: str = option("entropy", "which call site goes first (the study's baselines: gradient, tlc, "
                                       "layerfold, egp; see docs/criteria.md)", choices=tuple(CRITERIA))
    entropy_reg: float = option(0.0, "with --one-shot: first finetune with λ·Σ soft binary entropy of every "
                                     "call site added to the loss, then remove the K lowest", min=0.0)
    entropy_tau: float = option(0.1, "temperature τ of --entropy-reg's soft ON probability sigmoid(x/τ)",
                                positive=True)
    rectifiers: tuple[str, ...] = option(tuple(sorted(ALL_RECTIFIERS)), "which activations count",
                                         choices=tuple(sorted(ALL_RECTIFIERS)))
    entropy_batches: int | None = option(20, "batches per entropy pass", min=1)
    entropy_mode: str = option("train", "train (as EASIER does) or eval mode for entropy passes",
                               choices=("train", "eval"))
    threshold: float = option(0.0, "a unit is ON when its pre-activation is >= this")
    seed: int = option(0, "random seed")
    relocate_padding: bool = option(False, "move a conv's padding onto the conv before a removed activation, so "
                                           "the two can later merge exactly")
    baseline_epochs: float = option(0.0, "finetune the original this long first, so the budget is measured "
                                         "from a model adapted to DATA (e.g. after a data-domain shift)", min=0.0)
    select: str = option("entropy", "entropy: one activation per round, lowest score first (EASIER); latency: "
                                    "the fold group (activations whose joint removal completes a merge) with the "
                                    "least summed score, among the groups whose merge measured faster on --target",
                        choices=SELECTIONS)
    anneal: float = option(0.0, "fade each removed activation out over this fraction of its round's finetuning, "
                                "(1-α)·act(x) + α·s(x) with α rising from 0 to 1 (s: its --substitute stand-in), "
                                "instead of switching it off before the round (0: at once, as EASIER does)",
                           min=0.0, max=1.0)
    substitute: str = option("identity", "what replaces a removed activation: identity (EASIER), or affine: each "
                                         "unit's least-squares line a·x + b through its (input, output) pairs on the "
                                         "entropy batches, absorbed into the layer before it (exact; the identity "
                                         "where no such layer takes it)", choices=SUBSTITUTES)
    distill: float = option(0.0, "knowledge distillation weight w in the rounds' finetuning: loss = (1-w)·CE + "
                                 "w·T²·KL(original ‖ candidate), the original (frozen) as the teacher; 0 = off",
                            min=0.0, max=1.0)
    distill_temperature: float = option(4.0, "temperature T of --distill", positive=True)
    patience: int = option(2, "over-budget candidates in a row (each reverted, then the next one tried) before "
                              "the run ends; 0 stops at the first", min=0)
    target_speedup: float | None = option(None, "stop once the shipped model runs at least this much faster than "
                                                "the original on --target (ORT, low end of the 95 % interval)",
                                          positive=True)

    def budget(self, already: int) -> int:
        """How many more activations may go (``--max-removed``), ``already`` being gone."""
        return sys.maxsize if self.max_removed is None else max(self.max_removed - already, 0)

    @property
    def relocates(self) -> bool:
        """Latency selection removes groups to merge them: their padding is always relocated (exact merges)."""
        return self.relocate_padding or self.select == "latency"

    def __post_init__(self) -> None:
        """Refuse bad settings before any work is done (and before a state file records them). Bounds and choices
        come from the fields' metadata (the CLI's own checks), so the Python API refuses what the CLI does."""
        checks = [(ok, f"--{f.name.replace('_', '-')} {why}") for f in fields(self) for ok, why in field_checks(
            f.metadata, getattr(self, f.name))]
        checks += [
            (self.entropy_reg == 0 or self.one_shot is not None, "--entropy-reg trains once, then removes "
                                                                 "--one-shot K sites: give --one-shot"),
            (self.select != "latency" or self.one_shot is None, "--one-shot removes sites, not fold groups: "
                                                                "use it with --select entropy"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def field_checks(meta: Mapping[str, Any], value: Any) -> list[tuple[bool, str]]:
    """A setting against its option's ``min``/``max`` bounds, ``positive`` and ``choices`` (each item, for a
    tuple); a float must be finite."""
    checks = []
    if isinstance(value, float):
        checks.append((math.isfinite(value), f"must be a finite number, got {value}"))
    if value is not None and meta.get("positive"):
        checks.append((value > 0, f"must be positive, got {value}"))
    if value is not None and "min" in meta:
        checks.append((value >= meta["min"], f"must be at least {meta['min']}, got {value}"))
    if value is not None and "max" in meta:
        checks.append((value <= meta["max"], f"must be at most {meta['max']}, got {value}"))
    if "choices" in meta:
        items = value if isinstance(value, tuple) else (value,)
        checks.append((set(items) <= set(meta["choices"]),
                       f"must be one of {', '.join(meta['choices'])}, got {value!r}"))
    return checks


@dataclass(frozen=True)
class Task:
    """What the loop keeps within budget: ``top1`` (higher is better; ``--max-drop`` points: images, text
    classifiers) or ``ppl`` (lower is better; ``--max-ppl-increase`` percent: causal language models).
    ``pad_id``: token id whose positions the entropy counts leave out (padded text batches)."""

    metric: str = "top1"
    pad_id: int | None = None

    def limit(self, cfg: LoopConfig, base: float) -> float:
        """The worst value of the metric still within budget."""
        return base * (1 + cfg.max_ppl_increase / 100) if self.metric == "ppl" else base - cfg.max_drop

    def change(self, cfg: LoopConfig, base: dict, metrics: dict, samples: torch.Tensor) -> PairedChange:
        """A candidate against the original on the same validation ``samples`` (a mask over
        ``evaluate_metrics``'s per-sample outputs)."""
        if self.metric == "ppl":
            return paired_ppl_change(base["nll"][samples], metrics["nll"][samples], cfg.confidence)
        return paired_accuracy_change(base["correct"][samples], metrics["correct"][samples], cfg.confidence)

    def within(self, cfg: LoopConfig, change: PairedChange) -> bool:
        """Within budget at ``cfg.confidence``: the bound on the bad side of the paired change."""
        if self.metric == "ppl":
            return change.bound <= cfg.max_ppl_increase
        return change.bound >= -cfg.max_drop

