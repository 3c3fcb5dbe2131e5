"""Finetuning and validation, the same code on one process or under torchrun (DDP)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from easier_export.core.dist import is_distributed, is_main_process
from easier_export.core.errors import UserError


def prediction_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every labelled position: one per image or text, one per token of a language model
    (logits (B, T, V), targets (B, T)); target -100 marks a position without a label."""
    return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), reduction=reduction)


@dataclass(frozen=True)
class Teacher:
    """Knowledge distillation: the student's loss becomes (1 − w)·cross-entropy + w·T²·KL(teacher ‖ student) at
    temperature T. With the original as the frozen teacher, a linearized candidate is pulled back towards the
    function it replaces (all its soft outputs, not just the label), which one short finetune of cross-entropy
    does not recover."""

    model: nn.Module
    weight: float
    temperature: float = 4.0

    @classmethod
    def frozen(cls, model: nn.Module, weight: float, temperature: float = 4.0) -> Teacher:
        """A teacher from a frozen copy of ``model`` in eval mode: finetuning the student changes nothing in it."""
        return cls(copy.deepcopy(model).eval().requires_grad_(False), weight, temperature)

    def loss(self, x: torch.Tensor, logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.model(x).flatten(0, -2).float() / self.temperature
        soft = F.kl_div(F.log_softmax(logits.flatten(0, -2).float() / self.temperature, -1),
                        F.log_softmax(target, -1), log_target=True, reduction="batchmean")
        return (1 - self.weight) * hard + self.weight * self.temperature ** 2 * soft


@torch.no_grad()
def check_batch_of_one(model: nn.Module, example: torch.Tensor) -> None:
    """Refuse batches of one before any work when the model cannot train on them: train-mode BatchNorm over
    features alone (BatchNorm1d, or after pooling) needs two values per channel. The model is left as it was."""
    from .entropy import preserved_buffers

    was_training = model.training
    try:
        with preserved_buffers(model):
            model.train()(example)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise UserError("training batches of one sample cannot train this model's BatchNorm (its statistics need "
                        "two values per channel): use --batch-size 2 or more") from None
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_metrics(model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """Top-1 accuracy in percent and perplexity (exp of the mean cross-entropy), over every labelled position
    (summed over ranks under DDP): a classifier's top-1, or a language model's next-token accuracy. Also per
    sample (one image, or one text row), in loader order and gathered over ranks: ``correct`` (share of its
    labelled positions predicted right) and ``nll`` (their mean cross-entropy), for paired comparisons."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, positions, summed cross-entropy
    correct, nll = [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        rows = y.reshape(y.shape[0], -1)
        labelled = rows != -100
        hits = (logits.reshape(*rows.shape, -1).argmax(-1) == rows) & labelled
        losses = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), reduction="none").reshape(rows.shape)
        count = labelled.sum(1).clamp_min(1)
        correct.append((hits.sum(1) / count).double().cpu())
        nll.append((losses.sum(1) / count).double().cpu())
        sums += torch.stack([hits.sum(), labelled.sum(), losses.sum()]).to(sums)
    if is_distributed():
        dist.all_reduce(sums)
    model.train(was_training)
    positions = sums[1].clamp_min(1)
    return {"top1": float(100.0 * sums[0] / positions), "ppl": math.exp(min(float(sums[2] / positions), 700.0)),
            "correct": _gathered(correct), "nll": _gathered(nll)}


def _gathered(parts: list[torch.Tensor]) -> torch.Tensor:
    """This rank's per-sample values, concatenated with every other rank's in rank order under DDP."""
    local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if not is_distributed():
        return local
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    return torch.cat(every)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy in percent (summed over ranks under DDP)."""
    return evaluate_metrics(model, loader, device)["top1"]


def seed_everything(seed: int, loader: DataLoader | None = None) -> None:
    """Seed per round, not per run, so a resumed run replays exactly what an uninterrupted one does."""
    torch.manual_seed(seed)
    if loader is not None and loader.generator is not None:
        loader.generator.manual_seed(seed)
    if loader is not None and isinstance(loader.sampler, DistributedSampler):
        loader.sampler.seed = seed


OPTIMIZERS = ("sgd", "adamw")


def finetune(model: nn.Module, loader: DataLoader, device: torch.device, epochs: float, lr: float,
             weight_decay: float = 5e-4, on_step: Callable[[], None] | None = None, optimizer: str = "sgd",
             penalty: Callable[[], torch.Tensor] | None = None, teacher: Teacher | None = None) -> float:
    """SGD + momentum (or AdamW: transformers train poorly with SGD) with a cosine schedule; returns the mean
    training loss of the last epoch.

    ``epochs`` may be fractional (e.g. 0.25 = a quarter of an epoch), for quick rounds on big datasets.
    ``penalty()``, when given, is added to each step's loss after the forward pass (a regulariser that hooks
    inside the model read during that pass, e.g. ``--entropy-reg``). ``teacher``: distil from it (``--distill``).
    """
    if epochs <= 0:
        return float("nan")
    steps = max(1, math.ceil(epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True) \
        if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if is_distributed() else model
    model.train()
    step, epoch, total, count = 0, 0, 0.0, 0
    while step < steps:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                logits = net(x)
                loss = prediction_loss(logits, y)
                if teacher is not None:
                    loss = teacher.loss(x, logits, loss)
                if penalty is not None:
                    loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total, count, step = total + loss.item(), count + 1, step + 1
            if on_step is not None:
                on_step()
            if step >= steps:
                break
        epoch += 1
    model.eval()
    return total / max(count, 1)


NEAR_CHANCE = 1.5
"""An original below 1.5x chance top-1 has (almost) nothing to lose: every round then looks "within budget"."""


def warn_near_chance(top1: float, model: nn.Module) -> None:
    """Say loudly when the original barely beats guessing (wrong weights, input size or preprocessing)."""
    from easier_export.core.console import console
    from easier_export.load.models import head_classes

    classes = head_classes(model)
    if classes and is_main_process() and top1 < NEAR_CHANCE * 100.0 / classes:
        console.print(f"[bold red]warning: the original model is near chance ({top1:.2f}% top-1, chance is "
                      f"{100.0 / classes:.2f}% for {classes} classes): check its weights, --input-size, --mean/--std "
                      "and that DATA is what it was trained on; the accuracy budget means nothing from here[/]",
                      soft_wrap=True)
