"""The compression report: ``report.json`` (its contract: ``schema.py``), report.md and the plots, built from
what every stage measured."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from easier_export import __version__
from easier_export.core.io import atomic_write, save_json
from easier_export.load.data import Preprocessing
from easier_export.load.models import LoadedModel

from .markdown import render_markdown
from .plots import PLOTS, save_png
from .schema import SCHEMA_VERSION
from .stats import model_stats

TOOL = "easier-export"


class LoopOutcome(Protocol):
    """What the report reads from the EASIER loop's result (``loop.linearize.LoopResult``)."""

    history: list[Any]  # round records (dataclasses): round, removed, within_budget, score, val_top1...
    entropy0: list[dict]
    groups: list[dict]
    removed: list[str]
    stopped: str
    base_top1: float
    final_top1: float
    base_ppl: float | None
    final_ppl: float | None


def _ppl(value: float | None) -> dict:
    """A language model's perplexity, under ``ppl`` (absent for other models)."""
    return {} if value is None else {"ppl": value}


def build_report(loaded: LoadedModel, settings: dict, result: LoopOutcome, original: nn.Module, folded: nn.Module,
                 example: Tensor, folds: list, exports: dict, bench_rows: list[dict], skipped: list[str],
                 shipment: dict, preprocessing: Preprocessing | None, precision: dict) -> dict:
    """``report.json``'s content: ``result`` as shipped, ``exports`` by label (``original``, ``folded``: what
    ships, with its ``verify``), ``settings`` the run's configuration, ``precision`` which precision ships and
    what each conversion measured (``deploy.Deployment.to_dict``)."""
    removed_round = {name: r.round for r in result.history if r.within_budget for name in r.removed}
    entropy0 = {e["name"]: e["entropy"] for e in result.entropy0}
    shipped = exports["folded"]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL, "version": __version__},
        "model": {"source": loaded.source, "input_size": list(example.shape[1:]),
                  "num_classes": loaded.num_classes},
        "settings": settings,
        "original": {"top1": result.base_top1, **model_stats(original, example),
                     "onnx_bytes": exports["original"]["size_bytes"], **_ppl(result.base_ppl)},
        "compressed": {"top1": result.final_top1, **model_stats(folded, example), "onnx_bytes": shipped["size_bytes"],
                       "removed": result.removed, **_ppl(result.final_ppl)},
        "entropy": [{"name": e["name"], "op": e["op"], "units": e["units"], "entropy": e["entropy"],
                     "removed_round": removed_round.get(e["name"])} for e in result.entropy0],
        "rounds": [{k: v for k, v in asdict(r).items() if k != "score"} | {"entropy": r.score}
                   for r in result.history],
        "rejected": [{"round": r.round, "removed": r.removed, "val_top1": r.val_top1}
                     for r in result.history if not r.within_budget],
        "stopped": result.stopped,
        "groups": [{**g, "sites": list(g["sites"]),
                    "entropy": sum(entropy0.get(s, float("nan")) for s in g["sites"])} for g in result.groups],
        "folds": [f.to_dict() for f in folds],
        "export": {k: v for k, v in shipped.items() if k != "verify"},
        "verify": shipped["verify"],
        "bench": bench_rows,
        "data": {"skipped_images": len(skipped), "skipped": skipped,
                 **({} if preprocessing is None else {"preprocessing": preprocessing.to_dict()})},
        "shipped": shipment,
        "precision": precision,
        **loaded.task.report_section(example),
        "outputs": {"model": Path(shipped["path"]).name, "linearized": "linearized.pt",
                    "report_json": "report.json", "report_md": "report.md"},
    }


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write the plots, report.md and report.json (with ``outputs`` listing them); returns the paths."""
    out_dir = Path(out_dir)
    outputs = dict(report.get("outputs") or {})
    written = []
    for key, (name, plot) in PLOTS.items():
        fig = plot(report)
        if fig is not None:
            written.append(save_png(fig, out_dir / name))
            outputs[key] = name
    outputs.update(report_md="report.md", report_json="report.json")
    report = {**report, "outputs": outputs}
    written.append(atomic_write(out_dir / "report.md", lambda p: p.write_text(render_markdown(report))))
    written.append(save_json(report, out_dir / "report.json"))
    return written
