"""The report's plots: entropy per call site, accuracy per round, latency per setting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from easier_export.core.io import atomic_write

from .bench import config_key


def _entropy_plot(report: dict) -> Figure | None:
    sites = report.get("entropy") or []
    if not sites:
        return None
    fig = Figure(figsize=(max(6.0, 0.3 * len(sites)), 4.5), layout="constrained")
    ax = fig.subplots()
    removed = [s["removed_round"] is not None for s in sites]
    ax.bar(range(len(sites)), [s["entropy"] for s in sites],
           color=["tab:red" if r else "tab:grey" for r in removed])
    ax.set_xticks(range(len(sites)), [s["name"] for s in sites], rotation=90, fontsize=7)
    ax.set_ylabel("entropy at round 0")
    ax.set_title("Rectifier entropy per call site (red: removed)")
    return fig


def _accuracy_plot(report: dict) -> Figure | None:
    rounds = report.get("rounds") or []
    if not rounds:
        return None
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([r["round"] for r in rounds], [r["val_top1"] for r in rounds], marker="o", label="val top-1")
    base = report["original"]["top1"]
    max_drop = report.get("settings", {}).get("max_drop")
    if base is not None:
        ax.axhline(base, color="tab:green", linestyle=":", label="original")
        if max_drop is not None:
            ax.axhline(base - max_drop, color="tab:red", linestyle="--", label=f"budget (−{max_drop})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("top-1 (%)")
    ax.legend()
    return fig


def _latency_plot(report: dict) -> Figure | None:
    rows = report.get("bench") or []
    if not rows:
        return None
    configs = sorted({config_key(r) for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    p50 = {(r["label"], *config_key(r)): r["p50_ms"] for r in rows}
    width = 0.8 / len(labels)
    fig = Figure(figsize=(max(6.0, 1.2 * len(configs) * len(labels) / 2), 4.0), layout="constrained")
    ax = fig.subplots()
    for i, label in enumerate(labels):
        ax.bar([c + i * width for c in range(len(configs))], [p50.get((label, *k), 0.0) for k in configs],
               width, label=label)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(configs))],
                  [f"{b}\n{d} b{n}" for b, d, n in configs], fontsize=8)
    ax.set_ylabel("p50 latency (ms)")
    ax.legend()
    return fig


PLOTS: dict[str, tuple[str, Callable[[dict], Figure | None]]] = {
    "plot_entropy": ("entropy.png", _entropy_plot),
    "plot_accuracy": ("accuracy.png", _accuracy_plot),
    "plot_latency": ("latency.png", _latency_plot),
}


def plot_entropy(sites: list[dict], path: Path) -> Path | None:
    """The entropy bar chart alone (the `entropy` command), from its per-site rows."""
    fig = _entropy_plot({"entropy": sites})
    return None if fig is None else save_png(fig, path)



def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` atomically (the temp file has no .png suffix, hence the explicit format)."""
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
