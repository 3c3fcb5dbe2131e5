"""The EASIER loop (steps 3-4): remove the least non-linear call site, finetune, validate, repeat.

After every round the full state (weights of the last model within budget, removed set, history) is written
atomically; the same command rerun continues after the last finished round, and because every round seeds
itself from (seed, round) the resumed history is the one an uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx

from .entropy import SiteStats, measure
from .errors import UserError
from .graph import ALL_RECTIFIERS, CallSite, find_call_sites, linearize
from .io import save_torch
from .train import evaluate, finetune, is_main_process, seed_everything
from .ui import info, progress

STATE_FILE = "state.pt"


@dataclass
class LoopConfig:
    max_drop: float = 1.0
    finetune_epochs: float = 1.0
    lr: float = 0.01
    max_removed: int | None = None
    one_shot: int | None = None
    criterion: str = "entropy"
    rectifiers: tuple[str, ...] = tuple(sorted(ALL_RECTIFIERS))
    entropy_batches: int | None = 20
    entropy_mode: str = "train"
    threshold: float = 0.0
    seed: int = 0
    relocate_padding: bool = False  # move padding across removed activations so conv·conv merges are exact
    baseline_epochs: float = 0.0  # finetune the original first (e.g. after a data-domain shift): a fair baseline

    def __post_init__(self) -> None:
        """Refuse bad settings before any work is done (and before a state file records them)."""
        checks = [
            (self.criterion in ("random", *CRITERIA), f"unknown --criterion '{self.criterion}' "
                                                      f"(choose from random, {', '.join(CRITERIA)})"),
            (self.entropy_mode in ("train", "eval"), f"--entropy-mode is train or eval, not {self.entropy_mode!r}"),
            (self.entropy_batches is None or self.entropy_batches >= 1, "--entropy-batches must be at least 1"),
            (self.one_shot is None or self.one_shot >= 1, "--one-shot must be at least 1"),
            (self.max_removed is None or self.max_removed >= 0, "--max-removed must not be negative"),
            (self.finetune_epochs >= 0 and self.baseline_epochs >= 0, "epochs must not be negative"),
            (self.lr > 0, "--lr must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class RoundRecord:
    round: int
    removed: list[str]
    score: float
    val_top1: float
    delta: float
    within_budget: bool
    seconds: float


@dataclass
class LoopState:
    """Everything needed to continue: written after each round."""

    fingerprint: dict
    base_top1: float
    removed: list[str] = field(default_factory=list)
    state_dict: dict | None = None
    baseline: dict | None = None  # weights of the finetuned original (with baseline_epochs)
    history: list[dict] = field(default_factory=list)
    entropy0: list[dict] = field(default_factory=list)
    finished: bool = False


@dataclass
class LoopResult:
    model: fx.GraphModule
    removed: list[str]
    base_top1: float
    final_top1: float
    history: list[RoundRecord]
    entropy0: list[dict]
    resumed_rounds: int = 0


# --- scoring: lower = removed first ------------------------------------------------------------------
def _entropy(stats: SiteStats) -> float:
    return stats.entropy


def _sparsity(stats: SiteStats) -> float:
    """Share of the minority state (ON or OFF): 0 for a unit that never switches."""
    return float(torch.minimum(stats.p_on, 1 - stats.p_on).mean()) if stats.units else 0.0


CRITERIA: dict[str, Callable[[SiteStats], float]] = {"entropy": _entropy, "sparsity": _sparsity}


def score_sites(gm: fx.GraphModule, sites: list[CallSite], loader, device: torch.device, cfg: LoopConfig,
                round_seed: int) -> tuple[dict[str, float], dict[str, SiteStats]]:
    if cfg.criterion == "random":
        gen = torch.Generator().manual_seed(round_seed)
        return {s.name: float(v) for s, v in zip(sites, torch.rand(len(sites), generator=gen), strict=True)}, {}
    total = cfg.entropy_batches if cfg.entropy_batches is not None else len(loader)
    with progress("entropy", min(total, len(loader))) as advance:
        stats = measure(gm, sites, loader, device, cfg.entropy_batches, cfg.entropy_mode == "train",
                        cfg.threshold, advance)
    return {name: CRITERIA[cfg.criterion](s) for name, s in stats.items()}, stats


def pick(scores: dict[str, float], cfg: LoopConfig, already: int) -> list[str]:
    """The lowest-scoring site, or every exactly-zero one at once; K lowest in one-shot mode."""
    order = sorted(scores, key=lambda n: (scores[n], n))
    budget = len(order) if cfg.max_removed is None else max(cfg.max_removed - already, 0)
    if cfg.one_shot is not None:
        chosen = order[: cfg.one_shot]
    else:
        chosen = [n for n in order if scores[n] == 0.0] or order[:1]
    return chosen[:budget]


def _digest(module: torch.nn.Module) -> str:
    """Identifies the starting weights: resuming onto other weights would mix two runs."""
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data_id(loader) -> dict:
    ds = loader.dataset
    return {"root": str(getattr(ds, "root", "")), "size": len(ds), "batch_size": loader.batch_size,
            "transform": repr(getattr(ds, "transform", None))}


def _fingerprint(gm: fx.GraphModule, source: str, cfg: LoopConfig, train_loader, val_loader) -> dict:
    return {"source": source, **asdict(cfg), "weights": _digest(gm), "removed_before": gm.meta.get("removed", []),
            "train": _data_id(train_loader), "val": _data_id(val_loader)}


def load_state(out_dir: Path, fingerprint: dict) -> LoopState | None:
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    state = LoopState(**torch.load(path, map_location="cpu", weights_only=True))
    if state.fingerprint != fingerprint:
        changed = sorted(k for k in fingerprint if state.fingerprint.get(k) != fingerprint[k])
        raise UserError(f"{path} was written with different settings ({', '.join(changed)}); "
                        "use another --out or delete it to start over")
    return state


def save_state(out_dir: Path, state: LoopState) -> None:
    if is_main_process():
        save_torch(asdict(state), out_dir / STATE_FILE)


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def run_loop(gm: fx.GraphModule, source: str, train_loader, val_loader, cfg: LoopConfig, device: torch.device,
             out_dir: Path) -> LoopResult:
    """Iteratively linearize ``gm`` (the traced original) within the accuracy budget."""
    fingerprint = _fingerprint(gm, source, cfg, train_loader, val_loader)
    gm = gm.to(device)
    state = load_state(out_dir, fingerprint)
    resumed = 0
    if state is None:
        state = LoopState(fingerprint, 0.0)
        if cfg.baseline_epochs > 0:
            seed_everything(cfg.seed * 100_003, train_loader)
            with progress("finetune original (baseline)", math.ceil(cfg.baseline_epochs * len(train_loader))) as adv:
                finetune(gm, train_loader, device, cfg.baseline_epochs, cfg.lr, on_step=adv)
            state.baseline = cpu_state(gm)
        state.base_top1 = evaluate(gm, val_loader, device)
        info(f"original top-1 {state.base_top1:.2f}%  (budget: ≥ {state.base_top1 - cfg.max_drop:.2f}%)")
        save_state(out_dir, state)
    else:
        resumed = len(state.history)
        info(f"resuming from {out_dir / STATE_FILE}: {resumed} round(s) done, removed {len(state.removed)}")
    if state.baseline is not None:  # the original stays the finetuned baseline on resume too
        gm.load_state_dict(state.baseline)
    current = linearize(gm, state.removed, cfg.relocate_padding) if state.removed else gm
    if state.state_dict is not None:
        current.load_state_dict(state.state_dict)
    current = current.to(device)

    while not state.finished:
        rnd = len(state.history) + 1
        sites = find_call_sites(current, cfg.rectifiers)
        if not sites or (cfg.max_removed is not None and len(state.removed) >= cfg.max_removed):
            state.finished = True
            break
        t0 = time.perf_counter()
        round_seed = cfg.seed * 100_003 + rnd
        seed_everything(round_seed, train_loader)
        scores, stats = score_sites(current, sites, train_loader, device, cfg, round_seed)
        if rnd == 1:
            state.entropy0 = [s.to_dict() for s in stats.values()]
        chosen = pick(scores, cfg, len(state.removed))
        candidate = linearize(current, chosen, cfg.relocate_padding).to(device)
        seed_everything(round_seed, train_loader)
        with progress(f"round {rnd}: finetune", math.ceil(cfg.finetune_epochs * len(train_loader))) as advance:
            finetune(candidate, train_loader, device, cfg.finetune_epochs, cfg.lr, on_step=advance)
        acc = evaluate(candidate, val_loader, device)
        within = acc >= state.base_top1 - cfg.max_drop
        record = RoundRecord(rnd, chosen, min(scores[n] for n in chosen), acc, acc - state.base_top1, within,
                             time.perf_counter() - t0)
        state.history.append(asdict(record))
        info(f"round {rnd}: removed {', '.join(chosen)} (score {record.score:.3f}) → top-1 {acc:.2f}% "
             f"(Δ {record.delta:+.2f}) {'kept' if within else 'over budget: stop, keep previous'}")
        if within:
            current = candidate
            state.removed = state.removed + chosen
            state.state_dict = cpu_state(current)
        state.finished = not within or cfg.one_shot is not None
        save_state(out_dir, state)

    kept = [r["val_top1"] for r in state.history if r["within_budget"]]
    return LoopResult(current.eval(), state.removed, state.base_top1, kept[-1] if kept else state.base_top1,
                      [RoundRecord(**r) for r in state.history], state.entropy0, resumed)
