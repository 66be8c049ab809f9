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

Writes are atomic (:func:`~mbf_analysis.files.atomic_save`) and the previous checkpoint is
kept as ``<R>.prev.pt`` until the next one is complete, so a crash while writing, or a file
damaged afterwards, falls back to the last good one (with a warning; the damaged file is kept as
``<R>.corrupt.pt`` and the good one becomes the latest again); a finished run keeps its final
checkpoint only. A file that cannot be
read, or is not a checkpoint of this format, is refused with a message that names it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mbf_analysis.errors import MBFError
from mbf_analysis.files import atomic_save

__all__ = [
    "FORMAT",
    "TRAJECTORY_SETTINGS",
    "CheckpointError",
    "checkpoint_files",
    "drop_previous",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = 1

TRAJECTORY_SETTINGS = (
    "problem",
    "optimizer",
    "seed",
    "batch_size",
    "lr",
    "damping",
    "weight_decay",
    "dtype",
    "device_type",
    "eval_samples",
)
"""Settings that change the steps a run takes; a resume must keep every one of them. Limits
(epochs, steps, budget) and the clock may change, so that a finished run can be extended."""


class CheckpointError(MBFError, ValueError):
    """A checkpoint that cannot be used: unreadable, foreign, or saved with other settings."""


def checkpoint_files(folder: str | Path, run: str) -> tuple[Path, Path]:
    """``(latest, previous)``: ``<folder>/<run>.pt`` and ``<folder>/<run>.prev.pt``."""
    folder = Path(folder)
    return folder / f"{run}.pt", folder / f"{run}.prev.pt"


def save_checkpoint(folder: str | Path, run: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as the run's latest checkpoint, keeping the one before it.

    Returns:
        The path written.
    """
    latest, previous = checkpoint_files(folder, run)
    latest.parent.mkdir(parents=True, exist_ok=True)
    if latest.is_file():
        latest.replace(previous)
    atomic_save({"format": FORMAT, "run": run, **payload}, latest)
    return latest


def drop_previous(folder: str | Path, run: str) -> None:
    """Delete the run's previous checkpoint (once its final one is written, the previous one
    only doubles the disk space a finished run takes)."""
    checkpoint_files(folder, run)[1].unlink(missing_ok=True)


def _read(path: Path, run: str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle can raise nearly any exception type
        raise CheckpointError(
            f"{path} is not a readable checkpoint, probably truncated or corrupt "
            f"({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of format {FORMAT}")
    if payload.get("run") != run:
        raise CheckpointError(f"{path} holds run {payload.get('run')!r}, not {run!r}")
    return payload


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
    problems = []
    payload = None
    latest, previous = checkpoint_files(folder, run)
    for path in (latest, previous):
        if not path.is_file():
            continue
        try:
            payload = _read(path, run)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            kept = latest.with_name(f"{run}.corrupt.pt")
            latest.replace(kept)
            previous.replace(latest)
            logger.warning(
                "%s; continuing from the previous checkpoint %s (the damaged one is kept as %s)",
                problems[0],
                path,
                kept,
            )
        break
    if payload is None:
        if problems:
            raise CheckpointError(
                f"no usable checkpoint of run {run!r}: {'; '.join(problems)}. Delete those files "
                "to start the run again."
            )
        return None
    saved = payload.get("settings", {})
    changed = {
        key: (saved.get(key), settings.get(key))
        for key in TRAJECTORY_SETTINGS
        if saved.get(key) != settings.get(key)
    }
    if changed:
        shown = ", ".join(f"{k} {new!r} (saved {old!r})" for k, (old, new) in changed.items())
        raise CheckpointError(
            f"run {run!r} was saved with other settings than asked now: {shown}; resume with "
            "the saved settings, or start a new run elsewhere"
        )
    return payload
