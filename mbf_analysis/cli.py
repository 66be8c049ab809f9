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
from mbf_analysis.analysis import fisher_summary
from mbf_analysis.curvature import FISHER_KINDS
from mbf_analysis.data import DataError, Dataset, dataset_names, load_dataset
from mbf_analysis.errors import MBFError
from mbf_analysis.layout import model_layouts
from mbf_analysis.models import build_model, model_names

__all__ = ["main", "build_parser"]

log = logging.getLogger("mbf_analysis")

DEFAULT_MODEL = {
    "digits": "digits-mlp",
    "mnist16": "paper-mlp",
    "mnist": "simple-cnn",
    "fashion-mnist": "simple-cnn",
}


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
