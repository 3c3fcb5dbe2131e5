"""`compress`, stage by stage: EASIER loop → fold → ONNX export → verify → benchmark → report."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from easier_export.core.console import console, info
from easier_export.core.dist import is_main_process, resolve_device
from easier_export.core.errors import UserError, VerificationError, first_line
from easier_export.core.io import save_torch
from easier_export.core.quantize import FP16, FP32, INT8
from easier_export.core.stats import PairedChange
from easier_export.deploy import Deployment, Subject, deploy, racer, settle
from easier_export.fold import LATENCY_FILE, LatencyTable, fold_model
from easier_export.load.data import Loaders
from easier_export.load.models import LINEARIZED_FORMAT, LoadedModel
from easier_export.load.task import FLOAT32, Tolerances
from easier_export.loop.config import LoopConfig, Task
from easier_export.loop.linearize import run_loop
from easier_export.loop.state import LoopResult, cpu_state, snapshot_path
from easier_export.ship.bench import bench, race
from easier_export.ship.export import MIN_OPSET, eval_copy, export_onnx, mark_unverified, print_verify, verify_onnx
from easier_export.ship.precision import PrecisionChoice
from easier_export.ship.report import build_report, write_report
from easier_export.ship.shipping import Shipment, Step, choose, modes_for, same_file
from easier_export.ship.tables import print_rounds, summary_table
from easier_export.trace.edits import remove_sites
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


@dataclass
class CompressConfig:
    loop: LoopConfig = field(default_factory=LoopConfig)
    fold: str = "auto"
    target: str = "cpu"
    device: str = "auto"
    simplify: bool = True
    opset: int = MIN_OPSET
    tolerances: Tolerances = FLOAT32
    verify_batches: int = 4
    bench_devices: tuple[str, ...] = ("cpu",)
    bench_batches: tuple[int, ...] = (1, 8)
    threads: int | None = None
    bench_seconds: float = 2.0
    latency_table: Path | None = None
    precision: str = FP32
    calib_batches: int = 8
    calib_method: str = "minmax"

    @property
    def planning_precision(self) -> str:
        """The precision merges are timed in: the one asked for; FP32 for ``auto`` (the FP32 file is what every
        conversion is raced against, and what ships when none is faster)."""
        return self.precision if self.precision in (INT8, FP16) else FP32

    def settings(self) -> dict:
        """The run's configuration as the report records it: the loop's settings and the others, flat."""
        others = {k: v for k, v in asdict(self).items() if k not in ("loop", "tolerances")}
        return {**asdict(self.loop), **others, **asdict(self.tolerances)}


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
              "relocate_padding": relocate_padding, "input_size": list(loaded.input_size), **loaded.task.recipe()}
    state = cpu_state(result.model)
    return save_torch({"format": LINEARIZED_FORMAT, "recipe": recipe, "state_dict": state}, path)


def onnx_metadata(loaded: LoadedModel) -> dict[str, str]:
    """What the ONNX file records about its source (and what its task adds)."""
    return {"source": loaded.source, **loaded.task.onnx_metadata()}


def task_of(loaded: LoadedModel) -> Task:
    """What the loop keeps within budget: the task config's metric, padding left out of the entropy counts."""
    return Task(loaded.task.metric, loaded.task.pad_id)


def export_and_verify(model: nn.Module, reference: nn.Module, example: torch.Tensor, path: Path,
                      inputs: list[torch.Tensor], metadata: dict[str, str], cfg: CompressConfig) -> dict:
    """Export, then prove the file reproduces ``reference``; a failure keeps the file as *.unverified.onnx."""
    info_ = export_onnx(model, example, path, metadata, simplify=cfg.simplify, opset=cfg.opset)
    result = verify_onnx(path, reference, inputs, cfg.tolerances)
    print_verify(result, console)
    info_["verify"] = result.to_dict()
    if not result.passed:
        info_["path"] = str(mark_unverified(path))
    return info_


def _bench(exports: dict, example: torch.Tensor, cfg: CompressConfig, original: nn.Module,
           folded: nn.Module, deployment: Deployment) -> list[dict]:
    info("benchmarking (onnxruntime)")
    files = {k: Path(v["path"]) for k, v in exports.items()} | deployment.bench_files()
    return bench(files, tuple(example.shape[1:]), cfg.bench_devices,
                 cfg.bench_batches, cfg.threads, max_seconds=cfg.bench_seconds,
                 torch_models={"original": original, "folded": folded})  # eager PyTorch as a reference


def speedup_probe(original: nn.Module, example: torch.Tensor, work_dir: Path,
                  cfg: CompressConfig) -> Callable[[fx.GraphModule], float]:
    """Measures what would ship after a round: the model folded every way shipping tries (``modes_for``: the
    planner's merges can lose in the whole model where an unmerged fold wins), each exported and raced against
    the original on the target at the smallest benchmark batch (the race that decides shipping); returns the
    best low end of a speed-up's 95 % interval: the speed-up reached beyond the noise (1.0 where the target
    cannot run). The original is exported once, before the loop changes it."""
    base = Path(export_onnx(original, example, work_dir / "original.onnx", {}, cfg.simplify, cfg.opset)["path"])
    batch = min(cfg.bench_batches)

    def probe(model: fx.GraphModule) -> float:
        files = {}
        for mode in modes_for(cfg.fold, cfg.loop.relocates):
            folded, _ = fold_model(eval_copy(model), example, mode=mode, target=cfg.target,
                                   cache=latency_table_path(work_dir.parent, cfg), threads=cfg.threads,
                                   precision=cfg.planning_precision)
            path = Path(export_onnx(folded, example, work_dir / f"folded-{mode}.onnx", {}, cfg.simplify,
                                    cfg.opset)["path"])
            if not any(same_file(path, other) for other in files.values()):  # one graph under two modes: raced once
                files[mode] = path
        raced = race({"original": base, **files}, "original", tuple(example.shape[1:]), cfg.target, batch,
                     cfg.threads, max_seconds=cfg.bench_seconds)
        return max(raced[mode].low for mode in files) if raced else 1.0

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

    fold_kwargs = {"target": cfg.target, "cache": latency_table_path(out_dir, cfg), "threads": cfg.threads,
                   "precision": cfg.planning_precision}
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


def in_precision(shipped: Subject, original: Subject, inputs: list[torch.Tensor], loaders: Loaders, task: Task,
                 cfg: CompressConfig) -> Deployment:
    """The shipped FP32 file converted to ``cfg.precision`` where asked (``deploy.deploy``)."""
    if cfg.precision == FP32:
        return Deployment(PrecisionChoice(FP32, FP32, "asked for FP32"), None, None)
    info(f"precision {cfg.precision}: converting and judging against the FP32 original on val")
    timing = racer(tuple(inputs[0].shape[1:]), cfg.target, min(cfg.bench_batches), cfg.threads)
    done = deploy(cfg.precision, shipped, original, inputs, loaders, cfg.loop, task, (cfg.calib_batches,
                  cfg.calib_method), timing, cfg.target, original.file.parent)
    info(f"shipping {done.choice.shipped.upper()}: {done.choice.reason}")
    return done


def shipped_in(shipped: LoopResult, deployment: Deployment, task: Task) -> LoopResult:
    """The loop's result with the metric of the converted file that ships (measured with onnxruntime)."""
    if deployment.choice.chosen is None:
        return shipped
    value = deployment.choice.chosen.judged.value
    metric = {"final_ppl": value} if task.metric == "ppl" else {"final_top1": value}
    return dataclasses.replace(shipped, **metric)


def latency_table_path(out_dir: Path, cfg: CompressConfig) -> Path:
    """The planner's timings: ``--latency-table FILE`` pins them across runs and machines, else per run."""
    return cfg.latency_table or out_dir / LATENCY_FILE


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
    dry_run(gm, loaded.input_size, loaded.task.dtype)
    n_sites = len(find_call_sites(gm, cfg.loop.rectifiers))
    if n_sites == 0:
        raise UserError(f"{loaded.source} has no {'/'.join(cfg.loop.rectifiers)} activations to remove")
    info(f"[bold]{loaded.source}[/]: {n_sites} activation call sites; finetuning on {device}")
    say_preprocessing(loaders)

    inputs = loaded.task.verification_inputs(loaders, cfg.verify_batches)
    example = inputs[0][:1]
    table = LatencyTable(cfg.target, cfg.threads, latency_table_path(out_dir, cfg), precision=cfg.planning_precision)
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
    fp32 = chosen.export
    deployment = in_precision(Subject(Path(fp32["path"]), chosen.step.model),
                              Subject(Path(exports["original"]["path"]), original), inputs, loaders,
                              task_of(loaded), cfg)
    exports["folded"] = settle(deployment, out_dir / "model.onnx", fp32, out_dir / "onnx" / "model.fp32.onnx")
    shipped = shipped_in(shipped, deployment, task_of(loaded))
    folded, folds = chosen.folded, chosen.folds
    timed = {"original": exports["original"], "linearized": exports["linearized"], "folded": fp32}
    bench_rows = _bench(timed, example, cfg, original, folded, deployment)
    verify = exports["folded"]["verify"]

    report = build_report(loaded, cfg.settings(), shipped, original, folded, example, folds, exports, bench_rows,
                          loaders.skipped, shipment.to_dict(), loaders.preprocessing, deployment.to_dict())
    write_report(report, out_dir)
    if report["rounds"]:
        print_rounds(report, console)
    console.print(summary_table(report))
    if not verify["passed"]:
        raise VerificationError(f"model.onnx does not reproduce the PyTorch model: {verify['reason']} "
                                f"(kept as {Path(exports['folded']['path']).name})")
    return report

