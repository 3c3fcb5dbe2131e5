"""The console tables and the summary rows that report.md shares with them: what a user reads first."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from .bench import config_key, noisy_pair, speedups

BASELINE_LABEL = "original"
COMPRESSED_LABELS = ("folded", "linearized")  # the first one benchmarked stands for "compressed"


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
    precision = report.get("precision") or {}
    if precision.get("asked", "fp32") != "fp32":
        rows.append(("precision", "FP32", precision["shipped"].upper(), precision["reason"]))
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
        rows += converted_rows(bench, ratios, p50)
    return rows


def converted_rows(bench: list[dict], ratios: dict, p50: dict) -> list[tuple[str, str, str, str]]:
    """The compressed model in each converted precision (``folded-int8``...): its speed-up over the FP32
    original (compound) and over the original in the same precision (marginal: what depth reduction adds)."""
    rows = []
    for label in sorted({r["label"] for r in bench if r["label"].startswith("folded-")}):
        precision = label.removeprefix("folded-")
        for key in sorted(k for k in ratios if k[0] == "onnxruntime" and label in ratios[k]):
            _, device, batch = key
            change = f"×{ratios[key][label]:.2f} vs FP32 original"
            same = p50.get((f"original-{precision}", *key))
            if same is not None:
                change += f"; ×{same / p50[(label, *key)]:.2f} vs {precision.upper()} original"
            rows.append((f"p50 latency onnxruntime {device} b{batch} (ms, compressed {precision.upper()})",
                         f"{p50[(BASELINE_LABEL, *key)]:.3f}", f"{p50[(label, *key)]:.3f}", change))
    return rows


def _headline(bench: list[dict], key: tuple[str, str, int], label: str, ratio: float) -> bool:
    """Whether a speed-up belongs in the summary: onnxruntime's always (what ships); PyTorch eager's, a reference
    only, when both rows are steady and it stands out of their spread (eager timings move with contention far
    more than onnxruntime's). The bench table lists every row."""
    if key[0] != "torch":
        return True
    if noisy_pair(bench, (label, *key), BASELINE_LABEL):
        return False
    spread = max(r["spread"] for r in bench if config_key(r) == key and r["label"] in (label, BASELINE_LABEL))
    return abs(ratio - 1) > spread


def _fmt_top1(top1: float | None) -> str:
    return "–" if top1 is None else f"{top1:.2f}"


ROUND_COLUMNS = ("round", "removed", "replaced by", "entropy", "saves µs", "val top-1", "delta", "within budget",
                 "seconds")


def round_rows(report: dict) -> list[list[str]]:
    """One row per EASIER round, shared by the console and report.md."""
    return [[str(r["round"]), ", ".join(r["removed"]), _stand_ins(r), f"{r['entropy']:.4g}", micros(r.get("us_saved")),
             f"{r['val_top1']:.2f}",
             f"{r['delta']:+.2f}", yes_no(r["within_budget"]), f"{r['seconds']:.1f}"] for r in report["rounds"]]


def _stand_ins(round_row: dict) -> str:
    """What replaced the round's activations (``--substitute``; why a fit was refused is in report.json)."""
    kinds = [v.split(":")[0] for v in (round_row.get("stand_ins") or {}).values()]
    return ", ".join(dict.fromkeys(kinds)) or "identity"


def rounds_table(report: dict) -> Table:
    table = Table(*ROUND_COLUMNS, title="EASIER rounds")
    for row in round_rows(report):
        table.add_row(*row)
    return table


def print_rounds(report: dict, console: Console) -> None:
    """The rounds table where the console is wide enough to show it whole; on a narrow terminal or in a log,
    where every cell would be cut to a few letters, a pointer to the round lines printed above and report.md."""
    table = rounds_table(report)
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    if needed <= console.width:
        console.print(table)
    else:
        console.print(f"rounds: one line each above; the table ({needed} columns wide) is in report.md")


def summary_table(report: dict) -> Table:
    table = Table(title=f"{report['model']['source']}: original vs compressed")
    for name, justify in (("metric", "left"), ("original", "right"), ("compressed", "right"),
                          ("change", "right")):
        table.add_column(name, justify=justify)
    for row in summary_rows(report):
        table.add_row(*row)
    return table


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
    """The spread of a row's repeat medians, flagged when over ``NOISY_SPREAD``."""
    return f"{row['spread']:.0%}" + (" noisy" if row["noisy"] else "")



def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def micros(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"
