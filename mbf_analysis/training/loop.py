r"""One training run: an optimizer on a problem, under a time budget and/or an epoch limit.

The run (:func:`train`):

1. seeds ``torch.manual_seed(seed)`` and builds the model (so the seed fixes the initial
   weights), and draws every minibatch order (a fresh permutation of the training split per
   epoch, the last smaller batch kept) and augmentation from one ``torch.Generator`` seeded with
   ``seed``, and the sampled labels of a true-Fisher KFAC from a second one (on the training
   device, also seeded with ``seed``, so the batch order does not depend on the optimizer): two
   runs with the same seed on the same device take the same steps;
2. builds the optimizer from the preset (:func:`make_optimizer`), with the LR schedule
   ``α_e = α · 0.1^⌊e/K⌋`` set at the start of every epoch ``e``;
3. runs MBF's warm start if the preset asks for one (inside the clock);
4. takes steps ``zero_grad → forward → L = (1/m) Σ_n ℓ_n → backward → step`` until the budget,
   the epoch limit or ``max_steps`` is reached (checked after every step, so a run overshoots
   its budget by at most one step). A KFAC with ``true_fisher=True`` (the presets': the paper's
   KFAC) also runs, on its statistics steps, :meth:`~mbf_analysis.optim.KFAC.sampled_backward`
   between the backward pass and the step: one extra backward pass of
   ``L̂ = (1/m) Σ_n ℓ(f_n, ŷ_n)``, ``ŷ_n ~ p(· | f_n)`` (:meth:`Problem.likelihood_loss
   <mbf_analysis.training.problems.Problem.likelihood_loss>`), which feeds ``G``; the
   momentum still follows the gradient on the real targets. It is part of the step's time;
5. evaluates at step 0, after every epoch and at the end (``model.eval()``, no gradients).

**Clock.** ``wall_time`` (``time.perf_counter``) and ``process_time`` (``time.process_time``,
CPU seconds of all threads) count training only: optimizer construction, warm start and steps,
not the evaluations. The budget is on ``wall_time``.

**Log** (a tidy frame, :data:`LOG_COLUMNS`), one row per

- ``kind="step"``: ``step`` (1, 2, …), ``epoch`` (samples seen / training-set size, fractional),
  ``wall_time``, ``process_time``, ``lr``, ``loss`` (the minibatch loss *before* the step);
- ``kind="eval"``: ``train_loss`` (and ``train_accuracy`` for classifiers) on the training split
  or its first ``eval_samples`` samples of a fixed (seed-0) permutation, the same for every run,
  and ``test_loss``/``test_accuracy`` on the test split (or its first ``eval_samples``);
- ``kind="end"``: the last row of a run, ``status`` ∈ {``"time_budget"``, ``"epochs"``,
  ``"max_steps"``, ``"diverged"``, ``"interrupted"``}.

With ``csv_path`` every row is appended to the CSV file as soon as it exists (header once,
flushed), so an interrupted or crashed run leaves a valid CSV of everything so far.

**Divergence.** A NaN/Inf minibatch loss, or a NaN/Inf gradient refused by a curvature optimizer,
ends the run with an ``"end"`` row of status ``"diverged"`` and raises :class:`TrainingDiverged`
(a :class:`~mbf_analysis.errors.NonFiniteError`) carrying the log so far in ``.log``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from mbf_analysis.data import Dataset, load_dataset
from mbf_analysis.errors import NonFiniteError
from mbf_analysis.models import build_model
from mbf_analysis.optim import KFAC, MBF, Shampoo
from mbf_analysis.training.log import LOG_COLUMNS, CsvLog
from mbf_analysis.training.presets import Preset, get_preset, lr_at_epoch
from mbf_analysis.training.problems import Problem, augment_batch, get_problem

__all__ = [
    "TrainingDiverged",
    "make_optimizer",
    "train",
]

logger = logging.getLogger(__name__)

_EVAL_CHUNK = 1000


class TrainingDiverged(NonFiniteError):
    """The loss or a gradient became NaN/Inf; ``log`` holds the run's rows up to that point."""

    def __init__(self, message: str, log: pd.DataFrame) -> None:
        super().__init__(message)
        self.log = log


def _decoupled_decay_hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """``θ ← (1 − αγ) θ`` for every group before a ``torch.optim`` SGD step (SGDW)."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            decay = group.get("decoupled_weight_decay", 0.0)
            params = [p for p in group["params"] if p.grad is not None]
            if decay and params:
                torch._foreach_mul_(params, 1.0 - group["lr"] * decay)


def make_optimizer(name: str, model: nn.Module, preset: Preset) -> Optimizer:
    """The optimizer ``name`` for ``model`` with the preset's settings.

    - ``"sgdm"``: ``torch.optim.SGD`` (momentum 0.9, dampening 0) with decoupled weight decay
      ``θ ← (1 − αγ) θ`` applied by a step pre-hook (SGDW);
    - ``"adam"``: ``torch.optim.AdamW`` (β = (0.9, 0.999), ``eps`` = the preset's damping);
      its weight decay is the same decoupled rule, and with ``γ = 0`` it is Adam;
    - ``"mbf"``, ``"kfac"``, ``"shampoo"``: :class:`~mbf_analysis.optim.MBF`,
      :class:`~mbf_analysis.optim.KFAC` (which hooks the model's layers; the presets set
      ``true_fisher=True``, the paper's KFAC, and :func:`train` then runs the sampled-label
      backward pass),
      :class:`~mbf_analysis.optim.Shampoo` (``eps`` = damping), momentum 0.9, EMA decay 0.9,
      the preset's periods and options.

    Raises:
        ValueError: For an unknown name.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    curvature = {
        "lr": preset.lr,
        "weight_decay": preset.weight_decay,
        "stat_period": preset.stat_period,
        "inverse_period": preset.inverse_period,
        **preset.options,
    }
    if name == "sgdm":
        optimizer = torch.optim.SGD(params, lr=preset.lr, momentum=0.9)
        for group in optimizer.param_groups:
            group["decoupled_weight_decay"] = preset.weight_decay
        optimizer.register_step_pre_hook(_decoupled_decay_hook)
        return optimizer
    if name == "adam":
        return torch.optim.AdamW(
            params, lr=preset.lr, eps=preset.damping, weight_decay=preset.weight_decay
        )
    if name == "mbf":
        return MBF(model, damping=preset.damping, **curvature)
    if name == "kfac":
        return KFAC(model, damping=preset.damping, **curvature)
    if name == "shampoo":
        return Shampoo(model, eps=preset.damping, **curvature)
    raise ValueError(f"unknown optimizer {name!r}; choose one of mbf, adam, sgdm, kfac, shampoo")


def _eval_indices(n: int, limit: int | None) -> Tensor | None:
    """The first ``limit`` indices of a seed-0 permutation of ``n`` (``None``: all samples)."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit]


@torch.no_grad()
def _evaluate(
    model: nn.Module, problem: Problem, inputs: Tensor, labels: Tensor
) -> tuple[float, float | None]:
    """Mean loss ``(1/N) Σ_n ℓ_n`` and, for classifiers, accuracy over ``inputs`` ``[N, …]``."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for x, y in zip(inputs.split(_EVAL_CHUNK), labels.split(_EVAL_CHUNK), strict=True):
        out = model(x)
        total += float(problem.loss_fn(out, problem.targets(x, y))) * len(x)
        if not problem.is_autoencoder:
            correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    n = len(inputs)
    return total / n, None if problem.is_autoencoder else correct / n


def _check_limits(time_budget: float | None, epochs: int | None, max_steps: int | None) -> None:
    if time_budget is None and epochs is None and max_steps is None:
        raise ValueError("give time_budget (seconds) or epochs (or max_steps) to end the run")
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget}")
    for name, value in (("epochs", epochs), ("max_steps", max_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


class _Clock:
    """Training time: wall and process seconds, paused during evaluations."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self._start: tuple[float, float] | None = None

    def resume(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def pause(self) -> None:
        if self._start is not None:
            self.wall += time.perf_counter() - self._start[0]
            self.cpu += time.process_time() - self._start[1]
            self._start = None

    def now(self) -> tuple[float, float]:
        if self._start is None:
            return self.wall, self.cpu
        return (
            self.wall + time.perf_counter() - self._start[0],
            self.cpu + time.process_time() - self._start[1],
        )


def train(
    problem: str | Problem,
    optimizer: str,
    *,
    time_budget: float | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    damping: float | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    dataset: Dataset | None = None,
    data_dir: str | Path | None = None,
    eval_samples: int | None = None,
    csv_path: str | Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Train the problem's model with one optimizer (module docstring for the protocol).

    The run ends at the first of: ``time_budget`` seconds of training wall time, ``epochs``
    epochs, ``max_steps`` steps; at least one must be given.

    Args:
        problem: A name of :data:`~mbf_analysis.training.problems.PROBLEMS` or a
            :class:`~mbf_analysis.training.problems.Problem`.
        optimizer: ``"mbf"``, ``"adam"``, ``"sgdm"``, ``"kfac"`` or ``"shampoo"``.
        time_budget: Seconds of training (``wall_time``).
        epochs: Epochs.
        max_steps: Steps.
        lr: Replaces the preset's learning rate (the schedule scales it).
        damping: Replaces the preset's damping (``ε`` for Adam and Shampoo).
        weight_decay: Replaces the preset's decoupled weight decay.
        seed: Seed of the initial weights, the batch order and the augmentation.
        device: Where to train.
        dtype: Precision of the model and the data.
        dataset: The problem's data set if already loaded (else loaded from ``data_dir``).
        data_dir: Where :func:`~mbf_analysis.data.load_dataset` looks first.
        eval_samples: Evaluate on at most this many training and test samples (default: all).
        csv_path: Append every log row to this CSV file as it comes.
        on_step: Called with each ``"step"`` row (a dict) after the step.
        on_epoch: Called with each ``"eval"`` row.
        progress: Show a tqdm bar.

    Returns:
        The log (:data:`LOG_COLUMNS`).

    Raises:
        ValueError: Unknown problem/optimizer, invalid limits or settings, or a data set that is
            not the problem's.
        DataError: The problem's data files are missing (see :mod:`mbf_analysis.data`).
        TrainingDiverged: NaN/Inf loss or gradient (the log so far is in ``.log`` and the CSV).
    """
    problem = get_problem(problem)
    preset = get_preset(problem, optimizer, lr=lr, damping=damping, weight_decay=weight_decay)
    _check_limits(time_budget, epochs, max_steps)
    # The first step of any torch.optim optimizer imports TorchDynamo (about a second); import
    # it before the clock starts, so that the first run of a comparison is not charged for it.
    import torch._dynamo  # noqa: F401

    if eval_samples is not None and eval_samples < 1:
        raise ValueError(f"eval_samples must be a positive integer, got {eval_samples}")
    if dataset is None:
        dataset = load_dataset(problem.dataset, data_dir)
    if dataset.name != problem.dataset:
        raise ValueError(
            f"problem {problem.name!r} trains on {problem.dataset!r}, got data set {dataset.name!r}"
        )
    torch.manual_seed(seed)
    model = build_model(problem.model, **problem.model_kwargs).to(device=device, dtype=dtype)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    label_generator = torch.Generator(device).manual_seed(seed)
    likelihood = problem.likelihood_loss()
    train_x = dataset.train_x.to(device=device, dtype=dtype)
    train_y = dataset.train_y.to(device)
    sets = {}
    for split, x, y in (("train", train_x, train_y), ("test", dataset.test_x, dataset.test_y)):
        index = _eval_indices(len(x), eval_samples)
        x, y = (x, y) if index is None else (x[index], y[index])
        sets[split] = (x.to(device=device, dtype=dtype), y.to(device))
    n_train = len(train_x)
    base = {"problem": problem.name, "optimizer": optimizer, "seed": seed}
    rows: list[dict[str, Any]] = []
    log = CsvLog(csv_path) if csv_path is not None else None
    clock = _Clock()
    state = {"step": 0, "seen": 0}

    def record(row: dict[str, Any]) -> dict[str, Any]:
        row = {**base, **row}
        rows.append(row)
        if log is not None:
            log.write(row)
        return row

    def position() -> dict[str, Any]:
        wall, cpu = clock.now()
        return {
            "step": state["step"],
            "epoch": state["seen"] / n_train,
            "wall_time": wall,
            "process_time": cpu,
        }

    def evaluate() -> None:
        clock.pause()
        train_loss, train_acc = _evaluate(model, problem, *sets["train"])
        test_loss, test_acc = _evaluate(model, problem, *sets["test"])
        row = record(
            {
                "kind": "eval",
                **position(),
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
            }
        )
        if on_epoch is not None:
            on_epoch(row)
        clock.resume()

    def frame() -> pd.DataFrame:
        return pd.DataFrame(rows, columns=list(LOG_COLUMNS))

    def diverged(what: str) -> TrainingDiverged:
        clock.pause()
        record({"kind": "end", **position(), "status": "diverged"})
        where = f"; the log so far is in {log.path}" if log is not None else ""
        return TrainingDiverged(
            f"{optimizer} on {problem.name} diverged at step {state['step'] + 1} "
            f"(lr {lr_now():g}, damping {preset.damping}): {what}; lower the lr or raise the "
            f"damping{where}",
            frame(),
        )

    def lr_now() -> float:
        return preset.lr if opt is None else opt.param_groups[0]["lr"]

    total_steps = None
    if epochs is not None:
        total_steps = epochs * math.ceil(n_train / problem.batch_size)
    if max_steps is not None:
        total_steps = min(total_steps or max_steps, max_steps)
    bar = tqdm(
        total=total_steps, desc=f"{problem.name} {optimizer}", unit="step", disable=not progress
    )
    status = None
    opt: Optimizer | None = None
    try:
        evaluate()
        opt = make_optimizer(optimizer, model, preset)
        if optimizer == "mbf" and preset.warm_start_epochs > 0:
            _warm_start(opt, model, problem, train_x, train_y, generator, preset.warm_start_epochs)
        epoch = 0
        while status is None:
            for group in opt.param_groups:
                group["lr"] = lr_at_epoch(preset, epoch)
            order = torch.randperm(n_train, generator=generator).to(device)
            for index in order.split(problem.batch_size):
                x = train_x[index]
                if problem.augment:
                    x = augment_batch(x, generator)
                targets = problem.targets(x, train_y[index])
                opt.zero_grad(set_to_none=True)
                outputs = model(x)
                loss = problem.loss_fn(outputs, targets)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise diverged(f"the minibatch loss is {value}")
                sampled = isinstance(opt, KFAC) and opt.needs_sampled_backward()
                loss.backward(retain_graph=sampled)
                if sampled:
                    opt.sampled_backward(outputs, likelihood, generator=label_generator)
                try:
                    opt.step()
                except NonFiniteError as err:
                    raise diverged(str(err)) from err
                state["step"] += 1
                state["seen"] += len(index)
                row = record({"kind": "step", **position(), "lr": lr_now(), "loss": value})
                bar.update()
                if state["step"] % 10 == 1:
                    bar.set_postfix(loss=f"{value:.4g}")
                if on_step is not None:
                    on_step(row)
                if time_budget is not None and row["wall_time"] >= time_budget:
                    status = "time_budget"
                elif max_steps is not None and state["step"] >= max_steps:
                    status = "max_steps"
                if status is not None:
                    break
            else:
                epoch += 1
                if epochs is not None and epoch >= epochs:
                    status = "epochs"
                evaluate()
                continue
            evaluate()
        clock.pause()
        record({"kind": "end", **position(), "status": status})
    except KeyboardInterrupt:
        clock.pause()
        record({"kind": "end", **position(), "status": "interrupted"})
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
        if isinstance(opt, KFAC):
            opt.remove_hooks()
    logger.info(
        "%s on %s: %s after %d steps, %.1f s",
        optimizer,
        problem.name,
        status,
        state["step"],
        clock.wall,
    )
    return frame()


def _warm_start(
    opt: MBF,
    model: nn.Module,
    problem: Problem,
    train_x: Tensor,
    train_y: Tensor,
    generator: torch.Generator,
    epochs: int,
) -> None:
    """MBF's warm start: ``F_b`` averaged over ``epochs`` passes of minibatch gradients."""
    order = torch.cat([torch.randperm(len(train_x), generator=generator) for _ in range(epochs)])
    batches = order.to(train_x.device).split(problem.batch_size)

    def backward(index: Tensor) -> None:
        x = train_x[index]
        problem.loss_fn(model(x), problem.targets(x, train_y[index])).backward()

    opt.warm_start(batches, backward)
