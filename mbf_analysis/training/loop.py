r"""One training run: an optimizer on a problem, under a time budget and/or an epoch limit,
resumable from its checkpoints.

The run (:func:`train`):

1. seeds ``torch.manual_seed(seed)`` and builds the model (so the seed fixes the initial
   weights), and draws every minibatch order (a fresh permutation of the training split per
   epoch, the last smaller batch kept) and augmentation from one ``torch.Generator`` seeded with
   ``seed``, and the sampled labels of a true-Fisher KFAC from a second one (on the training
   device, also seeded with ``seed``): two runs with the same seed on the same device take the
   same steps, and every optimizer of a comparison sees the same batches;
2. builds the optimizer from the preset (:func:`make_optimizer`), with the LR schedule
   ``α_e = α · 0.1^⌊e/K⌋`` set at the start of every epoch ``e``;
3. runs MBF's warm start if the preset asks for one, **outside the training clock** (its time
   is logged in a ``"warm_start"`` row) and on batches drawn from a third generator of its own
   (seeded from ``seed``), so that MBF's training batches are those of every other optimizer;
4. takes steps ``zero_grad → forward → L = (1/m) Σ_n ℓ_n → backward → step``. A KFAC with
   ``fisher="mc"`` (the presets': the paper's KFAC) also runs, on its statistics steps,
   :meth:`~mbf_analysis.optim.KFAC.sampled_backward` between the backward pass and the step:
   one extra backward pass of ``L̂ = (1/m) Σ_n ℓ(f_n, ŷ_n)``, ``ŷ_n ~ p(· | f_n)``
   (:meth:`Problem.likelihood_loss <mbf_analysis.training.problems.Problem.likelihood_loss>`),
   which feeds ``G``; the momentum still follows the gradient on the real targets. It is part of
   the step's time;
5. evaluates at step 0, after every epoch and at the end (``model.eval()``, no gradients).

**Limits.** The run ends at the first of ``epochs``, ``max_steps`` and ``time_budget`` seconds of
training on ``budget_clock`` (``"wall"``: ``time.perf_counter``; ``"process"``: CPU seconds of
all threads, ``time.process_time``, as the paper timed its runs; on a shared machine wall time
punishes whichever run is unlucky). The budget is respected: before each step the run predicts
the step's duration (the last step of the same phase of the optimizer's inverse period, e.g.
the last step that refreshed the inverses, else the last step) and stops when it would end past
the budget; the first step is always taken. Both clocks count the training steps only: not the
evaluations, not the warm start and not the construction of the optimizer.

**Log** (a tidy frame, :data:`LOG_COLUMNS`), one row per

- ``kind="step"``: ``step`` (1, 2, …), ``epoch`` (samples seen / training-set size, fractional),
  ``wall_time``, ``process_time`` (training time so far), ``lr``, ``loss`` (the minibatch loss
  *before* the step);
- ``kind="warm_start"``: ``wall_time``/``process_time`` are the warm start's own durations;
- ``kind="eval"``: ``train_loss`` (and ``train_accuracy`` for classifiers) on the training split
  or its first ``eval_samples`` samples of a fixed (seed-0) permutation, the same for every run,
  and ``test_loss``/``test_accuracy`` on the test split (or its first ``eval_samples``);
- ``kind="end"``: the last row of a run, ``status`` ∈ {``"time_budget"``, ``"epochs"``,
  ``"max_steps"``, ``"diverged"``, ``"interrupted"``}.

Every row carries ``run``, the run's name (:func:`run_name`: optimizer, hyper-parameters and
seed). With ``csv_path`` every row is appended to the CSV file as soon as it exists (header
once, flushed), so an interrupted or crashed run leaves a valid CSV of everything so far.

**Checkpoints and resume** (:mod:`mbf_analysis.training.checkpoint`). With ``checkpoint_dir``
the run saves everything it needs to continue identically (model, optimizer state, position in
the data order, every generator, the clocks, the log position) after the warm start, every
``checkpoint_every`` steps or (by default) after the first step that ends
``checkpoint_interval`` seconds after the last save, when Ctrl-C stops it, and at its end. A
SIGKILL therefore loses at most the steps since the last checkpoint. Ctrl-C (SIGINT) or SIGTERM
stops the run after the step in progress, checkpointed, with
:class:`~mbf_analysis.stopping.StopRequested` (a second signal stops at once, without saving;
:mod:`mbf_analysis.stopping`). With
``resume=True`` a run continues from its last good checkpoint: its rows of the CSV after the
checkpoint are dropped, so every step appears exactly once, and its time budget counts the time
already spent; a finished run is returned as it is, unless the limits now reach further (a
larger ``epochs``, ``max_steps`` or ``time_budget``), in which case it continues. Changed
settings that alter the trajectory are refused, naming them. On CPU with one thread a resumed
run repeats the uninterrupted one bit for bit.

**Divergence.** A NaN/Inf minibatch loss, or a NaN/Inf gradient refused by a curvature optimizer,
ends the run with an ``"end"`` row of status ``"diverged"`` and raises :class:`TrainingDiverged`
(a :class:`~mbf_analysis.errors.NonFiniteError`) carrying the log so far in ``.log``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from tqdm.auto import tqdm

from mbf_analysis.data import Dataset, load_dataset
from mbf_analysis.errors import ConfigError, NonFiniteError
from mbf_analysis.models import build_model
from mbf_analysis.optim import KFAC, MBF, MethodOptimizer, Shampoo
from mbf_analysis.stopping import StopRequests, stop_requests
from mbf_analysis.training import distributed
from mbf_analysis.training.checkpoint import drop_previous, load_checkpoint, save_checkpoint
from mbf_analysis.training.log import LOG_COLUMNS, CsvLog, keep_rows, read_log
from mbf_analysis.training.presets import (
    GENERIC_OPTIMIZERS,
    Preset,
    get_preset,
    lr_at_epoch,
    split_optimizer,
)
from mbf_analysis.training.problems import Problem, augment_batch, get_problem

__all__ = [
    "BUDGET_CLOCKS",
    "TrainingDiverged",
    "make_optimizer",
    "run_name",
    "train",
]

logger = logging.getLogger(__name__)

_EVAL_CHUNK = 1000

BudgetClock = Literal["wall", "process"]
BUDGET_CLOCKS: tuple[str, ...] = ("wall", "process")
"""What ``time_budget`` counts: wall-clock or process (CPU) seconds of training."""


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


def make_optimizer(
    name: str,
    model: nn.Module,
    preset: Preset,
    likelihood: nn.Module | None = None,
    seed: int = 0,
) -> Optimizer:
    """The optimizer ``name`` for ``model`` with the preset's settings.

    - ``"sgdm"``: ``torch.optim.SGD`` (momentum 0.9, dampening 0) with decoupled weight decay
      ``θ ← (1 − αγ) θ`` applied by a step pre-hook (SGDW);
    - ``"adam"``: ``torch.optim.AdamW`` (β = (0.9, 0.999), ``eps`` = the preset's damping);
      its weight decay is the same decoupled rule, and with ``γ = 0`` it is Adam;
    - ``"mbf"``, ``"kfac"``, ``"shampoo"``: :class:`~mbf_analysis.optim.MBF`,
      :class:`~mbf_analysis.optim.KFAC` (which hooks the model's layers; the presets set
      ``fisher="mc"``, the paper's KFAC, and :func:`train` then runs the sampled-label
      backward pass),
      :class:`~mbf_analysis.optim.Shampoo` (``eps`` = damping), momentum 0.9, EMA decay 0.9,
      the preset's periods and options;
    - the :data:`~mbf_analysis.training.presets.GENERIC_OPTIMIZERS` (the Kronecker-SVD family,
      two-level KFAC, ``"kfac-koroko"``): :class:`~mbf_analysis.optim.MethodOptimizer` with the
      registry method, the preset's damping, periods and options (Fisher fraction, KL clip,
      momentum, EMA), ``likelihood`` naming the predictive distribution, and its own generator
      of sampled labels seeded with ``seed``.

    Raises:
        ValueError: For an unknown name, or a generic optimizer without ``likelihood``.
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
    name = split_optimizer(name)[0]
    if name in GENERIC_OPTIMIZERS:
        if likelihood is None:
            raise ConfigError(f"optimizer {name!r} needs the likelihood loss module")
        options = dict(preset.options)
        return MethodOptimizer(
            model,
            GENERIC_OPTIMIZERS[name],
            lr=preset.lr,
            loss_fn=likelihood,
            weight_decay=preset.weight_decay,
            fisher_fraction=options.pop("fisher_fraction", 0.25),
            kl_clip=options.pop("kl_clip", None),
            generator=seed,
            damping=preset.damping,
            **{
                name: period
                for name, period in (
                    ("stat_period", preset.stat_period),
                    ("inverse_period", preset.inverse_period),
                )
                if period is not None
            },
            **options,
        )
    known = ", ".join(("mbf", "adam", "sgdm", "kfac", "shampoo", *GENERIC_OPTIMIZERS))
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {known}")


def run_name(optimizer: str, preset: Preset, seed: int) -> str:
    """The name of a run in logs and checkpoint files: optimizer, lr, damping, weight decay and
    seed, e.g. ``"mbf_lr1e-05_damping0.0003_wd0_seed0"``."""
    damping = "none" if preset.damping is None else f"{preset.damping:g}"
    return f"{optimizer}_lr{preset.lr:g}_damping{damping}_wd{preset.weight_decay:g}_seed{seed}"


def _derived_seed(seed: int, purpose: str) -> int:
    """A seed for a generator of its own, derived from ``seed`` and a name (64 bits)."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


def _check_limits(
    time_budget: float | None, epochs: int | None, max_steps: int | None, budget_clock: str
) -> None:
    if time_budget is None and epochs is None and max_steps is None:
        raise ConfigError("give time_budget (seconds) or epochs (or max_steps) to end the run")
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise ConfigError(f"time_budget must be a positive number of seconds, got {time_budget}")
    for name, value in (("epochs", epochs), ("max_steps", max_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    if budget_clock not in BUDGET_CLOCKS:
        raise ConfigError(f"budget_clock must be one of {BUDGET_CLOCKS}, got {budget_clock!r}")


class _Clock:
    """Training time: wall and process seconds, paused during evaluations and the warm start."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.wall = wall
        self.cpu = cpu
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


_LIMITS: tuple[str | None, ...] = (None, "max_steps", "time_budget")
"""The limits a step can hit, in the order :func:`distributed.agree` codes them."""


def _check_split(batch_size: int, n_train: int, world: distributed.World) -> None:
    """Refuse a global batch that the processes cannot share."""
    if batch_size % world.size:
        raise ConfigError(
            f"the global batch of {batch_size} samples does not divide among {world.size} "
            f"processes; give a batch size that is a multiple of {world.size}"
        )
    last = n_train % batch_size
    if 0 < last < world.size:
        raise ConfigError(
            f"the last batch of an epoch has {last} sample(s), fewer than the {world.size} "
            "processes; choose another batch size or number of processes"
        )


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {name: g.get_state() for name, g in generators.items()}
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generators: dict[str, torch.Generator], state: dict[str, Any]) -> None:
    for name, generator in generators.items():
        generator.set_state(state[name])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Run:
    """The state of one run of :func:`train` (see the module docstring)."""

    def __init__(self, problem: Problem, optimizer: str, preset: Preset, options: dict) -> None:
        self.problem = problem
        self.optimizer_name = optimizer
        self.preset = preset
        self.options = options
        self.world: distributed.World | None = options["world"]
        self.main = self.world is None or self.world.main
        seed = options["seed"]
        self.run = run_name(optimizer, preset, seed)
        device, dtype = options["device"], options["dtype"]
        dataset = options["dataset"]
        torch.manual_seed(seed)
        self.model = build_model(problem.model, **problem.model_kwargs).to(
            device=device, dtype=dtype
        )
        self.model.train()
        self.net: nn.Module = self.model
        if self.world is not None:
            ids = [torch.device(device)] if torch.device(device).type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.generators = {
            "batches": torch.Generator().manual_seed(seed),
            "labels": torch.Generator(device).manual_seed(seed),
            "warm_start": torch.Generator().manual_seed(_derived_seed(seed, "warm start")),
        }
        self.likelihood = problem.likelihood_loss()
        self.train_x = dataset.train_x.to(device=device, dtype=dtype)
        self.train_y = dataset.train_y.to(device)
        self.sets = {}
        splits = (("train", self.train_x, self.train_y), ("test", dataset.test_x, dataset.test_y))
        for split, x, y in splits:
            index = _eval_indices(len(x), options["eval_samples"])
            x, y = (x, y) if index is None else (x[index], y[index])
            self.sets[split] = (x.to(device=device, dtype=dtype), y.to(device))
        self.n_train = len(self.train_x)
        self.n_batches = math.ceil(self.n_train / problem.batch_size)
        self.base = {"run": self.run, "problem": problem.name, "optimizer": optimizer, "seed": seed}
        self.rows: list[dict[str, Any]] = []
        self.log: CsvLog | None = None
        self.clock = _Clock()
        self.warm = {"wall": 0.0, "cpu": 0.0}
        self.step = 0
        self.seen = 0
        self.epoch = 0
        self.batch = 0
        self.order: Tensor | None = None
        self.opt: Optimizer | None = None
        self.durations: dict[int, float] = {}
        self.last_duration = 0.0
        self.saved_at = time.perf_counter()
        self.stop = StopRequests()
        self.settings = {
            "problem": problem.name,
            "code_activation": problem.code_activation,
            "optimizer": optimizer,
            "seed": seed,
            "batch_size": problem.batch_size,
            "lr": preset.lr,
            "damping": preset.damping,
            "weight_decay": preset.weight_decay,
            "dtype": str(dtype).removeprefix("torch."),
            "device_type": torch.device(device).type,
            "eval_samples": options["eval_samples"],
            "world_size": None if self.world is None else self.world.size,
        }
        if self.world is not None:
            _check_split(problem.batch_size, self.n_train, self.world)

    # ------------------------------------------------------------------ rows
    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**self.base, **row}
        self.rows.append(row)
        if self.log is not None:
            self.log.write(row)
        return row

    def position(self) -> dict[str, Any]:
        wall, cpu = self.clock.now()
        return {
            "step": self.step,
            "epoch": self.seen / self.n_train,
            "wall_time": wall,
            "process_time": cpu,
        }

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(LOG_COLUMNS))

    def evaluate(self) -> None:
        """Evaluate (under ``torchrun`` on rank 0, which sends the values to the others: every
        process logs the same rows)."""
        self.clock.pause()
        values = None
        if self.main:
            values = (
                *_evaluate(self.model, self.problem, *self.sets["train"]),
                *_evaluate(self.model, self.problem, *self.sets["test"]),
            )
        if self.world is not None:
            values = distributed.broadcast_object(values, self.world)
        train_loss, train_acc, test_loss, test_acc = values
        row = self.record(
            {
                "kind": "eval",
                **self.position(),
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
            }
        )
        if self.options["on_epoch"] is not None:
            self.options["on_epoch"](row)
        self.clock.resume()

    def lr_now(self) -> float:
        return self.preset.lr if self.opt is None else self.opt.param_groups[0]["lr"]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, status: str | None) -> None:
        folder = self.options["checkpoint_dir"]
        if folder is None:
            return
        rng = _rng_state(self.generators)
        if self.world is not None:
            ranks = distributed.gather_objects(rng, self.world)
            if not self.main:
                self.saved_at = time.perf_counter()
                return
            rng = {**rng, "ranks": ranks}
        wall, cpu = self.clock.now()
        save_checkpoint(
            folder,
            self.run,
            {
                "settings": self.settings,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "position": {
                    "step": self.step,
                    "epoch": self.epoch,
                    "batch": self.batch,
                    "seen": self.seen,
                    "order": None if self.order is None else self.order.cpu(),
                    "log_rows": len(self.rows),
                },
                "rng": rng,
                "clock": {
                    "wall": wall,
                    "cpu": cpu,
                    "warm_wall": self.warm["wall"],
                    "warm_cpu": self.warm["cpu"],
                    "durations": dict(self.durations),
                    "last_duration": self.last_duration,
                },
                "status": status,
            },
        )
        self.saved_at = time.perf_counter()

    def restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.opt.load_state_dict(payload["optimizer"])
        position = payload["position"]
        self.step, self.epoch = int(position["step"]), int(position["epoch"])
        self.batch, self.seen = int(position["batch"]), int(position["seen"])
        order = position["order"]
        self.order = None if order is None else order.to(self.train_x.device)
        rng = payload["rng"]
        if self.world is not None:
            rng = rng["ranks"][self.world.rank]
        _set_rng_state(self.generators, rng)
        clock = payload["clock"]
        self.clock = _Clock(float(clock["wall"]), float(clock["cpu"]))
        self.warm = {"wall": float(clock["warm_wall"]), "cpu": float(clock["warm_cpu"])}
        self.durations = {int(k): float(v) for k, v in clock["durations"].items()}
        self.last_duration = float(clock["last_duration"])

    def checkpoint_due(self) -> bool:
        every = self.options["checkpoint_every"]
        if every is not None:
            return self.step % every == 0
        return time.perf_counter() - self.saved_at >= self.options["checkpoint_interval"]

    # ------------------------------------------------------------------ limits
    def budget_used(self) -> float:
        wall, cpu = self.clock.now()
        return wall if self.options["budget_clock"] == "wall" else cpu

    def phase(self, step: int) -> int:
        period = getattr(self.opt, "inverse_period", None) or self.preset.inverse_period or 1
        return step % period

    def limit_before_step(self) -> str | None:
        """The reason to stop before taking step ``self.step + 1``, or ``None``; under
        ``torchrun`` rank 0's (its clock measures the budget), agreed by every process."""
        status = self._own_limit() if self.main else None
        if self.world is None:
            return status
        code = distributed.agree([float(_LIMITS.index(status))])[0]
        return _LIMITS[int(code)]

    def stop_and_save_due(self) -> tuple[bool, bool]:
        """Whether a stop was asked for (on any process) and whether a checkpoint is due now
        (on rank 0's clock), agreed by every process."""
        stop, due = self.stop.requested, self.main and self.checkpoint_due()
        if self.world is not None:
            stop, due = (bool(v) for v in distributed.agree([float(stop), float(due)]))
        return stop, due

    def _own_limit(self) -> str | None:
        max_steps, budget = self.options["max_steps"], self.options["time_budget"]
        if max_steps is not None and self.step >= max_steps:
            return "max_steps"
        if budget is not None:
            used = self.budget_used()
            predicted = self.durations.get(self.phase(self.step), self.last_duration)
            if self.step > 0 and (used >= budget or used + predicted > budget):
                return "time_budget"
        return None

    # ------------------------------------------------------------------ one step
    def take_step(self) -> None:
        index = self.order[self.batch * self.problem.batch_size :][: self.problem.batch_size]
        opt, problem = self.opt, self.problem
        started = self.budget_used()
        x = self.train_x[index]
        if problem.augment:
            x = augment_batch(x, self.generators["batches"])
        x, labels, share = self.local_part(x, self.train_y[index])
        targets = problem.targets(x, labels)
        opt.zero_grad(set_to_none=True)
        outputs = self.net(x)
        loss = problem.loss_fn(outputs, targets)
        if self.world is None:
            value = float(loss.detach())
        else:
            value = distributed.global_mean(loss, len(x), len(index))
        if not math.isfinite(value):
            raise self.diverged(f"the minibatch loss is {value}")
        sampled = isinstance(opt, KFAC) and opt.needs_sampled_backward()
        (loss if share == 1.0 else loss * share).backward(retain_graph=sampled)
        if sampled:
            opt.sampled_backward(outputs, self.likelihood, generator=self.generators["labels"])
        try:
            if isinstance(opt, MethodOptimizer):
                opt.step(inputs=x, targets=targets)
            else:
                opt.step()
        except NonFiniteError as err:
            raise self.diverged(str(err)) from err
        duration = self.budget_used() - started
        self.durations[self.phase(self.step)] = duration
        self.last_duration = duration
        self.step += 1
        self.batch += 1
        self.seen += len(index)
        row = self.record({"kind": "step", **self.position(), "lr": self.lr_now(), "loss": value})
        if self.options["on_step"] is not None:
            self.options["on_step"](row)

    def local_part(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, float]:
        """This process's slice of a global batch, and the weight of its mean loss
        (``n_r · W / N``) that makes DDP's average of the gradients the global mean's."""
        if self.world is None:
            return x, labels, 1.0
        part = distributed.local_slice(torch.arange(len(x), device=x.device), self.world)
        return x[part], labels[part], len(part) * self.world.size / len(x)

    def diverged(self, what: str) -> TrainingDiverged:
        self.clock.pause()
        self.record({"kind": "end", **self.position(), "status": "diverged"})
        self.checkpoint("diverged")
        where = f"; the log so far is in {self.log.path}" if self.log is not None else ""
        return TrainingDiverged(
            f"{self.optimizer_name} on {self.problem.name} diverged at step {self.step + 1} "
            f"(lr {self.lr_now():g}, damping {self.preset.damping}): {what}; lower the lr or "
            f"raise the damping{where}",
            self.frame(),
        )

    # ------------------------------------------------------------------ the run
    def warm_start(self) -> None:
        """MBF's warm start (outside the clock, on its own generator), logged in one row."""
        epochs = self.preset.warm_start_epochs
        generator = self.generators["warm_start"]
        order = torch.cat(
            [torch.randperm(self.n_train, generator=generator) for _ in range(epochs)]
        )
        batches = order.to(self.train_x.device).split(self.problem.batch_size)

        def backward(index: Tensor) -> None:
            x, labels, share = self.local_part(self.train_x[index], self.train_y[index])
            loss = self.problem.loss_fn(self.net(x), self.problem.targets(x, labels))
            (loss if share == 1.0 else loss * share).backward()

        wall, cpu = time.perf_counter(), time.process_time()
        self.opt.warm_start(batches, backward)
        self.warm = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        self.record(
            {
                "kind": "warm_start",
                "step": 0,
                "epoch": 0.0,
                "wall_time": self.warm["wall"],
                "process_time": self.warm["cpu"],
            }
        )

    def loop(self, bar: tqdm) -> str:
        """Steps until a limit; returns the status."""
        epochs = self.options["epochs"]
        while True:
            if self.batch == 0:
                for group in self.opt.param_groups:
                    group["lr"] = lr_at_epoch(self.preset, self.epoch)
                self.order = torch.randperm(self.n_train, generator=self.generators["batches"]).to(
                    self.train_x.device
                )
            while self.batch < self.n_batches:
                status = self.limit_before_step()
                if status is not None:
                    return status
                self.take_step()
                bar.update()
                if self.step % 10 == 1:
                    bar.set_postfix(loss=f"{self.rows[-1]['loss']:.4g}")
                stop, due = self.stop_and_save_due()
                if stop:
                    self.clock.pause()
                    self.checkpoint(None)
                    self.record({"kind": "end", **self.position(), "status": "interrupted"})
                    if not self.stop.requested:  # another process got the signal
                        self.stop.request(signal.SIGTERM)
                    self.stop.check()
                if due:
                    self.checkpoint(None)
            self.epoch += 1
            self.batch = 0
            self.order = None
            if epochs is not None and self.epoch >= epochs:
                return "epochs"
            status = self.limit_before_step()
            if status is not None:
                return status
            self.evaluate()

    def finished(self) -> bool:
        """Whether the limits stop the run at its current position (for a finished run's
        checkpoint: whether an extension has anything to do)."""
        epochs = self.options["epochs"]
        if epochs is not None and self.epoch >= epochs:
            return True
        return self.limit_before_step() is not None


def train(
    problem: str | Problem,
    optimizer: str,
    *,
    time_budget: float | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    budget_clock: BudgetClock = "wall",
    presets: str = "ours",
    lr: float | None = None,
    damping: float | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    dataset: Dataset | None = None,
    data_dir: str | Path | None = None,
    eval_samples: int | None = None,
    csv_path: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    checkpoint_interval: float = 60.0,
    resume: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Train the problem's model with one optimizer (module docstring for the protocol).

    The run ends at the first of: ``time_budget`` seconds of training on ``budget_clock``,
    ``epochs`` epochs, ``max_steps`` steps; at least one must be given.

    Args:
        problem: A name of :data:`~mbf_analysis.training.problems.PROBLEMS` or a
            :class:`~mbf_analysis.training.problems.Problem`.
        optimizer: A name of :data:`~mbf_analysis.training.presets.OPTIMIZERS`.
        time_budget: Seconds of training on ``budget_clock``.
        epochs: Epochs.
        max_steps: Steps.
        budget_clock: ``"wall"`` or ``"process"`` (CPU seconds of all threads).
        presets: The preset set, ``"ours"`` or ``"paper"``
            (:data:`~mbf_analysis.training.presets.PRESET_SETS`).
        lr: Replaces the preset's learning rate (the schedule scales it).
        damping: Replaces the preset's damping (``ε`` for Adam and Shampoo).
        weight_decay: Replaces the preset's decoupled weight decay.
        seed: Seed of the initial weights, the batch order and the augmentation.
        batch_size: Replaces the problem's minibatch size ``m`` (the paper's: 1000 for the
            autoencoders, 128 for the CNNs).
        device: Where to train.
        dtype: Precision of the model and the data.
        dataset: The problem's data set if already loaded (else loaded from ``data_dir``).
        data_dir: Where :func:`~mbf_analysis.data.load_dataset` looks first.
        eval_samples: Evaluate on at most this many training and test samples (default: all).
        csv_path: Append every log row to this CSV file as it comes (default with
            ``checkpoint_dir``: ``<checkpoint_dir>/train_log.csv``).
        checkpoint_dir: Save checkpoints there (``<run>.pt``, module docstring).
        checkpoint_every: Save every this many steps (default: by time).
        checkpoint_interval: Seconds between time-based saves.
        resume: Continue from the run's last checkpoint in ``checkpoint_dir`` (a fresh start
            when it has none).
        on_step: Called with each ``"step"`` row (a dict) after the step.
        on_epoch: Called with each ``"eval"`` row.
        progress: Show a tqdm bar.

    Returns:
        The run's whole log (:data:`LOG_COLUMNS`), rows from before a resume included.

    Raises:
        ValueError: Unknown problem/optimizer, invalid limits or settings, a data set that is
            not the problem's, ``resume`` without ``checkpoint_dir``, or a CSV that already holds
            rows of this run when not resuming.
        DataError: The problem's data files are missing (see :mod:`mbf_analysis.data`).
        CheckpointError: No readable checkpoint, or one saved with other settings.
        TrainingDiverged: NaN/Inf loss or gradient (the log so far is in ``.log`` and the CSV).
        StopRequested: After Ctrl-C or SIGTERM, once the checkpoint is saved (a
            ``KeyboardInterrupt``; :mod:`mbf_analysis.stopping`).
    """
    problem = get_problem(problem)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        problem = replace(problem, batch_size=batch_size)
    preset = get_preset(
        problem, optimizer, lr=lr, damping=damping, weight_decay=weight_decay, presets=presets
    )
    _check_limits(time_budget, epochs, max_steps, budget_clock)
    if eval_samples is not None and eval_samples < 1:
        raise ConfigError(f"eval_samples must be a positive integer, got {eval_samples}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be a positive integer, got {checkpoint_every}")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs checkpoint_dir, the folder of the run's checkpoints")
    if checkpoint_dir is not None and csv_path is None:
        csv_path = Path(checkpoint_dir) / "train_log.csv"
    # The first step of any torch.optim optimizer imports TorchDynamo (about a second); import
    # it before the clock starts, so that the first run of a comparison is not charged for it.
    import torch._dynamo  # noqa: F401

    if dataset is None:
        dataset = load_dataset(problem.dataset, data_dir)
    if dataset.name != problem.dataset:
        raise ConfigError(
            f"problem {problem.name!r} trains on {problem.dataset!r}, got data set {dataset.name!r}"
        )
    options = {
        "time_budget": time_budget,
        "epochs": epochs,
        "max_steps": max_steps,
        "budget_clock": budget_clock,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "dataset": dataset,
        "eval_samples": eval_samples,
        "checkpoint_dir": None if checkpoint_dir is None else Path(checkpoint_dir),
        "checkpoint_every": checkpoint_every,
        "checkpoint_interval": checkpoint_interval,
        "on_step": on_step,
        "on_epoch": on_epoch,
        "world": distributed.current_world(),
    }
    run = _Run(problem, optimizer, preset, options)
    saved = None
    if resume:
        saved = load_checkpoint(checkpoint_dir, run.run, run.settings)
    run.opt = make_optimizer(optimizer, run.model, preset, problem.likelihood_loss(), seed)
    try:
        # Under torchrun only rank 0 reads and writes the CSV; the others get what they need.
        if saved is not None:
            run.restore(saved)

            def rows_of_run() -> pd.DataFrame:
                log = read_log(csv_path)
                return log[log.run == run.run]

            previous = distributed.on_main(rows_of_run, run.world)
            if saved["status"] == "diverged" or (saved["status"] is not None and run.finished()):
                logger.info("%s: finished (%s), kept as it is", run.run, saved["status"])
                return previous.reset_index(drop=True)
            kept = int(saved["position"]["log_rows"])
            distributed.on_main(lambda: keep_rows(csv_path, run.run, kept), run.world)
            run.rows = previous.iloc[:kept].to_dict("records")
        elif csv_path is not None:

            def clash() -> bool:
                if not Path(csv_path).is_file():
                    return False
                if resume:
                    keep_rows(csv_path, run.run, 0)
                    return False
                return bool((read_log(csv_path).run == run.run).any())

            if distributed.on_main(clash, run.world):
                raise ConfigError(
                    f"{csv_path} already holds rows of run {run.run!r}; resume it "
                    "(resume=True with its checkpoint_dir) or log to another file"
                )
        if csv_path is not None and run.main:
            run.log = CsvLog(csv_path)
        return _execute(run, fresh=saved is None, progress=progress and run.main)
    finally:
        if run.log is not None:
            run.log.close()
        if isinstance(run.opt, KFAC):
            run.opt.remove_hooks()


def _execute(run: _Run, *, fresh: bool, progress: bool) -> pd.DataFrame:
    """Run the steps of a fresh or restored :class:`_Run` to its end; returns its log."""
    options = run.options
    total = None
    if options["epochs"] is not None:
        total = options["epochs"] * run.n_batches
    if options["max_steps"] is not None:
        total = min(total or options["max_steps"], options["max_steps"])
    bar = tqdm(
        total=total,
        initial=run.step,
        desc=f"{run.problem.name} {run.optimizer_name}",
        unit="step",
        disable=not progress,
    )
    try:
        with stop_requests() as run.stop:
            if fresh:
                run.evaluate()
                run.clock.pause()
                if run.optimizer_name == "mbf" and run.preset.warm_start_epochs > 0:
                    run.warm_start()
                run.checkpoint(None)
            run.clock.resume()
            status = run.loop(bar)
            run.evaluate()
            run.clock.pause()
            run.checkpoint(status)
            if options["checkpoint_dir"] is not None and run.main:
                drop_previous(options["checkpoint_dir"], run.run)
            run.record({"kind": "end", **run.position(), "status": status})
    except KeyboardInterrupt:
        run.clock.pause()
        if not run.rows or run.rows[-1].get("status") != "interrupted":
            run.record({"kind": "end", **run.position(), "status": "interrupted"})
        raise
    finally:
        bar.close()
    logger.info(
        "%s on %s: %s after %d steps, %.1f s",
        run.optimizer_name,
        run.problem.name,
        status,
        run.step,
        run.clock.wall,
    )
    return run.frame()
