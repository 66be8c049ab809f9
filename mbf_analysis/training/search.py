"""Several runs: optimizers compared on equal budgets, grid searches, and run summaries.

- :func:`compare`: the optimizers one after another on the same problem, seeds, data and limits
  (equal budget and/or epochs); a run that diverges stays in the result, its last row of status
  ``"diverged"``, and the others still run.
- :func:`grid_search`: one optimizer over a grid of (lr, damping) (autoencoders, the paper's
  Table 5) or (lr, weight decay) (classifiers, Table 7); the paper's criteria: the lowest final
  training loss for autoencoders, the highest final test ("validation") accuracy for
  classifiers. A point that diverged, or whose training loss did not fall below its initial
  value, is never the best.
- :func:`summarize`: one row per run with its final evaluation; :func:`summarize_seeds`: mean
  and spread over the seeds of each optimizer.

Both :func:`compare` and :func:`grid_search` pass ``csv_path``, ``checkpoint_dir`` and
``resume`` on to every :func:`~mbf_analysis.training.train` call, so an interrupted comparison or
grid resumes where it stopped: finished runs are kept, the unfinished one continues from its
checkpoint, the others start.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mbf_analysis.data import Dataset, load_dataset
from mbf_analysis.errors import ConfigError
from mbf_analysis.training.loop import TrainingDiverged, train
from mbf_analysis.training.presets import GRIDS, OPTIMIZERS, get_preset, split_optimizer
from mbf_analysis.training.problems import Problem, get_problem

__all__ = ["SUMMARY_COLUMNS", "compare", "grid_search", "summarize", "summarize_seeds"]

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "problem",
    "optimizer",
    "seed",
    "status",
    "steps",
    "epochs",
    "wall_time",
    "process_time",
    "warm_start_time",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
)
"""Columns of :func:`summarize`."""


def _check_optimizers(optimizers: Sequence[str]) -> None:
    if not optimizers:
        raise ConfigError(f"no optimizer given; choose from {', '.join(OPTIMIZERS)}")
    for name in optimizers:
        split_optimizer(name)


def _run(problem: Problem, optimizer: str, **kwargs: Any) -> pd.DataFrame:
    """:func:`train`, with a divergence turned into its partial log (and a warning)."""
    try:
        return train(problem, optimizer, **kwargs)
    except TrainingDiverged as err:
        logger.warning("%s", err)
        return err.log


def compare(
    problem: str | Problem,
    optimizers: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
    dataset: Dataset | None = None,
    data_dir: str | Path | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Run every optimizer on ``problem`` with the same limits and seeds; the logs concatenated.

    Args:
        problem: Problem name or :class:`~mbf_analysis.training.problems.Problem`.
        optimizers: Optimizer names, run in this order for each seed.
        seeds: Seeds, the outer loop (default: ``kwargs["seed"]``, else 0), so that a complete
            comparison of the first seed exists first.
        dataset: The problem's data set, if loaded (else loaded once from ``data_dir``).
        data_dir: Where to look for the data files.
        **kwargs: Passed to every :func:`~mbf_analysis.training.train` call (``time_budget``,
            ``epochs``, ``csv_path`` (all runs append to it), ``checkpoint_dir``, ``resume``,
            ``lr``, ...; an ``lr``, ``damping`` or ``weight_decay`` replaces the preset of
            *every* optimizer).

    Returns:
        The logs of all runs, in run order (columns ``run``, ``optimizer`` and ``seed`` tell
        them apart).
    """
    problem = get_problem(problem)
    _check_optimizers(optimizers)
    if seeds is None:
        seeds = [kwargs.pop("seed", 0)]
    elif "seed" in kwargs:
        raise ConfigError("give either seed or seeds, not both")
    if dataset is None:
        dataset = load_dataset(problem.dataset, data_dir)
    frames = [
        _run(problem, opt, dataset=dataset, seed=seed, **kwargs)
        for seed in seeds
        for opt in optimizers
    ]
    return pd.concat(frames, ignore_index=True)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run (problem, optimizer, seed and, in the log's ``run``, the settings): its
    status, steps, epochs, training seconds (wall and process), the warm start's seconds (0
    without one) and the metrics of its last evaluation (NaN when it diverged before any).
    The accuracy columns are dropped when every run is an autoencoder's (they are all NaN)."""
    out = []
    keys = (
        ["run", "problem", "optimizer", "seed"]
        if "run" in frame
        else ["problem", "optimizer", "seed"]
    )
    for key, run in frame.groupby(keys, sort=False):
        end = run[run.kind == "end"]
        evals = run[run.kind == "eval"]
        warm = run[run.kind == "warm_start"]
        timed = run[run.kind.isin(["step", "eval", "end"])]
        last = evals.iloc[-1] if len(evals) else None
        tail = timed.iloc[-1] if len(timed) else run.iloc[-1]
        diverged = len(end) and end.status.iloc[-1] == "diverged"
        row = dict(zip(keys, key, strict=True))
        row.update(
            status=end.status.iloc[-1] if len(end) else "running",
            steps=int(tail.step),
            epochs=float(tail.epoch),
            wall_time=float(tail.wall_time),
            process_time=float(tail.process_time),
            warm_start_time=float(warm.wall_time.sum()) if len(warm) else 0.0,
        )
        for metric in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            row[metric] = math.nan if last is None or diverged else last[metric]
        first = evals.iloc[0] if len(evals) else None
        row["initial_train_loss"] = math.nan if first is None else first["train_loss"]
        out.append(row)
    columns = (["run"] if "run" in keys else []) + [*SUMMARY_COLUMNS, "initial_train_loss"]
    summary = pd.DataFrame(out, columns=columns)
    if len(summary) and all(get_problem(name).is_autoencoder for name in summary.problem):
        summary = summary.drop(columns=["train_accuracy", "test_accuracy"])
    return summary


def summarize_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over the seeds of each (problem, optimizer) of
    :func:`summarize`'s final metrics and times; ``seeds`` counts them and ``diverged`` the
    runs that diverged (excluded from the means)."""
    metrics = [
        c
        for c in (
            "train_loss",
            "test_loss",
            "train_accuracy",
            "test_accuracy",
            "steps",
            "wall_time",
        )
        if c in summary
    ]
    rows = []
    for (problem, optimizer), runs in summary.groupby(["problem", "optimizer"], sort=False):
        ok = runs[runs.status != "diverged"]
        row = {
            "problem": problem,
            "optimizer": optimizer,
            "seeds": len(runs),
            "diverged": int((runs.status == "diverged").sum()),
        }
        for metric in metrics:
            row[f"{metric}_mean"] = float(ok[metric].mean()) if len(ok) else math.nan
            row[f"{metric}_std"] = float(ok[metric].std(ddof=1)) if len(ok) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def grid_search(
    problem: str | Problem,
    optimizer: str,
    *,
    lrs: Sequence[float] | None = None,
    dampings: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
    dataset: Dataset | None = None,
    data_dir: str | Path | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Train once per grid point and mark the best.

    Grid: with none of ``lrs``, ``dampings``, ``weight_decays`` given, the paper's grid
    (:data:`~mbf_analysis.training.presets.GRIDS`: lr × damping for autoencoders, lr × weight
    decay for classifiers; SGD-m has no damping); otherwise the axes given, the other settings
    at their preset values.

    Args:
        problem: Problem name or object.
        optimizer: Optimizer name.
        lrs: Learning rates.
        dampings: Dampings (``ε`` for Adam and Shampoo).
        weight_decays: Decoupled weight decays.
        dataset: The problem's data set, if loaded.
        data_dir: Where to look for the data files.
        **kwargs: Passed to every :func:`~mbf_analysis.training.train` call (``time_budget``,
            ``epochs``, ``max_steps``, ``seed``, ...).

    Returns:
        One row per grid point: ``lr``, ``damping``, ``weight_decay``, then the
        :func:`summarize` columns, ``score`` (the final training loss for autoencoders, the
        final test accuracy for classifiers; diverged runs score ``inf`` / ``-inf``) and
        ``best`` (``True`` on the one best row, ties to the first; on none when every run
        diverged or made no progress: a run whose final training loss is not below its
        initial one never counts as best, nor scores).
    """
    problem = get_problem(problem)
    _check_optimizers([optimizer])
    preset = get_preset(problem, optimizer, presets=kwargs.get("presets", "ours"))
    if lrs is None and dampings is None and weight_decays is None:
        kind = "autoencoder" if problem.is_autoencoder else "classifier"
        grid = GRIDS[kind][split_optimizer(optimizer)[0]]
        lrs, dampings, weight_decays = (
            grid["lr"],
            grid.get("damping"),
            grid.get("weight_decay"),
        )
    axes = (
        list(lrs or [preset.lr]),
        list(dampings or [preset.damping]),
        list(weight_decays or [preset.weight_decay]),
    )
    if dataset is None:
        dataset = load_dataset(problem.dataset, data_dir)
    rows = []
    for lr, damping, weight_decay in itertools.product(*axes):
        log = _run(
            problem,
            optimizer,
            dataset=dataset,
            lr=lr,
            damping=damping,
            weight_decay=weight_decay,
            **kwargs,
        )
        summary = summarize(log).iloc[0].to_dict()
        rows.append({"lr": lr, "damping": damping, "weight_decay": weight_decay, **summary})
    frame = pd.DataFrame(rows)
    progressed = frame.train_loss < frame.initial_train_loss
    frame.loc[(frame.status != "diverged") & ~progressed, "status"] = "no_progress"
    if problem.is_autoencoder:
        frame["score"] = frame.train_loss.where(progressed, math.inf).fillna(math.inf)
        best = frame.score.idxmin()
    else:
        frame["score"] = frame.test_accuracy.where(progressed, -math.inf).fillna(-math.inf)
        best = frame.score.idxmax()
    frame["best"] = (frame.index == best) & frame.score.map(math.isfinite)
    return frame
