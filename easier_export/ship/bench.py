"""Latency of ONNX models under onnxruntime (PyTorch eager as a reference), measured fairly side by side."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from easier_export.core.errors import UserError, first_line
from easier_export.core.onnx_graph import file_takes_token_ids
from easier_export.core.ort import DEVICES, cpu_name, cuda_usable, physical_cores, providers_for, session_options
from easier_export.core.stats import Speedup
from easier_export.core.timing import Runner, interleaved, race_runners

from .export import eval_copy

logger = logging.getLogger(__name__)

Providers = list[str | tuple[str, dict]]  # onnxruntime's form: a name, or a (name, provider options) pair

def bench(
    onnx_models: dict[str, Path],
    input_shape: tuple[int, int, int],
    devices: Sequence[str] = ("cpu",),
    batches: Sequence[int] = (1,),
    threads: int | None = None,
    torch_models: dict[str, nn.Module] | None = None,
    warmup: int = 10,
    min_iters: int = 30,
    max_seconds: float = 2.0,
    repeats: int = 3,
) -> list[dict]:
    """Time every model on every (device, batch); one row per model, backend, device and batch.

    Each model gets at least ``min_iters`` timed runs and keeps going until it has used about
    ``max_seconds``. The runs are split into ``repeats`` rounds that alternate between the models
    (A, B, A, B, ...), so clock boosts, thermal drift or a noisy neighbour hit every model alike
    and the ratios within one call are fair.
    """
    unknown = set(devices) - set(DEVICES)
    if unknown:
        raise UserError(f"unknown benchmark device(s) {sorted(unknown)}: choose from {list(DEVICES)}")
    missing = [str(p) for p in onnx_models.values() if not Path(p).is_file()]
    if missing:
        raise UserError(f"ONNX model(s) not found: {', '.join(missing)}")
    threads = threads or physical_cores()
    versions = {"onnxruntime": ort.__version__, "torch": torch.__version__}
    cpu = cpu_name()
    rows = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the eager reference gets the same CPU budget as onnxruntime
    try:
        for device in devices:
            rows += _bench_device(onnx_models, torch_models or {}, input_shape, device, batches, threads,
                                  (warmup, min_iters, max_seconds, repeats))
    finally:
        torch.set_num_threads(previous_threads)
    return [{**row, "versions": versions, "cpu": cpu} for row in rows]


def _bench_device(onnx_models: dict[str, Path], torch_models: dict[str, nn.Module],
                  input_shape: tuple[int, int, int], device: str, batches: Sequence[int], threads: int,
                  budget: tuple[int, int, float, int]) -> list[dict]:
    if device == "cuda" and not cuda_usable():
        logger.warning("cuda benchmark requested but no usable GPU (ORT CUDA EP + torch.cuda); skipped")
        return []
    providers = providers_for(device)
    rows = []
    tokens = any(file_takes_token_ids(Path(p)) for p in onnx_models.values())
    for batch in batches:
        x = _example_input(tokens, batch, input_shape)
        runners: dict[tuple[str, str, str], Runner] = {}
        for label, path in onnx_models.items():
            runner, provider = ort_runner(Path(path), x, device, providers, threads)
            runners[label, "onnxruntime", provider] = runner
        for label, model in torch_models.items():
            runners[label, "torch", "eager"] = torch_runner(model, x, device)
        times = _repeats(list(runners.values()), *budget)
        for (label, backend, provider), ms in zip(runners, times, strict=True):
            row = {"label": label, "backend": backend, "provider": provider, "device": device, "batch": batch,
                   "threads": threads, **_stats(ms)}
            if tokens:  # a language model's throughput: tokens per second at the p50 latency
                row["tokens_per_s"] = batch * math.prod(input_shape) * 1e3 / row["p50_ms"]
            rows.append(row)
    return rows


def _example_input(tokens: bool, batch: int, input_shape: tuple[int, ...]) -> np.ndarray:
    """The same seeded input for every model timed: token ids (0 or 1) or standard normal pixels."""
    rng = np.random.default_rng(0)
    if tokens:
        return rng.integers(0, 2, (batch, *input_shape))
    return rng.standard_normal((batch, *input_shape), dtype=np.float32)


def speedups(rows: list[dict], baseline_label: str) -> dict[tuple[str, str, int], dict[str, float]]:
    """p50 of ``baseline_label`` divided by each other label's p50, per (backend, device, batch)."""
    base = {config_key(r): r["p50_ms"] for r in rows if r["label"] == baseline_label}
    out: dict[tuple[str, str, int], dict[str, float]] = {}
    for r in rows:
        key = config_key(r)
        if r["label"] != baseline_label and key in base:
            out.setdefault(key, {})[r["label"]] = base[key] / r["p50_ms"]
    return out


def config_key(row: dict) -> tuple[str, str, int]:
    """What makes two rows comparable: same backend, device and batch, different model."""
    return row["backend"], row["device"], row["batch"]


def _session(path: Path, providers: Providers, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=providers)


def ort_runner(path: Path, x: np.ndarray, device: str, providers: Providers,
               threads: int) -> tuple[Runner, str]:
    """One inference of ``path`` on ``x`` as a callable, and the provider that runs it (the first of
    ``providers`` that loaded: a name, or a (name, options) pair); on ``cuda`` input and output stay on the GPU."""
    try:
        session = _session(path, providers, threads)
    except Exception as e:  # a TensorRT EP whose libraries are missing fails here; so does a damaged file
        if providers[0] != "TensorrtExecutionProvider":
            raise UserError(f"onnxruntime cannot load {path}: {first_line(e)}") from e
        logger.warning("TensorRT execution provider unusable (%s); using CUDA", first_line(e))
        providers = providers[1:]
        session = _session(path, providers, threads)
    provider = session.get_providers()[0]
    input_name = session.get_inputs()[0].name
    if device == "cpu":
        return (lambda: session.run(None, {input_name: x})), provider

    # IO binding keeps the input resident on the GPU and the output there too: we time the model, not PCIe.
    binding = session.io_binding()
    binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run, provider


def torch_runner(model: nn.Module, x: np.ndarray, device: str) -> Runner:
    """One eager inference of an eval copy of ``model`` on ``device``, synchronised, as a callable."""
    model = eval_copy(model, device)
    inp = torch.from_numpy(x).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> None:
        with torch.inference_mode():
            model(inp)
        sync()

    return run


def time_runners(runners: list[Runner], warmup: int = 10, min_iters: int = 30, max_seconds: float = 2.0,
                 repeats: int = 3) -> list[dict]:
    """Interleaved timing of any callables (another backend than ``bench``'s): one statistics row each, with the
    medians of its repeats (``repeat_p50_ms``), so that a ratio of two rows can also be read repeat by repeat."""
    chunks = _repeats(runners, warmup, min_iters, max_seconds, repeats)
    return [{**_stats(c), "repeat_p50_ms": [float(np.median(chunk)) for chunk in c]} for c in chunks]


def _repeats(runners: list[Runner], warmup: int, min_iters: int, max_seconds: float,
             repeats: int) -> list[list[list[float]]]:
    """Per-iteration milliseconds for each runner and repeat: ``repeats`` interleaved blocks, each at least
    its share of ``min_iters`` runs and of ``max_seconds``."""
    return interleaved(runners, lambda timings, _: len(timings[0]) == repeats, warmup=warmup,
                       iters=math.ceil(min_iters / repeats), block_seconds=max_seconds / repeats)


def race(onnx_models: dict[str, Path], baseline: str, input_shape: tuple[int, ...], device: str, batch: int,
         threads: int | None = None, max_seconds: float = 10.0) -> dict[str, Speedup] | None:
    """Each model's speed-up over ``baseline`` on ``device`` at ``batch``, with its confidence interval (see
    ``race_runners``), over ``SESSION_SETS`` fresh onnxruntime sessions of each file; None when the device cannot
    run here."""
    if device == "cuda" and not cuda_usable():
        return None
    threads = threads or physical_cores()
    x = _example_input(file_takes_token_ids(Path(onnx_models[baseline])), batch, input_shape)

    def sessions() -> dict[str, Runner]:
        return {label: ort_runner(Path(path), x, device, providers_for(device), threads)[0]
                for label, path in onnx_models.items()}

    return race_runners(sessions, baseline, max_seconds=max_seconds)[1]


NOISY_SPREAD = 0.10
"""A row is marked noisy when the medians of its interleaved repeats spread over more than 10 % of its p50.

The spread (max - min of the per-repeat medians, over the p50) bounds how far a ratio between two rows can be
trusted: at 10 % a "×1.1 speed-up" is indistinguishable from drift between repeats. The flag only marks rows in
the tables; what ships is decided by the race (``race``)."""


def _stats(chunks: list[list[float]]) -> dict:
    ms = [t for chunk in chunks for t in chunk]
    p50, p90 = np.percentile(ms, [50, 90])
    medians = [float(np.median(chunk)) for chunk in chunks]
    spread = (max(medians) - min(medians)) / float(p50)
    return {"p50_ms": float(p50), "p90_ms": float(p90), "mean_ms": float(np.mean(ms)), "iters": len(ms),
            "spread": spread, "noisy": spread > NOISY_SPREAD}


def noisy_pair(rows: list[dict], key: tuple[str, str, str, int], baseline_label: str) -> bool:
    """Whether the ratio of row ``key`` (label, backend, device, batch) to its baseline rests on a noisy row."""
    flags = {(r["label"], *config_key(r)): r.get("noisy", False) for r in rows}
    return flags.get(key, False) or flags.get((baseline_label, *key[1:]), False)
