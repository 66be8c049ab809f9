"""Pretraining for the analyses (``fisher``, ``heatmap``): the options and the cached SGD-m run
of :func:`mbf_analysis.checkpoints.pretrained_model`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mbf_analysis.cli.common import positive_float, positive_int

if TYPE_CHECKING:
    from torch import nn

    from mbf_analysis.data import Dataset

__all__ = ["add_pretraining", "pretrain"]


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
