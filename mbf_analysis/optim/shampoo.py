r"""Shampoo as a ``torch.optim.Optimizer`` (Gupta et al. 2018, Anil et al. 2021; METHODS.md §4).

The formulas of :mod:`mbf_analysis.methods.shampoo`, per parameter: its gradient ``G`` viewed as a
tensor of order ``k`` (:func:`~mbf_analysis.methods.shampoo.tensor_dims`: Conv2d weights as
``[C_out, C_in, k_h·k_w]``, modes of size 1 dropped), at step ``k`` of its group:

.. math::

    m &\leftarrow \mu m + (1 - \tau) g \quad (m = g \text{ at } k = 0), \\
    H_i &\leftarrow \beta H_i + (1 - \beta) G_{(i)} G_{(i)}^\top \quad (k \equiv 0 \bmod T_1), \\
    R_i &= (H_i + \epsilon I)^{-1/(2k)} \quad (k \equiv 0 \bmod T_2), \\
    D &= M \times_1 R_1 \cdots \times_k R_k, \qquad
    \theta \leftarrow (1 - \alpha\gamma)\,\theta - \alpha D,

with :func:`~mbf_analysis.linalg.inverse_root` for the roots (``root_method="auto"``: an
eigendecomposition in the parameter's precision on CPU, coupled Newton on CUDA; all roots of a
group that share size and order in one batched call,
:func:`~mbf_analysis.methods.shampoo.grouped_inverse_roots`) and
:func:`~mbf_analysis.methods.shampoo.mode_product` for ``×_i``.

State per parameter: ``"step"``, ``"momentum_buffer"``, ``"H0"``, ``"H1"``, … and ``"R0"``, ….
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from mbf_analysis.linalg import ROOT_METHODS, RootMethod, all_finite
from mbf_analysis.methods.base import momentum_
from mbf_analysis.methods.shampoo import grouped_inverse_roots, mode_product, tensor_dims
from mbf_analysis.optim.common import (
    CheckedLoad,
    check_choice,
    check_curvature_settings,
    check_gradients,
    check_number,
    check_params,
    decoupled_update_,
    group_gradients,
)

__all__ = ["Shampoo"]


class Shampoo(CheckedLoad):
    """Shampoo with EMA statistics (module docstring).

    Args:
        params: A model (its parameters with ``requires_grad``), parameters, or parameter
            groups; float32 or float64.
        lr: ``α ≥ 0`` (per group).
        eps: ``ε ≥ 0`` added to every ``H_i`` before the root (per group).
        momentum: ``μ ∈ [0, 1)`` (per group).
        dampening: ``τ ∈ [0, 1]`` (per group).
        stat_decay: ``β ∈ [0, 1)`` (per group).
        weight_decay: Decoupled ``γ ≥ 0`` (per group).
        stat_period: ``T1 ≥ 1`` (per group).
        inverse_period: ``T2 ≥ 1`` (per group).
        root_method: ``"auto"`` (eigh on CPU, Newton on CUDA), ``"newton"`` (coupled Newton,
            eigh fallback) or ``"eigh"`` (float64), per group; see
            :func:`~mbf_analysis.linalg.inverse_root`.

    Raises:
        TypeError: For a parameter that is not float32/float64.
        ValueError: For an invalid setting.
    """

    OWNER = "Shampoo"

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        eps: float = 1e-4,
        momentum: float = 0.9,
        dampening: float = 0.0,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        stat_period: int = 10,
        inverse_period: int = 100,
        root_method: RootMethod = "auto",
    ) -> None:
        self._names: dict[Tensor, str] = {}
        if isinstance(params, nn.Module):
            self._names = {p: n for n, p in params.named_parameters()}
            params = [p for p in params.parameters() if p.requires_grad]
        defaults = {
            "lr": lr,
            "eps": eps,
            "momentum": momentum,
            "dampening": dampening,
            "stat_decay": stat_decay,
            "weight_decay": weight_decay,
            "stat_period": stat_period,
            "inverse_period": inverse_period,
            "root_method": root_method,
        }
        self._check_settings(defaults, None)
        super().__init__(params, defaults)

    def _check_settings(self, group: dict[str, Any], index: int | None) -> None:
        owner = self.OWNER
        check_curvature_settings(owner, group, index)
        check_number(owner, index, "eps", group["eps"], low=0.0)
        check_choice(owner, "root_method", group["root_method"], ROOT_METHODS)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (validated)."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            check_params(self.OWNER, group["params"])
            self._check_settings(group, index)
        except Exception:
            self.param_groups.pop()
            raise
        for j, p in enumerate(group["params"]):
            self._names.setdefault(p, f"param_groups[{index}][{j}] {tuple(p.shape)}")

    def _after_load(self) -> None:
        """Validate the loaded settings."""
        for index, group in enumerate(self.param_groups):
            self._check_settings(group, index)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Shampoo step for every group whose parameters have gradients.

        Raises:
            NonFiniteError: If a gradient holds NaN/Inf (nothing is changed).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [g for g in self.param_groups if group_gradients(self.OWNER, g, self._names)]
        for group in active:
            if not all_finite([p.grad for p in group["params"]]):  # one fused check, then name it
                check_gradients(self.OWNER, {p: p.grad for p in group["params"]}, self._names)
        for group in active:
            params = group["params"]
            k = self.state[params[0]].get("step", 0)
            for p in params:
                self._accumulate(group, p, k)
            if k % group["inverse_period"] == 0:
                self._refresh_roots(group)
            directions = [self._direction(p) for p in params]
            decoupled_update_(params, directions, group["lr"], group["weight_decay"])
            for p in params:
                self.state[p]["step"] = k + 1
        return loss

    def _accumulate(self, group: dict[str, Any], p: Tensor, k: int) -> None:
        """Update the momentum and (on statistics steps) the ``H_i`` of ``p``."""
        state = self.state[p]
        buf = state["momentum_buffer"] if k > 0 else None
        state["momentum_buffer"] = momentum_(buf, p.grad, group["momentum"], group["dampening"])
        if k % group["stat_period"] != 0:
            return
        dims = tensor_dims(tuple(p.shape))
        grad = p.grad.reshape(dims)
        beta = group["stat_decay"]
        for i in range(len(dims)):
            unfolded = torch.movedim(grad, i, 0).reshape(dims[i], -1)
            if f"H{i}" not in state:
                state[f"H{i}"] = grad.new_zeros(dims[i], dims[i])
            state[f"H{i}"].mul_(beta).addmm_(unfolded, unfolded.T, alpha=1 - beta)

    def _refresh_roots(self, group: dict[str, Any]) -> None:
        """``R_i = (H_i + εI)^(-1/(2k))`` for every parameter of the group, batched by size."""
        due: list[tuple[dict[str, Tensor], int, int]] = []  # (state, mode, order)
        for p in group["params"]:
            order = len(tensor_dims(tuple(p.shape)))
            due += [(self.state[p], i, order) for i in range(order)]
        roots = grouped_inverse_roots(
            [state[f"H{i}"] for state, i, _ in due],
            [2 * order for _, _, order in due],
            group["eps"],
            group["root_method"],
        )
        for (state, i, _), root in zip(due, roots, strict=True):
            state[f"R{i}"] = root

    def _direction(self, p: Tensor) -> Tensor:
        """``D = M ×_1 R_1 ⋯ ×_k R_k`` for the momentum ``M`` of ``p``."""
        state = self.state[p]
        dims = tensor_dims(tuple(p.shape))
        direction = state["momentum_buffer"].reshape(dims)
        for i in range(len(dims)):
            direction = mode_product(direction, state[f"R{i}"], i)
        return direction.reshape(p.shape)
