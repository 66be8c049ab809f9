"""The training log's columns and its CSV file, appended row by row.

An interrupted or crashed run leaves a valid CSV: the header is written once and every row is
flushed as soon as it exists; a line cut short by a kill is dropped when the log is read back
(:func:`read_log`). Several runs (optimizers, seeds, grid points) append to one file; the column
``run`` names the run a row belongs to. A resumed run first drops its own rows written after its
checkpoint (:func:`keep_rows`), so that every step appears exactly once. See
:mod:`mbf_analysis.training.loop` for what the rows mean.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from mbf_analysis.errors import ConfigError
from mbf_analysis.files import atomic_write, storage_errors

__all__ = ["LOG_COLUMNS", "CsvLog", "keep_rows", "read_log"]

LOG_COLUMNS = (
    "run",
    "problem",
    "optimizer",
    "seed",
    "kind",
    "step",
    "epoch",
    "wall_time",
    "process_time",
    "lr",
    "loss",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "status",
)
"""Columns of the training log, in CSV order (module docstring)."""


def _check_header(path: Path, header: list[str]) -> None:
    if tuple(header) != LOG_COLUMNS:
        raise ConfigError(
            f"{path} exists with other columns than a training log of this version "
            f"({', '.join(header[:4])}, …); remove it or choose another file"
        )


def _complete_lines(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the complete rows of the CSV at ``path`` (short lines dropped)."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        rows = [row for row in reader if len(row) == len(header)]
    return header, rows


def read_log(path: str | Path) -> pd.DataFrame:
    """The log at ``path`` as a frame of :data:`LOG_COLUMNS`, without lines cut short.

    Raises:
        ValueError: If the file has other columns.
    """
    path = Path(path)
    header, rows = _complete_lines(path)
    _check_header(path, header)
    frame = pd.DataFrame(rows, columns=list(LOG_COLUMNS)).replace("", None)
    numeric = [c for c in LOG_COLUMNS if c not in ("run", "problem", "optimizer", "kind", "status")]
    frame[numeric] = frame[numeric].apply(pd.to_numeric)
    return frame


def keep_rows(path: str | Path, run: str, keep: int) -> int:
    """Rewrite the log keeping every row of other runs and the first ``keep`` rows of ``run``
    (and dropping lines cut short). Atomic: the file is replaced only when complete.

    Returns:
        The number of rows of ``run`` dropped.

    Raises:
        ValueError: If the file has other columns, or fewer than ``keep`` rows of ``run``
            (the checkpoint is newer than the log).
    """
    path = Path(path)
    if not path.is_file():
        if keep:
            raise ConfigError(
                f"{path} is missing, but the checkpoint of {run!r} counts {keep} rows"
            )
        return 0
    header, rows = _complete_lines(path)
    _check_header(path, header)
    index = LOG_COLUMNS.index("run")
    kept, seen = [], 0
    for row in rows:
        if row[index] == run:
            seen += 1
            if seen > keep:
                continue
        kept.append(row)
    if seen < keep:
        raise ConfigError(
            f"{path} holds {seen} rows of run {run!r}, but its checkpoint was taken after "
            f"{keep}; the log does not belong to this checkpoint"
        )
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(kept)
    atomic_write(path, lambda fh: fh.write(text.getvalue().encode()))
    return seen - keep


class CsvLog:
    """Rows of :data:`LOG_COLUMNS` appended to a CSV file as they come.

    A new or empty file gets the header; an existing file must have the same header (runs of a
    comparison append to one file). Every row is flushed at once.

    Raises:
        ValueError: If the file exists with another header.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            with self.path.open(newline="") as fh:
                _check_header(self.path, next(csv.reader(fh), []))
        with storage_errors(self.path):
            self._file: TextIO = self.path.open("a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=LOG_COLUMNS)
            if fresh:
                self._writer.writeheader()
                self._file.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing columns stay empty) and flush.

        Raises:
            StorageError: If the operating system refused the write.
        """
        with storage_errors(self.path):
            self._writer.writerow({k: row.get(k) for k in LOG_COLUMNS})
            self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()
