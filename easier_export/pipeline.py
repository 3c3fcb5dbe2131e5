"""`compress`, stage by stage: EASIER loop → fold → ONNX export → verify → benchmark → report."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from . import __version__
from .bench import bench, speedups
from .data import Loaders
from .errors import UserError, VerificationError, first_line
from .export import MIN_OPSET, eval_copy, export_onnx, mark_unverified, print_verify, verify_onnx
from .fold import FoldRecord, fold_model
from .fold.planner import LatencyTable
from .graph import find_call_sites, trace
from .io import save_torch
from .linearize import LoopConfig, LoopResult, Task, cpu_state, run_loop
from .models import LINEARIZED_FORMAT, LoadedModel
from .report import model_stats, rounds_table, summary_table, write_report
from .text import two_lengths
from .train import is_main_process, resolve_device
from .ui import console, info


@dataclass
class CompressConfig:
    loop: LoopConfig = field(default_factory=LoopConfig)
    fold: str = "auto"
    target: str = "cpu"
    device: str = "auto"
    simplify: bool = True
    opset: int = MIN_OPSET
    atol: float = 1e-4
    rtol: float = 1e-3
    scale_tol: float = 1e-4
    min_top1: float = 0.99
    verify_batches: int = 4
    bench_devices: tuple[str, ...] = ("cpu",)
    bench_batches: tuple[int, ...] = (1, 8)
    threads: int | None = None
    bench_seconds: float = 2.0


def ensure_writable(out_dir: Path) -> Path:
    """Fail at the start, not after an hour of finetuning, when the output folder cannot be written."""
    probe = out_dir / f".write-test-{os.getpid()}"  # per process: torchrun ranks probe at the same time
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"output directory {out_dir} is not writable ({e.strerror})") from e
    return out_dir


def ensure_writable_file(path: Path, option: str) -> Path:
    """Fail before the work when ``path`` cannot be written (a folder there, a parent that is a file or read-only);
    creates nothing, so a refused command leaves nothing behind."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path} cannot be written ({parent} is not a writable directory)")
    return path


def dry_run(model: nn.Module, input_size: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
    """One forward pass at the served size before any work: a size the model cannot take fails in one line."""
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_size, dtype=dtype))
    except Exception as e:  # shape errors surface as RuntimeError, ValueError, AssertionError...
        raise UserError(f"the model does not run on {'x'.join(map(str, input_size))} inputs ({first_line(e)}); "
                        "check --input-size") from e


def check_continuation(loaded: LoadedModel, relocate_padding: bool) -> None:
    """A linearized checkpoint replays its removals with one relocation setting: keep it when continuing."""
    if loaded.removed and loaded.relocate_padding != relocate_padding:
        raise UserError("continue a linearized checkpoint with the --relocate-padding setting it was made with "
                        f"({'on' if loaded.relocate_padding else 'off'})")


def save_linearized(path: Path, loaded: LoadedModel, result: LoopResult, relocate_padding: bool) -> Path:
    """State dict + the recipe to rebuild it: architecture, removed call sites, preprocessing."""
    check_continuation(loaded, relocate_padding)
    recipe = {"arch": loaded.source, "num_classes": loaded.num_classes, "removed": loaded.removed + result.removed,
              "relocate_padding": relocate_padding,
              "input_size": list(loaded.input_size), "mean": list(loaded.mean), "std": list(loaded.std),
              "crop_pct": loaded.crop_pct, "interpolation": loaded.interpolation}
    state = cpu_state(result.model)
    return save_torch({"format": LINEARIZED_FORMAT, "recipe": recipe, "state_dict": state}, path)


def val_batches(loaders: Loaders, n: int, text: bool = False) -> list[torch.Tensor]:
    """``n`` validation batches; token batches also cut to half their length, so that the export's dynamic
    sequence axis is verified at two lengths."""
    batches = [x for x, _ in itertools.islice(iter(loaders.val), n)]
    return batches + [x[:, : two_lengths(x.shape[1])[1]] for x in batches] if text else batches


MAX_POSITIONS_KEY = "easier_export.max_positions"


def onnx_metadata(loaded: LoadedModel) -> dict[str, str]:
    """What the ONNX file records about its source; a language model also its positions (``bench`` times it at
    sequence 128 or fewer)."""
    text = {} if loaded.text is None else {MAX_POSITIONS_KEY: str(loaded.text.max_positions)}
    return {"source": loaded.source, **text}


def task_of(loaded: LoadedModel) -> Task:
    """Images and text classifiers keep top-1 within budget, causal language models perplexity."""
    return Task() if loaded.text is None else Task(loaded.text.metric, loaded.text.entropy_pad_id)


def export_and_verify(model: nn.Module, reference: nn.Module, example: torch.Tensor, path: Path,
                      inputs: list[torch.Tensor], metadata: dict[str, str], cfg: CompressConfig) -> dict:
    """Export, then prove the file reproduces ``reference``; a failure keeps the file as *.unverified.onnx."""
    info_ = export_onnx(model, example, path, metadata, simplify=cfg.simplify, opset=cfg.opset)
    result = verify_onnx(path, reference, inputs, cfg.atol, cfg.rtol, cfg.min_top1, scale_tol=cfg.scale_tol)
    print_verify(result, console)
    info_["verify"] = result.to_dict()
    if not result.passed:
        info_["path"] = str(mark_unverified(path))
    return info_


MERGE_KINDS = ("conv_conv", "linear_linear", "residual")
AUTO_FLOOR = 0.97  # an auto plan measured slower than this (folded vs unfolded, end to end) is not shipped
AUTO_GAIN = 1.03  # ... nor one that stores more numbers unless at least this much (and its spread) faster


def fold_and_ship(linearized: fx.GraphModule, example: torch.Tensor, inputs: list[torch.Tensor], mode: str,
                  out_dir: Path, meta: dict[str, str], cfg: CompressConfig) -> tuple[fx.GraphModule, list, dict]:
    """Fold, then export model.onnx and verify it against the *linearized* model (proves folds and export)."""
    info(f"folding (mode {mode}, target {cfg.target})")
    folded, folds = fold_model(linearized, example, mode=mode, target=cfg.target,
                               cache=out_dir / "latency_table.json", threads=cfg.threads)
    return folded, folds, ship(folded, folds, linearized, example, out_dir / "model.onnx", inputs, meta, cfg)


def ship(folded: fx.GraphModule, folds: list, linearized: fx.GraphModule, example: torch.Tensor, path: Path,
         inputs: list[torch.Tensor], meta: dict[str, str], cfg: CompressConfig) -> dict:
    """Export a folded model with the number of folds it carries in its metadata, verified against the
    linearized model."""
    meta = {**meta, "folds_applied": str(sum(f.applied for f in folds))}
    return export_and_verify(folded, linearized, example, path, inputs, meta, cfg)


def _bench(exports: dict, example: torch.Tensor, cfg: CompressConfig, original: nn.Module,
           folded: nn.Module) -> list[dict]:
    info("benchmarking (onnxruntime)")
    return bench({k: Path(v["path"]) for k, v in exports.items()}, tuple(example.shape[1:]), cfg.bench_devices,
                 cfg.bench_batches, cfg.threads, max_seconds=cfg.bench_seconds,
                 torch_models={"original": original, "folded": folded})  # eager PyTorch as a reference


def speedup_probe(original: nn.Module, example: torch.Tensor, work_dir: Path,
                  cfg: CompressConfig) -> Callable[[fx.GraphModule], float]:
    """Measures what would ship after a round: fold (``cfg.fold``), export, time against the original on the
    target at the smallest benchmark batch. The original is exported once, before the loop changes nothing."""
    base = Path(export_onnx(original, example, work_dir / "original.onnx", {}, cfg.simplify, cfg.opset)["path"])
    batch = min(cfg.bench_batches)

    def probe(model: fx.GraphModule) -> float:
        folded, _ = fold_model(eval_copy(model), example, mode=cfg.fold, target=cfg.target,
                               cache=work_dir.parent / "latency_table.json", threads=cfg.threads)
        path = Path(export_onnx(folded, example, work_dir / "folded.onnx", {}, cfg.simplify, cfg.opset)["path"])
        rows = bench({"original": base, "folded": path}, tuple(example.shape[1:]), (cfg.target,), (batch,),
                     cfg.threads, max_seconds=cfg.bench_seconds)
        return speedups(rows, "original")[("onnxruntime", cfg.target, batch)]["folded"]

    return probe


def _every_merge_if_faster(linearized: fx.GraphModule, example: torch.Tensor, inputs: list[torch.Tensor],
                           folds: list, out_dir: Path, meta: dict[str, str], cfg: CompressConfig
                           ) -> tuple[FoldRecord | None, tuple[fx.GraphModule, list, dict] | None]:
    """Ship every exact merge instead of the shipped plan when the whole model measures faster that way.

    The planner keeps a merge only if its own in-context saving clears the timing noise, so a model of many
    small merges, each below the noise, is left unmerged although together they pay (MobileNetV2 at 32x32:
    plan ×1.71, every merge ×1.98, benchmarks/fold_patterns.md). When ``all`` applies more merges than the
    shipped plan, that model is exported and verified beside it, both are timed side by side on the target at the
    smallest benchmark batch, and ``all`` replaces model.onnx only if verified and faster by more than both rows'
    spread (and 3 %). Returns the comparison as a fold row of kind ``end_to_end`` (None: nothing to compare) and,
    when ``all`` ships, its (folded, folds, export).
    """
    every, every_folds = fold_model(linearized, example, mode="all")
    shipped = sum(f.applied and f.kind in MERGE_KINDS for f in folds)
    more = sum(f.applied and f.kind in MERGE_KINDS for f in every_folds)
    if more <= shipped:
        return None, None
    info(f"timing every exact merge ({more}) against the shipped plan ({shipped}) end to end")
    export = ship(every, every_folds, linearized, example, out_dir / "onnx" / "every_merge.onnx", inputs, meta, cfg)
    path = Path(export["path"])
    try:
        if not export["verify"]["passed"]:
            return FoldRecord("end_to_end", [], f"every exact merge ({more})", False,
                              "every merge did not pass verification"), None
        batch = min(cfg.bench_batches)
        rows = bench({"plan": out_dir / "model.onnx", "every": path}, tuple(example.shape[1:]), (cfg.target,),
                     (batch,), cfg.threads, max_seconds=cfg.bench_seconds, repeats=5)
        p50 = {r["label"]: r["p50_ms"] for r in rows}
        if len(p50) < 2:  # the target could not run (no GPU): nothing measured, nothing changed
            return None, None
        margin = max(0.03, *(r["spread"] for r in rows))
        faster = p50["every"] < p50["plan"] * (1 - margin)
        record = FoldRecord("end_to_end", [], f"shipped plan ({shipped} merges) {p50['plan']:.3f} ms vs every exact "
                            f"merge ({more}) {p50['every']:.3f} ms, batch {batch} on {cfg.target}", faster,
                            "" if faster else f"every merge not faster by more than {margin:.0%} (timing spread)",
                            p50["plan"] * 1e3, p50["every"] * 1e3)
        if not faster:
            return record, None
        info(f"every exact merge runs ×{p50['plan'] / p50['every']:.2f} faster than the plan: shipping it")
        os.replace(path, out_dir / "model.onnx")
        return record, (every, every_folds, {**export, "path": str(out_dir / "model.onnx")})
    finally:
        path.unlink(missing_ok=True)


def plan_refusal(rows: list[dict], folded: nn.Module, fallback: nn.Module) -> str:
    """Why the auto fold plan must not ship ('' when it may), judged on the whole model: the planner times ops in
    isolation, so never ship a plan that ran slower end to end than the linearized model (``rows``: compress's
    benchmark), nor one that stores more numbers than ``fallback`` (what ships instead: BatchNorm folding only) —
    a merge through a bottleneck, or a bias map — unless it ran faster by more than the timing spread (and 3 %).
    Nothing measured (no onnxruntime row), nothing refused.
    """
    measured = _end_to_end(rows)
    if measured is None:
        return ""
    ratio, spread = measured
    if ratio < AUTO_FLOOR:
        return f"the plan ran ×{ratio:.2f} end to end"
    need = 1 + max(AUTO_GAIN - 1, spread)
    if stored_numbers(folded) > stored_numbers(fallback) and ratio < need:
        return (f"the plan adds weights and ran ×{ratio:.2f} end to end (needs ×{need:.2f}: {AUTO_GAIN - 1:.0%} or "
                "the timing spread)")
    return ""


def stored_numbers(model: nn.Module) -> int:
    """Parameters and buffers (weights, biases, bias maps): what the exported file carries."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def _end_to_end(rows: list[dict]) -> tuple[float, float] | None:
    """ORT speed-up of folded over linearized at the smallest benchmarked batch (the slowest device's) and the
    larger of the two rows' spreads; None when nothing was measured."""
    ort_rows = [r for r in rows if r["backend"] == "onnxruntime"]
    if not ort_rows:
        return None
    batch = min(r["batch"] for r in ort_rows)
    at_batch = [r for r in ort_rows if r["batch"] == batch]
    ratios = [v["folded"] for v in speedups(at_batch, "linearized").values() if "folded" in v]
    if not ratios:
        return None
    spread = max(r["spread"] for r in at_batch if r["label"] in ("linearized", "folded"))
    return min(ratios), spread


def compress(loaded: LoadedModel, loaders: Loaders, out_dir: Path, cfg: CompressConfig) -> dict:
    """Run every stage and return the report (also written to ``out_dir``)."""
    out_dir = ensure_writable(Path(out_dir))
    device = resolve_device(cfg.device)
    check_continuation(loaded, cfg.loop.relocates)
    gm = trace(loaded.model.eval())
    dry_run(gm, loaded.input_size, loaded.input_dtype)
    n_sites = len(find_call_sites(gm, cfg.loop.rectifiers))
    if n_sites == 0:
        raise UserError(f"{loaded.source} has no {'/'.join(cfg.loop.rectifiers)} activations to remove")
    info(f"[bold]{loaded.source}[/]: {n_sites} activation call sites; finetuning on {device}")

    inputs = val_batches(loaders, cfg.verify_batches, loaded.text is not None)
    example = inputs[0][:1]
    table = LatencyTable(cfg.target, cfg.threads, out_dir / "latency_table.json")
    probe = speedup_probe(gm, example, out_dir / "probe", cfg) if cfg.loop.target_speedup is not None else None
    result = run_loop(gm, loaded.source, loaders.train, loaders.val, cfg.loop, device, out_dir, table, probe,
                      task_of(loaded))
    if not is_main_process():
        return {}
    original = gm.cpu().eval()  # the traced original, finetuned first if --baseline-epochs asked for it
    linearized = result.model.cpu().eval()
    save_linearized(out_dir / "linearized.pt", loaded, result, cfg.loop.relocates)

    meta = {**onnx_metadata(loaded), "removed_activations": ",".join(result.removed)}
    info("exporting ONNX")
    exports = {name: export_onnx(model, example, out_dir / "onnx" / f"{name}.onnx", meta, cfg.simplify, cfg.opset)
               for name, model in (("original", original), ("linearized", linearized))}
    folded, folds, exports["folded"] = fold_and_ship(linearized, example, inputs, cfg.fold, out_dir, meta, cfg)
    bench_rows = _bench(exports, example, cfg, original, folded)
    merges = [f for f in folds if f.applied and f.kind in MERGE_KINDS]
    if cfg.fold == "auto" and merges and exports["folded"]["verify"]["passed"]:
        fallback, fallback_folds = fold_model(linearized, example, mode="none")
        why = plan_refusal(bench_rows, folded, fallback)
    else:
        why = ""
    if why:
        info(f"[yellow]{why}: keeping BatchNorm folding only[/]")
        folded, folds = fallback, fallback_folds
        exports["folded"] = ship(folded, folds, linearized, example, out_dir / "model.onnx", inputs, meta, cfg)
        folds += [dataclasses.replace(f, applied=False, reason=f"end-to-end check: {why}") for f in merges]
        bench_rows = _bench(exports, example, cfg, original, folded)
    if cfg.fold == "auto" and exports["folded"]["verify"]["passed"]:
        record, switched = _every_merge_if_faster(linearized, example, inputs, folds, out_dir, meta, cfg)
        if switched is not None:
            folded, folds, exports["folded"] = switched
            bench_rows = _bench(exports, example, cfg, original, folded)
        folds = folds + ([record] if record is not None else [])
    verify = exports["folded"]["verify"]

    report = build_report(loaded, cfg, result, original, folded, example, folds, exports, bench_rows,
                          loaders.skipped)
    write_report(report, out_dir)
    if report["rounds"]:
        console.print(rounds_table(report))
    console.print(summary_table(report))
    if not verify["passed"]:
        raise VerificationError(f"model.onnx does not reproduce the PyTorch model: {verify['reason']} "
                                f"(kept as {Path(exports['folded']['path']).name})")
    return report


def _ppl(value: float | None) -> dict:
    """A language model's perplexity, under ``ppl`` (absent for other models: keys are only ever added)."""
    return {} if value is None else {"ppl": value}


def build_report(loaded: LoadedModel, cfg: CompressConfig, result: LoopResult, original: nn.Module,
                 folded: fx.GraphModule, example: torch.Tensor, folds: list, exports: dict,
                 bench_rows: list[dict], skipped: list[str] | None = None) -> dict:
    removed_round = {name: r.round for r in result.history if r.within_budget for name in r.removed}
    entropy0 = {e["name"]: e["entropy"] for e in result.entropy0}
    return {
        "schema_version": 1,
        "tool": {"name": "easier-export", "version": __version__},
        "model": {"source": loaded.source, "input_size": list(example.shape[1:]),
                  "num_classes": loaded.num_classes},
        "settings": {**asdict(cfg.loop), **{k: v for k, v in asdict(cfg).items() if k != "loop"}},
        "original": {"top1": result.base_top1, **model_stats(original, example),
                     "onnx_bytes": exports["original"]["size_bytes"], **_ppl(result.base_ppl)},
        "compressed": {"top1": result.final_top1, **model_stats(folded, example),
                       "onnx_bytes": exports["folded"]["size_bytes"], "removed": result.removed,
                       **_ppl(result.final_ppl)},
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
        "export": {k: v for k, v in exports["folded"].items() if k != "verify"},
        "verify": exports["folded"]["verify"],
        "bench": bench_rows,
        "data": {"skipped_images": len(skipped or []), "skipped": skipped or []},
        **({} if loaded.text is None else {"text": {
            "task": loaded.text.task, "metric": loaded.text.metric, "sequence_length": int(example.shape[1]),
            "verified_lengths": list(two_lengths(int(example.shape[1]))),
            "tokenizer": loaded.text.tokenizer or "utf-8 bytes", "vocab_size": loaded.text.vocab_size}}),
        "outputs": {"model": Path(exports["folded"]["path"]).name, "linearized": "linearized.pt",
                    "report_json": "report.json", "report_md": "report.md"},
    }
