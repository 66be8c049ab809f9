"""The mini-block layout (METHODS.md §2) against explicit index formulas, on random shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mbf_analysis.errors import UnsupportedModuleError
from mbf_analysis.layout import layout_of, model_layouts


def _indexed(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter filled with its own position in the layer: weight first, then bias."""
    out, offset = {}, 0
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if p is not None:
            out[prefix + name] = torch.arange(offset, offset + p.numel()).reshape(p.shape)
            offset += p.numel()
    return out


@settings(max_examples=40, deadline=None)
@given(n_in=st.integers(1, 7), n_out=st.integers(1, 6), bias=st.booleans())
def test_linear_order_is_neuron_major(n_in, n_out, bias):
    layer = nn.Linear(n_in, n_out, bias=bias)
    layout = layout_of("fc", layer)
    t = _indexed(layer, "fc.")
    flat = layout.flatten(t)
    expected = []
    for j in range(n_out):
        expected.extend(t["fc.weight"][j].tolist())
        if bias:
            expected.append(t["fc.bias"][j].item())
    assert flat.tolist() == expected
    size = n_in + int(bias)
    assert layout.block_sizes == [size] * n_out
    assert layout.blocks(flat)["fc"].shape == (n_out, size)
    assert all(torch.equal(layout.unflatten(flat)[k], t[k]) for k in t)


@settings(max_examples=40, deadline=None)
@given(
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    k_h=st.integers(1, 4),
    k_w=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
)
def test_conv_order_is_kernel_major_then_bias(c_in, c_out, k_h, k_w, groups, bias):
    conv = nn.Conv2d(c_in * groups, c_out * groups, (k_h, k_w), groups=groups, bias=bias)
    layout = layout_of("conv", conv)
    t = _indexed(conv, "conv.")
    flat = layout.flatten(t)
    weight = t["conv.weight"]
    expected = [
        weight[o, i, r, c].item()
        for o in range(c_out * groups)
        for i in range(c_in)
        for r in range(k_h)
        for c in range(k_w)
    ]
    if bias:
        expected += t["conv.bias"].tolist()
    assert flat.tolist() == expected
    kernels = layout.blocks(flat)["conv.weight"]
    assert kernels.shape == (c_out * groups * c_in, k_h * k_w)
    assert torch.equal(
        kernels[1 % kernels.shape[0]], weight.flatten(0, 1)[1 % kernels.shape[0]].flatten()
    )
    sizes = [k_h * k_w] * (c_out * groups * c_in) + [1] * (c_out * groups if bias else 0)
    assert layout.block_sizes == sizes
    assert layout.dim == sum(sizes)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5), n_in=st.integers(1, 5))
def test_block_helpers_round_trip(sizes, n_in):
    model = nn.Sequential(*[nn.Linear(n_in, s) for s in sizes])
    for layout in model_layouts(model).values():
        d = layout.dim
        matrix = torch.randn(d, d, dtype=torch.float64)
        blocks = layout.extract_blocks(matrix)
        dense = layout.blockdiag(blocks)
        mask = layout.block_mask()
        assert torch.equal(dense[mask], matrix[mask])
        assert torch.count_nonzero(dense[~mask]) == 0
        assert mask.sum() == sum(s * s for s in layout.block_sizes)
        vec = torch.randn(3, d)
        assert torch.equal(layout.from_blocks(layout.blocks(vec)), vec)
        slices = list(layout.block_slices())
        assert [s.stop - s.start for s in slices] == layout.block_sizes


def test_normalization_layers_are_diagonal():
    bn = nn.BatchNorm2d(3)
    layout = layout_of("bn", bn)
    assert layout.kind == "diagonal"
    assert layout.block_sizes == [1] * 6
    assert [g.key for g in layout.groups] == ["bn.weight", "bn.bias"]


def test_model_layouts_skip_frozen_and_parameter_free_modules():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    model[2].requires_grad_(False)
    assert list(model_layouts(model)) == ["0"]


def test_unsupported_module_is_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.Embedding(4, 2))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Embedding\).*Linear, Conv2d"):
        model_layouts(model)
