"""When the rounds end: the stop rules, read from the history alone, so that a resumed run with other stop
rules decides afresh."""

from __future__ import annotations

from .config import LoopConfig

STOP_RULES = ("max_removed", "max_rounds", "patience", "target_speedup")
"""The settings that say when to stop, not what a round computes: a resumed run may change them (e.g. raise
--max-rounds to go on)."""


def misses_in_a_row(history: list[dict]) -> int:
    """Over-budget rounds since the last kept one: the run ends when they exceed ``--patience``."""
    kept = [i for i, r in enumerate(history) if r["within_budget"]]
    return len(history) - (kept[-1] + 1 if kept else 0)


def stop_reason(cfg: LoopConfig, history: list[dict], removed: int) -> str | None:
    """Why the run ends before another round, or None. Evaluated from the history, so a resumed run with other
    stop rules decides afresh."""
    kept = [r for r in history if r["within_budget"]]
    misses = misses_in_a_row(history)
    if cfg.one_shot is not None and history:
        return "one-shot: its single round is done"
    if cfg.max_rounds is not None and len(history) >= cfg.max_rounds:
        return f"--max-rounds {cfg.max_rounds} reached"
    if cfg.max_removed is not None and removed >= cfg.max_removed:
        return f"--max-removed {cfg.max_removed} reached"
    if misses > cfg.patience:
        return f"{misses} over-budget candidate(s) in a row (--patience {cfg.patience})"
    speedup = kept[-1].get("speedup") if kept else None
    if cfg.target_speedup is not None and speedup is not None and speedup >= cfg.target_speedup:
        return f"shipped model at ×{speedup:.2f} ≥ --target-speedup ×{cfg.target_speedup:.2f}"
    return None
