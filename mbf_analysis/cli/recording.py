"""What the resumable analyses (``cosine``, ``error``) share: their options, the settings a
``--resume`` keeps, a CSV appended after every iteration, a state saved atomically by time or
by count, and the rows kept on ``--resume``.

The CSV's first column is ``iteration``. On ``--resume`` from a state taken at iteration ``k``,
:func:`recorded_rows` keeps the rows of iterations ``< k`` (dropping those written after the
state was saved, and a line cut short by a kill), so that every iteration appears exactly once.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mbf_analysis.cli.common import UsageError, positive_int

if TYPE_CHECKING:
    import pandas as pd

    from mbf_analysis.cli.run_folder import RunFolder

__all__ = [
    "Recorder",
    "add_recording_options",
    "format_duration",
    "iteration_timings",
    "per_iteration_text",
    "recorded_rows",
    "resumed_settings",
]


def iteration_timings(
    previous: Mapping[str, Any] | None, seconds: float, iterations: int
) -> dict[str, float]:
    """``run.json``'s iteration timings after one session of a resumable run, summed over every
    session so far, so that a ``--resume`` (even one with nothing left to do, which only redraws
    the figure) never replaces the time of the work done before it. A session killed before it
    could write its record is not counted (its iterations are redone from the saved state).

    Args:
        previous: The saved ``timings_s`` (``None`` for a new run).
        seconds: This session's seconds in iterations.
        iterations: Iterations this session did.

    Returns:
        ``{"iterations": total seconds, "iterations_done": total count, "per_iteration": their
        ratio}`` (no ``"per_iteration"`` while no iteration has run).
    """
    previous = previous or {}
    before = previous.get("iterations_done")
    if before is None and previous.get("per_iteration"):  # a record from before the count
        before = round(previous["iterations"] / previous["per_iteration"])
    total = float(previous.get("iterations", 0.0)) + seconds
    done = int(before or 0) + iterations
    out = {"iterations": total, "iterations_done": done}
    if done:
        out["per_iteration"] = total / done
    return out


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"7.5 min"`` or ``"2.3 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def per_iteration_text(timings: Mapping[str, Any]) -> str:
    """``"1.234 s per iteration"``, or ``"no iterations timed"`` (:func:`iteration_timings`)."""
    if "per_iteration" not in timings:
        return "no iterations timed"
    return f"{timings['per_iteration']:.3f} s per iteration"


def add_recording_options(
    parser: argparse.ArgumentParser, *, state_name: str, smoothing: int, unit: str
) -> None:
    """``--checkpoint-every``, ``--smoothing`` (the figure's window) and ``--no-progress``."""
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        help=f"iterations between saves of {state_name} (default: whenever a minute has passed "
        "since the last save)",
    )
    parser.add_argument(
        "--smoothing",
        type=positive_int,
        default=smoothing,
        help=f"rolling-mean window of the figure in {unit} (default: {smoothing})",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )


def resumed_settings(
    record: Mapping[str, Any],
    folder: RunFolder,
    state_name: str,
    given: Mapping[str, Any],
) -> dict[str, Any]:
    """The settings of the run in ``folder`` (from its record), with ``iterations`` extended to
    the given one; every other given setting must equal the saved one.

    Raises:
        UsageError: Without a saved state, or for a given setting that differs (each is named).
    """
    from mbf_analysis.state_file import StateFile

    if not StateFile(folder.path / state_name).exists() or not isinstance(
        record.get("settings"), dict
    ):
        raise UsageError(
            f"--resume: no saved state in {folder.path} ({state_name} missing); start it "
            "without --resume (and --overwrite)"
        )
    saved = dict(record["settings"])
    clash = {k: v for k, v in given.items() if k != "iterations" and v != saved.get(k)}
    if clash:
        shown = ", ".join(f"{k}={v!r} ({_saved_text(saved.get(k))})" for k, v in clash.items())
        raise UsageError(
            f"--resume continues the run in {folder.path} with its saved settings, but {shown}; "
            "drop those options or start a new run with another --out"
        )
    if given.get("iterations") is not None:
        saved["iterations"] = given["iterations"]
    return saved


def _saved_text(value: Any) -> str:
    """How a clash message shows a saved setting: ``None`` was an option left to its default."""
    return "not set in the saved run: its default" if value is None else f"saved {value!r}"


def state_outputs(state_name: str) -> tuple[str, str, str]:
    """The files of a run's :class:`~mbf_analysis.state_file.StateFile` ``state_name``: the
    latest, the previous and a damaged one set aside."""
    from mbf_analysis.state_file import StateFile

    state = StateFile(Path(state_name))
    return state_name, state.previous.name, state.damaged.name


def load_state(path: Path, run: Resumable, device: Any) -> None:
    """Restore ``run`` from its last good state at ``path``; a damaged latest state falls back
    to the previous one with a warning (:meth:`~mbf_analysis.state_file.StateFile.load`).

    Raises:
        StateFileError: When no state file is usable (one line naming each).
    """
    from mbf_analysis.state_file import StateFile

    StateFile(path).load(map_location=device, accept=run.load_state_dict)


class Resumable(Protocol):
    """An analysis run with an iteration counter and a state (``CosineRun``,
    ``ApproximationRun``)."""

    iteration: int
    config: Any  # with ``iterations``, the run's total

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None: ...


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
    save; :meth:`finish` ends a session of the run.

    A write the operating system refuses (disk full, quota, permissions) stops the run with a
    :class:`~mbf_analysis.errors.StorageError` of one line: the file, the OS error, the state
    that is kept (the last one saved) and the ``--resume`` command that continues from it.

    Args:
        csv_path: The CSV (first column ``iteration``).
        state_path: The state file, in the run's folder.
        run: The analysis.
        columns: The CSV's columns.
        checkpoint_every: Iterations between saves, or ``None`` for by time.
        command: The subcommand, for the ``--resume`` command it prints.
    """

    SAVE_INTERVAL_S = 60.0

    ESTIMATE_OVER_S = 300.0
    """A run whose remaining iterations are estimated to take longer says so (once, at the
    second record of a session: the first one includes the start-up)."""

    def __init__(
        self,
        csv_path: Path,
        state_path: Path,
        run: Resumable,
        columns: Sequence[str],
        checkpoint_every: int | None,
        command: str,
    ) -> None:
        self.csv = csv_path
        self.state = state_path
        self.run = run
        self.columns = list(columns)
        self.every = checkpoint_every
        self.command = command
        self.saved_at = time.perf_counter()
        self.saved_iteration: int | None = None
        self._first: tuple[float, int] | None = None
        self._estimated = False

    @property
    def resume_command(self) -> str:
        return f"mbf-analyze {self.command} --resume --out {self.state.parent}"

    def _kept_state(self) -> str:
        if self.saved_iteration is None:
            return "no state was saved yet"
        return f"the last good state ({self.state.name}, iteration {self.saved_iteration}) is kept"

    def _kept(self) -> str:
        if self.saved_iteration is None:
            return self._kept_state()
        return (
            f"{self._kept_state()} and `{self.resume_command}` continues from it once the file "
            "can be written"
        )

    @contextmanager
    def _writing(self) -> Iterator[None]:
        from mbf_analysis.errors import StorageError

        try:
            yield
        except StorageError as err:
            raise err.with_context(self._kept()) from err

    def start(self, rows: pd.DataFrame) -> None:
        """Write the CSV anew with ``rows`` (those kept from before a resume); a state already
        in the folder (a resume's) is the last good one."""
        from mbf_analysis.files import storage_errors

        if self.state.is_file():
            self.saved_iteration = self.run.iteration
        with self._writing(), storage_errors(self.csv):
            rows.to_csv(self.csv, index=False, columns=self.columns)

    def __call__(self, rows: pd.DataFrame) -> None:
        from mbf_analysis.files import storage_errors

        with self._writing(), storage_errors(self.csv), self.csv.open("a") as fh:
            rows.to_csv(fh, index=False, header=False, columns=self.columns)
            fh.flush()
        self._estimate()
        if self.every is None:
            due = time.perf_counter() - self.saved_at >= self.SAVE_INTERVAL_S
        else:
            due = self.run.iteration % self.every == 0
        if due:
            self.save()

    def _estimate(self) -> None:
        """Print the estimated time of the remaining iterations once, if it is long
        (:attr:`ESTIMATE_OVER_S`), from the pace between this session's first two records."""
        now, iteration = time.perf_counter(), self.run.iteration
        if self._estimated:
            return
        if self._first is None:
            self._first = (now, iteration)
            return
        self._estimated = True
        done = iteration - self._first[1]
        if done <= 0:
            return
        pace = (now - self._first[0]) / done
        remaining = max(self.run.config.iterations - iteration, 0)
        if pace * remaining > self.ESTIMATE_OVER_S:
            print(
                f"estimate: about {format_duration(pace * remaining)} for the {remaining} "
                f"remaining iterations ({pace:.3g} s each so far); Ctrl-C or SIGTERM stops after "
                f"the iteration in progress and `{self.resume_command}` continues",
                flush=True,
            )

    def save(self) -> None:
        """Save the state atomically, keeping the one before it
        (:class:`~mbf_analysis.state_file.StateFile`; both stay if the write fails)."""
        from mbf_analysis.state_file import StateFile

        with self._writing():
            StateFile(self.state).save(self.run.state_dict())
        self.saved_at = time.perf_counter()
        self.saved_iteration = self.run.iteration

    def finish(
        self,
        status: str,
        whole: bool,
        write_record: Callable[[], None],
        stop: KeyboardInterrupt | None = None,
    ) -> None:
        """End this session: save the state if it is whole (``status`` ``"complete"``, or
        ``"interrupted"`` by a clean stop, ``whole``), write ``run.json`` (``write_record``)
        and, after an interruption (``stop``, the Ctrl-C or SIGTERM), say in one line where the
        run stopped and how to continue.

        A failed run (``"failed"``, ``"diverged"``) keeps its last saved state; a second write
        error while its own error propagates is not raised over it.
        """
        from mbf_analysis.cli.common import stop_line
        from mbf_analysis.errors import StorageError
        from mbf_analysis.state_file import StateFile

        if status == "complete" or (status == "interrupted" and whole):
            self.save()
        if status == "complete":
            StateFile(self.state).drop_previous()
        try:
            with self._writing():
                write_record()
        except StorageError:
            if status in ("complete", "interrupted"):
                raise
        if stop is not None:
            if whole:
                where = f"stopped at iteration {self.saved_iteration} (state saved)"
            else:
                where = f"aborted; {self._kept_state()}"
            print(stop_line(stop, f"{where}; continue with: {self.resume_command}"))


def run_recorded(
    analysis: Any,
    remaining: int,
    recorder: Recorder,
    *,
    progress: bool,
    timings: dict[str, float],
    loaded: float,
    previous_timings: Mapping[str, Any] | None,
    write_record: Callable[[str], None],
    diverged: type[BaseException],
    refuse_diverged: Callable[[BaseException], BaseException],
) -> float:
    """Run ``remaining`` iterations of a resumable analysis (``CosineRun``, ``ApproximationRun``)
    into its recorder, the skeleton that ``cosine`` and ``error`` share.

    The run ends ``complete``, ``diverged`` (``diverged`` raised: ``refuse_diverged(err)`` is
    raised in its place), ``interrupted`` (Ctrl-C or SIGTERM: exit ``128 + signal`` after the
    one-line stop message) or ``failed``; in every case the iteration timings are updated and
    :meth:`Recorder.finish` saves what was computed and writes the record with that status
    (``write_record(status)``).

    Returns:
        The ``time.perf_counter()`` at which the iterations ended (the run is ``complete``).
    """
    from mbf_analysis.stopping import StopRequested, exit_code

    status, whole, stop = "complete", True, None
    first = analysis.iteration
    try:
        analysis.run(remaining, on_record=recorder, progress=progress)
    except diverged as err:
        status = "diverged"
        raise refuse_diverged(err) from err
    except KeyboardInterrupt as err:
        status = "interrupted"
        whole, stop = isinstance(err, StopRequested), err
        raise SystemExit(exit_code(err)) from None
    except BaseException:
        status = "failed"
        raise
    finally:
        done = time.perf_counter()
        ran = analysis.iteration - first
        timings.update(iteration_timings(previous_timings, done - loaded, ran))
        recorder.finish(status, whole, lambda: write_record(status), stop)
    return done
