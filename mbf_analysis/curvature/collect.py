"""One collection pass: every statistic a set of methods needs, from one forward pass.

The methods of :mod:`mbf_analysis.methods` declare the statistics they need (``Method.needs``);
:func:`collect` computes the union for one minibatch with

- one forward pass (forward hooks on Linear/Conv2d layers record KFAC's input factor ``A``);
- one backward pass of the loss on the real labels: plain autograd, or BackPACK's ``BatchGrad``
  when per-sample gradients are needed (their mean is the minibatch gradient); tensor hooks on
  the layers' outputs record KFAC's output factor ``G`` of the empirical variant;
- exactly one extra backward pass, on labels sampled from the model's predictive distribution,
  when the sampled-label minibatch gradient (MBF-True), the true-Fisher ``G`` or the
  sampled-label per-sample ``δ_n`` is needed;
- exactly one more, *batched* backward pass (``torch.autograd.grad(..., is_grads_batched=True)``)
  of the ``C`` columns of the output-Hessian square roots ``S_n`` (``S_n S_nᵀ = H_n``,
  :meth:`~mbf_analysis.curvature.losses.Likelihood.sqrt_hessian`) when the exact-Fisher ``G``
  or the exact per-sample rows ``δ_nc`` are needed: ``δ_nc = ∂(f_nᵀ s_nc)/∂s`` is the
  pre-activation part of the square-root GGN row ``J_nᵀ s_nc``, so that
  ``Γ_n = Σ_c δ_nc δ_ncᵀ = J_{s,n}ᵀ H_n J_{s,n}`` (METHODS.md §1, §6.1).

The per-sample Kronecker statistics (:class:`~mbf_analysis.curvature.kfac.KronSamples`: ``ā_n``
and ``δ_n`` of every Linear layer, the statistics of the Kronecker-SVD family and of two-level
KFAC) are recorded by the same hooks in the same passes as the KFAC factors: they cost no extra
backward pass beyond the ones above.

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
    KronSamples,
    check_kfac_module,
    input_factor,
    output_factor,
    per_sample_inputs,
)
from mbf_analysis.curvature.losses import Likelihood
from mbf_analysis.curvature.memory import format_bytes, resolve_budget
from mbf_analysis.errors import (
    ConfigError,
    MemoryBudgetError,
    UnknownNameError,
    UnsupportedModuleError,
)
from mbf_analysis.layout import LayerLayout, model_layouts

__all__ = [
    "GRAD",
    "PER_SAMPLE_GRAD",
    "SAMPLED_GRAD",
    "KFAC_FACTORS",
    "KFAC_FACTORS_SAMPLED",
    "KFAC_FACTORS_EXACT",
    "KRON_SAMPLES",
    "KRON_SAMPLES_SAMPLED",
    "KRON_SAMPLES_EXACT",
    "STATISTICS",
    "DESCRIPTIONS",
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
KFAC_FACTORS_EXACT = "kfac_factors_exact"
"""KFAC's ``(A, G)`` with the exact-Fisher ``G = (1/(mT)) Σ_n Σ_t Σ_c δ_ntc δ_ntcᵀ`` (batched
backward of the output-Hessian square roots)."""
KRON_SAMPLES = "kron_samples"
"""Per-sample ``ā_n`` ``[m, a]`` and ``δ_n`` ``[m, g]`` of every Linear layer, real labels
(:class:`~mbf_analysis.curvature.kfac.KronSamples`)."""
KRON_SAMPLES_SAMPLED = "kron_samples_sampled"
"""The same with ``δ_n`` from the labels sampled from the model (one label per input)."""
KRON_SAMPLES_EXACT = "kron_samples_exact"
"""The same with the ``C`` exact rows ``δ_nc`` per sample, ``[m, C, g]``."""
STATISTICS: frozenset[str] = frozenset(
    {
        GRAD,
        PER_SAMPLE_GRAD,
        SAMPLED_GRAD,
        KFAC_FACTORS,
        KFAC_FACTORS_SAMPLED,
        KFAC_FACTORS_EXACT,
        KRON_SAMPLES,
        KRON_SAMPLES_SAMPLED,
        KRON_SAMPLES_EXACT,
    }
)
"""Every statistic :func:`collect` can compute."""

DESCRIPTIONS: dict[str, str] = {
    GRAD: "the minibatch gradient",
    PER_SAMPLE_GRAD: "the per-sample gradients",
    SAMPLED_GRAD: "the sampled-label minibatch gradient",
    KFAC_FACTORS: "the KFAC factors",
    KFAC_FACTORS_SAMPLED: "the sampled-label KFAC factors",
    KFAC_FACTORS_EXACT: "the exact-Fisher KFAC factors",
    KRON_SAMPLES: "the per-sample Kronecker factors",
    KRON_SAMPLES_SAMPLED: "the sampled-label per-sample Kronecker factors",
    KRON_SAMPLES_EXACT: "the exact-Fisher per-sample Kronecker factors",
}
"""Every statistic's name in words, for messages."""

_SAMPLED = frozenset({SAMPLED_GRAD, KFAC_FACTORS_SAMPLED, KRON_SAMPLES_SAMPLED})
_EXACT = frozenset({KFAC_FACTORS_EXACT, KRON_SAMPLES_EXACT})
_FACTOR_PHASES = (
    ("data", KFAC_FACTORS),
    ("sampled", KFAC_FACTORS_SAMPLED),
    ("exact", KFAC_FACTORS_EXACT),
)
_SAMPLE_PHASES = (
    ("data", KRON_SAMPLES),
    ("sampled", KRON_SAMPLES_SAMPLED),
    ("exact", KRON_SAMPLES_EXACT),
)
_EXACT_MEMORY_FACTOR = 2
"""The batched exact pass holds about this many ``C``-fold copies of the layer outputs."""


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
        kfac_exact: The same with the exact-Fisher ``G``, or ``None``. Shares ``A``.
        kron_samples: Linear layer → :class:`~mbf_analysis.curvature.kfac.KronSamples`
            ``(ā [m, a], δ [m, g])`` with ``δ_n`` from the real labels, or ``None``.
        kron_samples_sampled: The same with ``δ_n`` from the sampled labels (the labels of
            :attr:`sampled_grad` and :attr:`kfac_sampled`), or ``None``.
        kron_samples_exact: The same with ``δ [m, C, g]``, the exact rows ``δ_nc``, or ``None``.
            All three share ``ā``.
    """

    layouts: dict[str, LayerLayout]
    grad: dict[str, Tensor]
    loss: float
    batch_size: int
    per_sample: dict[str, Tensor] | None = None
    sampled_grad: dict[str, Tensor] | None = None
    kfac: dict[str, KronFactors] | None = None
    kfac_sampled: dict[str, KronFactors] | None = None
    kfac_exact: dict[str, KronFactors] | None = None
    kron_samples: dict[str, KronSamples] | None = None
    kron_samples_sampled: dict[str, KronSamples] | None = None
    kron_samples_exact: dict[str, KronSamples] | None = None

    def statistic(
        self, need: str
    ) -> dict[str, Tensor] | dict[str, KronFactors] | dict[str, KronSamples]:
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
            KFAC_FACTORS_EXACT: "kfac_exact",
            KRON_SAMPLES: "kron_samples",
            KRON_SAMPLES_SAMPLED: "kron_samples_sampled",
            KRON_SAMPLES_EXACT: "kron_samples_exact",
        }
        if need not in fields:
            raise UnknownNameError(f"unknown statistic {need!r}; known: {sorted(STATISTICS)}.")
        value = getattr(self, fields[need])
        if value is None:
            raise ConfigError(
                f"these statistics lack {need!r}; collect them with needs including {need!r}."
            )
        return value


class _KronRecorder:
    """Forward and tensor hooks that turn layer inputs and output gradients into statistics.

    ``phase`` names the pass that runs: ``"data"`` (real labels), ``"sampled"`` (sampled labels)
    or ``"exact"`` (:meth:`exact_pass`, the batched backward of the output-Hessian roots). For
    the phases in ``factor_phases`` the forward pass records KFAC's ``A`` of every Linear and
    Conv2d layer and the pass turns the output gradients into ``G``; for the phases in
    ``sample_phases`` the forward pass keeps the per-sample ``ā_n`` of every Linear layer and
    the pass keeps its output gradients ``δ_n``.
    """

    def __init__(
        self,
        model: nn.Module,
        layouts: dict[str, LayerLayout],
        grad_scale: float,
        factor_phases: frozenset[str],
        sample_phases: frozenset[str],
    ) -> None:
        self.grad_scale = grad_scale
        self.factor_phases = factor_phases
        self.sample_phases = sample_phases
        self.phase = "data"
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, dict[str, Tensor]] = {phase: {} for phase in factor_phases}
        self.inputs: dict[str, Tensor] = {}
        self.deltas: dict[str, dict[str, Tensor]] = {phase: {} for phase in sample_phases}
        self.outputs: dict[str, tuple[nn.Module, Tensor]] = {}
        self.handles: list[RemovableHandle] = []
        for name, layout in layouts.items():
            if layout.kind not in ("linear", "conv2d"):
                continue
            module = model.get_submodule(name)
            if not isinstance(module, KFAC_MODULES):
                continue
            if not factor_phases and not isinstance(module, nn.Linear):
                continue
            check_kfac_module(name, module)
            self.handles.append(module.register_forward_hook(partial(self._forward, name)))

    def _forward(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        if name in self.A or name in self.inputs:
            raise UnsupportedModuleError(
                f"module '{name}' ran more than once in one forward pass; KFAC factors of "
                "shared (reused) layers are not supported."
            )
        if len(args) != 1:
            raise UnsupportedModuleError(f"module '{name}' has {len(args)} inputs; expected 1.")
        if self.factor_phases:
            self.A[name] = input_factor(module, args[0])
        sample = bool(self.sample_phases) and isinstance(module, nn.Linear)
        if sample:
            self.inputs[name] = per_sample_inputs(name, module, args[0])
        if not output.requires_grad:
            return
        if "exact" in self.factor_phases or (sample and "exact" in self.sample_phases):
            self.outputs[name] = (module, output)
        output.register_hook(partial(self._backward, name, module, sample))

    def _backward(self, name: str, module: nn.Module, sample: bool, grad: Tensor) -> None:
        if self.phase == "exact":  # exact_pass reads its gradients from autograd.grad
            return
        scaled = grad.detach() * self.grad_scale
        if self.phase in self.G:
            self.G[self.phase][name] = output_factor(module, scaled)
        if sample and self.phase in self.deltas:
            self.deltas[self.phase][name] = scaled

    def exact_pass(self, outputs: Tensor, likelihood: Likelihood, budget: int) -> None:
        """Backpropagate the ``C`` columns of ``S_n`` in one batched pass (module docstring).

        ``grad_outputs[c, n] = S_n[:, c]``, the gradient of the pseudo-loss ``Σ_n f_nᵀ s_nc``;
        for a layer output ``s`` it gives ``δ_nc`` ``[C, m, *]`` (unscaled: the pseudo-loss is
        not a loss of BackPACK's summed form).

        Raises:
            MemoryBudgetError: Before the pass, if the ``C``-fold output gradients of the
                recorded layers exceed the budget.
        """
        names = list(self.outputs)
        roots = likelihood.sqrt_hessian(outputs)
        n_out = roots.shape[-1]
        numel = sum(out.numel() for _, out in self.outputs.values())
        need = _EXACT_MEMORY_FACTOR * n_out * numel * outputs.element_size()
        if need > budget:
            raise MemoryBudgetError(
                f"the exact-Fisher statistics backpropagate {n_out} output-Hessian columns "
                f"through {len(names)} layer(s) with {numel} output entries for the batch; "
                f"that needs about {format_bytes(need)}, over the memory budget of "
                f"{format_bytes(budget)}. Use fewer samples, fisher='mc' (one sampled label "
                "per input), or raise the budget (memory_budget=..., $MBF_MEMORY_BUDGET)."
            )
        grad_outputs = roots.permute(2, 0, 1).reshape(n_out, *outputs.shape)
        self.phase = "exact"
        grads = torch.autograd.grad(
            outputs,
            [self.outputs[name][1] for name in names],
            grad_outputs=grad_outputs,
            is_grads_batched=True,
            allow_unused=True,
        )
        for name, grad in zip(names, grads, strict=True):
            if grad is None:
                continue
            module = self.outputs[name][0]
            grad = grad.detach()
            if "exact" in self.G:
                self.G["exact"][name] = output_factor(module, grad.flatten(0, 1)) * n_out
            if "exact" in self.deltas and name in self.inputs:
                self.deltas["exact"][name] = grad.transpose(0, 1)

    def _missing(self, recorded: dict[str, Tensor], expected: Iterable[str]) -> None:
        missing = [name for name in expected if name not in recorded]
        if missing:
            raise UnsupportedModuleError(
                f"no output gradient reached layer(s) {missing}; their outputs do not influence "
                "the loss, so they have no output-side Kronecker statistic."
            )

    def factors(self, phase: str) -> dict[str, KronFactors]:
        self._missing(self.G[phase], self.A)
        return {name: KronFactors(a, self.G[phase][name]) for name, a in self.A.items()}

    def samples(self, phase: str) -> dict[str, KronSamples]:
        self._missing(self.deltas[phase], self.inputs)
        return {name: KronSamples(a, self.deltas[phase][name]) for name, a in self.inputs.items()}

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
    memory_budget: int | None = None,
) -> Stats:
    """Compute the statistics ``needs`` (and always the minibatch gradient) for one minibatch.

    One forward pass, one backward pass on the real labels (BackPACK ``BatchGrad`` when
    ``per_sample_grad`` is needed, plain autograd otherwise); when ``sampled_grad``,
    ``kfac_factors_sampled`` or ``kron_samples_sampled`` is needed, one extra backward pass on
    labels ``ŷ ~ p(·|f(x))`` drawn once for the batch; when ``kfac_factors_exact`` or
    ``kron_samples_exact`` is needed, one batched backward pass of the output-Hessian square
    roots (module docstring). The model and the parameters' ``.grad`` are left untouched.

    Args:
        model: The network. With ``per_sample_grad``, it must pass
            :func:`~mbf_analysis.curvature.backend.check_model` (eval mode for BatchNorm).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` (``ℓ_n = ½‖f − y‖²``) or
            ``nn.BCEWithLogitsLoss``; its ``reduction`` is ignored.
        inputs: ``[m, *in_shape]``.
        targets: ``[m]`` class indices or ``[m, *out_shape]``.
        needs: Names from :data:`STATISTICS`.
        generator: Randomness of the sampled labels.
        memory_budget: Bytes the exact-Fisher pass may use (default: half the free memory of
            the model's device, or ``$MBF_MEMORY_BUDGET``).

    Returns:
        The :class:`Stats` of the batch; fields that were not needed are ``None``.

    Raises:
        KeyError: For an unknown statistic name.
        ValueError: For an empty batch or mismatched batch sizes.
        UnsupportedModuleError: For per-sample Kronecker statistics of a Linear layer whose
            input is not ``[m, n_in]``.
        MemoryBudgetError: If the exact-Fisher pass would not fit the budget.
    """
    needs = frozenset(needs) | {GRAD}
    unknown = needs - STATISTICS
    if unknown:
        raise UnknownNameError(
            f"unknown statistic(s) {sorted(unknown)}; known: {sorted(STATISTICS)}."
        )
    per_sample = PER_SAMPLE_GRAD in needs
    sampled = bool(needs & _SAMPLED)
    exact = bool(needs & _EXACT)
    layouts = check_model(model) if per_sample else model_layouts(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    likelihood, inputs, targets = prepare_batch(model, loss_fn, inputs, targets)
    m = len(inputs)
    scale = likelihood.grad_scale
    factor_phases = frozenset(phase for phase, need in _FACTOR_PHASES if need in needs)
    sample_phases = frozenset(phase for phase, need in _SAMPLE_PHASES if need in needs)
    budget = resolve_budget(memory_budget, inputs.device) if exact else 0
    loss_module = likelihood.summed_loss()

    with ExitStack() as stack, warnings.catch_warnings(), torch.enable_grad():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if per_sample:
            stack.enter_context(extended(model, loss_module))
        recorder = None
        if factor_phases or sample_phases:
            recorder = _KronRecorder(model, layouts, scale, factor_phases, sample_phases)
            stack.callback(recorder.remove)
        outputs = model(inputs)
        loss_sum = loss_module(outputs, targets)
        per_sample_grads = None
        retain = sampled or exact
        if per_sample:
            batch = backward_with("batch_grad", model, loss_sum, retain_graph=retain)
            per_sample_grads = {n: g.detach() * scale for n, g in batch.items()}
            grads = {n: g.mean(0) for n, g in per_sample_grads.items()}
        else:
            values = torch.autograd.grad(loss_sum, list(params.values()), retain_graph=retain)
            grads = {n: g.detach() * (scale / m) for n, g in zip(params, values, strict=True)}
        sampled_grads = None
        if sampled:
            if recorder is not None:
                recorder.phase = "sampled"
            y_hat = likelihood.sample_targets(outputs, generator)
            values = torch.autograd.grad(
                loss_module(outputs, y_hat), list(params.values()), retain_graph=exact
            )
            sampled_grads = {
                n: g.detach() * (scale / m) for n, g in zip(params, values, strict=True)
            }
        if exact and recorder is not None:
            recorder.exact_pass(outputs, likelihood, budget)

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
        kfac_exact=recorder.factors("exact") if KFAC_FACTORS_EXACT in needs else None,
        kron_samples=recorder.samples("data") if KRON_SAMPLES in needs else None,
        kron_samples_sampled=(
            recorder.samples("sampled") if KRON_SAMPLES_SAMPLED in needs else None
        ),
        kron_samples_exact=recorder.samples("exact") if KRON_SAMPLES_EXACT in needs else None,
    )
