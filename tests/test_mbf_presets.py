"""MBF's spatial-averaging rule in the training presets (``training/presets.py``).

- every MBF preset states its rule (``options["spatial_averaging"]``): the width rule (≥ 250) on
  the autoencoders, the size rule (``n_out·(n_in + 1)² > 10⁸``) elsewhere;
- the MNIST autoencoder's MBF, built as ``mbf-analyze train`` builds it, averages exactly the
  six layers with both widths ≥ 250, and its state has the size that the block shapes give.
"""

import pytest
import torch

from mbf_analysis.models import mnist_autoencoder
from mbf_analysis.optim.mbf import SpatialAveraging
from mbf_analysis.training.loop import make_optimizer
from mbf_analysis.training.presets import (
    AUTOENCODER_AVERAGING,
    PRESETS,
    SIZE_AVERAGING,
    get_preset,
)
from mbf_analysis.training.problems import get_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_mbf_preset_states_its_averaging_rule():
    assert AUTOENCODER_AVERAGING == SpatialAveraging(min_width=250)
    assert SIZE_AVERAGING == SpatialAveraging(threshold=10**8)
    seen = set()
    for (problem, optimizer), preset in PRESETS.items():
        if optimizer != "mbf":
            assert "spatial_averaging" not in preset.options, (problem, optimizer)
            continue
        expected = AUTOENCODER_AVERAGING if get_problem(problem).is_autoencoder else SIZE_AVERAGING
        assert preset.options["spatial_averaging"] == expected, problem
        seen.add(problem)
    assert {"mnist-ae", "faces-ae", "curves-ae", "vgg16-cifar100"} <= seen


def test_mnist_autoencoder_preset_averages_the_wide_layers():
    torch.manual_seed(0)
    model = mnist_autoencoder()
    opt = make_optimizer("mbf", model, get_preset("mnist-ae", "mbf", lr=1e-7))
    x = torch.rand(4, 784, generator=torch.Generator().manual_seed(0))
    get_problem("mnist-ae").loss_fn(model(x), x).backward()
    opt.step()
    modules = dict(model.named_modules())
    shapes = {}
    for name in (f"fc{k}" for k in range(1, 9)):
        layer = modules[name]
        shapes[name] = tuple(opt.state[layer.weight]["F"].shape)
        assert opt.state[layer.weight]["P"].shape == shapes[name]
    assert shapes == {
        "fc1": (1, 785, 785),
        "fc2": (1, 1001, 1001),
        "fc3": (1, 501, 501),
        "fc4": (30, 251, 251),
        "fc5": (250, 31, 31),
        "fc6": (1, 251, 251),
        "fc7": (1, 501, 501),
        "fc8": (1, 1001, 1001),
    }
    storages = {}
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    matrices = sum(b * s * s for b, s, _ in shapes.values())
    numel = sum(p.numel() for p in model.parameters())
    assert sum(storages.values()) == 4 * (numel + 2 * matrices)  # momentum, F and P (float32)
