"""Figures: built without pyplot, files written, mini-blocks outlined in place, smoothing."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mbf_analysis.plotting import (  # noqa: E402
    BLOCK_GID,
    distinct_colors,
    plot_approximation_errors,
    plot_cosines,
    plot_heatmap_grid,
    plot_inverse_heatmap,
    save_figure,
    smooth_cosines,
)

SIZES = [3, 3, 1, 1, 4]


def _matrix(k=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=gen, dtype=torch.float64)
    return torch.linalg.inv(a @ a.T + 1e-2 * torch.eye(k, dtype=torch.float64))


def _block_rectangles(ax):
    return [p for p in ax.patches if p.get_gid() == BLOCK_GID]


def test_heatmap_outlines_every_block_at_its_position():
    matrix = _matrix()
    fig = plot_inverse_heatmap(matrix, SIZES, title="fc3")
    ax = fig.axes[0]
    rects = _block_rectangles(ax)
    assert len(rects) == len(SIZES)
    offsets = np.cumsum([0, *SIZES[:-1]])
    for rect, offset, size in zip(rects, offsets, SIZES, strict=True):
        assert rect.get_xy() == (offset - 0.5, offset - 0.5)
        assert rect.get_width() == size and rect.get_height() == size
    image = ax.images[0]
    np.testing.assert_allclose(image.get_array(), matrix.abs().numpy())
    assert isinstance(image.norm, LogNorm)
    assert image.norm.vmax == pytest.approx(float(matrix.abs().max()))
    assert image.norm.vmin == pytest.approx(np.quantile(matrix.abs().numpy(), 0.01))
    assert ax.get_title() == "fc3"
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    assert plt.get_fignums() == []  # pyplot's global state is untouched


def test_heatmap_draws_into_a_given_axes_with_a_linear_scale():
    fig = Figure()
    ax = fig.add_subplot()
    out = plot_inverse_heatmap(
        _matrix().numpy(), SIZES, ax, log_scale=False, colorbar=False, mark_blocks=False
    )
    assert out is fig and len(fig.axes) == 1
    assert not isinstance(ax.images[0].norm, LogNorm) and ax.images[0].norm.vmin == 0
    assert _block_rectangles(ax) == []


def test_log_scale_spans_at_most_the_dynamic_range():
    matrix = torch.diag(torch.tensor([1e-9, 1e-8, 1.0, 2.0]))  # zeros off the diagonal
    fig = plot_inverse_heatmap(matrix, [2, 2], dynamic_range=1e4)
    norm = fig.axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == pytest.approx((2e-4, 2.0))


def test_heatmap_refuses_sizes_that_do_not_tile():
    with pytest.raises(ValueError, match="do not tile"):
        plot_inverse_heatmap(_matrix(), [3, 3])


def test_grid_has_one_panel_per_matrix(tmp_path):
    matrices = {"conv1": _matrix(12), "ch 1": _matrix(6, seed=1), "ch 16": _matrix(4, seed=2)}
    sizes = {"conv1": SIZES, "ch 1": [3, 3], "ch 16": [2, 2]}
    fig = plot_heatmap_grid(matrices, sizes, ncols=2, suptitle="EFM")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == list(matrices)
    assert [len(_block_rectangles(ax)) for ax in panels] == [5, 2, 2]
    assert sum(not ax.axison for ax in fig.axes) == 1  # the unused fourth cell
    png, pdf = save_figure(fig, tmp_path / "sub" / "grid.v1")
    assert png.name == "grid.v1.png" and pdf.name == "grid.v1.pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    with pytest.raises(ValueError, match="no block sizes"):
        plot_heatmap_grid(matrices, {"conv1": SIZES})


def _cosine_frame(negative=False, seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        {
            "iteration": it,
            "layer": layer,
            "method": method,
            "cosine": rng.uniform(-0.5 if negative else 0.0, 1.0),
            "loss": 2.0 / (1 + it),
        }
        for it in range(40)
        for layer in ("fc2", "fc3", "fc4")
        for method in ("mbf", "kfac", "sgdm")
    ]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed)  # order must not matter


def test_smoothing_equals_the_pandas_rolling_mean():
    frame = _cosine_frame()
    smoothed = smooth_cosines(frame, 5)
    for (layer, method), group in frame.groupby(["layer", "method"]):
        expected = group.sort_values("iteration").cosine.rolling(5, min_periods=1).mean()
        got = smoothed[(smoothed.layer == layer) & (smoothed.method == method)]
        np.testing.assert_allclose(got.smoothed.to_numpy(), expected.to_numpy())
        assert list(got.iteration) == sorted(group.iteration)
    raw = smooth_cosines(frame, 1)
    np.testing.assert_allclose(raw.smoothed, raw.cosine)
    with pytest.raises(ValueError, match="positive"):
        smooth_cosines(frame, 0)
    with pytest.raises(ValueError, match="lacks columns"):
        smooth_cosines(frame.drop(columns="method"), 3)


def test_cosine_figure_panels_lines_legend_and_range():
    frame = _cosine_frame()
    fig = plot_cosines(frame, smoothing=4, layers=["fc3", "fc2"], methods=["sgdm", "mbf"])
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["fc3", "fc2", "minibatch loss"]
    smoothed = smooth_cosines(frame, 4)
    for ax in panels[:2]:
        assert ax.get_ylim() == (0.0, 1.0)
        assert [line.get_label() for line in ax.lines] == ["sgdm", "mbf"]
        for line in ax.lines:
            part = smoothed[
                (smoothed.layer == ax.get_title()) & (smoothed.method == line.get_label())
            ]
            np.testing.assert_allclose(line.get_ydata(), part.smoothed.to_numpy())
            np.testing.assert_array_equal(line.get_xdata(), part.iteration.to_numpy())
    assert panels[0].lines[0].get_color() == panels[1].lines[0].get_color()
    loss = panels[2].lines[0]
    np.testing.assert_allclose(loss.get_ydata(), 2.0 / (1 + np.arange(40)))
    assert panels[2].get_yscale() == "log"  # a positive loss spans decades
    with_zero = frame.assign(loss=frame.loss.where(frame.iteration != 3, 0.0))
    assert [ax for ax in plot_cosines(with_zero).axes if ax.axison][-1].get_yscale() == "linear"
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sgdm", "mbf"]


def test_cosine_figure_with_negative_values_and_without_loss(tmp_path):
    frame = _cosine_frame(negative=True).drop(columns="loss")
    fig = plot_cosines(frame, smoothing=1)
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == list(dict.fromkeys(frame.layer))
    assert all(ax.get_ylim() == (-1.0, 1.0) for ax in panels)
    png, pdf = save_figure(fig, tmp_path / "cosines")
    assert png.stat().st_size > 0 and pdf.stat().st_size > 0
    with pytest.raises(ValueError, match="methods"):
        plot_cosines(frame, methods=["adam"])


def test_cosine_figure_fits_a_page_wraps_marks_the_collapse_and_has_a_title(tmp_path):
    frame = pd.concat(
        [_cosine_frame().assign(layer=_cosine_frame().layer + suffix) for suffix in ("", "b")]
    )
    fig = plot_cosines(frame, title="digits-mlp on digits, λ = 0.003, lr 0.1", collapse=12)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 7  # six layers and the loss, three panels a row
    columns = {round(ax.get_position().x0, 3) for ax in panels}
    assert len(columns) == 3
    assert fig.get_figwidth() <= 7.5  # the width of a page
    assert fig._suptitle.get_text() == "digits-mlp on digits, λ = 0.003, lr 0.1"
    for ax in panels:
        marks = [line for line in ax.lines if line.get_gid() == "collapse"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [12, 12]
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[-1] == "loss collapsed (iteration 12)"
    png, _ = save_figure(fig, tmp_path / "wrapped")
    assert png.stat().st_size > 0


def test_heatmap_grid_zooms_into_matrices_with_many_blocks():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((64 * 5, 64 * 5))
    small = rng.standard_normal((12, 12))
    fig = plot_heatmap_grid(
        {"conv2 input channel 1": big, "fc3": small},
        {"conv2 input channel 1": [5] * 64, "fc3": [4] * 3},
        suptitle="|(F + λI)⁻¹| of the exact Fisher (the true Fisher in closed form)",
    )
    panels = [ax for ax in fig.axes if ax.axison and ax.get_title()]
    titles = [ax.get_title() for ax in panels]
    assert titles == [
        "conv2 input channel 1",
        "conv2 input channel 1\nzoom: mini-blocks 1-4 of 64",
        "fc3",
    ]
    zoom = panels[1]
    outlines = [p for p in zoom.patches if p.get_gid() == BLOCK_GID]
    assert len(outlines) == 4 and zoom.get_xlim() == (-0.5, 19.5)
    image = zoom.get_images()[0]
    np.testing.assert_allclose(image.get_array(), np.abs(big[:20, :20]))
    assert image.norm.vmax == pytest.approx(np.abs(big).max())  # the whole matrix's scale
    assert "true Fisher" in fig._suptitle.get_text()


def test_a_one_layer_error_figure_keeps_its_legend_and_title_inside():
    """The paper's fc5 figure has one panel: its 4-column legend and long title must fit."""
    methods = ["kfac", "kpsvd", "deflation", "lanczos", "kfac-corrected", "mbf", "mbf-exact"]
    frame = pd.DataFrame(
        [
            {"iteration": k, "layer": "fc5", "method": m, "error": 0.1 + j, "singular_error": 0.2}
            for k in range(4)
            for j, m in enumerate(methods)
        ]
    )
    title = "mnist-ae on mnist: ‖F − F̂‖/‖F‖ along adam (lr 0.001), true Fisher, batch 512"
    fig = plot_approximation_errors(frame, title=title)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    box = fig.bbox
    for artist in (fig.legends[0], fig._suptitle):
        extent = artist.get_window_extent(renderer)
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, artist
    assert "\n" in fig._suptitle.get_text()  # wrapped


@pytest.mark.parametrize("n", [3, 10, 11, 16, 25])
def test_distinct_colors_never_repeat(n):
    colors = distinct_colors([f"m{i}" for i in range(n)])
    assert len(colors) == n and len(set(colors.values())) == n


def test_a_cosine_figure_with_eleven_methods_gives_each_its_own_colour():
    methods = [f"method-{i}" for i in range(11)]
    frame = pd.DataFrame(
        [
            {"iteration": k, "layer": "fc1", "method": m, "cosine": 0.5, "loss": 1.0}
            for k in range(3)
            for m in methods
        ]
    )
    fig = plot_cosines(frame, smoothing=1)
    lines = [line for line in fig.axes[0].lines if line.get_label() in methods]
    assert (
        len(
            {
                line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color())
                for line in lines
            }
        )
        == 11
    )


def test_minor_tick_labels_of_a_log_loss_axis_are_as_small_as_the_major_ones():
    """A log axis spanning less than a decade labels its minor ticks; they must not be larger."""
    frame = pd.DataFrame(
        [
            {"iteration": k, "layer": "fc1", "method": "mbf", "cosine": 0.5, "loss": 2.0 - 0.1 * k}
            for k in range(10)
        ]
    )
    fig = plot_cosines(frame, smoothing=1)
    loss_axes = next(ax for ax in fig.axes if ax.get_title() == "minibatch loss")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    minor = [t.get_fontsize() for t in loss_axes.yaxis.get_minorticklabels() if t.get_text()]
    assert minor and max(minor) <= 7
