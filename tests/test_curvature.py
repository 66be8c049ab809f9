"""Curvature extraction against dense float64 ground truth (torch.func and explicit loops).

Conventions pinned here (METHODS.md §1): ``g_n`` is the gradient of sample n's own loss, not
divided by the batch size; the MSE per-sample loss is ``½‖f - y‖²`` (so ``H_n = I``); the
reduction of the loss module is ignored; the empirical Fisher is ``(1/N) Σ g_n g_nᵀ`` and the
true Fisher ``(1/N) Σ J_nᵀ H_n J_n``.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from mbf_analysis.curvature import (
    fisher_rows,
    layer_fisher,
    likelihood_of,
    miniblock_fisher,
    per_sample_grads,
)
from mbf_analysis.errors import (
    InplaceModuleError,
    MemoryBudgetError,
    NonFiniteError,
    TrainModeError,
    UnsupportedModuleError,
)
from mbf_analysis.layout import model_layouts

DT = torch.float64
N = 6


# ----------------------------------------------------------------------------- cases
def _mlp():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _mlp_no_bias():
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3))


def _cnn_stride_padding():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)
    )


def _cnn_pool_1x1_5x5():
    return nn.Sequential(
        nn.Conv2d(2, 3, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 5, padding=2, bias=False),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2, 3),
    )


def _cnn_nonsquare_dilation_groups():
    return nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), padding=(1, 0), dilation=(1, 2), groups=2),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 4, 3),
    )


def _mlp_batchnorm_eval():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


CASES = {
    "mlp": (_mlp, (5,)),
    "mlp-no-bias": (_mlp_no_bias, (5,)),
    "cnn-stride-padding": (_cnn_stride_padding, (2, 6, 6)),
    "cnn-pool-1x1-5x5": (_cnn_pool_1x1_5x5, (2, 4, 4)),
    "cnn-nonsquare-dilation-groups": (_cnn_nonsquare_dilation_groups, (2, 5, 6)),
    "mlp-batchnorm-eval": (_mlp_batchnorm_eval, (5,)),
}
LOSSES = ["cross_entropy", "mse", "bce"]


def _loss_module(kind):
    return {
        "cross_entropy": nn.CrossEntropyLoss(),
        "mse": nn.MSELoss(),
        "bce": nn.BCEWithLogitsLoss(),
    }[kind]


def _explicit_loss(kind, f, y):
    """The per-sample loss written out: the independent reference for every convention."""
    if kind == "cross_entropy":
        return -torch.log_softmax(f, 0).gather(0, y.reshape(1)).squeeze(0)
    if kind == "mse":
        return 0.5 * ((f - y) ** 2).sum()
    return (torch.nn.functional.softplus(f) - y * f).sum()


def _problem(case, loss_kind, seed=0):
    torch.manual_seed(seed)
    build, in_shape = CASES[case]
    model = build().to(DT)
    x = torch.randn(N, *in_shape, dtype=DT)
    if loss_kind == "cross_entropy":
        y = torch.randint(0, 3, (N,))
    elif loss_kind == "mse":
        y = torch.randn(N, 3, dtype=DT)
    else:
        y = torch.randint(0, 2, (N, 3)).to(DT)
    return model, x, y


def _reference_per_sample(model, loss_kind, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return _explicit_loss(loss_kind, functional_call(model, p, (xi[None],))[0], yi)

    return vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _explicit_order(model, name, tensors):
    """Layer vector in METHODS §2 order, written independently of mbf_analysis.layout."""
    module = model.get_submodule(name)
    w = tensors[f"{name}.weight"]
    b = tensors.get(f"{name}.bias")
    lead = w.shape[: w.dim() - module.weight.dim()]
    if isinstance(module, nn.Linear):
        return (torch.cat([w, b.unsqueeze(-1)], -1) if b is not None else w).reshape(*lead, -1)
    parts = [w.reshape(*lead, -1)] + ([b.reshape(*lead, -1)] if b is not None else [])
    return torch.cat(parts, -1)


def _reference_efm(model, loss_kind, x, y):
    grads = _reference_per_sample(model, loss_kind, x, y)
    out = {}
    for name in model_layouts(model):
        g = _explicit_order(model, name, grads)
        out[name] = sum(torch.outer(g[n], g[n]) for n in range(len(x))) / len(x)
    return out


def _reference_true_fisher(model, loss_kind, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), (None, 0))(
        params, x
    )
    f = model(x).detach()
    hess = torch.stack(
        [hessian(lambda o, i=i: _explicit_loss(loss_kind, o, y[i]))(f[i]) for i in range(len(x))]
    )
    out = {}
    for name in model_layouts(model):
        j = _explicit_order(model, name, jac)  # [N, C, d]
        out[name] = torch.einsum("nci,ncd,ndj->ij", j, hess, j) / len(x)
    return out


# ----------------------------------------------------------------------------- per-sample
@pytest.mark.parametrize("loss_kind", LOSSES)
@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_grads_match_vmap(case, loss_kind):
    model, x, y = _problem(case, loss_kind)
    got = per_sample_grads(model, _loss_module(loss_kind), x, y, chunk_size=4)
    ref = _reference_per_sample(model, loss_kind, x, y)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].shape == (N, *dict(model.named_parameters())[name].shape)
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_kind", LOSSES)
def test_mean_per_sample_grad_is_minibatch_grad_of_mean_loss(loss_kind):
    """g = (1/m) Σ g_n, with the reduction of the loss module ignored (pinned scaling)."""
    model, x, y = _problem("cnn-stride-padding", loss_kind)
    got = per_sample_grads(model, _loss_module(loss_kind), x, y)
    out = model(x)
    if loss_kind == "cross_entropy":
        loss = nn.functional.cross_entropy(out, y)  # mean over samples
    elif loss_kind == "mse":
        # nn.MSELoss(mean) averages over N·C entries and drops the ½: rescale to ours.
        loss = nn.functional.mse_loss(out, y) * out.shape[1] / 2
    else:
        loss = nn.functional.binary_cross_entropy_with_logits(out, y) * out.shape[1]
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(got[name].mean(0), e, rtol=1e-10, atol=1e-12)


def test_reduction_of_loss_module_is_ignored():
    model, x, y = _problem("mlp", "mse")
    a = per_sample_grads(model, nn.MSELoss(reduction="mean"), x, y)
    b = per_sample_grads(model, nn.MSELoss(reduction="sum"), x, y)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("loss_kind", LOSSES)
@pytest.mark.parametrize("case", list(CASES))
def test_empirical_fisher_matches_explicit_outer_products(case, loss_kind):
    model, x, y = _problem(case, loss_kind)
    got = layer_fisher(model, _loss_module(loss_kind), x, y, kind="empirical", chunk_size=4)
    ref = _reference_efm(model, loss_kind, x, y)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_kind", LOSSES)
@pytest.mark.parametrize("case", list(CASES))
def test_exact_fisher_matches_jacobian_hessian_ggn(case, loss_kind):
    model, x, y = _problem(case, loss_kind)
    got = layer_fisher(model, _loss_module(loss_kind), x, y, kind="exact", chunk_size=4)
    ref = _reference_true_fisher(model, loss_kind, x, y)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_kind", ["cross_entropy", "mse"])
def test_exact_backends_agree(loss_kind):
    """BackPACK's SqrtGGNExact (fast, one pass) against C output-Hessian passes (reference)."""
    model, x, y = _problem("cnn-pool-1x1-5x5", loss_kind)
    loss_fn = _loss_module(loss_kind)
    for backend_rows in zip(
        fisher_rows(model, loss_fn, x, y, kind="exact", exact_backend="backpack"),
        fisher_rows(model, loss_fn, x, y, kind="exact", exact_backend="output_hessian"),
        strict=True,
    ):
        fast, slow = backend_rows
        for name in fast:
            torch.testing.assert_close(fast[name].T @ fast[name], slow[name].T @ slow[name])


def test_exact_fisher_on_residual_network_uses_output_hessian_path():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(5, 5)
            self.act = nn.Tanh()
            self.fc2 = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc2(x + self.act(self.fc1(x)))

    torch.manual_seed(0)
    model = Residual().to(DT)
    x, y = torch.randn(N, 5, dtype=DT), torch.randint(0, 3, (N,))
    got = layer_fisher(model, nn.CrossEntropyLoss(), x, y, kind="exact")
    ref = _reference_true_fisher(model, "cross_entropy", x, y)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)
    with pytest.raises(UnsupportedModuleError, match="output_hessian"):
        next(
            fisher_rows(model, nn.CrossEntropyLoss(), x, y, kind="exact", exact_backend="backpack")
        )


@pytest.mark.parametrize("kind", ["empirical", "exact", "mc"])
@pytest.mark.parametrize("case", ["mlp", "cnn-nonsquare-dilation-groups", "mlp-batchnorm-eval"])
def test_miniblocks_are_the_diagonal_blocks_of_the_layer_fisher(case, kind):
    model, x, y = _problem(case, "cross_entropy")
    dense = layer_fisher(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        kind=kind,
        mc_samples=3,
        generator=torch.Generator().manual_seed(1),
    )
    blocks = miniblock_fisher(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        kind=kind,
        mc_samples=3,
        generator=torch.Generator().manual_seed(1),
        chunk_size=2,
    )
    layouts = model_layouts(model)
    expected_keys = [g.key for layout in layouts.values() for g in layout.groups]
    assert list(blocks) == expected_keys
    for name, layout in layouts.items():
        for key, block in layout.extract_blocks(dense[name]).items():
            torch.testing.assert_close(blocks[key], block, rtol=1e-10, atol=1e-13)


def test_miniblock_shapes_follow_the_issue():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, (3, 2)), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 3, 4)
    ).to(DT)
    x, y = torch.randn(N, 2, 4, 4, dtype=DT), torch.randint(0, 4, (N,))
    blocks = miniblock_fisher(model, nn.CrossEntropyLoss(), x, y)
    assert blocks["0.weight"].shape == (6, 6, 6)
    assert blocks["0.bias"].shape == (3, 1, 1)
    assert blocks["3"].shape == (4, 19, 19)


# ----------------------------------------------------------------------------- Monte Carlo
def test_mc_fisher_is_the_empirical_fisher_of_sampled_labels():
    """With M = 1, the MC Fisher is exactly the EFM at labels drawn from the model."""
    model, x, y = _problem("cnn-stride-padding", "cross_entropy")
    lik = likelihood_of(nn.CrossEntropyLoss())
    with torch.no_grad():
        sampled = lik.sample_targets(model(x), torch.Generator().manual_seed(7))
    mc = layer_fisher(
        model, nn.CrossEntropyLoss(), x, y, kind="mc", generator=torch.Generator().manual_seed(7)
    )
    ref = _reference_efm(model, "cross_entropy", x, sampled)
    for name in ref:
        torch.testing.assert_close(mc[name], ref[name], rtol=1e-10, atol=1e-12)


def test_mc_fisher_is_reproducible_and_independent_of_chunking():
    model, x, y = _problem("mlp", "bce")
    kwargs = dict(kind="mc", mc_samples=4)
    a = layer_fisher(
        model,
        nn.BCEWithLogitsLoss(),
        x,
        y,
        generator=torch.Generator().manual_seed(3),
        chunk_size=1,
        **kwargs,
    )
    b = layer_fisher(
        model, nn.BCEWithLogitsLoss(), x, y, generator=torch.Generator().manual_seed(3), **kwargs
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_kind", LOSSES)
def test_mc_fisher_approaches_exact_fisher(loss_kind):
    """Relative Frobenius error of the MC estimate shrinks like 1/√M.

    Each entry of the MC Fisher is a mean of N·M i.i.d. terms, so its standard error falls as
    1/√M. With M = 4000 draws (N = 6) the relative error measured over seeds is ~1-3%; the
    bound 0.08 leaves a factor > 2.5 of slack, and the error at M = 4000 must also be at most
    half the error at M = 40 (the expected ratio is 10).
    """
    model, x, y = _problem("mlp", loss_kind)
    exact = layer_fisher(model, _loss_module(loss_kind), x, y, kind="exact")

    def rel_error(m):
        mc = layer_fisher(
            model,
            _loss_module(loss_kind),
            x,
            y,
            kind="mc",
            mc_samples=m,
            generator=torch.Generator().manual_seed(0),
        )
        num = sum(torch.linalg.norm(mc[k] - exact[k]) ** 2 for k in exact)
        return float(num.sqrt() / sum(torch.linalg.norm(exact[k]) ** 2 for k in exact).sqrt())

    few, many = rel_error(40), rel_error(4000)
    assert many < 0.08
    assert many < few / 2


def test_label_sampler_follows_the_predictive_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=DT).expand(20000, 3)
    ce = likelihood_of(nn.CrossEntropyLoss()).sample_targets(logits, gen)
    freq = torch.bincount(ce, minlength=3).to(DT) / len(ce)
    torch.testing.assert_close(freq, torch.softmax(logits[0], 0), atol=0.01, rtol=0)
    bce = likelihood_of(nn.BCEWithLogitsLoss()).sample_targets(logits, gen)
    torch.testing.assert_close(bce.mean(0), torch.sigmoid(logits[0]), atol=0.01, rtol=0)
    mse = likelihood_of(nn.MSELoss()).sample_targets(logits, gen)
    torch.testing.assert_close((mse - logits).var(0), torch.ones(3, dtype=DT), atol=0.05, rtol=0)


# ----------------------------------------------------------------------------- cross-check
def test_empirical_fisher_matches_curvlinops_ef():
    from curvlinops import EFLinearOperator

    model, x, y = _problem("cnn-stride-padding", "cross_entropy")
    params = [p for p in model.parameters()]
    ef = EFLinearOperator(model, nn.CrossEntropyLoss(reduction="mean"), params, [(x, y)])
    dense = ef @ torch.eye(sum(p.numel() for p in params), dtype=DT)
    ours = layer_fisher(model, nn.CrossEntropyLoss(), x, y)
    offset = 0
    for name, layout in model_layouts(model).items():
        # Our order, expressed as indices into curvlinops' [vec W (row-major), b] order.
        index = {
            n: torch.arange(offset + start, offset + start + p.numel()).reshape(p.shape)
            for n, p, start in _param_offsets(model, layout.param_names)
        }
        order = layout.flatten(index)
        offset += layout.dim
        # curvlinops, reduction='mean': (1/N) Σ g_n g_nᵀ, the same scale as ours.
        torch.testing.assert_close(ours[name], dense[order][:, order], rtol=1e-10, atol=1e-12)


def _param_offsets(model, names):
    params = dict(model.named_parameters())
    start = 0
    for n in names:
        yield n, params[n], start
        start += params[n].numel()


# ----------------------------------------------------------------------------- dtype, state
def test_float32_agrees_with_float64():
    model, x, y = _problem("cnn-pool-1x1-5x5", "cross_entropy")
    ref = layer_fisher(model, nn.CrossEntropyLoss(), x, y, kind="exact")
    model32 = model.float()
    got = layer_fisher(model32, nn.CrossEntropyLoss(), x.float(), y, kind="exact")
    for name in ref:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-4, atol=1e-6)


def test_extraction_leaves_model_and_grads_untouched():
    model, x, y = _problem("mlp", "cross_entropy")
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    layer_fisher(model, nn.CrossEntropyLoss(), x, y, kind="exact")
    per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert not hasattr(module, "output") and not hasattr(module, "input0")
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 3.0))
        assert not hasattr(p, "grad_batch")


def test_layers_argument_restricts_the_result():
    model, x, y = _problem("mlp", "cross_entropy")
    got = layer_fisher(model, nn.CrossEntropyLoss(), x, y, layers=["2"])
    assert list(got) == ["2"]
    full = layer_fisher(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(got["2"], full["2"], rtol=1e-12, atol=1e-14)
    # The other layers are frozen only for the pass, also when the stream is abandoned.
    assert all(p.requires_grad for p in model.parameters())
    rows = fisher_rows(model, nn.CrossEntropyLoss(), x, y, layers=["2"], chunk_size=2)
    next(rows)
    assert not model[0].weight.requires_grad
    rows.close()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(KeyError, match=r"'nope'.*\['0', '2'\]"):
        layer_fisher(model, nn.CrossEntropyLoss(), x, y, layers=["nope"])


# ----------------------------------------------------------------------------- bad input
def test_inplace_activation_is_refused_by_name():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(N, 5, dtype=DT), torch.randint(0, 3, (N,))
    with pytest.raises(InplaceModuleError, match=r"'1' \(ReLU\).*inplace=False"):
        per_sample_grads(model, nn.CrossEntropyLoss(), x, y)


def test_batchnorm_in_train_mode_is_refused():
    model = _mlp_batchnorm_eval().train().to(DT)
    x, y = torch.randn(N, 5, dtype=DT), torch.randint(0, 3, (N,))
    with pytest.raises(TrainModeError, match=r"'1' \(BatchNorm1d\).*model.eval\(\)"):
        layer_fisher(model, nn.CrossEntropyLoss(), x, y)


def test_module_without_per_sample_support_is_named():
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(N, 5, dtype=DT), torch.randint(0, 3, (N,))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(LayerNorm\)"):
        per_sample_grads(model, nn.CrossEntropyLoss(), x, y)


def test_non_finite_gradient_names_the_parameter():
    model, x, y = _problem("mlp", "cross_entropy")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameter '0\.weight'"):
        layer_fisher(model, nn.CrossEntropyLoss(), x, y)


def test_dense_block_over_budget_is_refused_up_front():
    model = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 3)).to(DT)
    x, y = torch.randn(4, 300, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(MemoryBudgetError, match=r"layer '0' \(60200×60200\) needs 27\.0 GiB"):
        layer_fisher(model, nn.CrossEntropyLoss(), x, y, memory_budget=2**30)
    blocks = miniblock_fisher(model, nn.CrossEntropyLoss(), x, y, memory_budget=2**30)
    assert blocks["0"].shape == (200, 301, 301)


def test_unsupported_loss_and_bad_arguments():
    model, x, y = _problem("mlp", "cross_entropy")
    with pytest.raises(TypeError, match="supported losses: CrossEntropyLoss, MSELoss"):
        per_sample_grads(model, nn.NLLLoss(), x, y)
    with pytest.raises(ValueError, match="Fisher kind must be one of .* is now spelled 'mc'"):
        layer_fisher(model, nn.CrossEntropyLoss(), x, y, kind="true")
    with pytest.raises(ValueError, match="batch size"):
        per_sample_grads(model, nn.CrossEntropyLoss(), x, y[:-1])
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        layer_fisher(model, nn.CrossEntropyLoss(), x, y, chunk_size=0)
    with pytest.raises(ValueError, match="label smoothing"):
        per_sample_grads(model, nn.CrossEntropyLoss(label_smoothing=0.1), x, y)
