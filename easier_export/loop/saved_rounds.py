"""What a loop's state file says about its rounds, read without resuming it (for an interrupted run's message)."""

from __future__ import annotations

from pathlib import Path

from .state import STATE_FILE


def rounds_kept(out_dir: Path) -> tuple[int, int] | None:
    """(rounds done, rounds kept within budget) in ``out_dir``'s state file; (0, 0) without one, ``None`` when it
    cannot be read."""
    import torch

    path = out_dir / STATE_FILE
    if not path.exists():
        return 0, 0
    try:
        history = torch.load(path, map_location="cpu", weights_only=True)["history"]
        return len(history), sum(bool(r["within_budget"]) for r in history)
    except Exception:  # interrupted while written, or not a state file: nothing can be said about it
        return None
