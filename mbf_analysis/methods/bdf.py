r"""BDF: the block-diagonal (one block per layer) empirical Fisher (METHODS.md §4).

One dense block per layer (weight and bias together, METHODS §2 order), with the per-sample
gradients ``g_{n,l}`` of the minibatch and one decay ``β`` for both averages:

.. math::

    F_l \leftarrow \beta F_l + (1 - \beta) \frac{1}{m} \sum_{n=1}^{m} g_{n,l} g_{n,l}^\top,
    \qquad
    m_l \leftarrow \beta m_l + (1 - \beta) g_l,
    \qquad
    d_l = (F_l + \lambda I)^{-1} m_l .

Two representations of ``F_l``:

- *low rank*: ``F_l = U_lᵀ U_l`` with the stacked rows ``U_l ← [√β U_l; √((1 − β)/m) G_l]``
  (``G_l [m, d]`` the per-sample gradients; ``β = 0`` keeps only the new rows). While the row
  count ``r`` stays below ``d``, :func:`~mbf_analysis.linalg.woodbury_damped_solve` gives ``d_l``
  at ``O(r² d)`` cost and ``O(r d)`` memory: the one-shot case with ``m < d``, for instance.
- *dense*: ``F_l`` as a ``[d, d]`` matrix (solved by Cholesky with fallbacks), checked against
  the memory budget (:func:`~mbf_analysis.curvature.memory.check_dense`) before allocation.

``solver="auto"`` keeps a layer low rank while that is cheaper and switches it to dense for good
when it no longer is. Counting multiply-adds per direction, Woodbury costs ``r² d`` (``U Uᵀ``)
plus ``r³/6`` (Cholesky), the dense form ``m d²`` (its EMA update with ``m`` new rows) plus
``d³/6``; the layer goes dense at the first update where

.. math::

    r^2 d + r^3/6 \ge m d^2 + d^3/6 ,

which happens before ``r`` reaches ``d`` (for ``d = 5140``, ``m = 256``: at ``r ≈ 2340``).
Waiting until ``r = d`` instead made each Woodbury direction up to 3× as dear as a dense one.
``"dense"`` and ``"woodbury"`` force one representation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import GRAD, PER_SAMPLE_GRAD, Stats
from mbf_analysis.curvature.memory import check_dense, resolve_budget
from mbf_analysis.errors import ConfigError
from mbf_analysis.linalg import damped_solve, woodbury_damped_solve
from mbf_analysis.methods.base import Method, MethodConfig, check_choice, check_range

__all__ = ["BDFConfig", "BDF", "dense_is_cheaper", "check_memory_budget"]


def dense_is_cheaper(solver: str, rows: int, dim: int, new_rows: int) -> bool:
    """Whether ``rows`` stacked rows of length ``dim`` (``new_rows`` added per update) are
    cheaper as a dense ``[dim, dim]`` matrix (``solver="auto"``, module docstring), or whether
    ``solver`` forces the dense form."""
    if solver == "auto":
        return rows**2 * dim + rows**3 / 6 >= new_rows * dim**2 + dim**3 / 6
    return solver == "dense"


def check_memory_budget(config: object) -> None:
    """Raise ``ConfigError`` unless ``config.memory_budget`` is ``None`` or a positive int."""
    budget = config.memory_budget
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0
    ):
        raise ConfigError(
            f"{type(config).__name__}.memory_budget must be a positive number of bytes, got "
            f"{budget!r}."
        )


@dataclass(kw_only=True)
class BDFConfig(MethodConfig):
    """Configuration of :class:`BDF`.

    Attributes:
        damping: ``λ > 0``.
        decay: ``β ∈ [0, 1)`` of both EMAs.
        solver: ``"auto"``, ``"dense"`` or ``"woodbury"`` (module docstring).
        memory_budget: Bytes the dense blocks of all layers may use together (default: half
            the free memory of the device, or ``$MBF_MEMORY_BUDGET``).
    """

    damping: float = 0.003
    decay: float = 0.9
    solver: Literal["auto", "dense", "woodbury"] = "auto"
    memory_budget: int | None = None

    ONE_SHOT: ClassVar[dict] = {"decay": 0.0}

    def __post_init__(self) -> None:
        check_range(self, "damping", low=0.0, low_open=True)
        check_range(self, "decay", low=0.0, high=1.0, high_open=True)
        check_choice(self, "solver", ("auto", "dense", "woodbury"))
        check_memory_budget(self)


class BDF(Method):
    """Block-diagonal full empirical Fisher (module docstring).

    State per layer: ``"m"`` (``[d]``) and either ``"U"`` (``[r, d]``, low rank) or ``"F"``
    (``[d, d]``). The curvature matrix is ``F_l`` (``UᵀU`` when low rank).
    """

    config: BDFConfig

    def __init__(self, config: BDFConfig | None = None, name: str = "bdf") -> None:
        super().__init__(config or BDFConfig(), name)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({GRAD, PER_SAMPLE_GRAD})

    def _update(self, stats: Stats) -> None:
        beta = self.config.decay
        per_sample = stats.statistic(PER_SAMPLE_GRAD)
        self._check_budget(per_sample)
        for layer, g in stats.grad.items():
            slot = self.state.setdefault(layer, {})
            if "m" not in slot:
                slot["m"] = g.new_zeros(g.shape)
            slot["m"].mul_(beta).add_(g, alpha=1 - beta)
            rows = per_sample[layer] * math.sqrt((1 - beta) / stats.batch_size)
            if "F" in slot:
                slot["F"].mul_(beta).addmm_(rows.T, rows)
                continue
            old = slot.get("U")
            if old is not None and beta > 0:
                rows = torch.cat([old * math.sqrt(beta), rows])
            if self._dense(rows.shape[0], rows.shape[1], stats.batch_size):
                self.state[layer] = {"m": slot["m"], "F": rows.T @ rows}
            else:
                slot["U"] = rows

    def _dense(self, rows: int, dim: int, new_rows: int) -> bool:
        """Whether a layer with ``rows`` stacked rows of length ``dim`` is cheaper dense."""
        return dense_is_cheaper(self.config.solver, rows, dim, new_rows)

    def _check_budget(self, per_sample: dict[str, Tensor]) -> None:
        """Refuse, before any allocation, dense blocks that would exceed the budget."""
        sizes = {}
        for layer, g in per_sample.items():
            slot = self.state.get(layer, {})
            rows = g.shape[0] + (slot["U"].shape[0] if "U" in slot and self.config.decay else 0)
            if "F" in slot or self._dense(rows, g.shape[1], g.shape[0]):
                sizes[layer] = g.shape[1]
        if sizes:
            some = next(iter(per_sample.values()))
            budget = resolve_budget(self.config.memory_budget, some.device)
            check_dense(sizes, some.element_size(), budget, what="BDF curvature block")

    def _first_moment(self) -> dict[str, Tensor]:
        return {layer: self.state[layer]["m"] for layer in self._require_layouts()}

    def _direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for layer, v in vectors.items():
            slot = self.state[layer]
            if "F" in slot:
                out[layer] = damped_solve(slot["F"], v, self.config.damping)
            else:
                out[layer] = woodbury_damped_solve(slot["U"], v, self.config.damping)
        return out

    def _matrix(self, layer: str) -> Tensor:
        slot = self.state[layer]
        return slot["F"].clone() if "F" in slot else slot["U"].T @ slot["U"]
