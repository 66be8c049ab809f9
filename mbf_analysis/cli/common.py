"""What every ``mbf-analyze`` subcommand shares: the usage error, option parsers, the options
every subcommand has, and data and model loading.

Everything at module level here is light (argparse and the torch-free
:mod:`~mbf_analysis.cli.choices` and :mod:`~mbf_analysis.datafiles`): building the parser,
``--help``, an argument error and a missing data file never import torch. The functions that
need torch import it when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from mbf_analysis.cli.choices import (
    ACTIVATIONS,
    COARSE_SPACES,
    DATASETS,
    FISHER_KINDS,
    MODELS,
    TWO_LEVEL_VARIANT,
)
from mbf_analysis.datafiles import get_dataset_spec, locate
from mbf_analysis.fisher_kinds import OLD_SPELLINGS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mbf_analysis.data import Dataset

DEFAULT_MODEL = {
    "digits": "digits-mlp",
    "mnist16": "paper-mlp",
    "mnist": "simple-cnn",
    "fashion-mnist": "simple-cnn",
}
"""The network each classification data set gets when ``--model`` is not given."""


class UsageError(Exception):
    """A command-line value that cannot work; reported in one line with exit code 2."""


def stop_line(err: KeyboardInterrupt, what: str) -> str:
    """The one line that ends a stopped run: ``mbf-analyze: interrupted: WHAT`` after Ctrl-C,
    ``mbf-analyze: terminated: WHAT`` after SIGTERM; WHAT says where it stopped and how to
    continue."""
    import signal

    from mbf_analysis.stopping import exit_code

    word = "terminated" if exit_code(err) == 128 + signal.SIGTERM else "interrupted"
    return f"\nmbf-analyze: {word}: {what}"


def exit_stopped(err: KeyboardInterrupt, what: str) -> NoReturn:
    """Print :func:`stop_line` and exit ``128 + signal`` (130 after Ctrl-C, 143 after
    SIGTERM)."""
    from mbf_analysis.stopping import exit_code

    print(stop_line(err, what))
    raise SystemExit(exit_code(err)) from None


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_code_activation(parser: argparse.ArgumentParser) -> None:
    """``--code-activation``: an activation after an autoencoder's code layer."""
    parser.add_argument(
        "--code-activation",
        choices=ACTIVATIONS,
        default=None,
        help="an activation after the autoencoder's code layer (relu: the network of the KPSVD "
        "and two-level KFAC papers' code; default: none, a linear code as in Hinton & "
        "Salakhutdinov)",
    )


def fisher_kind(text: str) -> str:
    """An argparse type: a Fisher kind (:mod:`mbf_analysis.fisher_kinds`); an old spelling
    (``true``) is read as today's word with a one-line deprecation note on stderr."""
    word = text.strip().lower()
    if word in OLD_SPELLINGS:
        new = OLD_SPELLINGS[word]
        print(
            f"mbf-analyze: note: '{text}' is deprecated as a Fisher kind; it is read as '{new}' "
            f"(Monte-Carlo Fisher: labels sampled from the model). Write '{new}'.",
            file=sys.stderr,
        )
        return new
    return word


def coarse_list(text: str) -> list[str]:
    """An argparse type: comma-separated coarse spaces of two-level KFAC, each once."""
    names = csv_list(text)
    unknown = [n for n in names if n not in COARSE_SPACES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid choice {','.join(unknown) or text!r} "
            f"(choose from {', '.join(COARSE_SPACES)}, comma-separated)"
        )
    return list(dict.fromkeys(names))


def expand_coarse(names: list[str], coarse: list[str]) -> list[str]:
    """``kfac-two-level`` in ``names`` replaced by one ``kfac-two-level-<coarse>`` per coarse
    space (:data:`~mbf_analysis.cli.choices.TWO_LEVEL_VARIANTS`), each name once."""
    expanded = []
    for name in names:
        if name == "kfac-two-level":
            expanded += [TWO_LEVEL_VARIANT.format(coarse=space) for space in coarse]
        else:
            expanded.append(name)
    return list(dict.fromkeys(expanded))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
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


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's intra-op threads (the wait policy is set in ``main``)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: torch's choice, the number of cores); "
        "OMP_WAIT_POLICY is PASSIVE unless you set it",
    )


def add_out(parser: argparse.ArgumentParser, *, resumable: bool, default: str) -> None:
    """``--out`` and ``--overwrite`` (and ``--resume`` for subcommands that can resume)."""
    parser.add_argument("--out", type=Path, default=None, help=f"output folder ({default})")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its files are deleted first)",
    )
    if resumable:
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue the run saved in --out with its saved settings (needs only --out)",
        )


def add_fisher_kinds(parser: argparse.ArgumentParser) -> None:
    """``--kinds`` (which Fisher matrices) and ``--mc-samples`` (labels per input for ``mc``)."""
    parser.add_argument(
        "--kinds",
        type=csv_list,
        default=["empirical", "exact"],
        help=f"comma-separated Fisher kinds from {', '.join(FISHER_KINDS)}: empirical (EFM), "
        "exact (the true Fisher in closed form) and mc (Monte-Carlo: the true Fisher from "
        "labels sampled from the model) (default: empirical,exact)",
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
        choices=DATASETS,
        help="data set (default: digits, embedded, works offline)",
    )
    add_data_dir(parser)
    parser.add_argument(
        "--model",
        default=None,
        choices=MODELS,
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
    add_threads(parser)


def require_data(name: str, data_dir: Path | None, download: bool) -> Path | None:
    """Check that data set ``name`` is on disk (or fetch it with ``download``) before torch is
    imported; a missing file is a one-line error that names the CLI's options.

    Returns:
        The folder holding the files (absolute), or ``None`` for the embedded data set, so that a
        resumed run finds its data without ``--data-dir``.
    """
    paths = locate(get_dataset_spec(name).name, data_dir, download=download, interface="cli")
    if not paths:
        return None
    return next(iter(paths.values())).parent.resolve()


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def parse_device(name: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def dataset_and_model(
    args: argparse.Namespace, check: Callable[[nn.Module], object] | None = None
) -> tuple[Dataset, str, nn.Module]:
    """The labelled data set and the seeded model (on ``--device``, in ``--dtype``, eval mode)
    that the options ask for, checked to accept the data's inputs. ``check(model)`` (e.g. the
    layer names) runs on the built model before the data is loaded, so that a mistake is
    reported before the wait."""
    import torch

    from mbf_analysis.data import load_dataset
    from mbf_analysis.models import build_model

    model_name = args.model or DEFAULT_MODEL.get(args.dataset)
    if model_name is None:
        raise UsageError(f"no default model for --dataset {args.dataset}; pass --model")
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    target = parse_device(args.device)
    model = build_model(model_name).to(device=target, dtype=dtype).eval()
    if check is not None:
        check(model)
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    if not dataset.has_labels:
        raise UsageError(f"--dataset {args.dataset} has no labels; pick a classification set")
    try:
        with torch.no_grad():
            model(dataset.train_x[:1].to(device=target, dtype=dtype))
    except RuntimeError as err:
        raise UsageError(
            f"--model {model_name} does not accept {dataset.name} inputs of shape "
            f"{list(dataset.input_shape)}; choose a model made for this data set"
        ) from err
    return dataset, model_name, model


def batch_of(dataset: Dataset, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` training samples drawn without replacement by a generator seeded with
    ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset.train_x), generator=generator)[:batch_size]
    return dataset.train_x[index], dataset.train_y[index]


def check_layers(model: nn.Module, layers: list[str] | None) -> None:
    from mbf_analysis.layout import model_layouts

    available = list(model_layouts(model))
    missing = [name for name in layers or [] if name not in available]
    if missing:
        raise UsageError(
            f"--layers: {', '.join(missing)} not in the model; its layers are "
            f"{', '.join(available)}"
        )


def config_of(args: argparse.Namespace) -> dict[str, object]:
    """The parsed options as JSON-able values (paths as strings, the ``run`` hook dropped)."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.pop("run", None)
    return config
