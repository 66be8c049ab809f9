r"""KFAC (Martens & Grosse 2015) and KFC for convolutions (Grosse & Martens 2016), METHODS.md §4.

For every Linear and Conv2d layer, with the factors ``A``, ``G`` of
:mod:`mbf_analysis.curvature.kfac` (their scaling convention and its relation to curvlinops are
stated there) and the momentum in matrix form ``M̄ = [M b]`` (``[g, a]``, see
:func:`mbf_analysis.curvature.kfac.to_matrix`):

.. math::

    A \leftarrow \beta A + (1 - \beta) A_{\mathrm{batch}}, \quad
    G \leftarrow \beta G + (1 - \beta) G_{\mathrm{batch}} \ \ (k \equiv 0 \bmod T_1),

and, with inverses refreshed when ``k ≡ 0 (mod T2)``,

- ``damping_mode="split"``: ``D = (G + π⁻¹√λ I)⁻¹ M̄ (A + π√λ I)⁻¹`` with
  ``π² = (tr A / a) / (tr G / g)`` (factored Tikhonov damping, Martens & Grosse §6.3);
- ``damping_mode="eigen"``: the exact ``vec D = (A ⊗ G + λI)⁻¹ vec M̄`` through the
  eigendecompositions of ``A`` and ``G``.

``fisher="mc"`` takes ``G`` from labels sampled from the model (one extra backward pass),
``fisher="empirical"`` from the real labels, ``fisher="exact"`` from the exact Fisher
(``G = (1/(mT)) Σ_n Σ_t Σ_c δ_ntc δ_ntcᵀ`` over the ``C`` rows of the square-root GGN, one
batched backward pass: deterministic, for comparisons with the Kronecker-SVD family). Layers
without Kronecker factors (normalization layers) are left unpreconditioned: ``d = m``
**(choice)**, and their curvature matrix is ``I``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import (
    GRAD,
    KFAC_FACTORS,
    KFAC_FACTORS_EXACT,
    KFAC_FACTORS_SAMPLED,
    Stats,
)
from mbf_analysis.curvature.kfac import (
    EigenInverse,
    KronFactors,
    SplitInverse,
    apply_eigen_inverse,
    apply_split_inverse,
    eigen_inverse,
    from_matrix,
    kron_layout_matrix,
    split_inverse,
    to_matrix,
)
from mbf_analysis.errors import UnknownNameError
from mbf_analysis.fisher_kinds import check_fisher_kind
from mbf_analysis.methods.base import (
    Method,
    MethodConfig,
    check_choice,
    check_period,
    check_range,
    momentum_,
)

__all__ = ["KFACConfig", "KFAC"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class KFACConfig(MethodConfig):
    """Configuration of :class:`KFAC`.

    Attributes:
        damping: ``λ > 0``.
        damping_mode: ``"split"`` (factored, with ``π``) or ``"eigen"`` (exact ``A ⊗ G + λI``).
        fisher: ``"mc"`` (sampled labels), ``"empirical"`` (real labels) or ``"exact"``
            (:mod:`mbf_analysis.fisher_kinds`).
        momentum: ``μ ∈ [0, 1)`` of the torch-style momentum that is preconditioned.
        dampening: ``τ ∈ [0, 1]``.
        decay: EMA decay ``β ∈ [0, 1)`` of ``A`` and ``G``.
        stat_period: ``T1 ≥ 1``.
        inverse_period: ``T2 ≥ 1``.
    """

    damping: float = 0.003
    damping_mode: Literal["split", "eigen"] = "split"
    fisher: Literal["mc", "empirical", "exact"] = "mc"
    momentum: float = 0.9
    dampening: float = 0.0
    decay: float = 0.9
    stat_period: int = 1
    inverse_period: int = 1

    ONE_SHOT: ClassVar[dict] = {
        "momentum": 0.0,
        "decay": 0.0,
        "stat_period": 1,
        "inverse_period": 1,
    }

    def __post_init__(self) -> None:
        check_range(self, "damping", low=0.0, low_open=True)
        check_choice(self, "damping_mode", ("split", "eigen"))
        check_fisher_kind(self.fisher, f"{type(self).__name__}.fisher")
        check_range(self, "momentum", low=0.0, high=1.0, high_open=True)
        check_range(self, "dampening", low=0.0, high=1.0)
        check_range(self, "decay", low=0.0, high=1.0, high_open=True)
        check_period(self, "stat_period")
        check_period(self, "inverse_period")


class KFAC(Method):
    """KFAC / KFC (module docstring).

    State per layer: ``"m"``; for Linear/Conv2d layers also ``"A"``, ``"G"`` and the cached
    inverse (``"q_a"``, ``"w_a"``, ``"q_g"``, ``"w_g"`` for ``"eigen"``; ``"p_a"``, ``"p_g"``
    for ``"split"``). The curvature matrix is ``A ⊗ G`` in METHODS §2 order.
    """

    config: KFACConfig

    def __init__(self, config: KFACConfig | None = None, name: str = "kfac") -> None:
        super().__init__(config or KFACConfig(), name)
        self._warned = False

    @property
    def needs(self) -> frozenset[str]:
        factors = {
            "mc": KFAC_FACTORS_SAMPLED,
            "empirical": KFAC_FACTORS,
            "exact": KFAC_FACTORS_EXACT,
        }[self.config.fisher]
        return frozenset({GRAD, factors})

    def kronecker_factors(self, layer: str) -> list[KronFactors]:
        """The averaged ``[(A, G)]`` of a Linear or Conv2d layer: ``F̂ = A ⊗ G``.

        Raises:
            KeyError: For a layer without Kronecker factors.
        """
        slot = self.state.get(layer, {})
        if "A" not in slot:
            raise UnknownNameError(
                f"layer {layer!r} has no Kronecker factors in method {self.name!r}."
            )
        return [KronFactors(slot["A"], slot["G"])]

    def _update(self, stats: Stats) -> None:
        cfg = self.config
        for layer, g in stats.grad.items():
            slot = self.state.setdefault(layer, {})
            slot["m"] = momentum_(slot.get("m"), g, cfg.momentum, cfg.dampening)
        factors = stats.statistic(next(iter(self.needs - {GRAD})))
        if not self._warned:
            uncovered = [layer for layer in stats.layouts if layer not in factors]
            if uncovered:
                logger.info(
                    "KFAC: %d layer(s) without Kronecker factors (%s, ...): direction d = m",
                    len(uncovered),
                    uncovered[0],
                )
            self._warned = True
        if self._due(cfg.stat_period):
            for layer, (a, g) in factors.items():
                slot = self.state[layer]
                for key, batch in (("A", a), ("G", g)):
                    if key not in slot:
                        slot[key] = torch.zeros_like(batch)
                    slot[key].mul_(cfg.decay).add_(batch, alpha=1 - cfg.decay)
        if self._due(cfg.inverse_period):
            for layer in factors:
                slot = self.state[layer]
                if cfg.damping_mode == "eigen":
                    slot.update(eigen_inverse(slot["A"], slot["G"])._asdict())
                else:
                    slot.update(split_inverse(slot["A"], slot["G"], cfg.damping)._asdict())

    def _first_moment(self) -> dict[str, Tensor]:
        return {layer: self.state[layer]["m"] for layer in self._require_layouts()}

    def _direction(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        layouts = self._require_layouts()
        out = {}
        for layer, v in vectors.items():
            slot = self.state[layer]
            if "A" not in slot:
                out[layer] = v.clone()
                continue
            mat = to_matrix(layouts[layer], v)
            if self.config.damping_mode == "eigen":
                inverse = EigenInverse(slot["q_a"], slot["w_a"], slot["q_g"], slot["w_g"])
                solved = apply_eigen_inverse(inverse, mat, self.config.damping)
            else:
                solved = apply_split_inverse(SplitInverse(slot["p_a"], slot["p_g"]), mat)
            out[layer] = from_matrix(layouts[layer], solved)
        return out

    def _matrix(self, layer: str) -> Tensor:
        slot = self.state[layer]
        if "A" not in slot:
            m = slot["m"]
            return torch.eye(m.numel(), dtype=m.dtype, device=m.device)
        return kron_layout_matrix(self._require_layouts()[layer], slot["A"], slot["G"])
