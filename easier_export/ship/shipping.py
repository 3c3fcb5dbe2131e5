"""What ships: never a model slower than the one the user gave, nor one over budget on val samples the rounds
never saw.

The fold planner and the fold groups time merges in isolation; only the whole exported model, timed beside the
original's export on the target, says whether the user gets something faster. And every round was kept on the
same val samples, so the last kept round's change there is the best-looking of many tries. So after the loop
the kept rounds, latest first, are first judged on the val samples the rounds never saw (``LoopConfig.holdout``);
each one within budget there is folded the asked way, with every exact merge, and (when no padding was relocated
for a merge) with BatchNorm folding only, exported, verified, and raced against the original (``bench.race``).
The first round with a candidate faster beyond the noise ships its fastest such candidate. When no round has
one, the original ships, BatchNorm folded, and the report says no speed-up was found on the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from easier_export.core.console import info
from easier_export.core.errors import VerificationError
from easier_export.core.stats import Speedup
from easier_export.fold import MERGE_KINDS, FoldRecord, fold_model

from .bench import race

RACE_SECONDS = 10.0
NO_SPEEDUP = "no speed-up found on this target"


@dataclass
class Step:
    """A point the loop reached: a kept round (0: the original) and its linearized model."""

    round: int
    removed: list[str]
    top1: float
    model: fx.GraphModule
    ppl: float | None = None
    holdout: dict | None = None  # its paired change on the held-out val samples (stats.PairedChange.to_dict)
    within_holdout: bool = True


@dataclass
class Candidate:
    """One way to ship a step: folded with ``mode``, exported to ``path`` and verified against the step's
    model (``export['verify']``)."""

    step: Step
    mode: str
    folded: fx.GraphModule
    folds: list[FoldRecord]
    export: dict
    speedup: Speedup | None = None

    @property
    def label(self) -> str:
        return f"round {self.step.round}, fold {self.mode}" if self.step.round else f"original, fold {self.mode}"

    @property
    def merges(self) -> int:
        return sum(f.applied and f.kind in MERGE_KINDS for f in self.folds)


@dataclass
class Shipment:
    chosen: Candidate
    reason: str
    tried: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        speed = self.chosen.speedup
        return {"round": self.chosen.step.round, "removed": self.chosen.step.removed, "fold": self.chosen.mode,
                "speedup": None if speed is None else speed.to_dict(), "reason": self.reason, "tried": self.tried}


def stored_numbers(model: nn.Module) -> int:
    """Parameters and buffers (weights, biases, bias maps): what the exported file carries."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def modes_for(fold: str, relocated: bool) -> list[str]:
    """Ways to fold one step, in order: as asked, every exact merge, BatchNorm only. A step whose padding was
    relocated for its merges never ships unmerged (the relocated conv computes on a padded map: slower)."""
    if fold == "none":
        return ["none"]
    modes = [fold, "all"] if fold != "all" else ["all"]
    return modes if relocated else [*modes, "none"]


def pick(candidates: list[Candidate]) -> Candidate | None:
    """The fastest candidate faster than the original beyond the noise; among those whose speed-up lies inside
    its interval, the one storing the fewest numbers (a merge through a bottleneck that buys nothing measurable
    does not ship)."""
    faster = [c for c in candidates if c.speedup is not None and c.speedup.faster]
    if not faster:
        return None
    best = max(faster, key=lambda c: c.speedup.ratio)
    alike = [c for c in faster if c.speedup.high >= best.speedup.low]
    return min(alike, key=lambda c: (stored_numbers(c.folded), -c.speedup.ratio))


Exporter = Callable[[fx.GraphModule, list, Step, Path], dict]


def choose(steps: list[Step], original_onnx: Path, exporter: Exporter,
           example: torch.Tensor, fold: str, relocated: bool, target: str, batch: int, threads: int | None,
           work_dir: Path, fold_kwargs: dict) -> Shipment:
    """Walk ``steps`` (latest kept round first, the original -- round 0 -- last) and ship the first that runs
    faster than ``original_onnx`` on ``target`` at ``batch``; else the original with BatchNorm folded.
    ``exporter(folded, folds, step, path)`` exports and verifies against the step's model. When the target
    cannot be timed here, the first verified candidate of the latest step ships, and the reason says so."""
    tried: list[dict] = []
    unmerged: Candidate | None = None
    for step in steps:
        if not step.within_holdout:
            info(f"round {step.round} is over budget on the held-out val samples "
                 f"({step.holdout['change']:+.2f}, bound {step.holdout['bound']:+.2f}): stepping back")
            tried.append({"candidate": f"round {step.round}", "verified": None, "speedup": None,
                          "holdout": step.holdout})
            continue
        candidates = []
        for mode in modes_for(fold, relocated and step.round > 0):
            folded, folds = fold_model(step.model, example, mode=mode, **fold_kwargs)
            path = work_dir / f"round{step.round}-{mode}.onnx"
            cand = Candidate(step, mode, folded, folds, exporter(folded, folds, step, path))
            if not cand.export["verify"]["passed"]:
                tried.append({"candidate": cand.label, "verified": False, "speedup": None})
                continue
            if step.round == 0 and mode == "none":
                unmerged = cand
            if not any(same_file(cand.export["path"], other.export["path"]) for other in candidates):  # timed once
                candidates.append(cand)
        if not candidates:
            continue
        info(f"timing {candidates[0].label.split(',')[0]} as it would ship "
             f"({', '.join(c.mode for c in candidates)}) against the original on {target}, batch {batch}")
        verdicts = race({"original": original_onnx, **{c.label: Path(c.export["path"]) for c in candidates}},
                        "original", tuple(example.shape[1:]), target, batch, threads, RACE_SECONDS)
        if verdicts is None:
            return Shipment(candidates[0], f"not timed: {target} is not available here", tried)
        for c in candidates:
            c.speedup = verdicts[c.label]
            tried.append({"candidate": c.label, "verified": True, "speedup": c.speedup.to_dict(),
                          "merges": c.merges, "stored_numbers": stored_numbers(c.folded)})
            info(f"  {c.label}: ×{c.speedup.ratio:.2f} (95 % interval {c.speedup.low:.2f}–{c.speedup.high:.2f})")
        chosen = pick(candidates)
        if chosen is not None:
            return Shipment(chosen, f"×{chosen.speedup.ratio:.2f} faster than the original "
                                    f"(95 % interval {chosen.speedup.low:.2f}–{chosen.speedup.high:.2f})", tried)
    if unmerged is None:
        raise VerificationError("the original, BatchNorm folded, does not reproduce itself in ONNX")
    return Shipment(unmerged, NO_SPEEDUP, tried)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Two exports of one graph (two fold modes that merged nothing different): race it once, not against itself."""
    return Path(a).read_bytes() == Path(b).read_bytes()
