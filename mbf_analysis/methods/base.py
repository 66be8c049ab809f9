"""The interface every method implements, and what the methods share.

A method (preconditioner) keeps state across steps and separates three things:

- :meth:`Method.update` folds one minibatch's :class:`~mbf_analysis.curvature.collect.Stats` in:
  the first moment (momentum or gradient EMA) and, on the steps its periods select, its curvature
  statistics and their (expensive) inverses;
- :meth:`Method.direction` applies the current preconditioner to the whole model's per-layer
  vectors (its own first moment by default) and returns the whole model's per-layer directions,
  so that a method coupling layers (two-level KFAC, METHODS.md §6) fits the same interface;
- :meth:`Method.matrix` is the dense curvature matrix the method assumes for one layer, in the
  layer's METHODS.md §2 order (small layers only; for tests and heatmaps).

Statistics with NaN or Inf are refused (:class:`~mbf_analysis.errors.NonFiniteError`, naming the
layer) before any state is touched. Steps are counted from ``k = 0``; a statistic with period
``T`` is updated when ``k ≡ 0 (mod T)``, so the first update always computes everything.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import DESCRIPTIONS, GRAD, Stats
from mbf_analysis.curvature.memory import check_dense, resolve_budget
from mbf_analysis.errors import ConfigError, NonFiniteError, UnknownNameError
from mbf_analysis.layout import LayerLayout

__all__ = ["Method", "MethodConfig", "momentum_", "check_range", "check_period", "check_choice"]

C = TypeVar("C", bound="MethodConfig")


def check_range(
    config: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``config.<name>`` is a finite number in the given interval."""
    value = getattr(config, name)
    where = f"{type(config).__name__}.{name}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigError(f"{where} must lie in {left}{lo}, {hi}{right}, got {value!r}.")


def check_period(config: object, name: str) -> None:
    """Raise ``ValueError`` unless ``config.<name>`` is an integer ``≥ 1``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{type(config).__name__}.{name} must be a positive integer (a period in steps), "
            f"got {value!r}."
        )


def check_choice(config: object, name: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``config.<name>`` is one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(
            f"{type(config).__name__}.{name} must be one of {choices}, got {value!r}."
        )


@dataclass(kw_only=True)
class MethodConfig:
    """Base of the methods' configurations; subclasses validate in ``__post_init__``."""

    ONE_SHOT: ClassVar[dict[str, Any]] = {}
    """Field values that turn the method into its one-shot form (no history, no momentum)."""

    def one_shot(self: C) -> C:
        """A copy whose statistics are this batch's alone: decays and momenta 0, periods 1.

        An EMA with decay 0 is replaced by the batch's statistic, and torch-style momentum with
        ``μ = 0`` is the gradient itself (``m = g``).
        """
        return replace(self, **self.ONE_SHOT)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The names a user may set."""
        return frozenset(f.name for f in fields(cls) if f.init)


def momentum_(buf: Tensor | None, grad: Tensor, momentum: float, dampening: float) -> Tensor:
    """Torch-SGD momentum: ``m ← μ m + (1 − τ) g``, and ``m = g`` on the first step.

    Args:
        buf: ``m`` (updated in place), or ``None`` on the first step.
        grad: ``g``, shaped like ``buf``.
        momentum: ``μ``.
        dampening: ``τ``.

    Returns:
        The updated ``m`` (a new tensor when ``buf`` is ``None``).
    """
    if buf is None:
        return grad.detach().clone()
    return buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)


class Method(ABC):
    """A preconditioner with state (see the module docstring).

    Attributes:
        name: The registry name (``"mbf"``, ``"kfac"``, ...).
        config: The validated configuration.
        needs: The statistics :meth:`update` reads (names from
            :data:`~mbf_analysis.curvature.collect.STATISTICS`); :meth:`next_needs` those the
            next update reads.
        state: Per key (layer, block group or parameter) a dict of state tensors.
        step: Number of :meth:`update` calls so far (``k`` of the next update).
    """

    name: str
    config: MethodConfig

    def __init__(self, config: MethodConfig, name: str | None = None) -> None:
        self.config = config
        self.name = name or type(self).__name__.lower()
        self.state: dict[str, dict[str, Tensor]] = {}
        self.step = 0
        self.layouts: dict[str, LayerLayout] | None = None

    @property
    @abstractmethod
    def needs(self) -> frozenset[str]:
        """The statistics :meth:`update` reads."""

    def next_needs(self) -> frozenset[str]:
        """The statistics the next :meth:`update` reads (a subset of :attr:`needs`).

        A front-end that collects only these (:func:`~mbf_analysis.curvature.collect.collect`
        with ``needs=method.next_needs()``) saves the curvature pass on the steps a method's
        periods skip. The registry's convention, the default here: the periods of a method are
        the integer fields of its configuration whose names end in ``_period``
        (``stat_period``, ``inverse_period``); it reads the statistics beyond the gradient only
        on the steps ``k`` one of them divides (KFAC's inverse steps read which layers have
        factors), and at every step when it has none. A method whose statistics follow another
        rule overrides this; its :meth:`update` must then accept statistics without the others.
        """
        periods = [
            getattr(self.config, f.name) for f in fields(self.config) if f.name.endswith("_period")
        ]
        if not periods or any(self._due(period) for period in periods):
            return self.needs
        return self.needs & {GRAD}

    def update(self, stats: Stats) -> None:
        """Fold one minibatch's statistics into the state (first moment, curvature, inverses).

        Only the statistics of :meth:`next_needs` are read (and checked).

        Raises:
            ValueError: If a needed statistic is missing or the layers differ from earlier
                updates.
            NonFiniteError: If a needed statistic holds NaN or Inf (the state is unchanged).
        """
        self._check_layouts(stats.layouts)
        for need in sorted(self.next_needs()):
            self._check_finite(stats.statistic(need), DESCRIPTIONS[need])
        if self.layouts is None:
            self.layouts = dict(stats.layouts)
        self._update(stats)
        self.step += 1

    def direction(self, grads: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The preconditioned direction, per layer, as flat vectors in METHODS §2 order.

        Args:
            grads: Layer → ``[d]`` vectors to precondition; default: the method's own first
                moment (momentum, gradient EMA, or Adam's bias-corrected ``m̂``).

        Returns:
            Layer → ``[d]``, for every layer of the model.

        Raises:
            RuntimeError: Before the first :meth:`update`.
            NonFiniteError: If ``grads`` holds NaN or Inf.
        """
        layouts = self._require_layouts()
        if grads is None:
            vectors = self._first_moment()
        else:
            missing = [name for name in layouts if name not in grads]
            if missing:
                raise UnknownNameError(f"grads lack layer(s) {missing}; expected {list(layouts)}.")
            vectors = {name: grads[name] for name in layouts}
            self._check_finite(vectors, "the vector to precondition")
        return self._direction(vectors)

    def matrix(self, layer: str) -> Tensor:
        """The dense curvature matrix the method assumes for ``layer``, ``[d, d]`` (§2 order).

        Raises:
            KeyError: For an unknown layer.
            MemoryBudgetError: If ``[d, d]`` does not fit the default memory budget.
        """
        layouts = self._require_layouts()
        if layer not in layouts:
            raise UnknownNameError(f"unknown layer {layer!r}; layers: {list(layouts)}.")
        some = next(t for tensors in self.state.values() for t in tensors.values())
        budget = resolve_budget(None, some.device)
        check_dense({layer: layouts[layer].dim}, some.element_size(), budget)
        return self._matrix(layer)

    def state_dict(self) -> dict[str, Any]:
        """``{"method", "step", "state"}`` with cloned tensors (``torch.save``-able)."""
        return {"method": self.name, "step": self.step, "state": copy.deepcopy(self.state)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the layer layouts come with the next :meth:`update`.

        Raises:
            ValueError: If the state belongs to another method.
        """
        if state_dict.get("method") != self.name:
            raise ConfigError(
                f"state of method {state_dict.get('method')!r} cannot be loaded into {self.name!r}."
            )
        self.step = int(state_dict["step"])
        self.state = copy.deepcopy(dict(state_dict["state"]))
        self.layouts = None

    # -------------------------------------------------------------- for subclasses
    @abstractmethod
    def _update(self, stats: Stats) -> None:
        """Fold validated, finite statistics into the state; ``self.step`` is ``k``."""

    @abstractmethod
    def _first_moment(self) -> dict[str, Tensor]:
        """Layer → the vector :meth:`direction` preconditions by default."""

    @abstractmethod
    def _direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Apply the preconditioner to the whole model's per-layer vectors."""

    @abstractmethod
    def _matrix(self, layer: str) -> Tensor:
        """The dense ``[d, d]`` curvature of ``layer``."""

    def _due(self, period: int) -> bool:
        """Whether the current step ``k`` is a multiple of ``period``."""
        return self.step % period == 0

    def _check_layouts(self, layouts: dict[str, LayerLayout]) -> None:
        if self.layouts is None:
            return
        ours = {name: layout.dim for name, layout in self.layouts.items()}
        theirs = {name: layout.dim for name, layout in layouts.items()}
        if ours != theirs:
            raise ConfigError(
                f"method {self.name!r} was set up for layers {ours} (name: size) but received "
                f"statistics of layers {theirs}."
            )

    def _require_layouts(self) -> dict[str, LayerLayout]:
        if self.layouts is None:
            raise RuntimeError(
                f"method {self.name!r} has seen no statistics yet; call update(stats) first "
                "(also after load_state_dict)."
            )
        return self.layouts

    def _check_finite(self, values: Mapping[str, Any], what: str) -> None:
        for layer, value in values.items():
            tensors = value if isinstance(value, tuple) else (value,)
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise NonFiniteError(
                    f"method {self.name!r}: {what} of layer '{layer}' contains NaN or Inf; no "
                    "statistic was updated. Check the inputs, the learning rate and the loss."
                )
