"""NGD, the exact damped natural gradient over all layers, against dense float64 solves."""

import math

import pytest
import torch
from torch import nn

from mbf_analysis import methods
from mbf_analysis.analysis import CosineConfig, CosineRun
from mbf_analysis.curvature import fisher_rows, per_sample_grads
from mbf_analysis.curvature.collect import (
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    PER_SAMPLE_GRAD,
    SAMPLED_GRAD,
    collect,
)
from mbf_analysis.errors import UnsupportedModuleError
from mbf_analysis.layout import model_layouts

DT = torch.float64
DAMPING = 0.05


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).to(DT)


def _batch(model, m=7):
    generator = torch.Generator().manual_seed(1)
    shape = (m, 5) if isinstance(model[0], nn.Linear) else (m, 1, 4, 4)
    x = torch.randn(*shape, generator=generator, dtype=DT)
    return x, torch.randint(0, 3, (m,), generator=generator)


def _flat_grads(stats, layouts):
    return torch.cat([stats.grad[name] for name in layouts])


def _dense_direction(model, x, y, kind):
    """``(F + λI)⁻¹ g`` with ``F`` the all-layer Fisher formed explicitly."""
    layouts = model_layouts(model)
    if kind == "empirical":
        grads = per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
        rows = torch.cat([layouts[name].flatten(grads).flatten(1) for name in layouts], dim=1)
    else:
        chunks = list(fisher_rows(model, nn.CrossEntropyLoss(), x, y, kind=kind))
        rows = torch.cat([torch.cat([c[name] for name in layouts], 1) for c in chunks])
    fisher = rows.T @ rows / len(x)
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {PER_SAMPLE_GRAD})
    g = _flat_grads(stats, layouts)
    return torch.linalg.solve(fisher + DAMPING * torch.eye(len(g), dtype=DT), g), fisher


@pytest.mark.parametrize("build, kind", [(_mlp, "empirical"), (_cnn, "empirical"), (_mlp, "exact")])
@pytest.mark.parametrize("solver", ["woodbury", "dense"])
def test_one_shot_direction_is_the_dense_damped_natural_gradient(build, kind, solver):
    model = build()
    x, y = _batch(model)
    expected, fisher = _dense_direction(model, x, y, kind)
    ngd = methods.get("ngd", damping=DAMPING, fisher=kind, solver=solver, momentum=0.0)
    need = {"empirical": PER_SAMPLE_GRAD, "exact": KRON_SAMPLES_EXACT}[kind]
    ngd.update(collect(model, nn.CrossEntropyLoss(), x, y, {need}))
    layouts = model_layouts(model)
    got = torch.cat([ngd.direction()[name] for name in layouts])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    start = 0
    for name, layout in layouts.items():  # matrix(): the layer's block of the all-layer F
        part = slice(start, start + layout.dim)
        torch.testing.assert_close(ngd.matrix(name), fisher[part, part], rtol=1e-10, atol=1e-12)
        start += layout.dim


def test_the_monte_carlo_rows_sum_to_the_sampled_label_gradient():
    """One pass gives both: Σ_n row_n · √m / m is the minibatch gradient on the same labels."""
    model = _mlp()
    x, y = _batch(model)
    stats = collect(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        {KRON_SAMPLES_SAMPLED, SAMPLED_GRAD},
        generator=torch.Generator().manual_seed(3),
    )
    ngd = methods.get("ngd", fisher="mc")
    rows = ngd.rows(stats)
    layouts = model_layouts(model)
    sampled = torch.cat([stats.sampled_grad[name] for name in layouts])
    assert rows.shape == (len(x), sum(layout.dim for layout in layouts.values()))
    torch.testing.assert_close(rows.sum(0) * math.sqrt(len(x)) / len(x), sampled)


def test_the_exact_fisher_on_a_convolution_is_refused_by_name():
    model = _cnn()
    x, y = _batch(model)
    ngd = methods.get("ngd", fisher="exact")
    stats = collect(model, nn.CrossEntropyLoss(), x, y, ngd.needs)
    with pytest.raises(UnsupportedModuleError, match=r"not Linear: 0 \(conv2d\).*'empirical'"):
        ngd.update(stats)


def test_decay_stacks_rows_and_the_moment_follows_every_gradient():
    model = _mlp()
    ngd = methods.get("ngd", damping=DAMPING, decay=0.5, momentum=0.0, stat_period=2)
    batches = [_batch(model, m) for m in (4, 5, 6)]
    for x, y in batches:
        ngd.update(collect(model, nn.CrossEntropyLoss(), x, y, ngd.next_needs()))
    # Updates 0 and 2 fold curvature (T1 = 2) into an EMA that starts at 0:
    # F = β (1 − β) F_0 + (1 − β) F_2 = 0.25 F_0 + 0.5 F_2; with momentum 0, m = g_2.
    layouts = model_layouts(model)
    fishers = [_dense_direction(model, x, y, "empirical")[1] for x, y in batches]
    expected_f = 0.25 * fishers[0] + 0.5 * fishers[2]
    g = _flat_grads(collect(model, nn.CrossEntropyLoss(), *batches[2], {PER_SAMPLE_GRAD}), layouts)
    expected = torch.linalg.solve(expected_f + DAMPING * torch.eye(len(g), dtype=DT), g)
    got = torch.cat([ngd.direction()[name] for name in layouts])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_ngd_points_where_the_all_layer_reference_points():
    """``cosine --reference full`` compares with ζ* = F_λ⁻¹∇; the one-shot NGD is ζ* itself."""
    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=DT)
    y = torch.randint(0, 3, (64,))
    config = CosineConfig(
        methods=["ngd", "kfac"], reference="full", iterations=3, batch_size=16, damping=DAMPING
    )
    frame = CosineRun(_mlp(), nn.CrossEntropyLoss(), x, y, config).run(progress=False)
    ngd = frame[frame.method == "ngd"]
    assert (ngd.cosine > 1 - 1e-9).all() and (ngd.energy_error < 1e-7).all()
    assert (frame[frame.method == "kfac"].cosine < 1 - 1e-3).any()
