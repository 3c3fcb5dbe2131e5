"""The embedded default job: a small inverted-residual CNN trained on scikit-learn's digits, then compressed.

Needs no file and no network. The network (``demo_invres``) has fold groups that pay on a CPU, so the default
latency-aware selection can ship a measurably faster model (runs and timings: benchmarks/demo.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from easier_export.core.console import info, progress
from easier_export.core.errors import UserError, first_line
from easier_export.core.io import save_torch
from easier_export.load.arch import DemoInvRes
from easier_export.load.data import digits
from easier_export.load.models import LoadedModel
from easier_export.load.task import ImageTask
from easier_export.loop.config import LoopConfig
from easier_export.loop.train import evaluate, finetune, seed_everything
from easier_export.pipeline import CompressConfig, compress, ensure_writable

VAL_SHARE = 0.5
"""Half of digits validates: at 99 % top-1 a 1-point budget is a handful of images, and the default paired bound
(``--confidence``) on the half of val the rounds see (``--holdout``) needs about 450 images to admit a round that
loses two."""


def trained_demo_model(out_dir: Path, epochs: int, seed: int) -> DemoInvRes:
    """Train once and keep the weights, so a rerun (or a resumed run) starts from the same model."""
    path = out_dir / "demo_invres.pt"
    if path.exists():
        model = DemoInvRes()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated, foreign or hostile: torch raises many types
            raise UserError(f"{path} is unreadable ({type(e).__name__}: {first_line(e)}); delete it to train the "
                            "demo model again") from e
        info(f"using the trained demo model in {path}")
        return model.eval()
    loaders = digits(seed=seed, val_share=VAL_SHARE)
    seed_everything(seed, loaders.train)
    model = DemoInvRes()  # after seeding: its initial weights must not depend on what drew random numbers before
    with progress("train demo network on digits", epochs * len(loaders.train)) as advance:
        finetune(model, loaders.train, torch.device("cpu"), epochs, lr=0.05, weight_decay=1e-4, on_step=advance)
    info(f"trained demo network: {evaluate(model, loaders.val, torch.device('cpu')):.2f}% top-1 on digits val")
    save_torch(model.state_dict(), path)
    return model.eval()


def run_demo(out_dir: Path, epochs: int = 12, finetune_epochs: float = 1.0, max_drop: float = 1.0,
             fold: str = "auto", seed: int = 0, select: str = "latency") -> dict:
    out_dir = ensure_writable(Path(out_dir))
    model = trained_demo_model(out_dir, epochs, seed)
    loaded = LoadedModel(model, "demo_invres", (1, 16, 16), ImageTask(mean=(0.5,), std=(0.5,)))
    cfg = CompressConfig(LoopConfig(max_drop=max_drop, finetune_epochs=finetune_epochs, lr=0.01, seed=seed,
                                    select=select), fold=fold, device="cpu")
    return compress(loaded, digits(seed=seed, val_share=VAL_SHARE), out_dir, cfg)
