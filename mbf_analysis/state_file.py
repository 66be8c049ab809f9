"""A resumable run's state on disk: written atomically, with the previous good state kept.

Every resumable command (``cosine``, ``error``, ``train``) keeps its state in one
:class:`StateFile`: the latest state ``<name>.pt`` and the one before it, ``<name>.prev.pt``.

- :meth:`StateFile.save` writes the new state to a temporary file of the same folder first
  (:func:`~mbf_analysis.files.atomic_write`); only once it is complete does the latest become
  the previous one (a hard link, so the latest never leaves the disk) and the new one the
  latest (one rename). A write that fails (disk full) leaves the latest as it was.
- :meth:`StateFile.load` reads the latest with ``torch.load(..., weights_only=True)`` and hands
  it to the caller's ``accept`` (which restores it, or checks that it is this run's). A file that
  cannot be read, or that ``accept`` refuses, is *damaged*: the previous state is used instead,
  with a one-line warning that names both files; the damaged file is kept as
  ``<name>.corrupt.pt`` and the good one becomes the latest again. When no file is usable,
  :class:`StateFileError` names each file and why, in one line.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbf_analysis.errors import MBFError
from mbf_analysis.files import atomic_save, storage_errors

__all__ = ["StateFile", "StateFileError"]

logger = logging.getLogger(__name__)


class StateFileError(MBFError, ValueError):
    """No usable state: every file is unreadable, truncated or not this run's."""


def _with_tag(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


@dataclass(frozen=True)
class StateFile:
    """The latest state at ``path`` and the previous one beside it (module docstring).

    Args:
        path: The latest state, e.g. ``run/cosine_state.pt``.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def previous(self) -> Path:
        """``<name>.prev.pt``: the state before the latest one."""
        return _with_tag(self.path, "prev")

    @property
    def damaged(self) -> Path:
        """``<name>.corrupt.pt``: where a damaged latest state is moved when the previous one
        takes its place."""
        return _with_tag(self.path, "corrupt")

    def exists(self) -> bool:
        """Whether a latest or previous state is on disk."""
        return self.path.is_file() or self.previous.is_file()

    def save(self, payload: Any) -> None:
        """Write ``payload`` (``torch.save``) as the latest state, keeping the one before it.

        The new state is written in full to ``<name>.next.pt``; the latest becomes the previous
        one by a hard link (a copy where the file system has none), so that a latest state is
        on disk at every moment; then the new one replaces the latest in one rename.

        Raises:
            StorageError: If the operating system refused a write; the latest state is then
                still the one before this call.
        """
        staged = _with_tag(self.path, "next")
        try:
            atomic_save(payload, staged)
            with storage_errors(self.path):
                if self.path.is_file():
                    _duplicate(self.path, self.previous)
                staged.replace(self.path)
        finally:
            staged.unlink(missing_ok=True)

    def drop_previous(self) -> None:
        """Delete the previous state (a finished run needs its final state only)."""
        self.previous.unlink(missing_ok=True)

    def load(
        self,
        *,
        map_location: Any = "cpu",
        accept: Callable[[Any], None] | None = None,
        what: str = "state",
    ) -> Any | None:
        """The last good state, or ``None`` when there is none on disk.

        Args:
            map_location: Where tensors go (``torch.load``).
            accept: Called with each candidate payload; an exception it raises marks the file
                damaged (e.g. the run's ``load_state_dict``, or a check of its format).
            what: What the file holds, for the messages (``"state"``, ``"checkpoint"``).

        Raises:
            StateFileError: When state files exist but none is usable (each named, with the
                reason, and what to do).
        """
        import torch

        problems: list[str] = []
        for path in (self.path, self.previous):
            if not path.is_file():
                continue
            try:
                payload = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:  # a damaged pickle can raise nearly any exception type
                problems.append(
                    f"{path} is not a readable {what}, probably truncated or corrupt "
                    f"({type(err).__name__}: {_first_line(err)})"
                )
                continue
            if accept is not None:
                try:
                    accept(payload)
                except Exception as err:
                    problems.append(f"{path} is not a usable {what} ({_first_line(err)})")
                    continue
            if problems:
                self._restore(path, problems[0], what)
            return payload
        if problems:
            raise StateFileError(
                f"no usable {what} in {self.path.parent}: {'; '.join(problems)}. Delete "
                f"{self.path.name} and {self.previous.name} to start the run again."
            )
        return None

    def _restore(self, good: Path, problem: str, what: str) -> None:
        """Make the good previous state the latest again, keeping the damaged one aside."""
        logger.warning(
            "%s; continuing from the previous %s %s (it becomes %s again; the damaged file is "
            "kept as %s)",
            problem,
            what,
            good,
            self.path.name,
            self.damaged.name,
        )
        with storage_errors(self.path):
            if self.path.is_file():
                self.path.replace(self.damaged)
            good.replace(self.path)


def _duplicate(source: Path, target: Path) -> None:
    """Make ``target`` hold what ``source`` holds, atomically: a hard link, or a copy where
    the file system refuses links; ``source`` is left in place."""
    staged = _with_tag(target, "link")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:
        shutil.copyfile(source, staged)
    staged.replace(target)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
