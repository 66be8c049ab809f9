"""The MBF optimizer (``mbf_analysis.optim.MBF``) against explicit float64 ground truth.

- one step and two steps against ``blockdiag(F_b) + λI`` assembled densely and solved;
- the fast (bucketed) path against the reference (per-block loops), and both against
  ``methods.get("mbf")`` / ``"mbf-true"`` driven by ``collect`` at the same iterates;
- the spatial-averaging rules (size, width, layer names) against dense solves, and the row-form
  direction of large blocks against per-block ``P_b @ m_b``;
- periods, decoupled weight decay, warm start, state_dict resume (bit for bit), param groups,
  LR schedulers, closures, float32, fallbacks, validation, non-finite gradients;
- a smoke test on the bundled digits.
"""

import io
import warnings

import pytest
import torch
from optim_cases import DT
from optim_cases import batches as _batches
from optim_cases import net as _net
from torch import nn

from mbf_analysis import methods
from mbf_analysis.curvature.collect import GRAD, SAMPLED_GRAD, collect
from mbf_analysis.errors import NonFiniteError
from mbf_analysis.layout import model_layouts
from mbf_analysis.optim import MBF, mbf_true_step
from mbf_analysis.optim.mbf import SpatialAveraging

CE = nn.CrossEntropyLoss()
IMPLS = ["fast", "reference"]
# Linear(8 → 5): 5·9² = 405 > 200 is spatially averaged; Linear(5 → 3): 3·6² = 108 is not.
SPATIAL = 200

pytestmark = pytest.mark.usefixtures("one_thread")


def _backward(model, batch):
    x, y = batch
    loss = CE(model(x), y)
    loss.backward()
    return loss


def _train(model, opt, batches):
    for batch in batches:
        opt.zero_grad()
        _backward(model, batch)
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _settings(**over):
    base = dict(
        lr=0.02,
        damping=0.05,
        momentum=0.8,
        dampening=0.25,
        stat_decay=0.7,
        weight_decay=0.1,
        stat_period=2,
        inverse_period=3,
        spatial_threshold=SPATIAL,
    )
    return base | over


def _close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- explicit formulas
def _dense_curvature(layout, rows):
    """``Σ_w w · u uᵀ`` masked to the mini-blocks, or ``blockdiag(F̄, …, F̄)`` when averaged."""
    g = layout.groups[0]
    if layout.kind == "linear" and g.count * g.size**2 > SPATIAL:
        fbar = sum(w * u.view(g.count, g.size).T @ u.view(g.count, g.size) for w, u in rows)
        return torch.block_diag(*[fbar / g.count] * g.count)
    return sum(w * torch.outer(u, u) for w, u in rows) * layout.block_mask()


def _expected_direction(model, momenta, rows, lam):
    """Per-parameter ``d``: dense solves of ``(F + λI) d = m``; ``m / (√v + λ)`` for BatchNorm.

    ``rows``: layer → ``[(w, u)]``, the EMA weights and layer vectors whose outer products sum
    to the statistics.
    """
    out = {}
    for name, layout in model_layouts(model).items():
        m = layout.flatten({n: momenta[n] for n in layout.param_names})
        if layout.kind == "diagonal":
            v = sum(w * u.square() for w, u in rows[name])
            d = m / (v.sqrt() + lam)
        else:
            F = _dense_curvature(layout, rows[name])
            d = torch.linalg.solve(F + lam * torch.eye(layout.dim, dtype=DT), m)
        out.update(layout.unflatten(d))
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_two_steps_equal_dense_blockdiag_solves(impl):
    """Step 0: m = g, F = (1−β) g gᵀ; step 1: m = μ g0 + (1−τ) g1, F = β F + (1−β) g1 g1ᵀ."""
    s = _settings(stat_period=1, inverse_period=1)
    model = _net()
    opt = MBF(model, implementation=impl, **s)
    names = [n for n, _ in model.named_parameters()]
    beta, lam, lr, wd = s["stat_decay"], s["damping"], s["lr"], s["weight_decay"]
    grads_hist = []
    for k, batch in enumerate(_batches(2)):
        before = dict(zip(names, _params(model), strict=True))
        opt.zero_grad()
        _backward(model, batch)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        grads_hist.append(grads)
        opt.step()
        if k == 0:
            momenta = grads
        else:
            momenta = {
                n: s["momentum"] * grads_hist[0][n] + (1 - s["dampening"]) * grads[n] for n in names
            }
        rows = {}
        for name, layout in model_layouts(model).items():
            vecs = [layout.flatten({n: g[n] for n in layout.param_names}) for g in grads_hist]
            weights = [(1 - beta)] if k == 0 else [beta * (1 - beta), 1 - beta]
            rows[name] = list(zip(weights, vecs, strict=True))
        d = _expected_direction(model, momenta, rows, lam)
        for n, p in model.named_parameters():
            expected = (1 - lr * wd) * before[n] - lr * d[n]
            torch.testing.assert_close(p.detach(), expected, rtol=1e-11, atol=1e-13)


def test_size_one_and_batchnorm_rules_explicitly():
    """Conv bias: d = m/(v + λ) (no root); BatchNorm: d = m/(√v + λ) (Adam-like)."""
    model = _net()
    opt = MBF(model, lr=1.0, damping=0.1, stat_decay=0.5, stat_period=1, inverse_period=1)
    before = _params(model)
    _backward(model, _batches(1)[0])
    g_bias, g_bn = model[0].bias.grad.clone(), model[1].weight.grad.clone()
    opt.step()
    v_bias, v_bn = 0.5 * g_bias**2, 0.5 * g_bn**2
    torch.testing.assert_close(before[1] - model[0].bias.detach(), g_bias / (v_bias + 0.1))
    torch.testing.assert_close(before[2] - model[1].weight.detach(), g_bn / (v_bn.sqrt() + 0.1))


# ------------------------------------------------------------------------- fast, reference, methods
def test_fast_path_equals_reference_path_over_many_steps():
    s = _settings()
    runs = {}
    for impl in IMPLS:
        model = _net()
        groups = [
            {"params": list(model[0].parameters()) + list(model[1].parameters()), "lr": 0.01},
            {
                "params": list(model[3].parameters())
                + list(model[5].parameters())
                + list(model[7].parameters()),
                "stat_period": 3,
                "inverse_period": 2,
                "damping": 0.02,
            },
        ]
        opt = MBF(model, params=groups, implementation=impl, **s)
        _train(model, opt, _batches(7))
        runs[impl] = (
            _params(model),
            {
                n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                for n, p in model.named_parameters()
            },
        )
    _close(runs["fast"][0], runs["reference"][0], rtol=1e-12, atol=1e-14)
    for name, state in runs["fast"][1].items():
        other = runs["reference"][1][name]
        assert state.keys() == other.keys(), name
        for key, value in state.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(value, other[key], rtol=1e-12, atol=1e-14)
            else:
                assert value == other[key]


def _method_directions(model, opt_settings, statistic="mbf", steps=6, seed=5):
    """Optimizer directions (θ_before − θ_after)/α vs the method's, per layer, at every step."""
    s = dict(opt_settings)
    method = methods.get(
        statistic,
        damping=s["damping"],
        momentum=s["momentum"],
        dampening=s["dampening"],
        decay=s["stat_decay"],
        stat_period=s["stat_period"],
        inverse_period=s["inverse_period"],
        spatial_threshold=s["spatial_threshold"],
    )
    opt = MBF(model, fisher="mc" if statistic == "mbf-true" else "empirical", **s)
    layouts = model_layouts(model)
    needs = {GRAD, SAMPLED_GRAD} if statistic == "mbf-true" else {GRAD}
    for k, (x, y) in enumerate(_batches(steps)):
        gen = torch.Generator().manual_seed(seed + k)
        method.update(collect(model, CE, x, y, needs, generator=gen))
        expected = method.direction()
        before = dict(model.named_parameters())
        before = {n: p.detach().clone() for n, p in before.items()}
        if statistic == "mbf-true":
            mbf_true_step(opt, model, CE, x, y, generator=torch.Generator().manual_seed(seed + k))
        else:
            opt.zero_grad()
            _backward(model, (x, y))
            opt.step()
        moved = {n: (before[n] - p.detach()) / s["lr"] for n, p in model.named_parameters()}
        for name, layout in layouts.items():
            got = layout.flatten({n: moved[n] for n in layout.param_names})
            torch.testing.assert_close(
                got, expected[name], rtol=1e-8, atol=1e-10, msg=f"step {k} {name}"
            )


@pytest.mark.parametrize("impl", IMPLS)
def test_directions_match_methods_mbf(impl):
    s = _settings(weight_decay=0.0, implementation=impl)
    model = _net()
    _method_directions(model, s)


def test_directions_match_methods_mbf_true():
    s = _settings(weight_decay=0.0, stat_period=1, inverse_period=2)
    _method_directions(_net(), s, statistic="mbf-true", steps=4)


# ----------------------------------------------------------------------------- spatial averaging
def _ae(seed=0):
    """A small autoencoder 7-6-5-2-5-6-7 (Tanh): widths ≥ 5 on both sides for fc1, fc2, fc5,
    fc6; fc3 (5 → 2) and fc4 (2 → 5) are narrower."""
    torch.manual_seed(seed)
    widths = [7, 6, 5, 2, 5, 6, 7]
    layers = []
    for k in range(len(widths) - 1):
        layers += [nn.Linear(widths[k], widths[k + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(DT)


def _ae_batches(n, m=6, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(m, 7, generator=gen, dtype=DT) for _ in range(n)]


def _ae_backward(model, x):
    loss = nn.functional.mse_loss(model(x), x)
    loss.backward()
    return loss


AE_RULES = {
    "width": SpatialAveraging(min_width=5),
    "names": SpatialAveraging(layers=["0", "2", "8", "10"]),
    # n_out·(n_in + 1)²: fc1 6·64 = 384, fc2 5·49 = 245, fc3 2·36 = 72, fc4 5·9 = 45,
    # fc5 6·36 = 216, fc6 7·49 = 343: above 200 are the same four layers.
    "size": SpatialAveraging(threshold=200),
}
AE_AVERAGED = {"0", "2", "8", "10"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", list(AE_RULES))
def test_spatial_averaging_rules_against_dense_solves(rule, impl):
    """Two steps at T1 = T2 = 1: averaged layers solve with blockdiag(F̄, …, F̄) + λI,
    F̄ = Σ_w w (1/n_out) Σ_j u_j u_jᵀ, the others with the per-neuron blocks; every rule that
    selects the same layers gives the same ``F`` shapes."""
    lam, beta, mu, lr = 0.05, 0.7, 0.8, 0.1
    model = _ae()
    opt = MBF(
        model,
        lr=lr,
        damping=lam,
        momentum=mu,
        stat_decay=beta,
        stat_period=1,
        inverse_period=1,
        spatial_averaging=AE_RULES[rule],
        implementation=impl,
    )
    layouts = model_layouts(model)
    history = []
    for k, x in enumerate(_ae_batches(2)):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        _ae_backward(model, x)
        history.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        weights = [1 - beta] if k == 0 else [beta * (1 - beta), 1 - beta]
        for name, layout in layouts.items():
            g = layout.groups[0]
            vecs = [layout.flatten({n: h[n] for n in layout.param_names}) for h in history]
            m = vecs[-1] if k == 0 else mu * vecs[0] + vecs[1]
            if name in AE_AVERAGED:
                rows = [v.view(g.count, g.size) for v in vecs]
                fbar = sum(w * r.T @ r for w, r in zip(weights, rows, strict=True)) / g.count
                F = torch.block_diag(*[fbar] * g.count)
            else:
                F = sum(w * torch.outer(v, v) for w, v in zip(weights, vecs, strict=True))
                F = F * layout.block_mask()
            d = torch.linalg.solve(F + lam * torch.eye(layout.dim, dtype=DT), m)
            theta = layout.flatten({n: before[n] for n in layout.param_names})
            expected = layout.unflatten(theta - lr * d)
            for n in layout.param_names:
                got = dict(model.named_parameters())[n].detach()
                torch.testing.assert_close(got, expected[n], rtol=1e-11, atol=1e-13)
    for name, layout in layouts.items():
        stored = 1 if name in AE_AVERAGED else layout.groups[0].count
        weight = dict(model.named_modules())[name].weight
        assert opt.state[weight]["F"].shape[0] == stored, name


def test_averaging_rule_directions_match_methods_mbf():
    """The optimizer and ``methods.get("mbf")`` with the same rule take the same directions
    (cross-entropy on the 7 outputs: ``collect`` rescales an MSE loss to ½‖f − y‖²)."""
    rule = SpatialAveraging(min_width=5)
    lam, lr = 0.05, 0.1
    model = _ae()
    opt = MBF(model, lr=lr, damping=lam, stat_period=1, inverse_period=2, spatial_averaging=rule)
    method = methods.get(
        "mbf", damping=lam, decay=0.9, stat_period=1, inverse_period=2, spatial_averaging=rule
    )
    labels = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(5))
    for x in _ae_batches(4):
        method.update(collect(model, CE, x, labels, {GRAD}))
        expected = method.direction()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        CE(model(x), labels).backward()
        opt.step()
        for name, layout in model_layouts(model).items():
            moved = {n: (before[n] - p.detach()) / lr for n, p in model.named_parameters()}
            got = layout.flatten({n: moved[n] for n in layout.param_names})
            torch.testing.assert_close(got, expected[name], rtol=1e-8, atol=1e-10)
    assert method.state["0"]["F"].shape[0] == 1 and method.state["4"]["F"].shape[0] == 2


def test_row_form_direction_of_large_blocks_equals_per_block_solves():
    """Blocks of size 41 and 31 (no averaging), float64: the fast path's ``m_bᵀ P_b`` equals the
    reference path's ``P_b m_b`` over several steps, and the inverses are symmetric."""
    torch.manual_seed(3)
    build = lambda: nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 12)).to(DT)  # noqa: E731
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(16, 40, generator=gen, dtype=DT) for _ in range(5)]
    ys = [torch.randint(0, 12, (16,), generator=gen) for _ in range(5)]
    out = {}
    for impl in IMPLS:
        torch.manual_seed(3)
        model = build()
        opt = MBF(
            model,
            lr=0.05,
            damping=0.01,
            stat_period=1,
            inverse_period=2,
            spatial_threshold=None,
            implementation=impl,
        )
        for x, y in zip(xs, ys, strict=True):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
        P = opt.state[model[0].weight]["P"]
        assert P.shape == (30, 41, 41)
        torch.testing.assert_close(P, P.mT, rtol=0, atol=1e-12)
        out[impl] = _params(model)
    _close(out["fast"], out["reference"], rtol=1e-11, atol=1e-13)


def test_explicit_rule_replaces_the_threshold_and_is_validated():
    model = _ae()
    with pytest.raises(ValueError, match="not both"):
        MBF(model, lr=0.1, spatial_threshold=50, spatial_averaging=SpatialAveraging(min_width=2))
    with pytest.raises(ValueError, match="not both"):
        MBF(model, lr=0.1, spatial_threshold=None, spatial_averaging=SpatialAveraging(layers=()))
    with pytest.raises(ValueError, match="must be a SpatialAveraging rule"):
        MBF(model, lr=0.1, spatial_averaging=250)
    with pytest.raises(ValueError, match=r"names \['fc9'\], which are not Linear layers"):
        MBF(model, lr=0.1, spatial_averaging=SpatialAveraging(layers=("0", "fc9")))
    with pytest.raises(ValueError, match=r"names \['0'\], which are not Linear"):
        MBF(_net(), lr=0.1, spatial_averaging=SpatialAveraging(layers=("0",)))  # a Conv2d
    with pytest.raises(ValueError, match="not Linear layers"):
        methods.get("mbf", spatial_averaging=SpatialAveraging(layers=("x",))).update(
            collect(model, nn.MSELoss(), _ae_batches(1)[0], _ae_batches(1)[0], {GRAD})
        )
    with pytest.raises(ValueError, match="not both"):
        methods.get("mbf", spatial_threshold=5, spatial_averaging=SpatialAveraging(min_width=1))
    # layers=(): no layer is averaged, the same as spatial_threshold=None.
    runs = []
    for kwargs in ({"spatial_averaging": SpatialAveraging(layers=())}, {"spatial_threshold": None}):
        model = _ae()
        opt = MBF(model, lr=0.1, **kwargs)
        for x in _ae_batches(3):
            opt.zero_grad()
            _ae_backward(model, x)
            opt.step()
        assert opt.state[model[0].weight]["F"].shape == (6, 8, 8)
        runs.append(_params(model))
    _close(*runs, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of threshold, min_width or layers, got none"),
        ({"threshold": 10, "min_width": 2}, "got threshold, min_width"),
        ({"min_width": 0}, "min_width must be a positive integer"),
        ({"threshold": 2.5}, "threshold must be a positive integer"),
        ({"min_width": True}, "min_width must be a positive integer"),
        ({"layers": "fc1"}, "list or tuple of module names"),
        ({"layers": ["fc1", 3]}, "list or tuple of module names"),
    ],
)
def test_invalid_spatial_averaging_rules_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpatialAveraging(**kwargs)


# ----------------------------------------------------------------------------- periods, decay, warm
@pytest.mark.parametrize("impl", IMPLS)
def test_statistics_and_inverses_only_change_on_their_periods(impl):
    model = _net()
    opt = MBF(model, **_settings(stat_period=3, inverse_period=5, implementation=impl))
    owner = model[0].weight
    previous = None
    for k, batch in enumerate(_batches(11)):
        opt.zero_grad()
        _backward(model, batch)
        opt.step()
        now = {key: opt.state[owner][key].clone() for key in ("F", "P")}
        if previous is not None:
            assert torch.equal(now["F"], previous["F"]) == (k % 3 != 0), k
            assert torch.equal(now["P"], previous["P"]) == (k % 5 != 0), k
        previous = now
    assert opt.state[owner]["step"] == 11


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_decay_is_decoupled(impl):
    """θ_γ = (1 − αγ) θ0 − α d with the same d as without weight decay."""
    batch = _batches(1)[0]
    moved = {}
    for wd in (0.0, 0.3):
        model = _net()
        opt = MBF(model, **_settings(weight_decay=wd, implementation=impl))
        theta0 = _params(model)
        _backward(model, batch)
        opt.step()
        moved[wd] = [
            p.detach() - (1 - 0.02 * wd) * t
            for p, t in zip(model.parameters(), theta0, strict=True)
        ]
    _close(moved[0.0], moved[0.3], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
def test_warm_start_averages_outer_products(impl):
    model = _net()
    opt = MBF(model, **_settings(implementation=impl))
    batches = _batches(3)
    grads = []
    for batch in batches:
        model.zero_grad()
        _backward(model, batch)
        grads.append(model[0].weight.grad.detach().reshape(6, 9).clone())
    used = opt.warm_start(batches, lambda b: _backward(model, b))
    assert used == 3
    expected = sum(torch.einsum("bi,bj->bij", g, g) for g in grads) / 3
    torch.testing.assert_close(opt.state[model[0].weight]["F"], expected)
    assert all(p.grad is None for p in model.parameters())
    # From mappings, at most 2 batches: the same as a backward callback over the first 2.
    other = _net()
    opt2 = MBF(other, **_settings(implementation=impl))
    maps = []
    for batch in batches[:2]:
        other.zero_grad()
        _backward(other, batch)
        maps.append({p: p.grad.clone() for p in other.parameters()})
    assert opt2.warm_start(maps + maps, max_batches=2) == 2
    expected = sum(torch.einsum("bi,bj->bij", g, g) for g in grads[:2]) / 2
    torch.testing.assert_close(opt2.state[other[0].weight]["F"], expected)
    _train(model, opt, batches[:1])
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.warm_start(batches, lambda b: _backward(model, b))


# ----------------------------------------------------------------------------- state, groups, lr
@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_resume_is_bit_for_bit(impl):
    s = _settings(implementation=impl)
    batches = _batches(10)
    model = _net()
    opt = MBF(model, **s)
    _train(model, opt, batches)
    straight = _params(model)

    model = _net()
    opt = MBF(model, **s)
    _train(model, opt, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _net(seed=123)
    resumed.load_state_dict(saved["model"])
    opt = MBF(resumed, **s)
    opt.load_state_dict(saved["opt"])
    _train(resumed, opt, batches[5:])
    for a, b in zip(straight, _params(resumed), strict=True):
        assert torch.equal(a, b)


def test_state_dict_moves_between_implementations():
    s = _settings()
    batches = _batches(8)
    model = _net()
    fast = MBF(model, **s)
    _train(model, fast, batches[:4])
    copy_model = _net()
    copy_model.load_state_dict(model.state_dict())
    reference = MBF(copy_model, **(s | {"implementation": "reference"}))
    reference.load_state_dict(fast.state_dict())
    _train(model, fast, batches[4:])
    _train(copy_model, reference, batches[4:])
    _close(_params(model), _params(copy_model), rtol=1e-12, atol=1e-14)

    def edited(state_dict, **settings):
        return state_dict | {"param_groups": [state_dict["param_groups"][0] | settings]}

    bad_model = _net()
    bad = MBF(bad_model, **(s | {"spatial_threshold": None}))
    with pytest.raises(ValueError, match="spatial_threshold"):
        bad.load_state_dict(edited(fast.state_dict(), lr=9.0))
    assert not bad.state and bad.param_groups[0]["lr"] == s["lr"]  # the previous state stays
    _train(bad_model, bad, batches[:2])
    with pytest.raises(ValueError, match="damping must lie"):
        bad.load_state_dict(edited(bad.state_dict(), damping=-1.0))
    assert bad.param_groups[0]["damping"] == s["damping"]
    _train(bad_model, bad, batches[2:3])


def test_param_groups_equal_separate_optimizers():
    """Groups are independent: one optimizer with two groups = two optimizers on the halves."""
    batches = _batches(6)
    first = lambda m: list(m[0].parameters()) + list(m[1].parameters())  # noqa: E731
    second = lambda m: list(m[3].parameters()) + list(m[5].parameters()) + list(m[7].parameters())  # noqa: E731
    s = _settings()
    model = _net()
    opt = MBF(
        model,
        params=[
            {"params": first(model), "lr": 0.05, "weight_decay": 0.0},
            {"params": second(model), "damping": 0.2, "stat_period": 1},
        ],
        **s,
    )
    _train(model, opt, batches)
    split = _net()
    opts = [
        MBF(split, params=first(split), **(s | {"lr": 0.05, "weight_decay": 0.0})),
        MBF(split, params=second(split), **(s | {"damping": 0.2, "stat_period": 1})),
    ]
    for batch in batches:
        split.zero_grad()
        _backward(split, batch)
        for o in opts:
            o.step()
    _close(_params(model), _params(split), rtol=1e-13, atol=1e-15)


def test_weight_and_bias_in_different_groups_is_an_error():
    model = _net()
    with pytest.raises(ValueError, match="same param group"):
        MBF(
            model,
            lr=0.1,
            params=[
                {"params": [model[5].weight]},
                {"params": [p for p in model.parameters() if p is not model[5].weight]},
            ],
        )
    with pytest.warns(UserWarning, match="only some parameters of Linear"):
        opt = MBF(model, lr=0.1, params=[p for p in model.parameters() if p is not model[7].bias])
    with pytest.raises(ValueError, match="same param group"):
        opt.add_param_group({"params": [model[7].bias], "lr": 0.5})
    assert len(opt.param_groups) == 1


def test_lr_scheduler_drives_the_learning_rate():
    batches = _batches(6)
    model = _net()
    opt = MBF(model, **_settings())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    manual = _net()
    opt_manual = MBF(manual, **_settings())
    for k, batch in enumerate(batches):
        for m, o in ((model, opt), (manual, opt_manual)):
            o.zero_grad()
            _backward(m, batch)
        opt_manual.param_groups[0]["lr"] = 0.02 * 0.5 ** (k // 2)
        opt.step()
        opt_manual.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**3)
    for a, b in zip(_params(model), _params(manual), strict=True):
        assert torch.equal(a, b)


def test_closure_returns_the_loss_and_steps():
    batch = _batches(1)[0]
    model, other = _net(), _net()
    opt, opt_other = MBF(model, **_settings()), MBF(other, **_settings())

    def closure():
        opt.zero_grad()
        return _backward(model, batch)

    loss = opt.step(closure)
    expected = _backward(other, batch)
    opt_other.step()
    assert torch.equal(loss, expected)
    for a, b in zip(_params(model), _params(other), strict=True):
        assert torch.equal(a, b)


def test_float32_runs_and_agrees_with_float64():
    batches = _batches(6, dtype=torch.float32)
    out = {}
    for impl in IMPLS:
        model = _net(dtype=torch.float32)
        opt = MBF(model, **_settings(implementation=impl))
        _train(model, opt, batches)
        assert opt.state[model[0].weight]["F"].dtype == torch.float32
        out[impl] = _params(model)
    model = _net()
    _train(model, MBF(model, **_settings()), [(x.to(DT), y) for x, y in batches])
    _close(out["fast"], out["reference"], rtol=1e-4, atol=1e-5)
    _close([p.to(DT) for p in out["fast"]], _params(model), rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_equals_reference():
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(5)]
    out = {}
    for impl in IMPLS:
        model = _net().cuda()
        opt = MBF(model, **_settings(implementation=impl))
        _train(model, opt, batches)
        out[impl] = _params(model)
    _close(out["fast"], out["reference"], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- fallbacks, errors
class _WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, idx):
        return self.fc(self.norm(self.emb(idx)).mean(1))


def _embedding_problem():
    torch.manual_seed(0)
    model = _WithEmbedding().to(DT)
    return model, torch.randint(0, 7, (5, 3)), torch.randint(0, 3, (5,))


def test_unplaceable_parameters_warn_exactly_once():
    model, idx, y = _embedding_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = MBF(model, lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            CE(model(idx), y).backward()
            opt.step()
        opt.load_state_dict(opt.state_dict())
    messages = [str(w.message) for w in caught if "mini-block layout" in str(w.message)]
    assert len(messages) == 1
    assert "'emb.weight' (Embedding has no mini-block layout)" in messages[0]
    assert "norm" not in messages[0]  # LayerNorm has a layout (Adam-like size-1 blocks)


@pytest.mark.parametrize("fallback", ["diagonal", "adam"])
def test_fallback_update_rule(fallback):
    """``diagonal``: d = m / (v + λ); ``adam``: d = m / (√v + λ); one step, v = (1 − β) g²."""
    model, idx, y = _embedding_problem()
    with pytest.warns(UserWarning, match="emb.weight"):
        opt = MBF(model, lr=1.0, damping=0.1, stat_decay=0.5, fallback=fallback)
    before = model.emb.weight.detach().clone()
    CE(model(idx), y).backward()
    g = model.emb.weight.grad.clone()
    opt.step()
    v = 0.5 * g**2
    expected = g / ((v.sqrt() if fallback == "adam" else v) + 0.1)
    torch.testing.assert_close(before - model.emb.weight.detach(), expected)


def test_partially_frozen_layer_falls_back():
    model = _net()
    model[7].bias.requires_grad_(False)
    with pytest.warns(UserWarning, match="only some parameters"):
        opt = MBF(model, lr=0.1)
    _train(model, opt, _batches(1))


BAD = [
    ({"lr": -1.0}, "lr must lie"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"damping": 0.0}, "damping must lie in \\(0"),
    ({"momentum": 1.0}, "momentum must lie"),
    ({"dampening": 1.5}, "dampening must lie"),
    ({"stat_decay": 1.0}, "stat_decay must lie"),
    ({"weight_decay": -0.1}, "weight_decay must lie"),
    ({"stat_period": 0}, "stat_period must be a positive integer"),
    ({"inverse_period": 2.5}, "inverse_period must be a positive integer"),
    ({"fisher": "true"}, "fisher must be one of"),
    ({"true_fisher": True}, "true_fisher= is now fisher=.*true_fisher=True is fisher='mc'"),
    ({"spatial_threshold": 0}, "spatial_threshold must be a positive integer"),
    ({"fallback": "sgd"}, "fallback must be one of"),
    ({"implementation": "turbo"}, "implementation must be one of"),
]


@pytest.mark.parametrize(("setting", "match"), BAD)
def test_invalid_settings_raise(setting, match):
    with pytest.raises(ValueError, match=match):
        MBF(_net(), **({"lr": 0.1} | setting))


def test_invalid_inputs_raise():
    model = _net()
    with pytest.raises(ValueError, match=r"param group 1\): damping"):
        MBF(
            model,
            lr=0.1,
            params=[
                {"params": list(model[0].parameters())},
                {"params": list(model[1].parameters()), "damping": -1.0},
            ],
        )
    with pytest.raises(TypeError, match="float32 or float64"):
        MBF(_net().half(), lr=0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        MBF(list(model.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        MBF(model, lr=0.1, params=[nn.Parameter(torch.zeros(2, dtype=DT))])


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_gradient_raises_and_changes_nothing(impl):
    model = _net()
    opt = MBF(model, **_settings(implementation=impl))
    batches = _batches(3)
    _train(model, opt, batches[:2])
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    before = _params(model)
    opt.zero_grad()
    _backward(model, batches[2])
    model[5].bias.grad[1] = float("nan")
    with pytest.raises(NonFiniteError, match="'5.bias'"):
        opt.step()
    for a, b in zip(before, _params(model), strict=True):
        assert torch.equal(a, b)
    saved.seek(0)
    old = torch.load(saved)["state"]
    for i, p in enumerate(model.parameters()):
        for key, value in opt.state[p].items():
            assert (
                torch.equal(value, old[i][key]) if torch.is_tensor(value) else value == old[i][key]
            )
    model[5].bias.grad.zero_()
    opt.step()


def test_finite_gradients_whose_sum_overflows_are_stepped_on():
    """The fast path screens each bucket's sum in float32: two finite 2e38 entries overflow it,
    the exact check then finds nothing to refuse, and the step is taken."""
    model = _net(dtype=torch.float32)
    opt = MBF(model, lr=1e-36, damping=1e3, momentum=0.0, stat_period=10**9, inverse_period=10**9)
    batches = _batches(2, dtype=torch.float32)
    _train(model, opt, batches[:1])
    opt.zero_grad()
    _backward(model, batches[1])
    model[5].weight.grad[:2, 0] = 2e38
    assert not torch.isfinite(model[5].weight.grad.sum())
    opt.step()
    assert opt.state[model[5].weight]["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_missing_gradients():
    model = _net()
    opt = MBF(model, lr=0.1)
    opt.step()  # no gradient at all: nothing happens
    assert not opt.state or all(s.get("step", 0) == 0 for s in opt.state.values())
    _backward(model, _batches(1)[0])
    model[7].bias.grad = None
    with pytest.raises(RuntimeError, match="'7.bias'"):
        opt.step()


def test_true_fisher_needs_curvature_grads():
    model = _net()
    opt = MBF(model, lr=0.1, fisher="mc", stat_period=2)
    assert opt.needs_curvature_grads()
    _backward(model, _batches(1)[0])
    with pytest.raises(ValueError, match="curvature_grads lacks"):
        opt.step()
    opt.step(curvature_grads={p: p.grad.clone() for p in model.parameters()})
    assert not opt.needs_curvature_grads()
    opt.step()  # not a statistics step: no curvature gradients needed
    plain = MBF(_net(), lr=0.1)
    with pytest.raises(ValueError, match="no param group has fisher='mc'"):
        plain.step(curvature_grads={})


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_curvature_gradient_raises(impl):
    model = _net()
    opt = MBF(model, lr=0.1, fisher="mc", implementation=impl)
    _backward(model, _batches(1)[0])
    curvature = {p: p.grad.clone() for p in model.parameters()}
    curvature[model[3].weight][0, 0, 0, 0] = float("-inf")
    with pytest.raises(NonFiniteError, match="curvature gradient of parameter '3.weight'"):
        opt.step(curvature_grads=curvature)
    assert not any(opt.state[p].get("step") for p in model.parameters())


@pytest.mark.parametrize("impl", IMPLS)
def test_warm_start_with_a_non_finite_gradient_resets_the_statistics(impl):
    model = _net()
    opt = MBF(model, lr=0.1, implementation=impl)
    maps = []
    for batch in _batches(2):
        model.zero_grad()
        _backward(model, batch)
        maps.append({p: p.grad.clone() for p in model.parameters()})
    maps[1][model[1].bias][0] = float("nan")
    with pytest.raises(NonFiniteError, match="'1.bias'"):
        opt.warm_start(maps)
    assert all(not s["F"].any() for s in opt.state.values() if "F" in s)
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.warm_start([{model[0].weight: maps[0][model[0].weight]}])
    with pytest.raises(ValueError, match="no batch"):
        opt.warm_start([])


# ----------------------------------------------------------------------------- smoke
def test_mbf_trains_the_digits_mlp():
    from mbf_analysis.data import load_dataset
    from mbf_analysis.models import digits_mlp

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = digits_mlp()
    opt = MBF(model, lr=0.02, damping=0.03, stat_period=1, inverse_period=5)
    x, y = data.train_x, data.train_y

    def full_loss():
        with torch.no_grad():
            return float(CE(model(x), y))

    start = full_loss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            CE(model(x[idx]), y[idx]).backward()
            opt.step()
    assert start > 2.0 and full_loss() < 0.3
    with torch.no_grad():
        assert (model(data.test_x).argmax(1) == data.test_y).float().mean() > 0.8
