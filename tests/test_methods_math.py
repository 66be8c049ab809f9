"""The formulas of each method against explicitly assembled float64 matrices (METHODS.md §3–4).

One-shot semantics (``methods.directions``): statistics from the batch alone (EMA decay 0) and
momentum ``m = g``.
"""

import copy

import pytest
import torch
from torch import nn

from mbf_analysis import methods
from mbf_analysis.curvature import layer_fisher
from mbf_analysis.curvature.collect import GRAD, PER_SAMPLE_GRAD, SAMPLED_GRAD, collect
from mbf_analysis.errors import MemoryBudgetError
from mbf_analysis.layout import model_layouts
from mbf_analysis.methods import ema_outer_, inverse_by_size, precondition

DT = torch.float64
M = 6
CE = nn.CrossEntropyLoss()


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _cnn(bn=False):
    layers = [nn.Conv2d(2, 3, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers)
    if bn:
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _problem(build=_mlp, shape=(4,), m=M, seed=0):
    torch.manual_seed(seed)
    model = build().to(DT).eval()
    return model, torch.randn(m, *shape, dtype=DT), torch.randint(0, 3, (m,))


def _blockdiag_outer(layout, vector):
    """``blockdiag(u_b u_bᵀ)`` of a layer vector, assembled with the layout."""
    blocks = {k: v.unsqueeze(-1) * v.unsqueeze(-2) for k, v in layout.blocks(vector).items()}
    return layout.blockdiag(blocks)


# ----------------------------------------------------------------------------- MBF core
def test_ema_outer_averages_outer_products_over_leading_dimensions():
    gen = torch.Generator().manual_seed(0)
    F = torch.rand(3, 2, 2, generator=gen, dtype=DT)
    u = torch.randn(4, 3, 2, generator=gen, dtype=DT)
    expected = 0.7 * F + 0.3 * torch.einsum("nbi,nbj->bij", u, u) / 4
    torch.testing.assert_close(ema_outer_(F.clone(), u, 0.7), expected)
    expected = 0.7 * F + 0.3 * u[0].unsqueeze(-1) * u[0].unsqueeze(-2)
    torch.testing.assert_close(ema_outer_(F.clone(), u[0], 0.7), expected)
    torch.testing.assert_close(
        ema_outer_(F.clone() * float("nan"), u[0], 0.0), u[0, :, :, None] * u[0, :, None, :]
    )


def test_inverse_by_size_and_precondition_match_per_block_solves():
    mats = {
        "a": torch.rand(3, 2, 2, dtype=DT),
        "b": torch.rand(1, 4, 4, dtype=DT),
        "c": torch.rand(2, 2, 2, dtype=DT),
    }
    mats = {k: v @ v.mT for k, v in mats.items()}
    inverses = inverse_by_size(mats, 0.1)
    for key, F in mats.items():
        eye = torch.eye(F.shape[-1], dtype=DT)
        torch.testing.assert_close(inverses[key], torch.linalg.inv(F + 0.1 * eye))
    m = torch.randn(5, 4, dtype=DT)  # a shared [1, s, s] inverse serves every row
    torch.testing.assert_close(precondition(inverses["b"], m), m @ inverses["b"][0].T)


# ----------------------------------------------------------------------------- MBF
@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_one_shot_mbf_solves_the_block_diagonal_system(case):
    build, shape = (_mlp, (4,)) if case == "mlp" else (_cnn, (2, 4, 4))
    model, x, y = _problem(build, shape)
    damping = 0.01
    d = methods.directions(model, CE, x, y, ["mbf"], damping=damping)["mbf"]
    stats = collect(model, CE, x, y, {GRAD})
    for name, layout in model_layouts(model).items():
        g = stats.grad[name]
        system = _blockdiag_outer(layout, g) + damping * torch.eye(layout.dim, dtype=DT)
        torch.testing.assert_close(d[name], torch.linalg.solve(system, g))


def test_mbf_exact_blocks_are_the_miniblocks_of_the_layer_empirical_fisher():
    model, x, y = _problem(_cnn, (2, 4, 4))
    mbf = methods.get("mbf-exact", decay=0.0, momentum=0.0, damping=0.02)
    mbf.update(collect(model, CE, x, y, mbf.needs))
    fisher = layer_fisher(model, CE, x, y, kind="empirical")
    stats = collect(model, CE, x, y, {GRAD})
    for name, layout in model_layouts(model).items():
        blocks = layout.blockdiag(layout.extract_blocks(fisher[name]))
        torch.testing.assert_close(mbf.matrix(name), blocks)
        system = blocks + 0.02 * torch.eye(layout.dim, dtype=DT)
        torch.testing.assert_close(
            mbf.direction()[name], torch.linalg.solve(system, stats.grad[name])
        )


def test_mbf_true_uses_the_sampled_label_gradient():
    model, x, y = _problem()
    stats = collect(
        model, CE, x, y, {GRAD, SAMPLED_GRAD}, generator=torch.Generator().manual_seed(0)
    )
    mbf_true = methods.get("mbf-true", decay=0.0)
    mbf_true.update(stats)
    for name, layout in model_layouts(model).items():
        torch.testing.assert_close(
            mbf_true.matrix(name), _blockdiag_outer(layout, stats.sampled_grad[name])
        )


def test_mbf_with_blocks_of_size_one_is_adam_without_the_square_root():
    model, x, y = _problem(m=3 * M)
    mu, tau, beta, lam = 0.8, 0.1, 0.6, 0.01
    mbf = methods.get(
        "mbf", block_size_one=True, momentum=mu, dampening=tau, decay=beta, damping=lam
    )
    m = v = None
    for i in range(3):
        stats = collect(model, CE, x[i * M : (i + 1) * M], y[i * M : (i + 1) * M], {GRAD})
        mbf.update(stats)
        g = stats.grad["2"]
        m = g.clone() if m is None else mu * m + (1 - tau) * g
        v = (1 - beta) * g**2 if v is None else beta * v + (1 - beta) * g**2
        torch.testing.assert_close(mbf.direction()["2"], m / (v + lam))
        torch.testing.assert_close(mbf.matrix("2"), torch.diag(v))


def test_batchnorm_blocks_take_adams_direction_and_conv_biases_do_not():
    model, x, y = _problem(lambda: _cnn(bn=True), (2, 4, 4))
    lam = 0.05
    d = methods.directions(model, CE, x, y, ["mbf"], damping=lam)["mbf"]
    g = collect(model, CE, x, y, {GRAD}).grad
    torch.testing.assert_close(d["1"], g["1"] / (g["1"].abs() + lam))  # m/(√v + λ), v = g²
    bias = g["3"][-2:]  # the conv bias: blocks of size 1, no square root
    torch.testing.assert_close(d["3"][-2:], bias / (bias**2 + lam))


def test_spatial_averaging_solves_with_one_shared_matrix():
    model, x, y = _problem()
    lam = 0.03
    # fc "2": n_out·(n_in+1)² = 3·36 = 108 > 100 is averaged; fc "0": 5·25 = 125 too.
    d = methods.directions(model, CE, x, y, ["mbf"], damping=lam, spatial_threshold=100)["mbf"]
    stats = collect(model, CE, x, y, {GRAD})
    for name, layout in model_layouts(model).items():
        M_ = stats.grad[name].reshape(layout.groups[0].count, -1)  # momentum matrix [n_out, s]
        F_bar = M_.T @ M_ / M_.shape[0]
        shared = torch.linalg.solve(F_bar + lam * torch.eye(F_bar.shape[0], dtype=DT), M_.T).T
        torch.testing.assert_close(d[name], shared.reshape(-1))
    big = methods.directions(model, CE, x, y, ["mbf"], damping=lam, spatial_threshold=110)["mbf"]
    torch.testing.assert_close(big["0"], d["0"])
    assert not torch.allclose(big["2"], d["2"])


def test_mbf_follows_the_statistics_and_inverse_periods():
    model, x, y = _problem(m=5 * M)
    T1, T2, beta, lam, mu = 2, 3, 0.5, 0.1, 0.9
    mbf = methods.get(
        "mbf", stat_period=T1, inverse_period=T2, decay=beta, damping=lam, momentum=mu
    )
    layout = model_layouts(model)["2"]
    F = torch.zeros(layout.dim, layout.dim, dtype=DT)
    P = m = None
    mask = layout.block_mask()
    for k in range(5):
        stats = collect(model, CE, x[k * M : (k + 1) * M], y[k * M : (k + 1) * M], {GRAD})
        mbf.update(stats)
        g = stats.grad["2"]
        m = g.clone() if m is None else mu * m + g
        if k % T1 == 0:
            F = beta * F + (1 - beta) * torch.outer(g, g) * mask
        if k % T2 == 0:
            P = torch.linalg.inv(F + lam * torch.eye(layout.dim, dtype=DT))
        torch.testing.assert_close(mbf.direction()["2"], P @ m)


# ----------------------------------------------------------------------------- BDF
def test_one_shot_bdf_solves_with_the_layer_empirical_fisher():
    model, x, y = _problem(_cnn, (2, 4, 4))
    lam = 0.02
    d = methods.directions(model, CE, x, y, ["bdf"], damping=lam)["bdf"]
    fisher = layer_fisher(model, CE, x, y, kind="empirical")
    stats = collect(model, CE, x, y, {GRAD})
    for name, F in fisher.items():
        system = F + lam * torch.eye(F.shape[0], dtype=DT)
        torch.testing.assert_close(d[name], torch.linalg.solve(system, stats.grad[name]))


def _woodbury_cheaper(r: int, d: int) -> bool:
    """Multiply-adds: Woodbury ``r²d + r³/6`` vs dense ``M d² + d³/6`` (BDF's module docstring)."""
    return r**2 * d + r**3 / 6 < M * d**2 + d**3 / 6


def test_bdf_auto_goes_dense_before_the_rows_reach_d():
    bdf = methods.get("bdf")
    assert not bdf._dense(2300, 5140, 256) and bdf._dense(2400, 5140, 256)
    assert bdf._dense(300, 256, 300)  # one batch larger than d: dense at once


def test_bdf_woodbury_path_equals_the_dense_path():
    model, x, y = _problem(_cnn, (2, 4, 4), m=3 * M)
    dims = {name: layout.dim for name, layout in model_layouts(model).items()}
    assert all(d > 2 * M for d in dims.values())  # the rows stay below d for two batches
    auto = methods.get("bdf", decay=0.7)
    dense = methods.get("bdf", decay=0.7, solver="dense")
    woodbury = methods.get("bdf", decay=0.7, solver="woodbury")
    for k in range(3):
        stats = collect(
            model, CE, x[k * M : (k + 1) * M], y[k * M : (k + 1) * M], {PER_SAMPLE_GRAD}
        )
        for method in (auto, dense, woodbury):
            method.update(stats)
        expected = dense.direction()
        for method in (auto, woodbury):
            for name, value in method.direction().items():
                torch.testing.assert_close(value, expected[name])
                torch.testing.assert_close(method.matrix(name), dense.matrix(name))
        low_rank = {name for name, slot in auto.state.items() if "U" in slot}
        assert low_rank == {name for name, d in dims.items() if _woodbury_cheaper((k + 1) * M, d)}
        assert all(name in low_rank for name, d in dims.items() if 2 * (k + 1) * M < d)


def test_bdf_history_follows_the_ema_formula():
    model, x, y = _problem(m=2 * M)
    beta = 0.6
    bdf = methods.get("bdf", decay=beta)
    F = m = 0
    for k in range(2):
        xb, yb = x[k * M : (k + 1) * M], y[k * M : (k + 1) * M]
        bdf.update(collect(model, CE, xb, yb, {PER_SAMPLE_GRAD}))
        F = beta * F + (1 - beta) * layer_fisher(model, CE, xb, yb)["0"]
        m = beta * m + (1 - beta) * collect(model, CE, xb, yb, {GRAD}).grad["0"]
    torch.testing.assert_close(bdf.matrix("0"), F)
    expected = torch.linalg.solve(F + 0.003 * torch.eye(F.shape[0], dtype=DT), m)
    torch.testing.assert_close(bdf.direction()["0"], expected)


def test_bdf_dense_blocks_are_checked_against_the_memory_budget():
    model, x, y = _problem()
    bdf = methods.get("bdf", solver="dense", memory_budget=1000)
    with pytest.raises(MemoryBudgetError, match="BDF curvature block of layer '0'"):
        bdf.update(collect(model, CE, x, y, bdf.needs))
    assert bdf.state == {}


# ----------------------------------------------------------------------------- Shampoo
def _eigh_root(mat, power):
    w, q = torch.linalg.eigh(mat)
    return (q * w.clamp_min(0) ** power) @ q.T


def test_one_shot_shampoo_matrix_and_vector_parameters():
    model, x, y = _problem()
    eps = 1e-3
    d = methods.directions(model, CE, x, y, ["shampoo"], eps=eps)["shampoo"]
    stats = collect(model, CE, x, y, {GRAD})
    layout = model_layouts(model)["0"]
    parts = layout.unflatten(stats.grad["0"])
    G, b = parts["0.weight"], parts["0.bias"]
    eye_l, eye_r = torch.eye(G.shape[0], dtype=DT), torch.eye(G.shape[1], dtype=DT)
    L, R = G @ G.T + eps * eye_l, G.T @ G + eps * eye_r
    expected_w = _eigh_root(L, -0.25) @ G @ _eigh_root(R, -0.25)
    expected_b = _eigh_root(torch.outer(b, b) + eps * eye_l, -0.5) @ b
    got = layout.unflatten(d["0"])
    torch.testing.assert_close(got["0.weight"], expected_w)
    torch.testing.assert_close(got["0.bias"], expected_b)


def test_shampoo_conv_weights_are_order_three_tensors():
    model, x, y = _problem(_cnn, (2, 4, 4))
    eps = 1e-3
    shampoo = methods.get("shampoo", eps=eps, decay=0.0, momentum=0.0, root_method="eigh")
    shampoo.update(collect(model, CE, x, y, {GRAD}))
    layout = model_layouts(model)["0"]
    grad = layout.unflatten(collect(model, CE, x, y, {GRAD}).grad["0"])["0.weight"]
    T = grad.reshape(3, 2, 9)
    roots = []
    for i in range(3):
        unfolded = torch.movedim(T, i, 0).reshape(T.shape[i], -1)
        H = unfolded @ unfolded.T + eps * torch.eye(T.shape[i], dtype=DT)
        roots.append(_eigh_root(H, -1 / 6))
    expected = torch.einsum("ai,bj,ck,ijk->abc", *roots, T).reshape(3, 2, 3, 3)
    got = layout.unflatten(shampoo.direction()["0"])["0.weight"]
    torch.testing.assert_close(got, expected)


def test_shampoo_matrix_is_the_kronecker_product_of_root_statistics():
    model, x, y = _problem()
    shampoo = methods.get("shampoo", eps=0.0, decay=0.0, momentum=0.0)
    stats = collect(model, CE, x, y, {GRAD})
    shampoo.update(stats)
    layout = model_layouts(model)["2"]
    G = layout.unflatten(stats.grad["2"])["2.weight"]
    weight_part = torch.kron(_eigh_root(G @ G.T, 0.5), _eigh_root(G.T @ G, 0.5))
    mat = shampoo.matrix("2")
    index = layout.flatten(
        {"2.weight": torch.arange(15).reshape(3, 5), "2.bias": torch.arange(15, 18)}
    )
    weight_positions = torch.argsort(index)[:15]  # layout positions of the row-major weight
    torch.testing.assert_close(
        mat[weight_positions][:, weight_positions], weight_part, atol=1e-7, rtol=1e-6
    )


# ----------------------------------------------------------------------------- Adam, SGD-m
def _torch_optimizer_steps(model, x, y, optimizer_cls, **kwargs):
    """Directions ``-(θ_{k+1} − θ_k)`` of a torch optimizer with lr = 1 at a fixed iterate."""
    clone = copy.deepcopy(model)
    params = list(clone.parameters())
    start = [p.detach().clone() for p in params]
    opt = optimizer_cls(params, lr=1.0, **kwargs)
    out = []
    for k in range(3):
        xb, yb = x[k * M : (k + 1) * M], y[k * M : (k + 1) * M]
        opt.zero_grad()
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)  # gradients at the same iterate as the methods see
        nn.functional.cross_entropy(clone(xb), yb).backward()
        opt.step()
        names = [n for n, _ in clone.named_parameters()]
        delta = {n: s - p.detach() for n, p, s in zip(names, params, start, strict=True)}
        out.append({name: lay.flatten(delta) for name, lay in model_layouts(clone).items()})
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
    return out


@pytest.mark.parametrize("name", ["adam", "sgdm"])
def test_adam_and_sgdm_match_torch_optim(name):
    model, x, y = _problem(m=3 * M)
    if name == "adam":
        method = methods.get("adam", beta1=0.8, beta2=0.9, eps=1e-3)
        reference = _torch_optimizer_steps(
            model, x, y, torch.optim.Adam, betas=(0.8, 0.9), eps=1e-3
        )
    else:
        method = methods.get("sgdm", momentum=0.7, dampening=0.2)
        reference = _torch_optimizer_steps(
            model, x, y, torch.optim.SGD, momentum=0.7, dampening=0.2
        )
    for k in range(3):
        method.update(collect(model, CE, x[k * M : (k + 1) * M], y[k * M : (k + 1) * M], {GRAD}))
        for layer, value in method.direction().items():
            torch.testing.assert_close(value, reference[k][layer])
