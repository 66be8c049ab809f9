"""The KFAC optimizer (``mbf_analysis.optim.KFAC``) against ``methods.get("kfac")``.

The optimizer records the factors with its own hooks during the training forward/backward pass;
the method gets them from ``collect`` on a hook-free copy of the model at the same iterate.
Directions must agree at every step, with the periods, both damping modes and the momentum in
play.
"""

import copy
import io
import warnings

import pytest
import torch
from optim_cases import DT, one_thread  # noqa: F401 (autouse fixture)
from optim_cases import batches as _batches
from optim_cases import net as _net
from torch import nn

from mbf_analysis import methods
from mbf_analysis.curvature.collect import GRAD, KFAC_FACTORS, collect
from mbf_analysis.errors import NonFiniteError
from mbf_analysis.layout import model_layouts
from mbf_analysis.optim import KFAC

CE = nn.CrossEntropyLoss()


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
    ],
)
def test_invalid_settings_raise(setting, match):
    with pytest.raises(ValueError, match=match):
        KFAC(_net(), **({"lr": 0.1} | setting))
