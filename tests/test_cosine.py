"""Cosine along the BDF trajectory (mbf_analysis.analysis.cosine).

The ground truth re-derives every quantity by hand on a tiny MLP in float64: per-sample
gradients from torch.func, the layer vectors in METHODS §2 order built explicitly, BDF's dense
EFM EMA and MBF's block-diagonal EMA as explicit ``[d, d]`` matrices solved with
``torch.linalg.solve``, SGD-m's momentum, the cosine by its formula and the step
``θ ← θ − α d_BDF``. The remaining tests check determinism, resuming, the single collection pass
per iteration, the minibatch sampler and the error messages. The all-layer reference
(``reference="full"``) is checked against the dense Fisher over all layers (empirical from
torch.func per-sample gradients, exact ``(1/m) Σ J_nᵀ H_n J_n`` from torch.func Jacobians),
``ζ* = F_λ⁻¹g`` by ``torch.linalg.solve``, and the one-shot SGD-m and BDF directions by hand.
"""

import io

import pandas as pd
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from mbf_analysis.analysis.cosine import (
    COLUMNS,
    DEFAULT_METHODS,
    FULL_COLUMNS,
    NETWORK,
    CosineConfig,
    CosineDivergedError,
    CosineRun,
    _cosine,
    cosine_trajectory,
)
from mbf_analysis.errors import MemoryBudgetError, NonFiniteError

DT = torch.float64
N = 24


def _problem(seed=0, n=N):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def _run(config=None, seed=0, **kwargs):
    model, x, y = _problem(seed)
    config = config or CosineConfig(batch_size=6, **kwargs)
    return CosineRun(model, nn.CrossEntropyLoss(), x, y, config)


# ----------------------------------------------------------------------------- ground truth
def _layer_vector(weight, bias):
    """METHODS §2 order of a Linear layer: ``[W[0,:], b[0], W[1,:], b[1], ...]``."""
    return torch.cat([weight, bias.unsqueeze(-1)], dim=-1).flatten(-2)


def _block_mask(n_out, n_in):
    ids = torch.arange(n_out).repeat_interleave(n_in + 1)
    return ids[:, None] == ids[None, :]


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_matches_hand_computation():
    """Three iterations, full batch, against explicit BDF, MBF and SGD-m recursions."""
    lr, lam, beta, mu = 0.5, 0.1, 0.9, 0.9
    model, x, y = _problem()
    config = CosineConfig(
        methods=["mbf", "sgdm", "bdf"], batch_size=N, lr=lr, damping=lam, iterations=3
    )
    frame = CosineRun(model, nn.CrossEntropyLoss(), x, y, config).run(progress=False)

    net, x, y = _problem()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    layers = {"0": (3, 4), "2": (4, 3)}

    def loss_one(p, xn, yn):
        logits = functional_call(net, p, (xn.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yn.unsqueeze(0))

    state = {
        layer: {
            "m_bdf": torch.zeros(n_out * (n_in + 1), dtype=DT),
            "F_bdf": torch.zeros(n_out * (n_in + 1), n_out * (n_in + 1), dtype=DT),
            "m_mbf": None,
            "F_mbf": torch.zeros(n_out * (n_in + 1), n_out * (n_in + 1), dtype=DT),
            "m_sgdm": None,
        }
        for layer, (n_in, n_out) in layers.items()
    }
    expected = []
    for k in range(3):
        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        loss = float(nn.functional.cross_entropy(functional_call(net, params, (x,)), y))
        steps = {}
        for layer, (n_in, n_out) in layers.items():
            g_n = _layer_vector(per_sample[f"{layer}.weight"], per_sample[f"{layer}.bias"])
            g = g_n.mean(0)
            s = state[layer]
            s["m_bdf"] = beta * s["m_bdf"] + (1 - beta) * g
            s["F_bdf"] = beta * s["F_bdf"] + (1 - beta) * g_n.T @ g_n / N
            eye = torch.eye(len(g), dtype=DT)
            d_bdf = torch.linalg.solve(s["F_bdf"] + lam * eye, s["m_bdf"])
            s["m_mbf"] = g.clone() if s["m_mbf"] is None else mu * s["m_mbf"] + g
            outer = torch.outer(g, g) * _block_mask(n_out, n_in)
            s["F_mbf"] = beta * s["F_mbf"] + (1 - beta) * outer
            d_mbf = torch.linalg.solve(s["F_mbf"] + lam * eye, s["m_mbf"])
            s["m_sgdm"] = g.clone() if s["m_sgdm"] is None else mu * s["m_sgdm"] + g
            for method, d in (("mbf", d_mbf), ("sgdm", s["m_sgdm"]), ("bdf", d_bdf)):
                expected.append((k, layer, method, _cos(d, d_bdf), loss))
            steps[layer] = d_bdf.reshape(n_out, n_in + 1)
        for layer, step in steps.items():
            params[f"{layer}.weight"] = params[f"{layer}.weight"] - lr * step[:, :-1]
            params[f"{layer}.bias"] = params[f"{layer}.bias"] - lr * step[:, -1]

    truth = pd.DataFrame(expected, columns=list(COLUMNS))
    assert list(frame.columns) == list(COLUMNS)
    pd.testing.assert_frame_equal(
        frame[["iteration", "layer", "method"]], truth[["iteration", "layer", "method"]]
    )
    torch.testing.assert_close(
        torch.tensor(frame.cosine.to_numpy()),
        torch.tensor(truth.cosine.to_numpy()),
        rtol=1e-9,
        atol=1e-12,
    )
    torch.testing.assert_close(
        torch.tensor(frame.loss.to_numpy()), torch.tensor(truth.loss.to_numpy()), rtol=1e-12, atol=0
    )
    assert frame[frame.method == "bdf"].cosine.sub(1.0).abs().lt(1e-12).all()
    assert frame[frame.method != "bdf"].cosine.lt(1.0 - 1e-6).all()
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), params[name], rtol=1e-10, atol=1e-12)


def test_cosine_formula_clipping_and_undefined_cases():
    a = torch.tensor([3.0, 4.0], dtype=DT)
    assert _cosine(a, torch.tensor([4.0, -3.0], dtype=DT)) == 0.0
    assert _cosine(a, -2 * a) == -1.0
    assert _cosine(a, a) <= 1.0
    assert _cosine(a.float(), torch.tensor([1.0, 0.0])) == pytest.approx(0.6, abs=1e-15)
    assert torch.isnan(torch.tensor(_cosine(a, torch.zeros(2, dtype=DT))))
    assert torch.isnan(torch.tensor(_cosine(a, torch.tensor([float("inf"), 0.0], dtype=DT))))


# ----------------------------------------------------------------------------- behaviour
def test_default_frame_layout_and_records():
    run = _run()
    records = []
    frame = run.run(3, on_record=records.append, progress=False)
    layers = ["0", "2"]
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 3 * len(layers) * len(DEFAULT_METHODS)
    assert run.iteration == 3
    assert list(frame.iteration.unique()) == [0, 1, 2]
    assert list(frame.method.unique()) == list(DEFAULT_METHODS)
    assert list(frame.layer.unique()) == layers
    assert frame.cosine.between(-1, 1).all()
    assert frame.groupby("iteration").loss.nunique().eq(1).all()
    assert [len(r) for r in records] == [len(layers) * len(DEFAULT_METHODS)] * 3
    pd.testing.assert_frame_equal(pd.concat(records, ignore_index=True), frame)


def test_layers_subset():
    frame = _run(CosineConfig(layers=["2"], batch_size=6, methods=["mbf"])).run(2, progress=False)
    assert list(frame.layer.unique()) == ["2"]


def test_deterministic_for_a_seed_and_seed_dependent():
    first = _run(seed=1).run(4, progress=False)
    again = _run(seed=1).run(4, progress=False)
    pd.testing.assert_frame_equal(first, again)
    other = _run(CosineConfig(batch_size=6, seed=1), seed=1).run(4, progress=False)
    assert not first.cosine.equals(other.cosine)
    assert not first.loss.equals(other.loss)


def test_trajectory_does_not_depend_on_the_compared_methods():
    alone = _run(CosineConfig(methods=["sgdm"], batch_size=6)).run(4, progress=False)
    full = _run().run(4, progress=False)
    assert alone.groupby("iteration").loss.first().equals(full.groupby("iteration").loss.first())
    pd.testing.assert_frame_equal(
        full[full.method == "sgdm"].reset_index(drop=True), alone.reset_index(drop=True)
    )


def test_resume_continues_identically():
    config = CosineConfig(methods=[*DEFAULT_METHODS, "mbf-exact"], batch_size=7)
    straight = _run(config).run(6, progress=False)

    first = _run(config)
    head = first.run(3, progress=False)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = _run(config)
    torch.manual_seed(5)
    for module in second.model.children():
        if isinstance(module, nn.Linear):
            module.reset_parameters()  # other weights, overwritten by the load
    second.load_state_dict(torch.load(buffer))
    assert second.iteration == 3
    tail = second.run(3, progress=False)
    pd.testing.assert_frame_equal(pd.concat([head, tail], ignore_index=True), straight)


def test_resume_refuses_other_methods():
    state = _run().state_dict()
    with pytest.raises(ValueError, match="saved with methods"):
        _run(CosineConfig(methods=["mbf"], batch_size=6)).load_state_dict(state)


def test_one_forward_pass_per_iteration():
    run = _run(CosineConfig(methods=[*DEFAULT_METHODS, "mbf-exact"], batch_size=6))
    calls = []
    run.model.register_forward_hook(lambda *args: calls.append(1))
    run.run(5, progress=False)
    assert len(calls) == 5


def test_minibatches_are_drawn_without_replacement_within_an_epoch():
    model, x, y = _problem(n=10)
    x = torch.arange(10, dtype=DT)[:, None].repeat(1, 3)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 0].tolist()))
    config = CosineConfig(methods=["sgdm"], batch_size=3, lr=1e-3)
    CosineRun(model, nn.CrossEntropyLoss(), x, y, config).run(6, progress=False)
    assert all(len(batch) == 3 for batch in seen)
    for epoch in (seen[:3], seen[3:]):
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == 9
    assert seen[:3] != seen[3:]


def test_cosine_trajectory_leaves_the_model_untouched():
    model, x, y = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frame = cosine_trajectory(
        model, nn.CrossEntropyLoss(), x, y, methods=["mbf"], iterations=3, batch_size=6
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    expected = _run(CosineConfig(methods=["mbf"], batch_size=6)).run(3, progress=False)
    pd.testing.assert_frame_equal(frame, expected)


def test_method_options_reach_the_methods():
    run = _run(
        CosineConfig(
            batch_size=6,
            methods=["mbf", "kfac"],
            damping=0.05,
            method_options={
                "kfac": {"damping": 0.2, "damping_mode": "eigen"},
                "bdf": {"decay": 0.5},
            },
        )
    )
    assert run.methods["mbf"].config.damping == 0.05
    assert run.methods["kfac"].config.damping == 0.2
    assert run.methods["kfac"].config.damping_mode == "eigen"
    assert run.methods["bdf"].config.damping == 0.05
    assert run.methods["bdf"].config.decay == 0.5
    assert list(run.methods) == ["mbf", "kfac", "bdf"]


# ----------------------------------------------------------------------------- failures
def test_non_finite_direction_raises_with_partial_results():
    run = _run()
    records = []
    bdf = run.methods["bdf"]
    healthy = bdf.direction

    def poisoned(grads=None):
        out = healthy(grads)
        if run.iteration == 2:
            out["2"] = torch.full_like(out["2"], float("nan"))
        return out

    bdf.direction = poisoned
    with pytest.raises(CosineDivergedError, match="iteration 2") as info:
        run.run(5, on_record=records.append, progress=False)
    err = info.value
    assert isinstance(err, NonFiniteError)
    assert err.iteration == 2
    assert "larger damping" in str(err) and "smaller lr" in str(err)
    assert "layer(s) ['2']" in str(err)
    pd.testing.assert_frame_equal(err.frame, pd.concat(records, ignore_index=True))
    assert list(err.frame.iteration.unique()) == [0, 1]


@pytest.mark.parametrize("methods", [["sgdm"], DEFAULT_METHODS])
def test_divergent_run_raises_with_partial_results(methods):
    records = []
    config = CosineConfig(methods=methods, batch_size=6, lr=1e308)
    with pytest.raises(CosineDivergedError, match="diverged at iteration") as info:
        _run(config).run(10, on_record=records.append, progress=False)
    err = info.value
    assert err.iteration >= 1
    assert list(err.frame.iteration.unique()) == list(range(err.iteration))
    pd.testing.assert_frame_equal(err.frame, pd.concat(records, ignore_index=True))


def test_non_finite_inputs_are_refused():
    model, x, y = _problem()
    x[:] = float("inf")
    run = CosineRun(model, nn.CrossEntropyLoss(), x, y, CosineConfig(batch_size=6))
    with pytest.raises(ValueError, match="iteration 0 has NaN or Inf inputs"):
        run.run(2, progress=False)


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['lbfgs'\]; choose from .*'mbf'"):
        CosineConfig(methods=["mbf", "lbfgs"])


def test_unknown_layer_lists_the_layers():
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['fc9'\].*\['0', '2'\]"):
        _run(CosineConfig(layers=["fc9"], batch_size=6))


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"methods": []}, ValueError, "empty"),
        ({"methods": ["mbf", "mbf"]}, ValueError, "repeats"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"damping": float("nan")}, ValueError, "damping"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"iterations": 1.5}, ValueError, "iterations"),
        ({"seed": -1}, ValueError, "seed"),
        ({"layers": ["0", "0"]}, ValueError, "layers"),
        ({"method_options": {"shampoo": {"eps": 1.0}}, "methods": ["mbf"]}, ValueError, "not"),
        ({"method_options": {"mbf": {"eps": 1.0}}}, TypeError, "eps"),
    ],
)
def test_config_validation(settings, error, match):
    with pytest.raises(error, match=match):
        CosineConfig(**settings)


def test_batch_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        _run(CosineConfig(batch_size=N + 1))


# ----------------------------------------------------------------------------- all-layer reference
def _dense_fisher(net, params, x, y, kind):
    """Dense ``F`` over both layers (§2 order) and ``g``, by torch.func, at ``params``."""

    def out_one(p, xn):
        return functional_call(net, p, (xn.unsqueeze(0),))[0]

    def loss_one(p, xn, yn):
        return nn.functional.cross_entropy(out_one(p, xn).unsqueeze(0), yn.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    rows = torch.cat([_layer_vector(g[f"{k}.weight"], g[f"{k}.bias"]) for k in ("0", "2")], 1)
    if kind == "empirical":
        return rows.T @ rows / len(x), rows.mean(0), rows
    jac = vmap(jacrev(out_one), in_dims=(None, 0))(params, x)
    J = torch.cat([_layer_vector(jac[f"{k}.weight"], jac[f"{k}.bias"]) for k in ("0", "2")], -1)
    p = torch.softmax(functional_call(net, params, (x,)), dim=1)
    H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("ncd,nce,nef->df", J, H, J) / len(x), rows.mean(0), rows


def _energy_error(zeta, star, F, lam):
    def norm(v):
        return float(v @ F @ v + lam * v @ v) ** 0.5

    return norm(zeta - star) / norm(star)


@pytest.mark.parametrize("solver", ["dense", "woodbury"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_full_reference_matches_a_dense_computation(kind, solver):
    lam, iterations = 0.05, 3
    config = CosineConfig(
        reference_solver=solver,
        methods=["sgdm", "kfac", "kfac-two-level"],
        batch_size=N,
        damping=lam,
        iterations=iterations,
        reference="full",
        fisher=kind,
        method_options={"kfac-two-level": {"coarse": "residual"}},
    )
    run = _run(config)
    assert config.compared == ("sgdm", "kfac", "kfac-two-level", "bdf")
    assert run.methods["kfac"].config.fisher == kind and run.methods["kfac"].config.decay == 0.0
    assert run.stepper is not run.methods["bdf"] and run.stepper.config.decay == 0.9
    net = _problem()[0]
    thetas = [{k: v.detach().clone() for k, v in run.model.named_parameters()}]
    frame = run.run(
        on_record=lambda rows: thetas.append(
            {k: v.detach().clone() for k, v in run.model.named_parameters()}
        ),
        progress=False,
    )
    assert list(frame.columns) == list(FULL_COLUMNS)
    _, x, y = _problem()
    slices = {"0": slice(0, 16), "2": slice(16, 31), NETWORK: slice(0, 31)}
    for k in range(iterations):
        F, g, rows = _dense_fisher(net, thetas[k], x, y, kind)
        eye = torch.eye(31, dtype=DT)
        star = torch.linalg.solve(F + lam * eye, g)
        empirical = rows.T @ rows / N  # BDF's blocks are empirical whatever the reference
        bdf = torch.cat(
            [
                torch.linalg.solve(empirical[s, s] + lam * eye[s, s], g[s])
                for s in (slices["0"], slices["2"])
            ]
        )
        at_k = frame[frame.iteration == k]
        assert list(at_k.layer.unique()) == ["0", "2", NETWORK]
        for method, zeta in (("sgdm", g), ("bdf", bdf)):
            for layer, part in slices.items():
                row = at_k[(at_k.layer == layer) & (at_k.method == method)].iloc[0]
                assert row.cosine == pytest.approx(_cos(zeta[part], star[part]), rel=1e-9)
                expected = _energy_error(zeta[part], star[part], F[part, part], lam)
                assert row.energy_error == pytest.approx(expected, rel=1e-9)
        network = at_k[at_k.layer == NETWORK].set_index("method").energy_error
        assert network["kfac-two-level"] <= network["kfac"] * (1 + 1e-9)
        assert network["bdf"] > 0.0
    losses = frame.groupby("iteration").loss.first()
    reference = _run(CosineConfig(methods=["sgdm"], batch_size=N, damping=lam)).run(
        iterations, progress=False
    )
    assert losses.equals(reference.groupby("iteration").loss.first())  # the same trajectory


def test_coarse_space_variants_compare_side_by_side_as_in_their_own_runs():
    """``kfac-two-level-<coarse>`` names in one run give the rows that each coarse space gives
    in a run of its own (``method_options``), along the same trajectory."""
    shared = {"batch_size": N, "damping": 0.05, "iterations": 2, "reference": "full"}
    spaces = ("residual", "tselepidis")
    variants = [f"kfac-two-level-{coarse}" for coarse in spaces]
    together = _run(CosineConfig(methods=["kfac", *variants], **shared)).run(progress=False)
    assert list(dict.fromkeys(together.method)) == ["kfac", *variants, "bdf"]
    for coarse, name in zip(spaces, variants, strict=True):
        alone = _run(
            CosineConfig(
                methods=["kfac-two-level"],
                method_options={"kfac-two-level": {"coarse": coarse}},
                **shared,
            )
        ).run(progress=False)
        mine = together[together.method == name].reset_index(drop=True)
        theirs = alone[alone.method == "kfac-two-level"].reset_index(drop=True)
        for column in ("cosine", "energy_error", "loss"):
            assert mine[column].to_numpy() == pytest.approx(theirs[column].to_numpy(), rel=1e-12)
    a, b = (together[together.method == name].energy_error.to_numpy() for name in variants)
    assert not (a == b).all()  # the variants are different methods
    with pytest.raises(ValueError, match="kfac-two-level-krylov-residual"):
        CosineConfig(methods=["kfac-two-level-nope"])


def test_full_reference_frame_layout_and_one_pass_per_iteration():
    run = _run(CosineConfig(methods=["mbf", "sgdm"], batch_size=6, reference="full"))
    calls = []
    run.model.register_forward_hook(lambda *args: calls.append(1))
    records = []
    frame = run.run(2, on_record=records.append, progress=False)
    assert len(calls) == 2  # the empirical F comes from the per-sample gradients BDF collects
    assert list(frame.columns) == list(FULL_COLUMNS) and run.columns == FULL_COLUMNS
    assert len(frame) == 2 * 3 * 3
    assert list(frame.method.unique()) == ["mbf", "sgdm", "bdf"]
    assert frame.energy_error.gt(0).all() and frame.cosine.between(-1, 1).all()
    pd.testing.assert_frame_equal(pd.concat(records, ignore_index=True), frame)
    stateful = _run(
        CosineConfig(methods=["mbf", "bdf"], batch_size=6, reference="full", one_shot=False)
    )
    assert stateful.methods["bdf"] is stateful.stepper
    assert not stateful.config.is_one_shot and stateful.methods["mbf"].config.decay == 0.9
    assert stateful.run(1, progress=False).energy_error.notna().all()


@pytest.mark.parametrize(
    "settings",
    [
        {"reference": "full", "methods": ["kfac-two-level", "mbf"]},
        {"reference": "full", "one_shot": False, "fisher": "exact", "methods": ["kfac"]},
        {"one_shot": True, "methods": ["bdf", "mbf"]},
    ],
)
def test_resume_continues_identically_for_every_reference(settings):
    config = CosineConfig(batch_size=7, **settings)
    straight = _run(config).run(5, progress=False)
    first = _run(config)
    head = first.run(2, progress=False)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = _run(config)
    second.load_state_dict(torch.load(buffer))
    tail = second.run(3, progress=False)
    pd.testing.assert_frame_equal(pd.concat([head, tail], ignore_index=True), straight)


def test_resume_refuses_a_state_with_another_bdf_layout():
    shared = _run(CosineConfig(methods=["bdf", "mbf"], batch_size=6)).state_dict()
    apart = _run(CosineConfig(methods=["bdf", "mbf"], batch_size=6, one_shot=True))
    assert "stepper" in apart.state_dict()
    with pytest.raises(ValueError, match="separate BDF"):
        apart.load_state_dict(shared)


def test_one_shot_under_the_bdf_reference_compares_with_the_followed_bdf():
    config = CosineConfig(methods=["bdf", "sgdm"], batch_size=6, one_shot=True)
    frame = _run(config).run(3, progress=False)
    assert list(frame.columns) == list(COLUMNS)
    assert frame[frame.method == "bdf"].cosine.lt(1.0 - 1e-6).all()  # one-shot vs averaged
    # A followed BDF without averaging (decay 0) is its one-shot form: cosine 1.
    config = CosineConfig(
        methods=["bdf"], batch_size=6, one_shot=True, method_options={"bdf": {"decay": 0.0}}
    )
    run = _run(config)
    assert run.stepper is not run.methods["bdf"]
    assert run.run(3, progress=False).cosine.sub(1.0).abs().lt(1e-12).all()


def test_full_reference_refuses_a_fisher_over_the_budget(monkeypatch):
    monkeypatch.setenv("MBF_MEMORY_BUDGET", "4K")
    dense = CosineConfig(batch_size=6, reference="full", reference_solver="dense")
    with pytest.raises(MemoryBudgetError, match=r"6×31 rows .*all 31 parameters \(31×31.*'bdf'"):
        _run(dense)
    assert not _run(CosineConfig(batch_size=6, reference="full"))._dense_reference  # R < D
    monkeypatch.setenv("MBF_MEMORY_BUDGET", "1K")
    with pytest.raises(MemoryBudgetError, match=r"Woodbury solve with 6×6 matrices"):
        _run(CosineConfig(batch_size=6, reference="full"))
    _run(CosineConfig(batch_size=6))  # the BDF reference needs no all-layer F


def test_auto_solver_forms_the_fisher_when_it_has_more_rows_than_parameters():
    exact = CosineConfig(batch_size=12, reference="full", fisher="exact")  # R = 12·3 > D = 31
    run = _run(exact)
    assert run._dense_reference
    frame = run.run(2, progress=False)
    woodbury = _run(CosineConfig(**{**vars(exact), "reference_solver": "woodbury"}))
    other = woodbury.run(2, progress=False)
    for column in ("cosine", "energy_error"):
        torch.testing.assert_close(
            torch.tensor(other[column].to_numpy()),
            torch.tensor(frame[column].to_numpy()),
            rtol=1e-9,
            atol=1e-12,
        )


def test_full_reference_refuses_a_layer_named_like_the_network_rows():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(NETWORK, nn.Linear(3, 3))
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="rename the module"):
        CosineRun(model, nn.CrossEntropyLoss(), x, y, CosineConfig(batch_size=4, reference="full"))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"reference": "block"}, "reference must be one of"),
        ({"reference": "full", "fisher": "mc"}, "fisher must be one of"),
        ({"fisher": "exact"}, "needs reference='full'"),
        ({"one_shot": 1}, "one_shot must be None or a bool"),
        ({"reference_solver": "lu"}, "reference_solver must be one of"),
    ],
)
def test_reference_settings_are_validated(settings, match):
    with pytest.raises(ValueError, match=match):
        CosineConfig(**settings)


def test_method_options_take_precedence_over_the_reference_fisher():
    config = CosineConfig(
        methods=["kfac", "kpsvd"],
        reference="full",
        fisher="exact",
        method_options={"kpsvd": {"fisher": "mc"}},
    )
    built = config.build_methods()
    assert built["kfac"].config.fisher == "exact" and built["kpsvd"].config.fisher == "mc"
    assert CosineConfig(methods=["kfac"]).build_methods()["kfac"].config.fisher == "mc"
