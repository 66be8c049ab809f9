"""Checkpoints of one training run: everything it needs to continue identically.

A checkpoint of run ``R`` is the file ``<folder>/<R>.pt`` (:func:`torch.save` of a dict of
tensors and plain values, read back with ``weights_only=True``), holding

- ``format``, ``run`` and ``settings``: the run's identity and the settings that shape its
  trajectory (:data:`TRAJECTORY_SETTINGS`); a resume with other values is refused, naming them;
- ``model`` and ``optimizer``: the model's and the optimizer's ``state_dict`` (for every
  optimizer the toolkit builds, the generic front-end included; the learning rate follows from
  the epoch through the preset's schedule, which is reapplied at every epoch start);
- ``position``: ``step``, ``epoch``, ``batch`` (batches of the epoch done), ``seen`` (samples
  seen), ``order`` (the epoch's permutation of the training set) and ``log_rows`` (rows of the
  run in the log when the checkpoint was taken);
- ``rng``: every random generator the run draws from: batch order and augmentation, sampled
  labels, and torch's global generators (CPU and CUDA; dropout);
- ``clock``: the training time so far (wall and process seconds) and the warm start's;
- ``status``: ``None`` while the run goes on; the reason it ended (``"epochs"``,
  ``"max_steps"``, ``"time_budget"``, ``"diverged"``) for the checkpoint taken at its end.

The files are a :class:`~mbf_analysis.state_file.StateFile`: writes are atomic and the previous
checkpoint is kept as ``<R>.prev.pt`` until the next one is complete, so a crash while writing,
or a file damaged afterwards, falls back to the last good one (with a warning; the damaged file
is kept as ``<R>.corrupt.pt`` and the good one becomes the latest again); a finished run keeps
its final checkpoint only. A file that cannot be read, or is not a checkpoint of this format, is
refused with a message that names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mbf_analysis.errors import MBFError
from mbf_analysis.state_file import StateFile, StateFileError

__all__ = [
    "FORMAT",
    "TRAJECTORY_SETTINGS",
    "CheckpointError",
    "checkpoint_file",
    "checkpoint_files",
    "drop_previous",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = 1

TRAJECTORY_SETTINGS = (
    "problem",
    "code_activation",
    "optimizer",
    "seed",
    "batch_size",
    "lr",
    "damping",
    "weight_decay",
    "dtype",
    "device_type",
    "eval_samples",
    "world_size",
)
"""Settings that change the steps a run takes; a resume must keep every one of them. Limits
(epochs, steps, budget) and the clock may change, so that a finished run can be extended."""


class CheckpointError(MBFError, ValueError):
    """A checkpoint that cannot be used: unreadable, foreign, or saved with other settings."""


def checkpoint_file(folder: str | Path, run: str) -> StateFile:
    """The run's checkpoints: ``<folder>/<run>.pt`` and the previous ``<folder>/<run>.prev.pt``."""
    return StateFile(Path(folder) / f"{run}.pt")


def checkpoint_files(folder: str | Path, run: str) -> tuple[Path, Path]:
    """``(latest, previous)``: ``<folder>/<run>.pt`` and ``<folder>/<run>.prev.pt``."""
    state = checkpoint_file(folder, run)
    return state.path, state.previous


def save_checkpoint(folder: str | Path, run: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as the run's latest checkpoint, keeping the one before it.

    Returns:
        The path written.
    """
    state = checkpoint_file(folder, run)
    state.save({"format": FORMAT, "run": run, **payload})
    return state.path


def drop_previous(folder: str | Path, run: str) -> None:
    """Delete the run's previous checkpoint (once its final one is written, the previous one
    only doubles the disk space a finished run takes)."""
    checkpoint_file(folder, run).drop_previous()


def _check(payload: Any, run: str) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"not a training checkpoint of format {FORMAT}")
    if payload.get("run") != run:
        raise CheckpointError(f"it holds run {payload.get('run')!r}, not {run!r}")


def load_checkpoint(
    folder: str | Path, run: str, settings: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The run's last good checkpoint, or ``None`` when it has none.

    The latest file is tried first; when it is unreadable the previous one is used, with a
    warning that names both.

    Args:
        folder: The checkpoint folder.
        run: The run's name.
        settings: The run's settings now; those of :data:`TRAJECTORY_SETTINGS` must equal the
            saved ones.

    Raises:
        CheckpointError: When no checkpoint file can be read (each is named, with the reason),
            or when the saved settings differ (each difference is named).
    """
    try:
        payload = checkpoint_file(folder, run).load(
            accept=lambda payload: _check(payload, run), what="checkpoint"
        )
    except StateFileError as err:
        raise CheckpointError(str(err)) from err
    if payload is None:
        return None
    saved = payload.get("settings", {})
    changed = {
        key: (saved.get(key), settings.get(key))
        for key in TRAJECTORY_SETTINGS
        if saved.get(key) != settings.get(key)
    }
    if "world_size" in changed:
        old, new = changed["world_size"]
        raise CheckpointError(
            f"run {run!r} was trained by {old or 1} process(es) and this resume has {new or 1}; "
            f"resume it with {old or 1} (torchrun --nproc-per-node {old or 1} ... on one node; "
            "one process without torchrun for 1): the data order and the checkpoint's random "
            "generators belong to that number"
        )
    if changed:
        shown = ", ".join(f"{k} {new!r} (saved {old!r})" for k, (old, new) in changed.items())
        raise CheckpointError(
            f"run {run!r} was saved with other settings than asked now: {shown}; resume with "
            "the saved settings, or start a new run elsewhere"
        )
    return payload
