"""What the resumable analyses (``cosine``, ``error``) share: a CSV appended after every
iteration, a state saved atomically by time or by count, and the rows kept on ``--resume``.

The CSV's first column is ``iteration``. On ``--resume`` from a state taken at iteration ``k``,
:func:`recorded_rows` keeps the rows of iterations ``< k`` (dropping those written after the
state was saved, and a line cut short by a kill), so that every iteration appears exactly once.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mbf_analysis.cli.common import UsageError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Recorder", "recorded_rows"]


class Resumable(Protocol):
    """An analysis run with an iteration counter and a state (``CosineRun``,
    ``ApproximationRun``)."""

    iteration: int

    def state_dict(self) -> dict[str, Any]: ...


def recorded_rows(path: Path, columns: Sequence[str], before: int) -> pd.DataFrame:
    """The complete rows of the CSV at ``path`` with ``iteration < before`` (others dropped).

    Raises:
        UsageError: If the file's header is not ``columns``.
    """
    import pandas as pd

    if not path.is_file():
        return pd.DataFrame(columns=list(columns))
    lines = path.read_text().splitlines()
    if not lines or lines[0].split(",") != list(columns):
        raise UsageError(f"--resume: {path} is not this analysis's CSV (header {lines[:1]})")
    kept = [lines[0]]
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        if len(fields) != len(columns):
            continue  # a line cut short when the process was killed
        try:
            iteration = int(fields[0])
        except ValueError:
            continue
        if iteration < before:
            kept.append(line)
    return pd.read_csv(io.StringIO("\n".join(kept) + "\n"))


class Recorder:
    """Appends each record's rows to the CSV and saves the state every ``checkpoint_every``
    iterations, or (``None``) after any record that ends ``SAVE_INTERVAL_S`` after the last
    save."""

    SAVE_INTERVAL_S = 60.0

    def __init__(
        self,
        csv_path: Path,
        state_path: Path,
        run: Resumable,
        columns: Sequence[str],
        checkpoint_every: int | None,
    ) -> None:
        self.csv = csv_path
        self.state = state_path
        self.run = run
        self.columns = list(columns)
        self.every = checkpoint_every
        self.saved_at = time.perf_counter()

    def start(self, rows: pd.DataFrame) -> None:
        """Write the CSV anew with ``rows`` (those kept from before a resume)."""
        rows.to_csv(self.csv, index=False, columns=self.columns)

    def __call__(self, rows: pd.DataFrame) -> None:
        with self.csv.open("a") as fh:
            rows.to_csv(fh, index=False, header=False, columns=self.columns)
            fh.flush()
        if self.every is None:
            due = time.perf_counter() - self.saved_at >= self.SAVE_INTERVAL_S
        else:
            due = self.run.iteration % self.every == 0
        if due:
            self.save()

    def save(self) -> None:
        from mbf_analysis.checkpoints import atomic_save

        atomic_save(self.run.state_dict(), self.state)
        self.saved_at = time.perf_counter()
