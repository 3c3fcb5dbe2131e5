"""What a run keeps between rounds: the state written after each round (``state.pt``), its round records, the
fingerprint that decides whether a rerun may resume it, and the weights of each kept round.

The same command rerun continues after the last finished round; because every round seeds itself from
(seed, round), the resumed history is the one an uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx

from easier_export.core.dist import is_main_process
from easier_export.core.errors import UserError, first_line
from easier_export.core.io import save_torch

from .config import LoopConfig
from .stop import STOP_RULES

STATE_FILE = "state.pt"
STATE_FORMAT = 2
"""Version of state.pt's layout: a file of another version is refused."""
SNAPSHOTS = "rounds"
"""Folder of the weights after each kept round, so that shipping can step back to an earlier round."""


@dataclass
class RoundRecord:
    round: int
    removed: list[str]
    score: float
    val_top1: float
    delta: float
    within_budget: bool
    seconds: float
    us_saved: float | None = None  # latency selection: the group's measured marginal saving (batch 1)
    speedup: float | None = None  # with a target speed-up: the shipped model's, low end of its 95 % interval
    val_ppl: float | None = None  # language models: validation perplexity (the budget metric)
    stand_ins: dict[str, str] | None = None  # --substitute affine: per site "affine", or "identity: why"
    change: dict | None = None  # the paired change against the original and its bound (stats.PairedChange)
    holdout: dict | None = None  # the same on the held-out val samples (judged only when shipping)


@dataclass
class LoopState:
    """Everything needed to continue: written after each round."""

    fingerprint: dict
    base_top1: float
    format: int = STATE_FORMAT
    base_outcomes: dict | None = None  # the original's per-sample val outcomes (correct, nll), for paired changes
    removed: list[str] = field(default_factory=list)
    state_dict: dict | None = None
    baseline: dict | None = None  # weights of the finetuned original (with baseline_epochs)
    history: list[dict] = field(default_factory=list)
    entropy0: list[dict] = field(default_factory=list)
    finished: bool = False  # nothing left to try (stop rules are re-evaluated on resume instead)
    groups: dict | None = None  # FoldGroups.to_dict(), measured once (latency selection)
    base_ppl: float | None = None  # language models: the original's validation perplexity


@dataclass
class LoopResult:
    model: fx.GraphModule
    removed: list[str]
    base_top1: float
    final_top1: float
    history: list[RoundRecord]
    entropy0: list[dict]
    resumed_rounds: int = 0
    groups: list[dict] = field(default_factory=list)  # fold groups of the original, for the report
    base_ppl: float | None = None  # language models (Task metric ppl)
    final_ppl: float | None = None
    stopped: str = ""  # why the rounds ended (a stop rule, or nothing left to try)


def _digest(module: torch.nn.Module) -> str:
    """Identifies the starting weights: resuming onto other weights would mix two runs."""
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_id(loader) -> dict:
    """What identifies a split's data in the fingerprint: where it comes from, its size, batching and transform."""
    ds = loader.dataset
    return {"root": str(getattr(ds, "root", "")), "size": len(ds), "batch_size": loader.batch_size,
            "transform": repr(getattr(ds, "transform", None))}


def _input_shape(loader) -> list[int]:
    """One input's shape ((C, H, W) or (sequence length,)): recorded so that a refused resume can name it."""
    ds = loader.dataset
    return list(ds[0][0].shape) if len(ds) else []


def fingerprint(gm: fx.GraphModule, source: str, cfg: LoopConfig, train_loader, val_loader) -> dict:
    """Everything a round's outcome depends on: the model and its weights, the settings, the data."""
    return {"source": source, **asdict(cfg), "weights": _digest(gm), "removed_before": gm.meta.get("removed", []),
            "train": data_id(train_loader), "val": data_id(val_loader), "input_size": _input_shape(val_loader)}


def changed_settings(stored: dict, current: dict) -> list[str]:
    """Fingerprint keys that differ, stop rules aside (a key only one side records differs)."""
    return sorted(k for k in stored.keys() | current.keys() if k not in STOP_RULES and stored.get(k) != current.get(k))


def _in_words(changed: list[str], stored: dict, current: dict) -> str:
    """The changed settings, with the input size spelled out; the data's transform (and a text model's count of
    blocks) that a new input size changes is not named again."""
    parts = []
    for key in changed:
        if key == "input_size" and key in stored and key in current:
            parts.append(f"input size {'x'.join(map(str, current[key]))}, was {'x'.join(map(str, stored[key]))}")
        elif key in ("train", "val") and key in stored and key in current:
            differ = [f for f in current[key] if stored[key].get(f) != current[key][f]
                      and not ("input_size" in changed and f in ("transform", "size"))]
            parts += [f"{key} data ({', '.join(differ)})"] if differ else []
        else:
            parts.append(key)
    return "; ".join(parts)


def load_state(out_dir: Path, expected: dict) -> LoopState | None:
    """The stored run in ``out_dir`` if there is one, refused unless its format and fingerprint match
    ``expected``."""
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        found = stored.get("format")
        state = LoopState(**stored) if found == STATE_FORMAT else None
    except Exception as e:  # empty, truncated or foreign: torch and the dataclass raise many types
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {first_line(e)}); delete it to start over") from e
    if state is None:
        raise UserError(f"{path} was written by another version of easier-export (state format {found}, "
                        f"this one reads {STATE_FORMAT}); use another --out or delete it to start over")
    changed = changed_settings(state.fingerprint, expected)
    if changed:
        raise UserError(f"{path} was written with different settings "
                        f"({_in_words(changed, state.fingerprint, expected)}); use another --out or delete it to "
                        "start over")
    return state


def save_state(out_dir: Path, state: LoopState) -> None:
    """Write ``state`` atomically (the main process only, under DDP)."""
    if is_main_process():
        save_torch(asdict(state), out_dir / STATE_FILE)


def cpu_state(module: torch.nn.Module) -> dict:
    """``module``'s weights, detached on the CPU: what a state or snapshot file stores."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def snapshot_path(out_dir: Path, rnd: int) -> Path:
    """Where the weights after kept round ``rnd`` are kept."""
    return Path(out_dir) / SNAPSHOTS / f"round-{rnd:03d}.pt"
