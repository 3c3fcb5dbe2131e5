"""Which precision ships: the FP32 file shipping chose, or its INT8 / FP16 conversion, never one that breaks the
budget nor (``auto``) one that is not faster.

The budget applies to what ships: a converted file is judged with onnxruntime on the same val samples as the
rounds' held-out check, against the FP32 original (``Judge``). When the whole graph in INT8 breaks the budget, the
first and last weighted layers stay in FP32 (the input's and the logits' ranges are what INT8 hurts most); when
that breaks it too, FP32 ships and the report says why. ``auto`` times every converted file within budget against
the FP32 file on the target and ships the fastest that is faster beyond the noise (``core.stats.Speedup``); a
target that cannot be timed here keeps FP32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from easier_export.core.console import info
from easier_export.core.quantize import AUTO, FP16, FP32, INT8, Calibration, convert, edge_layers
from easier_export.core.stats import PairedChange, Speedup


@dataclass(frozen=True)
class Judged:
    """A file's metric on the judged val samples, its paired change against the FP32 original there, and whether
    that change is within the budget at the run's confidence."""

    value: float
    change: PairedChange
    within: bool

    def to_dict(self) -> dict:
        return {"value": self.value, "change": self.change.to_dict(), "within_budget": self.within}


Judge = Callable[[Path], Judged]
Verify = Callable[[Path, str], dict]  # a file and its precision -> VerifyResult.to_dict against PyTorch
Race = Callable[[dict[str, Path], str], dict[str, Speedup] | None]  # files, baseline label -> speed-ups


@dataclass
class Converted:
    """One converted file: what ``quantize.convert`` wrote, with its verification and judgement."""

    precision: str
    export: dict
    judged: Judged
    speedup: Speedup | None = None  # against the FP32 file (``auto`` only)

    @property
    def label(self) -> str:
        kept = self.export.get("fp32_nodes") or []
        return self.precision + (f" ({len(kept)} layers FP32)" if kept else "")

    @property
    def ok(self) -> bool:
        return bool(self.export["verify"]["passed"]) and self.judged.within

    def to_dict(self) -> dict:
        return {"label": self.label, "precision": self.precision, **{k: v for k, v in self.export.items()},
                "judged": self.judged.to_dict(), "speedup_vs_fp32": None if self.speedup is None
                else self.speedup.to_dict()}


@dataclass
class PrecisionChoice:
    asked: str
    shipped: str
    reason: str
    chosen: Converted | None = None  # None: the FP32 file ships
    tried: list[Converted] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"asked": self.asked, "shipped": self.shipped, "reason": self.reason,
                "tried": [c.to_dict() for c in self.tried]}


def candidates(asked: str, target: str) -> list[str]:
    """The precisions tried, in order: the one asked for; ``auto``: INT8, and FP16 where the target is a GPU
    (onnxruntime's CPU kernels run FP16 through casts, slower than FP32)."""
    if asked == AUTO:
        return [INT8, FP16] if target == "cuda" else [INT8]
    return [] if asked == FP32 else [asked]


def fallbacks(precision: str, fp32_file: Path) -> list[list[str]]:
    """The nodes kept in FP32, per attempt: none, then (INT8) the first and last weighted layers."""
    edges = edge_layers(fp32_file) if precision == INT8 else []
    return [[], edges] if edges else [[]]


def convert_within_budget(precision: str, fp32_file: Path, target: str, work: Path,
                          calibration: Calibration | None, verify: Verify, judge: Judge,
                          tried: list[Converted]) -> Converted | None:
    """The first conversion of ``fp32_file`` to ``precision`` (``fallbacks`` order) that reproduces its model
    and keeps the budget; each attempt is appended to ``tried``."""
    for exclude in fallbacks(precision, fp32_file):
        path = work / f"{fp32_file.stem}.{precision}{'-edges-fp32' if exclude else ''}.onnx"
        export = convert(fp32_file, path, precision, calibration, exclude, target)
        export["verify"] = verify(path, precision)
        done = Converted(precision, export, judge(path))
        tried.append(done)
        info(f"{done.label}: change {done.judged.change.change:+.2f} (bound {done.judged.change.bound:+.2f}), "
             f"{'verified' if export['verify']['passed'] else 'failed verification: ' + export['verify']['reason']}"
             f", {'within' if done.judged.within else 'over'} budget")
        if done.ok:
            return done
    return None


def choose_precision(asked: str, fp32_file: Path, target: str, work: Path, calibration: Calibration | None,
                     verify: Verify, judge: Judge, race: Race) -> PrecisionChoice:
    """What ships of ``fp32_file`` and its conversions (see the module's docstring)."""
    if asked == FP32:
        return PrecisionChoice(asked, FP32, "asked for FP32")
    tried: list[Converted] = []
    ready = [c for p in candidates(asked, target)
             if (c := convert_within_budget(p, fp32_file, target, work, calibration, verify, judge, tried))
             is not None]
    if not ready:
        over = "; ".join(f"{c.label} {c.judged.change.change:+.2f} (bound {c.judged.change.bound:+.2f})"
                         for c in tried)
        return PrecisionChoice(asked, FP32, f"no conversion keeps the budget or reproduces the model ({over}): "
                                            "FP32 ships", tried=tried)
    if asked != AUTO:
        return PrecisionChoice(asked, ready[0].precision, f"asked for {asked}", ready[0], tried)
    speeds = race({FP32: fp32_file, **{c.label: Path(c.export["path"]) for c in ready}}, FP32)
    if speeds is None:
        return PrecisionChoice(asked, FP32, f"{target} cannot be timed here: FP32 ships", tried=tried)
    for c in ready:
        c.speedup = speeds[c.label]
    faster = [c for c in ready if c.speedup is not None and c.speedup.faster]
    if not faster:
        said = ", ".join(f"{c.label} ×{c.speedup.ratio:.2f}" for c in ready if c.speedup is not None)
        return PrecisionChoice(asked, FP32, f"no conversion runs faster than FP32 beyond the noise ({said})",
                               tried=tried)
    best = max(faster, key=lambda c: c.speedup.ratio)
    return PrecisionChoice(asked, best.precision, f"×{best.speedup.ratio:.2f} faster than FP32 (95 % interval "
                                                  f"{best.speedup.low:.2f}–{best.speedup.high:.2f})", best, tried)
