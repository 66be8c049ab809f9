"""The Shampoo optimizer (``mbf_analysis.optim.Shampoo``) against ``methods.get("shampoo")``."""

import io

import pytest
import torch
from optim_cases import batches as _batches
from optim_cases import net as _net
from torch import nn

from mbf_analysis import methods
from mbf_analysis.curvature.collect import GRAD, collect
from mbf_analysis.errors import NonFiniteError
from mbf_analysis.layout import model_layouts
from mbf_analysis.linalg import inverse_root, symmetrize
from mbf_analysis.methods.shampoo import grouped_inverse_roots
from mbf_analysis.optim import Shampoo

CE = nn.CrossEntropyLoss()

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = dict(eps=1e-3, momentum=0.8, dampening=0.25, stat_period=2, inverse_period=3)


@pytest.mark.parametrize("root_method", ["auto", "newton", "eigh"])
def test_directions_match_methods_shampoo(root_method):
    model = _net()
    lr = 0.01
    opt = Shampoo(model, lr=lr, stat_decay=0.7, root_method=root_method, **SETTINGS)
    method = methods.get("shampoo", decay=0.7, root_method=root_method, **SETTINGS)
    layouts = model_layouts(model)
    for k, (x, y) in enumerate(_batches(6)):
        method.update(collect(model, CE, x, y, {GRAD}))
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


def test_groups_state_dict_and_errors():
    batches = _batches(6)

    def run(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()

    def groups(model):
        return [
            {"params": list(model[:2].parameters()), "weight_decay": 0.1},
            {"params": list(model[2:].parameters()), "lr": 0.005},
        ]

    model = _net()
    run(model, Shampoo(groups(model), lr=0.01, **SETTINGS), batches)
    model2 = _net()
    opt = Shampoo(groups(model2), lr=0.01, **SETTINGS)
    run(model2, opt, batches[:4])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt = Shampoo(groups(model2), lr=0.01, **SETTINGS)
    opt.load_state_dict(torch.load(buffer))
    run(model2, opt, batches[4:])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    opt.zero_grad()
    CE(model2(batches[0][0]), batches[0][1]).backward()
    model2[5].weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"param_groups\[1\]\[1\] \(5, 8\)"):
        opt.step()
    with pytest.raises(ValueError, match="root_method"):
        Shampoo(model, lr=0.1, root_method="svd")
    with pytest.raises(ValueError, match=r"param group 1\): eps"):
        Shampoo([{"params": [model[0].weight]}, {"params": [model[0].bias], "eps": -1.0}], lr=0.1)


def _explicit_root(mat, p, eps):
    """``(M + εI)^(-1/p)`` by an explicit float64 eigendecomposition."""
    w, q = torch.linalg.eigh(mat.double() + eps * torch.eye(mat.shape[-1], dtype=torch.float64))
    return (q * w.pow(-1.0 / p)) @ q.T


@pytest.mark.parametrize("method", ["auto", "newton", "eigh"])
def test_grouped_inverse_roots_equal_one_by_one(method):
    gen = torch.Generator().manual_seed(7)
    shapes_powers = [(5, 4), (3, 2), (5, 4), (5, 2), (3, 2), (5, 4), (1, 6)]
    mats = []
    for n, _ in shapes_powers:
        g = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
        mats.append(symmetrize(g @ g.T))
    powers = [p for _, p in shapes_powers]
    got = grouped_inverse_roots(mats, powers, 1e-3, method)
    for mat, p, root in zip(mats, powers, got, strict=True):
        reference = inverse_root(mat, p, 1e-3, method=method)
        torch.testing.assert_close(root, reference, rtol=1e-12, atol=0)
        torch.testing.assert_close(root, _explicit_root(mat, p, 1e-3), rtol=1e-9, atol=0)


def test_float32_auto_roots_match_the_explicit_root_to_float32_accuracy():
    """The CPU fast path (float32 eigh) against the float64 explicit root, on real statistics."""
    model = _net(dtype=torch.float32)
    opt = Shampoo(model, lr=0.01, eps=1e-3, stat_period=1, inverse_period=1)
    for x, y in _batches(3, dtype=torch.float32):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    checked = 0
    for p in model.parameters():
        state = opt.state[p]
        order = sum(1 for key in state if key.startswith("H"))
        for i in range(order):
            root, ref = state[f"R{i}"], _explicit_root(state[f"H{i}"], 2 * order, 1e-3)
            assert root.dtype == torch.float32
            assert float((root.double() - ref).norm() / ref.norm()) < 1e-5
            checked += 1
    assert checked > 10
