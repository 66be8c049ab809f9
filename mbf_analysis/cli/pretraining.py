"""Pretraining for the analyses (``fisher``, ``heatmap``): the options, the cached SGD-m run of
:func:`mbf_analysis.checkpoints.pretrained_model`, and what happens when it is stopped.

Ctrl-C or SIGTERM during the pretraining stops it after the step in progress and keeps it in
the cache (:func:`~mbf_analysis.checkpoints.partial_path`); with ``--out`` the folder's
``run.json`` says ``interrupted`` and ``--resume --out DIR`` continues with the saved options
(without ``--out``, the same command again continues it). Exit code 130 (SIGINT) or 143
(SIGTERM)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from mbf_analysis.cli.common import UsageError, config_of, positive_float, positive_int
from mbf_analysis.cli.run_folder import RunFolder

if TYPE_CHECKING:
    from torch import nn

    from mbf_analysis.data import Dataset

__all__ = ["add_pretraining", "claim_folder", "pretrain", "stopped"]

_KEPT_ON_RESUME = ("out", "resume", "overwrite", "threads", "run")
"""Options a ``--resume`` takes from its own command line rather than from the saved run."""

_PATHS = ("data_dir", "cache_dir")
"""Saved options that are paths."""


def add_pretraining(
    parser: argparse.ArgumentParser, *, epochs_type: Callable[[str], int], default_epochs: str
) -> None:
    """``--epochs``, ``--lr``, ``--train-batch-size``, ``--train-dtype``, ``--cache-dir``."""
    parser.add_argument(
        "--epochs",
        type=epochs_type,
        default=None,
        help=f"SGD-m pretraining epochs, cached (default: {default_epochs}; 0: the seeded "
        "initialization)",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=0.01, help="pretraining learning rate (0.01)"
    )
    parser.add_argument(
        "--train-batch-size", type=positive_int, default=128, help="pretraining minibatch (128)"
    )
    parser.add_argument(
        "--train-dtype",
        default="float32",
        choices=["float32", "float64"],
        help="precision of pretraining (default: float32)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="checkpoint cache (default: $MBF_CACHE_DIR/checkpoints, else "
        "~/.cache/mbf_analysis/checkpoints)",
    )


def pretrain(
    args: argparse.Namespace, dataset: Dataset, model_name: str, model: nn.Module, *, epochs: int
) -> tuple[nn.Module, str]:
    """The network after ``epochs`` of cached SGD-m (``model`` itself when ``epochs == 0``),
    on ``--device`` in ``--dtype``, eval mode, and a phrase saying which it is."""
    import torch

    from mbf_analysis.checkpoints import TrainConfig, checkpoint_path, pretrained_model
    from mbf_analysis.cli.common import parse_device

    if epochs == 0:
        return model, "untrained, seeded initialization"
    config = TrainConfig(
        model=model_name,
        dataset=dataset.name,
        epochs=epochs,
        lr=args.lr,
        batch_size=args.train_batch_size,
        seed=args.seed,
        dtype=args.train_dtype,
    )
    target = parse_device(args.device)
    trained = pretrained_model(config, dataset=dataset, cache_dir=args.cache_dir, device=target)
    trained = trained.to(dtype=getattr(torch, args.dtype)).eval()
    name = checkpoint_path(config, args.cache_dir).name
    return trained, f"after {epochs} epochs of SGD-m, lr {args.lr:g}, checkpoint {name}"


def claim_folder(
    args: argparse.Namespace, command: str, outputs: Iterable[str]
) -> RunFolder | None:
    """The ``--out`` folder of ``fisher``/``heatmap`` (``None`` without ``--out``), claimed; on
    ``--resume`` the saved options of its interrupted run are put back into ``args``.

    Raises:
        UsageError: ``--resume`` without ``--out``, or of a folder whose run is complete (or
            any refusal of :meth:`RunFolder.claim`).
    """
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out, the folder of the run to continue")
    if args.out is None:
        return None
    folder = RunFolder(args.out, command, outputs, resumable=True, extendable=False)
    record = folder.claim(resume=args.resume, overwrite=args.overwrite)
    if record is None:
        return folder
    if record.get("status") == "complete":
        raise UsageError(
            f"--resume: the run in {folder.path} is complete; pass --overwrite to redo it"
        )
    for key, value in record.get("settings", {}).items():
        if key in vars(args) and key not in _KEPT_ON_RESUME:
            setattr(args, key, Path(value) if key in _PATHS and value is not None else value)
    print(f"resuming {folder.path} with its saved options")
    return folder


def stopped(
    err: KeyboardInterrupt, args: argparse.Namespace, folder: RunFolder | None, command: str
) -> NoReturn:
    """End a run whose pretraining was stopped (module docstring): record it, say how to
    continue, and exit ``128 + signal``."""
    from mbf_analysis.cli.common import exit_stopped
    from mbf_analysis.stopping import StopRequested

    if folder is not None:
        folder.write_record(
            {"status": "interrupted", "stage": "pretraining", "settings": config_of(args)}
        )
        how = f"mbf-analyze {command} --resume --out {folder.path}"
    else:
        how = "the same command again"
    what = "stopped after the step in progress" if isinstance(err, StopRequested) else "aborted"
    exit_stopped(err, f"pretraining {what}, kept in the checkpoint cache; continue with: {how}")
