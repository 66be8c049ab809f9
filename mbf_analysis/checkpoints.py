"""Pretrained networks for the analyses: train once with SGD-m, cache on disk, load afterwards.

The paper analyses networks that are *partially trained* with SGD with momentum (METHODS.md §5:
"50 epochs SGD-m" for the MLP on 16×16 MNIST). :func:`pretrained_model` trains such a network
the first time a :class:`TrainConfig` is asked for and caches the weights; later calls with the
same configuration load them.

Training (:func:`train_model`): the mean cross-entropy ``L = (1/m) Σ_n ℓ_n`` over minibatches of
``m = batch_size`` samples drawn without replacement (a fresh permutation per epoch; the last,
smaller batch is kept) and SGD with heavy-ball momentum in the convention of ``torch.optim.SGD``
(dampening 0, no Nesterov): ``m ← μ m + g`` (``m = g`` at the first step), ``θ ← θ − α m``; no
weight decay, no schedule. The update is written out with ``torch._foreach_*`` rather than taken
from ``torch.optim``, whose first step imports TorchDynamo (seconds per process). The seed fixes
the initial weights (``torch.manual_seed`` before :func:`mbf_analysis.models.build_model`) and the
order of the minibatches.

Cache: one file ``<model>-<dataset>-<key>.pt`` per configuration in
:func:`default_checkpoint_dir` (``$MBF_CACHE_DIR/checkpoints``, by default
``~/.cache/mbf_analysis/checkpoints``), where ``key`` is the first 16 hex digits of the SHA-256 of
the configuration (model, dataset, epochs, lr, batch size, momentum, seed, dtype) as sorted JSON.
Writes are atomic: the checkpoint goes to a temporary file in the same folder, which is renamed
over the final name only when complete, so an interrupted run never leaves a partial file.
A cached file that cannot be read, or that holds another configuration, is **retrained with a
warning** and overwritten (:func:`load_checkpoint` itself raises :class:`CorruptCheckpointError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mbf_analysis.data import Dataset, load_dataset
from mbf_analysis.errors import MBFError, NonFiniteError
from mbf_analysis.models import build_model

__all__ = [
    "CACHE_ENV_VAR",
    "CorruptCheckpointError",
    "atomic_save",
    "TrainConfig",
    "checkpoint_path",
    "default_checkpoint_dir",
    "load_checkpoint",
    "pretrained_model",
    "save_checkpoint",
    "train_model",
]

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "MBF_CACHE_DIR"
"""Environment variable replacing ``~/.cache/mbf_analysis`` as the root of the checkpoint cache."""

_FORMAT_VERSION = 1
_DTYPES = ("float32", "float64")


class CorruptCheckpointError(MBFError, ValueError):
    """A cached checkpoint cannot be read or does not hold the configuration asked for."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What identifies a pretrained network (every field enters the cache key).

    Attributes:
        model: Name for :func:`mbf_analysis.models.build_model`, e.g. ``"paper-mlp"``.
        dataset: Name for :func:`mbf_analysis.data.load_dataset`, e.g. ``"mnist16"``.
        epochs: Passes over the training split (``0``: the seeded initialization).
        lr: Learning rate ``α`` of SGD.
        batch_size: Minibatch size ``m``.
        momentum: ``μ`` of SGD (0.9 as in the paper).
        seed: Seed of the initialization and of the minibatch order.
        dtype: ``"float32"`` or ``"float64"``, the precision of training.
    """

    model: str
    dataset: str
    epochs: int
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be non-negative, got {self.epochs}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}.")

    @property
    def key(self) -> str:
        """First 16 hex digits of the SHA-256 of the configuration as sorted JSON."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by :attr:`dtype`."""
        return getattr(torch, self.dtype)


def default_checkpoint_dir() -> Path:
    """``$MBF_CACHE_DIR/checkpoints`` if the variable is set, else
    ``~/.cache/mbf_analysis/checkpoints``."""
    root = os.environ.get(CACHE_ENV_VAR) or str(Path.home() / ".cache" / "mbf_analysis")
    return Path(root).expanduser() / "checkpoints"


def checkpoint_path(config: TrainConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the checkpoint of ``config`` is cached: ``<cache_dir>/<model>-<dataset>-<key>.pt``."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_checkpoint_dir()
    return folder / f"{config.model}-{config.dataset}-{config.key}.pt"


def _build(config: TrainConfig, device: torch.device | str) -> nn.Module:
    torch.manual_seed(config.seed)
    return build_model(config.model).to(device=device, dtype=config.torch_dtype)


def train_model(
    config: TrainConfig,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, list[float]]:
    """Train a freshly seeded network with SGD-m on the training split (module docstring).

    Args:
        config: What to train.
        dataset: The training data; ``dataset.name`` must equal ``config.dataset``.
        device: Where to train.
        progress: Show a tqdm bar over the epochs (with the running epoch loss).

    Returns:
        The model in eval mode, and the mean minibatch loss of every epoch (``[epochs]``).

    Raises:
        ValueError: If the data set is not the configured one or has no labels.
        NonFiniteError: If the epoch loss becomes NaN or Inf (lower the lr).
    """
    if dataset.name != config.dataset:
        raise ValueError(f"config is for dataset {config.dataset!r}, got {dataset.name!r}.")
    if not dataset.has_labels:
        raise ValueError(f"dataset {dataset.name!r} has no labels to train a classifier on.")
    model = _build(config, device).train()
    inputs = dataset.train_x.to(device=device, dtype=config.torch_dtype)
    targets = dataset.train_y.to(device)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    buffers = [torch.zeros_like(p) for p in params]
    generator = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    bar = tqdm(range(config.epochs), desc=f"training {config.model}", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(inputs), generator=generator).to(device)
        total = torch.zeros((), device=device, dtype=config.torch_dtype)
        for batch in order.split(config.batch_size):
            loss = loss_fn(model(inputs[batch]), targets[batch])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                torch._foreach_mul_(buffers, config.momentum)
                torch._foreach_add_(buffers, grads)
                torch._foreach_add_(params, buffers, alpha=-config.lr)
            total += loss.detach() * len(batch)
        history.append(float(total) / len(inputs))
        if not math.isfinite(history[-1]):
            raise NonFiniteError(
                f"training loss became {history[-1]} in epoch {epoch + 1}; lower the lr "
                f"(now {config.lr:g})."
            )
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    if history:
        logger.info(
            "trained %s on %s for %d epochs: final training loss %.4f",
            config.model,
            config.dataset,
            config.epochs,
            history[-1],
        )
    return model.eval(), history


def atomic_save(payload: Any, path: str | Path) -> None:
    """``torch.save(payload)`` to ``path`` atomically: a temporary file in the same folder,
    flushed to disk, then renamed over ``path``, so an interrupted write never leaves a partial
    file (and a previous version stays intact until the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o644)  # mkstemp creates the file private (0600)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path, config: TrainConfig, model: nn.Module, history: list[float]
) -> None:
    """Write ``{config, state_dict (CPU), history}`` atomically (:func:`atomic_save`)."""
    payload = {
        "format": _FORMAT_VERSION,
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "history": list(history),
        "torch": str(torch.__version__),
    }
    atomic_save(payload, path)


def load_checkpoint(
    path: str | Path, config: TrainConfig, *, device: torch.device | str = "cpu"
) -> tuple[nn.Module, list[float]]:
    """Load a checkpoint written by :func:`save_checkpoint` for ``config``.

    Returns:
        The model (in ``config.dtype``, on ``device``, eval mode) and its epoch losses.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CorruptCheckpointError: If the file cannot be unpickled, lacks fields, holds another
            configuration, or its weights do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle can raise nearly any exception type
        raise CorruptCheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT_VERSION:
        raise CorruptCheckpointError(f"{path}: not a checkpoint of format {_FORMAT_VERSION}")
    if payload.get("config") != asdict(config):
        raise CorruptCheckpointError(
            f"{path}: holds configuration {payload.get('config')}, expected {asdict(config)}"
        )
    model = _build(config, device)
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise CorruptCheckpointError(f"{path}: weights do not fit {config.model}: {err}") from err
    return model.eval(), [float(v) for v in payload.get("history", [])]


def pretrained_model(
    config: TrainConfig,
    *,
    dataset: Dataset | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """The network of ``config``: loaded from the cache, else trained and cached.

    A cached file that is corrupt or holds another configuration is retrained with a warning
    and replaced.

    Args:
        config: What to train.
        dataset: The data set, if already loaded (else :func:`load_dataset` reads it, only when
            training is needed).
        data_dir: Where :func:`load_dataset` looks for the files.
        cache_dir: Folder of the cache (default: :func:`default_checkpoint_dir`).
        device: Where the returned model lives (and where training runs).
        progress: Show a progress bar while training.

    Returns:
        The model in eval mode, in ``config.dtype``.
    """
    path = checkpoint_path(config, cache_dir)
    if path.is_file():
        try:
            model, history = load_checkpoint(path, config, device=device)
        except CorruptCheckpointError as err:
            logger.warning("%s; retraining and overwriting it", err)
        else:
            final = f"{history[-1]:.4f}" if history else "n/a"
            logger.info("loaded %s (final training loss %s)", path, final)
            return model
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir)
    model, history = train_model(config, dataset, device=device, progress=progress)
    save_checkpoint(path, config, model, history)
    logger.info("cached %s", path)
    return model
