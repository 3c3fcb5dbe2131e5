"""What a round removes: every call site scored by the chosen criterion, then one site (or the K lowest) by
score, or with latency selection the paying fold group of least risk."""

from __future__ import annotations

import copy

import torch
from torch import fx

from easier_export.core.console import info, progress
from easier_export.fold import LatencyTable
from easier_export.fold.groups import FoldGroups, Group, find_groups
from easier_export.trace.sites import CallSite, find_call_sites

from .config import LoopConfig
from .criteria import CRITERIA, Evidence
from .entropy import SiteStats, measure


def score_sites(gm: fx.GraphModule, sites: list[CallSite], loader, device: torch.device, cfg: LoopConfig,
                round_seed: int, pad_id: int | None = None) -> tuple[dict[str, float], dict[str, SiteStats]]:
    """Each site's score by ``cfg.criterion`` (lower = removed first), and the entropy pass it read (empty for
    a criterion that reads none)."""
    criterion = CRITERIA[cfg.criterion]
    stats: dict[str, SiteStats] = {}
    if criterion.counts:
        total = cfg.entropy_batches if cfg.entropy_batches is not None else len(loader)
        with progress("entropy", min(total, len(loader))) as advance:
            stats = measure(gm, sites, loader, device, cfg.entropy_batches, cfg.entropy_mode == "train",
                            cfg.threshold, advance, pad_id)
    evidence = Evidence(gm, sites, loader, device, cfg.entropy_batches, cfg.entropy_mode == "train", cfg.threshold,
                        round_seed, stats)
    return criterion.score(evidence), stats


def pick(scores: dict[str, float], cfg: LoopConfig, already: int) -> list[str]:
    """The lowest-scoring site, or every exactly-zero one at once; K lowest in one-shot mode."""
    order = sorted(scores, key=lambda n: (scores[n], n))
    budget = cfg.budget(already)
    if cfg.one_shot is not None:
        chosen = order[: cfg.one_shot]
    else:
        chosen = [n for n in order if scores[n] == 0.0] or order[:1]
    return chosen[:budget]


def risk(group: Group, scores: dict[str, float]) -> float:
    """A group's accuracy risk: its summed site scores (entropy by default)."""
    return sum(scores[s] for s in group.sites)


def pick_group(scores: dict[str, float], groups: FoldGroups, removed: list[str], rejected: list[list[str]],
               budget: int) -> tuple[list[str], float] | None:
    """The paying fold group with the least accuracy risk, and its measured saving.

    risk = the sum of the group's site scores (entropy by default). The saving decides which groups are offered
    (only those whose merge measured faster beyond the noise), not their order: timings vary from run to run by
    more than the risk per microsecond of close groups differs, and would change what the budget admits
    (benchmarks/promise.md). Groups rejected before, larger than the removal budget, or touching a rejected site
    are never offered.
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


def choose(scores: dict[str, float], cfg: LoopConfig, history: list[dict], removed: list[str],
           groups: FoldGroups | None) -> tuple[list[str], float | None]:
    """This round's removal (empty: nothing left to try) and, for a fold group, its measured saving."""
    tried = rejected(history)
    banned = {name for r in tried for name in r} if cfg.select == "entropy" else set()
    open_scores = {n: v for n, v in scores.items() if n not in banned}
    if groups is None:
        return pick(open_scores, cfg, len(removed)) if open_scores else [], None
    picked = pick_group(open_scores, groups, removed, tried, cfg.budget(len(removed)))
    return picked if picked is not None else ([], None)


def measure_groups(gm: fx.GraphModule, cfg: LoopConfig, example: torch.Tensor, table: LatencyTable) -> FoldGroups:
    """Fold groups of the model among its in-graph call sites of ``cfg.rectifiers``, timed on the table's target
    (the loop keeps them in its state: resume re-times nothing)."""
    model = copy.deepcopy(gm).cpu().eval()
    sites = [s.name for s in find_call_sites(model, cfg.rectifiers) if s.in_graph]
    info(f"timing the merges that {len(sites)} activation call sites could unlock (fold groups)")
    return find_groups(model, sites, example.cpu(), table)
