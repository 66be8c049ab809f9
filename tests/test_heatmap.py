"""Inverse-Fisher heatmaps against dense float64 ground truth built by hand.

The reference Fisher comes from per-sample gradients (``torch.func.vmap(grad)``) and per-sample
output Jacobians (``jacrev``), assembled into layer vectors by explicit indexing, restricted to a
subset by hand, damped and inverted with ``torch.linalg.inv``; the mini-block mass is recomputed
with an explicit double loop over blocks.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from mbf_analysis.analysis import (
    ParameterSubset,
    inverse_fisher_heatmaps,
    miniblock_mass,
)
from mbf_analysis.errors import MemoryBudgetError
from mbf_analysis.layout import model_layouts
from mbf_analysis.models import simple_cnn

DT = torch.float64
N = 7
DAMPING = 1e-2


def _tiny_mlp():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))


def _tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, (2, 3), padding=(0, 1)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 4, 3),
    )


def _problem(build, in_shape, seed=0):
    torch.manual_seed(seed)
    model = build().to(DT).eval()
    x = torch.randn(N, *in_shape, dtype=DT)
    y = torch.randint(0, 3, (N,))
    return model, x, y


def _layer_vector(model, per_param, name):
    """Per-sample layer vectors ``[N, d]`` from ``{param: [N, *shape]}``, by hand (METHODS §2)."""
    module = model.get_submodule(name)
    w, b = per_param[f"{name}.weight"], per_param[f"{name}.bias"]
    n = w.shape[0]
    if isinstance(module, nn.Linear):  # [W[j,:], b[j]] for j = 0..n_out-1
        return torch.cat([w, b.unsqueeze(-1)], dim=-1).reshape(n, -1)
    return torch.cat([w.reshape(n, -1), b], dim=-1)  # row-major kernels (o, i), then biases


def _per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xn, yn):
        out = functional_call(model, p, (xn.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yn.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _reference_fisher(model, x, y, name, kind):
    """``[d, d]`` layer Fisher: empirical from ``g_n``, exact from ``J_nᵀ (diag p − ppᵀ) J_n``."""
    if kind == "empirical":
        g = _layer_vector(model, _per_sample_grads(model, x, y), name)
        return g.T @ g / len(x)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def output(p, xn):
        return functional_call(model, p, (xn.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(output), in_dims=(None, 0))(params, x)  # name → [N, C, *shape]
    c = jac[f"{name}.weight"].shape[1]
    per_output = {k: v.flatten(0, 1) for k, v in jac.items()}
    j = _layer_vector(model, per_output, name).reshape(len(x), c, -1)  # [N, C, d]
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    h = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("nci,ncd,ndj->ij", j, h, j) / len(x)


def _channel_indices_by_hand(c_out, c_in, k_h, k_w, channel, bias):
    indices = [
        ((o * c_in + channel) * k_h + r) * k_w + c
        for o in range(c_out)
        for r in range(k_h)
        for c in range(k_w)
    ]
    if bias:
        indices += [c_out * c_in * k_h * k_w + o for o in range(c_out)]
    return indices


def _mass_by_double_loop(matrix, sizes):
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    inside = total = 0.0
    for a, (sa, la) in enumerate(zip(starts, sizes, strict=True)):
        for b, (sb, lb) in enumerate(zip(starts, sizes, strict=True)):
            block = float(matrix[sa : sa + la, sb : sb + lb].abs().sum())
            total += block
            if a == b:
                inside += block
    area = sum(s * s for s in sizes) / sum(sizes) ** 2
    return inside / total, area


def _subsets_mlp(model):
    layouts = model_layouts(model)
    return [
        (ParameterSubset.whole_layer(layouts["0"]), list(range(15))),
        (ParameterSubset.whole_layer(layouts["2"], label="last"), list(range(12))),
    ]


def _subsets_cnn(model):
    layouts = model_layouts(model)
    return [
        (ParameterSubset.whole_layer(layouts["0"]), list(range(2 * 3 * 9 + 3))),
        (
            ParameterSubset.conv_input_channel(layouts["2"], 0),
            _channel_indices_by_hand(2, 3, 2, 3, 0, bias=False),
        ),
        (
            ParameterSubset.conv_input_channel(layouts["2"], 2, bias=True),
            _channel_indices_by_hand(2, 3, 2, 3, 2, bias=True),
        ),
    ]


CASES = {
    "mlp": (_tiny_mlp, (4,), _subsets_mlp),
    "cnn": (_tiny_cnn, (2, 3, 4), _subsets_cnn),
}


@pytest.mark.parametrize("case", CASES)
def test_inverse_and_mass_match_dense_ground_truth(case):
    build, in_shape, make_subsets = CASES[case]
    model, x, y = _problem(build, in_shape)
    pairs = make_subsets(model)
    subsets = [s for s, _ in pairs]
    result = inverse_fisher_heatmaps(
        model, nn.CrossEntropyLoss(), x, y, subsets, kinds=("empirical", "exact"), damping=DAMPING
    )
    frame = result.summary.set_index(["kind", "subset"])
    assert len(frame) == 2 * len(subsets)
    for kind in ("empirical", "exact"):
        for subset, by_hand in pairs:
            assert subset.indices.tolist() == by_hand
            fisher = _reference_fisher(model, x, y, subset.layer, kind)
            restricted = fisher[by_hand][:, by_hand]
            expected = torch.linalg.inv(restricted + DAMPING * torch.eye(len(by_hand), dtype=DT))
            got = result.matrices[kind][subset.label]
            assert got.dtype == DT and got.shape == (len(by_hand), len(by_hand))
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(result.fishers[kind][subset.label], restricted)
            mass, area = _mass_by_double_loop(expected, list(subset.block_sizes))
            row = frame.loc[(kind, subset.label)]
            assert row.miniblock_mass == pytest.approx(mass, rel=1e-9)
            assert row.miniblock_area == pytest.approx(area, rel=1e-12)
            assert row.dim == len(by_hand) and row.n_blocks == len(subset.block_sizes)
            assert row.layer == subset.layer and row.n_samples == N and row.damping == DAMPING
            assert row.trace == pytest.approx(float(restricted.trace()), rel=1e-12)


def test_summary_columns_and_block_description():
    model, x, y = _problem(_tiny_cnn, (2, 3, 4))
    subsets = [s for s, _ in _subsets_cnn(model)]
    result = inverse_fisher_heatmaps(model, nn.CrossEntropyLoss(), x, y, subsets)
    assert list(result.summary.columns) == [
        "subset",
        "layer",
        "kind",
        "dim",
        "n_blocks",
        "blocks",
        "damping",
        "n_samples",
        "trace",
        "eig_max",
        "damping_dominated",
        "miniblock_mass",
        "miniblock_area",
    ]
    assert list(result.summary.blocks) == ["6×9 + 3×1", "2×6", "2×6 + 2×1"]
    for row in result.summary.itertuples():
        fisher = result.fishers[row.kind][row.subset]
        assert row.eig_max == pytest.approx(float(torch.linalg.eigvalsh(fisher)[-1]), rel=1e-12)
        assert row.damping_dominated == (row.eig_max <= row.damping)
    assert list(result.summary.subset) == ["0", "2.weight[:, 0]", "2.weight[:, 2]+bias"]
    assert list(result.matrices) == ["empirical"]
    assert list(result.subsets) == list(result.summary.subset)


def test_a_dead_channel_is_flagged_as_damping_dominated():
    model, x, y = _problem(_tiny_cnn, (2, 3, 4))
    with torch.no_grad():  # output channel 0 of the first conv is dead after its ReLU, so the
        model[0].weight[0].zero_()  # kernels of the second conv reading it get no gradient
        model[0].bias[0] = -10.0
    subsets = [s for s, _ in _subsets_cnn(model)]
    summary = inverse_fisher_heatmaps(model, nn.CrossEntropyLoss(), x, y, subsets).summary
    dominated = summary.set_index("subset").damping_dominated
    assert bool(dominated["2.weight[:, 0]"])
    assert not bool(dominated["0"])


def test_freezing_is_temporary_and_changes_nothing():
    model, x, y = _problem(_tiny_cnn, (2, 3, 4))
    model[5].bias.requires_grad_(False)  # a user's own frozen parameter stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    subsets = [s for s, _ in _subsets_cnn(model)][1:]
    frozen = inverse_fisher_heatmaps(model, nn.CrossEntropyLoss(), x, y, subsets)
    assert [p.requires_grad for p in model.parameters()] == flags
    # Analysing a whole-layer subset of every layer leaves nothing to freeze.
    params = dict(model.named_parameters())
    every_layer = [
        ParameterSubset.whole_layer(layout)
        for layout in model_layouts(model).values()
        if all(params[n].requires_grad for n in layout.param_names)
    ]
    full = inverse_fisher_heatmaps(model, nn.CrossEntropyLoss(), x, y, subsets + every_layer)
    for label in frozen.matrices["empirical"]:
        torch.testing.assert_close(
            frozen.matrices["empirical"][label], full.matrices["empirical"][label]
        )


def test_mc_kind_is_reproducible_with_a_generator():
    model, x, y = _problem(_tiny_mlp, (4,))
    subsets = [s for s, _ in _subsets_mlp(model)]

    def run():
        gen = torch.Generator().manual_seed(3)
        return inverse_fisher_heatmaps(
            model, nn.CrossEntropyLoss(), x, y, subsets, kinds=["mc"], mc_samples=4, generator=gen
        )

    first, second = run(), run()
    torch.testing.assert_close(first.matrices["mc"]["0"], second.matrices["mc"]["0"])
    assert set(first.summary.kind) == {"mc"}


def test_subset_fits_a_budget_that_the_whole_layer_does_not():
    model, x, y = _problem(_tiny_cnn, (2, 3, 4))
    layout = model_layouts(model)["2"]  # d = 2·3·6 + 2 = 38
    channel = ParameterSubset.conv_input_channel(layout, 1)  # k = 12
    # 32 KiB: the [12, 12] float64 matrices (4·12²·8 B = 4.5 KiB) and, in half of the budget, the
    # pass over a chunk of 2 samples (about 15 KiB) fit; those of [38, 38] (45 KiB) do not.
    budget = 32 * 2**10
    result = inverse_fisher_heatmaps(
        model, nn.CrossEntropyLoss(), x, y, [channel], memory_budget=budget, chunk_size=2
    )
    assert result.matrices["empirical"][channel.label].shape == (12, 12)
    whole = ParameterSubset.whole_layer(layout)
    with pytest.raises(MemoryBudgetError, match=r"dense subset Fisher of layer '2' \(38×38\)"):
        inverse_fisher_heatmaps(model, nn.CrossEntropyLoss(), x, y, [whole], memory_budget=budget)


def test_simple_cnn_conv2_channel_subsets_without_computing():
    conv2 = model_layouts(simple_cnn())["conv2"]
    subset = ParameterSubset.conv_input_channel(conv2, 31)
    assert subset.dim == 1600 and subset.block_sizes == (25,) * 64
    assert subset.indices.tolist() == _channel_indices_by_hand(64, 32, 5, 5, 31, bias=False)
    assert subset.describe_blocks() == "64×25"
    with_bias = ParameterSubset.conv_input_channel(conv2, 0, bias=True)
    assert with_bias.describe_blocks() == "64×25 + 64×1"
    assert with_bias.indices[-64:].tolist() == list(range(51200, 51264))
    whole = ParameterSubset.whole_layer(model_layouts(simple_cnn())["conv1"])
    assert whole.describe_blocks() == "32×25 + 32×1" and whole.dim == 832


def test_bad_subsets_and_arguments_are_refused():
    model, x, y = _problem(_tiny_cnn, (2, 3, 4))
    layouts = model_layouts(model)
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="input channel 3 out of range"):
        ParameterSubset.conv_input_channel(layouts["2"], 3)
    with pytest.raises(ValueError, match="not a convolution"):
        ParameterSubset.conv_input_channel(layouts["5"], 0)
    with pytest.raises(ValueError, match="repeats"):
        ParameterSubset("0", torch.tensor([0, 0]), (2,), "dup")
    with pytest.raises(ValueError, match="add up"):
        ParameterSubset("0", torch.tensor([0, 1]), (3,), "sizes")
    outside = ParameterSubset("0", torch.tensor([0, 99]), (1, 1), "outside")
    with pytest.raises(ValueError, match=r"positions must lie in 0\.\.56"):
        inverse_fisher_heatmaps(model, loss, x, y, [outside])
    ghost = ParameterSubset("nope", torch.tensor([0]), (1,), "ghost")
    with pytest.raises(ValueError, match="layer 'nope' not found"):
        inverse_fisher_heatmaps(model, loss, x, y, [ghost])
    whole = ParameterSubset.whole_layer(layouts["0"])
    with pytest.raises(ValueError, match="unique"):
        inverse_fisher_heatmaps(model, loss, x, y, [whole, whole])
    with pytest.raises(ValueError, match="choose from"):
        inverse_fisher_heatmaps(model, loss, x, y, [whole], kinds=["true"])
    with pytest.raises(ValueError, match="damping"):
        inverse_fisher_heatmaps(model, loss, x, y, [whole], damping=0.0)


def test_miniblock_mass_accepts_layout_or_block_sizes():
    torch.manual_seed(0)
    model = _tiny_cnn()
    layout = model_layouts(model)["0"]
    matrix = torch.randn(layout.dim, layout.dim, dtype=DT)
    by_layout = miniblock_mass(matrix, layout)
    by_sizes = miniblock_mass(matrix, layout.block_sizes)
    assert by_layout == pytest.approx(by_sizes)
    assert by_sizes == pytest.approx(_mass_by_double_loop(matrix, layout.block_sizes))
    with pytest.raises(ValueError, match="do not tile"):
        miniblock_mass(matrix, [9] * 5)
