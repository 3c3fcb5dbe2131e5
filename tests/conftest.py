from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, everything printed)."""
    from easier_export.cli.app import main

    try:
        main([*argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@contextmanager
def benchmark_script(file: str, name: str) -> Iterator[ModuleType]:
    """A script of benchmarks/ imported as module ``name`` (registered while in use: its dataclasses look their
    module up), so its pure functions can be tested without running it."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 16,
                      splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A tiny ImageFolder whose classes differ in colour, so a model can learn it."""
    gen = torch.Generator().manual_seed(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = torch.zeros(size, size, 3)
                base[..., c % 3] = 200
                pixels = (base + 40 * torch.rand(size, size, 3, generator=gen)).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def scripted_evaluate(accuracies: list[float], n: int = 100):
    """An ``evaluate_metrics`` stand-in returning ``accuracies`` in turn: of ``n`` samples, the first ones right
    (so a higher accuracy is right on a superset of the images a lower one gets right)."""
    scripted = iter(accuracies)

    def evaluate(*args, **kwargs) -> dict:
        top1 = next(scripted)
        correct = (torch.arange(n) < round(top1 * n / 100)).double()
        return {"top1": top1, "ppl": 1.0, "correct": correct, "nll": 1 - correct}

    return evaluate


@pytest.fixture
def merges_ship(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ships decided without the clock: every candidate folded with every exact merge races at ×2 against
    the original, the others at ×0.9, so the latest kept round ships fully merged."""
    from easier_export.core.stats import Speedup
    from easier_export.ship import shipping

    def race(models: dict, baseline: str, *args, **kwargs) -> dict:
        return {k: Speedup(2.0, 1.9, 2.1, 6) if k.endswith("fold all") else Speedup(0.9, 0.85, 0.95, 6)
                for k in models if k != baseline}

    monkeypatch.setattr(shipping, "race", race)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_machine_table(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own machine latency table: timings shared across tests would make one test's timing
    assertions depend on which ran before it (and would fill the user's ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
