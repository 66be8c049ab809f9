"""``mbf-analyze heatmap``: |(F + λI)⁻¹| of whole layers and conv input-channel subsets of a
pretrained network, with the mini-block mass fractions (paper Fig. 5, 13, 14)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mbf_analysis.cli.choices import FISHER_KINDS
from mbf_analysis.cli.common import (
    UsageError,
    add_fisher_kinds,
    add_out,
    add_problem_options,
    apply_threads,
    check_kinds,
    check_layers,
    config_of,
    csv_list,
    non_negative_int,
    positive_float,
    positive_int,
    require_data,
)
from mbf_analysis.cli.pretraining import add_pretraining, claim_folder, pretrain, stopped
from mbf_analysis.cli.run_folder import RunFolder
from mbf_analysis.fisher_kinds import DESCRIPTIONS

if TYPE_CHECKING:
    from torch import nn

    from mbf_analysis.analysis import InverseHeatmaps, ParameterSubset

CSV_NAME = "heatmap_mass.csv"
MATRICES_NAME = "heatmap_matrices.pt"
OUTPUTS = (
    CSV_NAME,
    MATRICES_NAME,
    *(f"heatmap_{kind}.{ext}" for kind in FISHER_KINDS for ext in ("png", "pdf")),
)
"""Every file ``heatmap`` may write into ``--out``."""

KIND_TITLES = DESCRIPTIONS
"""How titles and tables name each Fisher kind (:mod:`mbf_analysis.fisher_kinds`)."""

DEFAULT_EPOCHS = {"digits": 30, "mnist16": 50, "mnist": 2, "fashion-mnist": 2}
"""Pretraining epochs by data set (1 for others); mnist16: the paper's 50."""


def _channel_spec(text: str) -> tuple[str, list[int]]:
    layer, sep, channels = text.partition("=")
    try:
        indices = [int(c) for c in csv_list(channels)]
    except ValueError:
        indices = []
    if not sep or not layer.strip() or not indices:
        raise argparse.ArgumentTypeError(
            f"expected LAYER=I,J,... with 1-based input channels, e.g. conv2=1,16,32; got {text!r}"
        )
    return layer.strip(), indices


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``heatmap`` on the subcommand parsers."""
    heatmap = sub.add_parser(
        "heatmap",
        help="heatmaps of the inverse Fisher of layers and conv input-channel subsets",
        description="Pretrain the network with SGD-m (cached), then draw |(F + λI)⁻¹| of whole "
        "layers and of the kernels of a convolution that read one input channel, in mini-block "
        "order, and report the fraction of its mass inside the mini-blocks next to the area "
        "they cover (paper Fig. 5, 13, 14). --batch-size samples (default 256) of the training "
        "split form the Fisher. With --out: heatmap_<kind>.png/.pdf (all subsets side by side), "
        "heatmap_mass.csv, heatmap_matrices.pt (torch.load) and run.json.",
    )
    add_problem_options(heatmap)
    heatmap.set_defaults(batch_size=256)
    heatmap.add_argument(
        "--layers",
        type=csv_list,
        default=None,
        help="comma-separated module names analysed whole (default: every layer with at most "
        "--max-dim parameters; '' for none)",
    )
    heatmap.add_argument(
        "--channels",
        type=_channel_spec,
        action="append",
        default=[],
        metavar="LAYER=I,J,...",
        help="input-channel subsets of a conv layer: the kernels reading input channel I, "
        "1-BASED as in the paper (conv2=1,16,32: the paper's channels 1, 16, 32 = weight[:, 0], "
        "weight[:, 15], weight[:, 31]); repeatable",
    )
    heatmap.add_argument(
        "--max-dim",
        type=positive_int,
        default=6000,
        help="largest layer analysed whole when --layers is not given (default: 6000)",
    )
    add_fisher_kinds(heatmap)
    heatmap.add_argument(
        "--damping",
        type=positive_float,
        default=1e-3,
        help="λ in (F + λI)⁻¹ (default: 1e-3, as in `fisher`; the paper does not give its value)",
    )
    add_pretraining(
        heatmap,
        epochs_type=non_negative_int,
        default_epochs="30 for digits, 50 for mnist16 as in the paper, 2 for (fashion-)mnist",
    )
    heatmap.add_argument(
        "--save-matrices",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"write the inverses to {MATRICES_NAME} in --out (default: yes)",
    )
    add_out(heatmap, resumable=True, default="default: print only")
    heatmap.set_defaults(run=run)


def _heatmap_subsets(args: argparse.Namespace, model: nn.Module) -> list[ParameterSubset]:
    """Whole layers (``--layers`` or all up to ``--max-dim``) and ``--channels`` subsets."""
    from mbf_analysis.analysis import ParameterSubset
    from mbf_analysis.layout import model_layouts

    layouts = model_layouts(model)
    if args.layers is None:
        names = [name for name, layout in layouts.items() if layout.dim <= args.max_dim]
        skipped = [f"{name} (d = {layouts[name].dim})" for name in layouts if name not in names]
        if skipped:
            print(f"not analysed whole (over --max-dim {args.max_dim}): {', '.join(skipped)}")
    else:
        check_layers(model, args.layers)
        names = list(dict.fromkeys(args.layers))
    subsets = [ParameterSubset.whole_layer(layouts[name]) for name in names]
    for layer, channels in args.channels:
        layout = layouts.get(layer)
        if layout is None or layout.kind != "conv2d":
            convs = [name for name, lay in layouts.items() if lay.kind == "conv2d"]
            raise UsageError(
                f"--channels {layer}: not a convolution of the model; its conv layers are "
                f"{', '.join(convs) or 'none'}"
            )
        c_in = layout.param_shapes[0][1]
        for channel in dict.fromkeys(channels):
            if not 1 <= channel <= c_in:
                raise UsageError(
                    f"--channels {layer}={channel}: channels are 1-based, {layer} reads "
                    f"channels 1..{c_in}"
                )
            subsets.append(
                ParameterSubset.conv_input_channel(
                    layout, channel - 1, label=f"{layer} input channel {channel}"
                )
            )
    if not subsets:
        raise UsageError("nothing to analyse: give --layers and/or --channels")
    return subsets


def _save_heatmaps(
    folder: RunFolder, result: InverseHeatmaps, save_matrices: bool, setting: str
) -> list[Path]:
    """One figure per kind (all subsets side by side) and, optionally, the matrices."""
    import torch

    from mbf_analysis.plotting import plot_heatmap_grid, save_figure

    written: list[Path] = []
    sizes = {label: subset.block_sizes for label, subset in result.subsets.items()}
    summary = result.summary.set_index(["kind", "subset"])
    for kind, matrices in result.matrices.items():
        titled = {}
        for label, matrix in matrices.items():
            row = summary.loc[(kind, label)]
            title = f"{label}\nmass {row.miniblock_mass:.2f} (area {row.miniblock_area:.3f})"
            if row.damping_dominated:
                title += "\nλ dominates: max eig(F) ≤ λ"
            titled[title] = matrix
        fig = plot_heatmap_grid(
            titled,
            dict(zip(titled, (sizes[label] for label in matrices), strict=True)),
            suptitle=f"|(F + λI)⁻¹| of the {KIND_TITLES[kind]}; {setting}",
        )
        written.extend(save_figure(fig, folder.path / f"heatmap_{kind}"))
    if save_matrices:
        path = folder.path / MATRICES_NAME
        torch.save(
            {
                "matrices": {
                    kind: {label: m.cpu() for label, m in mats.items()}
                    for kind, mats in result.matrices.items()
                },
                "block_sizes": {label: list(s) for label, s in sizes.items()},
                "indices": {label: s.indices for label, s in result.subsets.items()},
                "layers": {label: s.layer for label, s in result.subsets.items()},
            },
            path,
        )
        written.append(path)
    return written


def run(args: argparse.Namespace) -> None:
    check_kinds(args.kinds)
    folder = claim_folder(args, "heatmap", OUTPUTS)
    data_folder = require_data(args.dataset, args.data_dir, args.download)

    import pandas as pd
    import torch

    from mbf_analysis.analysis import inverse_fisher_heatmaps
    from mbf_analysis.cli.common import batch_of, dataset_and_model

    apply_threads(args.threads)
    start = time.perf_counter()
    found: dict[str, list[ParameterSubset]] = {}
    dataset, model_name, model = dataset_and_model(
        args, check=lambda built: found.update(subsets=_heatmap_subsets(args, built))
    )
    subsets = found["subsets"]
    loaded = time.perf_counter()
    epochs = DEFAULT_EPOCHS.get(dataset.name, 1) if args.epochs is None else args.epochs
    try:
        model, trained = pretrain(args, dataset, model_name, model, epochs=epochs)
    except KeyboardInterrupt as err:
        stopped(err, args, folder, "heatmap")
    inputs, targets = batch_of(dataset, args.batch_size, args.seed)
    pretrained = time.perf_counter()
    result = inverse_fisher_heatmaps(
        model,
        torch.nn.CrossEntropyLoss(),
        inputs,
        targets,
        subsets,
        kinds=args.kinds,
        damping=args.damping,
        mc_samples=args.mc_samples,
        generator=torch.Generator(device=inputs.device).manual_seed(args.seed),
        progress=True,
    )
    done = time.perf_counter()
    frame = result.summary
    setting = f"{model_name} on {dataset.name}, {len(inputs)} samples, λ = {args.damping:g}"
    print(
        f"Inverse Fisher of {model_name} ({trained}) on {len(inputs)} {dataset.name} samples "
        f"(λ = {args.damping:g}, {args.dtype}):"
    )
    shown = frame[["subset", "kind", "dim", "blocks"]].assign(
        kind=frame.kind.map(KIND_TITLES),
        mean_eig=(frame.trace / frame.dim).map("{:.3g}".format),
        max_eig=frame.eig_max.map("{:.3g}".format),
        mass_vs_area=frame.miniblock_mass.map("{:.3f}".format)
        + " / "
        + frame.miniblock_area.map("{:.3f}".format)
        + frame.damping_dominated.map({True: " (λ dominates)", False: ""}),
    )
    with pd.option_context("display.width", 160, "display.max_colwidth", 40):
        print(shown.to_string(index=False))
    dominated = frame[frame.damping_dominated]
    if len(dominated):
        names = ", ".join(sorted(set(dominated.subset)))
        print(
            f"warning: λ = {args.damping:g} dominates the spectrum of {names} (every eigenvalue "
            "of F is at most λ, e.g. a dead channel): there (F + λI)⁻¹ ≈ I/λ, so its mini-block "
            "mass says nothing about F; lower --damping or leave these subsets out"
        )
    if folder is None:
        return
    written = _save_heatmaps(folder, result, args.save_matrices, setting)
    frame.to_csv(folder.path / CSV_NAME, index=False)
    folder.add_files(CSV_NAME, *written)
    plotted = time.perf_counter()
    print(f"wrote {folder.path / CSV_NAME}, {', '.join(str(p) for p in written)}")
    folder.write_record(
        {
            "status": "complete",
            "settings": {**config_of(args), "model": model_name, "epochs": epochs},
            "network": trained,
            "data_folder": None if data_folder is None else str(data_folder),
            "timings_s": {
                "load": loaded - start,
                "pretrain": pretrained - loaded,
                "fisher": done - pretrained,
                "plot": plotted - done,
            },
        }
    )
