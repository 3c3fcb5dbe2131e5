"""The machine onnxruntime runs on and the one session setup every timing uses (benchmarks, races and the fold
planner), so that a merge is chosen under the conditions that judge it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort
import torch

DEVICES = ("cpu", "cuda")
CPUINFO = Path("/proc/cpuinfo")


def physical_cores() -> int:
    """Physical cores (one ORT thread per core beats one per hyper-thread); logical count as a fallback."""
    try:
        with open(CPUINFO) as f:
            cores, phys = set(), None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        if cores:
            return min(len(cores), len(os.sched_getaffinity(0)))
    except OSError:
        pass
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The marketing name of the CPU: ``platform.processor()`` is often just the architecture on Linux."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The model of the CPU, or of the first GPU for ``cuda`` ("none" where there is none)."""
    if device == "cpu":
        return cpu_name()
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def cuda_usable() -> bool:
    """Both sides need the GPU: ORT for the ONNX runs and torch for the eager reference and device checks."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def providers_for(device: str) -> list[str]:
    """The execution providers for ``device``, best first, the CPU last for ops a GPU provider lacks."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    return [p for p in gpu if p in ort.get_available_providers()] + ["CPUExecutionProvider"]


def session_options(threads: int) -> ort.SessionOptions:
    """``threads`` intra-op threads, one inter-op, every graph optimization, warnings and errors only."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # keep provider fallback chatter off the console
    return options

