"""Cases shared by the optimizer tests: a tiny Conv/BN/Linear network and its batches."""

import torch
from torch import nn

DT = torch.float64


def net(seed=0, dtype=DT):
    """Conv (bias) → BN → ReLU → Conv (no bias, 2×2 kernels) → Linear → Tanh → Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(dtype)


def batches(n=8, m=6, seed=1, dtype=DT):
    """``n`` batches of ``m`` inputs ``[m, 2, 4, 4]`` with 3-class labels."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(m, 2, 4, 4, generator=gen, dtype=dtype),
            torch.randint(0, 3, (m,), generator=gen),
        )
        for _ in range(n)
    ]
