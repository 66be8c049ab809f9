"""KFAC / KFC factors, their layout, their exactness statements, and the KFAC method.

Scaling pinned here (see :mod:`mbf_analysis.curvature.kfac`): ``A = (1/m) Σ_n Σ_t ā ā ᵀ``,
``G = (1/(m T)) Σ_n Σ_t δ δᵀ`` with ``T`` output locations; curvlinops' ``KFACLinearOperator``
(expand, reduction="mean") has ``A / T`` and ``T G``; for MSE its ``G`` is ``4/C`` (empirical) or
``2/C`` (sampled labels) times ours.
"""

import math

import pytest
import torch
from torch import nn

from mbf_analysis import methods
from mbf_analysis.curvature import layer_fisher
from mbf_analysis.curvature.collect import (
    KFAC_FACTORS,
    KFAC_FACTORS_EXACT,
    KFAC_FACTORS_SAMPLED,
    collect,
)
from mbf_analysis.curvature.kfac import (
    from_matrix,
    input_factor,
    kron_layout_matrix,
    to_matrix,
)
from mbf_analysis.errors import UnsupportedModuleError
from mbf_analysis.layout import layout_of, model_layouts
from mbf_analysis.linalg import kron_damped_solve_eigen, kron_damped_solve_split

DT = torch.float64
M = 6


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _psd(n, seed):
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n + 1, generator=gen, dtype=DT)
    return root @ root.T / n


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(4, 3),
        nn.Linear(4, 3, bias=False),
        nn.Conv2d(2, 3, (2, 3)),
        nn.Conv2d(2, 3, 2, bias=False),
    ],
    ids=["linear", "linear-no-bias", "conv", "conv-no-bias"],
)
def test_layout_matrix_is_the_kronecker_product_acting_on_w_bar(module):
    layout = layout_of("layer", module.to(DT))
    weight = torch.randn_like(module.weight)
    tensors = {"layer.weight": weight}
    w_bar = weight.reshape(weight.shape[0], -1)
    if module.bias is not None:
        tensors["layer.bias"] = torch.randn_like(module.bias)
        w_bar = torch.cat([w_bar, tensors["layer.bias"].unsqueeze(1)], dim=1)
    vector = layout.flatten(tensors)
    torch.testing.assert_close(to_matrix(layout, vector), w_bar)
    torch.testing.assert_close(from_matrix(layout, w_bar), vector)
    g, a = w_bar.shape
    A, G = _psd(a, 0), _psd(g, 1)
    # (A ⊗ G) vec(V) = vec(G V Aᵀ) for column-stacked vec, expressed in the §2 order.
    product = kron_layout_matrix(layout, A, G) @ vector
    torch.testing.assert_close(product, from_matrix(layout, G @ w_bar @ A.T))


# ----------------------------------------------------------------------------- factors
def test_linear_factors_are_input_and_preactivation_gradient_moments():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(4, 5).to(DT), nn.Linear(5, 3).to(DT)
    model = nn.Sequential(fc1, nn.Tanh(), fc2)
    x, y = torch.randn(M, 4, dtype=DT), torch.randint(0, 3, (M,))
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})
    s1 = fc1(x)
    h = torch.tanh(s1)
    s2 = fc2(h)
    d1, d2 = torch.autograd.grad(nn.functional.cross_entropy(s2, y, reduction="sum"), [s1, s2])
    ones = torch.ones(M, 1, dtype=DT)
    for name, inp, delta in (("0", x, d1), ("2", h, d2)):
        a_bar = torch.cat([inp, ones], 1).detach()
        torch.testing.assert_close(stats.kfac[name].A, a_bar.T @ a_bar / M)
        torch.testing.assert_close(stats.kfac[name].G, delta.T @ delta / M)


def test_conv_factors_sum_patches_and_average_output_gradients_over_locations():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 2, stride=2, padding=1).to(DT)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(27, 3)).to(DT)
    x, y = torch.randn(M, 2, 4, 4, dtype=DT), torch.randint(0, 3, (M,))
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})
    out = conv(x)
    (delta,) = torch.autograd.grad(
        nn.functional.cross_entropy(model[2](out.flatten(1)), y, reduction="sum"), [out]
    )
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    A = torch.zeros(9, 9, dtype=DT)
    G = torch.zeros(3, 3, dtype=DT)
    T = out.shape[2] * out.shape[3]
    for n in range(M):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                patch = padded[n, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(-1)
                a_bar = torch.cat([patch, torch.ones(1, dtype=DT)])
                A += torch.outer(a_bar, a_bar) / M
                G += torch.outer(delta[n, :, i, j], delta[n, :, i, j]) / (M * T)
    torch.testing.assert_close(stats.kfac["0"].A, A)
    torch.testing.assert_close(stats.kfac["0"].G, G)


def test_grouped_convolution_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)).to(DT)
    x, y = torch.randn(3, 2, 4, 4, dtype=DT), torch.randint(0, 3, (3,))
    with pytest.raises(UnsupportedModuleError, match="'0'.*groups=2"):
        collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})


def _curvlinops(model, loss_fn, x, y, fisher_type):
    from curvlinops import KFACLinearOperator

    op = KFACLinearOperator(
        model,
        loss_fn,
        list(model.parameters()),
        [(x, y)],
        fisher_type=fisher_type,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    return op


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_factors_match_curvlinops_up_to_the_documented_constants(loss, fisher_type):
    torch.manual_seed(2)
    model = _cnn().to(DT)
    x = torch.randn(M, 2, 4, 4, dtype=DT)
    if loss == "cross_entropy":
        loss_fn, y, g_scale = nn.CrossEntropyLoss(), torch.randint(0, 3, (M,)), 1.0
    else:
        C = 3
        loss_fn, y = nn.MSELoss(), torch.randn(M, C, dtype=DT)
        g_scale = (4.0 if fisher_type == "empirical" else 2.0) / C
    op = _curvlinops(model, loss_fn, x, y, fisher_type)
    # Same seed and the same sampling calls as curvlinops: the same labels.
    need = KFAC_FACTORS if fisher_type == "empirical" else KFAC_FACTORS_SAMPLED
    stats = collect(
        model, loss_fn, x, y, {need}, generator=torch.Generator().manual_seed(2147483647)
    )
    factors = stats.kfac if fisher_type == "empirical" else stats.kfac_sampled
    locations = {"0": 16, "2": 4, "4": 1}  # T = o_h·o_w of each layer
    for name, (A, G) in factors.items():
        T = locations[name]
        torch.testing.assert_close(op._input_covariances[name], A / T)
        torch.testing.assert_close(op._gradient_covariances[name], g_scale * T * G)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_exact_factors_match_curvlinops_type2_up_to_the_documented_constants(loss):
    # curvlinops' "type-2" Fisher backpropagates the columns of the output-Hessian roots, as
    # the exact pass of collect does; for MSE its Hessian is (2/C) I, ours I.
    torch.manual_seed(8)
    model = _cnn().to(DT)
    x = torch.randn(M, 2, 4, 4, dtype=DT)
    if loss == "cross_entropy":
        loss_fn, y, g_scale = nn.CrossEntropyLoss(), torch.randint(0, 3, (M,)), 1.0
    else:
        loss_fn, y, g_scale = nn.MSELoss(), torch.randn(M, 3, dtype=DT), 2.0 / 3
    op = _curvlinops(model, loss_fn, x, y, "type-2")
    stats = collect(model, loss_fn, x, y, {KFAC_FACTORS_EXACT})
    locations = {"0": 16, "2": 4, "4": 1}
    for name, (A, G) in stats.kfac_exact.items():
        T = locations[name]
        torch.testing.assert_close(op._input_covariances[name], A / T)
        torch.testing.assert_close(op._gradient_covariances[name], g_scale * T * G)


def test_kronecker_products_match_curvlinops_dense_matrix():
    torch.manual_seed(3)
    model = _cnn().to(DT)
    x, y = torch.randn(M, 2, 4, 4, dtype=DT), torch.randint(0, 3, (M,))
    op = _curvlinops(model, nn.CrossEntropyLoss(), x, y, "empirical")
    dense = op @ torch.eye(sum(p.numel() for p in model.parameters()), dtype=DT)
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})
    offset = 0
    for name, layout in model_layouts(model).items():
        # Our §2 order as indices into curvlinops' [W row-major, b] order.
        index, start = {}, offset
        for pname, shape in zip(layout.param_names, layout.param_shapes, strict=True):
            numel = math.prod(shape)
            index[pname] = torch.arange(start, start + numel).reshape(shape)
            start += numel
        order = layout.flatten(index)
        offset = start
        ours = kron_layout_matrix(layout, *stats.kfac[name])
        torch.testing.assert_close(ours, dense[order][:, order])


# ----------------------------------------------------------------------------- exactness
def _linear_net(bias=True):
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Linear(4, 4, bias=bias), nn.Linear(4, 2))


def test_one_data_point_empirical_kfac_is_the_empirical_fisher_block():
    # For one sample the per-sample gradient of a layer is δ āᵀ, so its outer product is
    # exactly (ā āᵀ) ⊗ (δ δᵀ): true for any network, linear or not.
    torch.manual_seed(4)
    for model in (_linear_net(), nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))):
        model = model.to(DT)
        x, y = torch.randn(1, 3, dtype=DT), torch.randint(0, 2, (1,))
        stats = collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})
        fisher = layer_fisher(model, nn.CrossEntropyLoss(), x, y, kind="empirical")
        for name, layout in model_layouts(model).items():
            torch.testing.assert_close(kron_layout_matrix(layout, *stats.kfac[name]), fisher[name])


def test_one_data_point_expected_kfac_is_the_exact_fisher_block():
    # For one sample, F_l = (ā āᵀ) ⊗ E_ŷ[δ̂ δ̂ᵀ]: KFAC with G averaged over the model's labels is
    # exact. A single sampled label is not; enumerating the classes with weights p_c is.
    torch.manual_seed(5)
    model = _linear_net().to(DT)
    x = torch.randn(1, 3, dtype=DT)
    p = torch.softmax(model(x).detach(), 1)[0]
    expected = {}
    for c in range(2):
        stats = collect(model, nn.CrossEntropyLoss(), x, torch.tensor([c]), {KFAC_FACTORS})
        for name, layout in model_layouts(model).items():
            term = p[c] * kron_layout_matrix(layout, *stats.kfac[name])
            expected[name] = expected.get(name, 0) + term
    exact = layer_fisher(model, nn.CrossEntropyLoss(), x, torch.tensor([0]), kind="exact")
    for name in exact:
        torch.testing.assert_close(expected[name], exact[name])


def test_deep_linear_gaussian_network_kfac_is_exact_for_any_batch_but_not_in_general():
    # With no activations and H = I (MSE), δ_n = Bᵀ(f_n − ŷ_n) with B = ∂f/∂s_l the product of
    # the later weights, independent of the input, so E[δ δᵀ] = BᵀB for every sample and the
    # exact Fisher block is A ⊗ BᵀB for any batch size. With softmax outputs H_n depends on x_n
    # and the Kronecker product is only an approximation once m > 1.
    torch.manual_seed(6)
    model = _linear_net().to(DT)
    x, y = torch.randn(M, 3, dtype=DT), torch.randn(M, 2, dtype=DT)
    stats = collect(model, nn.MSELoss(), x, y, {KFAC_FACTORS})
    exact = layer_fisher(model, nn.MSELoss(), x, y, kind="exact")
    weights = [model[i].weight.detach() for i in range(3)]
    for i, (name, layout) in enumerate(model_layouts(model).items()):
        B = torch.eye(2, dtype=DT)
        for w in reversed(weights[i + 1 :]):
            B = B @ w
        kfac = kron_layout_matrix(layout, stats.kfac[name].A, B.T @ B)
        torch.testing.assert_close(kfac, exact[name])
    y_cls = torch.randint(0, 2, (M,))
    exact_ce = layer_fisher(model, nn.CrossEntropyLoss(), x, y_cls, kind="exact")
    stats_ce = collect(model, nn.CrossEntropyLoss(), x, y_cls, {KFAC_FACTORS})
    layout = model_layouts(model)["0"]
    assert not torch.allclose(kron_layout_matrix(layout, *stats_ce.kfac["0"]), exact_ce["0"])


def test_exact_kfac_is_the_exact_fisher_block_where_the_kronecker_structure_holds():
    # One sample (any network), and a deep linear Gaussian network (any batch): KFAC on the
    # exact Fisher then equals the exact Fisher block, with no sampling and no enumeration.
    torch.manual_seed(9)
    deep = _linear_net().to(DT)
    tanh_net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    cases = [
        (tanh_net, nn.CrossEntropyLoss(), torch.randn(1, 3, dtype=DT), torch.tensor([1])),
        (deep, nn.MSELoss(), torch.randn(M, 3, dtype=DT), torch.randn(M, 2, dtype=DT)),
    ]
    for model, loss_fn, x, y in cases:
        kfac = methods.get("kfac", fisher="exact", decay=0.0)
        kfac.update(collect(model, loss_fn, x, y, kfac.needs))
        exact = layer_fisher(model, loss_fn, x, y, kind="exact")
        for name in exact:
            torch.testing.assert_close(kfac.matrix(name), exact[name])


# ----------------------------------------------------------------------------- method
def _kfac_problem(seed=7):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 3),
    ).to(DT)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    return model, torch.randn(M, 2, 4, 4, dtype=DT), torch.randint(0, 3, (M,))


@pytest.mark.parametrize("mode", ["eigen", "split"])
def test_one_shot_kfac_direction_solves_the_kronecker_system(mode):
    model, x, y = _kfac_problem()
    damping = 0.05
    d = methods.directions(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        ["kfac"],
        damping=damping,
        kfac={"fisher": "empirical", "damping_mode": mode},
    )["kfac"]
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS})
    layouts = model_layouts(model)
    for name, (A, G) in stats.kfac.items():
        V = to_matrix(layouts[name], stats.grad[name])
        vec = V.T.reshape(-1)  # column-stacked
        if mode == "eigen":
            system = torch.kron(A, G) + damping * torch.eye(vec.numel(), dtype=DT)
            reference = kron_damped_solve_eigen(A, G, V, damping)
        else:
            pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
            root = math.sqrt(damping)
            eye_a, eye_g = torch.eye(A.shape[0], dtype=DT), torch.eye(G.shape[0], dtype=DT)
            system = torch.kron(A + pi * root * eye_a, G + root / pi * eye_g)
            reference = kron_damped_solve_split(A, G, V, damping)
        X = torch.linalg.solve(system, vec).reshape(V.shape[1], V.shape[0]).T
        torch.testing.assert_close(to_matrix(layouts[name], d[name]), X)
        torch.testing.assert_close(X, reference)
    # BatchNorm has no Kronecker factors: its direction is the momentum (here g).
    torch.testing.assert_close(d["1"], stats.grad["1"])


def test_true_fisher_kfac_uses_the_sampled_label_factors():
    model, x, y = _kfac_problem()
    stats = collect(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        {KFAC_FACTORS, KFAC_FACTORS_SAMPLED},
        generator=torch.Generator().manual_seed(0),
    )
    true, emp = methods.get("kfac", fisher="mc"), methods.get("kfac", fisher="empirical")
    for method in (true, emp):
        method.update(stats)
    layout = model_layouts(model)["4"]
    torch.testing.assert_close(
        true.matrix("4"), 0.1**2 * kron_layout_matrix(layout, *stats.kfac_sampled["4"])
    )
    torch.testing.assert_close(
        emp.matrix("4"), 0.1**2 * kron_layout_matrix(layout, *stats.kfac["4"])
    )


@pytest.mark.parametrize("mode", ["eigen", "split"])
def test_inverses_are_refreshed_every_inverse_period(mode):
    model, x, y = _kfac_problem()
    kfac = methods.get(
        "kfac", fisher="empirical", damping_mode=mode, inverse_period=2, decay=0.5, damping=0.1
    )
    reference = methods.get("kfac", fisher="empirical", damping_mode=mode, decay=0.5, damping=0.1)
    batches = [(x[:3], y[:3]), (x[3:], y[3:]), (x, y)]
    for k, (xb, yb) in enumerate(batches):
        stats = collect(model, nn.CrossEntropyLoss(), xb, yb, {KFAC_FACTORS})
        kfac.update(stats)
        if k != 1:
            reference.update(stats)
            continue
        # Step 1: statistics updated, inverse kept from step 0 (the reference's state).
        momentum = {layer: slot["m"] for layer, slot in kfac.state.items() if "m" in slot}
        stale = reference.direction(momentum)
        torch.testing.assert_close(kfac.direction()["4"], stale["4"])
        reference.update(stats)
    torch.testing.assert_close(kfac.direction()["4"], reference.direction()["4"])


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        nn.Conv2d(2, 3, 3, padding="same", bias=False),
        nn.Conv2d(2, 3, 1, stride=3),
    ],
    ids=["stride-padding-dilation", "same-no-bias", "1x1-stride"],
)
def test_input_factor_equals_the_gram_matrix_of_unfolded_patches(conv):
    conv = conv.to(DT)
    x = torch.randn(3, 2, 7, 6, dtype=DT)
    padding = conv.padding if not isinstance(conv.padding, str) else (1, 1)
    patches = nn.functional.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
    ).transpose(1, 2)
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=DT)], dim=2)
    rows = patches.flatten(0, 1)
    torch.testing.assert_close(input_factor(conv, x), rows.T @ rows / 3)


def test_a_float32_eigendecomposition_that_fails_is_redone_in_float64(monkeypatch):
    """float32 eigh can fail to converge on real autoencoder factors; eigen_inverse then works
    in float64 and gives the float64 answer."""
    from mbf_analysis.curvature import kfac as curvature_kfac

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    A, G = (a.T @ a / 12), (g.T @ g / 9)
    eigh = torch.linalg.eigh

    def failing_in_float32(M):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    got = curvature_kfac.eigen_inverse(A.float(), G.float())
    ref = curvature_kfac.eigen_inverse(A, G)
    assert got.q_a.dtype == torch.float32
    V = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    x = curvature_kfac.apply_eigen_inverse(got, V.float(), 1e-2).double()
    x_ref = curvature_kfac.apply_eigen_inverse(ref, V, 1e-2)
    assert torch.allclose(x, x_ref, rtol=1e-4, atol=1e-5)
