"""The training log's columns and its CSV file, appended row by row.

An interrupted or crashed run leaves a valid CSV: the header is written once and every row is
flushed as soon as it exists. See :mod:`mbf_analysis.training.loop` for what the rows mean.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

__all__ = ["LOG_COLUMNS", "CsvLog"]

LOG_COLUMNS = (
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
                header = next(csv.reader(fh), [])
            if tuple(header) != LOG_COLUMNS:
                raise ValueError(
                    f"{self.path} exists with other columns than a training log "
                    f"({', '.join(header[:4])}, …); remove it or choose another file"
                )
        self._file: TextIO = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=LOG_COLUMNS)
        if fresh:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing columns stay empty) and flush."""
        self._writer.writerow({k: row.get(k) for k in LOG_COLUMNS})
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()
