r"""NGD: the exact damped natural gradient over all layers (METHODS.md §6.5).

BDF (:mod:`mbf_analysis.methods.bdf`) keeps one dense Fisher block per layer; NGD keeps the
Fisher of the whole network, every cross-layer block included. With the rows ``u_r`` of the
minibatch's Fisher over all ``D`` parameters (all layers concatenated, each in METHODS §2 order)
and one decay ``β`` of the curvature and one ``μ`` of the first moment:

.. math::

    F \leftarrow \beta F + (1 - \beta) \frac{1}{m} \sum_{r} u_r u_r^\top, \qquad
    m_l \leftarrow \mu m_l + (1 - \mu) g_l, \qquad
    d = (F + \lambda I)^{-1} m .

``fisher`` chooses the rows: ``"empirical"`` the per-sample gradients ``g_n`` (``R = m`` rows;
every layer type with per-sample gradients), ``"mc"`` the gradients of one label per input
sampled from the model, ``"exact"`` the ``C`` rows ``J_nᵀ s_nc`` of the square-root output
Hessian (``R = m C``). ``mc`` and ``exact`` build their rows ``δ_nc ⊗ ā_n`` from the per-sample
Kronecker factors (:class:`~mbf_analysis.curvature.kfac.KronSamples`), which exist for
``nn.Linear`` layers; a network with other layers takes ``fisher="empirical"``.

``F = UᵀU`` is kept as the stacked, scaled rows ``U [R, D]`` while that is cheaper, and solved
through the Woodbury identity (:func:`~mbf_analysis.linalg.woodbury_damped_solve`,
``O(R² D + R³)``, no ``D × D`` matrix); the dense ``[D, D]`` form is used, after the memory check,
once it is cheaper (:func:`~mbf_analysis.methods.bdf.dense_is_cheaper`, BDF's rule; ``solver``
forces one).
With ``decay = 0`` (the default) ``F`` is the current minibatch's Fisher: ``d`` is the exact
damped natural gradient of the batch, the reference ``ζ* = F_λ⁻¹∇`` of
``cosine --reference full``; BDF is its block-diagonal version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import (
    GRAD,
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    PER_SAMPLE_GRAD,
    Stats,
)
from mbf_analysis.curvature.memory import check_dense, resolve_budget
from mbf_analysis.errors import UnsupportedModuleError
from mbf_analysis.fisher_kinds import check_fisher_kind
from mbf_analysis.linalg import damped_solve, woodbury_damped_solve
from mbf_analysis.methods.base import (
    Method,
    MethodConfig,
    check_choice,
    check_period,
    check_range,
)
from mbf_analysis.methods.bdf import check_memory_budget, dense_is_cheaper

__all__ = ["NGDConfig", "NGD"]

_ALL = "(all layers)"
"""The state key of the all-layer curvature (not a module name)."""

_ROWS = {"empirical": PER_SAMPLE_GRAD, "mc": KRON_SAMPLES_SAMPLED, "exact": KRON_SAMPLES_EXACT}


@dataclass(kw_only=True)
class NGDConfig(MethodConfig):
    """Configuration of :class:`NGD`.

    Attributes:
        damping: ``λ > 0``.
        decay: ``β ∈ [0, 1)`` of the curvature EMA (0: the minibatch's Fisher).
        momentum: ``μ ∈ [0, 1)`` of the first-moment EMA.
        fisher: ``"empirical"``, ``"mc"`` or ``"exact"`` (module docstring).
        solver: ``"auto"``, ``"dense"`` or ``"woodbury"``.
        stat_period: ``T1 ≥ 1``: the curvature is updated at steps ``k ≡ 0 (mod T1)`` and kept
            in between (the first moment follows every gradient).
        memory_budget: Bytes the dense ``[D, D]`` form may use (default: half the free memory of
            the device, or ``$MBF_MEMORY_BUDGET``).
    """

    damping: float = 0.003
    decay: float = 0.0
    momentum: float = 0.9
    fisher: Literal["empirical", "mc", "exact"] = "empirical"
    solver: Literal["auto", "dense", "woodbury"] = "auto"
    stat_period: int = 1
    memory_budget: int | None = None

    ONE_SHOT: ClassVar[dict] = {"decay": 0.0, "momentum": 0.0, "stat_period": 1}

    def __post_init__(self) -> None:
        check_range(self, "damping", low=0.0, low_open=True)
        check_range(self, "decay", low=0.0, high=1.0, high_open=True)
        check_range(self, "momentum", low=0.0, high=1.0, high_open=True)
        check_fisher_kind(self.fisher, "NGDConfig.fisher")
        check_choice(self, "solver", ("auto", "dense", "woodbury"))
        check_period(self, "stat_period")
        check_memory_budget(self)


class NGD(Method):
    """The exact damped natural gradient over all layers (module docstring).

    State: per layer ``"m"`` (``[d_l]``); under the key ``"(all layers)"`` either ``"U"``
    (``[R, D]``, rows already scaled so that ``F = UᵀU``) or ``"F"`` (``[D, D]``). The curvature
    matrix of a layer (:meth:`matrix`) is its diagonal block of ``F``.
    """

    config: NGDConfig

    def __init__(self, config: NGDConfig | None = None, name: str = "ngd") -> None:
        super().__init__(config or NGDConfig(), name)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({GRAD, _ROWS[self.config.fisher]})

    # ------------------------------------------------------------------ statistics
    def rows(self, stats: Stats) -> Tensor:
        """The minibatch's Fisher rows over all layers, ``[R, D]``, scaled by ``1/√m`` so that
        ``F_batch = UᵀU``."""
        layouts = stats.layouts
        statistic = stats.statistic(_ROWS[self.config.fisher])
        if self.config.fisher == "empirical":
            parts = [statistic[name] for name in layouts]
        else:
            other = [
                f"{name} ({layout.kind})"
                for name, layout in layouts.items()
                if layout.kind != "linear"
            ]
            if other:
                raise UnsupportedModuleError(
                    f"ngd with fisher={self.config.fisher!r} builds its rows from the per-sample "
                    f"Kronecker factors of nn.Linear layers, and these layers are not Linear: "
                    f"{', '.join(other)}; use fisher='empirical' for this network."
                )
            parts = []
            for name in layouts:
                samples = statistic[name]
                delta = samples.rows  # [m, r, g]
                outer = torch.einsum("nrg,na->nrga", delta, samples.a)
                parts.append(outer.reshape(delta.shape[0] * delta.shape[1], -1))
        return torch.cat(parts, dim=1) / math.sqrt(stats.batch_size)

    def _update(self, stats: Stats) -> None:
        mu = self.config.momentum
        for layer, g in stats.grad.items():
            slot = self.state.setdefault(layer, {})
            if "m" not in slot:
                slot["m"] = g.new_zeros(g.shape)
            slot["m"].mul_(mu).add_(g, alpha=1 - mu)
        if not self._due(self.config.stat_period):
            return
        beta = self.config.decay
        rows = self.rows(stats) * math.sqrt(1 - beta)
        new_rows = rows.shape[0]
        curvature = self.state.setdefault(_ALL, {})
        if "F" in curvature:
            curvature["F"].mul_(beta).addmm_(rows.T, rows)
            return
        old = curvature.get("U")
        if old is not None and beta > 0:
            rows = torch.cat([old * math.sqrt(beta), rows])
        if dense_is_cheaper(self.config.solver, rows.shape[0], rows.shape[1], new_rows):
            self._check_dense(rows)
            self.state[_ALL] = {"F": rows.T @ rows}
        else:
            curvature["U"] = rows

    def _check_dense(self, rows: Tensor) -> None:
        budget = resolve_budget(self.config.memory_budget, rows.device)
        check_dense(
            {"all layers": rows.shape[1]}, rows.element_size(), budget, what="all-layer Fisher"
        )

    # ------------------------------------------------------------------ directions
    def _first_moment(self) -> dict[str, Tensor]:
        return {layer: self.state[layer]["m"] for layer in self._require_layouts()}

    def _direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(self._require_layouts())
        v = torch.cat([vectors[name] for name in names])
        curvature = self.state.get(_ALL, {})
        if "F" in curvature:
            d = damped_solve(curvature["F"], v, self.config.damping)
        elif "U" in curvature:
            d = woodbury_damped_solve(curvature["U"], v, self.config.damping)
        else:  # no curvature yet (its first update was skipped): F = 0
            d = v / self.config.damping
        return dict(zip(names, d.split([vectors[name].numel() for name in names]), strict=True))

    def _matrix(self, layer: str) -> Tensor:
        layouts = self._require_layouts()
        start = 0
        for name, layout in layouts.items():
            if name == layer:
                break
            start += layout.dim
        part = slice(start, start + layouts[layer].dim)
        curvature = self.state[_ALL]
        if "F" in curvature:
            return curvature["F"][part, part].clone()
        rows = curvature["U"][:, part]
        return rows.T @ rows
