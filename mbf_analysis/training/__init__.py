"""Training runs of the paper's problems with MBF and its baselines (paper §6, Appendix 11).

- :mod:`~mbf_analysis.training.problems`: the problems (data set, model, loss convention, batch
  size, augmentation);
- :mod:`~mbf_analysis.training.presets`: the paper's best hyper-parameters (Tables 4 and 8),
  schedules and grids (Tables 5 and 7), and our choices where the paper is silent;
- :mod:`~mbf_analysis.training.log`: the log's columns and its CSV file;
- :mod:`~mbf_analysis.training.loop`: :func:`train`, one run under a time budget and/or an epoch
  limit, logged per step and per epoch (optionally to a CSV file as it runs), checkpointed and
  resumable (``checkpoint_dir=``, ``resume=True``);
- :mod:`~mbf_analysis.training.checkpoint`: what a checkpoint holds, and its safe reading;
- :mod:`~mbf_analysis.training.search`: :func:`compare` (optimizers and seeds on equal budgets),
  :func:`grid_search`, :func:`summarize` and :func:`summarize_seeds`.

Example::

    from mbf_analysis.training import compare, summarize
    log = compare("mnist-ae", ["mbf", "adam", "sgdm"], time_budget=120, data_dir="data",
                  checkpoint_dir="runs/ae/checkpoints")   # later: the same call with resume=True
    print(summarize(log))
"""

from mbf_analysis.training.checkpoint import CheckpointError
from mbf_analysis.training.log import LOG_COLUMNS, CsvLog, read_log
from mbf_analysis.training.loop import (
    BUDGET_CLOCKS,
    TrainingDiverged,
    make_optimizer,
    run_name,
    train,
)
from mbf_analysis.training.presets import (
    GRIDS,
    OPTIMIZERS,
    PRESETS,
    Preset,
    get_preset,
    lr_at_epoch,
)
from mbf_analysis.training.problems import (
    PROBLEMS,
    Problem,
    augment_batch,
    get_problem,
    problem_names,
)
from mbf_analysis.training.search import (
    SUMMARY_COLUMNS,
    compare,
    grid_search,
    summarize,
    summarize_seeds,
)

__all__ = [
    "BUDGET_CLOCKS",
    "CheckpointError",
    "GRIDS",
    "LOG_COLUMNS",
    "OPTIMIZERS",
    "PRESETS",
    "PROBLEMS",
    "SUMMARY_COLUMNS",
    "CsvLog",
    "Preset",
    "Problem",
    "TrainingDiverged",
    "augment_batch",
    "compare",
    "get_preset",
    "get_problem",
    "grid_search",
    "lr_at_epoch",
    "make_optimizer",
    "problem_names",
    "read_log",
    "run_name",
    "summarize",
    "summarize_seeds",
    "train",
]
