"""GPU latency of original vs compressed models, side by side: one prepared run for a borrowed GPU machine.

For each case (a ``compress`` output folder: ``onnx/original.onnx``, ``model.onnx``, ``linearized.pt``,
``report.json``; by default every folder under ``gpu_inputs/`` that holds a ``report.json``, plus a built-in case
made here with random weights so that a run without carried inputs still measures something), original vs
compressed at batch 1 and 32, interleaved, p50 with the per-repeat range of the speed-up:

- onnxruntime: CPU EP (the machine's cores, a reference), CUDA EP FP32 and FP16 (IO binding; FP16 by
  onnxruntime's own float16 converter, FP32 inputs and outputs kept), TensorRT EP FP32 and FP16 (engine cache on),
  each where the installed onnxruntime has the provider and it loads;
- PyTorch on CUDA, FP32 and FP16 (``.half()``), eager and replayed as a CUDA graph. The compressed model is
  rebuilt from ``linearized.pt`` and folded by the package with the plan ``report.json`` records (and checked
  against ``model.onnx`` on CPU onnxruntime); the original is rebuilt from the recipe's architecture with
  random weights (timing only) and its BatchNorm folded, as onnxruntime does, so the ratio is depth and merging.

Every row is written to ``OUT/gpu.json`` and ``OUT/gpu.md`` as soon as it is measured; a time budget
(``--minutes``) skips what no longer fits, so an interrupted run still returns numbers. ``--dry-run`` runs the
same code on the CPU with tiny iteration counts and skips what needs CUDA (for checking the script, not timing).

    bash benchmarks/gpu.sh [--minutes 5] [--dry-run] [--cases DIR ...]     # OUT=... (default runs/gpu)

A case needs only four files of a compress output (a few MB for the CIFAR models), e.g.
``mkdir -p gpu_inputs/NAME/onnx && cp RUN/{report.json,linearized.pt,model.onnx} gpu_inputs/NAME/ &&
cp RUN/onnx/original.onnx gpu_inputs/NAME/onnx/``; ``gpu_inputs/`` is not committed, so it travels to the GPU
machine only when carried.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fold_patterns import mnv2_blocks, nonzero_norms  # noqa: E402  (one definition of the removal pattern)

from easier_export.core.errors import first_line
from easier_export.core.io import atomic_write, save_json, save_torch
from easier_export.core.ort import cpu_name, physical_cores
from easier_export.core.stats import speedup
from easier_export.fold import MERGE_KINDS, fold_model
from easier_export.load.models import LINEARIZED_FORMAT, build_arch, load_model
from easier_export.load.task import TextTask
from easier_export.ship.bench import Providers, Runner, ort_runner, time_runners, torch_runner
from easier_export.ship.export import export_onnx, verify_onnx
from easier_export.trace.edits import remove_sites
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "gpu_inputs"
BATCHES = (1, 32)
SIMPLIFY = importlib.util.find_spec("onnxsim") is not None  # optional: the GPU machine has no onnxsim


@dataclass(frozen=True)
class Budget:
    """Timing effort per pair of models (``time_runners``' arguments)."""

    warmup: int
    min_iters: int
    max_seconds: float
    repeats: int


REAL = Budget(warmup=10, min_iters=60, max_seconds=0.6, repeats=6)  # 6: the fewest with a 95 % interval
DRY = Budget(warmup=1, min_iters=4, max_seconds=0.0, repeats=2)


# ---------------------------------------------------------------------------------------------- machine


def _command(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(module: str) -> str | None:
    """A module's version, or None when it does not import (nothing here needs it)."""
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception:  # a broken optional install raises anything
        return None


def machine(gpu: bool) -> dict:
    """What the table must name: GPU, driver, library versions and the numerics flags that change timings."""
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
            "onnx": onnx.__version__, "tensorrt": _version("tensorrt"), "onnxsim": SIMPLIFY}
    if gpu:
        smi = _command("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
        info |= {"gpu": torch.cuda.get_device_name(0), "nvidia_smi": smi,
                 "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                 "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    return info


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One original/compressed pair, as files for onnxruntime and as modules for PyTorch."""

    name: str
    index: int  # names its files in the scratch folder
    directory: Path
    input_size: tuple[int, ...]
    original: nn.Module | None  # None: the recipe's architecture could not be rebuilt here
    compressed: nn.Module
    info: dict = field(default_factory=dict)

    def onnx(self, which: str) -> Path:
        return self.directory / ("onnx/original.onnx" if which == "original" else "model.onnx")


def shipped_plan(report: dict) -> tuple[str, list[list[str]] | None, str]:
    """(fold mode, merges to replay, how) that rebuild the ``model.onnx`` a compress report describes."""
    folds = report["folds"]
    mode = report["shipped"]["fold"]
    if mode != "auto":
        return mode, None, f"fold {mode}, as shipped"
    merges = [f["nodes"] for f in folds if f["applied"] and f["kind"] in MERGE_KINDS]
    return "auto", merges, "the shipped auto plan, replayed"


def _onnx_counts(path: Path) -> tuple[int, int]:
    """Conv ops and float weights stored in an ONNX file (what the rebuilt model must match)."""
    proto = onnx.load(str(path))
    weights = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return sum(n.op_type == "Conv" for n in proto.graph.node), weights


def _torch_counts(model: nn.Module) -> tuple[int, int]:
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return convs, sum(t.numel() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def load_case(directory: Path, name: str, index: int = 0) -> Case:
    """Rebuild both models of a compress output on this machine and check the compressed one against model.onnx."""
    report = json.loads((directory / "report.json").read_text())
    loaded = load_model(str(directory / "linearized.pt"))
    if isinstance(loaded.task, TextTask):
        raise ValueError("a text model (token inputs): not covered by this benchmark")
    example = torch.randn(1, *loaded.input_size)
    mode, replay, how = shipped_plan(report)
    folded, records = fold_model(loaded.model.eval(), example, mode=mode, replay=replay)
    merged = sum(r.applied and r.kind in MERGE_KINDS for r in records)
    if replay is not None and merged != len(replay):
        how += f"; only {merged} of its {len(replay)} merges matched this graph"
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, *loaded.input_size, generator=gen) for _ in range(2)]
    check = verify_onnx(directory / "model.onnx", folded, inputs)
    convs, weights = _torch_counts(folded)
    onnx_convs, onnx_weights = _onnx_counts(directory / "model.onnx")
    info = {"source": loaded.source, "input_size": list(loaded.input_size), "plan": how, "merges": merged,
            "max_abs_diff": check.max_abs, "max_rel_diff": check.max_rel, "verified": check.passed,
            "convs_torch_onnx": [convs, onnx_convs], "weights_torch_onnx": [weights, onnx_weights],
            "matches_shipped_graph": convs == onnx_convs and abs(weights - onnx_weights) <= 0.01 * onnx_weights}
    try:
        original = load_model(loaded.source, loaded.num_classes, img_size=loaded.input_size).model
        original = fold_model(trace(original.eval()), example, mode="none")[0]
        info["original_torch"] = "recipe architecture, random weights, BatchNorm folded"
    except Exception as e:  # a recipe naming a file of another machine, an unknown architecture...
        original = None
        info["original_torch"] = f"not rebuilt ({first_line(e)}): PyTorch rows skipped"
    return Case(name, index, directory, tuple(loaded.input_size), original, folded, info)


BUILTINS: dict[str, tuple[str, tuple[int, int, int], int, Callable[[list], list]]] = {
    # name: (architecture, input size, classes, which call sites to remove)
    "mobilenet_v2": ("torchvision:mobilenet_v2", (3, 224, 224), 1000, mnv2_blocks(2, 17)),
    "demo_invres": ("demo_invres", (1, 16, 16), 10, lambda sites: sites),
}


def make_builtin(name: str, directory: Path) -> Path:
    """A compress-like output folder made here: random weights (non-zero norm affines), the pattern's
    activations removed, every exact merge applied (``fold all``)."""
    arch, size, classes, choose = BUILTINS[name]
    torch.manual_seed(0)
    original = trace(nonzero_norms(build_arch(arch, classes)).eval())
    removed = [s.name for s in choose(find_call_sites(original))]
    linearized = remove_sites(original, removed).eval()
    example = torch.randn(1, *size)
    folded, records = fold_model(linearized, example, mode="all")
    recipe = {"arch": arch, "num_classes": classes, "removed": removed, "relocate_padding": False,
              "input_size": list(size), "mean": [0.5] * size[0], "std": [0.5] * size[0], "crop_pct": None,
              "interpolation": "bilinear"}
    save_torch({"format": LINEARIZED_FORMAT, "recipe": recipe, "state_dict": linearized.state_dict()},
               directory / "linearized.pt")
    export_onnx(original, example, directory / "onnx" / "original.onnx", simplify=SIMPLIFY)
    export_onnx(folded, example, directory / "model.onnx", simplify=SIMPLIFY)
    save_json({"settings": {"fold": "all"}, "shipped": {"fold": "all"}, "folds": [r.to_dict() for r in records],
               "built_in": f"{arch}, random weights, {len(removed)} activations removed, every exact merge"},
              directory / "report.json")
    return directory


# ---------------------------------------------------------------------------------------------- runners


@dataclass(frozen=True)
class Config:
    """One way of running both models of a case: a backend, its provider or mode, and a precision."""

    backend: str  # onnxruntime | torch
    mode: str  # the execution provider, or eager / CUDA graph
    precision: str  # fp32 | fp16
    slow: bool = False  # builds engines first (TensorRT): run after everything else


def graph_runner(model: nn.Module, x: torch.Tensor) -> Runner:
    """The model captured once as a CUDA graph and replayed: launch overhead gone, what a server would do."""
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # cuDNN picks its algorithms before the capture
            model(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        model(static)

    def run() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return run


def fp16_onnx(path: Path, out: Path) -> Path:
    """An FP16 copy of an ONNX file (inputs and outputs kept FP32), by onnxruntime's own converter; made once."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(out))
    return out


class Runners:
    """Builds the runner of one model under one config (a name, one provider or mode, one precision)."""

    def __init__(self, device: str, work: Path, threads: int) -> None:
        self.device, self.work, self.threads = device, work, threads

    def providers(self, config: Config) -> tuple[Providers, str]:
        """(onnxruntime providers, device for IO binding) of an execution provider config."""
        if config.mode == "CPUExecutionProvider":
            return ["CPUExecutionProvider"], "cpu"
        if config.mode == "TensorrtExecutionProvider":
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(self.work / "trt"),
                       "trt_timing_cache_enable": True, "trt_fp16_enable": config.precision == "fp16"}
            (self.work / "trt").mkdir(exist_ok=True)
            return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
        return [config.mode, "CPUExecutionProvider"], "cuda"

    def build(self, case: Case, which: str, config: Config, x: np.ndarray) -> Runner:
        if config.backend == "onnxruntime":
            path = case.onnx(which)
            if config.precision == "fp16" and config.mode != "TensorrtExecutionProvider":  # TRT: a builder flag
                path = fp16_onnx(path, self.work / "fp16" / f"{case.index}-{which}.onnx")
            providers, device = self.providers(config)
            runner, provider = ort_runner(path, x, device, providers, self.threads)
            if provider != config.mode:
                raise RuntimeError(f"{config.mode} did not load (the session fell back to {provider})")
            return runner
        model = case.original if which == "original" else case.compressed
        if model is None:
            raise RuntimeError("the original could not be rebuilt in PyTorch")
        dtype = torch.float16 if config.precision == "fp16" else torch.float32
        if config.mode == "eager":
            return torch_runner(copy.deepcopy(model).to(dtype), x.astype(dtype_np(dtype)), self.device)
        return graph_runner(copy.deepcopy(model).to(self.device, dtype).eval(),
                            torch.from_numpy(x).to(self.device, dtype))


def dtype_np(dtype: torch.dtype) -> type:
    return np.float16 if dtype == torch.float16 else np.float32


def configs(gpu: bool, dry_run: bool, skip: Callable[[str], None]) -> list[Config]:
    """What this machine can run, in the order it runs; each config left out is said once, with why."""
    out = [Config("torch", "eager", "fp32"), Config("torch", "eager", "fp16")]
    if gpu:
        out += [Config("torch", "CUDA graph", "fp32"), Config("torch", "CUDA graph", "fp16")]
    else:
        skip("PyTorch CUDA graphs: " + ("dry run (CPU only)" if dry_run else "no CUDA device"))
    available = ort.get_available_providers()
    for ep in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if ep not in available:
            skip(f"onnxruntime {ep} (FP32 and FP16): not in this onnxruntime {ort.__version__} build, which has "
                 f"{', '.join(available)}")
        elif not gpu:
            skip(f"onnxruntime {ep}: " + ("dry run (CPU only)" if dry_run else "no CUDA device"))
        elif ep == "TensorrtExecutionProvider" and _version("tensorrt") is None:
            skip(f"onnxruntime {ep}: the tensorrt package does not import")
        else:
            slow = ep == "TensorrtExecutionProvider"
            out += [Config("onnxruntime", ep, "fp32", slow), Config("onnxruntime", ep, "fp16", slow)]
    out.append(Config("onnxruntime", "CPUExecutionProvider", "fp32"))
    if dry_run:  # the FP16 conversion path, run on the CPU provider where its kernels allow
        out.append(Config("onnxruntime", "CPUExecutionProvider", "fp16"))
    return out


# ---------------------------------------------------------------------------------------------- results


def _speedup(original: dict, compressed: dict) -> dict:
    """Median of the per-repeat ratios and its interval (``core.stats.speedup``), as the race decides."""
    found = speedup(original["repeat_p50_ms"], compressed["repeat_p50_ms"])
    bounds = {k: v if math.isfinite(v) else None for k, v in (("low", found.low), ("high", found.high))}
    return {"speedup": found.ratio, **bounds, "verdict": found.verdict}


def ratio_text(row: dict) -> str:
    """The speed-up with its 95 % interval (the project's one "is it faster" rule over the interleaved repeats);
    "–" for a bound that needs more repeats (stored as null)."""
    low, high = ("–" if v is None else f"{v:.2f}" for v in (row["low"], row["high"]))
    return f"×{row['speedup']:.2f} [{low}, {high}]"


class Results:
    """Everything measured so far, rewritten to gpu.json and gpu.md after every row."""

    def __init__(self, out: Path, info: dict, settings: dict) -> None:
        self.out, self.machine, self.settings = out, info, settings
        self.cases: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.skipped: list[str] = []

    def skip(self, message: str) -> None:
        print(f"skipped: {message}", flush=True)
        self.skipped.append(message)
        self.write()

    def add(self, case: str, config: Config, batch: int, original: dict, compressed: dict) -> None:
        row = {"case": case, "backend": config.backend, "mode": config.mode, "precision": config.precision,
               "batch": batch, "original": original, "compressed": compressed,
               **_speedup(original, compressed)}
        self.rows.append(row)
        print(f"{case} | {config.backend} {config.mode} {config.precision} | batch {batch} | "
              f"{original['p50_ms']:.3f} → {compressed['p50_ms']:.3f} ms | {ratio_text(row)}", flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_json({"machine": self.machine, "settings": self.settings, "cases": self.cases, "rows": self.rows,
                   "skipped": self.skipped}, self.out / "gpu.json")
        text = markdown(self.machine, self.settings, self.cases, self.rows, self.skipped)
        atomic_write(self.out / "gpu.md", lambda p: p.write_text(text))


def markdown(info: dict, settings: dict, cases: dict, rows: list[dict], skipped: list[str]) -> str:
    """The table the lead commits as benchmarks/gpu.md, with the machine it ran on."""
    if "gpu" in info:
        gpu = (f"GPU {info['gpu']} (nvidia-smi: {info['nvidia_smi'] or 'no answer'}); torch {info['torch']} "
               f"(CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}, TF32 conv {info['tf32_conv']} / matmul "
               f"{info['tf32_matmul']}, cudnn.benchmark {info['cudnn_benchmark']})")
    else:
        gpu = f"no GPU used; torch {info['torch']}"
    lines = [
        "# GPU latency: original vs compressed" + (" (DRY RUN on CPU: not a measurement)" if settings["dry_run"]
                                                   else ""),
        "",
        f"Machine: {gpu}; CPU {info['cpu']}, {info['cores']} logical cores; onnxruntime {info['onnxruntime']} "
        f"(providers in this build: {', '.join(info['ort_providers'])}); TensorRT "
        f"{info['tensorrt'] or 'not installed'}; onnx {info['onnx']}; Python {info['python']}.",
        "",
        f"p50 over interleaved repeats (original, compressed, original, ...: {settings['repeats']} repeats, at "
        f"least {settings['min_iters']} runs and {settings['max_seconds']} s per model); speed-up = original p50 / "
        "compressed p50 per repeat, its median, in brackets its 95 % interval. onnxruntime on CUDA with IO binding "
        "(input and output stay on the GPU); FP16 onnxruntime rows run an FP16 copy of each file made by "
        "onnxruntime's float16 converter (FP32 inputs/outputs kept), TensorRT FP16 is its builder flag. PyTorch "
        "FP16 is `.half()`; a CUDA graph row replays one captured inference.",
        "",
        "| case | backend | provider / mode | precision | batch | original p50 ms | compressed p50 ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(cases)}
    rows = sorted(rows, key=lambda r: (order.get(r["case"], len(order)), r["backend"], r["mode"],
                                       r["precision"] != "fp32", r["batch"]))
    lines += [f"| {r['case']} | {r['backend']} | {r['mode']} | {r['precision']} | {r['batch']} | "
              f"{r['original']['p50_ms']:.3f} | {r['compressed']['p50_ms']:.3f} | {ratio_text(r)} |" for r in rows]
    lines += ["", "| case | source | input | compressed model rebuilt with | merges | Conv ops torch / ONNX | "
              "weights torch / ONNX | max abs diff vs model.onnx (CPU ORT) | original in PyTorch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, c in cases.items():
        if "error" in c:
            lines.append(f"| {name} | {c['error']} | | | | | | | |")
            continue
        convs, weights = c["convs_torch_onnx"], c["weights_torch_onnx"]
        lines.append(f"| {name} | {c['source']} | {'x'.join(map(str, c['input_size']))} | {c['plan']} | "
                     f"{c['merges']} | {convs[0]} / {convs[1]} | {weights[0]:,} / {weights[1]:,}"
                     f"{'' if c['matches_shipped_graph'] else ' ✗ differs'} | {c['max_abs_diff']:.1e} "
                     f"({c['max_rel_diff']:.1e} of the largest output){'' if c['verified'] else ' ✗'} | "
                     f"{c['original_torch']} |")
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def case_dirs(args: argparse.Namespace) -> list[Path]:
    if args.cases is not None:
        return args.cases
    return sorted(p.parent for p in INPUTS.glob("*/report.json")) if INPUTS.is_dir() else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu", help="gpu.md and gpu.json go here")
    parser.add_argument("--cases", type=Path, nargs="*", default=None,
                        help=f"compress output folders (default: every one under {INPUTS.name}/)")
    parser.add_argument("--builtin", default=None,
                        help=f"comma-separated built-in cases, made here ({', '.join(BUILTINS)}; '' for none; "
                        "default mobilenet_v2, demo_invres in a dry run)")
    parser.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")), default=BATCHES)
    parser.add_argument("--minutes", type=float, default=5.0, help="time budget: what no longer fits is skipped")
    parser.add_argument("--seconds", type=float, default=None, help="timing budget per model, config and batch")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script on the CPU: tiny iteration counts, CUDA-only parts skipped")
    args = parser.parse_args(argv)
    if args.builtin is None:
        args.builtin = "demo_invres" if args.dry_run else "mobilenet_v2"
    args.builtin = [b for b in args.builtin.split(",") if b]
    unknown = set(args.builtin) - set(BUILTINS)
    if unknown:
        parser.error(f"unknown built-in case(s) {sorted(unknown)}: choose from {list(BUILTINS)}")
    return args


def warm_gpu(seconds: float = 3.0) -> None:
    """Matrix products until the clocks have left idle (345 MHz idle, ~2 GHz busy on an H200), so that the first
    pair timed is not the slower for being first."""
    a = torch.randn(4096, 4096, device="cuda")
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


RESERVE_S = {False: 10.0, True: 60.0}
"""Seconds a task needs left in the budget to start (slow: TensorRT builds engines first)."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.minutes * 60
    gpu = torch.cuda.is_available() and not args.dry_run
    budget = DRY if args.dry_run else REAL
    if args.seconds is not None:
        budget = Budget(budget.warmup, budget.min_iters, args.seconds, budget.repeats)
    device = "cuda" if gpu else "cpu"
    if gpu:
        torch.backends.cudnn.benchmark = True  # what a deployment sets: the fastest algorithm per shape
        warm_gpu()
    settings = {"dry_run": args.dry_run, "batches": list(args.batches), "minutes": args.minutes,
                **{k: getattr(budget, k) for k in ("warmup", "min_iters", "max_seconds", "repeats")}}
    results = Results(args.out, machine(gpu), settings)
    print(json.dumps(results.machine, indent=1), flush=True)
    plan = configs(gpu, args.dry_run, results.skip)
    work = Path(tempfile.mkdtemp(prefix="easier-gpu-"))
    try:
        runners = Runners(device, work, physical_cores())
        sources = [(d.name, d) for d in case_dirs(args)] + [(f"built-in {b}", b) for b in args.builtin]
        cases = [c for i, (name, source) in enumerate(sources)
                 if (c := _prepare(name, i, source, work, results, deadline))]
        for config in sorted(plan, key=lambda c: c.slow):  # breadth first: every case's rows of one config
            for case in cases:
                for batch in args.batches:
                    _measure(case, config, batch, runners, budget, results, deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out / 'gpu.md'} and {args.out / 'gpu.json'} ({len(results.rows)} rows)", flush=True)
    return 0


def _prepare(name: str, index: int, source: Path | str, work: Path, results: Results,
             deadline: float) -> Case | None:
    """Load (or make) one case; a case that fails is reported and left out, never fatal."""
    if time.monotonic() > deadline - 2 * RESERVE_S[False]:
        results.skip(f"case {name}: time budget spent before it was loaded")
        return None
    print(f"case {name}: preparing", flush=True)
    t0 = time.monotonic()
    try:
        directory = source if isinstance(source, Path) else make_builtin(source, work / source)
        case = load_case(directory, name, index)
    except Exception as e:  # a damaged or foreign folder costs its rows, not the run
        traceback.print_exc()
        results.cases[name] = {"error": f"not loaded: {type(e).__name__}: {first_line(e)}"}
        results.skip(f"case {name}: {results.cases[name]['error']}")
        return None
    results.cases[name] = case.info
    print(f"case {name}: ready in {time.monotonic() - t0:.0f} s: {json.dumps(case.info)}", flush=True)
    results.write()
    return case


def _measure(case: Case, config: Config, batch: int, runners: Runners, budget: Budget, results: Results,
             deadline: float) -> None:
    what = f"{case.name} | {config.backend} {config.mode} {config.precision} | batch {batch}"
    if time.monotonic() > deadline - RESERVE_S[config.slow]:
        results.skip(f"{what}: time budget")
        return
    x = np.random.default_rng(0).standard_normal((batch, *case.input_size), dtype=np.float32)
    try:
        pair = [runners.build(case, which, config, x) for which in ("original", "compressed")]
        original, compressed = time_runners(pair, budget.warmup, budget.min_iters, budget.max_seconds,
                                            budget.repeats)
    except Exception as e:  # a provider that does not load, a kernel missing in FP16 on the CPU...
        results.skip(f"{what}: {type(e).__name__}: {first_line(e)}")
        return
    results.add(case.name, config, batch, original, compressed)


if __name__ == "__main__":
    sys.exit(main())
