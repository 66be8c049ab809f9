"""Fisher-approximation errors (METHODS.md §6.1) against dense float64 ground truth.

Ground truth: the dense layer Fisher of :func:`mbf_analysis.curvature.layer_fisher` (its own
backward passes), its rearrangement ``Z`` and ``torch.linalg.svdvals``, ``eigvalsh`` and dense
masks; the factored path (no dense ``F``) must agree with the dense one.
"""

import copy
import io
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mbf_analysis import methods as registry
from mbf_analysis.analysis import (
    APPROXIMATED,
    CARRIED,
    ERROR_COLUMNS,
    TRAJECTORY_COLUMNS,
    ApproximationConfig,
    ApproximationRun,
    approximation_errors,
    approximation_trajectory,
)
from mbf_analysis.analysis import approximation as module
from mbf_analysis.analysis.approximation import SkippedLayersWarning
from mbf_analysis.curvature import layer_fisher
from mbf_analysis.curvature.collect import KFAC_FACTORS, collect
from mbf_analysis.curvature.kfac import from_matrix, kron_layout_matrix
from mbf_analysis.errors import UnsupportedModuleError
from mbf_analysis.layout import model_layouts

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
M = 8
REFERENCE_KIND = {"empirical": "empirical", "exact": "exact", "mc": "mc"}


def _problem(seed=0, widths=(5, 6, 4), m=M):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(widths[0], widths[1]), nn.Tanh(), nn.Linear(widths[1], widths[2])
    ).to(DT)
    x, y = torch.randn(m, widths[0], dtype=DT), torch.randint(0, widths[2], (m,))
    return model, x, y


ONE_SHOT = [name for name in APPROXIMATED if name not in CARRIED]
KRONECKER_SVD = ["kpsvd", "deflation", "lanczos", "kfac-corrected"]  # refuse a Conv2d model


def _errors(model, x, y, methods=ONE_SHOT, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    return approximation_errors(
        model, nn.CrossEntropyLoss(), x, y, methods, generator=gen, **kwargs
    ).set_index(["layer", "method"])


def _kfac_order(layout, F):
    """The §2-order block in KFAC's column-stacked order, as ``[a, g, a, g]``."""
    g = layout.param_shapes[0][0]
    a = layout.dim // g
    perm = from_matrix(layout, torch.arange(g * a).reshape(a, g).T)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    return F[inverse][:, inverse].reshape(a, g, a, g)


@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
def test_errors_match_dense_ground_truth(fisher):
    model, x, y = _problem()
    frame = _errors(model, x, y, fisher=fisher, method_options={"lanczos": {"lanczos_steps": 9}})
    assert list(frame.reset_index().columns) == list(ERROR_COLUMNS)
    reference = layer_fisher(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        kind=REFERENCE_KIND[fisher],
        generator=torch.Generator().manual_seed(0),  # the labels of the collection pass
    )
    kfac = collect(model, nn.CrossEntropyLoss(), x, y, {KFAC_FACTORS}).kfac
    for layer, layout in model_layouts(model).items():
        F = reference[layer]
        norm = torch.linalg.matrix_norm(F)
        row = frame.loc[layer]
        np.testing.assert_allclose(row.fisher_norm, float(norm), rtol=1e-12)
        blocks = _kfac_order(layout, F)
        a, g = blocks.shape[:2]
        Z = blocks.permute(0, 2, 1, 3).reshape(a * a, g * g)  # Van Loan–Pitsianis
        sv = torch.linalg.svdvals(Z)
        total = float(sv.square().sum())
        assert row.error["kpsvd"] ** 2 == pytest.approx(1 - float(sv[0] ** 2) / total, abs=1e-10)
        optimum = 1 - float(sv[:2].square().sum()) / total
        assert row.error["deflation"] ** 2 == pytest.approx(optimum, abs=1e-10)
        assert row.error["lanczos"] ** 2 == pytest.approx(optimum, abs=1e-10)  # K ≥ rank Z
        mask = layout.block_mask()
        off = float(torch.linalg.matrix_norm(F * ~mask) / norm)
        assert row.error["mbf-exact"] == pytest.approx(off, rel=1e-10)
        assert row.error["bdf"] == 0.0 and row.singular_error["bdf"] == 0.0
        assert row.error["deflation"] <= row.error["kpsvd"] <= row.error["kfac"]
        assert row.error["kfac-corrected"] <= row.error["kfac"]
        if fisher == "empirical":  # KFAC of the real labels: collect's own factors
            dense = kron_layout_matrix(layout, *kfac[layer])
            expected = float(torch.linalg.matrix_norm(F - dense) / norm)
            assert row.error["kfac"] == pytest.approx(expected, rel=1e-10)
            top = torch.linalg.eigvalsh(F).flip(0)[:10]
            approx = torch.linalg.eigvalsh(dense).abs().sort(descending=True).values[:10]
            expected = float((approx - top).norm() / top.norm())
            assert row.singular_error["kfac"] == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
@pytest.mark.parametrize("threshold", [None, 1])  # no spatial averaging / every layer averaged
def test_factored_path_equals_the_dense_path(fisher, threshold):
    model, x, y = _problem(1)
    options = {
        "mbf": {"spatial_threshold": threshold},
        "mbf-exact": {"spatial_threshold": threshold},
    }
    dense = _errors(model, x, y, fisher=fisher, method_options=options)
    factored = _errors(model, x, y, fisher=fisher, method_options=options, max_dense_dim=0)
    assert set(dense.path) == {"dense"} and set(factored.path) == {"factored"}
    for column in ("error", "scale", "scaled_error", "singular_error", "fisher_norm", "clamped"):
        np.testing.assert_allclose(factored[column], dense[column], rtol=1e-9, atol=1e-12)


def _cnn(seed=0, m=M):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 4)).to(DT)
    return model, torch.randn(m, 1, 4, 4, dtype=DT), torch.randint(0, 4, (m,))


def _dense_approximations(model, x, y, names, fisher, F):
    """Layer → method → dense ``F̂``: the methods' own one-shot matrices from the statistics of
    the analysis's collection pass (the same needs, the same sampled labels), ``F`` masked to
    its mini-blocks (``mbf-exact``) and ``F`` itself (``bdf``)."""
    built = {}
    for name in set(names) - {"bdf", "mbf-exact"}:
        options = {"fisher": fisher} if name in module._WITH_FISHER else {}
        built[name] = registry.get(name, **options)
        built[name].config = built[name].config.one_shot()
    needs = frozenset().union(*(method.needs for method in built.values()))
    needs |= {module._KINDS[fisher]}
    gen = torch.Generator().manual_seed(0)
    stats = collect(model, nn.CrossEntropyLoss(), x, y, needs, generator=gen)
    for method in built.values():
        method.update(stats)
    out = {}
    for layer, layout in model_layouts(model).items():
        if layout.kind == "linear":
            own = {"bdf": F[layer], "mbf-exact": F[layer] * layout.block_mask()}
            out[layer] = {n: own[n] if n in own else built[n].matrix(layer) for n in names}
    return out


def _scale_free(F, approx):
    """``α = ⟨F, F̂⟩/‖F̂‖²`` and ``‖F − αF̂‖/‖F‖``, densely."""
    alpha = float((F * approx).sum() / approx.square().sum())
    return alpha, float(torch.linalg.matrix_norm(F - alpha * approx) / torch.linalg.matrix_norm(F))


@pytest.mark.parametrize("fisher", ["mc", "exact"])
@pytest.mark.parametrize("max_dense_dim", [2048, 0], ids=["dense", "factored"])
@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_scale_and_scaled_error_match_dense_ground_truth(network, max_dense_dim, fisher):
    # The analysis compares Linear layers only; the CNN's case is the Linear layer of a model
    # with a Conv2d layer, for the methods that take such a model.
    if network == "mlp":
        (model, x, y), names = _problem(7), ONE_SHOT
    else:
        (model, x, y), names = _cnn(7), [n for n in ONE_SHOT if n not in KRONECKER_SVD]
    frame = _errors(model, x, y, names, fisher=fisher, max_dense_dim=max_dense_dim)
    assert list(frame.reset_index().columns[3:6]) == ["error", "scale", "scaled_error"]
    gen = torch.Generator().manual_seed(0)  # the labels of the collection pass
    F = layer_fisher(model, nn.CrossEntropyLoss(), x, y, kind=REFERENCE_KIND[fisher], generator=gen)
    approximations = _dense_approximations(model, x, y, names, fisher, F)
    assert set(frame.index.get_level_values(0)) == set(approximations)
    for layer, per_method in approximations.items():
        for name, approx in per_method.items():
            row = frame.loc[(layer, name)]
            alpha, scaled = _scale_free(F[layer], approx)
            error = float(torch.linalg.matrix_norm(F[layer] - approx))
            error /= float(torch.linalg.matrix_norm(F[layer]))
            assert row.error == pytest.approx(error, rel=1e-9, abs=1e-12), (layer, name)
            assert row.scale == pytest.approx(alpha, rel=1e-9), (layer, name)
            assert row.scaled_error == pytest.approx(scaled, rel=1e-8, abs=1e-10), (layer, name)
    assert (frame.scaled_error <= frame.error + 1e-12).all()
    own = frame[frame.index.get_level_values("method").isin(["mbf-exact", "bdf"])]
    np.testing.assert_allclose(own.scale, 1.0, rtol=0, atol=1e-10)  # projections of F
    np.testing.assert_allclose(own.scaled_error, own.error, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("max_dense_dim", [2048, 0], ids=["dense", "factored"])
def test_a_zero_approximation_has_scale_0_and_scaled_error_1(max_dense_dim):
    # A zero network fitting zero targets: the gradient and so MBF's ḡḡᵀ vanish, while the
    # Gauss-Newton (exact) Fisher of MSE does not.
    model = nn.Linear(3, 2).to(DT)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    x = torch.randn(M, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(M, 2, dtype=DT)
    frame = approximation_errors(
        model, nn.MSELoss(), x, y, ["mbf", "bdf"], fisher="exact", max_dense_dim=max_dense_dim
    ).set_index("method")
    assert frame.fisher_norm["mbf"] > 0
    assert frame.error["mbf"] == pytest.approx(1.0, rel=1e-12)
    assert (frame.scale["mbf"], frame.scaled_error["mbf"]) == (0.0, 1.0)
    assert (frame.error["bdf"], frame.scale["bdf"], frame.scaled_error["bdf"]) == (0.0, 1.0, 0.0)


NAMES = ["deflation", "lanczos", "kfac-corrected", "kpsvd"]


def _spy(monkeypatch, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_arpack_spectra_of_larger_operators_match_eigvalsh(monkeypatch):
    # m = 12 ≥ a = 11: the sample spans are the whole spaces and the operators have d = 88 > 64
    # entries, which sends the rank-2 spectra to ARPACK; a kernel limit of 4 sends F's too.
    model, x, y = _problem(2, widths=(10, 8, 3), m=12)
    dense = _errors(model, x, y, NAMES, layers=["0"], top_k=6, fisher="exact")
    monkeypatch.setattr(module, "_MAX_KERNEL", 4)
    calls = _spy(monkeypatch, "eigsh")
    factored = _errors(model, x, y, NAMES, layers=["0"], top_k=6, fisher="exact", max_dense_dim=0)
    assert len(calls) == 4  # F and the three rank-2 methods
    np.testing.assert_allclose(factored.singular_error, dense.singular_error, rtol=1e-7)
    np.testing.assert_allclose(factored.error, dense.error, rtol=1e-9)


def test_rank2_spectra_are_computed_in_the_sample_spans(monkeypatch):
    # m = 6 < a = 21: every one-shot factor lies in span{ā_n} ⊗ span{δ_n} (6 × 6).
    model, x, y = _problem(3, widths=(20, 8, 3), m=6)
    dense = _errors(model, x, y, NAMES, layers=["0"])
    calls = _spy(monkeypatch, "_operator_top")
    factored = _errors(model, x, y, NAMES, layers=["0"], max_dense_dim=0)
    assert [tuple(args[1].shape) for args in calls] == [(6, 6)] * 3
    np.testing.assert_allclose(factored.singular_error, dense.singular_error, rtol=1e-8)


def test_clamped_denominators_are_reported():
    model, x, y = _problem(3)
    options = {"deflation": {"denominator_floor": 1.0, "damping": 1e-6}}
    frame = _errors(model, x, y, ["deflation", "kpsvd"], method_options=options)
    assert (frame.clamped.xs("deflation", level="method") > 0).all()
    assert (frame.clamped.xs("kpsvd", level="method") == 0).all()


def test_bad_requests_are_refused_by_name():
    model, x, y = _problem()
    with pytest.raises(ValueError, match="methods must be distinct names"):
        _errors(model, x, y, ["shampoo"])
    with pytest.raises(ValueError, match="fisher must be one of .*'true' is now spelled 'mc'"):
        _errors(model, x, y, fisher="true")
    with pytest.raises(ValueError, match="fisher must be one of"):
        _errors(model, x, y, fisher="ggn")
    with pytest.raises(ValueError, match="sets 'fisher'"):
        _errors(model, x, y, ["kfac"], method_options={"kfac": {"fisher": "empirical"}})
    with pytest.raises(ValueError, match="not compared"):
        _errors(model, x, y, ["kfac"], method_options={"kpsvd": {}})
    with pytest.raises(ValueError, match="top_k"):
        _errors(model, x, y, top_k=-1)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)).to(DT).eval()
    with pytest.raises(UnsupportedModuleError, match="layer '1' is not an nn.Linear"):
        _errors(bn, x, y, ["kfac"], layers=["1"])
    assert set(_errors(bn, x, y, ["kfac", "kpsvd"]).index.get_level_values(0)) == {"0", "2"}
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4)).to(DT)
    images = torch.randn(M, 1, 4, 4, dtype=DT)
    with pytest.raises(UnsupportedModuleError, match=r"layer '0' is an nn\.Conv2d"):
        _errors(cnn, images, y, ["kpsvd"])
    assert _errors(cnn, images, y, ["kfac"]).index.get_level_values(0).tolist() == ["2"]


# ----------------------------------------------------------------------------- trajectory
def _data(seed=4, n=40):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=DT), torch.randint(0, 4, (n,), generator=gen)


CONFIG = {"methods": ("kfac", "kpsvd", "deflation"), "iterations": 6, "every": 2, "batch_size": 16}


def test_trajectory_records_every_few_iterations_while_adam_trains():
    model, _, _ = _problem(5)
    x, y = _data()
    config = ApproximationConfig(fisher="exact", lr=0.01, fisher_batch_size=12, **CONFIG)
    run = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config)
    records = []
    frame = run.run(on_record=records.append, progress=False)
    assert list(frame.columns) == list(TRAJECTORY_COLUMNS)
    assert sorted(set(frame.iteration)) == [0, 2, 4] and len(records) == 3
    assert len(frame) == 3 * 2 * 3  # records × layers × methods
    assert run.iteration == 6
    # Iteration 0 records the errors at θ_0 on the first 12 samples of the first minibatch
    # (the first 16 of the epoch's permutation), and the steps are Adam's on the minibatches.
    batch_seed, _ = np.random.SeedSequence(0).generate_state(2)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(batch_seed)))
    expected = approximation_errors(
        model,
        nn.CrossEntropyLoss(),
        x[order[:12]],
        y[order[:12]],
        CONFIG["methods"],
        fisher="exact",
    )
    got = frame[frame.iteration == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(got[list(ERROR_COLUMNS)], expected)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x[order[:16]]), y[order[:16]]))
    np.testing.assert_allclose(got.loss, loss, rtol=1e-12)
    two = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config)
    two.run(2, progress=False)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    for index in (order[:16], order[16:32]):
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x[index]), y[index]).backward()
        optimizer.step()
    for p, q in zip(two.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_trajectory_resumes_identically_from_a_state_dict():
    model, _, _ = _problem(6)
    x, y = _data()
    config = ApproximationConfig(fisher="mc", **CONFIG)
    straight = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config)
    whole = straight.run(progress=False)
    first = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config)
    part = first.run(3, progress=False)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = resumed.run(3, progress=False)
    pd.testing.assert_frame_equal(pd.concat([part, rest], ignore_index=True), whole)
    other = ApproximationConfig(**{**CONFIG, "methods": ("kfac",)})
    with pytest.raises(ValueError, match="saved with methods"):
        ApproximationRun(model, nn.CrossEntropyLoss(), x, y, other).load_state_dict(
            first.state_dict()
        )
    untouched = copy.deepcopy(model)
    approximation_trajectory(
        untouched, nn.CrossEntropyLoss(), x, y, progress=False, **{**CONFIG, "iterations": 1}
    )
    for p, q in zip(untouched.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _blocks(model):
    """Layer → the §2 mini-blocks ``[W[j, :], b[j]]`` of its ``.grad``, ``[n_out, n_in + 1]``."""
    return {
        name: torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], 1)
        for name, layer in model.named_children()
        if isinstance(layer, nn.Linear)
    }


def _hand_rolled_emas(model, x, y, config, iterations):
    """Replay the run by hand (batch order, Adam steps, sampled labels of the carried stream)
    and yield per iteration ``(θ_k model, fisher batch, {method: layer → blockdiag(F_b)})``
    with ``F_j ← β F_j + (1 − β) g_j g_jᵀ`` on the steps ``k ≡ 0 (mod T1)``."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    batch_seed, _, carried_seed = np.random.SeedSequence(config.seed).generate_state(3)
    batches = torch.Generator().manual_seed(int(batch_seed))
    labels = torch.Generator().manual_seed(int(carried_seed))
    emas = {name: {} for name in CARRIED if name in config.methods}
    order, position, m = None, 0, config.batch_size
    for k in range(iterations):
        if order is None or position + m > len(x):
            order, position = torch.randperm(len(x), generator=batches), 0
        index = order[position : position + m]
        position += m
        xb, yb = x[index], y[index]
        for name, ema in emas.items():
            options = config.method_options[name]
            if k % options["stat_period"]:
                continue
            model.zero_grad()
            outputs = model(xb)
            if name == "mbf-true-ema":  # one label per input from the model's softmax
                yb_hat = torch.multinomial(outputs.detach().softmax(1), 1, generator=labels)
                nn.functional.cross_entropy(outputs, yb_hat.squeeze(1)).backward()
            else:
                nn.functional.cross_entropy(outputs, yb).backward()
            for layer, g in _blocks(model).items():
                outer = g.unsqueeze(2) * g.unsqueeze(1)
                beta = options["decay"]
                ema[layer] = beta * ema.get(layer, torch.zeros_like(outer)) + (1 - beta) * outer
        count = config.fisher_batch_size or m
        yield (
            model,
            (xb[:count], yb[:count]),
            {
                name: {layer: torch.block_diag(*f) for layer, f in ema.items()}
                for name, ema in emas.items()
            },
        )
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()


EMA_OPTIONS = {"mbf-ema": {"stat_period": 2, "decay": 0.8}, "mbf-true-ema": {"stat_period": 3}}


def test_mbf_ema_is_mbfs_ema_of_the_minibatch_gradients_on_its_period():
    model, _, _ = _problem(8)
    x, y = _data()
    options = {**EMA_OPTIONS, "mbf-true-ema": {"stat_period": 3, "decay": 0.9}}  # β default
    config = ApproximationConfig(
        methods=("mbf-ema", "mbf-true-ema", "mbf"),
        fisher="exact",
        iterations=7,
        every=3,
        batch_size=16,
        fisher_batch_size=12,
        lr=0.05,
        method_options=EMA_OPTIONS,
    )
    run = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config)
    replay = _hand_rolled_emas(model, x, y, replace(config, method_options=options), 7)
    for k, (reference, (xf, yf), expected) in enumerate(replay):
        frame = run.run(1, progress=False)
        for name, layers in expected.items():
            for layer, F_hat in layers.items():
                torch.testing.assert_close(
                    run.carried[name].matrix(layer), F_hat, rtol=1e-10, atol=1e-14
                )
        if k % config.every:
            assert frame.empty
            continue
        # the record at k compares that matrix with the fisher batch's exact Fisher at θ_k
        F = layer_fisher(reference, nn.CrossEntropyLoss(), xf, yf, kind="exact")
        rows = frame.set_index(["layer", "method"])
        for name, layers in expected.items():
            for layer, F_hat in layers.items():
                norm = torch.linalg.matrix_norm(F[layer])
                error = float(torch.linalg.matrix_norm(F[layer] - F_hat) / norm)
                alpha, scaled = _scale_free(F[layer], F_hat)
                row = rows.loc[(layer, name)]
                assert row.error == pytest.approx(error, rel=1e-9)
                assert row.scale == pytest.approx(alpha, rel=1e-9)
                assert row.scaled_error == pytest.approx(scaled, rel=1e-8)
    assert run.iteration == 7


def test_carried_methods_resume_bit_identically_and_change_no_other_row():
    model, _, _ = _problem(9)
    x, y = _data()
    config = ApproximationConfig(
        methods=("kfac", "mbf-true", "mbf-ema", "mbf-true-ema"),
        method_options=EMA_OPTIONS,
        iterations=9,
        every=2,
        batch_size=16,
    )
    whole = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config).run(
        progress=False
    )
    first = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config)
    part = first.run(5, progress=False)  # stops between the statistics steps of both
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, config)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = resumed.run(4, progress=False)
    pd.testing.assert_frame_equal(
        pd.concat([part, rest], ignore_index=True), whole, check_exact=True
    )
    plain = replace(config, methods=("kfac", "mbf-true"), method_options={})
    alone = ApproximationRun(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, plain)
    pd.testing.assert_frame_equal(
        alone.run(progress=False),
        whole[whole.method.isin(["kfac", "mbf-true"])].reset_index(drop=True),
        check_exact=True,
    )


def test_carried_methods_need_a_trajectory():
    model, x, y = _problem()
    with pytest.raises(ValueError, match=r"\['mbf-ema'\] are MBF's EMA along a training"):
        _errors(model, x, y, ["kfac", "mbf-ema"])
    with pytest.raises(TypeError, match="has no setting"):
        ApproximationConfig(methods=("mbf-ema",), method_options={"mbf-ema": {"beta": 0.5}})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("optimizer", "lbfgsx", "not a torch.optim optimizer"),
        ("every", 0, "every must be a positive integer"),
        ("fisher_batch_size", 99, "exceeds batch_size"),
        ("methods", ("kfac", "kfac"), "distinct"),
        ("lr", -1.0, "lr must be"),
    ],
)
def test_trajectory_configuration_is_validated(field, value, match):
    with pytest.raises(ValueError, match=match):
        ApproximationConfig(**{**CONFIG, field: value})


def test_a_network_with_convolutions_names_the_layers_it_leaves_out():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(SkippedLayersWarning, match=r"no rows: 0 \(conv2d\), 2 \(conv2d\)"):
        frame = approximation_errors(model, nn.CrossEntropyLoss(), x, y, ["kfac", "bdf"])
    assert set(frame.layer) == {"4"}
