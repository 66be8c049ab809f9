"""The per-sample memory estimate of a BackPACK pass, and the chunks it gives (issue 21)."""

import pytest
import torch
from torch import nn

from mbf_analysis.curvature import fisher_rows, per_sample_grads
from mbf_analysis.curvature.backend import check_model
from mbf_analysis.curvature.footprint import pass_footprint
from mbf_analysis.errors import MemoryBudgetError


def _net():
    """[N, 2, 5, 4] → conv (3 ch, 3×3, same) → relu → pool 2 → flatten (3·2·2) → linear 4."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 4),
    ).double()


def test_every_term_counts_the_shapes_of_the_network():
    model = _net()
    layouts = check_model(model)
    sample = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    # Leaf outputs: conv 3·5·4 = 60, relu 60, pool 3·2·2 = 12, flatten 12, linear 4.
    activations = 60 + 60 + 12 + 12 + 4
    unfold = 2 * 3 * 3 * (5 * 4)  # C_in·k_h·k_w·L_out of the conv
    conv_dim, linear_dim = 3 * 2 * 9 + 3, 12 * 4 + 4

    both = pass_footprint(
        model, sample, layouts.values(), rows_per_sample=4, backprop_rows=4, itemsize=8
    )
    assert both.rows == 2 * 4 * (conv_dim + linear_dim) * 8
    assert both.forward == 3 * activations * 8 // 2
    assert both.backward == 3 * 4 * activations * 8 // 2  # from the conv, the first module, on
    assert both.unfold == (4 + 5 * 4) * unfold * 8 // 2
    assert both.total == both.rows + both.forward + both.backward + both.unfold

    last = pass_footprint(
        model, sample, [layouts["4"]], rows_per_sample=1, backprop_rows=1, itemsize=4
    )
    assert last.rows == 2 * linear_dim * 4
    assert last.backward == 3 * 4 * 4 // 2  # only the linear layer's own output
    assert last.unfold == 0  # no selected convolution
    assert "per sample" in last.describe() and "unfolded" not in last.describe()


def test_the_exact_pass_is_chunked_by_its_backpropagated_factors_not_its_rows():
    model = _net()
    layouts = check_model(model)
    x = torch.randn(40, 2, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    footprint = pass_footprint(
        model, x[:1], [layouts["0"]], rows_per_sample=4, backprop_rows=4, itemsize=8
    )
    assert footprint.rows < footprint.total / 4  # a conv layer of 57 parameters
    budget = 4 * 6 * footprint.total  # a quarter of it holds 6 samples; their rows alone, 40
    rows = list(
        fisher_rows(
            model, nn.CrossEntropyLoss(), x, y, kind="exact", layers=["0"], memory_budget=budget
        )
    )
    assert [r["0"].shape[0] for r in rows] == [6 * 4] * 6 + [4 * 4]

    whole = list(fisher_rows(model, nn.CrossEntropyLoss(), x, y, kind="exact", layers=["0"]))
    gram = sum(r["0"].T @ r["0"] for r in rows)
    torch.testing.assert_close(gram, whole[0]["0"].T @ whole[0]["0"])


def test_an_explicit_chunk_over_the_budget_is_refused_with_one_that_fits():
    model = _net()
    x = torch.randn(8, 2, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    layouts = check_model(model)
    footprint = pass_footprint(
        model, x[:1], [layouts["0"]], rows_per_sample=4, backprop_rows=4, itemsize=8
    )
    with pytest.raises(MemoryBudgetError, match=r"a chunk of 8 samples .* chunk_size=3 or less"):
        next(
            fisher_rows(
                model,
                nn.CrossEntropyLoss(),
                x,
                y,
                kind="exact",
                layers=["0"],
                chunk_size=8,
                memory_budget=3 * footprint.total + 1,
            )
        )
    with pytest.raises(MemoryBudgetError, match="unfolded conv inputs"):
        next(
            fisher_rows(
                model,
                nn.CrossEntropyLoss(),
                x,
                y,
                kind="exact",
                layers=["0"],
                memory_budget=footprint.total,
            )
        )


def test_per_sample_grads_chunks_from_the_whole_pass():
    model = _net()
    x = torch.randn(30, 2, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (30,))
    layouts = check_model(model)
    footprint = pass_footprint(
        model, x[:1], layouts.values(), rows_per_sample=1, backprop_rows=1, itemsize=8
    )
    result_bytes = 30 * sum(p.numel() for p in model.parameters()) * 8
    budget = result_bytes + 2 * 5 * footprint.total  # half of what is left holds 5 samples
    calls = []
    original = model.forward

    def counting_forward(inputs):
        calls.append(len(inputs))
        return original(inputs)

    model.forward = counting_forward
    chunked = per_sample_grads(model, nn.CrossEntropyLoss(), x, y, memory_budget=budget)
    model.forward = original
    assert [n for n in calls if n > 1] == [5] * 6
    whole = per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name])
