r"""KFAC / KFC as a ``torch.optim.Optimizer`` (Martens & Grosse 2015; Grosse & Martens 2016).

The formulas of :mod:`mbf_analysis.methods.kfac` with the factors of
:mod:`mbf_analysis.curvature.kfac`. For a Linear or Conv2d layer with weight ``W [g, a']``
(Conv2d: ``[C_out, C_in, k_h, k_w]``, ``a' = C_in·k_h·k_w``), bias ``b [g]`` and ``W̄ = [W b]``
``[g, a]`` (``a = a' + 1`` with a bias), the layer's Fisher block for column-stacked
``vec W̄`` is approximated by ``A ⊗ G`` with

.. math::

    A_{\mathrm{batch}} = \frac{1}{m} \sum_{n=1}^{m} \sum_{t=1}^{T}
        \bar a_{n,t} \bar a_{n,t}^\top \ \ [a, a], \qquad
    G_{\mathrm{batch}} = \frac{1}{m T} \sum_{n=1}^{m} \sum_{t=1}^{T}
        \delta_{n,t} \delta_{n,t}^\top \ \ [g, g],

``ā = [a; 1]`` the layer input (Conv2d: the unfolded patch at output location ``t``, ``T = o_h·o_w``
locations; Linear on ``[m, n_in]``: ``T = 1``) and ``δ_{n,t} = ∂ℓ_n/∂s_{n,t}`` the unscaled
per-sample pre-activation gradient (METHODS.md §1; KFC's scaling, stated with its relation to
curvlinops in :mod:`mbf_analysis.curvature.kfac`). The optimizer registers its own hooks on the
model's ``nn.Linear`` and ``nn.Conv2d`` layers: on the passes before a statistics step
(``k ≡ 0 mod T1``) a forward hook turns the layer input into ``A_batch``
(:func:`~mbf_analysis.curvature.kfac.input_factor`) and a tensor hook on the output turns its
gradient into ``G_batch`` (:func:`~mbf_analysis.curvature.kfac.output_factor`, with
``δ = m · ∂L/∂s``: the loss ``L`` must be the **mean** of the per-sample losses over the ``m``
samples of the batch). Which backward pass gives ``δ`` is a per-group choice:

- ``fisher="empirical"`` (default): the backward pass the user runs, on the real labels
  (*empirical* KFAC);
- ``fisher="mc"``: the paper's KFAC (true Fisher). One extra backward pass of
  ``L̂ = (1/m) Σ_n ℓ(f_n, ŷ_n)`` with one label ``ŷ_n ~ p(· | f_n)`` drawn per input from the
  model's predictive distribution (:func:`~mbf_analysis.optim.common.sampled_label_loss`, the
  convention of :func:`~mbf_analysis.curvature.collect.collect`'s ``kfac_factors_sampled``; MSE
  as ``½‖f − ŷ‖²``), run by :meth:`KFAC.sampled_backward` or :func:`kfac_true_step`; the
  backward pass on the real labels then only feeds the gradient (and the momentum).

Several forward/backward passes before one step (gradient accumulation) are averaged. Hooks
record nothing under ``torch.no_grad()`` or on other steps. At step ``k``:

.. math::

    m &\leftarrow \mu m + (1 - \tau) g \quad (m = g \text{ at } k = 0), \\
    A &\leftarrow \beta A + (1 - \beta) A_{\mathrm{batch}}, \quad
    G \leftarrow \beta G + (1 - \beta) G_{\mathrm{batch}} \quad (k \equiv 0 \bmod T_1),

inverses refreshed when ``k ≡ 0 (mod T2)`` (all layers of a group together, one batched call
per factor size: :func:`batched_split_inverses`, :func:`batched_eigen_inverses`), and for the
momentum matrix ``M̄ = [M b]`` ``[g, a]`` (:func:`weight_matrix`, the matrix of
:func:`~mbf_analysis.curvature.kfac.to_matrix`):

- ``damping_mode="split"``: ``D = (G + π⁻¹√λ I)⁻¹ M̄ (A + π√λ I)⁻¹``,
  ``π² = (tr A / a) / (tr G / g)``, i.e. ``vec D = ((A + π√λ I) ⊗ (G + π⁻¹√λ I))⁻¹ vec M̄``;
- ``damping_mode="eigen"``: ``vec D = (A ⊗ G + λI)⁻¹ vec M̄`` (exact, through the
  eigendecompositions of ``A`` and ``G``);

then ``θ ← (1 − αγ) θ − α d``. Layers without Kronecker factors (normalization layers, grouped
convolutions, parameters without a layout) use ``d = m`` (the paper's choice for BatchNorm);
one warning lists those that are not normalization layers.

Under ``torch.distributed`` the batch factors are averaged over the processes before the EMA
(with equal local batch sizes this gives the factors of the combined batch), for both variants.

State: every parameter ``"step"``, ``"momentum_buffer"``; the weight of a factored layer also
``"A"`` ``[a, a]``, ``"G"`` ``[g, g]`` and the cached inverse (``"q_a"``, ``"w_a"``, ``"q_g"``,
``"w_g"`` or ``"p_a"``, ``"p_g"``). The sampling generator is the caller's: to resume a
true-Fisher run bit for bit, save and restore its state (``Generator.get_state``) with the
optimizer's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mbf_analysis.curvature.kfac import (
    KFAC_MODULES,
    EigenInverse,
    SplitInverse,
    apply_eigen_inverse,
    apply_split_inverse,
    check_kfac_module,
    factor_eigh,
    input_factor,
    output_factor,
)
from mbf_analysis.errors import ConfigError, NonFiniteError, UnsupportedModuleError
from mbf_analysis.layout import LayerLayout
from mbf_analysis.linalg import all_finite, damped_inverse
from mbf_analysis.methods.base import momentum_
from mbf_analysis.optim.common import (
    PlacedLayer,
    PlacedOptimizer,
    check_choice,
    check_curvature_settings,
    check_gradients,
    check_number,
    decoupled_update_,
    group_gradients,
    migrate_fisher_setting,
    place,
    refuse_true_fisher,
    sampled_label_loss,
    warn_fallback,
)

__all__ = [
    "KFAC",
    "kfac_true_step",
    "batched_split_inverses",
    "batched_eigen_inverses",
    "weight_matrix",
    "split_weight_matrix",
]


@dataclass(eq=False)
class _Record:
    """Sums of the batch factors of one layer since the last step."""

    layer: PlacedLayer
    a_sum: Tensor | None = None
    a_count: int = 0
    g_sum: Tensor | None = None
    g_count: int = 0

    def clear(self) -> None:
        self.a_sum, self.a_count, self.g_sum, self.g_count = None, 0, None, 0


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value


class KFAC(PlacedOptimizer):
    """KFAC / KFC with momentum and decoupled weight decay (module docstring for the formulas).

    Example (the paper's true-Fisher KFAC)::

        optimizer = KFAC(model, lr=0.1, fisher="mc")
        for x, y in loader:
            kfac_true_step(optimizer, model, loss_fn, x, y, generator=generator)

    or, in a loop of one's own (a closure may do the same)::

        optimizer.zero_grad()
        outputs = model(x)
        loss = loss_fn(outputs, y)
        loss.backward(retain_graph=optimizer.needs_sampled_backward())
        optimizer.sampled_backward(outputs, loss_fn, generator=generator)
        optimizer.step()

    With ``fisher="empirical"`` a plain ``loss.backward(); optimizer.step()`` loop suffices.

    Args:
        model: The model; the optimizer hooks its Linear and Conv2d layers (remove the hooks
            with :meth:`remove_hooks`).
        lr: ``α ≥ 0`` (per group).
        damping: ``λ > 0`` (per group).
        damping_mode: ``"split"`` or ``"eigen"`` (per group).
        momentum: ``μ ∈ [0, 1)`` (per group).
        dampening: ``τ ∈ [0, 1]`` (per group).
        stat_decay: ``β ∈ [0, 1)`` of ``A`` and ``G`` (per group).
        weight_decay: Decoupled ``γ ≥ 0`` (per group).
        stat_period: ``T1 ≥ 1`` (per group).
        inverse_period: ``T2 ≥ 1`` (per group).
        fisher: ``"mc"``: ``G`` from labels sampled from the model (per group), recorded by
            :meth:`sampled_backward` (the Monte-Carlo Fisher, :mod:`mbf_analysis.fisher_kinds`).
            The default ``"empirical"`` (real labels) keeps plain ``loss.backward(); step()``
            loops working; the paper's KFAC baseline (and ``methods.get("kfac")``, whose default
            is ``fisher="mc"``) is ``"mc"``. The earlier ``true_fisher=`` is refused with this
            word in the message.
        params: Parameters or groups (default: the model's trainable parameters); a layer's
            weight and bias must be in the same group.

    Raises:
        TypeError: If ``model`` is not a module or a parameter is not float32/float64.
        ValueError: For an invalid setting or a layer split over several groups.
    """

    OWNER = "KFAC"

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        damping: float = 0.003,
        damping_mode: Literal["split", "eigen"] = "split",
        momentum: float = 0.9,
        dampening: float = 0.0,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        stat_period: int = 10,
        inverse_period: int = 100,
        fisher: Literal["empirical", "mc"] = "empirical",
        true_fisher: None = None,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
    ) -> None:
        refuse_true_fisher(self.OWNER, true_fisher)
        self._records: dict[str, _Record] = {}
        self._handles: list[RemovableHandle] = []
        self._sampled = False
        defaults = {
            "lr": lr,
            "damping": damping,
            "damping_mode": damping_mode,
            "momentum": momentum,
            "dampening": dampening,
            "stat_decay": stat_decay,
            "weight_decay": weight_decay,
            "stat_period": stat_period,
            "inverse_period": inverse_period,
            "fisher": fisher,
        }
        super().__init__(model, params, defaults)

    def _check_settings(self, group: dict[str, Any], index: int | None) -> None:
        owner = self.OWNER
        check_curvature_settings(owner, group, index)
        check_number(owner, index, "damping", group["damping"], low=0.0, low_open=True)
        check_choice(owner, "damping_mode", group["damping_mode"], ("split", "eigen"))
        check_choice(owner, "fisher", group["fisher"], ("empirical", "mc"))

    def _refresh_placement(self) -> None:
        """Place the parameters, (re)register the hooks, warn once about unfactored layers."""
        placement = place(self._model, self.param_groups, self.OWNER)
        self._names = placement.names
        self._layers = placement.layers
        reasons = dict(placement.fallback_reasons)
        self.remove_hooks()
        self._records = {}
        for layer in self._layers:
            module = layer.module
            if layer.fallback or not isinstance(module, KFAC_MODULES):
                continue
            try:
                check_kfac_module(layer.name, module)
            except UnsupportedModuleError as error:
                reasons.update({self._names[p]: str(error) for p in layer.params})
                continue
            record = _Record(layer)
            self._records[layer.name] = record
            self._handles.append(module.register_forward_hook(partial(self._forward, record)))
        new = {n: r for n, r in reasons.items() if n not in self._warned}
        warn_fallback(self.OWNER, new, "the momentum direction d = m")
        self._warned |= set(new)

    def remove_hooks(self) -> None:
        """Remove the optimizer's hooks from the model (statistics steps then fail: no factors)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _due(self, group: int) -> bool:
        params = self.param_groups[group]["params"]
        step = self.state[params[0]].get("step", 0)
        return step % self.param_groups[group]["stat_period"] == 0

    def _forward(self, record: _Record, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not self._due(record.layer.group):
            return
        x = args[0]
        record.a_sum = _add(record.a_sum, input_factor(module, x.detach()))
        record.a_count += 1
        if output.requires_grad:
            output.register_hook(partial(self._backward, record, module, x.shape[0]))

    def _backward(self, record: _Record, module: nn.Module, batch: int, grad: Tensor) -> None:
        if self._sampled != (self.param_groups[record.layer.group]["fisher"] == "mc"):
            return
        # G of δ = m ∂L/∂s is m² times G of ∂L/∂s: scale the [g, g] factor, not the gradient.
        factor = output_factor(module, grad.detach()).mul_(batch * batch)
        record.g_sum = _add(record.g_sum, factor)
        record.g_count += 1

    def _after_load(self) -> None:
        """Validate the loaded settings (a state saved with ``true_fisher`` reads as ``fisher``;
        one saved before either existed as ``"empirical"``)."""
        for index, group in enumerate(self.param_groups):
            migrate_fisher_setting(group)
            self._check_settings(group, index)

    def needs_sampled_backward(self) -> bool:
        """Whether the next :meth:`step` updates the factors of a ``fisher="mc"`` group.

        Only then does :meth:`sampled_backward` run a backward pass (so only then must the
        real-label backward pass retain the graph).
        """
        return any(
            group["fisher"] == "mc" and self._due(index)
            for index, group in enumerate(self.param_groups)
        )

    def sampled_backward(
        self, outputs: Tensor, loss_fn: nn.Module, *, generator: torch.Generator | None = None
    ) -> None:
        """Record the true-Fisher ``G`` of the ``fisher="mc"`` groups from sampled labels.

        Back-propagates :func:`~mbf_analysis.optim.common.sampled_label_loss` (``L̂``, one label
        ``ŷ_n ~ p(· | f_n)`` per input) from ``outputs`` to the factored layers of the
        ``fisher="mc"`` groups; their output hooks turn ``m · ∂L̂/∂s`` into ``G_batch``. The
        parameters' ``.grad`` are left untouched. Does nothing (draws no labels) when
        :meth:`needs_sampled_backward` is ``False``. Call it after the forward pass and before
        :meth:`step`; after ``loss.backward()`` that pass must have used ``retain_graph=True``.

        Args:
            outputs: ``f``, the model outputs of this batch's forward pass, ``[m, C]``.
            loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``
                (selects the predictive distribution; its ``reduction`` is ignored).
            generator: Randomness of the sampled labels.

        Raises:
            ValueError: If no param group has ``fisher="mc"``, or ``outputs`` is not
                attached to an autograd graph.
            TypeError: For an unsupported loss module.
        """
        if not any(group["fisher"] == "mc" for group in self.param_groups):
            raise ConfigError(
                f"{self.OWNER}: sampled_backward was called, but no param group has "
                "fisher='mc'; its sampled-label factors would be ignored. Construct the "
                "optimizer with fisher='mc', or drop the call for the empirical Fisher."
            )
        if not self.needs_sampled_backward():
            return
        if not outputs.requires_grad:
            raise ConfigError(
                f"{self.OWNER}: sampled_backward needs the model outputs of a forward pass run "
                "with gradients enabled (outputs.requires_grad is False)."
            )
        weights = [
            record.layer.params[0]
            for record in self._records.values()
            if self.param_groups[record.layer.group]["fisher"] == "mc"
            and self._due(record.layer.group)
        ]
        loss = sampled_label_loss(loss_fn, outputs, generator)
        self._sampled = True
        try:
            torch.autograd.grad(loss, weights, allow_unused=True)
        finally:
            self._sampled = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One KFAC step for every group whose parameters have gradients.

        Args:
            closure: Re-evaluates the model and returns the loss (called with gradients
                enabled, before the step); for ``fisher="mc"`` groups it must also call
                :meth:`sampled_backward`.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            NonFiniteError: If a gradient or a batch factor holds NaN/Inf (nothing changes).
            RuntimeError: If no factors were recorded before a statistics step (for a
                ``fisher="mc"`` group: no :meth:`sampled_backward` pass).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [
            i
            for i, g in enumerate(self.param_groups)
            if group_gradients(self.OWNER, g, self._names)
        ]
        batch = self._batch_factors(active)
        for index in active:
            params = self.param_groups[index]["params"]
            if not all_finite([p.grad for p in params]):  # one fused check; then name the culprit
                check_gradients(self.OWNER, {p: p.grad for p in params}, self._names)
        for index in active:
            self._step_group(index, batch)
        for record in self._records.values():
            record.clear()
        return loss

    def _batch_factors(self, active: list[int]) -> dict[str, tuple[Tensor, Tensor]]:
        """Layer → ``(A_batch, G_batch)`` for the groups due for statistics (checked, reduced)."""
        out = {}
        for record in self._records.values():
            index = record.layer.group
            if index not in active or not self._due(index):
                continue
            if (
                record.a_count > 0
                and record.g_count == 0
                and self.param_groups[index]["fisher"] == "mc"
            ):
                raise RuntimeError(
                    f"{self.OWNER}: param group {index} has fisher='mc' and updates its "
                    f"factors at this step, but no sampled-label output gradient was recorded for "
                    f"layer '{record.layer.name}'; after loss.backward(retain_graph=True) call "
                    "optimizer.sampled_backward(outputs, loss_fn) (also inside a closure), or use "
                    "kfac_true_step(optimizer, model, loss_fn, inputs, targets)."
                )
            if record.a_count == 0 or record.g_count == 0:
                raise RuntimeError(
                    f"{self.OWNER}: no layer input or output gradient was recorded for layer "
                    f"'{record.layer.name}' before a statistics step; run the forward and backward "
                    "passes (with gradients enabled) between step() calls."
                )
            a = record.a_sum if record.a_count == 1 else record.a_sum / record.a_count
            g = record.g_sum if record.g_count == 1 else record.g_sum / record.g_count
            if dist.is_available() and dist.is_initialized():
                world = dist.get_world_size()
                for factor in (a, g):
                    dist.all_reduce(factor)
                    factor.div_(world)
            out[record.layer.name] = (a, g)
        # One check of all the factors' sums; layer by layer only to name a non-finite one.
        if not all_finite([f for pair in out.values() for f in pair]):
            for name, (a, g) in out.items():
                if not (all_finite(a) and all_finite(g)):
                    raise NonFiniteError(
                        f"{self.OWNER}: the Kronecker factors of layer '{name}' contain NaN or "
                        "Inf; the step was refused and nothing was changed."
                    )
        return out

    def _step_group(self, index: int, batch: dict[str, tuple[Tensor, Tensor]]) -> None:
        group = self.param_groups[index]
        k = self.state[group["params"][0]].get("step", 0)
        beta, lam = group["stat_decay"], group["damping"]
        _momentum_all(
            [self.state[p] for p in group["params"]],
            [p.grad for p in group["params"]],
            k,
            group["momentum"],
            group["dampening"],
        )
        layers = [layer for layer in self._layers if layer.group == index]
        factored = [layer for layer in layers if layer.name in self._records]
        averages, values = [], []
        for layer in factored:
            if layer.name in batch:
                state = self.state[layer.params[0]]
                for key, value in zip(("A", "G"), batch[layer.name], strict=True):
                    if key not in state:
                        state[key] = torch.zeros_like(value)
                    averages.append(state[key])
                    values.append(value)
        if averages:  # F ← βF + (1 − β) F_batch for every factor at once
            torch._foreach_mul_(averages, beta)
            torch._foreach_add_(averages, values, alpha=1 - beta)
        if k % group["inverse_period"] == 0 and factored:
            states = [self.state[layer.params[0]] for layer in factored]
            factors = [(state["A"], state["G"]) for state in states]
            if group["damping_mode"] == "eigen":
                inverses = batched_eigen_inverses(factors)
            else:
                inverses = batched_split_inverses(factors, lam)
            for state, inverse in zip(states, inverses, strict=True):
                state.update(inverse._asdict())
        directions: dict[Tensor, Tensor] = {}
        for layer in layers:
            momenta = {n: self.state[p]["momentum_buffer"] for n, p in layer.named_params()}
            if layer.name not in self._records:
                directions.update({p: momenta[n] for n, p in layer.named_params()})
                continue
            state = self.state[layer.params[0]]
            matrix = weight_matrix(layer.layout, momenta)
            if group["damping_mode"] == "eigen":
                inverse = EigenInverse(state["q_a"], state["w_a"], state["q_g"], state["w_g"])
                solved = apply_eigen_inverse(inverse, matrix, lam)
            else:
                solved = apply_split_inverse(SplitInverse(state["p_a"], state["p_g"]), matrix)
            parts = split_weight_matrix(layer.layout, solved)
            directions.update({p: parts[n] for n, p in layer.named_params()})
        params = group["params"]
        decoupled_update_(
            params, [directions[p] for p in params], group["lr"], group["weight_decay"]
        )
        for p in params:
            self.state[p]["step"] = k + 1


def _momentum_all(
    states: Sequence[dict[str, Any]], grads: Sequence[Tensor], k: int, mu: float, tau: float
) -> None:
    """``m ← μ m + (1 − τ) g`` (``m = g`` at ``k = 0``) for every parameter, fused.

    :func:`~mbf_analysis.methods.base.momentum_` (the reference) on every ``(state, grad)``
    pair, as two ``torch._foreach_*`` calls.
    """
    if k == 0:
        for state, grad in zip(states, grads, strict=True):
            state["momentum_buffer"] = momentum_(None, grad, mu, tau)
        return
    buffers = [state["momentum_buffer"] for state in states]
    torch._foreach_mul_(buffers, mu)
    torch._foreach_add_(buffers, list(grads), alpha=1.0 - tau)


def weight_matrix(layout: LayerLayout, tensors: Mapping[str, Tensor]) -> Tensor:
    """``W̄ = [W b]`` ``[g, a]`` from a layer's parameter-shaped tensors (name → tensor).

    The same matrix as ``to_matrix(layout, layout.flatten(tensors))``
    (:func:`~mbf_analysis.curvature.kfac.to_matrix`, the reference it is tested against)
    without the round trip through the mini-block order.
    """
    weight = tensors[layout.param_names[0]]
    matrix = weight.reshape(weight.shape[0], -1)
    if not layout.has_bias:
        return matrix
    return torch.cat([matrix, tensors[layout.param_names[1]].unsqueeze(-1)], dim=-1)


def split_weight_matrix(layout: LayerLayout, matrix: Tensor) -> dict[str, Tensor]:
    """Inverse of :func:`weight_matrix`: ``[g, a]`` → name → parameter-shaped tensor.

    The same as ``layout.unflatten(from_matrix(layout, matrix))``.
    """
    columns = matrix.shape[-1] - int(layout.has_bias)
    out = {layout.param_names[0]: matrix[:, :columns].reshape(layout.param_shapes[0])}
    if layout.has_bias:
        out[layout.param_names[1]] = matrix[:, -1]
    return out


def batched_split_inverses(
    factors: Sequence[tuple[Tensor, Tensor]], damping: float
) -> list[SplitInverse]:
    """``[split_inverse(A, G, λ) for A, G in factors]``, the damped inverses batched by size.

    Every layer's ``π`` (:func:`~mbf_analysis.linalg.split_damping_pi`) and damped factors are
    those of :func:`~mbf_analysis.curvature.kfac.split_inverse` (the reference it is tested
    against); the ``2 L`` inverses ``(A + π√λ I)⁻¹``, ``(G + π⁻¹√λ I)⁻¹`` of equal size, dtype and
    device go through one :func:`~mbf_analysis.linalg.damped_inverse` call with one damping per
    block (``trusted=True``: the factors are symmetric by construction and the optimizer has
    checked them finite), so the first Cholesky stage costs one call per size, and a block that
    it rejects still moves on alone to the float64 and eigendecomposition stages.

    Args:
        factors: ``(A [a, a], G [g, g])`` per layer, finite.
        damping: ``λ > 0``.

    Returns:
        One :class:`~mbf_analysis.curvature.kfac.SplitInverse` per layer.
    """
    root = math.sqrt(damping)
    mats, dampings = [], []
    for a, g in factors:
        pi = _split_pi(a, g)
        mats += [a, g]
        dampings += [root * pi, root / pi]
    inverses = _grouped(
        mats,
        lambda stack, index: damped_inverse(
            stack,
            torch.tensor([dampings[i] for i in index], dtype=torch.float64, device=stack.device),
            trusted=True,
        ),
    )
    return [SplitInverse(inverses[2 * i], inverses[2 * i + 1]) for i in range(len(factors))]


def _split_pi(a: Tensor, g: Tensor) -> float:
    """:func:`~mbf_analysis.linalg.split_damping_pi` for one layer, as a Python float.

    The same float64 arithmetic on the same float32/float64 diagonal means, with two scalar
    reads instead of a dozen tensor operations.
    """
    mean_a = float(a.diagonal().mean())
    mean_g = float(g.diagonal().mean())
    return math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0


def batched_eigen_inverses(factors: Sequence[tuple[Tensor, Tensor]]) -> list[EigenInverse]:
    """``[eigen_inverse(A, G) for A, G in factors]``, one ``eigh`` call per size.

    The decompositions of :func:`~mbf_analysis.curvature.kfac.eigen_inverse` (the reference it is
    tested against): symmetrized factors, eigenvalues clamped at 0, float64 where float32 fails
    (:func:`~mbf_analysis.curvature.kfac.factor_eigh`).
    """
    mats = [m for pair in factors for m in pair]

    def decompose(stack: Tensor, index: list[int]) -> tuple[Tensor, Tensor]:
        w, q = factor_eigh(stack)
        return q, w

    pairs = _grouped(mats, decompose)
    return [EigenInverse(*pairs[2 * i], *pairs[2 * i + 1]) for i in range(len(factors))]


def _grouped(mats: Sequence[Tensor], fn: Callable[[Tensor, list[int]], Any]) -> list[Any]:
    """``fn`` on the stack of each set of equal shape, dtype and device; results per matrix.

    ``fn(stack [B, s, s], index)`` returns a tensor ``[B, …]`` or a tuple of them; the result
    for ``mats[index[b]]`` is entry ``b`` (of each).
    """
    groups: dict[tuple, list[int]] = {}
    for i, mat in enumerate(mats):
        groups.setdefault((tuple(mat.shape), mat.dtype, mat.device), []).append(i)
    out: list[Any] = [None] * len(mats)
    for index in groups.values():
        stack = (
            mats[index[0]].unsqueeze(0)
            if len(index) == 1
            else torch.stack([mats[i] for i in index])
        )
        result = fn(stack, index)
        for b, i in enumerate(index):
            out[i] = tuple(r[b] for r in result) if isinstance(result, tuple) else result[b]
    return out


def kfac_true_step(
    optimizer: KFAC,
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One true-Fisher KFAC training step: forward, backward, sampled-label backward, step.

    The momentum uses the gradient of ``loss_fn(model(inputs), targets)`` (a mean loss); on
    statistics steps (:meth:`KFAC.needs_sampled_backward`) :meth:`KFAC.sampled_backward` records
    ``G`` from one label per input drawn from the model's predictive distribution. The analogue
    of :func:`~mbf_analysis.optim.mbf.mbf_true_step`; with the same generator state it draws the
    labels :func:`~mbf_analysis.curvature.collect.collect` draws for ``kfac_factors_sampled``.

    Args:
        optimizer: A :class:`KFAC` with ``fisher="mc"`` groups.
        model: The model (or its DDP wrapper).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: ``[m, *in_shape]``.
        targets: The real labels.
        generator: Randomness of the sampled labels.

    Returns:
        The (detached) loss on the real labels.
    """
    optimizer.zero_grad()
    outputs = model(inputs)
    loss = loss_fn(outputs, targets)
    needed = optimizer.needs_sampled_backward()
    loss.backward(retain_graph=needed)
    optimizer.sampled_backward(outputs, loss_fn, generator=generator)
    optimizer.step()
    return loss.detach()
