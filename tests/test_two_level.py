"""Two-level KFAC (METHODS.md §6.2) against dense ground truth in float64.

Ground truth: the dense Fisher over all Linear layers in METHODS §2 order from torch.func
(empirical: per-sample gradients on the real labels; true: on the labels the collection pass
samples, drawn again with the same seed; exact: ``(1/m) Σ_n J_nᵀ H_n J_n`` with the softmax
Hessian), KFAC's ``M_l`` as an explicit ``[d, d]`` matrix built from ``A`` and ``G`` entry by
entry, and dense solves.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from mbf_analysis import methods
from mbf_analysis.curvature.collect import (
    GRAD,
    KFAC_FACTORS,
    KFAC_FACTORS_EXACT,
    KFAC_FACTORS_SAMPLED,
    KRON_SAMPLES,
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    STATISTICS,
    Stats,
    collect,
)
from mbf_analysis.curvature.kfac import KronFactors, KronSamples, to_matrix
from mbf_analysis.errors import UnsupportedModuleError
from mbf_analysis.layout import model_layouts
from mbf_analysis.methods.two_level import (
    COARSE_SPACES,
    RankOneRows,
    coarse_correction,
    coarse_matrix,
    fisher_product,
    sample_projections,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
M = 7
LAMBDA = 0.05
LAYERS = ("0", "2", "4")
KINDS = {"empirical": KRON_SAMPLES, "mc": KRON_SAMPLES_SAMPLED, "exact": KRON_SAMPLES_EXACT}
RESIDUAL_FORM = [c for c in COARSE_SPACES if c != "tselepidis"]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)
    ).to(DT)


def _problem(seed=0):
    model = _model(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    return (
        model,
        torch.randn(M, 3, generator=gen, dtype=DT),
        torch.randint(0, 3, (M,), generator=gen),
    )


def _stats(model, x, y, seed=0, needs=STATISTICS):
    gen = torch.Generator().manual_seed(seed)
    return collect(model, nn.CrossEntropyLoss(), x, y, needs, generator=gen)


def _layer_vector(tensors, layer):
    """METHODS §2 order ``[W[0,:], b[0], W[1,:], b[1], ...]`` of param-shaped ``[*, ...]``."""
    weight = tensors[f"{layer}.weight"]
    bias = tensors.get(f"{layer}.bias")
    if bias is not None:
        weight = torch.cat([weight, bias.unsqueeze(-1)], dim=-1)
    return weight.flatten(-2)


def _truth(model, x, y, kind, seed=0):
    """Dense ``F`` over every Linear layer (§2 order, layers in model order) and ``∇``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out_one(p, xn):
        return functional_call(model, p, (xn.unsqueeze(0),))[0]

    def loss_one(p, xn, yn):
        return nn.functional.cross_entropy(out_one(p, xn).unsqueeze(0), yn.unsqueeze(0))

    def rows_for(labels):
        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, labels)
        return torch.cat([_layer_vector(g, layer) for layer in LAYERS], dim=-1)

    real = rows_for(y)
    nabla = real.mean(0)
    if kind == "empirical":
        return real.T @ real / M, nabla
    if kind == "mc":
        probs = torch.softmax(model(x).detach(), dim=1)
        y_hat = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
        sampled = rows_for(y_hat.squeeze(1))
        return sampled.T @ sampled / M, nabla
    jac = vmap(jacrev(out_one), in_dims=(None, 0))(params, x)
    J = torch.cat([_layer_vector(jac, layer) for layer in LAYERS], dim=-1)  # [m, C, D]
    p = torch.softmax(model(x).detach(), dim=1)
    H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("ncd,nce,nef->df", J, H, J) / M, nabla


def _offsets(layouts):
    out, start = {}, 0
    for layer in LAYERS:
        out[layer] = slice(start, start + layouts[layer].dim)
        start += layouts[layer].dim
    return out


def _concat(vectors):
    return torch.cat([vectors[layer] for layer in LAYERS])


def _dense_rows(rows, layouts):
    """``R₀`` ``[q, D]`` from layer → ``[q_l, d_l]`` rows (§2 order)."""
    slices = _offsets(layouts)
    total = sum(layouts[layer].dim for layer in LAYERS)
    out = []
    for layer in LAYERS:
        for row in rows[layer]:
            full = row.new_zeros(total)
            full[slices[layer]] = row
            out.append(full)
    return torch.stack(out)


def _energy(zeta, F_lam, nabla):
    """``E(ζ) = (ζ − ζ*)ᵀ F_λ (ζ − ζ*)``."""
    error = zeta - torch.linalg.solve(F_lam, nabla)
    return float(error @ F_lam @ error)


def _kron_block(A, G):
    """``A ⊗ G`` in the §2 order of a Linear layer, entry by entry: ``F[(j,i),(j',i')] =
    A[i,i'] G[j,j']`` for ``W̄[j, i]`` at position ``j·a + i``."""
    a, g = A.shape[0], G.shape[0]
    return torch.einsum("ik,jl->jilk", A, G).reshape(g * a, g * a)


def _explicit_factors(samples):
    """KFAC's one-shot ``A = (1/m) Σ ā_nā_nᵀ`` and ``G = (1/m) Σ_nc δ_ncδ_ncᵀ``."""
    a, rows = samples.a, samples.rows.flatten(0, 1)
    return a.T @ a / len(samples.a), rows.T @ rows / len(samples.a)


def _explicit_inverse(samples, mode):
    """KFAC's damped layer matrix ``M_l`` (eigen: ``A⊗G + λI``; split: factored with π)."""
    A, G = _explicit_factors(samples)
    if mode == "eigen":
        return _kron_block(A, G) + LAMBDA * torch.eye(A.shape[0] * G.shape[0], dtype=DT)
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    root = math.sqrt(LAMBDA)
    eye_a, eye_g = torch.eye(A.shape[0], dtype=DT), torch.eye(G.shape[0], dtype=DT)
    return _kron_block(A + pi * root * eye_a, G + root / pi * eye_g)


def _one_shot(coarse, kind, mode="eigen", **extra):
    return methods.get(
        "kfac-two-level",
        coarse=coarse,
        fisher=kind,
        damping=LAMBDA,
        damping_mode=mode,
        decay=0.0,
        momentum=0.0,
        **extra,
    )


# ----------------------------------------------------------------------------- per-sample algebra
@pytest.mark.parametrize("kind", list(KINDS))
def test_fisher_product_and_coarse_matrix_equal_the_dense_fisher(kind):
    model, x, y = _problem()
    stats = _stats(model, x, y)
    samples = stats.statistic(KINDS[kind])
    layouts = model_layouts(model)
    F, _ = _truth(model, x, y, kind)
    gen = torch.Generator().manual_seed(3)
    V = {layer: torch.randn(layouts[layer].dim, generator=gen, dtype=DT) for layer in LAYERS}
    product = fisher_product(samples, {k: to_matrix(layouts[k], v) for k, v in V.items()})
    expected = F @ _concat(V)
    for layer, piece in _offsets(layouts).items():
        torch.testing.assert_close(product[layer].reshape(-1), expected[piece])
    # Per-layer projections: p_nc = ĝ_nc,lᵀ v_l.
    p = sample_projections(samples["2"], to_matrix(layouts["2"], V["2"]))
    assert p.shape == (M, samples["2"].rows.shape[1])
    # F_c = R₀ F_λ R₀ᵀ for random rows, two on each layer.
    rows = {layer: torch.randn(2, layouts[layer].dim, generator=gen, dtype=DT) for layer in LAYERS}
    R0 = _dense_rows(rows, layouts)
    F_c = coarse_matrix(samples, {k: to_matrix(layouts[k], r) for k, r in rows.items()}, LAMBDA)
    F_lam = F + LAMBDA * torch.eye(len(F), dtype=DT)
    torch.testing.assert_close(F_c, R0 @ F_lam @ R0.T)


@pytest.mark.parametrize("kind", list(KINDS))
def test_rank_one_rows_agree_with_their_dense_matrices(kind):
    model, x, y = _problem()
    stats = _stats(model, x, y)
    samples = stats.statistic(KINDS[kind])
    layouts = model_layouts(model)
    gen = torch.Generator().manual_seed(5)
    factored = {}
    for layer in LAYERS:
        g, a = to_matrix(layouts[layer], stats.grad[layer]).shape
        left, right = torch.randn(2, g, generator=gen, dtype=DT), torch.randn(2, a, generator=gen)
        factored[layer] = RankOneRows(left, right.to(DT))
    dense = {layer: R.dense() for layer, R in factored.items()}
    assert dense["0"].shape == (2, 4, 4)
    torch.testing.assert_close(
        dense["0"][1], torch.outer(factored["0"].left[1], factored["0"].right[1])
    )
    torch.testing.assert_close(
        coarse_matrix(samples, factored, LAMBDA), coarse_matrix(samples, dense, LAMBDA)
    )
    grads = {k: to_matrix(layouts[k], stats.grad[k]) for k in LAYERS}
    zeta0 = {k: 3.0 * v for k, v in grads.items()}
    for additive in (False, True):
        one, solve_one = coarse_correction(
            samples, factored, grads, zeta0, LAMBDA, additive=additive
        )
        two, solve_two = coarse_correction(samples, dense, grads, zeta0, LAMBDA, additive=additive)
        for layer in LAYERS:
            torch.testing.assert_close(one[layer], two[layer])
        torch.testing.assert_close(solve_one.rhs, solve_two.rhs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_coarse_space_spanning_everything_gives_the_natural_gradient(kind):
    model, x, y = _problem()
    stats = _stats(model, x, y)
    samples = stats.statistic(KINDS[kind])
    layouts = model_layouts(model)
    F, nabla = _truth(model, x, y, kind)
    F_lam = F + LAMBDA * torch.eye(len(F), dtype=DT)
    natural = torch.linalg.solve(F_lam, nabla)
    gen = torch.Generator().manual_seed(4)
    zeta0 = {layer: torch.randn(layouts[layer].dim, generator=gen, dtype=DT) for layer in LAYERS}
    rows = {k: to_matrix(layouts[k], torch.eye(layouts[k].dim, dtype=DT)) for k in LAYERS}
    matrices = {k: to_matrix(layouts[k], v) for k, v in zeta0.items()}
    grads = {k: to_matrix(layouts[k], stats.grad[k]) for k in LAYERS}
    for additive, expected in ((False, natural), (True, _concat(zeta0) + natural)):
        correction, solve = coarse_correction(
            samples, rows, grads, matrices, LAMBDA, additive=additive
        )
        zeta = _concat({k: zeta0[k] + correction[k].reshape(-1) for k in LAYERS})
        torch.testing.assert_close(zeta, expected, rtol=1e-9, atol=1e-11)
        gain = _energy(zeta, F_lam, nabla) - _energy(_concat(zeta0), F_lam, nabla)
        assert solve.gain() == pytest.approx(gain, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("coarse", ["krylov-nicolaides", "krylov-residual"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_two_rows_on_two_parameter_layers_span_everything(coarse, kind):
    """1→1→1 network, MSE: each layer has d = 2 and the Krylov spaces two rows per layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1)).to(DT)
    x, y = torch.randn(M, 1, dtype=DT), torch.randn(M, 1, dtype=DT)
    stats = collect(model, nn.MSELoss(), x, y, STATISTICS)
    method = _one_shot(coarse, kind, mode="split")
    method.update(stats)
    d = method.direction()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out_one(p, xn):
        return functional_call(model, p, (xn.unsqueeze(0),))[0]

    if kind == "empirical":
        residual = (model(x) - y).detach()  # ℓ = ½‖f − y‖², ∇ℓ = J_nᵀ (f − y)
        J = vmap(jacrev(out_one), in_dims=(None, 0))(params, x)
        rows = torch.cat([_layer_vector(J, k) for k in ("0", "2")], dim=-1)[:, 0]
        rows = rows * residual
    else:
        J = vmap(jacrev(out_one), in_dims=(None, 0))(params, x)
        rows = torch.cat([_layer_vector(J, k) for k in ("0", "2")], dim=-1)[:, 0]  # H = I
    F_lam = rows.T @ rows / M + LAMBDA * torch.eye(4, dtype=DT)
    nabla = torch.cat([stats.grad["0"], stats.grad["2"]])
    expected = torch.linalg.solve(F_lam, nabla)
    torch.testing.assert_close(torch.cat([d["0"], d["2"]]), expected, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- the coarse spaces
@pytest.mark.parametrize("mode", ["eigen", "split"])
@pytest.mark.parametrize("coarse", COARSE_SPACES)
def test_each_coarse_space_matches_its_explicit_construction(coarse, mode):
    kind = "exact"
    model, x, y = _problem()
    stats = _stats(model, x, y)
    layouts = model_layouts(model)
    method = _one_shot(coarse, kind, mode)
    method.update(stats)
    got = method.coarse_space()
    samples = stats.statistic(KINDS[kind])
    F, _ = _truth(model, x, y, kind)
    F_lam = F + LAMBDA * torch.eye(len(F), dtype=DT)
    inverses = {k: _explicit_inverse(samples[k], mode) for k in LAYERS}
    zeta0 = _concat({k: torch.linalg.solve(inverses[k], stats.grad[k]) for k in LAYERS})
    residual = _concat(stats.grad) - F_lam @ zeta0
    slices = _offsets(layouts)
    for layer in LAYERS:
        d = layouts[layer].dim
        ones = torch.ones(d, dtype=DT)
        inv = inverses[layer]
        rho = residual[slices[layer]]
        first_residual = torch.linalg.solve(inv, rho)
        expected = {
            "nicolaides": [ones],
            "tselepidis": [ones],
            "residual": [first_residual],
            "krylov-nicolaides": [ones, torch.linalg.solve(inv, ones)],
            "krylov-residual": [first_residual, torch.linalg.solve(inv, first_residual)],
        }
        if coarse == "spectral":
            A, G = _explicit_factors(samples[layer])
            w_a, q_a = torch.linalg.eigh(A)
            w_g, q_g = torch.linalg.eigh(G)
            row = torch.outer(q_g[:, 0], q_a[:, 0]).reshape(-1)  # W̄[j, i] at j·a + i
            assert got[layer].shape == (1, d)
            sign = torch.sign(got[layer][0] @ row)
            torch.testing.assert_close(got[layer][0], sign * row, rtol=1e-8, atol=1e-10)
            # vec(q_g q_aᵀ) is an eigenvector of A ⊗ G (and of its damped forms).
            kron = _kron_block(A, G) @ got[layer][0]
            torch.testing.assert_close(kron, w_a[0] * w_g[0] * got[layer][0], atol=1e-12, rtol=0)
            continue
        want = torch.stack(expected[coarse])
        torch.testing.assert_close(got[layer], want, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("mode", ["eigen", "split"])
@pytest.mark.parametrize("coarse", COARSE_SPACES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_direction_is_kfac_plus_the_dense_coarse_correction(kind, coarse, mode):
    """Two stateful steps; ζ₀ is KFAC's direction bit for bit; ζ against the dense formula."""
    model, x, y = _problem()
    first = _stats(model, x, y, seed=5)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    stats = _stats(model, x, y)
    layouts = model_layouts(model)
    settings = {"fisher": kind, "damping": LAMBDA, "damping_mode": mode}
    method = methods.get("kfac-two-level", coarse=coarse, **settings)
    kfac = methods.get("kfac", **settings)
    for s in (first, stats):
        method.update(s)
        kfac.update(s)
    F, _ = _truth(model, x, y, kind)
    F_lam = F + LAMBDA * torch.eye(len(F), dtype=DT)
    for grads in (None, stats.grad):
        zeta0 = kfac.direction(grads)
        inner = method.kfac.direction(grads)
        for layer in LAYERS:
            torch.testing.assert_close(inner[layer], zeta0[layer], rtol=0, atol=0)
        nabla = _concat(grads if grads is not None else {k: kfac.state[k]["m"] for k in LAYERS})
        R0 = _dense_rows(method.coarse_space(grads), layouts)
        R0 = R0 / R0.norm(dim=1, keepdim=True)  # the same range, better conditioned
        z0 = _concat(zeta0)
        rhs = R0 @ nabla if coarse == "tselepidis" else R0 @ (nabla - F_lam @ z0)
        beta = torch.linalg.pinv(R0 @ F_lam @ R0.T, hermitian=True) @ rhs  # R₀ may lose rank
        expected = z0 + R0.T @ beta
        got = method.direction(grads)
        torch.testing.assert_close(_concat(got), expected, rtol=1e-8, atol=1e-10)
        gain = _energy(expected, F_lam, nabla) - _energy(z0, F_lam, nabla)
        report = method.diagnostics()
        assert report["gain"] == pytest.approx(gain, rel=1e-7, abs=1e-12)
        assert report["rows"] == len(R0)
        if coarse != "tselepidis":  # the residual form never raises the energy error
            assert gain <= 1e-12 * _energy(z0, F_lam, nabla)
        cond = float(torch.linalg.cond(R0 @ F_lam @ R0.T))
        if cond < 1e12:
            assert report["condition"] == pytest.approx(cond, rel=1e-6)
        else:  # two parallel rows (softmax output layer: G1 = 0, so M⁻¹1 = 1/λ with "eigen")
            assert report["condition"] > 1e12


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("coarse", RESIDUAL_FORM)
def test_energy_error_never_rises_along_a_stateful_run(coarse, kind):
    model, x, y = _problem(seed=1)
    method = methods.get("kfac-two-level", coarse=coarse, fisher=kind, damping=LAMBDA)
    kfac = methods.get("kfac", fisher=kind, damping=LAMBDA)
    for step in range(3):
        stats = _stats(model, x, y, seed=step)
        method.update(stats)
        kfac.update(stats)
        F, nabla = _truth(model, x, y, kind, seed=step)
        F_lam = F + LAMBDA * torch.eye(len(F), dtype=DT)
        two_level = _energy(_concat(method.direction(stats.grad)), F_lam, nabla)
        one_level = _energy(_concat(kfac.direction(stats.grad)), F_lam, nabla)
        assert two_level <= one_level * (1 + 1e-10)
        with torch.no_grad():
            for layer, layout in model_layouts(model).items():
                for name, delta in layout.unflatten(method.direction()[layer]).items():
                    model.get_parameter(name).sub_(0.1 * delta)


def _block_diagonal_kronecker_stats():
    """Statistics whose Fisher is block-diagonal with exactly Kronecker blocks.

    Every sample has the same input ``ā`` on each layer, so ``(1/m) Σ_n (āāᵀ) ⊗ δ_nδ_nᵀ =
    A ⊗ G``; layer "0" has output gradients on the first half of the samples only and layer
    "1" on the second half only, so every cross-layer block ``(1/m) Σ_n (ā ā'ᵀ) ⊗ δ_n δ'_nᵀ``
    vanishes.
    """
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)).to(DT)
    layouts = model_layouts(model)
    gen = torch.Generator().manual_seed(0)
    m, half = 6, 3
    samples, factors = {}, {}
    for index, (layer, layout) in enumerate(layouts.items()):
        g, a = layout.param_shapes[0][0], layout.param_shapes[0][1] + 1
        inputs = torch.cat([torch.randn(1, a - 1, generator=gen, dtype=DT), torch.ones(1, 1)], 1)
        delta = torch.randn(m, g, generator=gen, dtype=DT)
        delta[(1 - index) * half : (2 - index) * half] = 0.0
        samples[layer] = KronSamples(inputs.expand(m, a).clone(), delta)
        factors[layer] = KronFactors(*_explicit_factors(samples[layer]))
    grads = {k: torch.randn(v.dim, generator=gen, dtype=DT) for k, v in layouts.items()}
    return Stats(
        layouts=layouts,
        grad=grads,
        loss=0.0,
        batch_size=m,
        kfac=factors,
        kron_samples=samples,
    )


@pytest.mark.parametrize("coarse", COARSE_SPACES)
def test_a_block_diagonal_kronecker_fisher_leaves_zeta0_unchanged(coarse):
    stats = _block_diagonal_kronecker_stats()
    method = _one_shot(coarse, "empirical", mode="eigen")
    kfac = methods.get(
        "kfac", fisher="empirical", damping=LAMBDA, damping_mode="eigen", decay=0.0, momentum=0.0
    )
    method.update(stats)
    kfac.update(stats)
    got, zeta0 = method.direction(), kfac.direction()
    change = max(float((got[k] - zeta0[k]).norm() / zeta0[k].norm()) for k in got)
    if coarse == "tselepidis":  # the additive form adds R₀ᵀF_c⁻¹R₀∇ even when ζ₀ is exact
        assert change > 1e-3
    else:
        assert change < 1e-12
        assert abs(method.diagnostics()["gain"]) < 1e-20


# ----------------------------------------------------------------------------- the method
def test_needs_follow_the_fisher_and_the_periods():
    expected = {
        "mc": (KFAC_FACTORS_SAMPLED, KRON_SAMPLES_SAMPLED),
        "empirical": (KFAC_FACTORS, KRON_SAMPLES),
        "exact": (KFAC_FACTORS_EXACT, KRON_SAMPLES_EXACT),
    }
    for kind, (factors, samples) in expected.items():
        method = methods.get("kfac-two-level", fisher=kind, stat_period=2, inverse_period=3)
        assert method.needs == {GRAD, factors, samples}
        seen = []
        for step in range(7):
            method.step = step
            seen.append(method.next_needs())
        everything, inverse, gradient = {GRAD, factors, samples}, {GRAD, factors}, {GRAD}
        assert seen == [everything, gradient, everything, inverse, everything, gradient, everything]
    assert methods.get("bdf").next_needs() == methods.get("bdf").needs  # the default


@pytest.mark.parametrize("coarse", ["spectral", "residual", "krylov-nicolaides"])
def test_collecting_only_the_next_needs_gives_the_same_run(coarse):
    model, x, y = _problem()
    settings = {"coarse": coarse, "fisher": "exact", "stat_period": 2, "inverse_period": 3}
    full, lean = (methods.get("kfac-two-level", **settings) for _ in range(2))
    for _ in range(6):
        with torch.no_grad():
            model[2].weight.mul_(0.9)
        full.update(_stats(model, x, y, needs=full.needs))
        lean.update(_stats(model, x, y, needs=lean.next_needs()))
        a, b = full.direction(), lean.direction()
        for layer in a:
            torch.testing.assert_close(b[layer], a[layer], rtol=0, atol=0)
        assert full.diagnostics() == lean.diagnostics()


def test_the_one_shot_configuration_reaches_the_inner_kfac():
    method = methods.get("kfac-two-level", decay=0.95, momentum=0.9, damping=0.2)
    assert method.kfac.config.decay == 0.95 and method.kfac.config.damping == 0.2
    method.config = method.config.one_shot()
    assert method.kfac.config.decay == 0.0 and method.kfac.config.momentum == 0.0
    assert method.kfac.config.damping == 0.2


def test_state_round_trip_keeps_the_inner_kfac_and_the_samples():
    model, x, y = _problem()
    method = methods.get("kfac-two-level", coarse="spectral", fisher="exact", stat_period=2)
    for seed in (0, 1):
        method.update(_stats(model, x, y, seed))
    restored = methods.get("kfac-two-level", coarse="spectral", fisher="exact", stat_period=2)
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    assert restored.kfac.state is restored.state and restored.kfac.step == 2
    for m in (method, restored):
        m.update(_stats(model, x, y, 2))
    a, b = method.direction(), restored.direction()
    for layer in a:
        torch.testing.assert_close(b[layer], a[layer], rtol=0, atol=0)
    assert set(method.state["0"]) >= {"m", "A", "G", "coarse_a", "coarse_delta", "coarse_q_a"}
    krylov = methods.get("kfac-two-level", coarse="krylov-nicolaides", inverse_period=2)
    krylov.update(_stats(model, x, y))
    assert "coarse_inverse_ones" in krylov.state["2"]


def test_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="direction"):
        methods.get("kfac-two-level").diagnostics()
    with pytest.raises(ValueError, match=r"TwoLevelKFACConfig\.coarse must be one of"):
        methods.get("kfac-two-level", coarse="previous")
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(2, 2)).to(DT)
    x, y = torch.randn(4, 1, 2, 2, dtype=DT), torch.randint(0, 2, (4,))
    stats = collect(model, nn.CrossEntropyLoss(), x, y, STATISTICS)
    method = methods.get("kfac-two-level", fisher="empirical")
    with pytest.raises(
        UnsupportedModuleError, match=r"nn\.Linear layers only.*'0' is an nn\.Conv2d"
    ):
        method.update(stats)
    assert method.state == {} and method.layouts is None


@pytest.mark.parametrize("coarse", COARSE_SPACES)
def test_float32_statistics_give_float32_directions_close_to_float64(coarse):
    model, x, y = _problem()
    settings = {"coarse": coarse, "fisher": "exact", "damping": LAMBDA}
    results = {}
    for dtype in (torch.float32, DT):
        net = copy.deepcopy(model).to(dtype)
        method = methods.get("kfac-two-level", **settings)
        method.update(_stats(net, x.to(dtype), y))
        results[dtype] = (method.direction(), method.diagnostics())
    (low, low_diag), (high, high_diag) = results[torch.float32], results[DT]
    for layer in high:
        assert low[layer].dtype == torch.float32
        torch.testing.assert_close(low[layer].double(), high[layer], rtol=2e-3, atol=2e-4)
    assert low_diag["gain"] == pytest.approx(high_diag["gain"], rel=1e-2, abs=1e-6)
