"""Tests for mbf_analysis.models: shapes, parameter counts, structure, BackPACK compatibility."""

from __future__ import annotations

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mbf_analysis.models import (
    CURVES_AE_WIDTHS,
    FACES_AE_WIDTHS,
    MNIST_AE_WIDTHS,
    MODELS,
    BasicBlock,
    ShortcutA,
    autoencoder,
    build_model,
    curves_autoencoder,
    faces_autoencoder,
    mlp,
    mnist_autoencoder,
    model_names,
    num_parameters,
    paper_mlp,
    resnet32,
    simple_cnn,
    vgg11_bn,
    vgg16_bn,
)

# name -> (input shape of one sample, output shape of one sample) for every registry entry
SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "digits-mlp": ((1, 8, 8), (10,)),
    "paper-mlp": ((1, 16, 16), (10,)),
    "simple-cnn": ((1, 28, 28), (10,)),
    "mnist-ae": ((1, 28, 28), (784,)),
    "faces-ae": ((625,), (625,)),
    "curves-ae": ((784,), (784,)),
    "resnet32": ((3, 32, 32), (10,)),
    "vgg11-bn": ((3, 32, 32), (10,)),
    "vgg16-bn": ((3, 32, 32), (10,)),
}

AE_BUILDERS = [
    (mnist_autoencoder, MNIST_AE_WIDTHS),
    (faces_autoencoder, FACES_AE_WIDTHS),
    (curves_autoencoder, CURVES_AE_WIDTHS),
]


def _linear_count(widths) -> int:
    return sum((n_in + 1) * n_out for n_in, n_out in zip(widths[:-1], widths[1:], strict=True))


def _conv_count(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def _bn_count(c: int) -> int:
    return 2 * c


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name) for name in model_names()}


# ---------------------------------------------------------------- registry


def test_registry_names():
    assert set(SHAPES) == set(MODELS)
    assert model_names() == list(MODELS)


def test_build_model_unknown_lists_choices():
    with pytest.raises(ValueError) as info:
        build_model("no-such-net")
    message = str(info.value)
    assert "no-such-net" in message
    for name in model_names():
        assert name in message


def test_build_model_forwards_kwargs_and_normalizes_name():
    model = build_model("RESNET32", num_classes=7)
    assert model.fc.out_features == 7
    assert isinstance(build_model("simple_cnn"), nn.Sequential)


@pytest.mark.parametrize("name", list(SHAPES))
def test_output_shapes(built, name):
    in_shape, out_shape = SHAPES[name]
    model = built[name].eval()
    with torch.no_grad():
        out = model(torch.randn(2, *in_shape))
    assert out.shape == (2, *out_shape)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(SHAPES))
def test_no_inplace_modules(built, name):
    offenders = [n for n, m in built[name].named_modules() if getattr(m, "inplace", False)]
    assert offenders == []


def test_seeding_reproduces_weights():
    torch.manual_seed(3)
    a = paper_mlp()
    torch.manual_seed(3)
    b = paper_mlp()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- MLP


def test_paper_mlp_structure():
    model = paper_mlp()
    assert isinstance(model, nn.Sequential)
    names = [n for n, _ in model.named_children()]
    expected = ["flatten"]
    for k in range(1, 6):
        expected += [f"fc{k}", f"act{k}"]
    expected.append("fc6")
    assert names == expected
    assert all(isinstance(model.get_submodule(f"act{k}"), nn.Tanh) for k in range(1, 6))
    assert num_parameters(model) == _linear_count([256, 20, 20, 20, 20, 20, 10])
    assert num_parameters(model) == 256 * 20 + 20 + 4 * (20 * 20 + 20) + 20 * 10 + 10


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=6),
    activation=st.sampled_from(["relu", "tanh", "sigmoid", "elu", "leaky_relu", "selu"]),
    bias=st.booleans(),
)
def test_mlp_counts_and_shapes(widths, activation, bias):
    model = mlp(widths, activation, bias=bias)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(
        zip(widths[:-1], widths[1:], strict=True)
    )
    expected = _linear_count(widths) if bias else _linear_count(widths) - sum(widths[1:])
    assert num_parameters(model) == expected
    # activation after every linear layer except the last
    kinds = [type(m) for m in model][1:]
    assert kinds[-1] is nn.Linear
    assert sum(k is not nn.Linear for k in kinds) == len(widths) - 2
    assert model(torch.randn(3, widths[0])).shape == (3, widths[-1])


def test_mlp_activation_class_and_errors():
    model = mlp([4, 3, 2], nn.GELU)
    assert isinstance(model.act1, nn.GELU)
    with pytest.raises(ValueError, match="leaky_relu"):
        mlp([4, 3, 2], "swishy")
    with pytest.raises(TypeError):
        mlp([4, 3, 2], 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mlp([4], "relu")


# ---------------------------------------------------------------- Simple CNN


def test_simple_cnn_structure_and_count():
    model = simple_cnn()
    names = [n for n, _ in model.named_children()]
    assert names == [
        "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2",
    ]  # fmt: skip
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.conv1.padding == (2, 2) and model.conv1.kernel_size == (5, 5)
    expected = (
        5 * 5 * 1 * 32 + 32
        + 5 * 5 * 32 * 64 + 64
        + (7 * 7 * 64) * 1024 + 1024
        + 1024 * 10 + 10
    )  # fmt: skip
    assert num_parameters(model) == expected


def test_simple_cnn_other_input():
    model = simple_cnn(in_channels=3, num_classes=5, image_size=32)
    assert model.fc1.in_features == 8 * 8 * 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ---------------------------------------------------------------- autoencoders


@pytest.mark.parametrize(("builder", "widths"), AE_BUILDERS)
def test_autoencoder_structure(builder, widths):
    model = builder()
    children = list(model)
    assert isinstance(children[0], nn.Flatten)
    linears = [m for m in children if isinstance(m, nn.Linear)]
    chain = [linears[0].in_features] + [m.out_features for m in linears]
    assert chain == list(widths)
    for m_prev, m_next in zip(linears[:-1], linears[1:], strict=True):
        assert m_prev.out_features == m_next.in_features
    code_width = min(widths)
    assert sum(m.out_features == code_width for m in linears) == 1
    assert isinstance(children[-1], nn.Linear)  # logits: nothing after the output layer
    for i, m in enumerate(children[:-1]):
        if isinstance(m, nn.Linear):
            follower = children[i + 1]
            if m.out_features == code_width:
                assert isinstance(follower, nn.Linear), "activation after the code layer"
            else:
                assert type(follower) is nn.ReLU
    assert num_parameters(model) == _linear_count(widths)


def test_autoencoder_code_widths():
    assert min(MNIST_AE_WIDTHS) == 30 and min(FACES_AE_WIDTHS) == 30
    assert min(CURVES_AE_WIDTHS) == 6
    assert MNIST_AE_WIDTHS[0] == MNIST_AE_WIDTHS[-1] == 784
    assert FACES_AE_WIDTHS[0] == FACES_AE_WIDTHS[-1] == 625
    assert CURVES_AE_WIDTHS[0] == CURVES_AE_WIDTHS[-1] == 784


def test_autoencoder_small_and_code_output():
    torch.manual_seed(0)
    model = autoencoder([6, 4, 2, 4, 6])
    assert [n for n, _ in model.named_children()] == [
        "flatten", "fc1", "act1", "fc2", "fc3", "act3", "fc4",
    ]  # fmt: skip
    # code is linear: it can be negative (a ReLU would clip it)
    code = model[:4](torch.randn(64, 6))
    assert code.shape == (64, 2) and (code < 0).any()


# ---------------------------------------------------------------- ResNet32


def _resnet32_count(num_classes: int = 10) -> int:
    total = _conv_count(3, 16, 3, bias=False) + _bn_count(16)
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(5):
            total += _conv_count(c_in, width, 3, bias=False) + _bn_count(width)
            total += _conv_count(width, width, 3, bias=False) + _bn_count(width)
            c_in = width  # option A shortcut: no parameters
    return total + 64 * num_classes + num_classes


def test_resnet32_count_and_depth():
    model = resnet32()
    count = num_parameters(model)
    assert count == _resnet32_count() == 464_154
    assert 460_000 <= count <= 470_000
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 32
    assert all(m.bias is None and m.kernel_size == (3, 3) for m in convs)
    assert sum(isinstance(m, ShortcutA) for m in model.modules()) == 2
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert [n for n, _ in model.named_children()] == [
        "conv1", "bn1", "relu1", "stage1", "stage2", "stage3", "avgpool", "flatten", "fc",
    ]  # fmt: skip
    assert "stage2.block1.conv1" in dict(model.named_modules())


def test_resnet32_stage_shapes():
    model = resnet32().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.relu1(model.bn1(model.conv1(x)))
        assert model.stage1(h).shape == (2, 16, 32, 32)
        h = model.stage1(h)
        h = model.stage2(h)
        assert h.shape == (2, 32, 16, 16)
        assert model.stage3(h).shape == (2, 64, 8, 8)


def test_shortcut_a_matches_zero_padded_subsample():
    x = torch.arange(2 * 4 * 5 * 5, dtype=torch.float64).reshape(2, 4, 5, 5)
    out = ShortcutA(4, 8, stride=2)(x)
    expected = torch.zeros(2, 8, 3, 3, dtype=torch.float64)
    expected[:, 2:6] = x[:, :, ::2, ::2]
    assert torch.equal(out, expected)
    assert list(ShortcutA(4, 8).parameters()) == []
    with pytest.raises(ValueError):
        ShortcutA(8, 4)


def test_basic_block_residual():
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        main = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
        padded = torch.zeros(2, 8, 3, 3)
        padded[:, 2:6] = x[:, :, ::2, ::2]
        assert torch.allclose(block(x), torch.relu(main + padded))
    assert isinstance(BasicBlock(8, 8).shortcut, nn.Identity)


# ---------------------------------------------------------------- VGG


def _vgg_count(config, num_classes: int = 10) -> int:
    total, c_in = 0, 3
    for item in config:
        if item != "M":
            total += _conv_count(c_in, item, 3, bias=True) + _bn_count(item)
            c_in = item
    return total + _linear_count([512, 4096, 4096, num_classes])


@pytest.mark.parametrize(
    ("builder", "config"),
    [
        (vgg11_bn, [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]),
        (
            vgg16_bn,
            [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
             "M"],
        ),
    ],
)  # fmt: skip
def test_vgg_structure_and_count(builder, config):
    model = builder(num_classes=10)
    assert isinstance(model, nn.Sequential)
    n_conv = sum(item != "M" for item in config)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    bns = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    assert [m.out_channels for m in convs] == [item for item in config if item != "M"]
    assert len(bns) == n_conv
    children = list(model)
    for i, m in enumerate(children):
        if isinstance(m, nn.Conv2d):
            assert isinstance(children[i + 1], nn.BatchNorm2d)
            assert type(children[i + 2]) is nn.ReLU
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 5
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [
        (512, 4096), (4096, 4096), (4096, 10),
    ]  # fmt: skip
    assert not any(isinstance(m, nn.Dropout) for m in model)
    assert num_parameters(model) == _vgg_count(config)
    names = dict(model.named_children())
    assert {"conv1", "bn1", "relu1", "pool1", "flatten", "fc1", "fc2", "fc3"} <= set(names)
    assert type(names[f"relu{n_conv + 1}"]) is nn.ReLU


def test_vgg_dropout_option():
    model = vgg11_bn(num_classes=100, dropout=0.5)
    drops = [m for m in model if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(m.p == 0.5 for m in drops)
    assert model.fc3.out_features == 100
    with pytest.raises(ValueError):
        vgg11_bn(dropout=1.0)


# ---------------------------------------------------------------- BackPACK

# PyTorch warns when BackPACK's full backward hook sits on a module whose input needs no grad.
_quiet_hooks = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _check_batch_grad(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Per-sample gradients from BackPACK: shapes, and equality with an autograd loop."""
    n = x.shape[0]
    y = torch.randint(0, num_classes, (n,))
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())  # reduction="mean": grad_batch = g_n / n
    model.zero_grad()
    with backpack(BatchGrad()):
        loss_fn(model(x), y).backward()
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.grad_batch.shape == (n, *p.shape), name
    for i in range(n):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in params.items():
            torch.testing.assert_close(
                p.grad_batch[i] * n, p.grad, atol=1e-5, rtol=1e-4, msg=f"{name}, sample {i}"
            )


@_quiet_hooks
def test_backpack_batch_grad_paper_mlp():
    torch.manual_seed(0)
    _check_batch_grad(paper_mlp(), torch.randn(3, 1, 16, 16), 10)


@_quiet_hooks
def test_backpack_batch_grad_simple_cnn():
    torch.manual_seed(0)
    _check_batch_grad(simple_cnn(), torch.randn(3, 1, 28, 28), 10)


@_quiet_hooks
@pytest.mark.filterwarnings("ignore:Extension saving to grad_batch does not have an extension")
def test_backpack_batch_grad_resnet32_eval():
    # BasicBlock is a container with parameters that BackPACK does not know: it warns, and the
    # leaf modules inside (Conv2d, BatchNorm2d in eval mode, Linear) do the work.
    torch.manual_seed(0)
    model = resnet32().eval()
    _check_batch_grad(model, torch.randn(2, 3, 32, 32), 10)


@_quiet_hooks
def test_backpack_second_order_on_sequentials():
    from backpack.extensions import DiagGGNExact

    torch.manual_seed(0)
    for model, x in [
        (paper_mlp(), torch.randn(3, 1, 16, 16)),
        (simple_cnn(), torch.randn(2, 1, 28, 28)),
    ]:
        model = extend(model)
        loss_fn = extend(nn.CrossEntropyLoss())
        with backpack(DiagGGNExact()):
            loss_fn(model(x), torch.randint(0, 10, (x.shape[0],))).backward()
        for p in model.parameters():
            assert p.diag_ggn_exact.shape == p.shape
            assert (p.diag_ggn_exact >= 0).all()
