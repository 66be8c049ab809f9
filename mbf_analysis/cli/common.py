"""What every ``mbf-analyze`` subcommand shares: the problem options, data and model loading,
option parsers, the usage error and the ``run.json`` record."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from mbf_analysis import __version__
from mbf_analysis.curvature import FISHER_KINDS
from mbf_analysis.data import Dataset, dataset_names, load_dataset
from mbf_analysis.layout import model_layouts
from mbf_analysis.models import build_model, model_names

DEFAULT_MODEL = {
    "digits": "digits-mlp",
    "mnist16": "paper-mlp",
    "mnist": "simple-cnn",
    "fashion-mnist": "simple-cnn",
}
"""The network each classification data set gets when ``--model`` is not given."""


class UsageError(Exception):
    """A command-line value that cannot work; reported in one line with exit code 2."""


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``: where :func:`~mbf_analysis.data.load_dataset` looks first."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the data files (else $MBF_DATA_DIR, else ~/.cache/mbf_analysis)",
    )


def add_download(parser: argparse.ArgumentParser) -> None:
    """``--download``: fetch missing data files (network needed)."""
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch missing data files from their canonical URLs (needs network)",
    )


def add_fisher_kinds(parser: argparse.ArgumentParser) -> None:
    """``--kinds`` (which Fisher matrices) and ``--mc-samples`` (labels per input for ``mc``)."""
    parser.add_argument(
        "--kinds",
        type=csv_list,
        default=["empirical", "exact"],
        help=f"comma-separated Fisher kinds from {', '.join(FISHER_KINDS)} "
        "(default: empirical,exact)",
    )
    parser.add_argument(
        "--mc-samples", type=positive_int, default=1, help="labels drawn per input for kind mc"
    )


def check_kinds(kinds: list[str]) -> None:
    """Refuse an empty ``--kinds`` or one naming an unknown Fisher kind."""
    unknown = [k for k in kinds if k not in FISHER_KINDS]
    if unknown or not kinds:
        raise UsageError(f"--kinds {','.join(kinds)}: choose from {', '.join(FISHER_KINDS)}")


def add_problem_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=dataset_names(),
        help="data set (default: digits, embedded, works offline)",
    )
    add_data_dir(parser)
    parser.add_argument(
        "--model",
        default=None,
        choices=model_names(),
        help="network (default: digits-mlp for digits, paper-mlp for mnist16, "
        "simple-cnn for (fashion-)mnist)",
    )
    add_download(parser)
    parser.add_argument("--batch-size", type=positive_int, default=512, help="samples used")
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


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def dataset_and_model(args: argparse.Namespace) -> tuple[Dataset, str, nn.Module]:
    """The labelled data set and the seeded model (on ``--device``, in ``--dtype``, eval mode)
    that the options ask for, checked to accept the data's inputs."""
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    if not dataset.has_labels:
        raise UsageError(f"--dataset {args.dataset} has no labels; pick a classification set")
    model_name = args.model or DEFAULT_MODEL.get(dataset.name)
    if model_name is None:
        raise UsageError(f"no default model for --dataset {dataset.name}; pass --model")
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    target = parse_device(args.device)
    model = build_model(model_name).to(device=target, dtype=dtype).eval()
    try:
        with torch.no_grad():
            model(dataset.train_x[:1].to(device=target, dtype=dtype))
    except RuntimeError as err:
        raise UsageError(
            f"--model {model_name} does not accept {dataset.name} inputs of shape "
            f"{list(dataset.input_shape)}; choose a model made for this data set"
        ) from err
    return dataset, model_name, model


def problem(
    args: argparse.Namespace,
) -> tuple[Dataset, nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Data set, model, loss and one batch of ``--batch-size`` samples (seeded by ``--seed``)."""
    dataset, _, model = dataset_and_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(dataset.train_x), generator=generator)[: args.batch_size]
    return dataset, model, nn.CrossEntropyLoss(), dataset.train_x[index], dataset.train_y[index]


def check_layers(model: nn.Module, layers: list[str] | None) -> None:
    available = list(model_layouts(model))
    missing = [name for name in layers or [] if name not in available]
    if missing:
        raise UsageError(
            f"--layers: {', '.join(missing)} not in the model; its layers are "
            f"{', '.join(available)}"
        )


def versions() -> dict[str, str]:
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


def save_run(out: Path | None, name: str, frame: pd.DataFrame, args, timings) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / f"{name}.csv", index=False)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.pop("run", None)
    record = {"command": name, "config": config, "versions": versions(), "timings_s": timings}
    (out / "run.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / f'{name}.csv'} and {out / 'run.json'}")
