"""The generic front-end ``MethodOptimizer`` against the methods it drives.

Ground truth: a plain loop that, at every step, runs the user's backward pass, calls ``collect``
for *all* of the method's statistics on the Fisher batch (model in eval mode), gives the method
that ``Stats`` with the full-batch gradient, asks for its direction, computes the KL clip from
its formula and applies ``θ ← (1 − αγ) θ − α ν D`` by hand. It uses the optimizer's generator
state of the same step, so both draw the same sampled labels. Every test that walks
``methods.names()`` covers a new method the day it joins the registry. The fast front-ends
(MBF, KFAC, Shampoo) are checked against the generic one for their methods.
"""

import dataclasses
import io
import math
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbf_analysis import methods
from mbf_analysis.curvature.collect import GRAD, collect
from mbf_analysis.errors import NonFiniteError
from mbf_analysis.layout import model_layouts
from mbf_analysis.optim import KFAC, MBF, MethodOptimizer, Shampoo
from mbf_analysis.optim.common import gather_batch, global_head
from mbf_analysis.optim.generic import next_needs

DT = torch.float64
CE = nn.CrossEntropyLoss()
KNOWN = ["sgdm", "adam", "bdf", "mbf", "mbf-true", "mbf-exact", "kfac", "shampoo"]
"""The registry when this module was written: the methods run on the conv/BN/Dropout net."""

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(DT)


def _conv_bn_dropout(seed=0):
    """No bias before the BatchNorm: its gradient would be rounding noise, which Adam's
    ``g / (√v + ε)`` blows up to order 1."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(DT)


def _conv(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(DT)


def _batches(shape, n=6, m=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(m, *shape, generator=gen, dtype=DT), torch.randint(0, 3, (m,), generator=gen))
        for _ in range(n)
    ]


def _config(name, **extra):
    """Periods 2 and 3 and damping 0.05 for the methods that have them, plus ``extra``."""
    fields = methods.config_class(name).field_names()
    wanted = dict(stat_period=2, inverse_period=3, damping=0.05) | extra
    return {k: v for k, v in wanted.items() if k in fields}


def _groups(model, lr=(0.05, 0.1), weight_decay=(0.01, 0.0)):
    """Two param groups: the first module with parameters, and the rest."""
    layouts = list(model_layouts(model))
    first = [p for p in model.get_submodule(layouts[0]).parameters()]
    rest = [p for name in layouts[1:] for p in model.get_submodule(name).parameters()]
    return [
        {"params": first, "lr": lr[0], "weight_decay": weight_decay[0]},
        {"params": rest, "lr": lr[1], "weight_decay": weight_decay[1]},
    ]


def _manual_step(model, method, x, y, *, fraction, generator, lr_of, decay_of, kl_clip):
    """One step of the ground-truth loop (module docstring); returns ``ν``."""
    model.zero_grad()
    CE(model(x), y).backward()
    layouts = model_layouts(model)
    params = dict(model.named_parameters())
    grads = {
        layer: layout.flatten({n: params[n].grad for n in layout.param_names}).clone()
        for layer, layout in layouts.items()
    }
    count = math.ceil(len(x) * fraction)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    stats = collect(model, CE, x[:count], y[:count], method.needs, generator=generator)
    for module, training in modes:
        module.training = training
    method.update(dataclasses.replace(stats, grad=grads))
    directions = method.direction()
    nu = 1.0
    if kl_clip is not None:
        total = sum(
            lr_of[layer] ** 2 * abs(float(grads[layer] @ d)) for layer, d in directions.items()
        )
        nu = min(1.0, math.sqrt(kl_clip / total))
    with torch.no_grad():
        for layer, layout in layouts.items():
            parts = layout.unflatten(directions[layer])
            lr, wd = lr_of[layer], decay_of[layer]
            for name in layout.param_names:
                params[name].mul_(1 - lr * wd).sub_(lr * nu * parts[name])
    return nu


def _compare_step_by_step(build, name, shape, *, fraction=0.5, kl_clip=1e-3, steps=6):
    model, twin = build(), build()
    opt = MethodOptimizer(
        model,
        name,
        loss_fn=CE,
        lr=1.0,
        params=_groups(model),
        fisher_fraction=fraction,
        kl_clip=kl_clip,
        generator=3,
        **_config(name),
    )
    method = methods.get(name, **_config(name))
    lr_of, decay_of = {}, {}
    for group, (lr, wd) in zip(_groups(twin), [(0.05, 0.01), (0.1, 0.0)], strict=True):
        for layer, module in twin.named_modules():
            if any(p is q for p in module.parameters(recurse=False) for q in group["params"]):
                lr_of[layer], decay_of[layer] = lr, wd
    reference_gen = torch.Generator()
    skipped = 0
    for k, (x, y) in enumerate(_batches(shape, steps)):
        skipped += not (next_needs(opt.method) - {GRAD}) and bool(method.needs - {GRAD})
        reference_gen.set_state(opt.generator.get_state())
        torch.manual_seed(100 + k)  # the same Dropout masks in both training passes
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step(inputs=x, targets=y)
        torch.manual_seed(100 + k)
        nu = _manual_step(
            twin,
            method,
            x,
            y,
            fraction=fraction,
            generator=reference_gen,
            lr_of=lr_of,
            decay_of=decay_of,
            kl_clip=kl_clip,
        )
        assert opt.kl_scale == pytest.approx(nu, rel=1e-12)
        for (pname, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name} step {k} {pname}")
    return skipped


# ----------------------------------------------------------------------------- equality
@pytest.mark.parametrize("name", methods.names())
def test_front_end_equals_the_method_step_by_step(name):
    skipped = _compare_step_by_step(_mlp, name, (4,))
    periods = [v for k, v in _config(name).items() if k.endswith("_period")]
    if periods and methods.get(name).needs - {GRAD}:
        # periods 2 and 3: steps 1 and 5 of 0..5 collect nothing; period 2 alone: 1, 3 and 5
        assert skipped == sum(all(k % p for p in periods) for k in range(6))


@pytest.mark.parametrize("name", KNOWN)
def test_conv_batchnorm_dropout_model_collects_in_eval_mode(name):
    _compare_step_by_step(_conv_bn_dropout, name, (2, 4, 4), steps=4)


def test_kl_clip_and_param_groups_against_the_explicit_formula():
    """First SGD-m step: ``D = g``, so ``ν = min(1, √(c / Σ_l α_l² ‖g_l‖²))``."""
    model = _mlp()
    x, y = _batches((4,), 1)[0]
    c = 1e-4
    opt = MethodOptimizer(model, "sgdm", lr=1.0, params=_groups(model), kl_clip=c)
    opt.zero_grad()
    CE(model(x), y).backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    rates = [0.05] * 2 + [0.1] * 4
    decays = [0.01] * 2 + [0.0] * 4
    total = sum(a**2 * float(g.square().sum()) for a, (_, g) in zip(rates, before, strict=True))
    nu = min(1.0, math.sqrt(c / total))
    assert nu < 0.5  # the clip is active
    opt.step()
    assert opt.kl_scale == pytest.approx(nu, rel=1e-13)
    for p, (theta, g), a, wd in zip(model.parameters(), before, rates, decays, strict=True):
        torch.testing.assert_close(p, (1 - a * wd) * theta - a * nu * g, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("fast", "name", "settings"),
    [
        (
            lambda m: MBF(m, lr=0.1, damping=0.05, stat_period=2, inverse_period=3, stat_decay=0.8),
            "mbf",
            dict(damping=0.05, stat_period=2, inverse_period=3, decay=0.8),
        ),
        (
            lambda m: KFAC(m, lr=0.1, damping=0.05, stat_period=2, inverse_period=3),
            "kfac",
            dict(damping=0.05, stat_period=2, inverse_period=3, fisher="empirical"),
        ),
        (
            lambda m: Shampoo(m, lr=0.1, eps=1e-3, stat_period=2, inverse_period=3),
            "shampoo",
            dict(eps=1e-3, stat_period=2, inverse_period=3),
        ),
    ],
)
def test_fast_front_ends_equal_the_generic_one(fast, name, settings):
    model, twin = _conv(), _conv()
    opt = fast(model)
    generic = MethodOptimizer(twin, name, loss_fn=CE, lr=0.1, fisher_fraction=1.0, **settings)
    for x, y in _batches((2, 4, 4), 5):
        for net, o in ((model, opt), (twin, generic)):
            o.zero_grad()
            CE(net(x), y).backward()
            if o is generic:
                o.step(inputs=x, targets=y)
            else:
                o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("name", methods.names())
def test_state_dict_resume_is_bit_exact(name):
    batches = _batches((4,), 6)
    settings = dict(loss_fn=CE, lr=0.1, kl_clip=1e-2, weight_decay=0.01, **_config(name))

    def run(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step(inputs=x, targets=y)

    straight = _mlp()
    whole = MethodOptimizer(straight, name, generator=5, **settings)
    run(straight, whole, batches)
    first = _mlp()
    opt = MethodOptimizer(first, name, generator=5, **settings)
    run(first, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _mlp(seed=9)
    resumed.load_state_dict(saved["model"])
    settings["lr"] = 7.0  # the saved param groups replace it
    opt2 = MethodOptimizer(resumed, name, generator=123, **settings)
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.state_dict()["step"] == 3
    run(resumed, opt2, batches[3:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    expected, got = whole.state_dict(), opt2.state_dict()
    assert torch.equal(expected.pop("generator"), got.pop("generator"))
    state, state2 = expected.pop("method"), got.pop("method")
    assert expected == got and state["step"] == state2["step"] == 6
    assert state["state"].keys() == state2["state"].keys()
    for key, slot in state["state"].items():
        assert slot.keys() == state2["state"][key].keys()
        for field, value in slot.items():
            assert torch.equal(value, state2["state"][key][field]), (key, field)


def test_load_refuses_another_method_config_or_a_foreign_state():
    model = _mlp()
    opt = MethodOptimizer(model, "kfac", loss_fn=CE, lr=0.1, damping=0.05)
    x, y = _batches((4,), 1)[0]
    opt.zero_grad()
    CE(model(x), y).backward()
    opt.step(inputs=x, targets=y)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="saved for method 'kfac'"):
        MethodOptimizer(_mlp(), "bdf", loss_fn=CE, lr=0.1).load_state_dict(state)
    other = MethodOptimizer(_mlp(), "kfac", loss_fn=CE, lr=0.1, damping=0.5)
    with pytest.raises(ValueError, match="damping: saved 0.05, now 0.5"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not saved by a MethodOptimizer"):
        other.load_state_dict({"state": {}, "param_groups": state["param_groups"]})
    assert other.method.step == 0 and other.state_dict()["step"] == 0


# ----------------------------------------------------------------------------- side effects
@pytest.mark.parametrize("name", ["bdf", "kfac", "mbf-true"])
def test_step_leaves_grads_modes_batchnorm_buffers_and_global_rng_alone(name):
    model = _conv_bn_dropout()
    opt = MethodOptimizer(model, name, loss_fn=CE, lr=0.1, fisher_fraction=0.5, **_config(name))
    x, y = _batches((2, 4, 4), 1)[0]
    opt.zero_grad()
    CE(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    opt.step(inputs=x, targets=y)
    assert all(module.training for module in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(a, b)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


def test_non_finite_gradients_and_statistics_are_refused_before_any_change():
    model = _mlp()
    opt = MethodOptimizer(model, "kfac", loss_fn=CE, lr=0.1, **_config("kfac"))
    x, y = _batches((4,), 1)[0]
    opt.zero_grad()
    CE(model(x), y).backward()
    opt.step(inputs=x, targets=y)
    opt.zero_grad()
    CE(model(x), y).backward()
    opt.step(inputs=x, targets=y)  # step 1 collects nothing; step 2 will

    def snapshot():
        method = opt.method.state_dict()
        tensors = [t.clone() for slot in method["state"].values() for t in slot.values()]
        params = [p.detach().clone() for p in model.parameters()]
        return method["step"], tensors, params, opt.generator.get_state()

    def same(a, b):
        assert a[0] == b[0]
        for u, v in zip(a[1] + a[2] + [a[3]], b[1] + b[2] + [b[3]], strict=True):
            assert torch.equal(u, v)

    before = snapshot()
    opt.zero_grad()
    CE(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'2.weight'"):
        opt.step(inputs=x, targets=y)
    same(snapshot(), before)
    opt.zero_grad()
    CE(model(x), y).backward()
    poisoned = x.clone()
    poisoned[0, 0] = float("inf")  # finite gradients, non-finite curvature statistics
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        opt.step(inputs=poisoned, targets=y)
    same(snapshot(), before)


# ----------------------------------------------------------------------------- protocol
def test_closure_and_schedule_of_curvature_steps():
    batches = _batches((4,), 4)
    settings = dict(loss_fn=CE, lr=0.1, damping=0.05, stat_period=2, inverse_period=2)
    plain, closed = _mlp(), _mlp()
    opt, opt2 = (MethodOptimizer(m, "kfac", **settings) for m in (plain, closed))
    schedule = []
    for x, y in batches:
        schedule.append(opt.needs_batch())
        opt.zero_grad()
        CE(plain(x), y).backward()
        opt.step(inputs=x, targets=y)

        returned = []

        def closure(x=x, y=y, returned=returned):
            opt2.zero_grad()
            loss = CE(closed(x), y)
            loss.backward()
            returned.append(loss)
            return loss

        assert opt2.step(closure, inputs=x, targets=y) is returned[0]
    assert schedule == [True, False, True, False]
    for a, b in zip(plain.parameters(), closed.parameters(), strict=True):
        assert torch.equal(a, b)
    sgdm = MethodOptimizer(plain, "sgdm", lr=0.1)
    assert not sgdm.needs_batch()
    sgdm.zero_grad()
    CE(plain(batches[0][0]), batches[0][1]).backward()
    sgdm.step()  # no batch needed for a gradient-only method


def test_lr_scheduler_sets_the_step_size():
    model = _mlp()
    opt = MethodOptimizer(model, "sgdm", lr=0.2, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for lr, (x, y) in zip([0.2, 0.1], _batches((4,), 2), strict=True):
        opt.zero_grad()
        CE(model(x), y).backward()
        expected = [p.detach() - lr * p.grad for p in model.parameters()]
        opt.step()
        scheduler.step()
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p, e, rtol=1e-14, atol=1e-16)


def test_errors_name_the_problem_and_the_fix():
    model = _mlp()
    x, y = _batches((4,), 1)[0]
    with pytest.raises(KeyError, match="unknown method"):
        MethodOptimizer(model, "newton", lr=0.1)
    with pytest.raises(ValueError, match="pass loss_fn"):
        MethodOptimizer(model, "kfac", lr=0.1)
    with pytest.raises(TypeError, match="Method instance"):
        MethodOptimizer(model, methods.get("kfac"), loss_fn=CE, lr=0.1, damping=0.1)
    with pytest.raises(TypeError, match="has no setting"):
        MethodOptimizer(model, "sgdm", lr=0.1, damping=0.1)
    with pytest.raises(ValueError, match="fisher_fraction"):
        MethodOptimizer(model, "bdf", loss_fn=CE, lr=0.1, fisher_fraction=0)
    with pytest.raises(ValueError, match="kl_clip"):
        MethodOptimizer(model, "sgdm", lr=0.1, kl_clip=-1.0)
    with pytest.raises(ValueError, match=r"param group 1\): lr"):
        MethodOptimizer(model, "sgdm", lr=0.1, params=_groups(model, lr=(0.1, -1.0)))
    split = [{"params": [model[0].weight]}, {"params": [model[0].bias, *model[2:].parameters()]}]
    with pytest.raises(ValueError, match="different param groups"):
        MethodOptimizer(model, "sgdm", lr=0.1, params=split)
    with pytest.raises(ValueError, match=r"trainable but not optimized: \['4.weight', '4.bias'\]"):
        MethodOptimizer(model, "sgdm", lr=0.1, params=model[:4].parameters())
    opt = MethodOptimizer(model, "bdf", loss_fn=CE, lr=0.1)
    with pytest.raises(RuntimeError, match="have no gradient"):
        opt.step(inputs=x, targets=y)
    opt.zero_grad()
    CE(model(x), y).backward()
    with pytest.raises(ValueError, match=r"step\(inputs=x, targets=y\)"):
        opt.step()
    frozen = _mlp()
    frozen[4].requires_grad_(False)
    opt = MethodOptimizer(frozen, "bdf", loss_fn=CE, lr=0.1)  # frozen layers are left out
    CE(frozen(x), y).backward()
    opt.step(inputs=x, targets=y)
    assert list(opt.method.layouts) == ["0", "2"]


# ----------------------------------------------------------------------------- DDP
WORLD, HALF, DDP_STEPS = 2, 4, 3


def _ddp_batches():
    return _batches((4,), DDP_STEPS, m=WORLD * HALF, seed=4)


def _ddp_settings(name):
    return dict(loss_fn=CE, lr=0.05, fisher_fraction=0.5, kl_clip=1e-2, **_config(name))


def _ddp_worker(rank, port, folder):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),
    )
    try:
        out = {}
        for name in methods.names():
            model = _mlp()
            net = DistributedDataParallel(model)
            opt = MethodOptimizer(net, name, generator=7 + rank, **_ddp_settings(name))
            for x, y in _ddp_batches():
                x, y = x[rank * HALF : (rank + 1) * HALF], y[rank * HALF : (rank + 1) * HALF]
                opt.zero_grad()
                CE(net(x), y).backward()
                opt.step(inputs=x, targets=y)
            out[name] = [p.detach().clone() for p in model.parameters()]
        rows = torch.arange(2 * (rank + 1), dtype=DT).reshape(rank + 1, 2) + 10 * rank
        out["uneven"] = gather_batch(rows, torch.device("cpu"))
        out["head"] = global_head(rows, rows[:, 0], 0.5, torch.device("cpu"))
        torch.save(out, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    """The processes hold the two halves of each batch; the Fisher batch is the first half of
    the global batch (``fisher_fraction=0.5``: all from process 0), as for one process on the
    whole batch, whose gradient is the mean over the same 8 samples. Process 1's seed differs and
    is overridden by process 0's."""
    context = mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the DDP workers did not finish within 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    uneven = torch.tensor([[0.0, 1.0], [10.0, 11.0], [12.0, 13.0]], dtype=DT)
    assert all(torch.equal(r["uneven"], uneven) for r in ranks)  # 1 row from 0, 2 from 1
    for r in ranks:  # the first ⌈3 · 0.5⌉ = 2 rows of the global batch: one from each process
        assert torch.equal(r["head"][0], uneven[:2]) and torch.equal(r["head"][1], uneven[:2, 0])
    for name in methods.names():
        model = _mlp()
        opt = MethodOptimizer(model, name, generator=7, **_ddp_settings(name))
        for x, y in _ddp_batches():
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step(inputs=x, targets=y)
        for a, b in zip(ranks[0][name], ranks[1][name], strict=True):
            assert torch.equal(a, b), name
        for a, b in zip(ranks[0][name], model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_a_state_saved_with_the_old_fisher_word_loads():
    """Checkpoints written before the Fisher kinds were renamed hold ``fisher="true"``."""
    model = _mlp()
    x, y = _batches((4,), 1)[0]
    opt = MethodOptimizer(model, "kpsvd", loss_fn=CE, lr=0.1, fisher="mc", **_config("kpsvd"))
    opt.zero_grad()
    CE(model(x), y).backward()
    opt.step(inputs=x, targets=y)
    old = opt.state_dict()
    old["method_config"] = {**old["method_config"], "fisher": "true"}
    again = MethodOptimizer(model, "kpsvd", loss_fn=CE, lr=0.1, fisher="mc", **_config("kpsvd"))
    again.load_state_dict(old)
    assert again.method.config.fisher == "mc"
    other = MethodOptimizer(model, "kpsvd", loss_fn=CE, lr=0.1, fisher="exact", **_config("kpsvd"))
    with pytest.raises(ValueError, match="fisher: saved 'mc', now 'exact'"):
        other.load_state_dict(old)
