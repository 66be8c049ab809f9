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
from mbf_analysis.optim import Shampoo

CE = nn.CrossEntropyLoss()

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = dict(eps=1e-3, momentum=0.8, dampening=0.25, stat_period=2, inverse_period=3)


@pytest.mark.parametrize("root_method", ["newton", "eigh"])
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
