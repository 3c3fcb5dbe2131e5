"""--distill: the rounds' finetuning pulled towards the frozen original's soft outputs."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from easier_export.load.arch import DemoNet
from easier_export.load.data import digits
from easier_export.loop import linearize as loop_mod
from easier_export.loop.config import LoopConfig
from easier_export.loop.linearize import run_loop
from easier_export.loop.train import Teacher, finetune
from easier_export.trace.tracing import trace


class Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_loss_is_the_weighted_sum_of_cross_entropy_and_scaled_kl():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    hard = torch.tensor(1.7)
    t = 2.0
    p, q = F.softmax(teacher / t, -1), F.softmax(student / t, -1)
    kl = float((p * (p.log() - q.log())).sum() / 2)
    got = Teacher(Fixed(teacher), 0.25, t).loss(torch.zeros(2), student, hard)
    assert math.isclose(float(got), 0.75 * 1.7 + 0.25 * t ** 2 * kl, rel_tol=1e-5)
    assert math.isclose(float(Teacher(Fixed(student), 0.25, t).loss(torch.zeros(2), student, hard)), 0.75 * 1.7,
                        rel_tol=1e-6)
    assert math.isclose(float(Teacher(Fixed(teacher), 0.0, t).loss(torch.zeros(2), student, hard)), 1.7,
                        rel_tol=1e-6)


def test_a_fully_distilled_student_moves_towards_the_teacher_not_the_labels():
    """w = 1 ignores the labels: trained on labels that contradict the teacher, the student still learns the
    teacher's answers."""
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    teacher = nn.Linear(4, 3).requires_grad_(False)
    wrong = (teacher(x).argmax(1) + 1) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, wrong), batch_size=32)
    student = nn.Linear(4, 3)
    finetune(student, loader, torch.device("cpu"), 20, 0.1, teacher=Teacher(teacher, 1.0, 1.0))
    agree = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert agree > 0.9


def test_loop_distils_from_the_frozen_original(tmp_path, monkeypatch):
    loaders = digits(batch_size=128)
    seen = []
    real = loop_mod.finetune
    monkeypatch.setattr(loop_mod, "finetune", lambda *a, **k: (seen.append(k.get("teacher")), real(*a, **k))[1])
    torch.manual_seed(0)
    original = trace(DemoNet())
    before = {k: v.clone() for k, v in original.state_dict().items()}
    cfg = LoopConfig(max_drop=100.0, finetune_epochs=0.2, max_removed=2, entropy_batches=2, distill=0.5,
                     distill_temperature=2.0)
    run_loop(original, "demo_cnn", loaders.train, loaders.val, cfg, torch.device("cpu"), tmp_path)
    assert len(seen) == 2 and seen[0] is seen[1]
    teacher = seen[0]
    assert (teacher.weight, teacher.temperature) == (0.5, 2.0) and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    for k, v in teacher.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
