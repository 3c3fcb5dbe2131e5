"""The EASIER loop (steps 3-4): remove the least non-linear call site, finetune, validate, repeat.

After every round the full state (weights of the last model within budget, removed set, history) is written
atomically; the same command rerun continues after the last finished round, and because every round seeds
itself from (seed, round) the resumed history is the one an uninterrupted run would have written.
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import fx

from easier_export.core.console import info, progress
from easier_export.core.dist import is_main_process
from easier_export.core.errors import UserError, first_line
from easier_export.core.io import save_torch
from easier_export.core.stats import (
    PairedChange,
    held_out,
    paired_accuracy_change,
    paired_ppl_change,
    resolvable_drop,
)
from easier_export.fold.groups import FoldGroups, Group, find_groups
from easier_export.fold.planner import LatencyTable
from easier_export.trace.graph import (
    ALL_RECTIFIERS,
    AffineFit,
    CallSite,
    blend_sites,
    fade,
    find_call_sites,
    remove_sites,
    settle,
)

from .affine import SUBSTITUTES, stand_ins
from .criteria import STUDY_CRITERIA, entropy_regularised, study_scores
from .entropy import SiteStats, measure
from .train import OPTIMIZERS, Teacher, evaluate_metrics, finetune, seed_everything, warn_near_chance

STATE_FILE = "state.pt"
# When to stop, not what a round computes: a resumed run may change them (e.g. raise --max-rounds to go on)
STOP_RULES = ("max_removed", "max_rounds", "patience", "target_speedup")
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
                                       "layerfold, egp; see easier_export/criteria.py)",
                            choices=("entropy", "sparsity", "random", *STUDY_CRITERIA))
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
                                    "least score per microsecond saved on --target", choices=SELECTIONS)
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
    target_speedup: float | None = option(None, "stop once the shipped model measures at least this ORT speed-up "
                                                "over the original on --target", positive=True)

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
    speedup: float | None = None  # with a target speed-up: the shipped model measured end to end
    val_ppl: float | None = None  # language models: validation perplexity (the budget metric)
    stand_ins: dict[str, str] | None = None  # --substitute affine: per site "affine", or "identity: why"
    change: dict | None = None  # the paired change against the original and its bound (stats.PairedChange)
    holdout: dict | None = None  # the same on the held-out val samples (judged only when shipping)


STATE_FORMAT = 2
"""Version of state.pt: a file of another version is refused (the tool keeps no reader for older formats)."""
SNAPSHOTS = "rounds"
"""Folder of the weights after each kept round, so that shipping can step back to an earlier round."""


@dataclass
class LoopState:
    """Everything needed to continue: written after each round."""

    fingerprint: dict
    base_top1: float
    format: int = 0  # a file without it predates versioning
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


# --- scoring: lower = removed first ------------------------------------------------------------------
def _entropy(stats: SiteStats) -> float:
    return stats.entropy


def _sparsity(stats: SiteStats) -> float:
    """Share of the minority state (ON or OFF): 0 for a unit that never switches."""
    return float(torch.minimum(stats.p_on, 1 - stats.p_on).mean()) if stats.units else 0.0


CRITERIA: dict[str, Callable[[SiteStats], float]] = {"entropy": _entropy, "sparsity": _sparsity}


def score_sites(gm: fx.GraphModule, sites: list[CallSite], loader, device: torch.device, cfg: LoopConfig,
                round_seed: int, pad_id: int | None = None) -> tuple[dict[str, float], dict[str, SiteStats]]:
    if cfg.criterion == "random":
        gen = torch.Generator().manual_seed(round_seed)
        return {s.name: float(v) for s, v in zip(sites, torch.rand(len(sites), generator=gen), strict=True)}, {}
    total = cfg.entropy_batches if cfg.entropy_batches is not None else len(loader)
    with progress("entropy", min(total, len(loader))) as advance:
        stats = measure(gm, sites, loader, device, cfg.entropy_batches, cfg.entropy_mode == "train",
                        cfg.threshold, advance, pad_id)
    if cfg.criterion in STUDY_CRITERIA:
        return study_scores(cfg.criterion, gm, sites, stats, loader, device, cfg.entropy_batches,
                            cfg.entropy_mode == "train", cfg.threshold), stats
    return {name: CRITERIA[cfg.criterion](s) for name, s in stats.items()}, stats


def pick(scores: dict[str, float], cfg: LoopConfig, already: int) -> list[str]:
    """The lowest-scoring site, or every exactly-zero one at once; K lowest in one-shot mode."""
    order = sorted(scores, key=lambda n: (scores[n], n))
    budget = cfg.budget(already)
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


def _input_shape(loader) -> list[int]:
    """One input's shape ((C, H, W) or (sequence length,)): recorded so that a refused resume can name it."""
    ds = loader.dataset
    return list(ds[0][0].shape) if len(ds) else []


def _fingerprint(gm: fx.GraphModule, source: str, cfg: LoopConfig, train_loader, val_loader) -> dict:
    return {"source": source, **asdict(cfg), "weights": _digest(gm), "removed_before": gm.meta.get("removed", []),
            "train": _data_id(train_loader), "val": _data_id(val_loader), "input_size": _input_shape(val_loader)}


def changed_settings(stored: dict, current: dict) -> list[str]:
    """Fingerprint keys that differ, stop rules aside. A LoopConfig setting the stored run did not record (written
    before that option existed) counts as the option's default: that run behaved as the default does, so a newer
    version still resumes it. Another key it did not record (``input_size``) is checked through what it shapes
    (the data's transform)."""
    defaults = {f.name: f.default for f in fields(LoopConfig)}
    unrecorded = object()
    return sorted(k for k in current if k not in STOP_RULES
                  and (old := stored.get(k, defaults.get(k, unrecorded))) is not unrecorded and old != current[k])


def _in_words(changed: list[str], stored: dict, current: dict) -> str:
    """The changed settings, with the input size spelled out; the data's transform (and a text model's count of
    blocks) that a new input size changes is not named again."""
    parts = []
    for key in changed:
        if key == "input_size":
            parts.append(f"input size {'x'.join(map(str, current[key]))}, was {'x'.join(map(str, stored[key]))}")
        elif key in ("train", "val"):
            differ = [f for f in current[key] if stored[key].get(f) != current[key][f]
                      and not ("input_size" in changed and f in ("transform", "size"))]
            parts += [f"{key} data ({', '.join(differ)})"] if differ else []
        else:
            parts.append(key)
    return "; ".join(parts)


def load_state(out_dir: Path, fingerprint: dict) -> LoopState | None:
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = LoopState(**torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # empty, truncated or foreign: torch and the dataclass raise many types
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {first_line(e)}); delete it to start over") from e
    if state.format != STATE_FORMAT:
        raise UserError(f"{path} was written by another version of easier-export (state format {state.format}, "
                        f"this one reads {STATE_FORMAT}); use another --out or delete it to start over")
    changed = changed_settings(state.fingerprint, fingerprint)
    if changed:
        raise UserError(f"{path} was written with different settings "
                        f"({_in_words(changed, state.fingerprint, fingerprint)}); use another --out or delete it to "
                        "start over")
    return state


def save_state(out_dir: Path, state: LoopState) -> None:
    if is_main_process():
        save_torch(asdict(state), out_dir / STATE_FILE)


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def risk(group: Group, scores: dict[str, float]) -> float:
    """A group's accuracy risk: its summed site scores (entropy by default)."""
    return sum(scores[s] for s in group.sites)


def pick_group(scores: dict[str, float], groups: FoldGroups, removed: list[str], rejected: list[list[str]],
               budget: int) -> tuple[list[str], float] | None:
    """The paying fold group with the least accuracy risk, and its measured saving.

    risk = the sum of the group's site scores (entropy by default). The saving decides which groups are offered
    (only those whose merge measured faster beyond the noise), not their order: on a small VM the same merge
    measures 8.5 us in one run and 9.7 in the next, enough to reorder groups whose risk per microsecond differs by
    1 % and so change what the budget admits (benchmarks/promise.md). Groups rejected before, larger than the
    removal budget, or touching a rejected site are never offered.
    """
    banned = {tuple(sorted(r)) for r in rejected}
    offered = [g for g in groups.candidates(set(removed), allowed=set(scores))
               if tuple(sorted(g.sites)) not in banned and len(g.sites) <= budget]
    if not offered:
        return None
    best = min(offered, key=lambda g: (risk(g, scores), g.sites))
    return list(best.sites), best.us_saved


def rejected(history: list[dict]) -> list[list[str]]:
    """Candidates whose round went over budget (reverted): never tried again."""
    return [r["removed"] for r in history if not r["within_budget"]]


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


def _choose(scores: dict[str, float], cfg: LoopConfig, state: LoopState,
            groups: FoldGroups | None) -> tuple[list[str], float | None]:
    """This round's removal (empty: nothing left to try) and, for a fold group, its measured saving."""
    tried = rejected(state.history)
    banned = {name for r in tried for name in r} if cfg.select == "entropy" else set()
    open_scores = {n: v for n, v in scores.items() if n not in banned}
    if groups is None:
        return pick(open_scores, cfg, len(state.removed)) if open_scores else [], None
    picked = pick_group(open_scores, groups, state.removed, tried, cfg.budget(len(state.removed)))
    return picked if picked is not None else ([], None)


def _regularised(gm: fx.GraphModule, sites: list[CallSite], loader, device: torch.device,
                 cfg: LoopConfig) -> fx.GraphModule:
    """``--entropy-reg``: a copy finetuned with the soft-entropy penalty (``gm`` stays as it is if reverted)."""
    with progress("finetune with entropy penalty", math.ceil(cfg.finetune_epochs * len(loader))) as advance:
        return entropy_regularised(gm, sites, loader, device, cfg.finetune_epochs, cfg.lr, cfg.entropy_reg,
                                   cfg.entropy_tau, cfg.threshold, advance, cfg.optimizer)


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


def _stand_ins(gm: fx.GraphModule, chosen: list[str], loader, device: torch.device, cfg: LoopConfig,
               pad_id: int | None) -> tuple[dict[str, AffineFit], dict[str, str] | None]:
    """``--substitute affine``: the chosen sites' fitted stand-ins, and what each site got (for the report)."""
    if cfg.substitute == "identity":
        return {}, None
    fits, refused = stand_ins(gm, chosen, loader, device, cfg.entropy_batches, cfg.entropy_mode == "train", pad_id)
    for name, why in refused.items():
        info(f"{name}: the identity stands in ({why})")
    return fits, {name: "affine" if name in fits else f"identity: {refused[name]}" for name in chosen}


def measure_groups(gm: fx.GraphModule, cfg: LoopConfig, example: torch.Tensor, table: LatencyTable) -> FoldGroups:
    """Fold groups of the model among its in-graph call sites of ``cfg.rectifiers``, timed on the table's target
    (the loop keeps them in its state: resume re-times nothing)."""
    model = copy.deepcopy(gm).cpu().eval()
    sites = [s.name for s in find_call_sites(model, cfg.rectifiers) if s.in_graph]
    info(f"timing the merges that {len(sites)} activation call sites could unlock (fold groups)")
    return find_groups(model, sites, example.cpu(), table)


def snapshot_path(out_dir: Path, rnd: int) -> Path:
    """Where the weights after kept round ``rnd`` are kept."""
    return Path(out_dir) / SNAPSHOTS / f"round-{rnd:03d}.pt"


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


def run_loop(gm: fx.GraphModule, source: str, train_loader, val_loader, cfg: LoopConfig, device: torch.device,
             out_dir: Path, table: LatencyTable | None = None,
             probe: Callable[[fx.GraphModule], float] | None = None, task: Task = Task()) -> LoopResult:
    """Iteratively linearize ``gm`` (the traced original) within the budget on ``task``'s metric.

    ``table`` times fold groups for latency selection (default: CPU, cached in ``out_dir``); ``probe`` measures
    the shipped model's end-to-end speed-up after a kept round (needed for ``target_speedup``).
    """
    fingerprint = _fingerprint(gm, source, cfg, train_loader, val_loader)
    gm = gm.to(device)
    state = load_state(out_dir, fingerprint)
    resumed = 0
    if state is None:
        state = LoopState(fingerprint, 0.0, format=STATE_FORMAT)
        if cfg.baseline_epochs > 0:
            seed_everything(cfg.seed * 100_003, train_loader)
            with progress("finetune original (baseline)", math.ceil(cfg.baseline_epochs * len(train_loader))) as adv:
                finetune(gm, train_loader, device, cfg.baseline_epochs, cfg.lr, on_step=adv,
                         optimizer=cfg.optimizer)
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
    else:
        resumed = len(state.history)
        info(f"resuming from {out_dir / STATE_FILE}: {resumed} round(s) done, removed {len(state.removed)}")
    held = held_out(len(state.base_outcomes["correct"]), cfg.holdout)  # val samples the rounds never see
    if not resumed:
        _warn_unresolvable(cfg, task, state.base_top1, int((~held).sum()))
    if state.baseline is not None:  # the original stays the finetuned baseline on resume too
        gm.load_state_dict(state.baseline)
    if cfg.select == "latency" and state.groups is None:
        example = next(iter(val_loader))[0][:1]
        table = table or LatencyTable("cpu", None, out_dir / "latency_table.json")
        state.groups = measure_groups(gm, cfg, example, table).to_dict()
        save_state(out_dir, state)
    groups = FoldGroups.from_dict(state.groups) if state.groups is not None else None
    teacher = Teacher.frozen(gm, cfg.distill, cfg.distill_temperature) if cfg.distill > 0 else None
    current = remove_sites(gm, state.removed, cfg.relocates) if state.removed else gm
    if state.state_dict is not None:
        current.load_state_dict(state.state_dict)
    current = current.to(device)

    stopped = "the stored run had ended (nothing left to try)" if state.finished else None
    while stopped is None:
        rnd = len(state.history) + 1
        sites = find_call_sites(current, cfg.rectifiers)
        stopped = stop_reason(cfg, state.history, len(state.removed)) or (None if sites else "no activation left")
        if stopped is not None:
            break
        t0 = time.perf_counter()
        round_seed = cfg.seed * 100_003 + rnd
        seed_everything(round_seed, train_loader)
        scored = current if cfg.entropy_reg == 0 else _regularised(current, sites, train_loader, device, cfg)
        scores, stats = score_sites(scored, sites, train_loader, device, cfg, round_seed, task.pad_id)
        if rnd == 1:
            state.entropy0 = [s.to_dict() for s in stats.values()]
        chosen, us_saved = _choose(scores, cfg, state, groups)
        if not chosen:
            stopped = "no candidate left" + (" with a measured saving" if groups is not None else "")
            state.finished = True  # exhausted: no stop rule can reopen it
            save_state(out_dir, state)
            break
        fits, stand_in = _stand_ins(scored, chosen, train_loader, device, cfg, task.pad_id)
        candidate = (blend_sites if cfg.anneal > 0 else remove_sites)(scored, chosen, cfg.relocates, fits).to(device)
        seed_everything(round_seed, train_loader)
        steps = math.ceil(cfg.finetune_epochs * len(train_loader))
        with progress(f"round {rnd}: finetune", steps) as advance:
            on_step = _fader(candidate, cfg.anneal * steps, advance) if cfg.anneal > 0 else advance
            finetune(candidate, train_loader, device, cfg.finetune_epochs, cfg.lr, optimizer=cfg.optimizer,
                     teacher=teacher, on_step=on_step)
        if cfg.anneal > 0:
            candidate = settle(candidate).to(device)
        metrics = evaluate_metrics(candidate, val_loader, device)
        acc, ppl = metrics["top1"], metrics["ppl"] if task.metric == "ppl" else None
        change = task.change(cfg, state.base_outcomes, metrics, ~held)
        within = task.within(cfg, change)
        check = task.change(cfg, state.base_outcomes, metrics, held).to_dict() if bool(held.any()) else None
        record = RoundRecord(rnd, chosen, min(scores[n] for n in chosen), acc, acc - state.base_top1, within,
                             time.perf_counter() - t0, us_saved, val_ppl=ppl, stand_ins=stand_in,
                             change=change.to_dict(), holdout=check)
        saved = f", saves {us_saved:.1f}us" if us_saved is not None else ""
        misses = misses_in_a_row(state.history) + (not within)
        verdict = "kept" if within else f"over budget: reverted ({misses} miss(es) in a row)"
        shown = f"perplexity {ppl:.3f}, " if ppl is not None else ""
        info(f"round {rnd}: removed {', '.join(chosen)} (score {record.score:.3f}{saved}) → {shown}top-1 {acc:.2f}% "
             f"(Δ {record.delta:+.2f}, {_bound_text(task, change)}) {verdict}")
        if within:
            current = candidate
            state.removed = state.removed + chosen
            state.state_dict = cpu_state(current)
            if is_main_process():
                save_torch({"removed": state.removed, "state_dict": state.state_dict}, snapshot_path(out_dir, rnd))
            if probe is not None and cfg.target_speedup is not None:
                record.speedup = probe(current)
                info(f"shipped model now ×{record.speedup:.2f} (target ×{cfg.target_speedup:.2f})")
        state.history.append(asdict(record))
        save_state(out_dir, state)
    info(f"stopped: {stopped}")

    kept = [r for r in state.history if r["within_budget"]]
    summary = [] if groups is None else [asdict(g) for g in groups.candidates(set())]
    return LoopResult(current.eval(), state.removed, state.base_top1, kept[-1]["val_top1"] if kept else state.base_top1,
                      [RoundRecord(**r) for r in state.history], state.entropy0, resumed, summary, state.base_ppl,
                      kept[-1].get("val_ppl") if kept else state.base_ppl, stopped)
