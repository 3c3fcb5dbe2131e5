"""In-context timings of merges, cached: what the planner and the fold groups weigh merges by."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx
import onnxruntime as ort
from torch import nn

from easier_export.core.errors import UserError
from easier_export.core.io import save_json
from easier_export.core.ort import device_name, physical_cores, session_options
from easier_export.core.quantize import FP32, Calibration, convert
from easier_export.core.timing import SESSION_SETS, Runner, race_runners

from .segments import SegmentSpec, merged_graph, op_signature, segment_graph

logger = logging.getLogger(__name__)

TIMING_VERSION = "sessions"
"""Part of every cache key: entries of another timing rule are dropped when the cache is read."""

LATENCY_FILE = "latency_table.json"
"""Where a run keeps its planner timings, under its output folder, reused when it resumes."""

WARMUP = 3
"""Runs of each graph before timing starts."""


@dataclass
class LatencyTable:
    """In-context timings of segments, before and after merging (us at batch 1), cached as JSON.

    Each pair of graphs is raced as shipped files are (``core.timing.race_runners``: interleaved blocks of
    ``block`` runs on ``sessions`` fresh pairs of onnxruntime sessions, compared by the project's one "is it
    faster" rule, ``core.stats.Speedup``, the interval widened to cover each pair's own ratio), each pair until
    the interval's half-width is within ``rel_tol`` of the ratio or its share of ``max_seconds`` has passed (with
    the blocks an interval needs, however slow the segment); one pair's sessions can run a few percent apart for
    as long as they live (``SESSION_SETS``). Stored: ``before`` (median unmerged block), ``after`` (``before``
    over the ratio) and ``spread`` (how much later the merged op would run at the interval's low end), so
    ``before - after > spread`` exactly when the merge is faster beyond the noise.

    A table that persists (``cache``) also shares with the machine's (``shared``): a merge near the line stays
    near it however it is timed, so it is timed once per machine, and every later run decides alike.

    ``precision``: the precision the model ships in. Both graphs are converted to it before timing (INT8:
    calibrated on seeded stand-ins, whose ranges are wrong for accuracy but give the quantized kernels their
    shapes), so a merge is weighed by what it saves after quantization.
    """

    target: str = "cpu"
    threads: int | None = None
    cache: pathlib.Path | None = None
    precision: str = FP32
    block: int = 10
    sessions: int = SESSION_SETS
    rel_tol: float = 0.03
    max_seconds: float = 1.0
    table: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.threads = self.threads or physical_cores()
        if self.cache is not None:
            self.table = {**_entries(self.shared), **_entries(self.cache)}

    @property
    def shared(self) -> pathlib.Path | None:
        """This machine's table, when this one persists (``cache``): read first (``cache``'s own entries win) and
        given what was timed here, so the same command twice makes the same latency decisions on this machine."""
        return None if self.cache is None else machine_table(self.target)

    @property
    def providers(self) -> list[str]:
        if self.target == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider"]
        return ["CPUExecutionProvider"]

    def times(self, spec: SegmentSpec, merged: nn.Module) -> tuple[float, float, float]:
        """(us before, us after, us spread) of replacing the segment by ``merged``, at batch 1."""
        spec = SegmentSpec(spec.ops, (1, *spec.in_shape[1:]), spec.add, spec.skip)
        key = (f"{TIMING_VERSION}|{self.providers[0]}|t{self.threads}|s{self.sessions}|{self.precision}|"
               f"{spec.signature()}->{op_signature(merged)}")
        if key not in self.table:
            graphs = (segment_graph(spec), merged_graph(merged, spec.in_shape))
            before, after, spread = self._time_pair(*(self._deployed(g, spec.in_shape) for g in graphs))
            self.table[key] = {"before": before, "after": after, "spread": spread}
        entry = self.table[key]
        return entry["before"], entry["after"], entry["spread"]

    def _deployed(self, model: onnx.ModelProto, shape: tuple[int, ...]) -> onnx.ModelProto:
        """``model`` in the table's precision."""
        if self.precision == FP32:
            return model
        with tempfile.TemporaryDirectory(prefix="easier-segment-") as tmp:
            src, dst = pathlib.Path(tmp) / "fp32.onnx", pathlib.Path(tmp) / f"{self.precision}.onnx"
            onnx.save_model(model, str(src))
            convert(src, dst, self.precision, Calibration.stand_ins(shape), target=self.target)
            return onnx.load(str(dst))

    def _runner(self, model: onnx.ModelProto) -> Runner:
        sess = ort.InferenceSession(model.SerializeToString(), session_options(self.threads),
                                    providers=self.providers)
        inp = sess.get_inputs()[0]
        feeds = {inp.name: np.random.default_rng(1).standard_normal(inp.shape).astype(np.float32)}
        return partial(sess.run, None, feeds)

    def _time_pair(self, a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[float, float, float]:
        medians, verdicts = race_runners(lambda: {"before": self._runner(a), "after": self._runner(b)}, "before",
                                         max_seconds=self.max_seconds, warmup=WARMUP, iters=self.block,
                                         sets=self.sessions, settled=lambda v: v.precise(self.rel_tol))
        found = verdicts["after"]
        before = 1e3 * statistics.median(medians["before"])
        after = before / found.ratio
        return before, after, before / found.low - after

    def save(self) -> None:
        if self.cache is None:
            return
        save_json(dict(sorted(self.table.items())), self.cache)
        shared = self.shared
        known = _entries(shared)
        if not set(self.table) <= set(known):  # the first timing of a segment on this machine stays its timing
            try:
                save_json(dict(sorted({**self.table, **known}.items())), shared)
            except UserError as e:  # save_json's form of any OSError: an unwritable machine table costs time only
                logger.warning("could not add to this machine's latency table %s (%s)", shared, e)


def machine_table(target: str) -> pathlib.Path:
    """Where this machine keeps its planner timings for ``target``: under ``$XDG_CACHE_HOME`` (``~/.cache``),
    named after the device and the onnxruntime version, which both change what a merge saves."""
    root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "easier-export"
    device = re.sub(r"[^A-Za-z0-9]+", "-", device_name(target)).strip("-")
    return root / f"latency-{target}-{device}-ort{ort.__version__}.json"


def _entries(path: pathlib.Path | None) -> dict[str, dict[str, float]]:
    """The entries of this timing rule in a table file; none when it is missing or damaged (that only costs
    time)."""
    if path is None or not path.exists():
        return {}
    try:
        loaded = json.loads(path.read_text())
        return {k: v for k, v in loaded.items() if isinstance(v, dict) and k.startswith(f"{TIMING_VERSION}|")}
    except (ValueError, TypeError, OSError, AttributeError) as e:
        logger.warning("ignoring unreadable latency table %s (%s)", path, e)
        return {}


def trusted_saving(before: float, after: float, spread: float) -> float:
    """A measured saving, 0 unless it is beyond the noise (``LatencyTable`` stores ``spread`` so)."""
    gain = before - after
    return gain if gain > spread else 0.0
