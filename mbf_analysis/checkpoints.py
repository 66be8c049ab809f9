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

Interruption: while :func:`pretrained_model` trains, the unfinished training is kept beside the
checkpoint (``<name>.partial.pt``, :func:`partial_path`) after every epoch and when Ctrl-C or
SIGTERM stops it after the step in progress; the next call with the same configuration
continues from there, so a stopped pretraining loses at most its step in progress (a SIGKILL,
at most its epoch in progress).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mbf_analysis.data import Dataset, load_dataset
from mbf_analysis.datafiles import CACHE_ENV_VAR
from mbf_analysis.errors import ConfigError, MBFError, NonFiniteError
from mbf_analysis.files import atomic_save
from mbf_analysis.models import build_model
from mbf_analysis.stopping import stop_requests

__all__ = [
    "CACHE_ENV_VAR",
    "CorruptCheckpointError",
    "TrainConfig",
    "checkpoint_path",
    "default_checkpoint_dir",
    "load_checkpoint",
    "partial_path",
    "pretrained_model",
    "save_checkpoint",
    "train_model",
]

logger = logging.getLogger(__name__)


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
            raise ConfigError(f"epochs must be non-negative, got {self.epochs}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size}.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum}.")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}.")

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


def partial_path(path: str | Path) -> Path:
    """Where the unfinished training of the checkpoint ``path`` is kept: ``<name>.partial.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial.pt")


def train_model(
    config: TrainConfig,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    partial: str | Path | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train a freshly seeded network with SGD-m on the training split (module docstring).

    With ``partial``, the training is kept there while it runs: after every epoch, and when
    Ctrl-C or SIGTERM stops it after the step in progress (:mod:`mbf_analysis.stopping`). A
    later call with the same ``partial`` and configuration continues from it and gives the
    weights of an uninterrupted run (bit for bit on CPU with one thread); the file is deleted
    once the training ends. A file that cannot be read, or holds another configuration, is
    ignored with a warning.

    Args:
        config: What to train.
        dataset: The training data; ``dataset.name`` must equal ``config.dataset``.
        device: Where to train.
        progress: Show a tqdm bar over the epochs (with the running epoch loss).
        partial: The file of the unfinished training (:func:`partial_path`), or ``None``.

    Returns:
        The model in eval mode, and the mean minibatch loss of every epoch (``[epochs]``).

    Raises:
        ValueError: If the data set is not the configured one or has no labels.
        NonFiniteError: If the epoch loss becomes NaN or Inf (lower the lr).
        StopRequested: After Ctrl-C or SIGTERM, once the step in progress is done and
            ``partial`` (if given) is saved.
    """
    if dataset.name != config.dataset:
        raise ConfigError(f"config is for dataset {config.dataset!r}, got {dataset.name!r}.")
    if not dataset.has_labels:
        raise ConfigError(f"dataset {dataset.name!r} has no labels to train a classifier on.")
    model = _build(config, device).train()
    inputs = dataset.train_x.to(device=device, dtype=config.torch_dtype)
    targets = dataset.train_y.to(device)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    state = _Progress(model, config, device)
    if partial is not None:
        state.restore(Path(partial))
    bar = tqdm(
        total=config.epochs,
        initial=state.epoch,
        desc=f"training {config.model}",
        disable=not progress,
    )
    with stop_requests() as stop, bar:
        while state.epoch < config.epochs:
            if state.order is None:
                state.order = torch.randperm(len(inputs), generator=state.generator).to(device)
                state.batch, state.total = (
                    0,
                    torch.zeros((), device=device, dtype=config.torch_dtype),
                )
            batches = state.order.split(config.batch_size)
            while state.batch < len(batches):
                batch = batches[state.batch]
                loss = loss_fn(model(inputs[batch]), targets[batch])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    torch._foreach_mul_(state.buffers, config.momentum)
                    torch._foreach_add_(state.buffers, grads)
                    torch._foreach_add_(params, state.buffers, alpha=-config.lr)
                state.total += loss.detach() * len(batch)
                state.batch += 1
                if stop.requested:
                    if partial is not None:
                        state.save(Path(partial))
                    stop.check()
            state.history.append(float(state.total) / len(inputs))
            state.epoch, state.order = state.epoch + 1, None
            if not math.isfinite(state.history[-1]):
                raise NonFiniteError(
                    f"training loss became {state.history[-1]} in epoch {state.epoch}; lower the "
                    f"lr (now {config.lr:g})."
                )
            bar.update()
            bar.set_postfix(loss=f"{state.history[-1]:.4f}")
            if partial is not None and state.epoch < config.epochs:
                state.save(Path(partial))
    history = state.history
    if history:
        logger.info(
            "trained %s on %s for %d epochs: final training loss %.4f",
            config.model,
            config.dataset,
            config.epochs,
            history[-1],
        )
    return model.eval(), history


class _Progress:
    """Where :func:`train_model` stands: the epoch and batch reached, the epoch's order and
    summed loss, the momentum buffers, the batch generator and the epoch losses; saved to and
    restored from the ``partial`` file with the model's weights."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device | str) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.buffers = [torch.zeros_like(p) for p in model.parameters()]
        self.generator = torch.Generator().manual_seed(config.seed)
        self.history: list[float] = []
        self.epoch = 0
        self.batch = 0
        self.order: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def save(self, path: Path) -> None:
        atomic_save(
            {
                "format": _FORMAT_VERSION,
                "config": asdict(self.config),
                "state_dict": self.model.state_dict(),
                "buffers": self.buffers,
                "generator": self.generator.get_state(),
                "history": self.history,
                "epoch": self.epoch,
                "batch": self.batch,
                "order": self.order,
                "total": self.total,
            },
            path,
        )
        logger.info("kept the unfinished training in %s (epoch %d)", path, self.epoch)

    def restore(self, path: Path) -> None:
        if not path.is_file():
            return
        try:
            saved = torch.load(path, map_location=self.device, weights_only=True)
            if saved.get("format") != _FORMAT_VERSION or saved.get("config") != asdict(self.config):
                raise ConfigError(f"holds another configuration: {saved.get('config')}")
            self.model.load_state_dict(saved["state_dict"])
            buffers = [b.to(self.device) for b in saved["buffers"]]
            if [b.shape for b in buffers] != [b.shape for b in self.buffers]:
                raise ConfigError("its momentum buffers do not fit the model")
            self.buffers = buffers
            self.generator.set_state(saved["generator"])
        except Exception as err:  # a damaged file can fail in many ways
            logger.warning("%s: not a usable unfinished training (%s); starting anew", path, err)
            self.model.load_state_dict(_build(self.config, self.device).state_dict())
            return
        self.history = [float(v) for v in saved["history"]]
        self.epoch, self.batch = int(saved["epoch"]), int(saved["batch"])
        self.order, self.total = saved["order"], saved["total"]
        logger.warning(
            "continuing the unfinished training in %s at epoch %d, batch %d",
            path,
            self.epoch,
            self.batch,
        )


def save_checkpoint(
    path: str | Path, config: TrainConfig, model: nn.Module, history: list[float]
) -> None:
    """Write ``{config, state_dict (CPU), history}`` atomically
    (:func:`~mbf_analysis.files.atomic_save`)."""
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
    partial = partial_path(path)
    model, history = train_model(config, dataset, device=device, progress=progress, partial=partial)
    save_checkpoint(path, config, model, history)
    partial.unlink(missing_ok=True)
    logger.info("cached %s", path)
    return model
