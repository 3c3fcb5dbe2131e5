"""Scale-out: two gloo processes give the same entropy as one and keep identical weights when finetuning."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from easier_export.load.arch import DemoNet
from easier_export.load.data import make_loader
from easier_export.loop.entropy import measure
from easier_export.loop.train import finetune
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

pytestmark = pytest.mark.slow  # spawns gloo worker processes and a torchrun

N = 64


def _data():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 1, 16, 16, generator=gen), torch.randint(0, 10, (N,), generator=gen))


def _model():
    torch.manual_seed(0)
    return trace(DemoNet())


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        gm = _model()
        loader = make_loader(_data(), 8, False, 0, 0)
        stats = measure(gm, find_call_sites(gm), loader, torch.device("cpu"), train_mode=False)
        finetune(gm, make_loader(_data(), 8, True, 0, 0), torch.device("cpu"), 1, 0.05)
        # plain lists: tensors would be shared through file descriptors that die with this process
        queue.put((rank, {k: v.p_on.tolist() for k, v in stats.items()}, gm.state_dict()["stem.0.weight"].tolist()))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (p_on, w)) for r, p_on, w in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    gm = _model()
    loader = make_loader(_data(), 8, False, 0, 0)
    single = measure(gm, find_call_sites(gm), loader, torch.device("cpu"), train_mode=False)
    for rank in (0, 1):
        for name, stats in single.items():
            assert results[rank][0][name] == stats.p_on.tolist()
    assert results[0][1] == results[1][1]  # DDP kept the replicas in step


def test_linearize_command_under_torchrun(tmp_path, image_folder):
    """The same command line, launched by torchrun with 2 gloo processes: rank 0 alone writes the outputs."""
    import subprocess
    import sys

    from easier_export.load.models import build_arch

    weights = tmp_path / "w.pt"
    torch.save(build_arch("cifar_resnet20", num_classes=3).state_dict(), weights)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "easier_export.cli.app",
         "linearize", "cifar_resnet20", "--weights", str(weights), "--num-classes", "3", "--data", str(image_folder),
         "--input-size", "16", "--workers", "0", "--batch-size", "2", "--max-removed", "2", "--max-drop", "100",
         "--entropy-batches", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("removed 2 activations") == 1  # printed by rank 0 only
    assert sorted(p.name for p in out.iterdir()) == ["linearized.pt", "rounds", "state.pt"]
