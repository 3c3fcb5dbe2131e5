"""The EASIER loop (steps 3-4): remove the least non-linear call site, finetune, validate, repeat.

After every round the full state is written (:mod:`.state`), so the same command rerun continues after the
last finished round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import fx
from torch.utils.data import DataLoader

from easier_export.core.console import info, progress
from easier_export.core.dist import is_main_process
from easier_export.core.io import save_torch
from easier_export.core.stats import PairedChange, held_out, resolvable_drop
from easier_export.fold import LATENCY_FILE, LatencyTable
from easier_export.fold.groups import FoldGroups
from easier_export.trace.edits import blend_sites, fade, remove_sites, settle
from easier_export.trace.sites import CallSite, find_call_sites

from .affine import stand_ins
from .config import LoopConfig, Task
from .regularise import entropy_regularised
from .selection import choose, measure_groups, score_sites
from .state import (
    STATE_FILE,
    LoopResult,
    LoopState,
    RoundRecord,
    cpu_state,
    fingerprint,
    load_state,
    save_state,
    snapshot_path,
)
from .stop import misses_in_a_row, stop_reason
from .train import Teacher, evaluate_metrics, finetune, seed_everything, warn_near_chance


@dataclass(frozen=True)
class _Run:
    """What every round of one run reads and never changes."""

    cfg: LoopConfig
    task: Task
    train: DataLoader
    val: DataLoader
    device: torch.device
    out_dir: Path
    held: torch.Tensor  # mask of the val samples the rounds never see
    groups: FoldGroups | None
    teacher: Teacher | None
    probe: Callable[[fx.GraphModule], float] | None


def round_seed(seed: int, rnd: int) -> int:
    """The seed of round ``rnd`` (0: the baseline finetune) of a run seeded ``seed``: per round, so a resumed run
    replays what an uninterrupted one does, and a benchmark's control can finetune on the same data order."""
    return seed * 100_003 + rnd


def run_loop(gm: fx.GraphModule, source: str, train_loader, val_loader, cfg: LoopConfig, device: torch.device,
             out_dir: Path, table: LatencyTable | None = None,
             probe: Callable[[fx.GraphModule], float] | None = None, task: Task = Task()) -> LoopResult:
    """Iteratively linearize ``gm`` (the traced original) within the budget on ``task``'s metric.

    ``table`` times fold groups for latency selection (default: CPU, cached in ``out_dir``); ``probe`` measures
    the shipped model's end-to-end speed-up after a kept round (needed for ``target_speedup``).
    """
    expected = fingerprint(gm, source, cfg, train_loader, val_loader)
    gm = gm.to(device)
    state = load_state(out_dir, expected)
    resumed = 0 if state is None else len(state.history)
    if state is None:
        state = _start(gm, expected, cfg, task, train_loader, val_loader, device, out_dir)
    else:
        info(f"resuming from {out_dir / STATE_FILE}: {resumed} round(s) done, removed {len(state.removed)}")
    held = held_out(len(state.base_outcomes["correct"]), cfg.holdout)
    if not resumed:
        _warn_unresolvable(cfg, task, state.base_top1, int((~held).sum()))
    if state.baseline is not None:  # the original stays the finetuned baseline on resume too
        gm.load_state_dict(state.baseline)
    groups = _groups(gm, state, cfg, val_loader, out_dir, table)
    teacher = Teacher.frozen(gm, cfg.distill, cfg.distill_temperature) if cfg.distill > 0 else None
    run = _Run(cfg, task, train_loader, val_loader, device, out_dir, held, groups, teacher, probe)
    current = remove_sites(gm, state.removed, cfg.relocates) if state.removed else gm
    if state.state_dict is not None:
        current.load_state_dict(state.state_dict)
    current = current.to(device)
    stopped = "the stored run had ended (nothing left to try)" if state.finished else None
    while stopped is None:
        current, stopped = _round(current, state, run)
    info(f"stopped: {stopped}")
    return _result(current, state, resumed, run.groups, stopped)


def _start(gm: fx.GraphModule, expected: dict, cfg: LoopConfig, task: Task, train_loader, val_loader,
           device: torch.device, out_dir: Path) -> LoopState:
    """A new run: the original (finetuned first, with ``--baseline-epochs``) measured on the val split, stored."""
    state = LoopState(expected, 0.0)
    if cfg.baseline_epochs > 0:
        seed_everything(round_seed(cfg.seed, 0), train_loader)
        with progress("finetune original (baseline)", math.ceil(cfg.baseline_epochs * len(train_loader))) as adv:
            finetune(gm, train_loader, device, cfg.baseline_epochs, cfg.lr, on_step=adv, optimizer=cfg.optimizer)
        state.baseline = cpu_state(gm)
    metrics = evaluate_metrics(gm, val_loader, device)
    state.base_top1 = metrics["top1"]
    state.base_outcomes = {"correct": metrics["correct"], "nll": metrics["nll"]}
    if task.metric == "ppl":
        state.base_ppl = metrics["ppl"]
        info(f"original perplexity {state.base_ppl:.3f}, next-token top-1 {state.base_top1:.2f}%  "
             f"(budget: perplexity ≤ {task.limit(cfg, state.base_ppl):.3f})")
    else:
        info(f"original top-1 {state.base_top1:.2f}%  (budget: ≥ {task.limit(cfg, state.base_top1):.2f}%)")
    warn_near_chance(state.base_top1, gm)
    save_state(out_dir, state)
    return state


def _groups(gm: fx.GraphModule, state: LoopState, cfg: LoopConfig, val_loader, out_dir: Path,
            table: LatencyTable | None) -> FoldGroups | None:
    """Latency selection's fold groups: timed once, then read from the state."""
    if cfg.select == "latency" and state.groups is None:
        example = next(iter(val_loader))[0][:1]
        table = table or LatencyTable("cpu", None, out_dir / LATENCY_FILE)
        state.groups = measure_groups(gm, cfg, example, table).to_dict()
        save_state(out_dir, state)
    return FoldGroups.from_dict(state.groups) if state.groups is not None else None


def _round(current: fx.GraphModule, state: LoopState, run: _Run) -> tuple[fx.GraphModule, str | None]:
    """One round: score, choose, remove, finetune, validate, keep or revert. Returns the model after it and why
    the run ends (None: go on)."""
    cfg, rnd = run.cfg, len(state.history) + 1
    sites = find_call_sites(current, cfg.rectifiers)
    stopped = stop_reason(cfg, state.history, len(state.removed)) or (None if sites else "no activation left")
    if stopped is not None:
        return current, stopped
    t0 = time.perf_counter()
    seed = round_seed(cfg.seed, rnd)
    seed_everything(seed, run.train)
    scored = current if cfg.entropy_reg == 0 else _regularised(current, sites, run)
    scores, stats = score_sites(scored, sites, run.train, run.device, cfg, seed, run.task.pad_id)
    if rnd == 1:
        state.entropy0 = [s.to_dict() for s in stats.values()]
    chosen, us_saved = choose(scores, cfg, state.history, state.removed, run.groups)
    if not chosen:
        state.finished = True  # exhausted: no stop rule can reopen it
        save_state(run.out_dir, state)
        return current, "no candidate left" + (" with a measured saving" if run.groups is not None else "")
    candidate, stand_in = _candidate(scored, chosen, rnd, seed, run)
    record = _judge(candidate, state, run, rnd, chosen, min(scores[n] for n in chosen), us_saved, stand_in, t0)
    if record.within_budget:
        current = _keep(candidate, state, record, run)
    state.history.append(asdict(record))
    save_state(run.out_dir, state)
    return current, None


def _regularised(gm: fx.GraphModule, sites: list[CallSite], run: _Run) -> fx.GraphModule:
    """``--entropy-reg``: a copy finetuned with the soft-entropy penalty (``gm`` stays as it is if reverted)."""
    cfg = run.cfg
    with progress("finetune with entropy penalty", math.ceil(cfg.finetune_epochs * len(run.train))) as advance:
        return entropy_regularised(gm, sites, run.train, run.device, cfg.finetune_epochs, cfg.lr, cfg.entropy_reg,
                                   cfg.entropy_tau, cfg.threshold, advance, cfg.optimizer)


def _candidate(scored: fx.GraphModule, chosen: list[str], rnd: int, round_seed: int,
               run: _Run) -> tuple[fx.GraphModule, dict[str, str] | None]:
    """The model without the ``chosen`` sites, finetuned (with ``--anneal``, faded out while it trains), and
    what stands in for each site (``--substitute affine``; None with the identity)."""
    cfg = run.cfg
    fits, stand_in = {}, None
    if cfg.substitute != "identity":
        fits, refused = stand_ins(scored, chosen, run.train, run.device, cfg.entropy_batches,
                                  cfg.entropy_mode == "train", run.task.pad_id)
        for name, why in refused.items():
            info(f"{name}: the identity stands in ({why})")
        stand_in = {name: "affine" if name in fits else f"identity: {refused[name]}" for name in chosen}
    candidate = (blend_sites if cfg.anneal > 0 else remove_sites)(scored, chosen, cfg.relocates, fits).to(run.device)
    seed_everything(round_seed, run.train)
    steps = math.ceil(cfg.finetune_epochs * len(run.train))
    with progress(f"round {rnd}: finetune", steps) as advance:
        on_step = _fader(candidate, cfg.anneal * steps, advance) if cfg.anneal > 0 else advance
        finetune(candidate, run.train, run.device, cfg.finetune_epochs, cfg.lr, optimizer=cfg.optimizer,
                 teacher=run.teacher, on_step=on_step)
    return (settle(candidate).to(run.device) if cfg.anneal > 0 else candidate), stand_in


def _fader(model: torch.nn.Module, ramp_steps: float, advance: Callable[[], None]) -> Callable[[], None]:
    """``--anneal``'s per-step callback: α of the blended activations rises linearly from 0 (the model as it
    was) to 1 (removed) over the first ``ramp_steps`` optimizer steps, then the round trains the linear model."""
    done = 0
    fade(model, 0.0)

    def step() -> None:
        nonlocal done
        done += 1
        fade(model, min(1.0, done / ramp_steps))
        advance()
    return step


def _judge(candidate: fx.GraphModule, state: LoopState, run: _Run, rnd: int, chosen: list[str], score: float,
           us_saved: float | None, stand_in: dict[str, str] | None, t0: float) -> RoundRecord:
    """The candidate against the original on the val samples the rounds see (and, for shipping, on the held-out
    ones): the round's record, said in one line."""
    cfg, task, held = run.cfg, run.task, run.held
    metrics = evaluate_metrics(candidate, run.val, run.device)
    acc, ppl = metrics["top1"], metrics["ppl"] if task.metric == "ppl" else None
    change = task.change(cfg, state.base_outcomes, metrics, ~held)
    within = task.within(cfg, change)
    check = task.change(cfg, state.base_outcomes, metrics, held).to_dict() if bool(held.any()) else None
    record = RoundRecord(rnd, chosen, score, acc, acc - state.base_top1, within, time.perf_counter() - t0,
                         us_saved, val_ppl=ppl, stand_ins=stand_in, change=change.to_dict(), holdout=check)
    saved = f", saves {us_saved:.1f}us" if us_saved is not None else ""
    misses = misses_in_a_row(state.history) + (not within)
    verdict = "kept" if within else f"over budget: reverted ({misses} miss(es) in a row)"
    shown = f"perplexity {ppl:.3f}, " if ppl is not None else ""
    held_text = "" if check is None else f"; held-out {check['n']}: Δ {check['change']:+.2f}"
    info(f"round {rnd}: removed {', '.join(chosen)} (score {score:.3f}{saved}) → {shown}top-1 {acc:.2f}% "
         f"(judged on {change.n} val samples: Δ {change.change:+.2f}, {_bound_text(task, change)}{held_text}) "
         f"{verdict}")
    return record


def _keep(candidate: fx.GraphModule, state: LoopState, record: RoundRecord, run: _Run) -> fx.GraphModule:
    """A round within budget: its model becomes the current one, its weights a snapshot, its speed-up measured
    (with ``--target-speedup``)."""
    state.removed = state.removed + record.removed
    state.state_dict = cpu_state(candidate)
    if is_main_process():
        snapshot = {"removed": state.removed, "state_dict": state.state_dict}
        save_torch(snapshot, snapshot_path(run.out_dir, record.round))
    if run.probe is not None and run.cfg.target_speedup is not None:
        record.speedup = run.probe(candidate)
        info(f"shipped model now at least ×{record.speedup:.2f} at 95 % (target ×{run.cfg.target_speedup:.2f})")
    return candidate


def _result(current: fx.GraphModule, state: LoopState, resumed: int, groups: FoldGroups | None,
            stopped: str) -> LoopResult:
    kept = [r for r in state.history if r["within_budget"]]
    summary = [] if groups is None else [asdict(g) for g in groups.candidates(set())]
    return LoopResult(current.eval(), state.removed, state.base_top1, kept[-1]["val_top1"] if kept else state.base_top1,
                      [RoundRecord(**r) for r in state.history], state.entropy0, resumed, summary, state.base_ppl,
                      kept[-1].get("val_ppl") if kept else state.base_ppl, stopped)


def _bound_text(task: Task, change: PairedChange) -> str:
    unit = "% perplexity" if task.metric == "ppl" else " points"
    if change.confidence == 0:
        return f"observed {change.bound:+.2f}{unit}"
    return f"worst {change.bound:+.2f}{unit} at {change.confidence:.0%}"


def _warn_unresolvable(cfg: LoopConfig, task: Task, accuracy: float, n: int) -> None:
    """Say before the first round when the val samples are too few for the budget to be judged at the asked
    confidence: every round would then be reverted, or (at confidence 0) kept on noise."""
    if task.metric != "top1" or cfg.confidence == 0:
        return
    margin, needed = resolvable_drop(accuracy, n, cfg.confidence)
    if margin >= cfg.max_drop:
        info(f"[yellow]the {n} val samples the rounds are judged on cannot resolve --max-drop {cfg.max_drop:g} at "
             f"--confidence {cfg.confidence:g}: their paired bound adds about {margin:.2f} points to every observed "
             f"drop, so few or no rounds can be kept; about {needed} would bring that to 0.5 (or lower --confidence, "
             "at the risk of exceeding the budget on unseen data)[/]")
