"""The KFAC optimizer (``mbf_analysis.optim.KFAC``) against ``methods.get("kfac")``.

The optimizer records the factors with its own hooks during the training forward/backward pass;
the method gets them from ``collect`` on a hook-free copy of the model at the same iterate.
Directions must agree at every step, with the periods, both damping modes and the momentum in
play, for the empirical and the true Fisher (the same sampled labels: the same generator seed).
The true-Fisher step is also checked against an explicit computation: per-sample loops for
``A`` and ``G`` and a dense ``torch.kron`` solve for the direction.
"""

import copy
import io
import logging
import warnings

import pytest
import torch
from optim_cases import DT
from optim_cases import batches as _batches
from optim_cases import net as _net
from torch import nn

from mbf_analysis import methods
from mbf_analysis.curvature.collect import GRAD, KFAC_FACTORS, KFAC_FACTORS_SAMPLED, collect
from mbf_analysis.curvature.kfac import (
    apply_eigen_inverse,
    eigen_inverse,
    from_matrix,
    split_inverse,
    to_matrix,
)
from mbf_analysis.errors import NonFiniteError
from mbf_analysis.layout import layout_of, model_layouts
from mbf_analysis.linalg import symmetrize
from mbf_analysis.optim import KFAC, kfac_true_step
from mbf_analysis.optim.kfac import (
    batched_eigen_inverses,
    batched_split_inverses,
    split_weight_matrix,
    weight_matrix,
)

CE = nn.CrossEntropyLoss()

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = dict(damping=0.05, momentum=0.8, dampening=0.25, stat_decay=0.7)


@pytest.mark.parametrize("mode", ["split", "eigen"])
def test_directions_match_methods_kfac(mode):
    model = _net()
    twin = copy.deepcopy(model)  # no hooks: collect's passes must not reach the optimizer's
    lr = 0.02
    opt = KFAC(model, lr=lr, damping_mode=mode, stat_period=2, inverse_period=3, **SETTINGS)
    method = methods.get(
        "kfac",
        fisher="empirical",
        damping_mode=mode,
        stat_period=2,
        inverse_period=3,
        damping=SETTINGS["damping"],
        momentum=SETTINGS["momentum"],
        dampening=SETTINGS["dampening"],
        decay=SETTINGS["stat_decay"],
    )
    layouts = model_layouts(model)
    for k, (x, y) in enumerate(_batches(6)):
        twin.load_state_dict(model.state_dict())
        method.update(collect(twin, CE, x, y, {GRAD, KFAC_FACTORS}))
        expected = method.direction()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
        moved = {n: (before[n] - p.detach()) / lr for n, p in model.named_parameters()}
        for name, layout in layouts.items():
            got = layout.flatten({n: moved[n] for n in layout.param_names})
            torch.testing.assert_close(
                got, expected[name], rtol=1e-8, atol=1e-10, msg=f"{k} {name}"
            )


def test_hooks_record_only_before_statistics_steps_and_average_accumulation():
    model = _net()
    opt = KFAC(model, lr=0.01, stat_period=2)
    batches = _batches(3)
    record = opt._records["5"]
    for x, y in batches[:2]:  # two passes before step 0: averaged
        CE(model(x), y).backward()
    assert record.a_count == 2 and record.g_count == 2
    opt.step()
    opt.zero_grad()
    x, y = batches[2]
    CE(model(x), y).backward()  # step 1 is not a statistics step: nothing recorded
    assert record.a_count == 0
    opt.step()
    with torch.no_grad():
        model(x)
    assert record.a_count == 0
    opt.remove_hooks()
    CE(model(x), y).backward()
    assert record.a_count == 0


def test_missing_factors_and_non_finite_gradients_raise():
    model = _net()
    opt = KFAC(model, lr=0.01)
    x, y = _batches(1)[0]
    with torch.no_grad():
        loss = CE(model(x), y)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no layer input"):
        opt.step()
    opt.zero_grad()
    CE(model(x), y).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match="'0.weight'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not any(opt.state[p] for p in model.parameters())
    del loss


def test_state_dict_resume_and_fallback_warning():
    batches = _batches(6)

    def run(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()

    settings = dict(lr=0.02, stat_period=2, inverse_period=3, damping_mode="eigen", **SETTINGS)
    model = _net()
    run(model, KFAC(model, **settings), batches)
    model2 = _net()
    opt2 = KFAC(model2, **settings)
    run(model2, opt2, batches[:3])
    buffer = io.BytesIO()
    torch.save(opt2.state_dict(), buffer)
    buffer.seek(0)
    opt2.remove_hooks()
    opt3 = KFAC(model2, **settings)
    opt3.load_state_dict(torch.load(buffer))
    run(model2, opt3, batches[3:])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Embedding(3, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KFAC(grouped, lr=0.1)
    assert len(caught) == 1
    assert "'0.weight'" in str(caught[0].message) and "'2.weight'" in str(caught[0].message)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"damping": 0.0}, "damping"),
        ({"damping_mode": "exact"}, "damping_mode"),
        ({"stat_period": 0}, "stat_period"),
        ({"momentum": -0.1}, "momentum"),
        ({"fisher": "exact"}, "fisher must be one of"),
        ({"true_fisher": False}, "true_fisher=False is fisher='empirical'"),
    ],
)
def test_invalid_settings_raise(setting, match):
    with pytest.raises(ValueError, match=match):
        KFAC(_net(), **({"lr": 0.1} | setting))


# ----------------------------------------------------------------------------- true Fisher
def _seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["split", "eigen"])
def test_true_fisher_factors_and_directions_match_methods_kfac(mode):
    model = _net()
    twin = copy.deepcopy(model)
    lr = 0.02
    opt = KFAC(
        model,
        lr=lr,
        damping_mode=mode,
        stat_period=2,
        inverse_period=3,
        fisher="mc",
        **SETTINGS,
    )
    method = methods.get(
        "kfac",
        fisher="mc",
        damping_mode=mode,
        stat_period=2,
        inverse_period=3,
        damping=SETTINGS["damping"],
        momentum=SETTINGS["momentum"],
        dampening=SETTINGS["dampening"],
        decay=SETTINGS["stat_decay"],
    )
    layouts = model_layouts(model)
    factored = {"0": model[0], "3": model[3], "5": model[5], "7": model[7]}
    for k, (x, y) in enumerate(_batches(5)):
        twin.load_state_dict(model.state_dict())
        stats = collect(twin, CE, x, y, {GRAD, KFAC_FACTORS_SAMPLED}, generator=_seeded(10 + k))
        method.update(stats)
        expected = method.direction()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        kfac_true_step(opt, model, CE, x, y, generator=_seeded(10 + k))
        for name, module in factored.items():
            state = opt.state[module.weight]
            for key in ("A", "G"):
                torch.testing.assert_close(
                    state[key], method.state[name][key], rtol=1e-10, atol=1e-12, msg=f"{k} {key}"
                )
        moved = {n: (before[n] - p.detach()) / lr for n, p in model.named_parameters()}
        for name, layout in layouts.items():
            got = layout.flatten({n: moved[n] for n in layout.param_names})
            torch.testing.assert_close(
                got, expected[name], rtol=1e-8, atol=1e-10, msg=f"{k} {name}"
            )
    sampled = stats.kfac_sampled["7"].G
    empirical = collect(twin, CE, x, y, {KFAC_FACTORS}).kfac["7"].G
    assert not torch.allclose(sampled, empirical)  # the sampled labels make a difference


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)


def _problem(kind):
    """An MLP, inputs ``[5, 4]``, real targets, its loss module and the explicit ``ℓ_n``."""
    gen = _seeded(3)
    x = torch.randn(5, 4, generator=gen, dtype=DT)
    if kind == "ce":
        y = torch.randint(0, 3, (5,), generator=gen)
        per_sample = lambda f, t: nn.functional.cross_entropy(f, t, reduction="sum")  # noqa: E731
        return x, y, nn.CrossEntropyLoss(), per_sample
    if kind == "mse":
        y = torch.randn(5, 3, generator=gen, dtype=DT)
        return x, y, nn.MSELoss(), lambda f, t: 0.5 * (f - t).square().sum()
    y = torch.randint(0, 2, (5, 3), generator=gen).to(DT)
    per_sample = lambda f, t: nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
        f, t, reduction="sum"
    )
    return x, y, nn.BCEWithLogitsLoss(), per_sample


def _sample(kind, f, gen):
    """One label per row of ``f`` from the predictive distribution (METHODS.md §1)."""
    if kind == "ce":
        return torch.multinomial(torch.softmax(f, dim=1), 1, generator=gen).squeeze(1)
    if kind == "mse":
        return f + torch.randn(f.shape, generator=gen, dtype=f.dtype)
    return torch.bernoulli(torch.sigmoid(f), generator=gen)


def _explicit_factors(model, kind, x, per_sample, seed):
    """``A = (1/m) Σ ā āᵀ`` and ``G = (1/m) Σ δ δᵀ`` (``δ_n = ∂ℓ(f_n, ŷ_n)/∂s_n``) per layer."""
    with torch.no_grad():
        labels = _sample(kind, model(x), _seeded(seed))
    first, act, second = model
    A = {"0": 0, "2": 0}
    G = {"0": 0, "2": 0}
    for x_n, y_n in zip(x, labels, strict=True):
        s1 = first(x_n)
        h = act(s1)
        s2 = second(h)
        deltas = torch.autograd.grad(per_sample(s2, y_n), [s1, s2])
        for name, a, delta in (("0", x_n, deltas[0]), ("2", h.detach(), deltas[1])):
            a_bar = torch.cat([a, a.new_ones(1)])
            A[name] = A[name] + torch.outer(a_bar, a_bar) / len(x)
            G[name] = G[name] + torch.outer(delta, delta) / len(x)
    return A, G


def _explicit_direction(A, G, M_bar, damping, mode):
    """``vec D = K⁻¹ vec M̄`` (column-stacked) with the dense ``K`` of ``torch.kron``."""
    eye_a = torch.eye(len(A), dtype=DT)
    eye_g = torch.eye(len(G), dtype=DT)
    if mode == "eigen":
        K = torch.kron(A, G) + damping * torch.eye(len(A) * len(G), dtype=DT)
    else:
        pi = ((torch.trace(A) / len(A)) / (torch.trace(G) / len(G))).sqrt()
        root = damping**0.5
        K = torch.kron(A + pi * root * eye_a, G + root / pi * eye_g)
    vec = torch.linalg.solve(K, M_bar.mT.reshape(-1))
    return vec.reshape(len(A), len(G)).mT


@pytest.mark.parametrize("mode", ["split", "eigen"])
@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
def test_true_fisher_step_equals_explicit_factors_and_kron_solve(kind, mode):
    model = _mlp()
    x, y, loss_fn, per_sample = _problem(kind)
    A, G = _explicit_factors(model, kind, x, per_sample, seed=7)
    grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    lr, damping = 0.1, 0.05
    before = [p.detach().clone() for p in model.parameters()]
    opt = KFAC(model, lr=lr, damping=damping, damping_mode=mode, stat_decay=0.0, fisher="mc")
    kfac_true_step(opt, model, loss_fn, x, y, generator=_seeded(7))
    for i, name in ((0, "0"), (2, "2")):
        state = opt.state[model[i].weight]
        torch.testing.assert_close(state["A"], A[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["G"], G[name], rtol=1e-10, atol=1e-14)
        j = 2 * (i // 2)  # weight, bias index in parameters()
        M_bar = torch.cat([grads[j], grads[j + 1].unsqueeze(1)], dim=1)  # k = 0: m = g
        D = _explicit_direction(A[name], G[name], M_bar, damping, mode)
        got = torch.cat(
            [(before[j] - model[i].weight) / lr, ((before[j + 1] - model[i].bias) / lr)[:, None]],
            dim=1,
        )
        torch.testing.assert_close(got.detach(), D, rtol=1e-8, atol=1e-12)


def test_each_group_takes_g_from_its_own_backward_pass():
    model = _net()
    twin = copy.deepcopy(model)
    first, rest = [0, 5], [1, 3, 7]
    groups = [
        {"params": [p for i in first for p in model[i].parameters()], "fisher": "mc"},
        {"params": [p for i in rest for p in model[i].parameters()]},
    ]
    opt = KFAC(model, lr=0.01, stat_decay=0.0, params=groups)
    x, y = _batches(1)[0]
    stats = collect(twin, CE, x, y, {KFAC_FACTORS, KFAC_FACTORS_SAMPLED}, generator=_seeded(4))
    kfac_true_step(opt, model, CE, x, y, generator=_seeded(4))
    for i in first + [3, 7]:
        source = stats.kfac_sampled if i in first else stats.kfac
        state = opt.state[model[i].weight]
        torch.testing.assert_close(state["A"], source[str(i)].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["G"], source[str(i)].G, rtol=1e-10, atol=1e-14)


def test_closure_with_sampled_backward_equals_kfac_true_step():
    batches = _batches(4)
    settings = dict(lr=0.02, stat_period=2, inverse_period=3, fisher="mc", **SETTINGS)
    model = _net()
    opt = KFAC(model, **settings)
    gen = _seeded(0)
    for x, y in batches:
        kfac_true_step(opt, model, CE, x, y, generator=gen)
    model2 = _net()
    opt2 = KFAC(model2, **settings)
    gen2 = _seeded(0)
    for k, (x, y) in enumerate(batches):

        def closure(x=x, y=y):
            opt2.zero_grad()
            outputs = model2(x)
            loss = CE(outputs, y)
            loss.backward(retain_graph=opt2.needs_sampled_backward())
            opt2.sampled_backward(outputs, CE, generator=gen2)
            return loss

        drawn = gen2.get_state()
        assert opt2.needs_sampled_backward() == (k % 2 == 0)
        opt2.step(closure)
        # Labels are drawn on statistics steps only.
        assert torch.equal(gen2.get_state(), drawn) == (k % 2 == 1)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_true_fisher_state_dict_resume_is_bit_exact_with_the_generator():
    batches = _batches(6)
    settings = dict(lr=0.02, stat_period=2, inverse_period=3, damping_mode="eigen", fisher="mc")

    def run(model, opt, part, gen):
        for x, y in part:
            kfac_true_step(opt, model, CE, x, y, generator=gen)

    model = _net()
    run(model, KFAC(model, **settings, **SETTINGS), batches, _seeded(5))
    model2 = _net()
    opt2 = KFAC(model2, **settings, **SETTINGS)
    gen = _seeded(5)
    run(model2, opt2, batches[:3], gen)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt2.state_dict(), "generator": gen.get_state()}, buffer)
    buffer.seek(0)
    opt2.remove_hooks()
    saved = torch.load(buffer)
    opt3 = KFAC(model2, lr=1.0)  # the saved settings replace these
    opt3.load_state_dict(saved["optimizer"])
    assert opt3.param_groups[0]["fisher"] == "mc"
    gen3 = torch.Generator()
    gen3.set_state(saved["generator"])
    run(model2, opt3, batches[3:], gen3)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved", [None, False, True])
def test_a_state_saved_with_true_fisher_or_before_it_loads_under_the_new_word(saved):
    model = _net()
    opt = KFAC(model, lr=0.01)
    x, y = _batches(1)[0]
    CE(model(x), y).backward()
    opt.step()
    old = opt.state_dict()
    for group in old["param_groups"]:  # as an earlier version saved it
        del group["fisher"]
        if saved is not None:
            group["true_fisher"] = saved
    opt.remove_hooks()
    opt2 = KFAC(model, lr=0.01, fisher="mc" if not saved else "empirical")
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["fisher"] == ("mc" if saved else "empirical")
    assert "true_fisher" not in opt2.param_groups[0]
    if saved:
        return
    opt2.zero_grad()
    CE(model(x), y).backward()
    opt2.step()  # a plain step: the empirical factors come from this backward pass
    assert opt2.state[model[7].weight]["step"] == 2


def test_true_fisher_misuse_raises_naming_the_fix():
    model = _net()
    x, y = _batches(1)[0]
    opt = KFAC(model, lr=0.01, fisher="mc")
    CE(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"fisher='mc'.*sampled_backward.*kfac_true_step"):
        opt.step()
    opt.zero_grad()

    def closure():
        loss = CE(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"sampled_backward\(outputs, loss_fn\)"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not any(opt.state[p] for p in model.parameters())
    with torch.no_grad():
        detached = model(x)
    with pytest.raises(ValueError, match="requires_grad"):
        opt.sampled_backward(detached, CE)
    with pytest.raises(TypeError, match="unsupported loss L1Loss"):
        opt.sampled_backward(model(x), nn.L1Loss())
    opt.remove_hooks()
    plain = KFAC(model, lr=0.01)
    with pytest.raises(ValueError, match="no param group has fisher='mc'"):
        plain.sampled_backward(model(x), CE)
    with pytest.raises(ValueError, match="no param group has fisher='mc'"):
        kfac_true_step(plain, model, CE, x, y)


# --------------------------------------------------------------------------- fast paths


def _spd(n, seed, dtype=DT, cond=1e3):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    w = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return symmetrize((q * w) @ q.T).to(dtype)


def _layer_factors():
    """Factors of five layers, three of the same sizes (batched together), and two lone sizes."""
    sizes = [(9, 4), (7, 4), (7, 4), (7, 4), (12, 1)]
    return [(_spd(a, 2 * i), _spd(g, 2 * i + 1) * 10.0**i) for i, (a, g) in enumerate(sizes)]


@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_batched_split_inverses_equal_split_inverse(damping):
    factors = _layer_factors()
    got = batched_split_inverses(factors, damping)
    for (a, g), inverse in zip(factors, got, strict=True):
        ref = split_inverse(a, g, damping)
        torch.testing.assert_close(inverse.p_a, ref.p_a, rtol=1e-13, atol=0)
        torch.testing.assert_close(inverse.p_g, ref.p_g, rtol=1e-13, atol=0)


def test_batched_split_inverses_send_a_failing_block_down_the_chain(caplog):
    """A float32 factor whose float32 Cholesky fails takes the fallback chain, alone."""
    bad = _spd(8, 40, dtype=torch.float32, cond=1e12) * 1e6
    damping = 1e-12  # √λ·π ≈ 1e-3 ≪ the rounding of bad's entries
    factors = [
        (bad, _spd(8, 41, torch.float32)),
        (_spd(8, 42, torch.float32), _spd(8, 43, torch.float32)),
    ]
    with caplog.at_level(logging.DEBUG, logger="mbf_analysis.linalg"):
        got = batched_split_inverses(factors, damping)
    messages = [r.getMessage() for r in caplog.records if r.name == "mbf_analysis.linalg"]
    assert len(messages) == 1
    assert messages[0].startswith("1 of 4 blocks (s=8) failed Cholesky in torch.float32")
    for (a, g), inverse in zip(factors, got, strict=True):
        ref = split_inverse(a, g, damping)
        assert torch.isfinite(inverse.p_a).all()
        torch.testing.assert_close(inverse.p_a, ref.p_a, rtol=1e-6, atol=0)
        torch.testing.assert_close(inverse.p_g, ref.p_g, rtol=1e-6, atol=0)


def test_batched_eigen_inverses_equal_eigen_inverse():
    factors = _layer_factors()
    for (a, g), inverse in zip(factors, batched_eigen_inverses(factors), strict=True):
        ref = eigen_inverse(a, g)
        v = torch.randn(g.shape[0], a.shape[0], dtype=DT)
        torch.testing.assert_close(
            apply_eigen_inverse(inverse, v, 0.01),
            apply_eigen_inverse(ref, v, 0.01),
            rtol=1e-12,
            atol=0,
        )
        torch.testing.assert_close(inverse.w_a, ref.w_a, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(inverse.w_g, ref.w_g, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(5, 3),
        nn.Linear(5, 3, bias=False),
        nn.Conv2d(2, 4, 3),
        nn.Conv2d(2, 4, (1, 2), bias=False),
    ],
    ids=["linear", "linear-no-bias", "conv", "conv-no-bias"],
)
def test_weight_matrix_is_to_matrix(module):
    layout = layout_of("layer", module)
    gen = torch.Generator().manual_seed(50)
    tensors = {
        name: torch.randn(shape, generator=gen, dtype=DT)
        for name, shape in zip(layout.param_names, layout.param_shapes, strict=True)
    }
    matrix = weight_matrix(layout, tensors)
    assert torch.equal(matrix, to_matrix(layout, layout.flatten(tensors)))
    parts = split_weight_matrix(layout, matrix)
    reference = layout.unflatten(from_matrix(layout, matrix))
    assert parts.keys() == reference.keys()
    for name in parts:
        assert (
            torch.equal(parts[name], reference[name]) and parts[name].shape == tensors[name].shape
        )
