"""One collection pass: every statistic a set of methods needs, from one forward pass.

The methods of :mod:`mbf_analysis.methods` declare the statistics they need (``Method.needs``);
:func:`collect` computes the union for one minibatch with

- one forward pass (forward hooks on Linear/Conv2d layers record KFAC's input factor ``A``);
- one backward pass of the loss on the real labels: plain autograd, or BackPACK's ``BatchGrad``
  when per-sample gradients are needed (their mean is the minibatch gradient); tensor hooks on
  the layers' outputs record KFAC's output factor ``G`` of the empirical variant;
- exactly one extra backward pass, on labels sampled from the model's predictive distribution,
  when the sampled-label minibatch gradient (MBF-True) or the true-Fisher ``G`` is needed.

Conventions (METHODS.md §1, :mod:`mbf_analysis.curvature.losses`): ``g_n = ∇ℓ_n`` is unscaled,
``g = (1/m) Σ_n g_n``; the MSE per-sample loss is ``½‖f − y‖²``; the reduction of the loss module
is ignored. Every vector is in its layer's mini-block order (:mod:`mbf_analysis.layout`). KFAC's
scaling is documented in :mod:`mbf_analysis.curvature.kfac`.

:func:`collect` does not check the statistics for NaN/Inf: every method refuses non-finite
statistics in ``update`` before touching its state.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mbf_analysis.curvature.backend import backward_with, check_model, extended
from mbf_analysis.curvature.fisher import prepare_batch
from mbf_analysis.curvature.kfac import (
    KFAC_MODULES,
    KronFactors,
    check_kfac_module,
    input_factor,
    output_factor,
)
from mbf_analysis.errors import UnsupportedModuleError
from mbf_analysis.layout import LayerLayout, model_layouts

__all__ = [
    "GRAD",
    "PER_SAMPLE_GRAD",
    "SAMPLED_GRAD",
    "KFAC_FACTORS",
    "KFAC_FACTORS_SAMPLED",
    "STATISTICS",
    "Stats",
    "collect",
]

GRAD = "grad"
"""The minibatch gradient ``g = (1/m) Σ_n g_n`` of every layer, ``[d]``."""
PER_SAMPLE_GRAD = "per_sample_grad"
"""The per-sample gradients ``g_n`` of every layer, ``[m, d]`` (BackPACK ``BatchGrad``)."""
SAMPLED_GRAD = "sampled_grad"
"""The minibatch gradient on labels sampled from the model, ``ĝ``, ``[d]`` (extra backward)."""
KFAC_FACTORS = "kfac_factors"
"""KFAC's ``(A, G)`` with ``G`` from the real labels (empirical variant)."""
KFAC_FACTORS_SAMPLED = "kfac_factors_sampled"
"""KFAC's ``(A, G)`` with ``G`` from sampled labels (true-Fisher variant, extra backward)."""
STATISTICS: frozenset[str] = frozenset(
    {GRAD, PER_SAMPLE_GRAD, SAMPLED_GRAD, KFAC_FACTORS, KFAC_FACTORS_SAMPLED}
)
"""Every statistic :func:`collect` can compute."""

_SAMPLED = frozenset({SAMPLED_GRAD, KFAC_FACTORS_SAMPLED})


@dataclass
class Stats:
    """The statistics of one minibatch, keyed by layer (module name).

    Attributes:
        layouts: Layer → its mini-block layout, for every trainable layer, in model order.
        grad: Layer → minibatch gradient ``g = (1/m) Σ_n g_n``, ``[d]``.
        loss: Minibatch loss ``L = (1/m) Σ_n ℓ_n`` on the real labels.
        batch_size: ``m``.
        per_sample: Layer → per-sample gradients ``g_n``, ``[m, d]``, or ``None``.
        sampled_grad: Layer → minibatch gradient on sampled labels ``ĝ``, ``[d]``, or ``None``.
        kfac: Layer → :class:`~mbf_analysis.curvature.kfac.KronFactors` ``(A, G)`` with ``G``
            from the real labels, for Linear and Conv2d layers, or ``None``.
        kfac_sampled: The same with ``G`` from sampled labels, or ``None``. Shares ``A`` with
            :attr:`kfac`.
    """

    layouts: dict[str, LayerLayout]
    grad: dict[str, Tensor]
    loss: float
    batch_size: int
    per_sample: dict[str, Tensor] | None = None
    sampled_grad: dict[str, Tensor] | None = None
    kfac: dict[str, KronFactors] | None = None
    kfac_sampled: dict[str, KronFactors] | None = None

    def statistic(self, need: str) -> dict[str, Tensor] | dict[str, KronFactors]:
        """The statistic called ``need`` (one of :data:`STATISTICS`).

        Raises:
            KeyError: For an unknown name.
            ValueError: If this collection pass did not compute it.
        """
        fields = {
            GRAD: "grad",
            PER_SAMPLE_GRAD: "per_sample",
            SAMPLED_GRAD: "sampled_grad",
            KFAC_FACTORS: "kfac",
            KFAC_FACTORS_SAMPLED: "kfac_sampled",
        }
        if need not in fields:
            raise KeyError(f"unknown statistic {need!r}; known: {sorted(STATISTICS)}.")
        value = getattr(self, fields[need])
        if value is None:
            raise ValueError(
                f"these statistics lack {need!r}; collect them with needs including {need!r}."
            )
        return value


class _KronRecorder:
    """Forward/tensor hooks that turn layer inputs and output gradients into KFAC factors.

    ``phase`` names the backward pass that runs (``"data"`` or ``"sampled"``); output gradients
    are only turned into ``G`` for the phases listed in ``capture``.
    """

    def __init__(
        self,
        model: nn.Module,
        layouts: dict[str, LayerLayout],
        grad_scale: float,
        capture: frozenset[str],
    ) -> None:
        self.grad_scale = grad_scale
        self.capture = capture
        self.phase = "data"
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, dict[str, Tensor]] = {phase: {} for phase in capture}
        self.handles: list[RemovableHandle] = []
        for name, layout in layouts.items():
            if layout.kind not in ("linear", "conv2d"):
                continue
            module = model.get_submodule(name)
            if not isinstance(module, KFAC_MODULES):
                continue
            check_kfac_module(name, module)
            self.handles.append(module.register_forward_hook(partial(self._forward, name)))

    def _forward(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        if name in self.A:
            raise UnsupportedModuleError(
                f"module '{name}' ran more than once in one forward pass; KFAC factors of "
                "shared (reused) layers are not supported."
            )
        if len(args) != 1:
            raise UnsupportedModuleError(f"module '{name}' has {len(args)} inputs; expected 1.")
        self.A[name] = input_factor(module, args[0])
        if output.requires_grad:
            output.register_hook(partial(self._backward, name, module))

    def _backward(self, name: str, module: nn.Module, grad: Tensor) -> None:
        if self.phase in self.capture:
            self.G[self.phase][name] = output_factor(module, grad * self.grad_scale)

    def factors(self, phase: str) -> dict[str, KronFactors]:
        missing = [name for name in self.A if name not in self.G[phase]]
        if missing:
            raise UnsupportedModuleError(
                f"no output gradient reached layer(s) {missing}; their outputs do not influence "
                "the loss, so KFAC has no G factor for them."
            )
        return {name: KronFactors(a, self.G[phase][name]) for name, a in self.A.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def collect(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    needs: Iterable[str],
    *,
    generator: torch.Generator | None = None,
) -> Stats:
    """Compute the statistics ``needs`` (and always the minibatch gradient) for one minibatch.

    One forward pass, one backward pass on the real labels (BackPACK ``BatchGrad`` when
    ``per_sample_grad`` is needed, plain autograd otherwise) and, when ``sampled_grad`` or
    ``kfac_factors_sampled`` is needed, one extra backward pass on labels ``ŷ ~ p(·|f(x))``
    drawn once for the batch. The model and the parameters' ``.grad`` are left untouched.

    Args:
        model: The network. With ``per_sample_grad``, it must pass
            :func:`~mbf_analysis.curvature.backend.check_model` (eval mode for BatchNorm).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` (``ℓ_n = ½‖f − y‖²``) or
            ``nn.BCEWithLogitsLoss``; its ``reduction`` is ignored.
        inputs: ``[m, *in_shape]``.
        targets: ``[m]`` class indices or ``[m, *out_shape]``.
        needs: Names from :data:`STATISTICS`.
        generator: Randomness of the sampled labels.

    Returns:
        The :class:`Stats` of the batch; fields that were not needed are ``None``.

    Raises:
        KeyError: For an unknown statistic name.
        ValueError: For an empty batch or mismatched batch sizes.
    """
    needs = frozenset(needs) | {GRAD}
    unknown = needs - STATISTICS
    if unknown:
        raise KeyError(f"unknown statistic(s) {sorted(unknown)}; known: {sorted(STATISTICS)}.")
    per_sample = PER_SAMPLE_GRAD in needs
    sampled = bool(needs & _SAMPLED)
    layouts = check_model(model) if per_sample else model_layouts(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    likelihood, inputs, targets = prepare_batch(model, loss_fn, inputs, targets)
    m = len(inputs)
    scale = likelihood.grad_scale
    capture = frozenset(
        phase
        for phase, need in (("data", KFAC_FACTORS), ("sampled", KFAC_FACTORS_SAMPLED))
        if need in needs
    )
    loss_module = likelihood.summed_loss()

    with ExitStack() as stack, warnings.catch_warnings(), torch.enable_grad():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if per_sample:
            stack.enter_context(extended(model, loss_module))
        recorder = _KronRecorder(model, layouts, scale, capture) if capture else None
        if recorder is not None:
            stack.callback(recorder.remove)
        outputs = model(inputs)
        loss_sum = loss_module(outputs, targets)
        per_sample_grads = None
        if per_sample:
            batch = backward_with("batch_grad", model, loss_sum, retain_graph=sampled)
            per_sample_grads = {n: g.detach() * scale for n, g in batch.items()}
            grads = {n: g.mean(0) for n, g in per_sample_grads.items()}
        else:
            values = torch.autograd.grad(loss_sum, list(params.values()), retain_graph=sampled)
            grads = {n: g.detach() * (scale / m) for n, g in zip(params, values, strict=True)}
        sampled_grads = None
        if sampled:
            if recorder is not None:
                recorder.phase = "sampled"
            y_hat = likelihood.sample_targets(outputs, generator)
            values = torch.autograd.grad(loss_module(outputs, y_hat), list(params.values()))
            sampled_grads = {
                n: g.detach() * (scale / m) for n, g in zip(params, values, strict=True)
            }

    def flat(values: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: layout.flatten(values) for name, layout in layouts.items()}

    return Stats(
        layouts=layouts,
        grad=flat(grads),
        loss=float(loss_sum.detach()) * scale / m,
        batch_size=m,
        per_sample=None if per_sample_grads is None else flat(per_sample_grads),
        sampled_grad=flat(sampled_grads) if SAMPLED_GRAD in needs else None,
        kfac=recorder.factors("data") if KFAC_FACTORS in needs else None,
        kfac_sampled=recorder.factors("sampled") if KFAC_FACTORS_SAMPLED in needs else None,
    )
