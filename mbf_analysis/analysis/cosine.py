r"""Cosine along the BDF trajectory (paper Fig. 6 and Algorithm 5; METHODS.md §5).

The network is trained with BDF (:class:`~mbf_analysis.methods.BDF`, one dense empirical-Fisher
block per layer, gradient and blocks both averaged with decay ``β = 0.9``), and at every iterate
``θ_k`` each compared method ``X`` folds the same minibatch statistics into its own state; per
layer ``l`` we record how well ``X``'s direction agrees with BDF's:

.. math::

    c_{X,l}^{(k)} = \frac{\langle d_{X,l}^{(k)}, d_{\mathrm{BDF},l}^{(k)} \rangle}
                         {\lVert d_{X,l}^{(k)} \rVert \, \lVert d_{\mathrm{BDF},l}^{(k)} \rVert},
    \qquad
    \theta_{k+1} = \theta_k - \alpha \, d_{\mathrm{BDF}}^{(k)} .

Per iteration ``k`` (:class:`CosineRun`):

1. draw a minibatch of ``m`` samples (see *Minibatches*);
2. run **one** :func:`~mbf_analysis.curvature.collect.collect` pass for the union of what the
   compared methods and BDF need (one forward pass, one backward pass, plus one backward pass on
   sampled labels when MBF-True or true-Fisher KFAC is compared);
3. let every method ``update(stats)`` at ``θ_k`` (stateful: momenta and EMAs carry over from
   step to step), and take every method's ``direction()`` (its preconditioned first moment);
4. record ``c_{X,l}^{(k)}`` for every chosen layer and method (flat vectors in METHODS §2 order,
   the cosine computed in float64 and clipped to ``[−1, 1]``; ``NaN`` when either direction is
   zero or not finite) and the minibatch loss ``L(θ_k)`` on the real labels;
5. step ``θ ← θ − α d_BDF`` (every layer, in place).

Methods run with their registry defaults, which are the stateful forms the paper compares:
SGD-m ``μ = 0.9``; Adam ``β₁ = 0.9``, ``β₂ = 0.999``, ``ε = 1e-8``; MBF and MBF-True ``μ = 0.9``,
``β = 0.9``, ``T1 = T2 = 1``; KFAC (true Fisher, ``"split"`` damping) and Shampoo (``ε = 1e-4``)
``μ = 0.9``, ``β = 0.9``, periods 1; BDF ``β = 0.9``. :attr:`CosineConfig.damping` is given to
every method with a ``damping`` field (BDF, the MBF family, KFAC); anything else goes through
:attr:`CosineConfig.method_options`. Cosines do not depend on the scale of a direction, so BDF's
EMA first moment ``(1 − β) Σ β^j g`` and the torch-style momenta ``Σ μ^j g`` compare directly.

Minibatches: sampled without replacement within an epoch. At the start of every epoch a fresh
permutation of the ``N`` training samples is drawn, and consecutive slices of ``m`` indices form
the minibatches; the last ``N mod m`` indices of an epoch are dropped, so every minibatch has
exactly ``m`` samples. The permutation comes from a CPU generator, the sampled labels from a
second generator on the model's device; both are seeded from :attr:`CosineConfig.seed`
(``numpy.random.SeedSequence(seed).generate_state(2)``), so the minibatch sequence does not
depend on which methods are compared, and a run is deterministic for a seed.

Defaults: ``α = 0.1`` and ``λ = 0.003`` (the registry default of every damped method and the
paper's value), ``m = 256``. On ``digits-mlp`` with the embedded 8×8 digits (cross-entropy,
float64, seed 0) BDF's minibatch loss then falls 2.30 → 0.66 → 0.055 → 0.0039 → 0.0003 at
iterations 0, 9, 24, 49, 99, with every direction finite. A grid over 50 iterations stayed finite
and decreasing for ``α ∈ {0.03, 0.1, 0.3, 1}`` with ``λ = 0.01`` and for ``λ ∈ {0.001, 0.003,
0.01, 0.03}`` with ``α = 0.1``; a larger ``λ`` pulls every damped direction towards its first
moment (MBF's cosine towards SGD-m's: on ``fc1`` over iterations 0–24, MBF 0.72/0.60 vs SGD-m
0.61/0.43 at ``λ = 0.003``, but 0.86/0.68 vs 0.84/0.62 at ``λ = 0.01``). Other models need
their own ``α`` and ``λ``; a diverging run stops with :class:`CosineDivergedError`.

Example::

    run = CosineRun(model, nn.CrossEntropyLoss(), x, y, CosineConfig(iterations=50))
    frame = run.run(on_record=lambda rows: rows.to_csv(path, mode="a", header=False))
    frame.groupby(["layer", "method"]).cosine.mean()
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mbf_analysis import methods as registry
from mbf_analysis.curvature.collect import Stats, collect
from mbf_analysis.errors import NonFiniteError
from mbf_analysis.layout import LayerLayout, model_layouts
from mbf_analysis.methods import Method

__all__ = [
    "COLUMNS",
    "DEFAULT_METHODS",
    "REFERENCE",
    "CosineConfig",
    "CosineDivergedError",
    "CosineRun",
    "cosine_trajectory",
]

logger = logging.getLogger(__name__)

REFERENCE = "bdf"
"""The method whose direction is followed and compared against."""

DEFAULT_METHODS: tuple[str, ...] = ("mbf", "mbf-true", "kfac", "shampoo", "adam", "sgdm")
"""The methods of the paper's Fig. 6."""

COLUMNS: tuple[str, ...] = ("iteration", "layer", "method", "cosine", "loss")
"""Columns of the tidy frames (one row per iteration, layer and compared method)."""


def _positive_int(config: object, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CosineConfig.{name} must be a positive integer, got {value!r}.")


def _positive_float(config: object, name: str) -> None:
    value = getattr(config, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"CosineConfig.{name} must be a finite number > 0, got {value!r}.")


@dataclass(kw_only=True)
class CosineConfig:
    """Settings of the trajectory analysis (module docstring).

    Attributes:
        methods: Registry names of the compared methods (:func:`mbf_analysis.methods.names`),
            in the order of the rows; ``"bdf"`` is allowed (its cosine is 1).
        iterations: Number of iterations :meth:`CosineRun.run` does by default.
        batch_size: Minibatch size ``m`` (at most the number of training samples).
        lr: Learning rate ``α`` of the BDF step.
        damping: ``λ``, given to every method with a ``damping`` field (BDF, MBF, MBF-True,
            MBF-exact, KFAC).
        layers: Layers (module names) whose cosines are recorded; ``None``: every layer with
            parameters. The step always moves every layer.
        seed: Seed (``≥ 0``) of the minibatch order and of the sampled labels.
        method_options: Method name → its own configuration fields, taking precedence over
            ``damping`` (e.g. ``{"kfac": {"damping_mode": "eigen"}, "bdf": {"decay": 0.95}}``);
            names must be compared methods or ``"bdf"``.

    Raises:
        ValueError: For an unknown or repeated method, an option for a method that is not run,
            or an invalid value.
        TypeError: For an option field that the method does not have.
    """

    methods: Sequence[str] = DEFAULT_METHODS
    iterations: int = 100
    batch_size: int = 256
    lr: float = 0.1
    damping: float = 0.003
    layers: Sequence[str] | None = None
    seed: int = 0
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        known = registry.names()
        if not self.methods:
            raise ValueError(f"CosineConfig.methods is empty; choose from {known}.")
        unknown = [name for name in self.methods if name not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {known}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"CosineConfig.methods repeats a method: {list(self.methods)}.")
        _positive_int(self, "iterations")
        _positive_int(self, "batch_size")
        _positive_float(self, "lr")
        _positive_float(self, "damping")
        if self.layers is not None:
            self.layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not self.layers or len(set(self.layers)) != len(self.layers):
                raise ValueError(
                    f"CosineConfig.layers must be None or distinct layer names, got "
                    f"{list(self.layers)}."
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"CosineConfig.seed must be an integer ≥ 0, got {self.seed!r}.")
        self.method_options = {name: dict(opts) for name, opts in self.method_options.items()}
        stray = sorted(set(self.method_options) - set(self.run_methods))
        if stray:
            raise ValueError(
                f"method_options given for {stray}, which this run does not use; it runs "
                f"{list(self.run_methods)}."
            )
        self.build_methods()

    @property
    def run_methods(self) -> tuple[str, ...]:
        """The compared methods, then the reference BDF if it is not among them."""
        return self.methods + (() if REFERENCE in self.methods else (REFERENCE,))

    def build_methods(self) -> dict[str, Method]:
        """Fresh instances of :attr:`run_methods` (one shared BDF when it is also compared)."""
        return registry.build_methods(self.run_methods, damping=self.damping, **self.method_options)


class CosineDivergedError(NonFiniteError):
    """The BDF trajectory produced NaN or Inf.

    Attributes:
        iteration: The iteration ``k`` at which it happened (its rows are not recorded).
        frame: The rows that the failing :meth:`CosineRun.run` call recorded before it (columns
            :data:`COLUMNS`; they were also handed to ``on_record``).
    """

    def __init__(self, message: str, *, iteration: int) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.frame = pd.DataFrame(columns=list(COLUMNS))


def _cosine(a: Tensor, b: Tensor) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` in float64, clipped to ``[−1, 1]``; NaN if undefined."""
    a, b = a.double(), b.double()
    denom = a.norm() * b.norm()
    if not bool(torch.isfinite(denom)) or float(denom) == 0.0:
        return math.nan
    return float((a @ b / denom).clamp(-1.0, 1.0))


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))


class CosineRun:
    """A resumable trajectory analysis (module docstring): the model follows BDF in place.

    Args:
        model: The network; its parameters are updated in place by the BDF steps. With
            per-sample gradients (always needed by BDF), it must suit BackPACK
            (:func:`~mbf_analysis.curvature.backend.check_model`).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: Training inputs ``[N, *in_shape]`` (moved batch by batch to the model's device
            and dtype).
        targets: Training targets ``[N]`` or ``[N, *out_shape]``.
        config: The settings (default :class:`CosineConfig`).

    Attributes:
        iteration: ``k`` of the next iteration (the number of BDF steps taken).
        layers: The layers whose cosines are recorded.
        methods: Name → method, for :attr:`CosineConfig.run_methods`.

    Raises:
        ValueError: For an unknown layer (listing the model's layers), mismatched
            inputs/targets or a batch size above ``N``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        config: CosineConfig | None = None,
    ) -> None:
        self.config = config or CosineConfig()
        if len(inputs) != len(targets):
            raise ValueError(
                f"inputs and targets differ in length: {len(inputs)} vs {len(targets)}."
            )
        if self.config.batch_size > len(inputs):
            raise ValueError(
                f"CosineConfig.batch_size {self.config.batch_size} exceeds the {len(inputs)} "
                "training samples."
            )
        layouts = model_layouts(model)
        if self.config.layers is None:
            self.layers: tuple[str, ...] = tuple(layouts)
        else:
            unknown = [name for name in self.config.layers if name not in layouts]
            if unknown:
                raise ValueError(
                    f"unknown layer(s) {unknown}; the model's layers with parameters are "
                    f"{list(layouts)}."
                )
            self.layers = tuple(self.config.layers)
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.methods = self.config.build_methods()
        self.needs = frozenset().union(*(m.needs for m in self.methods.values()))
        self.iteration = 0
        self._params = dict(model.named_parameters())
        device = next(iter(self._params.values())).device
        batch_seed, label_seed = np.random.SeedSequence(self.config.seed).generate_state(2)
        self._batch_generator = torch.Generator().manual_seed(int(batch_seed))
        self._label_generator = torch.Generator(device=device).manual_seed(int(label_seed))
        self._permutation: Tensor | None = None
        self._position = 0
        logger.info(
            "cosine along the BDF trajectory: methods %s, statistics %s, layers %s",
            list(self.config.methods),
            sorted(self.needs),
            list(self.layers),
        )

    # ------------------------------------------------------------------ running
    def run(
        self,
        n_iterations: int | None = None,
        *,
        on_record: Callable[[pd.DataFrame], None] | None = None,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Do ``n_iterations`` more iterations (default :attr:`CosineConfig.iterations`).

        Args:
            n_iterations: Number of iterations, ``≥ 0``.
            on_record: Called after every iteration with its rows (a frame with
                :data:`COLUMNS`, ``len(layers) · len(methods)`` rows), e.g. to append them to a
                CSV file as they come.
            progress: Show a tqdm bar.

        Returns:
            The rows of this call: columns :data:`COLUMNS`; ``iteration`` counts from the
            runner's start (it continues after :meth:`load_state_dict`), ``loss`` is the
            minibatch loss at the iterate where the directions were taken.

        Raises:
            CosineDivergedError: When the parameters, the loss, a statistic or BDF's direction
                hold NaN or Inf; it carries the rows of this call so far (``.frame``). The
                methods' states then include the failed iteration's statistics, so continue from
                a saved :meth:`state_dict` rather than from this runner.
            ValueError: When a minibatch has NaN or Inf inputs.
        """
        n = self.config.iterations if n_iterations is None else n_iterations
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n_iterations must be an integer ≥ 0, got {n!r}.")
        rows: list[dict[str, Any]] = []
        bar = tqdm(range(n), desc="cosine (BDF trajectory)", disable=not progress)
        for _ in bar:
            try:
                new, loss = self._iterate()
            except CosineDivergedError as err:
                err.frame = _frame(rows)
                raise
            rows += new
            bar.set_postfix(loss=f"{loss:.4g}")
            if on_record is not None:
                on_record(_frame(new))
        return _frame(rows)

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        """The next ``m`` indices of the epoch's permutation (a new epoch when too few remain)."""
        size = self.config.batch_size
        if self._permutation is None or self._position + size > len(self._permutation):
            self._permutation = torch.randperm(len(self.inputs), generator=self._batch_generator)
            self._position = 0
        index = self._permutation[self._position : self._position + size]
        self._position += size
        inputs = self.inputs[index.to(self.inputs.device)]
        return inputs, self.targets[index.to(self.targets.device)]

    def _iterate(self) -> tuple[list[dict[str, Any]], float]:
        """One iteration: statistics, updates, cosines, BDF step. Returns its rows and loss."""
        k = self.iteration
        bad = [name for name, p in self._params.items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise self._diverged(k, f"parameter(s) {bad} hold NaN or Inf after the last step")
        inputs, targets = self._next_batch()
        if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            raise ValueError(f"the minibatch of iteration {k} has NaN or Inf inputs.")
        stats = self._collect(k, inputs, targets)
        if not math.isfinite(stats.loss):
            raise self._diverged(k, f"the minibatch loss is {stats.loss}")
        try:
            for method in self.methods.values():
                method.update(stats)
        except NonFiniteError as err:
            raise self._diverged(k, str(err)) from err
        reference = self.methods[REFERENCE].direction()
        bad = [layer for layer, d in reference.items() if not bool(torch.isfinite(d).all())]
        if bad:
            raise self._diverged(k, f"BDF's direction of layer(s) {bad} holds NaN or Inf")
        directions = {
            name: reference if name == REFERENCE else self.methods[name].direction()
            for name in self.config.methods
        }
        rows = [
            {
                "iteration": k,
                "layer": layer,
                "method": name,
                "cosine": _cosine(directions[name][layer], reference[layer]),
                "loss": stats.loss,
            }
            for layer in self.layers
            for name in self.config.methods
        ]
        self._step(stats.layouts, reference)
        self.iteration += 1
        return rows, stats.loss

    def _collect(self, k: int, inputs: Tensor, targets: Tensor) -> Stats:
        """The one statistics pass; overflowing outputs (which break label sampling) diverge."""
        finite: list[bool] = []

        def watch(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, Tensor):
                finite.append(bool(torch.isfinite(output).all()))

        handle = self.model.register_forward_hook(watch)
        try:
            return collect(
                self.model,
                self.loss_fn,
                inputs,
                targets,
                self.needs,
                generator=self._label_generator,
            )
        except RuntimeError as err:
            if not all(finite):
                raise self._diverged(k, "the network's outputs hold NaN or Inf") from err
            raise
        finally:
            handle.remove()

    def _step(self, layouts: Mapping[str, LayerLayout], direction: Mapping[str, Tensor]) -> None:
        """``θ ← θ − α d`` for every layer, with ``d`` in METHODS §2 order."""
        with torch.no_grad():
            for layer, layout in layouts.items():
                for name, delta in layout.unflatten(direction[layer]).items():
                    self._params[name].sub_(delta, alpha=self.config.lr)

    def _diverged(self, k: int, what: str) -> CosineDivergedError:
        return CosineDivergedError(
            f"the BDF trajectory diverged at iteration {k}: {what}. Try a larger damping "
            f"(now {self.config.damping:g}) or a smaller lr (now {self.config.lr:g}); the rows "
            "recorded before it are in this error's .frame and were handed to on_record.",
            iteration=k,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue identically (``torch.save``-able).

        Returns:
            ``{"iteration", "config", "model", "methods", "batch_generator",
            "label_generator", "permutation", "position"}``: the iteration counter, the
            configuration (as a dict), cloned model parameters and buffers, every method's
            :meth:`~mbf_analysis.methods.Method.state_dict`, both generator states and the
            epoch's permutation with the position in it.
        """
        return {
            "iteration": self.iteration,
            "config": asdict(self.config),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "methods": {name: m.state_dict() for name, m in self.methods.items()},
            "batch_generator": self._batch_generator.get_state(),
            "label_generator": self._label_generator.get_state(),
            "permutation": None if self._permutation is None else self._permutation.clone(),
            "position": self._position,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (model, methods, generators, iteration counter).

        Raises:
            ValueError: If the state was saved with other methods.
        """
        saved = state_dict["config"]
        if tuple(saved["methods"]) != tuple(self.config.methods):
            raise ValueError(
                f"the state was saved with methods {list(saved['methods'])}, this run compares "
                f"{list(self.config.methods)}."
            )
        ours = asdict(self.config)
        changed = sorted(k for k in ours if k != "iterations" and saved.get(k) != ours[k])
        if changed:
            logger.warning("resuming with changed settings %s; the run will not match", changed)
        self.model.load_state_dict(state_dict["model"])
        for name, method in self.methods.items():
            method.load_state_dict(state_dict["methods"][name])
        self._batch_generator.set_state(state_dict["batch_generator"])
        self._label_generator.set_state(state_dict["label_generator"])
        permutation = state_dict["permutation"]
        self._permutation = None if permutation is None else permutation.clone()
        self._position = int(state_dict["position"])
        self.iteration = int(state_dict["iteration"])


def cosine_trajectory(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    on_record: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = True,
    **config: Any,
) -> pd.DataFrame:
    """Run the whole analysis on a copy of ``model`` (the caller's model is left untouched).

    Args:
        model, loss_fn, inputs, targets: As for :class:`CosineRun`.
        on_record, progress: As for :meth:`CosineRun.run`.
        **config: Fields of :class:`CosineConfig`.

    Returns:
        The tidy frame of :attr:`CosineConfig.iterations` iterations (columns :data:`COLUMNS`).
    """
    run = CosineRun(copy.deepcopy(model), loss_fn, inputs, targets, CosineConfig(**config))
    return run.run(on_record=on_record, progress=progress)
