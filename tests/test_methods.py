"""Generic tests that walk the method registry: every method, the same contract.

Each method gives finite directions of the right shapes on a tiny MLP and a tiny CNN, survives a
state_dict round trip (continuing after a load gives the same next direction), refuses NaN/Inf
statistics naming the layer without touching its state, and validates its configuration. The
Kronecker-SVD family (METHODS.md §6.1) and two-level KFAC (§6.2) are defined for Linear layers:
they refuse the CNN by naming its Conv2d layer and are walked on an MLP with a BatchNorm layer
instead.
"""

import copy
import functools
import io

import pytest
import torch
from torch import nn

from mbf_analysis import methods
from mbf_analysis.curvature.collect import STATISTICS, collect
from mbf_analysis.errors import NonFiniteError, UnsupportedModuleError
from mbf_analysis.layout import model_layouts

DT = torch.float64
M = 6
NAMES = methods.names()


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _cnn():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def _mlp_bn():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


MODELS = {"mlp": (_mlp, (4,)), "cnn": (_cnn, (2, 4, 4)), "mlp-bn": (_mlp_bn, (4,))}
LINEAR_ONLY = frozenset({"kpsvd", "deflation", "lanczos", "kfac-corrected", "kfac-two-level"})
"""Methods defined for Linear layers only (they refuse Conv2d layers by name)."""
INDEFINITE = frozenset({"deflation", "lanczos", "kfac-corrected"})
"""Methods whose matrix A₁⊗G₁ + A₂⊗G₂ is indefinite in general (METHODS.md §6.1)."""
LAST_LAYER = {"mlp": "2", "cnn": "5", "mlp-bn": "3"}


def _kind_for(name):
    """The model a method is walked on when a test needs one with a normalization layer."""
    return "mlp-bn" if name in LINEAR_ONLY else "cnn"


def _refuses_conv(name):
    """A Linear-only method refuses the CNN by naming its Conv2d layer, leaving no state."""
    _, stats = _batches("cnn")
    method = methods.get(name)
    with pytest.raises(UnsupportedModuleError, match=r"layer '0' is an nn\.Conv2d"):
        method.update(stats[0])
    assert method.state == {} and method.step == 0
    with pytest.raises(RuntimeError, match="update"):
        method.direction()


def _problem(kind, seed=0):
    torch.manual_seed(seed)
    build, shape = MODELS[kind]
    model = build().to(DT).eval()
    return model, torch.randn(3 * M, *shape, dtype=DT), torch.randint(0, 3, (3 * M,))


@functools.cache
def _batches(kind):
    """Three minibatches of every statistic (shared by the tests: methods never modify them)."""
    model, x, y = _problem(kind)
    gen = torch.Generator().manual_seed(1)
    stats = [
        collect(model, nn.CrossEntropyLoss(), x[i : i + M], y[i : i + M], STATISTICS, generator=gen)
        for i in range(0, 3 * M, M)
    ]
    return model, stats


# Settings that exercise the periods, so cached inverses must survive the round trip.
PERIODS = {
    "mbf": {"stat_period": 1, "inverse_period": 2},
    "mbf-true": {"stat_period": 2, "inverse_period": 2},
    "mbf-exact": {"inverse_period": 2},
    "kfac": {"inverse_period": 2, "damping_mode": "eigen"},
    "shampoo": {"inverse_period": 2},
    "kpsvd": {"inverse_period": 2, "damping_mode": "eigen"},
    "deflation": {"stat_period": 2, "inverse_period": 2},
    "lanczos": {"inverse_period": 2, "lanczos_steps": 3},
    "kfac-corrected": {"inverse_period": 2, "damping_mode": "split", "decay_warmup": False},
    "kfac-two-level": {"stat_period": 2, "inverse_period": 2, "coarse": "spectral"},
    "ngd": {"stat_period": 2, "decay": 0.5},
}
STAT_FIELDS = (
    "grad",
    "per_sample",
    "sampled_grad",
    "kfac",
    "kfac_sampled",
    "kfac_exact",
    "kron_samples",
    "kron_samples_sampled",
    "kron_samples_exact",
)


def test_registry_names():
    assert NAMES == [
        "sgdm",
        "adam",
        "bdf",
        "mbf",
        "mbf-true",
        "mbf-exact",
        "kfac",
        "shampoo",
        "kpsvd",
        "deflation",
        "lanczos",
        "kfac-corrected",
        "kfac-two-level",
        "ngd",
    ]
    with pytest.raises(KeyError, match="unknown method 'lbfgs'"):
        methods.get("lbfgs")


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name", NAMES)
def test_finite_directions_of_the_right_shapes(name, kind):
    if name in LINEAR_ONLY and kind == "cnn":
        _refuses_conv(name)
        return
    model, stats = _batches(kind)
    layouts = model_layouts(model)
    method = methods.get(name)
    assert method.name == name and method.needs <= STATISTICS
    snapshot = copy.deepcopy(stats)
    for s in stats:
        method.update(s)
        d = method.direction()
        assert list(d) == list(layouts)
        for layer, layout in layouts.items():
            assert d[layer].shape == (layout.dim,)
            assert bool(torch.isfinite(d[layer]).all())
    for before, after in zip(snapshot, stats, strict=True):  # the statistics are not modified
        for field in STAT_FIELDS:
            for layer, value in getattr(before, field).items():
                torch.testing.assert_close(getattr(after, field)[layer], value, rtol=0, atol=0)
    one_shot = methods.directions(model, nn.CrossEntropyLoss(), *_problem(kind)[1:], name)
    assert {k: v.shape for k, v in one_shot[name].items()} == {k: v.shape for k, v in d.items()}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name", NAMES)
def test_matrix_is_a_symmetric_psd_layer_block(name, kind):
    if name in LINEAR_ONLY and kind == "cnn":
        _refuses_conv(name)
        return
    model, stats = _batches(kind)
    method = methods.get(name)
    method.update(stats[0])
    for layer, layout in model_layouts(model).items():
        mat = method.matrix(layer)
        assert mat.shape == (layout.dim, layout.dim)
        torch.testing.assert_close(mat, mat.T)
        if name not in INDEFINITE:
            assert float(torch.linalg.eigvalsh(mat).min()) > -1e-10
    with pytest.raises(KeyError, match="unknown layer"):
        method.matrix("nope")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    _, stats = _batches(_kind_for(name))
    method = methods.get(name, **PERIODS.get(name, {}))
    method.update(stats[0])
    method.update(stats[1])
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = methods.get(name, **PERIODS.get(name, {}))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    method.update(stats[2])
    restored.update(stats[2])
    expected, got = method.direction(), restored.direction()
    for layer in expected:
        torch.testing.assert_close(got[layer], expected[layer], rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be loaded"):
        methods.get("sgdm" if name != "sgdm" else "adam").load_state_dict(method.state_dict())


def _poisoned(stats, need, layer):
    bad = copy.copy(stats)
    field = {
        "grad": "grad",
        "per_sample_grad": "per_sample",
        "sampled_grad": "sampled_grad",
        "kfac_factors": "kfac",
        "kfac_factors_sampled": "kfac_sampled",
        "kfac_factors_exact": "kfac_exact",
        "kron_samples": "kron_samples",
        "kron_samples_sampled": "kron_samples_sampled",
        "kron_samples_exact": "kron_samples_exact",
    }[need]
    values = dict(getattr(stats, field))
    if isinstance(values[layer], tuple):  # KronFactors (A, G), KronSamples (ā, δ)
        first, second = values[layer]
        values[layer] = type(values[layer])(first, second * float("nan"))
    else:
        poisoned = values[layer].clone()
        poisoned.view(-1)[0] = float("inf")
        values[layer] = poisoned
    setattr(bad, field, values)
    return bad


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_statistics_are_refused_before_touching_the_state(name):
    kind = _kind_for(name)
    _, stats = _batches(kind)
    last = LAST_LAYER[kind]
    method = methods.get(name)
    method.update(stats[0])
    before = copy.deepcopy(method.state_dict())
    for need in sorted(method.needs):
        with pytest.raises(NonFiniteError, match=f"'{name}'.*layer '{last}'"):
            method.update(_poisoned(stats[1], need, last))
        after = method.state_dict()
        assert after["step"] == before["step"]
        for key, slot in before["state"].items():
            for quantity, value in slot.items():
                torch.testing.assert_close(after["state"][key][quantity], value, rtol=0, atol=0)
    fresh = methods.get(name)
    with pytest.raises(NonFiniteError):
        fresh.update(_poisoned(stats[0], "grad", "0"))
    assert fresh.state == {} and fresh.step == 0
    with pytest.raises(RuntimeError, match="update"):
        fresh.direction()
    with pytest.raises(NonFiniteError, match="layer '0'"):
        grads = {layer: g.clone() for layer, g in stats[0].grad.items()}
        grads["0"][0] = float("nan")
        method.direction(grads)


@pytest.mark.parametrize("name", NAMES)
def test_direction_before_any_statistics_is_refused(name):
    with pytest.raises(RuntimeError, match="update"):
        methods.get(name).direction()


BAD_CONFIGS = [
    ("sgdm", "momentum", 1.0),
    ("sgdm", "dampening", -0.1),
    ("adam", "beta1", 1.0),
    ("adam", "beta2", -0.5),
    ("adam", "eps", -1e-8),
    ("bdf", "damping", 0.0),
    ("bdf", "decay", 1.0),
    ("bdf", "solver", "cholesky"),
    ("bdf", "memory_budget", 0),
    ("mbf", "damping", -1.0),
    ("mbf", "decay", 1.5),
    ("mbf", "stat_period", 0),
    ("mbf", "inverse_period", 2.5),
    ("mbf", "spatial_threshold", -3),
    ("mbf-true", "momentum", float("nan")),
    ("mbf-exact", "damping", float("inf")),
    ("kfac", "damping", -0.1),
    ("kfac", "damping_mode", "both"),
    ("kfac", "fisher", "true"),
    ("kfac", "inverse_period", 0),
    ("shampoo", "eps", -1.0),
    ("shampoo", "decay", 1.0),
    ("shampoo", "stat_period", 0),
    ("shampoo", "root_method", "svd"),
    ("kpsvd", "damping_mode", "both"),
    ("kpsvd", "fisher", "ggn"),
    ("kpsvd", "tol", 0.0),
    ("kpsvd", "decay_warmup", 1),
    ("kpsvd", "solver", "dense"),
    ("deflation", "damping_mode", "eigen"),
    ("deflation", "max_iter", 0),
    ("lanczos", "lanczos_steps", 1),
    ("kfac-corrected", "denominator_floor", 0.0),
    ("kfac-corrected", "decay", 1.0),
    ("kfac-two-level", "coarse", "previous"),
    ("kfac-two-level", "fisher", "sampled"),
    ("kfac-two-level", "stat_period", 0),
]


@pytest.mark.parametrize(("name", "field", "value"), BAD_CONFIGS)
def test_invalid_configuration_is_refused_with_a_clear_error(name, field, value):
    with pytest.raises(ValueError, match=rf"Config\.{field} must"):
        methods.get(name, **{field: value})


def test_unknown_or_fixed_settings_are_refused():
    with pytest.raises(TypeError, match="no setting.*'dampning'"):
        methods.get("sgdm", dampning=0.1)
    with pytest.raises(TypeError, match="'statistic'"):
        methods.get("mbf-true", statistic="minibatch")
    with pytest.raises(TypeError, match="'approximation'"):
        methods.get("kpsvd", approximation="deflation")
    assert methods.config_class("mbf-exact") is methods.MBFConfig


def test_directions_applies_shared_and_per_method_settings():
    model, x, y = _problem("mlp")
    out = methods.directions(
        model, nn.CrossEntropyLoss(), x, y, ["mbf", "bdf", "adam"], damping=0.5, adam={"eps": 1.0}
    )
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {"grad"})
    g = stats.grad["2"]
    torch.testing.assert_close(out["adam"]["2"], g / (g.abs() + 1.0))
    loose = methods.directions(model, nn.CrossEntropyLoss(), x, y, ["mbf"], damping=5.0)
    assert out["mbf"]["2"].norm() > loose["mbf"]["2"].norm()
    with pytest.raises(TypeError, match="no selected method"):
        methods.directions(model, nn.CrossEntropyLoss(), x, y, ["sgdm"], damping=0.1)
    with pytest.raises(ValueError, match="not selected"):
        methods.directions(model, nn.CrossEntropyLoss(), x, y, ["sgdm"], kfac={"damping": 1.0})


@pytest.mark.parametrize("kind", ["cnn", "mlp-bn"])
def test_one_shot_directions_use_this_batch_only(kind):
    model, x, y = _problem(kind)
    names = [n for n in NAMES if n not in LINEAR_ONLY] if kind == "cnn" else NAMES
    gen = torch.Generator().manual_seed(0)
    out = methods.directions(model, nn.CrossEntropyLoss(), x, y, names, generator=gen)
    stats = collect(model, nn.CrossEntropyLoss(), x, y, {"grad"})
    for layer, g in stats.grad.items():
        torch.testing.assert_close(out["sgdm"][layer], g)  # m = g
    # Calling again gives the same result: no state is carried between calls.
    again = methods.directions(
        model, nn.CrossEntropyLoss(), x, y, names, generator=torch.Generator().manual_seed(0)
    )
    for name in names:
        for layer in out[name]:
            torch.testing.assert_close(again[name][layer], out[name][layer])


def test_variant_names_resolve_to_their_registered_method_and_settings():
    from mbf_analysis.methods.two_level import COARSE_SPACES

    assert methods.variants() == [f"kfac-two-level-{coarse}" for coarse in COARSE_SPACES]
    assert methods.resolve("kfac") == ("kfac", {})
    for coarse, name in zip(COARSE_SPACES, methods.variants(), strict=True):
        registered, fixed = methods.resolve(name)
        assert registered == "kfac-two-level" and fixed == {"coarse": coarse}
        assert methods.get(registered, **fixed).config.coarse == coarse
    with pytest.raises(KeyError, match="kfac-two-level-residual"):
        methods.resolve("kfac-two-level-none")
