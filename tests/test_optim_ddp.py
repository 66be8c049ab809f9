"""The optimizers under ``DistributedDataParallel``: 2 CPU processes (gloo) vs one process.

DDP averages the gradients over the processes, so with equal local batches the gradient each
process sees is the mean gradient of the combined batch. MBF's and Shampoo's statistics are
built from that gradient and KFAC averages its batch factors over the processes, so several
steps on the two halves must give the parameters of the single-process run on the combined
batch, in both processes.
"""

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbf_analysis.optim import KFAC, MBF, Shampoo

DT = torch.float64
WORLD = 2
STEPS = 4
HALF = 4


def _net():
    """No BatchNorm: its batch statistics would differ between the halves and the whole."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(DT)


OPTIMIZERS = {
    "mbf": lambda m: MBF(
        m, lr=0.05, damping=0.05, stat_period=2, inverse_period=3, spatial_threshold=200
    ),
    "kfac": lambda m: KFAC(m, lr=0.05, damping=0.05, stat_period=2, inverse_period=3),
    "shampoo": lambda m: Shampoo(m, lr=0.05, eps=1e-3, stat_period=2, inverse_period=3),
}


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(WORLD * HALF, 2, 4, 4, generator=gen, dtype=DT),
            torch.randint(0, 3, (WORLD * HALF,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def _train(wrap, rank=None):
    """Parameters of every optimizer after ``STEPS`` steps (on half ``rank``, or on all)."""
    out = {}
    for name, build in OPTIMIZERS.items():
        model = _net()
        opt = build(model)
        net = wrap(model)
        for x, y in _batches():
            if rank is not None:
                x, y = x[rank * HALF : (rank + 1) * HALF], y[rank * HALF : (rank + 1) * HALF]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        out[name] = [p.detach().clone() for p in model.parameters()]
    return out


def _worker(rank, port, folder):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),
    )
    try:
        torch.save(_train(DistributedDataParallel, rank), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 60
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the DDP workers did not finish within 60 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train(lambda model: model)
    finally:
        torch.set_num_threads(threads)
    for rank in range(WORLD):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for name, params in single.items():
            for a, b in zip(ranked[name], params, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} rank {rank}")
