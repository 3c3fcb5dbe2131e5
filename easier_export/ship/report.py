"""The compression report: model statistics, the summary table, report.json/report.md and plots.

The report dict is a stable contract (``docs/report_schema.md``); ``validate_report`` checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.table import Table
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from easier_export.core.io import atomic_write, save_json

from .bench import config_key, noisy_pair, speedups
from .export import VerifyResult, eval_copy, verify_lines

SCHEMA_VERSION = 2
BASELINE_LABEL = "original"
COMPRESSED_LABELS = ("folded", "linearized")  # the first one benchmarked stands for "compressed"

# ---------------------------------------------------------------------------------------------- model stats

_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV_TRANSPOSE = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_LINEAR = {F.linear}
# nn.ReLU6 runs as F.hardtanh(x, 0, 6); Tensor methods reach __torch_function__ as the method itself.
_RECTIFIERS = {
    F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6, F.hardtanh, F.hardtanh_,
    F.gelu, F.silu, F.leaky_relu, F.leaky_relu_, F.hardswish,
}


class _StatsMode(TorchFunctionMode):
    """Sees every torch-level call of one forward: counts MACs and rectifiers, and tags each tensor with the
    longest conv/linear chain that produced it (functional ops, residual adds and reshapes included)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.macs = 0
        self.activations = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        depth = max((self.depth.get(t, 0) for t in _tensors((args, kwargs))), default=0)
        if func in _CONV or func in _CONV_TRANSPOSE or func in _LINEAR:
            depth += 1
            self.macs += _macs(func, args, kwargs, out)
        elif func in _RECTIFIERS:
            self.activations += 1
        for t in _tensors(out):
            self.depth[t] = depth
        return out


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _macs(func: Callable, args: tuple, kwargs: dict, out: Tensor) -> int:
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    if func in _LINEAR:
        return out.numel() * weight.shape[-1]
    # conv weight: (out, in/groups, *k), each output element takes in/groups * prod(k) MACs;
    # transposed conv weight: (in, out/groups, *k), each *input* element scatters that many.
    per_element = math.prod(weight.shape[1:])
    return (x if func in _CONV_TRANSPOSE else out).numel() * per_element


def model_stats(model: nn.Module, example: Tensor) -> dict:
    """Per-sample size and cost of ``model`` at ``example``'s input size.

    - ``params``: parameter count.
    - ``flops``: 2 x the multiply-accumulates of conv and linear ops (attention matmuls are not counted).
    - ``conv_linear_depth``: the longest chain of conv/linear ops on any path from input to output.
    - ``activations``: rectifier calls executed (ReLU, ReLU6, GELU, SiLU, LeakyReLU, Hardswish).
    """
    model = eval_copy(model, example.device)
    mode = _StatsMode()
    with torch.no_grad(), mode:
        out = model(example)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": 2 * mode.macs // max(example.shape[0], 1),
        "conv_linear_depth": max((mode.depth.get(t, 0) for t in _tensors(out)), default=0),
        "activations": mode.activations,
    }


# ---------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Nullable:
    spec: Any


NUM = (int, float)
_STATS = {"top1": (int, float, type(None)), "activations": int, "params": int, "flops": int,
          "conv_linear_depth": int, "onnx_bytes": (int, type(None))}
_BENCH_ROW = {"label": str, "backend": str, "provider": str, "device": str, "batch": int, "threads": int,
              "p50_ms": NUM, "p90_ms": NUM, "mean_ms": NUM, "iters": int,
              "versions": {"onnxruntime": str, "torch": str}, "cpu": str}
REPORT_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "tool": {"name": str, "version": str},
    "model": {"source": str, "input_size": [int], "num_classes": int},
    "settings": dict,
    "original": _STATS,
    "compressed": {**_STATS, "removed": [str]},
    "entropy": [{"name": str, "op": str, "units": int, "entropy": NUM, "removed_round": (int, type(None))}],
    "rounds": [{"round": int, "removed": [str], "entropy": NUM, "val_top1": NUM, "delta": NUM,
                "within_budget": bool, "seconds": NUM, "us_saved": (int, float, type(None)),
                "speedup": (int, float, type(None))}],
    "rejected": [{"round": int, "removed": [str], "val_top1": NUM}],
    "groups": [{"sites": [str], "us_saved": NUM, "detail": str, "entropy": NUM}],
    "folds": [{"kind": str, "nodes": [str], "detail": str, "applied": bool, "reason": str,
               "us_before": (int, float, type(None)), "us_after": (int, float, type(None))}],
    "export": _Nullable({"path": str, "exporter": str, "opset": int, "simplified": bool, "notes": [str],
                         "size_bytes": int, "nodes": int, "op_counts": dict}),
    "verify": _Nullable({"max_abs": NUM, "mean_abs": NUM, "top1_agree": NUM, "batches": int, "passed": bool,
                         "reason": str, "atol": NUM, "rtol": NUM, "min_top1": NUM, "violations": int}),
    "bench": [_BENCH_ROW],
    "outputs": dict,
}
"""Required keys and their types: a dict lists required keys (extra keys are allowed), ``[spec]`` is a list
of ``spec``, a type or tuple of types is a leaf (``int`` rejects ``bool``; numbers may be int or float)."""


def validate_report(report: Any) -> list[str]:
    """Problems with ``report`` against ``REPORT_SCHEMA``, one readable line each; [] means valid."""
    problems: list[str] = []
    _check(report, REPORT_SCHEMA, "", problems)
    if isinstance(report, dict) and report.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        problems.append(f"schema_version: expected {SCHEMA_VERSION}, got {report['schema_version']!r}")
    for part in ("original", "compressed"):
        top1 = report.get(part, {}).get("top1") if isinstance(report, dict) else None
        if isinstance(top1, NUM) and not 0 <= top1 <= 100:
            problems.append(f"{part}.top1: expected a percentage in [0, 100], got {top1}")
    return problems


def _check(value: Any, spec: Any, where: str, problems: list[str]) -> None:
    if isinstance(spec, _Nullable):
        if value is not None:
            _check(value, spec.spec, where, problems)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where or 'report'}: expected an object, got {type(value).__name__}")
            return
        for key, sub in spec.items():
            path = f"{where}.{key}" if where else key
            if key in value:
                _check(value[key], sub, path, problems)
            else:
                problems.append(f"{path}: missing key {key!r}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]", problems)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{where}: expected {names}, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- summary


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def _change(before: int | None, after: int | None, absolute: bool) -> str:
    """Relative change, led by the absolute difference for small counts where "-3" says more than "-12%"."""
    if before is None or after is None:
        return ""
    rel = f"{(after - before) / before:+.1%}" if before else ""
    if not absolute:
        return rel
    return f"{after - before:+,}" + (f" ({rel})" if rel else "")


def _compressed_label(rows: list[dict]) -> str | None:
    labels = {r["label"] for r in rows}
    return next((label for label in COMPRESSED_LABELS if label in labels), None)


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, original, compressed, change) lines shared by the console table and report.md."""
    orig, comp = report["original"], report["compressed"]
    top1_change = f"{comp['top1'] - orig['top1']:+.2f} pp" if None not in (orig["top1"], comp["top1"]) else ""
    rows = [("top-1 (%)", _fmt_top1(orig["top1"]), _fmt_top1(comp["top1"]), top1_change)]
    if "ppl" in orig and "ppl" in comp:  # language models: the budget metric
        rows.append(("perplexity", f"{orig['ppl']:.3f}", f"{comp['ppl']:.3f}",
                     f"{comp['ppl'] / orig['ppl'] - 1:+.1%}"))
    for key, name, unit, absolute in (("activations", "activations", "", True),
                                      ("conv_linear_depth", "conv/linear depth", "", True),
                                      ("params", "params", "", False), ("flops", "FLOPs", "", False),
                                      ("onnx_bytes", "ONNX size", "B", False)):
        before, after = orig[key], comp[key]
        rows.append((name, _si(before, unit), _si(after, unit), _change(before, after, absolute)))

    shipped = report.get("shipped")
    if shipped is not None:
        what = "the original" if shipped["round"] == 0 else f"round {shipped['round']}"
        rows.append(("shipped", "", f"{what}, fold {shipped['fold']}", shipped["reason"]))
    bench = report.get("bench") or []
    label = _compressed_label(bench)
    if label:
        ratios = speedups(bench, BASELINE_LABEL)
        p50 = {(r["label"], *config_key(r)): r["p50_ms"] for r in bench}
        for key in sorted(ratios):
            if label in ratios[key] and _headline(bench, key, label, ratios[key][label]):
                backend, device, batch = key
                noisy = " (noisy: repeats disagree)" if noisy_pair(bench, (label, *key), BASELINE_LABEL) else ""
                rows.append((f"p50 latency {backend} {device} b{batch} (ms, {label})",
                             f"{p50[(BASELINE_LABEL, *key)]:.3f}", f"{p50[(label, *key)]:.3f}",
                             f"×{ratios[key][label]:.2f} speed-up{noisy}"))
    return rows


def _headline(bench: list[dict], key: tuple[str, str, int], label: str, ratio: float) -> bool:
    """Whether a speed-up belongs in the summary: onnxruntime's always (what ships); PyTorch eager's, a reference
    only, when both rows are steady and it stands out of their spread (an eager model under contention reads
    ×1.5-×5 on an unchanged model). The bench table lists every row."""
    if key[0] != "torch":
        return True
    if noisy_pair(bench, (label, *key), BASELINE_LABEL):
        return False
    spread = max(r.get("spread", 0.0) for r in bench if config_key(r) == key and r["label"] in (label, BASELINE_LABEL))
    return abs(ratio - 1) > spread


def _fmt_top1(top1: float | None) -> str:
    return "–" if top1 is None else f"{top1:.2f}"


ROUND_COLUMNS = ("round", "removed", "replaced by", "entropy", "saves µs", "val top-1", "delta", "within budget",
                 "seconds")


def round_rows(report: dict) -> list[list[str]]:
    """One row per EASIER round, shared by the console and report.md."""
    return [[str(r["round"]), ", ".join(r["removed"]), _stand_ins(r), f"{r['entropy']:.4g}", _us(r.get("us_saved")),
             f"{r['val_top1']:.2f}",
             f"{r['delta']:+.2f}", _yes(r["within_budget"]), f"{r['seconds']:.1f}"] for r in report["rounds"]]


def _stand_ins(round_row: dict) -> str:
    """What replaced the round's activations (``--substitute``; why a fit was refused is in report.json)."""
    kinds = [v.split(":")[0] for v in (round_row.get("stand_ins") or {}).values()]
    return ", ".join(dict.fromkeys(kinds)) or "identity"


def rounds_table(report: dict) -> Table:
    table = Table(*ROUND_COLUMNS, title="EASIER rounds")
    for row in round_rows(report):
        table.add_row(*row)
    return table


def summary_table(report: dict) -> Table:
    table = Table(title=f"{report['model']['source']}: original vs compressed")
    for name, justify in (("metric", "left"), ("original", "right"), ("compressed", "right"),
                          ("change", "right")):
        table.add_column(name, justify=justify)
    for row in summary_rows(report):
        table.add_row(*row)
    return table


# ---------------------------------------------------------------------------------------------- plots


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
    return None if fig is None else atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))


def bench_table(rows: list[dict], baseline: str) -> Table:
    """p50/p90 per model and setting with the speed-up over ``baseline`` (the `bench` command)."""
    ratios = speedups(rows, baseline)
    table = Table("model", "backend", "device", "batch", "p50 ms", "p90 ms", "spread", f"speed-up vs {baseline}",
                  title="latency")
    for r in rows:
        ratio = ratios.get(config_key(r), {}).get(r["label"])
        speedup = "–" if ratio is None else f"×{ratio:.2f}"
        if ratio is not None and noisy_pair(rows, (r["label"], *config_key(r)), baseline):
            speedup += " (noisy)"
        table.add_row(r["label"], r["provider"], r["device"], str(r["batch"]), f"{r['p50_ms']:.3f}",
                      f"{r['p90_ms']:.3f}", spread_text(r), speedup)
    return table


def spread_text(row: dict) -> str:
    """The spread of a row's repeat medians, flagged when over ``NOISY_SPREAD`` ("–" for older reports)."""
    if "spread" not in row:
        return "–"
    return f"{row['spread']:.0%}" + (" noisy" if row["noisy"] else "")


# ---------------------------------------------------------------------------------------------- writing


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write the plots, report.md and report.json (with ``outputs`` listing them); returns the paths."""
    out_dir = Path(out_dir)
    outputs = dict(report.get("outputs") or {})
    written = []
    for key, (name, plot) in PLOTS.items():
        fig = plot(report)
        if fig is not None:
            # the temp file has no .png suffix, hence the explicit format
            written.append(atomic_write(out_dir / name, lambda p, f=fig: f.savefig(p, format="png", dpi=120)))
            outputs[key] = name
    outputs.update(report_md="report.md", report_json="report.json")
    report = {**report, "outputs": outputs}
    written.append(atomic_write(out_dir / "report.md", lambda p: p.write_text(render_markdown(report))))
    written.append(save_json(report, out_dir / "report.json"))
    return written


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str("–" if c is None else c).replace("|", "\\|") for c in row] for row in rows]
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(r)} |" for r in cells),
            ""]


def render_markdown(report: dict) -> str:
    """report.md: the same numbers as the console table, plus rounds, folds, verification and timings."""
    model = report["model"]
    lines = [f"# EASIER compression report: {model['source']}", "",
             f"Input {'×'.join(map(str, model['input_size']))}, {model['num_classes']} classes; "
             f"{report['tool']['name']} {report['tool']['version']}.", "", "## Summary", ""]
    lines += _md_table(["metric", "original", "compressed", "change"], list(map(list, summary_rows(report))))
    removed = report["compressed"].get("removed") or []
    lines += [f"Removed call sites ({len(removed)}): {', '.join(f'`{n}`' for n in removed) or 'none'}", ""]

    if report.get("rounds"):
        lines += ["## Rounds", ""]
        lines += _md_table(list(ROUND_COLUMNS), round_rows(report))
    if report.get("groups"):
        lines += ["## Fold groups", "", "Activations whose joint removal completes a merge, with the merge's "
                  "measured saving (batch 1, in context) and the group's summed entropy at round 0.", ""]
        lines += _md_table(["sites", "entropy", "µs saved", "merge"],
                           [[", ".join(g["sites"]), f"{g['entropy']:.3f}", _us(g["us_saved"]), g["detail"]]
                            for g in report["groups"]])
    if report.get("folds"):
        lines += ["## Folds", ""]
        lines += _md_table(["kind", "nodes", "detail", "applied", "reason", "µs before", "µs after"],
                           [[f["kind"], ", ".join(f["nodes"]), f["detail"], _yes(f["applied"]),
                             f["reason"], _us(f["us_before"]), _us(f["us_after"])] for f in report["folds"]])
    if report.get("verify"):
        lines += ["## Verification", ""]
        result = VerifyResult(**report["verify"])
        lines += [f"- {'✓' if ok else '✗'} {text}" for ok, text in verify_lines(result)]
        lines += [f"- **{'passed' if result.passed else 'FAILED: ' + result.reason}**", ""]
    if report.get("bench"):
        bench = report["bench"]
        versions = bench[0]["versions"]
        lines += ["## Latency", "", f"CPU: {bench[0]['cpu']}; onnxruntime {versions['onnxruntime']}, "
                  f"torch {versions['torch']}.", ""]
        lines += _md_table(["label", "backend", "provider", "device", "batch", "threads", "p50 ms", "p90 ms",
                            "mean ms", "iters", "spread"],
                           [[r["label"], r["backend"], r["provider"], r["device"], r["batch"], r["threads"],
                             f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['mean_ms']:.3f}", r["iters"],
                             spread_text(r)] for r in bench])
    plots = [(key, name) for key, (name, _) in PLOTS.items() if key in report.get("outputs", {})]
    if plots:
        lines += ["## Plots", ""] + [f"![{key.removeprefix('plot_')}]({name})" for key, name in plots] + [""]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _us(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"
