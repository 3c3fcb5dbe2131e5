"""report.md: the console's numbers plus rounds, fold groups, folds, verification, timings and plots."""

from __future__ import annotations

from typing import Any

from .export import VerifyResult, verify_lines
from .plots import PLOTS
from .tables import ROUND_COLUMNS, micros, round_rows, spread_text, summary_rows, yes_no


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
                           [[", ".join(g["sites"]), f"{g['entropy']:.3f}", micros(g["us_saved"]), g["detail"]]
                            for g in report["groups"]])
    if report.get("folds"):
        lines += ["## Folds", ""]
        lines += _md_table(["kind", "nodes", "detail", "applied", "reason", "µs before", "µs after"],
                           [[f["kind"], ", ".join(f["nodes"]), f["detail"], yes_no(f["applied"]),
                             f["reason"], micros(f["us_before"]), micros(f["us_after"])] for f in report["folds"]])
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

