"""The collection pass: one forward, one backward (+ one for sampled labels), right statistics.

Conventions pinned here (METHODS.md §1): the minibatch gradient is the autograd gradient of the
mean loss ``(1/m) Σ ℓ_n`` with ``ℓ_n = ½‖f − y‖²`` for MSE, whatever the reduction of the loss
module; per-sample gradients are unscaled and average to the minibatch gradient.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from mbf_analysis.curvature.collect import (
    GRAD,
    KFAC_FACTORS,
    KFAC_FACTORS_EXACT,
    KFAC_FACTORS_SAMPLED,
    KRON_SAMPLES,
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    PER_SAMPLE_GRAD,
    SAMPLED_GRAD,
    STATISTICS,
    Stats,
    collect,
)
from mbf_analysis.curvature.losses import likelihood_of
from mbf_analysis.errors import MemoryBudgetError, TrainModeError, UnsupportedModuleError
from mbf_analysis.layout import model_layouts

DT = torch.float64
M = 5


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _problem(loss_kind="cross_entropy", cnn=True, seed=0):
    torch.manual_seed(seed)
    model = (_cnn() if cnn else _mlp()).to(DT).eval()
    x = torch.randn(M, 2, 4, 4, dtype=DT) if cnn else torch.randn(M, 4, dtype=DT)
    if loss_kind == "cross_entropy":
        y = torch.randint(0, 3, (M,))
    elif loss_kind == "mse":
        y = torch.randn(M, 3, dtype=DT)
    else:
        y = torch.randint(0, 2, (M, 3)).to(DT)
    return model, x, y


LOSS_MODULES = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}


def _mean_loss(kind, f, y):
    if kind == "cross_entropy":
        return nn.functional.cross_entropy(f, y)
    if kind == "mse":
        return 0.5 * ((f - y) ** 2).sum(1).mean()
    return nn.functional.binary_cross_entropy_with_logits(f, y, reduction="sum") / len(f)


def _flat(model, tensors):
    return {name: lay.flatten(tensors) for name, lay in model_layouts(model).items()}


def _autograd_grad(model, kind, x, y):
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(_mean_loss(kind, model(x), y), list(model.parameters()))
    return _flat(model, dict(zip(names, grads, strict=True)))


NEEDS = [
    {GRAD},
    {PER_SAMPLE_GRAD},
    {KFAC_FACTORS},
    {SAMPLED_GRAD},
    {KFAC_FACTORS_SAMPLED},
    {PER_SAMPLE_GRAD, KFAC_FACTORS},
    {KRON_SAMPLES},
    {KRON_SAMPLES, KFAC_FACTORS, PER_SAMPLE_GRAD},
    {KRON_SAMPLES_SAMPLED, SAMPLED_GRAD},
    {KRON_SAMPLES_EXACT},
    {KFAC_FACTORS_EXACT, PER_SAMPLE_GRAD},
    set(STATISTICS),
]


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "+".join(sorted(n)))
def test_one_forward_and_one_backward_plus_one_for_sampled_labels_and_exact_rows(needs):
    model, x, y = _problem()
    calls = {"forward": 0, "backward": 0}

    def count_backward(_grad):
        calls["backward"] += 1

    def count_forward(_module, _args, output):
        calls["forward"] += 1
        output.register_hook(count_backward)

    handle = model.register_forward_hook(count_forward)
    collect(model, nn.CrossEntropyLoss(), x, y, needs)
    handle.remove()
    sampled = bool(needs & {SAMPLED_GRAD, KFAC_FACTORS_SAMPLED, KRON_SAMPLES_SAMPLED})
    exact = bool(needs & {KFAC_FACTORS_EXACT, KRON_SAMPLES_EXACT})  # one batched pass
    assert calls == {"forward": 1, "backward": 1 + int(sampled) + int(exact)}


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("loss_kind", list(LOSS_MODULES))
def test_minibatch_gradient_is_autograd_gradient_of_the_mean_loss(loss_kind, per_sample):
    model, x, y = _problem(loss_kind)
    needs = {PER_SAMPLE_GRAD} if per_sample else {GRAD}
    # The reduction of the loss module is ignored.
    stats = collect(model, LOSS_MODULES[loss_kind](reduction="sum"), x, y, needs)
    expected = _autograd_grad(model, loss_kind, x, y)
    for name, g in expected.items():
        torch.testing.assert_close(stats.grad[name], g, rtol=1e-10, atol=1e-12)
    assert stats.loss == pytest.approx(_mean_loss(loss_kind, model(x), y).item(), rel=1e-12)
    assert stats.batch_size == M


def test_per_sample_gradients_are_unscaled_and_average_to_the_gradient():
    model, x, y = _problem("mse")
    stats = collect(model, nn.MSELoss(), x, y, {PER_SAMPLE_GRAD})
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        f = functional_call(model, p, (xi[None],))[0]
        return 0.5 * ((f - yi) ** 2).sum()

    reference = _flat(model, vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y))
    for name, g in reference.items():
        torch.testing.assert_close(stats.per_sample[name], g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.per_sample[name].mean(0), stats.grad[name])


@pytest.mark.parametrize("loss_kind", list(LOSS_MODULES))
def test_sampled_gradient_is_the_gradient_on_labels_drawn_from_the_model(loss_kind):
    model, x, y = _problem(loss_kind)
    stats = collect(
        model,
        LOSS_MODULES[loss_kind](),
        x,
        y,
        {SAMPLED_GRAD, PER_SAMPLE_GRAD},
        generator=torch.Generator().manual_seed(3),
    )
    with torch.no_grad():
        f = model(x)
    y_hat = likelihood_of(LOSS_MODULES[loss_kind]()).sample_targets(
        f, torch.Generator().manual_seed(3)
    )
    expected = _autograd_grad(model, loss_kind, x, y_hat)
    for name, g in expected.items():
        torch.testing.assert_close(stats.sampled_grad[name], g, rtol=1e-10, atol=1e-12)
    # The real-label statistics are unaffected by the extra pass.
    for name, g in _autograd_grad(model, loss_kind, x, y).items():
        torch.testing.assert_close(stats.grad[name], g, rtol=1e-10, atol=1e-12)


def test_only_needed_fields_are_filled_and_kfac_factors_share_a():
    model, x, y = _problem()
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {GRAD})
    assert stats.per_sample is None and stats.sampled_grad is None
    assert stats.kfac is None and stats.kfac_sampled is None
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS, KFAC_FACTORS_SAMPLED})
    assert set(stats.kfac) == {"0", "3", "5"}  # Linear and Conv2d layers, not BatchNorm
    for name, (a, g) in stats.kfac.items():
        assert stats.kfac_sampled[name].A is a
        assert not torch.equal(stats.kfac_sampled[name].G, g)


def test_model_grads_and_hooks_are_left_untouched():
    model, x, y = _problem()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    hooks_before = [len(m._forward_hooks) for m in model.modules()]
    collect(model, nn.CrossEntropyLoss(), x, y, STATISTICS)
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())
    assert [len(m._forward_hooks) for m in model.modules()] == hooks_before
    assert all(not hasattr(p, "grad_batch") for p in model.parameters())


def test_per_sample_statistics_need_eval_mode_but_the_gradient_does_not():
    model, x, y = _problem()
    model.train()
    collect(model, nn.CrossEntropyLoss(), x, y, {GRAD, KFAC_FACTORS})
    with pytest.raises(TrainModeError, match="model.eval"):
        collect(model, nn.CrossEntropyLoss(), x, y, {PER_SAMPLE_GRAD})


def test_unknown_or_missing_statistics_are_named():
    model, x, y = _problem(cnn=False)
    with pytest.raises(KeyError, match="per_sample"):
        collect(model, nn.CrossEntropyLoss(), x, y, {"per_sample"})
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {GRAD})
    assert isinstance(stats, Stats)
    with pytest.raises(ValueError, match="lack 'per_sample_grad'"):
        stats.statistic(PER_SAMPLE_GRAD)
    with pytest.raises(ValueError, match="batch size"):
        collect(model, nn.CrossEntropyLoss(), x, y[:-1], {GRAD})


# ----------------------------------------------------------------------------- Kronecker samples
def _preactivation_jacobians(model, x):
    """Per sample n: the network output's Jacobian with respect to each Linear pre-activation."""
    names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    out = {}
    for n in range(len(x)):
        for name in names:
            idx = int(name)
            head = model[: idx + 1]
            tail = model[idx + 1 :]
            s = head(x[n : n + 1]).detach()
            out.setdefault(name, []).append(torch.func.jacrev(tail)(s)[0, :, 0, :])
    return {name: torch.stack(j) for name, j in out.items()}  # [m, C, g]


def _linear_inputs(model, x):
    """ā_n of every Linear layer of a Sequential, ``[m, a]``."""
    out, h = {}, x
    for i, module in enumerate(model):
        if isinstance(module, nn.Linear):
            out[str(i)] = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1).detach()
        h = module(h)
    return out


@pytest.mark.parametrize("loss_kind", list(LOSS_MODULES))
def test_kron_samples_are_homogeneous_inputs_and_unscaled_output_gradients(loss_kind):
    model, x, y = _problem(loss_kind, cnn=False)
    loss_fn = LOSS_MODULES[loss_kind]()
    gen = torch.Generator().manual_seed(4)
    stats = collect(
        model,
        loss_fn,
        x,
        y,
        {KRON_SAMPLES, KRON_SAMPLES_SAMPLED, KRON_SAMPLES_EXACT, PER_SAMPLE_GRAD, SAMPLED_GRAD},
        generator=gen,
    )
    inputs = _linear_inputs(model, x)
    jac = _preactivation_jacobians(model, x)
    likelihood = likelihood_of(loss_fn)
    f = model(x).detach()
    with torch.no_grad():
        y_hat = likelihood.sample_targets(f, torch.Generator().manual_seed(4))

    def dloss(target):  # ∂ℓ_n/∂f_n with the METHODS §1 convention, [m, C]
        f_req = f.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(likelihood.per_sample_loss(f_req, target).sum(), f_req)
        return grad

    hessian_roots = likelihood.sqrt_hessian(f)  # [m, C, C]
    for name, layout in model_layouts(model).items():
        real, sampled, exact = (
            stats.kron_samples[name],
            stats.kron_samples_sampled[name],
            stats.kron_samples_exact[name],
        )
        torch.testing.assert_close(real.a, inputs[name])
        assert sampled.a is real.a and exact.a is real.a
        torch.testing.assert_close(real.delta, torch.einsum("nc,ncg->ng", dloss(y), jac[name]))
        torch.testing.assert_close(
            sampled.delta, torch.einsum("nc,ncg->ng", dloss(y_hat), jac[name])
        )
        # δ_nc = J_nᵀ s_nc: Γ_n = Σ_c δ_nc δ_ncᵀ = J_nᵀ H_n J_n.
        torch.testing.assert_close(
            exact.delta, torch.einsum("nck,ncg->nkg", hessian_roots, jac[name])
        )
        # The per-sample gradient of a Linear layer is δ_n ⊗ ā_n in METHODS §2 order.
        grads = (real.delta.unsqueeze(2) * real.a.unsqueeze(1)).flatten(1)
        torch.testing.assert_close(grads, stats.per_sample[name])
        sampled_grad = (sampled.delta.unsqueeze(2) * sampled.a.unsqueeze(1)).flatten(1).mean(0)
        torch.testing.assert_close(sampled_grad, stats.sampled_grad[name])
        assert layout.kind == "linear"


def test_exact_kfac_factor_averages_the_exact_rows_and_shares_a():
    model, x, y = _problem()
    stats = collect(
        model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS, KFAC_FACTORS_EXACT, KRON_SAMPLES_EXACT}
    )
    assert set(stats.kron_samples_exact) == {"5"}  # the Linear layer; Conv2d layers have none
    rows = stats.kron_samples_exact["5"].rows
    torch.testing.assert_close(stats.kfac_exact["5"].G, torch.einsum("ncg,nch->gh", rows, rows) / M)
    for name, (a, _g) in stats.kfac_exact.items():
        assert stats.kfac[name].A is a


def test_exact_statistics_respect_the_memory_budget():
    model, x, y = _problem(cnn=False)
    with pytest.raises(MemoryBudgetError, match="output-Hessian columns.*fisher='mc'"):
        collect(model, nn.CrossEntropyLoss(), x, y, {KRON_SAMPLES_EXACT}, memory_budget=64)


def test_kron_samples_need_two_dimensional_linear_inputs():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten()).to(DT)
    x, y = torch.randn(M, 2, 4, dtype=DT), torch.randn(M, 6, dtype=DT)
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Linear\) need inputs of shape"):
        collect(model, nn.MSELoss(), x, y, {KRON_SAMPLES})
    collect(model, nn.MSELoss(), x, y, {KFAC_FACTORS})  # KFAC's factors cover this case
