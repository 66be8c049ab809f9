"""``mbf-analyze``: the command line. It parses, builds configurations and calls the library.

Every error a user can cause (an unknown name, missing data, a model that does not fit the data)
ends in one line on stderr, ``mbf-analyze: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from mbf_analysis import __version__
from mbf_analysis.analysis import (
    InverseHeatmaps,
    ParameterSubset,
    fisher_summary,
    inverse_fisher_heatmaps,
)
from mbf_analysis.checkpoints import TrainConfig, checkpoint_path, pretrained_model
from mbf_analysis.curvature import FISHER_KINDS
from mbf_analysis.data import DataError, Dataset, dataset_names, load_dataset
from mbf_analysis.errors import MBFError
from mbf_analysis.layout import model_layouts
from mbf_analysis.models import build_model, model_names
from mbf_analysis.plotting import plot_heatmap_grid, save_figure

__all__ = ["main", "build_parser"]

log = logging.getLogger("mbf_analysis")

DEFAULT_MODEL = {
    "digits": "digits-mlp",
    "mnist16": "paper-mlp",
    "mnist": "simple-cnn",
    "fashion-mnist": "simple-cnn",
}

DEFAULT_EPOCHS = {"digits": 30, "mnist16": 50, "mnist": 2, "fashion-mnist": 2}
"""Pretraining epochs of ``heatmap`` by data set (1 for others); mnist16: the paper's 50."""


class UsageError(Exception):
    """A command-line value that cannot work; reported in one line with exit code 2."""


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _channel_spec(text: str) -> tuple[str, list[int]]:
    layer, sep, channels = text.partition("=")
    try:
        indices = [int(c) for c in _csv_list(channels)]
    except ValueError:
        indices = []
    if not sep or not layer.strip() or not indices:
        raise argparse.ArgumentTypeError(
            f"expected LAYER=I,J,... with 1-based input channels, e.g. conv2=1,16,32; got {text!r}"
        )
    return layer.strip(), indices


def _add_problem_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=dataset_names(),
        help="data set (default: digits, embedded, works offline)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the data files (else $MBF_DATA_DIR, else ~/.cache/mbf_analysis)",
    )
    parser.add_argument(
        "--model",
        default=None,
        choices=model_names(),
        help="network (default: digits-mlp for digits, paper-mlp for mnist16, "
        "simple-cnn for (fashion-)mnist)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch missing data files from their canonical URLs (needs network)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=512, help="samples used")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the batch")
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    parser.add_argument(
        "--dtype",
        default="float64",
        choices=["float32", "float64"],
        help="floating-point precision (default: float64)",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for CSV and run.json")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mbf-analyze`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="mbf-analyze",
        description="Curvature analysis of the Mini-Block Fisher method (Bahamou, Goldfarb, Ren).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fisher = sub.add_parser(
        "fisher",
        help="per-layer summary of the empirical and true Fisher",
        description="Per-layer summary of the empirical and true Fisher of a network on one "
        "batch: sizes, traces, extreme eigenvalues, condition numbers of F + λI, and the "
        "fraction of |(F + λI)⁻¹| inside the mini-blocks next to the area they cover.",
    )
    _add_problem_options(fisher)
    fisher.add_argument(
        "--kinds",
        type=_csv_list,
        default=["empirical", "exact"],
        help=f"comma-separated Fisher kinds from {', '.join(FISHER_KINDS)} "
        "(default: empirical,exact)",
    )
    fisher.add_argument(
        "--damping", type=_positive_float, default=1e-3, help="λ in F + λI (default: 1e-3)"
    )
    fisher.add_argument(
        "--layers", type=_csv_list, default=None, help="comma-separated module names (default: all)"
    )
    fisher.add_argument(
        "--mc-samples", type=_positive_int, default=1, help="labels drawn per input for kind mc"
    )
    fisher.set_defaults(run=_run_fisher)

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
    _add_problem_options(heatmap)
    heatmap.set_defaults(batch_size=256)
    heatmap.add_argument(
        "--layers",
        type=_csv_list,
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
        type=_positive_int,
        default=6000,
        help="largest layer analysed whole when --layers is not given (default: 6000)",
    )
    heatmap.add_argument(
        "--kinds",
        type=_csv_list,
        default=["empirical", "exact"],
        help=f"comma-separated Fisher kinds from {', '.join(FISHER_KINDS)} "
        "(default: empirical,exact)",
    )
    heatmap.add_argument(
        "--damping",
        type=_positive_float,
        default=1e-3,
        help="λ in (F + λI)⁻¹ (default: 1e-3, as in `fisher`; the paper does not give its value)",
    )
    heatmap.add_argument(
        "--mc-samples", type=_positive_int, default=1, help="labels drawn per input for kind mc"
    )
    heatmap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="SGD-m pretraining epochs (default: 30 for digits, 50 for mnist16 as in the paper, "
        "2 for (fashion-)mnist; 0: the seeded initialization)",
    )
    heatmap.add_argument(
        "--lr", type=_positive_float, default=0.01, help="pretraining learning rate (0.01)"
    )
    heatmap.add_argument(
        "--train-batch-size", type=_positive_int, default=128, help="pretraining minibatch (128)"
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
    heatmap.set_defaults(run=_run_heatmap)
    return parser


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _problem(
    args: argparse.Namespace,
) -> tuple[Dataset, nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Data set, model, loss and one batch, as the options ask."""
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    if not dataset.has_labels:
        raise UsageError(f"--dataset {args.dataset} has no labels; pick a classification set")
    model_name = args.model or DEFAULT_MODEL.get(dataset.name)
    if model_name is None:
        raise UsageError(f"no default model for --dataset {dataset.name}; pass --model")
    torch.manual_seed(args.seed)
    model = build_model(model_name)
    dtype = getattr(torch, args.dtype)
    model = model.to(device=_device(args.device), dtype=dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(dataset.train_x), generator=generator)[: args.batch_size]
    inputs, targets = dataset.train_x[index], dataset.train_y[index]
    try:
        with torch.no_grad():
            model(inputs[:1].to(device=_device(args.device), dtype=dtype))
    except RuntimeError as err:
        raise UsageError(
            f"--model {model_name} does not accept {dataset.name} inputs of shape "
            f"{list(dataset.input_shape)}; choose a model made for this data set"
        ) from err
    return dataset, model, nn.CrossEntropyLoss(), inputs, targets


def _check_layers(model: nn.Module, layers: list[str] | None) -> None:
    available = list(model_layouts(model))
    missing = [name for name in layers or [] if name not in available]
    if missing:
        raise UsageError(
            f"--layers: {', '.join(missing)} not in the model; its layers are "
            f"{', '.join(available)}"
        )


def _versions() -> dict[str, str]:
    import backpack
    import numpy

    return {
        "mbf_analysis": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backpack": getattr(backpack, "__version__", "unknown"),
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
    }


def _save(out: Path | None, name: str, frame: pd.DataFrame, args, timings) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / f"{name}.csv", index=False)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.pop("run", None)
    record = {"command": name, "config": config, "versions": _versions(), "timings_s": timings}
    (out / "run.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / f'{name}.csv'} and {out / 'run.json'}")


def _run_fisher(args: argparse.Namespace) -> None:
    unknown = [k for k in args.kinds if k not in FISHER_KINDS]
    if unknown or not args.kinds:
        raise UsageError(f"--kinds {','.join(args.kinds)}: choose from {', '.join(FISHER_KINDS)}")
    start = time.perf_counter()
    dataset, model, loss_fn, inputs, targets = _problem(args)
    loaded = time.perf_counter()
    _check_layers(model, args.layers)
    frame = fisher_summary(
        model,
        loss_fn,
        inputs,
        targets,
        kinds=args.kinds,
        damping=args.damping,
        layers=args.layers,
        mc_samples=args.mc_samples,
        generator=torch.Generator(device=inputs.device).manual_seed(args.seed),
        progress=True,
    )
    done = time.perf_counter()
    print(
        f"Fisher of {args.model or DEFAULT_MODEL[dataset.name]} on {len(inputs)} {dataset.name} "
        f"samples (λ = {args.damping:g}, {args.dtype}):"
    )
    shown = frame.assign(
        mass_vs_area=frame.miniblock_mass.map("{:.3f}".format)
        + " / "
        + frame.miniblock_area.map("{:.3f}".format)
    ).drop(columns=["miniblock_mass", "miniblock_area"])
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(shown.to_string(index=False))
    _save(
        args.out, "fisher_summary", frame, args, {"load": loaded - start, "fisher": done - loaded}
    )


def _heatmap_subsets(args: argparse.Namespace, model: nn.Module) -> list[ParameterSubset]:
    """Whole layers (``--layers`` or all up to ``--max-dim``) and ``--channels`` subsets."""
    layouts = model_layouts(model)
    if args.layers is None:
        names = [name for name, layout in layouts.items() if layout.dim <= args.max_dim]
        skipped = [f"{name} (d = {layouts[name].dim})" for name in layouts if name not in names]
        if skipped:
            print(f"not analysed whole (over --max-dim {args.max_dim}): {', '.join(skipped)}")
    else:
        _check_layers(model, args.layers)
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


def _run_heatmap(args: argparse.Namespace) -> None:
    unknown = [k for k in args.kinds if k not in FISHER_KINDS]
    if unknown or not args.kinds:
        raise UsageError(f"--kinds {','.join(args.kinds)}: choose from {', '.join(FISHER_KINDS)}")
    if args.epochs is not None and args.epochs < 0:
        raise UsageError(f"--epochs {args.epochs}: must be 0 or more")
    start = time.perf_counter()
    dataset, model, loss_fn, inputs, targets = _problem(args)
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
    device = _device(args.device)
    model = pretrained_model(config, dataset=dataset, cache_dir=args.cache_dir, device=device)
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
    _save(args.out, "heatmap_mass", frame, args, timings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mbf-analyze``; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (UsageError, DataError, MBFError, ValueError) as err:
        message = str(err).replace("\n", " ")
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
