"""`compress`, stage by stage: EASIER loop → fold → ONNX export → verify → benchmark → report."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from easier_export import __version__
from easier_export.core.console import console, info
from easier_export.core.dist import is_main_process, resolve_device
from easier_export.core.errors import UserError, VerificationError, first_line
from easier_export.core.io import save_torch
from easier_export.core.stats import PairedChange, better_beyond_chance
from easier_export.fold import fold_model
from easier_export.fold.planner import LatencyTable
from easier_export.load.data import ImageFolderData, Loaders, Preprocessing
from easier_export.load.models import IMAGENET_MEAN, IMAGENET_STD, LINEARIZED_FORMAT, LoadedModel
from easier_export.load.text import two_lengths
from easier_export.loop.linearize import LoopConfig, LoopResult, Task, cpu_state, run_loop, snapshot_path
from easier_export.loop.train import evaluate_metrics
from easier_export.ship.bench import bench, speedups
from easier_export.ship.export import MIN_OPSET, eval_copy, export_onnx, mark_unverified, print_verify, verify_onnx
from easier_export.ship.onnx_inputs import MAX_POSITIONS_KEY
from easier_export.ship.report import SCHEMA_VERSION, model_stats, rounds_table, summary_table, write_report
from easier_export.ship.shipping import Shipment, Step, choose
from easier_export.trace.graph import find_call_sites, remove_sites, trace


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
    latency_table: Path | None = None


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


NORMALIZATION_MARGIN = 5.0
"""Points by which another common normalization must beat the configured one on val before the run is stopped:
well above the val noise of a few hundred images, far below what a wrong normalization costs (tens of points)."""
NORMALIZATION_BATCHES = 8


def check_normalization(loaded: LoadedModel, folder: ImageFolderData, batch_size: int, seed: int) -> None:
    """Without --mean/--std, evaluate the original on a few val batches under the configured normalization and
    the common others; stop (one line) when another scores clearly higher (by the margin, and beyond the paired
    noise of those images: a random or tiny model's differences are not a finding): finetuning would otherwise "recover"
    the model to the wrong normalization and ship it adapted to inputs its users never feed it."""
    channels = loaded.input_size[0]
    configured = (tuple(loaded.mean), tuple(loaded.std))
    others = {"ImageNet": (IMAGENET_MEAN, IMAGENET_STD), "0.5/0.5": ((0.5,) * channels, (0.5,) * channels),
              "none (0 and 1)": ((0.0,) * channels, (1.0,) * channels)}
    scores, correct = {}, {}
    for name, (mean, std) in {"configured": configured, **others}.items():
        if len(mean) != channels or (name != "configured" and (mean, std) == configured):
            continue
        loaders = folder.loaders(loaded.input_size, mean, std, batch_size, 0, seed, loaded.crop_pct,
                                 loaded.interpolation)
        batches = list(itertools.islice(iter(loaders.val), NORMALIZATION_BATCHES))
        metrics = evaluate_metrics(loaded.model, batches, torch.device("cpu"))
        scores[name], correct[name] = metrics["top1"], metrics["correct"]
    best = max(scores, key=lambda k: scores[k])
    clearly = better_beyond_chance(correct["configured"], correct[best])  # not a few lucky images
    if scores[best] > scores["configured"] + NORMALIZATION_MARGIN and clearly:
        mean, std = {"configured": configured, **others}[best]
        raise UserError(f"{loaded.source} scores {scores['configured']:.1f}% on val with its configured mean/std "
                        f"but {scores[best]:.1f}% with {best} normalization: pass the normalization it was trained "
                        f"with, e.g. --mean {','.join(f'{v:g}' for v in mean)} --std "
                        f"{','.join(f'{v:g}' for v in std)}")


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
                               cache=latency_table_path(work_dir.parent, cfg), threads=cfg.threads)
        path = Path(export_onnx(folded, example, work_dir / "folded.onnx", {}, cfg.simplify, cfg.opset)["path"])
        rows = bench({"original": base, "folded": path}, tuple(example.shape[1:]), (cfg.target,), (batch,),
                     cfg.threads, max_seconds=cfg.bench_seconds)
        return speedups(rows, "original")[("onnxruntime", cfg.target, batch)]["folded"]

    return probe


def kept_steps(original: fx.GraphModule, result: LoopResult, out_dir: Path, loop: LoopConfig,
               task: Task) -> list[Step]:
    """The loop's kept rounds, latest first, each rebuilt from its saved weights and judged on the held-out val
    samples, then the original (round 0): what shipping may step back through."""
    steps = []
    kept = [r for r in result.history if r.within_budget]
    for rec in reversed(kept):
        snapshot = torch.load(snapshot_path(out_dir, rec.round), map_location="cpu", weights_only=True)
        model = remove_sites(original, snapshot["removed"], loop.relocates)
        model.load_state_dict(snapshot["state_dict"])
        within = rec.holdout is None or task.within(loop, PairedChange(**rec.holdout))
        steps.append(Step(rec.round, list(snapshot["removed"]), rec.val_top1, model.eval(), rec.val_ppl,
                          rec.holdout, within))
    return [*steps, Step(0, [], result.base_top1, original, result.base_ppl)]


def latest_within_holdout(original: fx.GraphModule, result: LoopResult, out_dir: Path, loop: LoopConfig,
                          task: Task) -> LoopResult:
    """The loop's result as of its latest kept round within budget on the held-out val samples (``linearize``
    writes that one: what ``compress`` would step back to before timing anything)."""
    step = next(s for s in kept_steps(original, result, out_dir, loop, task) if s.within_holdout)
    return dataclasses.replace(result, model=step.model, removed=step.removed, final_top1=step.top1,
                               final_ppl=step.ppl)


def _step_meta(meta: dict[str, str], step: Step) -> dict[str, str]:
    return {**meta, "removed_activations": ",".join(step.removed), "round": str(step.round)}


def ship(steps: list[Step], original_onnx: Path, example: torch.Tensor, inputs: list[torch.Tensor], out_dir: Path,
         meta: dict[str, str], cfg: CompressConfig) -> Shipment:
    """Choose what ships (``shipping.choose``) and put it at ``out_dir/model.onnx``; the other candidates'
    files are removed."""
    work = out_dir / "onnx" / "candidates"

    def exporter(folded: fx.GraphModule, folds: list, step: Step, path: Path) -> dict:
        applied = {"folds_applied": str(sum(f.applied for f in folds))}
        return export_and_verify(folded, step.model, example, path, inputs, {**_step_meta(meta, step), **applied},
                                 cfg)

    fold_kwargs = {"target": cfg.target, "cache": latency_table_path(out_dir, cfg), "threads": cfg.threads}
    shipment = choose(steps, original_onnx, exporter, example, cfg.fold, cfg.loop.relocates, cfg.target,
                      min(cfg.bench_batches), cfg.threads, work, fold_kwargs)
    export = shipment.chosen.export  # verified: only verified candidates are chosen
    os.replace(export["path"], out_dir / "model.onnx")
    shipment.chosen.export = {**export, "path": str(out_dir / "model.onnx")}
    failed = [t["candidate"] for t in shipment.tried if not t["verified"]]
    if failed:  # kept for a look, and said: a fold or export that does not reproduce its model is a bug
        for path in work.glob("*.unverified.onnx"):
            os.replace(path, out_dir / "onnx" / path.name)
        shipment.reason += f"; failed verification, not shipped: {', '.join(failed)} (onnx/*.unverified.onnx)"
        info(f"[yellow]warning:[/] failed verification, not shipped: {', '.join(failed)}")
    shutil.rmtree(work, ignore_errors=True)
    return shipment


def latency_table_path(out_dir: Path, cfg: CompressConfig) -> Path:
    """The planner's timings: ``--latency-table FILE`` pins them across runs and machines, else per run."""
    return cfg.latency_table or out_dir / "latency_table.json"


def say_preprocessing(loaders: Loaders) -> None:
    """The preprocessing the budget is measured under, once the inputs are checked: the user's pipeline must
    feed the shipped model the same way."""
    if loaders.preprocessing is not None:
        info(f"preprocessing: {loaders.preprocessing.describe()}")


def preprocessing_metadata(loaders: Loaders) -> dict[str, str]:
    """The preprocessing the budget was measured under, as ONNX metadata (JSON), for images."""
    if loaders.preprocessing is None:
        return {}
    return {"preprocessing": json.dumps(loaders.preprocessing.to_dict())}


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
    say_preprocessing(loaders)

    inputs = val_batches(loaders, cfg.verify_batches, loaded.text is not None)
    example = inputs[0][:1]
    table = LatencyTable(cfg.target, cfg.threads, latency_table_path(out_dir, cfg))
    probe = speedup_probe(gm, example, out_dir / "probe", cfg) if cfg.loop.target_speedup is not None else None
    result = run_loop(gm, loaded.source, loaders.train, loaders.val, cfg.loop, device, out_dir, table, probe,
                      task_of(loaded))
    if not is_main_process():
        return {}
    original = gm.cpu().eval()  # the traced original, finetuned first if --baseline-epochs asked for it
    meta = {**onnx_metadata(loaded), **preprocessing_metadata(loaders)}
    exports = {"original": export_onnx(original, example, out_dir / "onnx" / "original.onnx", meta, cfg.simplify,
                                       cfg.opset)}
    shipment = ship(kept_steps(original, result, out_dir, cfg.loop, task_of(loaded)), Path(exports["original"]["path"]),
                    example, inputs, out_dir, meta, cfg)
    chosen = shipment.chosen
    info(f"shipping {chosen.label}: {shipment.reason}")
    shipped = dataclasses.replace(result, model=chosen.step.model, removed=chosen.step.removed,
                                  final_top1=chosen.step.top1, final_ppl=chosen.step.ppl)
    save_linearized(out_dir / "linearized.pt", loaded, shipped, cfg.loop.relocates)
    exports["linearized"] = export_onnx(shipped.model, example, out_dir / "onnx" / "linearized.onnx",
                                        _step_meta(meta, chosen.step), cfg.simplify, cfg.opset)
    exports["folded"] = chosen.export
    folded, folds = chosen.folded, chosen.folds
    bench_rows = _bench(exports, example, cfg, original, folded)
    verify = exports["folded"]["verify"]

    report = build_report(loaded, cfg, shipped, original, folded, example, folds, exports, bench_rows,
                          loaders.skipped, shipment.to_dict(), loaders.preprocessing)
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
                 bench_rows: list[dict], skipped: list[str] | None = None, shipment: dict | None = None,
                 preprocessing: Preprocessing | None = None) -> dict:
    removed_round = {name: r.round for r in result.history if r.within_budget for name in r.removed}
    entropy0 = {e["name"]: e["entropy"] for e in result.entropy0}
    return {
        "schema_version": SCHEMA_VERSION,
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
        "data": {"skipped_images": len(skipped or []), "skipped": skipped or [],
                 **({} if preprocessing is None else {"preprocessing": preprocessing.to_dict()})},
        **({} if shipment is None else {"shipped": shipment}),
        **({} if loaded.text is None else {"text": {
            "task": loaded.text.task, "metric": loaded.text.metric, "sequence_length": int(example.shape[1]),
            "verified_lengths": list(two_lengths(int(example.shape[1]))),
            "tokenizer": loaded.text.tokenizer or "utf-8 bytes", "vocab_size": loaded.text.vocab_size}}),
        "outputs": {"model": Path(exports["folded"]["path"]).name, "linearized": "linearized.pt",
                    "report_json": "report.json", "report_md": "report.md"},
    }
