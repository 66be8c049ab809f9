"""Figures from the analyses' matrices and tidy DataFrames (seaborn/matplotlib).

Every function builds a :class:`matplotlib.figure.Figure` without pyplot's global state (nothing
is shown, no backend is required; works under ``matplotlib.use("Agg")``), draws into a given
``ax`` where that makes sense, and returns the figure. :func:`save_figure` writes PNG and PDF.

- :func:`plot_inverse_heatmap`: ``|P|`` of one layer or parameter subset, mini-blocks outlined
  on the diagonal (paper Fig. 5, 13, 14).
- :func:`plot_heatmap_grid`: several of those side by side.
- :func:`plot_cosines`: cosine of each method's direction with BDF's along the trajectory, one
  panel per layer, smoothed by a rolling mean (paper Fig. 6).
- :func:`plot_training_curves`: loss (or accuracy) of training runs against training time and
  epochs, one line per optimizer (paper Fig. 7, 8).
- :func:`plot_approximation_errors`: the Fisher-approximation errors of each method along a
  training run, one panel per layer (the Kronecker-SVD paper's figure).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mbf_analysis.errors import ConfigError

__all__ = [
    "BLOCK_GID",
    "COSINE_COLUMNS",
    "distinct_colors",
    "plot_cosines",
    "plot_heatmap_grid",
    "plot_inverse_heatmap",
    "plot_approximation_errors",
    "plot_training_curves",
    "save_figure",
    "smooth_cosines",
    "smoothing_window",
]

BLOCK_GID = "miniblock"
"""``gid`` of the rectangles that outline the mini-blocks (to find them among the artists)."""

COSINE_COLUMNS = ("iteration", "layer", "method", "cosine")
"""Columns that :func:`plot_cosines` needs (``loss`` is optional)."""


def _as_numpy(matrix: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().double().numpy()
    return np.asarray(matrix, dtype=np.float64)


def distinct_colors(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per name, all different: seaborn's default palette up to its 10 colours (beyond
    it would repeat itself); up to 20, the dark then the light colours of ``tab20``; beyond,
    evenly spaced hues (``husl``)."""
    names = list(names)
    if len(names) <= 10:
        palette = sns.color_palette()
    elif len(names) <= 20:
        pairs = sns.color_palette("tab20")
        palette = pairs[::2] + pairs[1::2]
    else:
        palette = sns.color_palette("husl", len(names))
    return dict(zip(names, palette, strict=False))


def plot_inverse_heatmap(
    matrix: torch.Tensor | np.ndarray,
    block_sizes: Sequence[int],
    ax: Axes | None = None,
    *,
    title: str | None = None,
    log_scale: bool = True,
    dynamic_range: float = 1e6,
    cmap: str = "rocket",
    mark_blocks: bool = True,
    colorbar: bool = True,
    block_range: tuple[int, int] | None = None,
) -> Figure:
    """Heatmap of ``|P|`` (``[k, k]``) with its diagonal mini-blocks outlined.

    Entry ``(i, j)`` is the pixel centred at ``(j, i)``; mini-block ``b`` covering indices
    ``o_b .. o_b + s_b − 1`` is outlined by a square with corner ``(o_b − ½, o_b − ½)`` and side
    ``s_b`` (``gid`` :data:`BLOCK_GID`), one per block. With ``block_range = (b0, b1)`` only the
    rows and columns of blocks ``b0 .. b1 − 1`` are drawn (a zoom in which the block boundaries of
    a large matrix stay visible), at their indices in the whole matrix; the colour scale is the
    whole matrix's, so a zoom and the full view compare directly.

    Args:
        matrix: ``[k, k]``; its absolute value is shown.
        block_sizes: Mini-block sizes along the diagonal, adding up to ``k``.
        ax: Where to draw (default: a new figure).
        title: Axes title.
        log_scale: Logarithmic colour scale, since magnitudes span decades: from the 1st
            percentile of the nonzero ``|P_ij|`` (at least ``max|P| / dynamic_range``) to
            ``max|P|``; smaller entries get the lowest colour.
        dynamic_range: Largest ratio of the top to the bottom of the log colour scale.
        cmap: Colour map name (seaborn's or matplotlib's).
        mark_blocks: Outline the mini-blocks.
        colorbar: Add a colour bar.
        block_range: ``(b0, b1)``: draw blocks ``b0 .. b1 − 1`` only (default: all).

    Returns:
        The figure holding ``ax``.

    Raises:
        ValueError: If ``matrix`` is not square, the block sizes do not add up to ``k``, or the
            block range is empty or out of range.
    """
    values = np.abs(_as_numpy(matrix))
    sizes = [int(s) for s in block_sizes]
    if values.ndim != 2 or values.shape[0] != values.shape[1] or sum(sizes) != len(values):
        raise ConfigError(
            f"block sizes adding up to {sum(sizes)} do not tile a matrix of shape "
            f"{list(values.shape)}."
        )
    if ax is None:
        fig = Figure(figsize=(5.0, 4.2), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.get_figure(root=True)
    top = float(values.max()) if values.size else 1.0
    top = top if top > 0 else 1.0
    if log_scale:
        positive = values[values > 0]
        low = float(np.quantile(positive, 0.01)) if positive.size else 0.0
        norm: Normalize = LogNorm(vmin=max(low, top / dynamic_range), vmax=top, clip=True)
    else:
        norm = Normalize(vmin=0.0, vmax=top)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    first, stop = (0, len(sizes)) if block_range is None else block_range
    if not 0 <= first < stop <= len(sizes):
        raise ConfigError(f"block_range {block_range} is not within the {len(sizes)} blocks.")
    lo, hi = int(offsets[first]), int(offsets[stop])
    image = ax.imshow(
        values[lo:hi, lo:hi],
        cmap=sns.color_palette(cmap, as_cmap=True),
        norm=norm,
        interpolation="nearest",
        extent=(lo - 0.5, hi - 0.5, hi - 0.5, lo - 0.5),
    )
    if mark_blocks:
        offset = lo
        for size in sizes[first:stop]:
            ax.add_patch(
                Rectangle(
                    (offset - 0.5, offset - 0.5),
                    size,
                    size,
                    fill=False,
                    edgecolor="#4dd0e1",
                    linewidth=0.5 if stop - first > 64 else 0.9,
                    gid=BLOCK_GID,
                )
            )
            offset += size
    ax.set_xlabel("parameter index", fontsize=8)
    ax.set_ylabel("parameter index", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    if colorbar:
        bar = fig.colorbar(image, ax=ax, shrink=0.85)
        bar.set_label("|P|", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


def plot_heatmap_grid(
    matrices: Mapping[str, torch.Tensor | np.ndarray],
    block_sizes: Mapping[str, Sequence[int]],
    *,
    ncols: int | None = None,
    panel_size: float = 2.6,
    suptitle: str | None = None,
    zoom_blocks: int | None = 4,
    **kwargs: object,
) -> Figure:
    """Several :func:`plot_inverse_heatmap` panels (paper Fig. 5, 13, 14), at most 3 a row.

    A matrix with more than ``4 · zoom_blocks`` mini-blocks also gets a zoomed panel right after
    it, on its first ``zoom_blocks`` blocks (``block_range``), where the block boundaries stay
    visible; at full size the outlines of, say, 64 blocks of 25 in 1600 rows are a few pixels
    apart.

    Args:
        matrices: Panel title → ``[k, k]`` matrix, in panel order.
        block_sizes: Panel title → its mini-block sizes.
        ncols: Panels per row (default: up to 3).
        panel_size: Height of a panel in inches.
        suptitle: Figure title.
        zoom_blocks: Blocks shown in the zoomed panels (``None``: no zoom).
        **kwargs: Passed on to :func:`plot_inverse_heatmap` (``log_scale``, ``cmap``, ...).

    Returns:
        The figure, one axes per panel (each with its own colour bar).
    """
    if not matrices:
        raise ConfigError("no matrices to plot.")
    missing = [name for name in matrices if name not in block_sizes]
    if missing:
        raise ConfigError(f"no block sizes for {missing}.")
    panels: list[tuple[str, str, tuple[int, int] | None]] = []
    for name in matrices:
        panels.append((name, name, None))
        n_blocks = len(block_sizes[name])
        if zoom_blocks is not None and n_blocks > 4 * zoom_blocks:
            first_line = name.split("\n", 1)[0]
            zoom_title = f"{first_line}\nzoom: mini-blocks 1-{zoom_blocks} of {n_blocks}"
            panels.append((name, zoom_title, (0, zoom_blocks)))
    ncols = min(ncols or 3, len(panels))
    nrows = -(-len(panels) // ncols)
    height = panel_size * nrows + (0.5 if suptitle else 0.0)
    fig = Figure(figsize=(1.3 * panel_size * ncols, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, (name, title, block_range) in zip(axes, panels, strict=False):
        plot_inverse_heatmap(
            matrices[name], block_sizes[name], ax, title=title, block_range=block_range, **kwargs
        )
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def smooth_cosines(frame: pd.DataFrame, window: int, value: str = "cosine") -> pd.DataFrame:
    """Add ``smoothed``: the rolling mean of ``value`` over ``window`` iterations.

    Per ``(layer, method)``, ordered by ``iteration``:
    ``smoothed_t = mean(v_{t−w+1}, …, v_t)`` over the available values (fewer at the start:
    ``min_periods=1``).

    Args:
        frame: Columns :data:`COSINE_COLUMNS` (and ``value``).
        window: ``w ≥ 1`` (``1``: no smoothing).
        value: The column smoothed: ``"cosine"``, or ``"energy_error"`` of the all-layer
            reference.

    Returns:
        A copy sorted by ``layer, method, iteration`` with the extra column.
    """
    if window < 1:
        raise ConfigError(f"smoothing window must be a positive integer, got {window}.")
    needed = [*COSINE_COLUMNS[:3], value]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ConfigError(f"cosine frame lacks columns {missing}; it needs {needed}.")
    out = frame.sort_values(["layer", "method", "iteration"], kind="stable").copy()
    out["smoothed"] = out.groupby(["layer", "method"], sort=False)[value].transform(
        lambda s: s.rolling(window, min_periods=1).mean()
    )
    return out


def _pick(frame: pd.DataFrame, column: str, wanted: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(frame[column]))
    if wanted is None:
        return present
    unknown = [w for w in wanted if w not in present]
    if unknown:
        raise ConfigError(f"{column}s {unknown} not in the frame; it has {present}.")
    return list(wanted)


def plot_cosines(
    frame: pd.DataFrame,
    *,
    smoothing: int = 10,
    layers: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    show_loss: bool = True,
    ncols: int = 3,
    panel_size: float = 2.1,
    title: str | None = None,
    collapse: int | None = None,
    value: str = "cosine",
    reference: str = "BDF",
) -> Figure:
    """Cosine of each method's direction with BDF's along the trajectory (paper Fig. 6).

    One panel per layer (x: iteration, y: rolling-mean cosine, :func:`smooth_cosines`), one line
    per method in the same colour in every panel, and one legend for the figure; at most
    ``ncols`` panels a row, so that the figure fits the width of a page (about 7 inches for the
    default 3). The y range is ``[0, 1]`` if no cosine is negative, else ``[−1, 1]``. With
    ``show_loss`` and a ``loss`` column, a last panel shows the loss along the trajectory (the
    first value per iteration; a log scale when every value is positive). ``collapse`` marks the
    iteration where the loss collapsed with a dotted line in every panel. With
    ``value="energy_error"`` (the all-layer reference, :data:`mbf_analysis.analysis.FULL_COLUMNS`)
    the panels show the ``F_λ``-norm relative error instead, on a log scale when it is positive.

    Args:
        frame: Tidy frame with columns ``iteration, layer, method, cosine`` (and ``loss``).
        smoothing: Rolling-mean window in iterations (``1``: raw values).
        layers: Layers to show, in panel order (default: all, in order of appearance).
        methods: Methods to show, in legend order (default: all, in order of appearance).
        show_loss: Add the loss panel when the frame has ``loss``.
        ncols: Panels per row.
        panel_size: Height of a panel in inches.
        title: Figure title (e.g. the data, model, λ and lr).
        collapse: Iteration at which the loss collapsed (marked), or ``None``.
        value: ``"cosine"`` or ``"energy_error"``.
        reference: What the directions are compared with, for the axis label (``"BDF"``,
            ``"F_λ⁻¹∇"``).

    Returns:
        The figure.
    """
    smoothed = smooth_cosines(frame, smoothing, value)
    layers = _pick(frame, "layer", layers)
    methods = _pick(frame, "method", methods)
    smoothed = smoothed[smoothed.layer.isin(layers) & smoothed.method.isin(methods)]
    loss = show_loss and "loss" in frame.columns
    n_panels = len(layers) + int(loss)
    ncols = min(ncols, n_panels)
    nrows = -(-n_panels // ncols)
    height = panel_size * nrows + 0.45 + (0.3 if title else 0.0)
    fig = Figure(figsize=(1.12 * panel_size * ncols, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).flatten()
    colors = distinct_colors(methods)
    energy = value != "cosine"
    ylim = (0.0, 1.0) if float(smoothed.smoothed.min()) >= 0 else (-1.0, 1.0)
    positive = bool((smoothed.smoothed.dropna() > 0).all())
    for ax, layer in zip(axes, layers, strict=False):
        part = smoothed[smoothed.layer == layer]
        for method in methods:
            line = part[part.method == method]
            ax.plot(line.iteration, line.smoothed, color=colors[method], label=method, lw=1.0)
        ax.set_title(str(layer), fontsize=8)
        if energy:
            if positive:
                ax.set_yscale("log")
            label = f"‖d − d*‖_F_λ / ‖d*‖_F_λ (mean of {smoothing})"
        else:
            ax.set_ylim(*ylim)
            label = f"cosine with {reference} (mean of {smoothing})"
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel(label, fontsize=7)
        ax.tick_params(which="both", labelsize=7, labelbottom=True)
        ax.grid(alpha=0.3)
    if loss:
        ax = axes[len(layers)]
        per_iteration = frame.groupby("iteration", sort=True)["loss"].first()
        ax.plot(per_iteration.index, per_iteration.to_numpy(), color="black", lw=1.0)
        if bool((per_iteration > 0).all()):
            ax.set_yscale("log")
        ax.set_title("minibatch loss", fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("loss", fontsize=7)
        ax.tick_params(which="both", labelsize=7)  # a log axis within a decade labels minor ticks
        ax.grid(alpha=0.3)
    if collapse is not None:
        for ax in axes[:n_panels]:
            ax.axvline(collapse, color="0.4", ls=":", lw=1.0, gid="collapse")
    for ax in axes[n_panels:]:
        ax.set_axis_off()
    handles = [axes[0].lines[i] for i in range(len(methods))]
    labels = list(methods)
    if collapse is not None:
        handles.append(axes[0].lines[-1])
        labels.append(f"loss collapsed (iteration {collapse})")
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 4),
        frameon=False,
        fontsize=7,
    )
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> tuple[Path, Path]:
    """Write ``<path>.png`` and ``<path>.pdf`` (folders are created).

    Args:
        fig: The figure.
        path: Target without suffix (a suffix-like part of the name is kept, not replaced).
        dpi: Resolution of the PNG and of images embedded in the PDF.

    Returns:
        The PNG and PDF paths.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = path.with_name(path.name + ".png"), path.with_name(path.name + ".pdf")
    fig.savefig(png, dpi=dpi)
    fig.savefig(pdf, dpi=dpi)
    return png, pdf


_X_LABELS = {"wall_time": "training time (s)", "process_time": "process time (s)", "epoch": "epoch"}


def smoothing_window(n_points: int) -> int:
    """The rolling-mean window of a per-step curve of ``n_points``: about 2% of it (at least 1,
    at most 200), so that the minibatch noise is smoothed but the shape stays."""
    return int(min(200, max(1, round(n_points / 50))))


def plot_training_curves(
    frame: pd.DataFrame,
    x: str | Sequence[str] = ("wall_time", "epoch"),
    *,
    y: str = "loss",
    ax: Axes | None = None,
    log_y: bool | None = None,
    optimizers: Sequence[str] | None = None,
    title: str | None = None,
    smoothing: int | None = None,
    panel_size: float = 2.6,
) -> Figure:
    """Training curves of several runs, one colour per optimizer (paper Fig. 7, 8).

    Takes the log of :func:`mbf_analysis.training.train` / ``compare`` (columns ``optimizer``,
    ``kind``, ``wall_time``, ``epoch`` and ``y``). ``y="loss"`` (the default) is the per-step
    minibatch training loss of the ``"step"`` rows, drawn as its rolling mean over ``smoothing``
    steps (default :func:`smoothing_window`) over the raw values in a light shade; a ``y`` of
    the evaluations (``train_loss``, ``test_loss``, ``train_accuracy``, ``test_accuracy``) is
    drawn from the ``"eval"`` rows with markers. A run that diverged ends in a cross where it
    stopped. Several seeds of one optimizer are separate thin lines in the same colour.

    Args:
        frame: The log.
        x: ``"wall_time"``, ``"process_time"`` or ``"epoch"``, or several: one panel each.
        y: The column on the y axis.
        ax: Where to draw a single panel (only with one ``x``).
        log_y: Logarithmic y axis (default: for losses, when all values are positive).
        optimizers: Optimizers to draw, in legend order (default: all, in order of appearance).
        title: Figure title.
        smoothing: Rolling-mean window of the per-step loss, in steps.
        panel_size: Height of a panel in inches.

    Returns:
        The figure.

    Raises:
        ValueError: For missing columns, an unknown ``x``, or ``ax`` with several ``x``.
    """
    xs = [x] if isinstance(x, str) else list(x)
    unknown = [name for name in xs if name not in _X_LABELS]
    if unknown or not xs:
        raise ConfigError(f"x must be among {list(_X_LABELS)}, got {unknown or xs}.")
    missing = [c for c in ("optimizer", "kind", y, *xs) if c not in frame.columns]
    if missing:
        raise ConfigError(f"training log lacks columns {missing}.")
    if ax is not None and len(xs) > 1:
        raise ConfigError(f"ax draws one panel; got {len(xs)} x columns {xs}.")
    per_step = y == "loss"
    rows = frame[frame.kind == ("step" if per_step else "eval")].dropna(subset=[y])
    optimizers = _pick(frame, "optimizer", optimizers)
    if ax is None:
        fig = Figure(figsize=(1.3 * panel_size * len(xs), panel_size + 0.6), layout="constrained")
        axes = list(fig.subplots(1, len(xs), squeeze=False)[0])
    else:
        fig, axes = ax.get_figure(root=True), [ax]
    if log_y is None:
        log_y = "loss" in y and len(rows) > 0 and bool((rows[y] > 0).all())
    colors = distinct_colors(optimizers)
    top = None
    if "loss" in y and len(rows):
        key_first = "run" if "run" in rows.columns else "optimizer"
        firsts = rows.groupby(key_first, sort=False)[y].first()
        top = 2.0 * float(firsts.max()) if bool((firsts > 0).all()) else None
    key = "run" if "run" in rows.columns else "seed"
    several = key in rows.columns and rows.groupby("optimizer")[key].nunique().max() > 1
    ends = frame[(frame.kind == "end") & (frame.status == "diverged")]
    for panel, name in zip(axes, xs, strict=True):
        for optimizer in optimizers:
            runs = rows[rows.optimizer == optimizer]
            groups = runs.groupby(key, sort=False) if key in runs.columns else [(None, runs)]
            for i, (run_key, run) in enumerate(groups):
                values = run[y]
                if per_step:
                    window = smoothing or smoothing_window(len(run))
                    panel.plot(run[name], values, color=colors[optimizer], lw=0.4, alpha=0.25)
                    values = values.rolling(window, min_periods=1).mean()
                panel.plot(
                    run[name],
                    values,
                    color=colors[optimizer],
                    lw=0.8 if several else 1.3,
                    marker=None if per_step else "o",
                    ms=2.5,
                    label=optimizer if i == 0 else None,
                )
                stopped = ends[ends.optimizer == optimizer]
                if run_key is not None and key in stopped.columns:
                    stopped = stopped[stopped[key] == run_key]
                if len(stopped) and len(run):
                    last = float(values.iloc[-1])
                    if top is not None and not last <= top:
                        last = top
                    panel.plot(
                        run[name].iloc[-1],
                        last,
                        clip_on=False,
                        marker="x",
                        ms=7,
                        mew=1.6,
                        color=colors[optimizer],
                        gid="diverged",
                    )
        panel.set_xlabel(_X_LABELS[name], fontsize=8)
        label = "minibatch training loss" if per_step else y.replace("_", " ")
        panel.set_ylabel(label, fontsize=8)
        panel.tick_params(which="both", labelsize=7)
        if log_y:
            panel.set_yscale("log")
        if top is not None:
            panel.set_ylim(top=top)
        panel.grid(alpha=0.3, which="both")
    if len(ends):
        axes[0].plot([], [], "kx", label="diverged")
    axes[0].legend(frameon=False, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


MIN_LEGEND_WIDTH = 5.0
"""Inches: the narrowest error figure, so that a single panel's four-column legend fits."""
TITLE_CHARS_PER_INCH = 15
"""Characters of a 9-point title per inch of figure width, where titles wrap."""


_ERROR_VALUES = {
    "error": ("relative error", "‖F − F̂‖_F / ‖F‖_F"),
    "scaled_error": ("scale-free relative error", "min_α ‖F − αF̂‖_F / ‖F‖_F"),
}
"""The columns :func:`plot_approximation_errors` draws: y label and legend entry."""


def plot_approximation_errors(
    frame: pd.DataFrame,
    *,
    smoothing: int = 5,
    layers: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    ncols: int = 3,
    panel_size: float = 2.1,
    title: str | None = None,
    value: str = "error",
) -> Figure:
    """The relative errors of each method's Fisher approximation along a trajectory.

    One panel per layer (x: iteration; y: the column ``value``, solid: ``error =
    ‖F − F̂‖_F/‖F‖_F`` or the scale-free ``scaled_error = min_α ‖F − αF̂‖_F/‖F‖_F``; and
    ``singular_error``, the relative error of the leading singular values, dashed; both the
    rolling mean over ``smoothing`` records), one colour per method, one legend; at most
    ``ncols`` panels a row. The y axis is logarithmic when every drawn value is positive and they
    span more than a decade. A method whose ``value`` is all 0 (``bdf``) is left out of the
    panels and named in the legend's title.

    Args:
        frame: Columns ``iteration, layer, method``, ``value`` and optionally
            ``singular_error`` (:data:`mbf_analysis.analysis.TRAJECTORY_COLUMNS`).
        smoothing: Rolling-mean window in records (``1``: raw).
        layers, methods: What to draw, in order (default: all, in order of appearance).
        ncols: Panels per row.
        panel_size: Height of a panel in inches.
        title: Figure title.
        value: The solid lines' column, ``"error"`` or ``"scaled_error"``; the y label and the
            legend say which.

    Returns:
        The figure.
    """
    if smoothing < 1:
        raise ConfigError(f"smoothing window must be a positive integer, got {smoothing}.")
    if value not in _ERROR_VALUES:
        raise ConfigError(f"value must be one of {list(_ERROR_VALUES)}, got {value!r}.")
    missing = [c for c in ("iteration", "layer", "method", value) if c not in frame.columns]
    if missing:
        raise ConfigError(f"error frame lacks columns {missing}.")
    layers = _pick(frame, "layer", layers)
    methods = _pick(frame, "method", methods)
    zero = [m for m in methods if bool((frame[frame.method == m][value].fillna(0) == 0).all())]
    drawn = [m for m in methods if m not in zero]
    kinds = [k for k in (value, "singular_error") if k in frame.columns]
    ncols = min(ncols, len(layers))
    nrows = -(-len(layers) // ncols)
    width = max(1.12 * panel_size * ncols, MIN_LEGEND_WIDTH)
    height = panel_size * nrows + 0.5 + (0.3 if title else 0.0)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    colors = distinct_colors(drawn)
    styles = {value: "-", "singular_error": "--"}
    for ax, layer in zip(axes, layers, strict=False):
        values = []
        for method in drawn:
            part = frame[(frame.layer == layer) & (frame.method == method)].sort_values("iteration")
            for kind in kinds:
                smoothed = part[kind].rolling(smoothing, min_periods=1).mean()
                values.append(smoothed.dropna().to_numpy())
                ax.plot(
                    part.iteration,
                    smoothed,
                    color=colors[method],
                    ls=styles[kind],
                    lw=1.0,
                    label=method if kind == value else None,
                    gid=f"{method}:{kind}",
                )
        flat = np.concatenate(values) if values else np.array([])
        if flat.size and (flat > 0).all() and flat.max() > 10 * flat.min():
            ax.set_yscale("log")
        ax.set_title(str(layer), fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel(f"{_ERROR_VALUES[value][0]} (mean of {smoothing})", fontsize=7)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(layers) :]:
        ax.set_axis_off()
    handles = [next(line for line in axes[0].lines if line.get_label() == m) for m in drawn]
    labels = list(drawn)
    if "singular_error" in kinds and drawn:
        handles += [
            axes[0].plot([], [], color="0.3", ls="-", lw=1.0)[0],
            axes[0].plot([], [], color="0.3", ls="--", lw=1.0)[0],
        ]
        labels += [_ERROR_VALUES[value][1], "leading singular values"]
    legend = fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 4),
        frameon=False,
        fontsize=7,
    )
    if zero:
        legend.set_title(f"0 by construction, not drawn: {', '.join(zero)}", prop={"size": 7})
    if title:
        fig.suptitle(textwrap.fill(title, int(width * TITLE_CHARS_PER_INCH)), fontsize=9)
    return fig
