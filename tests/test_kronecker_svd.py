"""The Kronecker-SVD family (METHODS.md §6.1) against dense ground truth in float64.

Ground truth: the dense ``F = (1/m) Σ_n (ā_nā_nᵀ) ⊗ Γ_n`` (KFAC order), its dense
rearrangement ``Z`` and ``torch.linalg.svdvals(Z)``; dense solves for the inverses.
"""

import functools
import math

import pytest
import torch
from torch import nn

from mbf_analysis import methods
from mbf_analysis.curvature import layer_fisher
from mbf_analysis.curvature.collect import (
    GRAD,
    KRON_SAMPLES,
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    STATISTICS,
    collect,
)
from mbf_analysis.curvature.kfac import KronSamples, kron_layout_matrix, to_matrix
from mbf_analysis.layout import model_layouts
from mbf_analysis.linalg import (
    apply_rank2_kron_inverse,
    rank2_kron_damped_solve,
    rank2_kron_inverse,
)
from mbf_analysis.methods.kronecker_svd import (
    APPROXIMATIONS,
    apply_split_rank2_inverse,
    clear_negligible,
    kfac_factors,
    kronecker_approximation,
    rearranged_fisher,
    sample_grams,
    split_rank2_inverse,
    z_matvec,
    z_rmatvec,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
M = 6
KINDS = {"empirical": KRON_SAMPLES, "mc": KRON_SAMPLES_SAMPLED, "exact": KRON_SAMPLES_EXACT}
TIGHT = {"tol": 1e-14, "max_iter": 2000}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


@functools.cache
def _stats(m=M, seed=0):
    model = _model(seed)
    x, y = torch.randn(m, 3, dtype=DT), torch.randint(0, 3, (m,))
    gen = torch.Generator().manual_seed(seed)
    return model, x, y, collect(model, nn.CrossEntropyLoss(), x, y, STATISTICS, generator=gen)


def _samples(kind, layer="0", m=M, seed=0):
    return _stats(m, seed)[3].statistic(KINDS[kind])[layer]


def _dense_fisher(samples):
    """``(1/m) Σ_n (ā_nā_nᵀ) ⊗ Γ_n`` for column-stacked ``vec W̄``."""
    a, rows = samples.a, samples.rows
    gammas = torch.einsum("nci,ncj->nij", rows, rows)
    terms = [torch.kron(torch.outer(a[n], a[n]), gammas[n]) for n in range(len(a))]
    return sum(terms) / len(a)


def _kron_sum(factors):
    return sum(torch.kron(A, G) for A, G in factors)


def _rel_error_sq(samples, factors):
    F = _dense_fisher(samples)
    return float((F - _kron_sum(factors)).square().sum() / F.square().sum())


CASES = [(kind, layer) for kind in KINDS for layer in ("0", "2")]


# ----------------------------------------------------------------------------- Z
@pytest.mark.parametrize(("kind", "layer"), CASES)
def test_matrix_free_products_equal_the_dense_rearrangement(kind, layer):
    samples = _samples(kind, layer)
    Z = rearranged_fisher(samples)
    a, g = samples.a.shape[1], samples.rows.shape[2]
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(g, g, generator=gen, dtype=DT)
    U = torch.randn(a, a, generator=gen, dtype=DT)
    torch.testing.assert_close(z_matvec(samples, V).reshape(-1), Z @ V.T.reshape(-1))
    torch.testing.assert_close(z_rmatvec(samples, U).reshape(-1), Z.T @ U.T.reshape(-1))
    F = _dense_fisher(samples)
    torch.testing.assert_close(torch.linalg.matrix_norm(Z), torch.linalg.matrix_norm(F))
    k_a, k_g = sample_grams(samples)
    torch.testing.assert_close((k_a * k_g).sum().sqrt() / len(k_a), torch.linalg.matrix_norm(F))
    # Van Loan–Pitsianis: ‖F − A⊗G‖ = ‖Z − vec(A) vec(G)ᵀ‖ for any A, G.
    A, G = U + U.T, V @ V.T
    lhs = torch.linalg.matrix_norm(F - torch.kron(A, G))
    rhs = torch.linalg.matrix_norm(Z - torch.outer(A.T.reshape(-1), G.T.reshape(-1)))
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_per_sample_fisher_is_the_layer_fisher_block(kind):
    model, x, y, stats = _stats()
    layouts = model_layouts(model)
    reference_kind = {"empirical": "empirical", "exact": "exact", "mc": "mc"}[kind]
    gen = torch.Generator().manual_seed(0)  # the same labels as the collection pass
    blocks = layer_fisher(
        model, nn.CrossEntropyLoss(), x, y, kind=reference_kind, generator=gen, mc_samples=1
    )
    for layer, layout in layouts.items():
        samples = stats.statistic(KINDS[kind])[layer]
        a, rows = samples.a, samples.rows
        grads = (rows.unsqueeze(3) * a.unsqueeze(1).unsqueeze(2)).flatten(2).flatten(0, 1)
        torch.testing.assert_close(grads.T @ grads / M, blocks[layer])
        A, G = kfac_factors(samples)
        kfac = methods.get("kfac", fisher=kind, decay=0.0)
        kfac.update(stats)
        torch.testing.assert_close(kfac.matrix(layer), kron_layout_matrix(layout, A, G))


# ----------------------------------------------------------------------------- approximations
def test_kpsvd_of_an_exact_kronecker_product_recovers_it():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(7, 4, generator=gen, dtype=DT)
    base = torch.randn(2, 3, generator=gen, dtype=DT)  # r = 2 rows per sample, shared shape
    scale = torch.rand(7, generator=gen, dtype=DT) + 0.5
    samples = KronSamples(a, scale[:, None, None] * base)  # Γ_n = c_n² Γ, F = A' ⊗ Γ exactly
    F = _dense_fisher(samples)
    for solver in ("gram", "matrix"):
        for name in APPROXIMATIONS:
            result = kronecker_approximation(samples, name, solver=solver, **TIGHT)
            torch.testing.assert_close(_kron_sum(result.factors), F)
        kpsvd = kronecker_approximation(samples, "kpsvd", solver=solver)
        A, G = kpsvd.factors[0]
        assert float(torch.linalg.eigvalsh(A).min()) > -1e-12 and float(A.trace()) > 0
        assert float(torch.linalg.eigvalsh(G).min()) > -1e-12
        deflation = kronecker_approximation(samples, "deflation", solver=solver)
        assert float(deflation.sigma[1]) == 0.0
        assert not deflation.factors[1].A.any() and not deflation.factors[1].G.any()


@pytest.mark.parametrize("kind", list(KINDS))
def test_with_one_sample_every_method_is_exact_and_kpsvd_is_kfac(kind):
    samples = _samples(kind, "2", m=1, seed=3)
    F = _dense_fisher(samples)
    A, G = kfac_factors(samples)
    for name in APPROXIMATIONS:
        result = kronecker_approximation(samples, name)
        torch.testing.assert_close(_kron_sum(result.factors), F)
        assert all(bool(torch.isfinite(t).all()) for pair in result.factors for t in pair)
    kpsvd = kronecker_approximation(samples, "kpsvd").factors[0]
    torch.testing.assert_close(torch.kron(*kpsvd), torch.kron(A, G))
    # The rank-2 methods' directions stay finite with a vanishing second pair.
    _, _, _, stats = _stats(1, 3)
    for name in ("deflation", "lanczos", "kfac-corrected"):
        method = methods.get(name, fisher=kind)
        method.update(stats)
        assert all(bool(torch.isfinite(d).all()) for d in method.direction().values())
        assert all(diag["clamped"] == 0 for diag in method.diagnostics().values())


@pytest.mark.parametrize("solver", ["gram", "matrix"])
@pytest.mark.parametrize(("kind", "layer"), CASES)
def test_errors_are_the_dense_svd_optima_and_ordered(kind, layer, solver):
    samples = _samples(kind, layer)
    sv = torch.linalg.svdvals(rearranged_fisher(samples))
    total = float(sv.square().sum())
    errors = {
        name: _rel_error_sq(
            samples, kronecker_approximation(samples, name, solver=solver, **TIGHT).factors
        )
        for name in APPROXIMATIONS
    }
    errors["kfac"] = _rel_error_sq(samples, [kfac_factors(samples)])
    assert errors["kpsvd"] == pytest.approx(1 - float(sv[0] ** 2) / total, abs=1e-12)
    assert errors["deflation"] == pytest.approx(1 - float(sv[:2].square().sum()) / total, abs=1e-12)
    assert errors["deflation"] <= errors["kpsvd"] <= errors["kfac"]
    assert errors["kfac-corrected"] <= errors["kfac"]
    assert errors["lanczos"] >= errors["deflation"] - 1e-12
    # KFAC-corrected adds the leading pair of the residual Z − vec(A)vec(G)ᵀ.
    A, G = kfac_factors(samples)
    residual = rearranged_fisher(samples) - torch.outer(A.reshape(-1), G.reshape(-1))
    sigma = float(torch.linalg.svdvals(residual)[0])
    expected = (float(residual.square().sum()) - sigma**2) / total
    assert errors["kfac-corrected"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("kind", "layer"), CASES)
def test_lanczos_ritz_pairs_and_many_steps_equal_deflation(kind, layer):
    samples = _samples(kind, layer)
    total = float(rearranged_fisher(samples).square().sum())
    two = kronecker_approximation(samples, "lanczos", lanczos_steps=2)
    # The Ritz triplets are orthogonal with ⟨u_i, Z v_j⟩ = σ_i δ_ij, so e² = 1 − Σ σ̃²/‖Z‖².
    expected = 1 - float(two.sigma.square().sum()) / total
    assert _rel_error_sq(samples, two.factors) == pytest.approx(expected, abs=1e-12)
    many = kronecker_approximation(samples, "lanczos", lanczos_steps=M + 2)  # rank Z ≤ m
    deflation = kronecker_approximation(samples, "deflation", **TIGHT)
    torch.testing.assert_close(_kron_sum(many.factors), _kron_sum(deflation.factors))
    torch.testing.assert_close(many.sigma, deflation.sigma)


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_pairs_are_signed_so_that_tr_a_is_positive_and_solvers_agree_with_warm_starts(name):
    samples = _samples("mc", "0")
    gen = torch.Generator().manual_seed(5)
    warm = tuple((lambda r: r @ r.T)(torch.randn(4, 4, generator=gen, dtype=DT)) for _ in range(2))
    gram = kronecker_approximation(samples, name, warm=warm, solver="gram")
    matrix = kronecker_approximation(samples, name, warm=warm, solver="matrix")
    for (a_g, g_g), (a_m, g_m) in zip(gram.factors, matrix.factors, strict=True):
        torch.testing.assert_close(a_g, a_m)
        torch.testing.assert_close(g_g, g_m)
        assert float(a_g.trace()) >= 0
    torch.testing.assert_close(gram.sigma, matrix.sigma)
    if name == "kfac-corrected":
        torch.testing.assert_close(gram.factors[0], kfac_factors(samples))


def test_float32_gram_iteration_matches_float64():
    samples = _samples("mc", "0")
    single = KronSamples(samples.a.float(), samples.delta.float())
    for name in APPROXIMATIONS:
        double = kronecker_approximation(samples, name).factors
        result = kronecker_approximation(single, name, tol=1e-6)
        assert result.factors[0].A.dtype == torch.float32
        torch.testing.assert_close(
            _kron_sum(result.factors).double(), _kron_sum(double), rtol=1e-4, atol=1e-5
        )


# ----------------------------------------------------------------------------- inverses
def _sym(n, gen, psd):
    root = torch.randn(n, n + 1, generator=gen, dtype=DT)
    return root @ root.T / n if psd else (root[:, :n] + root[:, :n].T) / 2


@pytest.mark.parametrize("pi", [1.0, 1.7])
def test_rank2_inverse_is_the_dense_solve(pi):
    gen = torch.Generator().manual_seed(6)
    a, g, lam = 4, 3, 0.1
    A1, G1 = _sym(a, gen, True), _sym(g, gen, True)
    A2, G2 = 0.1 * _sym(a, gen, False), 0.1 * _sym(g, gen, False)
    V = torch.randn(g, a, generator=gen, dtype=DT)
    X, clamped = rank2_kron_damped_solve(A1, G1, A2, G2, V, lam, pi=pi)
    root = math.sqrt(lam)
    eye_a, eye_g = torch.eye(a, dtype=DT), torch.eye(g, dtype=DT)
    dense = torch.kron(A1 + pi * root * eye_a, G1 + root / pi * eye_g) + torch.kron(A2, G2)
    reference = torch.linalg.solve(dense, V.T.reshape(-1)).reshape(a, g).T
    torch.testing.assert_close(X, reference)
    assert int(clamped) == 0


def test_rank2_denominators_below_the_floor_are_clamped_and_counted():
    gen = torch.Generator().manual_seed(7)
    a, g, lam, floor = 4, 3, 0.01, 0.5
    A1, G1 = _sym(a, gen, True), _sym(g, gen, True)
    A2, G2 = 2 * _sym(a, gen, False), 2 * _sym(g, gen, False)  # large and indefinite
    inverse = rank2_kron_inverse(A1, G1, A2, G2, lam, floor=floor)
    # Reference: the generalized eigenvalues of (A₂, A₁'), (G₂, G₁') and the dense congruence.
    root = math.sqrt(lam)
    s_a = torch.linalg.eigvals(torch.linalg.solve(A1 + root * torch.eye(a, dtype=DT), A2)).real
    s_g = torch.linalg.eigvals(torch.linalg.solve(G1 + root * torch.eye(g, dtype=DT), G2)).real
    raw = 1 + torch.outer(s_g, s_a)
    assert int(inverse.clamped) == int((raw <= floor).sum()) > 0
    assert float(inverse.denom.min()) == floor
    V = torch.randn(g, a, generator=gen, dtype=DT)
    X = apply_rank2_kron_inverse(inverse, V)
    assert bool(torch.isfinite(X).all())
    K = torch.kron(inverse.k_a, inverse.k_g)
    clamped = K @ torch.diag(1 / inverse.denom.T.reshape(-1)) @ K.T
    torch.testing.assert_close(X, (clamped @ V.T.reshape(-1)).reshape(a, g).T)
    with pytest.raises(ValueError, match="floor must lie in"):
        rank2_kron_inverse(A1, G1, A2, G2, lam, floor=0.0)


def test_rank2_inverse_treats_a_first_factor_below_minus_the_damping_as_psd():
    # Cholesky of A₁ + √λI fails; the eigendecomposition fallback clamps A₁'s negative
    # eigenvalues at 0, so the inverse is that of (A₁₊ + √λI) ⊗ G₁' + A₂ ⊗ G₂.
    gen = torch.Generator().manual_seed(8)
    a, g, lam = 4, 3, 0.01
    A1, G1 = _sym(a, gen, True), _sym(g, gen, True)
    w, q = torch.linalg.eigh(A1)
    w[0] = -1.0
    A1 = q @ torch.diag(w) @ q.T
    A2, G2 = 0.1 * _sym(a, gen, False), 0.1 * _sym(g, gen, False)
    V = torch.randn(g, a, generator=gen, dtype=DT)
    X, _ = rank2_kron_damped_solve(A1, G1, A2, G2, V, lam)
    positive = q @ torch.diag(w.clamp_min(0)) @ q.T
    root = math.sqrt(lam)
    eye_a, eye_g = torch.eye(a, dtype=DT), torch.eye(g, dtype=DT)
    dense = torch.kron(positive + root * eye_a, G1 + root * eye_g) + torch.kron(A2, G2)
    reference = torch.linalg.solve(dense, V.T.reshape(-1)).reshape(a, g).T
    torch.testing.assert_close(X, reference)


@pytest.mark.parametrize("failures", [1, 2])
def test_rank2_inverse_survives_eigh_failures(monkeypatch, failures):
    # float32 LAPACK eigh can fail to converge on large nearly rank-deficient factors: the
    # inverse retries in float64 (failures=1), then with a uniform diagonal shift (2).
    gen = torch.Generator().manual_seed(9)
    a, g, lam = 4, 3, 0.1
    A1, G1 = _sym(a, gen, True), _sym(g, gen, True)
    A2, G2 = 0.1 * _sym(a, gen, False), 0.1 * _sym(g, gen, False)
    V = torch.randn(g, a, generator=gen, dtype=DT)
    expected, _ = rank2_kron_damped_solve(A1, G1, A2, G2, V, lam)
    original = torch.linalg.eigh
    calls = {"failed": 0}

    def flaky(mats):
        if calls["failed"] < failures:
            calls["failed"] += 1
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return original(mats)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    single = [t.float() for t in (A1, G1, A2, G2, V)]
    X, _ = rank2_kron_damped_solve(*single[:4], single[4], lam)
    assert X.dtype == torch.float32 and calls["failed"] == failures
    torch.testing.assert_close(X.double(), expected, rtol=1e-4, atol=1e-5)


def _low_rank_sym(n, rank, gen, scale):
    """A symmetric indefinite ``[n, n]`` matrix of rank ``rank``."""
    x = torch.randn(n, rank, generator=gen, dtype=DT)
    w = torch.randn(rank, generator=gen, dtype=DT)
    return scale * (x * w) @ x.T


@pytest.mark.parametrize("floor", [1e-2, 0.999])
def test_split_rank2_inverse_is_kfac_plus_a_low_rank_correction(floor):
    # A₂ of rank 2 and G₂ of rank 3: s_a, s_g have 2 and 3 non-zero entries, so the inverse is
    # (A₁'⊗G₁')⁻¹ plus a correction through 3 columns of K_g and 2 of K_a.
    gen = torch.Generator().manual_seed(13)
    a, g, lam = 9, 7, 0.01
    A1, G1 = _sym(a, gen, True), _sym(g, gen, True)
    A2, G2 = _low_rank_sym(a, 2, gen, 0.05), _low_rank_sym(g, 3, gen, 0.05)
    inverse = rank2_kron_inverse(A1, G1, A2, G2, lam, floor=floor)
    split = split_rank2_inverse(inverse)
    assert split is not None
    assert split.r_a.shape == (a, 2) and split.r_g.shape == (g, 3) and split.corr.shape == (3, 2)
    root = math.sqrt(lam)
    eye_a, eye_g = torch.eye(a, dtype=DT), torch.eye(g, dtype=DT)
    torch.testing.assert_close(split.p_a, torch.linalg.inv(A1 + root * eye_a))
    torch.testing.assert_close(split.p_g, torch.linalg.inv(G1 + root * eye_g))
    V = torch.randn(g, a, generator=gen, dtype=DT)
    X = apply_split_rank2_inverse(split, V)
    torch.testing.assert_close(X, apply_rank2_kron_inverse(inverse, V))
    if floor == 0.999:  # denominators below 0.999 clamped: only the four products agree
        assert int(inverse.clamped) > 0
        return
    assert int(inverse.clamped) == 0
    dense = torch.kron(A1 + root * eye_a, G1 + root * eye_g) + torch.kron(A2, G2)
    reference = torch.linalg.solve(dense, V.T.reshape(-1)).reshape(a, g).T
    torch.testing.assert_close(X, reference)


def test_split_rank2_inverse_declines_full_rank_second_factors():
    gen = torch.Generator().manual_seed(14)
    a, g = 9, 7
    A1, G1 = _sym(a, gen, True), _sym(g, gen, True)
    A2, G2 = 0.1 * _sym(a, gen, False), 0.1 * _sym(g, gen, False)
    assert split_rank2_inverse(rank2_kron_inverse(A1, G1, A2, G2, 0.01)) is None


@pytest.mark.parametrize("name", ["deflation", "lanczos", "kfac-corrected"])
def test_rank2_method_applies_the_split_inverse_while_the_second_pair_has_low_rank(name):
    # Layers wider than the Fisher batch (2 samples per update): A₂, G₂ have rank ≤ 2 per
    # update, so the direction goes through the split form; it is the dense damped solve and the
    # four-product form's direction, update after update.
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 8)).to(DT)
    gen = torch.Generator().manual_seed(15)
    lam = 0.3  # A₁ + √λI positive definite for Lanczos's Ritz pair too (no PSD clamping)
    options = {"damping": lam, "fisher": "empirical", "decay": 0.5, "decay_warmup": False}
    runs = {split: methods.get(name, low_rank_apply=split, **options) for split in (True, False)}
    root = math.sqrt(lam)
    layouts = model_layouts(model)
    for _ in range(2):
        x = torch.randn(2, 10, generator=gen, dtype=DT)
        y = torch.randint(0, 8, (2,), generator=gen)
        stats = collect(model, nn.CrossEntropyLoss(), x, y, runs[True].needs)
        for method in runs.values():
            method.update(stats)
        fast, reference = runs[True].direction(), runs[False].direction()
        for layer, layout in layouts.items():
            assert "corr" in runs[True].state[layer] and "corr" not in runs[False].state[layer]
            (A1, G1), (A2, G2) = runs[True].kronecker_factors(layer)
            eye_a, eye_g = torch.eye(A1.shape[0], dtype=DT), torch.eye(G1.shape[0], dtype=DT)
            damped = torch.kron(A1 + root * eye_a, G1 + root * eye_g) + torch.kron(A2, G2)
            momentum = to_matrix(layout, runs[True].state[layer]["m"])
            X = torch.linalg.solve(damped, momentum.T.reshape(-1)).reshape(A1.shape[0], -1).T
            torch.testing.assert_close(to_matrix(layout, fast[layer]), X)
            torch.testing.assert_close(fast[layer], reference[layer])
    with pytest.raises(ValueError, match="low_rank_apply must be a bool"):
        methods.get(name, low_rank_apply=1)


def test_clear_negligible_zeroes_entries_below_eps_times_their_column_max():
    for dtype in (torch.float32, DT):
        eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
        k = torch.tensor([[2.0, 1e-3], [-eps, tiny / 4], [3 * eps, -1e-35]], dtype=dtype)
        expected = [[2.0, 1e-3], [0.0, 0.0], [3 * eps, 0.0]]  # column maxima 2 and 1e-3
        assert clear_negligible(k).tolist() == torch.tensor(expected, dtype=dtype).tolist()


@pytest.mark.parametrize("low_rank_apply", [True, False])
def test_rank2_method_clears_the_negligible_entries_of_its_inverse(low_rank_apply):
    # Dead inputs and dead ReLU units (as the MNIST autoencoder's pixels and units) make zero rows
    # in the factors; the float32 eigenvectors then hold rounding noise where K is 0 (on MNIST
    # down to 1e-39, whose subnormal products slowed every step's products up to 10x). The
    # method sets those entries to 0, and its direction is still the dense damped solve.
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 8))
    x, y = torch.randn(4, 10), torch.randint(0, 8, (4,))
    x[:, :3] = 0.0
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {GRAD, KRON_SAMPLES})
    lam = 0.3
    method = methods.get(
        "deflation", damping=lam, fisher="empirical", low_rank_apply=low_rank_apply
    )
    method.update(stats)
    eps, root = torch.finfo(torch.float32).eps, math.sqrt(lam)

    def negligible(k):
        size = k.abs()
        return int(((size > 0) & (size <= eps * size.amax(0, keepdim=True))).sum())

    raw = 0
    for layer, layout in model_layouts(model).items():
        slot = method.state[layer]
        (A1, G1), (A2, G2) = method.kronecker_factors(layer)
        inverse = rank2_kron_inverse(A1, G1, A2, G2, lam)
        raw += negligible(inverse.k_a) + negligible(inverse.k_g)
        assert negligible(slot["k_a"]) == negligible(slot["k_g"]) == 0
        assert ("corr" in slot) == low_rank_apply
        (A1, G1), (A2, G2) = ((A.double(), G.double()) for A, G in ((A1, G1), (A2, G2)))
        eye_a, eye_g = torch.eye(A1.shape[0], dtype=DT), torch.eye(G1.shape[0], dtype=DT)
        damped = torch.kron(A1 + root * eye_a, G1 + root * eye_g) + torch.kron(A2, G2)
        V = to_matrix(layout, slot["m"]).double()
        X = torch.linalg.solve(damped, V.T.reshape(-1)).reshape(A1.shape[0], -1).T
        direction = to_matrix(layout, method.direction()[layer]).double()
        torch.testing.assert_close(direction, X, rtol=1e-4, atol=1e-6)
    assert raw > 0  # the raw inverse had such entries


@pytest.mark.parametrize("name", ["deflation", "lanczos", "kfac-corrected"])
def test_rank2_method_redoes_a_silently_non_finite_float32_inverse_in_float64(monkeypatch, name):
    # float32 LAPACK eigh can return NaN without raising (MNIST autoencoder, fc6): the method
    # rebuilds that inverse from float64 factors, so its direction is the dense damped solve.
    model = _model(12).float()
    x, y = torch.randn(M, 3), torch.randint(0, 3, (M,))
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {GRAD, KRON_SAMPLES})
    lam = 0.05
    original = torch.linalg.eigh
    calls = {"nan": 0}

    def silent_nan(mats):
        w, q = original(mats)
        if mats.dtype == torch.float32:
            calls["nan"] += 1
            return w, q.clone().fill_(float("nan"))
        return w, q

    monkeypatch.setattr(torch.linalg, "eigh", silent_nan)
    method = methods.get(name, damping=lam, fisher="empirical", momentum=0.0, decay=0.0)
    method.update(stats)
    assert calls["nan"] > 0
    root = math.sqrt(lam)
    for layer, layout in model_layouts(model).items():
        (A1, G1), (A2, G2) = (tuple(t.double() for t in f) for f in method.kronecker_factors(layer))
        eye_a, eye_g = torch.eye(A1.shape[0], dtype=DT), torch.eye(G1.shape[0], dtype=DT)
        damped = torch.kron(A1 + root * eye_a, G1 + root * eye_g) + torch.kron(A2, G2)
        V = to_matrix(layout, stats.grad[layer]).double()
        X = torch.linalg.solve(damped, V.T.reshape(-1)).reshape(A1.shape[0], -1).T
        direction = to_matrix(layout, method.direction()[layer])
        assert direction.dtype == torch.float32
        torch.testing.assert_close(direction.double(), X, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_one_shot_direction_is_the_dense_damped_solve(name):
    model, x, y, stats = _stats()
    lam = 0.05
    method = methods.get(name, damping=lam, fisher="exact", momentum=0.0, decay=0.0)
    method.update(stats)
    layouts = model_layouts(model)
    root = math.sqrt(lam)
    for layer, layout in layouts.items():
        factors = method.kronecker_factors(layer)
        (A1, G1), rest = factors[0], factors[1:]
        a, g = A1.shape[0], G1.shape[0]
        eye_a, eye_g = torch.eye(a, dtype=DT), torch.eye(g, dtype=DT)
        damped = torch.kron(A1 + root * eye_a, G1 + root * eye_g)
        damped = damped + sum((torch.kron(A, G) for A, G in rest), torch.zeros_like(damped))
        V = to_matrix(layout, stats.grad[layer])
        X = torch.linalg.solve(damped, V.T.reshape(-1)).reshape(a, g).T
        torch.testing.assert_close(to_matrix(layout, method.direction()[layer]), X)
        batch = kronecker_approximation(stats.kron_samples_exact[layer], name).factors
        expected = sum(kron_layout_matrix(layout, A, G) for A, G in batch)
        torch.testing.assert_close(method.matrix(layer), expected)


def test_diagnostics_count_the_clamped_denominators_of_the_method():
    _, _, _, stats = _stats()
    method = methods.get("deflation", fisher="exact", denominator_floor=1.0, damping=1e-4)
    method.update(stats)
    for layer, diag in method.diagnostics().items():
        slot = method.state[layer]
        A1, G1, A2, G2 = slot["A1"], slot["G1"], slot["A2"], slot["G2"]
        eye_a, eye_g = torch.eye(A1.shape[0], dtype=DT), torch.eye(G1.shape[0], dtype=DT)
        s_a = torch.linalg.eigvals(torch.linalg.solve(A1 + 1e-2 * eye_a, A2)).real
        s_g = torch.linalg.eigvals(torch.linalg.solve(G1 + 1e-2 * eye_g, G2)).real
        products = torch.outer(s_g, s_a)
        # products of a zero eigenvalue (G's rank deficiency from the softmax) are ±1e-18 noise:
        # the count lies between the surely clamped and the possibly clamped denominators
        tol = 1e-10 * float(products.abs().max())
        surely, possibly = int((products < -tol).sum()), int((products <= tol).sum())
        assert 0 < surely <= diag["clamped"] <= possibly
        assert diag["denominators"] == A1.shape[0] * G1.shape[0]
        assert diag["converged"] and len(diag["sigma"]) == 2
    assert all(bool(torch.isfinite(d).all()) for d in method.direction().values())


# ----------------------------------------------------------------------------- schedule
def test_per_factor_ema_follows_min_one_minus_one_over_j_and_the_periods():
    model = _model(4)
    batches = [(torch.randn(M, 3, dtype=DT), torch.randint(0, 3, (M,))) for _ in range(4)]
    stats = [collect(model, nn.CrossEntropyLoss(), x, y, {KRON_SAMPLES}) for x, y in batches]
    one = [kronecker_approximation(s.kron_samples["2"], "kpsvd").factors[0] for s in stats]
    warm = methods.get("kpsvd", fisher="empirical", decay=0.6)
    fixed = methods.get("kpsvd", fisher="empirical", decay=0.6, decay_warmup=False)
    slow = methods.get("kpsvd", fisher="empirical", decay=0.6, stat_period=2)
    for s in stats:
        for method in (warm, fixed, slow):
            method.update(s)
    # ρ_1 = 0, ρ_2 = min(1/2, 0.6), ρ_3 = min(2/3, 0.6), ρ_4 = min(3/4, 0.6).
    expected_warm = one[0]
    expected_fixed = one[0]
    for j, rho in ((1, 0.5), (2, 0.6), (3, 0.6)):
        expected_warm = [
            rho * e + (1 - rho) * b for e, b in zip(expected_warm, one[j], strict=True)
        ]
        expected_fixed = [0.6 * e + 0.4 * b for e, b in zip(expected_fixed, one[j], strict=True)]
    expected_slow = [0.5 * e + 0.5 * b for e, b in zip(one[0], one[2], strict=True)]
    cases = ((warm, expected_warm), (fixed, expected_fixed), (slow, expected_slow))
    for method, expected in cases:
        [(A, G)] = method.kronecker_factors("2")
        torch.testing.assert_close(A, expected[0])
        torch.testing.assert_close(G, expected[1])


def test_second_pairs_are_aligned_with_their_average_before_averaging():
    # Two batches whose second pairs, each signed by tr A₂ ≥ 0, point in opposite directions
    # (⟨A₂, A₂'⟩ < 0): the method flips the second before averaging (ρ₂ = 1/2).
    model = _model(4)
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(M, 3, generator=gen, dtype=DT) for _ in range(2)]
    ys = [torch.randint(0, 3, (M,), generator=gen) for _ in range(2)]
    batches = zip(xs, ys, strict=True)
    stats = [collect(model, nn.CrossEntropyLoss(), x, y, {KRON_SAMPLES}) for x, y in batches]
    pairs = [kronecker_approximation(s.kron_samples["2"], "deflation").factors for s in stats]
    assert float((pairs[0][1].A * pairs[1][1].A).sum()) < 0
    method = methods.get("deflation", fisher="empirical")
    for s in stats:
        method.update(s)
    first, second = method.kronecker_factors("2")
    torch.testing.assert_close(first.A, (pairs[0][0].A + pairs[1][0].A) / 2)
    torch.testing.assert_close(second.A, (pairs[0][1].A - pairs[1][1].A) / 2)
    torch.testing.assert_close(second.G, (pairs[0][1].G - pairs[1][1].G) / 2)


def test_gram_and_matrix_solvers_give_the_same_method_trajectory():
    model = _model(5)
    gen = torch.Generator().manual_seed(5)
    runs = {s: methods.get("deflation", solver=s, decay=0.95) for s in ("gram", "matrix")}
    for _ in range(3):
        x, y = torch.randn(M, 3, dtype=DT), torch.randint(0, 3, (M,))
        stats = collect(model, nn.CrossEntropyLoss(), x, y, runs["gram"].needs, generator=gen)
        for method in runs.values():
            method.update(stats)
    gram, matrix = runs["gram"].direction(), runs["matrix"].direction()
    for layer in gram:
        torch.testing.assert_close(gram[layer], matrix[layer])
