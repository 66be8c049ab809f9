"""``mbf-analyze heatmap``: |(F + λI)⁻¹| of whole layers and conv input-channel subsets of a
pretrained network, with the mini-block mass fractions (paper Fig. 5, 13, 14)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from mbf_analysis.analysis import InverseHeatmaps, ParameterSubset, inverse_fisher_heatmaps
from mbf_analysis.checkpoints import TrainConfig, checkpoint_path, pretrained_model
from mbf_analysis.cli.common import (
    DEFAULT_MODEL,
    UsageError,
    add_fisher_kinds,
    add_problem_options,
    check_kinds,
    check_layers,
    csv_list,
    parse_device,
    positive_float,
    positive_int,
    problem,
    save_run,
)
from mbf_analysis.layout import model_layouts
from mbf_analysis.plotting import plot_heatmap_grid, save_figure

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
    heatmap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="SGD-m pretraining epochs (default: 30 for digits, 50 for mnist16 as in the paper, "
        "2 for (fashion-)mnist; 0: the seeded initialization)",
    )
    heatmap.add_argument(
        "--lr", type=positive_float, default=0.01, help="pretraining learning rate (0.01)"
    )
    heatmap.add_argument(
        "--train-batch-size", type=positive_int, default=128, help="pretraining minibatch (128)"
    )
    heatmap.add_argument(
        "--train-dtype",
        default="float32",
        choices=["float32", "float64"],
        help="precision of pretraining (default: float32)",
    )
    heatmap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="checkpoint cache (default: $MBF_CACHE_DIR/checkpoints, else "
        "~/.cache/mbf_analysis/checkpoints)",
    )
    heatmap.add_argument(
        "--save-matrices",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the inverses to heatmap_matrices.pt in --out (default: yes)",
    )
    heatmap.set_defaults(run=run)


def _heatmap_subsets(args: argparse.Namespace, model: nn.Module) -> list[ParameterSubset]:
    """Whole layers (``--layers`` or all up to ``--max-dim``) and ``--channels`` subsets."""
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


def _save_heatmaps(out: Path, result: InverseHeatmaps, save_matrices: bool) -> list[Path]:
    """One figure per kind (all subsets side by side) and, optionally, the matrices."""
    written: list[Path] = []
    sizes = {label: subset.block_sizes for label, subset in result.subsets.items()}
    summary = result.summary.set_index(["kind", "subset"])
    for kind, matrices in result.matrices.items():
        titled = {}
        for label, matrix in matrices.items():
            row = summary.loc[(kind, label)]
            title = f"{label}\nmass {row.miniblock_mass:.2f} (area {row.miniblock_area:.3f})"
            titled[title] = matrix
        fig = plot_heatmap_grid(
            titled,
            dict(zip(titled, (sizes[label] for label in matrices), strict=True)),
            suptitle=f"|(F + λI)⁻¹|, {kind} Fisher",
        )
        written.extend(save_figure(fig, out / f"heatmap_{kind}"))
    if save_matrices:
        path = out / "heatmap_matrices.pt"
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
    if args.epochs is not None and args.epochs < 0:
        raise UsageError(f"--epochs {args.epochs}: must be 0 or more")
    start = time.perf_counter()
    dataset, model, loss_fn, inputs, targets = problem(args)
    model_name = args.model or DEFAULT_MODEL[dataset.name]
    subsets = _heatmap_subsets(args, model)
    loaded = time.perf_counter()
    config = TrainConfig(
        model=model_name,
        dataset=dataset.name,
        epochs=DEFAULT_EPOCHS.get(dataset.name, 1) if args.epochs is None else args.epochs,
        lr=args.lr,
        batch_size=args.train_batch_size,
        seed=args.seed,
        dtype=args.train_dtype,
    )
    target = parse_device(args.device)
    model = pretrained_model(config, dataset=dataset, cache_dir=args.cache_dir, device=target)
    model = model.to(dtype=getattr(torch, args.dtype)).eval()
    trained = time.perf_counter()
    result = inverse_fisher_heatmaps(
        model,
        loss_fn,
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
    print(
        f"Inverse Fisher of {model_name} after {config.epochs} epochs of SGD-m "
        f"(checkpoint {checkpoint_path(config, args.cache_dir).name}) on {len(inputs)} "
        f"{dataset.name} samples (λ = {args.damping:g}, {args.dtype}):"
    )
    shown = frame[["subset", "kind", "dim", "blocks"]].assign(
        mean_eig=(frame.trace / frame.dim).map("{:.3g}".format),
        mass_vs_area=frame.miniblock_mass.map("{:.3f}".format)
        + " / "
        + frame.miniblock_area.map("{:.3f}".format),
    )
    with pd.option_context("display.width", 160, "display.max_colwidth", 40):
        print(shown.to_string(index=False))
    if args.out is None:
        return
    written = _save_heatmaps(args.out, result, args.save_matrices)
    plotted = time.perf_counter()
    print(f"wrote {', '.join(str(p) for p in written)}")
    timings = {
        "load": loaded - start,
        "pretrain": trained - loaded,
        "fisher": done - trained,
        "plot": plotted - done,
    }
    save_run(args.out, "heatmap_mass", frame, args, timings)
