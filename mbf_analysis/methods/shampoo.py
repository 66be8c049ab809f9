r"""Shampoo (Gupta et al. 2018) with EMA statistics (Anil et al. 2021), METHODS.md §4.

Every parameter tensor is preconditioned on its own. Its gradient ``G`` is viewed as a tensor of
order ``k`` with modes ``n_1 … n_k``: Conv2d weights as ``[C_out, C_in, k_h·k_w]``
**(choice, as the authors' code)**, Linear weights as ``[n_out, n_in]``, biases and other 1-D
parameters as ``[n]``; modes of size 1 are dropped **(choice)** (a ``[n, 1]`` weight is of
order 1). For every mode ``i``, with the mode-``i`` unfolding ``G_(i) [n_i, ∏_{j≠i} n_j]``:

.. math::

    H_i \leftarrow \beta H_i + (1 - \beta) G_{(i)} G_{(i)}^\top \ \ (k \equiv 0 \bmod T_1),
    \qquad
    R_i = (H_i + \epsilon I)^{-1/(2k)} \ \ (k \equiv 0 \bmod T_2),

and the direction of the momentum ``M`` is ``D = M ×_1 R_1 ×_2 R_2 ⋯ ×_k R_k`` (for a matrix,
``D = R_1 M R_2``). Roots come from :func:`~mbf_analysis.linalg.inverse_root` (by default
``method="auto"``: an eigendecomposition on CPU, coupled Newton on CUDA), one batched call per
size and order (:func:`grouped_inverse_roots`).

The curvature matrix of a parameter is ``C = H_1^{1/k} ⊗ ⋯ ⊗ H_k^{1/k}`` (row-major ``vec``):
``vec D = C^{-1/2} vec M`` when ``ε = 0``, and in general ``vec D = C_ε^{-1/2} vec M`` with
``C_ε = ⊗_i (H_i + εI)^{1/k}``. A layer's matrix is the block diagonal of its parameters'
matrices, permuted into METHODS §2 order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import GRAD, Stats
from mbf_analysis.layout import LayerLayout
from mbf_analysis.linalg import ROOT_METHODS, RootMethod, inverse_root, symmetrize
from mbf_analysis.methods.base import (
    Method,
    MethodConfig,
    check_choice,
    check_period,
    check_range,
    momentum_,
)

__all__ = ["ShampooConfig", "Shampoo", "tensor_dims", "mode_product", "grouped_inverse_roots"]


def tensor_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The tensor shape Shampoo preconditions a parameter of ``shape`` as (module docstring)."""
    if len(shape) == 4:
        shape = (shape[0], shape[1], shape[2] * shape[3])
    dims = tuple(n for n in shape if n > 1)
    return dims or (1,)


def mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """``T ×_i R``: multiply mode ``i`` of ``tensor`` by ``matrix`` (``[n_i, n_i]``)."""
    return torch.movedim(torch.tensordot(matrix, tensor, dims=([1], [mode])), 0, mode)


def grouped_inverse_roots(
    mats: Sequence[Tensor], powers: Sequence[int], eps: float, method: RootMethod
) -> list[Tensor]:
    """``[inverse_root(mats[i], powers[i], eps, method=method) for i ...]``, batched.

    Matrices of the same shape, root, dtype and device go through one batched
    :func:`~mbf_analysis.linalg.inverse_root` call (the list comprehension above is the
    reference it is tested against).

    Args:
        mats: Symmetric PSD matrices ``[n_i, n_i]``.
        powers: The root ``p_i`` of each.
        eps: ``ε``, added to every matrix.
        method: As for :func:`~mbf_analysis.linalg.inverse_root`.

    Returns:
        The roots ``(M_i + εI)^(-1/p_i)``, in the order of ``mats``.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (mat, p) in enumerate(zip(mats, powers, strict=True)):
        groups.setdefault((tuple(mat.shape), p, mat.dtype, mat.device), []).append(i)
    out: list[Tensor] = [mats[0]] * len(mats)
    for (_, p, _, _), index in groups.items():
        if len(index) == 1:
            out[index[0]] = inverse_root(mats[index[0]], p, eps, method=method)
            continue
        roots = inverse_root(torch.stack([mats[i] for i in index]), p, eps, method=method)
        for i, root in zip(index, roots.unbind(0), strict=True):
            out[i] = root
    return out


@dataclass(kw_only=True)
class ShampooConfig(MethodConfig):
    """Configuration of :class:`Shampoo`.

    Attributes:
        eps: ``ε ≥ 0`` added to every ``H_i`` before the root.
        decay: EMA decay ``β ∈ [0, 1)`` of the ``H_i``.
        momentum: ``μ ∈ [0, 1)``.
        dampening: ``τ ∈ [0, 1]``.
        stat_period: ``T1 ≥ 1``.
        inverse_period: ``T2 ≥ 1``.
        root_method: ``"auto"`` (eigh on CPU, Newton on CUDA), ``"newton"`` (coupled Newton,
            eigh fallback) or ``"eigh"`` (float64); see :func:`~mbf_analysis.linalg.inverse_root`.
    """

    eps: float = 1e-4
    decay: float = 0.9
    momentum: float = 0.9
    dampening: float = 0.0
    stat_period: int = 1
    inverse_period: int = 1
    root_method: RootMethod = "auto"

    ONE_SHOT: ClassVar[dict] = {
        "momentum": 0.0,
        "decay": 0.0,
        "stat_period": 1,
        "inverse_period": 1,
    }

    def __post_init__(self) -> None:
        check_range(self, "eps", low=0.0)
        check_range(self, "decay", low=0.0, high=1.0, high_open=True)
        check_range(self, "momentum", low=0.0, high=1.0, high_open=True)
        check_range(self, "dampening", low=0.0, high=1.0)
        check_period(self, "stat_period")
        check_period(self, "inverse_period")
        check_choice(self, "root_method", ROOT_METHODS)


class Shampoo(Method):
    """Shampoo (module docstring).

    State: per layer ``"m"``; per parameter (qualified name) ``"H0"``, ``"H1"``, … and the
    roots ``"R0"``, ``"R1"``, ….
    """

    config: ShampooConfig

    def __init__(self, config: ShampooConfig | None = None, name: str = "shampoo") -> None:
        super().__init__(config or ShampooConfig(), name)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({GRAD})

    def _tensors(self, layout: LayerLayout, vector: Tensor) -> dict[str, Tensor]:
        parts = layout.unflatten(vector)
        return {name: parts[name].reshape(tensor_dims(shape)) for name, shape in _params(layout)}

    def _update(self, stats: Stats) -> None:
        cfg = self.config
        due: list[tuple[dict[str, Tensor], int, int]] = []  # (state, mode, order) to re-root
        for layer, g in stats.grad.items():
            slot = self.state.setdefault(layer, {})
            slot["m"] = momentum_(slot.get("m"), g, cfg.momentum, cfg.dampening)
            layout = stats.layouts[layer]
            for name, grad in self._tensors(layout, g).items():
                param = self.state.setdefault(name, {})
                order = grad.dim()
                if self._due(cfg.stat_period):
                    for i in range(order):
                        unfolded = torch.movedim(grad, i, 0).reshape(grad.shape[i], -1)
                        key = f"H{i}"
                        if key not in param:
                            param[key] = grad.new_zeros(grad.shape[i], grad.shape[i])
                        param[key].mul_(cfg.decay).addmm_(unfolded, unfolded.T, alpha=1 - cfg.decay)
                if self._due(cfg.inverse_period):
                    due.extend((param, i, order) for i in range(order))
        if due:
            roots = grouped_inverse_roots(
                [param[f"H{i}"] for param, i, _ in due],
                [2 * order for _, _, order in due],
                cfg.eps,
                cfg.root_method,
            )
            for (param, i, _), root in zip(due, roots, strict=True):
                param[f"R{i}"] = root

    def _first_moment(self) -> dict[str, Tensor]:
        return {layer: self.state[layer]["m"] for layer in self._require_layouts()}

    def _direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        layouts = self._require_layouts()
        out = {}
        for layer, v in vectors.items():
            layout = layouts[layer]
            directions = {}
            for name, tensor in self._tensors(layout, v).items():
                param = self.state[name]
                for i in range(tensor.dim()):
                    tensor = mode_product(tensor, param[f"R{i}"], i)
                directions[name] = tensor.reshape(dict(_params(layout))[name])
            out[layer] = layout.flatten(directions)
        return out

    def _matrix(self, layer: str) -> Tensor:
        layout = self._require_layouts()[layer]
        blocks = []
        for name, shape in _params(layout):
            order = len(tensor_dims(shape))
            stats = [self.state[name][f"H{i}"] for i in range(order)]
            factor = torch.ones(1, 1, dtype=stats[0].dtype, device=stats[0].device)
            for h in stats:
                factor = torch.kron(factor, _matrix_power(h, 1.0 / order))
            blocks.append(factor)
        dense = torch.block_diag(*blocks)
        offsets, start = {}, 0
        for name, shape in _params(layout):
            numel = int(torch.Size(shape).numel())
            offsets[name] = torch.arange(start, start + numel, device=dense.device).reshape(shape)
            start += numel
        perm = layout.flatten(offsets)
        return dense[perm][:, perm]


def _params(layout: LayerLayout) -> list[tuple[str, tuple[int, ...]]]:
    return list(zip(layout.param_names, layout.param_shapes, strict=True))


def _matrix_power(mat: Tensor, power: float) -> Tensor:
    """``M^p`` of a symmetric PSD matrix by eigendecomposition (eigenvalues clamped at 0)."""
    w, q = torch.linalg.eigh(symmetrize(mat))
    return (q * w.clamp_min(0) ** power) @ q.mT
