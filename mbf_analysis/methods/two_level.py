r"""Two-level KFAC (Tselepidis et al. 2020; Koroko et al. 2023), METHODS.md §6.2: a coarse
correction that couples the layers, on top of block-diagonal KFAC, for ``nn.Linear`` layers.

With ``∇`` the vector to precondition (the momentum by default), ``ζ₀ = M⁻¹∇`` the one-level
direction of :class:`~mbf_analysis.methods.KFAC` with the same settings (``M`` block-diagonal,
``M_l`` KFAC's damped ``A_l ⊗ G_l``), ``F`` the Fisher over **all** Linear layers (not
block-diagonal), ``F_λ = F + λI`` with ``λ`` the method's damping, and a coarse space
``R₀ ∈ R^{q×d}`` whose rows ``r_j`` are each supported on one layer, the residual form is

.. math::

    \zeta = \zeta_0 + R_0^\top \beta^*, \qquad F_c \beta^* = R_0 \rho, \qquad
    \rho = \nabla - F_\lambda \zeta_0, \qquad F_c = R_0 F_\lambda R_0^\top \ (q \times q).

``ζ`` minimises the energy error ``E(ζ) = ‖ζ − F_λ⁻¹∇‖²_{F_λ}`` over ``ζ₀ + range(R₀ᵀ)``; for any
``β``, ``E(ζ₀ + R₀ᵀβ) − E(ζ₀) = βᵀF_cβ − 2βᵀR₀ρ`` (the *gain*), which at ``β*`` is
``−ρᵀR₀ᵀF_c⁻¹R₀ρ ≤ 0``. The additive form of Tselepidis et al. (``coarse="tselepidis"``) is
``ζ = ζ₀ + R₀ᵀF_c⁻¹R₀∇`` with all-ones rows; its gain can be positive.

Coarse spaces, per Linear layer ``l`` (``M_l⁻¹`` KFAC's inverse of layer ``l``, ``1`` all ones):

=====================  ==================================  ======================
``coarse``             rows on layer ``l``                 form
=====================  ==================================  ======================
``nicolaides``         ``1``                               residual
``residual``           ``M_l⁻¹ρ_l``                        residual
``spectral``           ``vec(q_g q_aᵀ)``                   residual
``krylov-nicolaides``  ``1``, ``M_l⁻¹1``                   residual
``krylov-residual``    ``M_l⁻¹ρ_l``, ``M_l⁻²ρ_l``          residual
``tselepidis``         ``1``                               additive
=====================  ==================================  ======================

``q_a``, ``q_g`` are unit eigenvectors of the smallest eigenvalues of ``A_l`` and ``G_l`` (those of
``A_l + π√λI`` and ``G_l + π⁻¹√λI`` too), refreshed with KFAC's inverses (``k ≡ 0 mod T2``).

**Orders.** :meth:`~mbf_analysis.methods.Method.direction` vectors are per layer in METHODS §2
order. Inside, a Linear layer's vector is the weight-shaped matrix ``V = W̄ = [W b]`` ``[g, a]``
(:func:`~mbf_analysis.curvature.kfac.to_matrix`): the §2 order is its row-major flatten
``V.reshape(-1)`` and KFAC's column-stacked ``vec V`` is ``V.mT.reshape(-1)``. So the SPECTRAL
row ``vec(q_g q_aᵀ)`` is ``q_a ⊗ q_g`` in KFAC order (an eigenvector of ``A ⊗ G`` with eigenvalue
``w_a w_g``) and ``outer(q_g, q_a).reshape(-1)`` in §2 order; :meth:`TwoLevelKFAC.coarse_space`
returns the §2 order.

**Per-sample computation** (``F`` is never formed). With the stored ``ā_n`` and ``δ_nc`` of the
collection pass (:class:`~mbf_analysis.curvature.kfac.KronSamples`; ``r = 1`` row per sample for
real or sampled labels, the ``r = C`` rows of the exact Fisher, ``Γ_n = Σ_c δ_ncδ_ncᵀ``), the
Fisher's rows are ``ĝ_nc = (δ_nc,l ⊗ ā_n,l)_l`` and ``F = (1/m) Σ_nc ĝ_nc ĝ_ncᵀ``. With the
projections ``p_nc(V) = ĝ_ncᵀ V = Σ_l δ_nc,lᵀ V_l ā_n,l`` (:func:`sample_projections`):

.. math::

    (F V)_l = \frac{1}{m} \sum_{n,c} p_{nc}(V)\, \delta_{nc,l} \bar a_{n,l}^\top, \qquad
    F_c = \frac{1}{m} C^\top C + \lambda R_0 R_0^\top, \quad C_{(nc), j} = p_{nc}(r_j), \qquad
    R_0 F_\lambda \zeta_0 = \frac{1}{m} C^\top w + \lambda R_0 \zeta_0, \quad w = p(\zeta_0).

One direction costs KFAC's direction, ``O(m r d)`` for ``w``, ``O(q_l m r d_l)`` per layer for
``C`` (``O(m (r g_l + a_l))`` for the outer-product rows of NICOLAIDES, SPECTRAL and TSELEPIDIS,
:class:`RankOneRows`) and ``O(q³)`` for the solve, plus one more KFAC application for
``residual`` and two for ``krylov-residual`` (KRY-NICO's ``M_l⁻¹1`` is kept from the last
inverse refresh); the residual spaces also back-project ``F ζ₀`` (``O(m r d)``). ``F_c`` is
recomputed with ``R₀`` at every :meth:`~mbf_analysis.methods.Method.direction` call.

**Choices.**

- The ``F`` of the coarse level is the Fisher of the last statistics batch: the ``ā``, ``δ``
  stored at the last step with ``k ≡ 0 (mod T1)``, not an average (an EMA of per-sample Fishers
  has no per-sample form); ``ζ₀`` uses KFAC's averaged factors. The one-shot settings make both
  this batch's.
- ``F`` and ``R₀`` cover the Linear layers only; other layers (normalization) keep
  ``ζ = ζ₀ = m``, as in KFAC. Conv2d layers are refused by name.
- The rows are scaled to unit norm before the solve (the same range, hence the same ``ζ``);
  :meth:`TwoLevelKFAC.diagnostics` reports ``cond(F_c)`` for the unit rows.
- ``F_c β = b`` goes through :func:`~mbf_analysis.linalg.damped_solve` with ``λ = 0`` (``F_c``
  already holds ``λR₀R₀ᵀ``): Cholesky, then float64, then an eigendecomposition that truncates
  the null space, the pseudo-inverse for a rank-deficient ``R₀`` (a zero residual row, two equal
  Krylov rows); the minimiser over ``ζ₀ + range(R₀ᵀ)`` is the same.

Index conventions: ``m`` samples, ``r`` rows per sample, ``a``, ``g`` the input and output sides of
a layer (``d = g a``), ``q`` coarse rows in all (``q_l`` on layer ``l``); ``Ā [m, a]`` the rows
``ā_nᵀ``, ``D [m, r, g]`` the rows ``δ_ncᵀ``; ``V``, ``Z`` layer matrices ``[g, a]``, ``R_l [q_l,
g, a]`` the rows of layer ``l`` as matrices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import (
    GRAD,
    KFAC_FACTORS,
    KFAC_FACTORS_EXACT,
    KFAC_FACTORS_SAMPLED,
    KRON_SAMPLES,
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    Stats,
)
from mbf_analysis.curvature.kfac import KronSamples
from mbf_analysis.errors import UnknownNameError, UnsupportedModuleError
from mbf_analysis.layout import LayerLayout
from mbf_analysis.linalg import damped_solve, symmetrize
from mbf_analysis.methods.base import Method, check_choice
from mbf_analysis.methods.kfac import KFAC, KFACConfig

__all__ = [
    "COARSE_SPACES",
    "CoarseSolve",
    "RankOneRows",
    "TwoLevelKFAC",
    "TwoLevelKFACConfig",
    "coarse_correction",
    "coarse_matrix",
    "fisher_product",
    "sample_projections",
]

CoarseSpace = Literal[
    "nicolaides", "residual", "spectral", "krylov-nicolaides", "krylov-residual", "tselepidis"
]
COARSE_SPACES: tuple[str, ...] = (
    "nicolaides",
    "residual",
    "spectral",
    "krylov-nicolaides",
    "krylov-residual",
    "tselepidis",
)
"""The coarse spaces (module docstring); ``"tselepidis"`` is the additive form."""

_RESIDUAL_ROWS = frozenset({"residual", "krylov-residual"})
"""Coarse spaces whose rows are built from the residual ``ρ``."""

_NEEDS = {
    "mc": (KFAC_FACTORS_SAMPLED, KRON_SAMPLES_SAMPLED),
    "empirical": (KFAC_FACTORS, KRON_SAMPLES),
    "exact": (KFAC_FACTORS_EXACT, KRON_SAMPLES_EXACT),
}
_FACTOR_FIELDS = {
    KFAC_FACTORS: "kfac",
    KFAC_FACTORS_SAMPLED: "kfac_sampled",
    KFAC_FACTORS_EXACT: "kfac_exact",
}


# ----------------------------------------------------------------------------- per-sample algebra
def sample_projections(samples: KronSamples, V: Tensor) -> Tensor:
    """``p_nc = δ_ncᵀ V ā_n``, the layer's part of ``ĝ_ncᵀ vec V`` for every row of every sample.

    Args:
        samples: ``ā [m, a]``, ``δ [m, (r,) g]``.
        V: ``[*, g, a]``, one or several layer matrices.

    Returns:
        ``[*, m, r]``.
    """
    weighted = V @ samples.a.T
    return torch.einsum("nrg,...gn->...nr", samples.rows, weighted)


def _projections(samples: Mapping[str, KronSamples], matrices: Mapping[str, Tensor]) -> Tensor:
    """``w_nc = Σ_l δ_nc,lᵀ V_l ā_n,l = ĝ_ncᵀ vec V`` over the layers given, ``[m, r]``."""
    return sum(sample_projections(samples[layer], V) for layer, V in matrices.items())


def _back_project(samples: Mapping[str, KronSamples], weights: Tensor) -> dict[str, Tensor]:
    """``(1/m) Σ_nc w_nc δ_nc,l ā_n,lᵀ`` for every layer of ``samples``, ``[g, a]`` each."""
    out = {}
    for layer, s in samples.items():
        combined = torch.einsum("nr,nrg->ng", weights, s.rows)
        out[layer] = combined.T @ s.a / s.a.shape[0]
    return out


def fisher_product(
    samples: Mapping[str, KronSamples], matrices: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``F V`` with ``F`` the Fisher over all layers of ``samples`` (cross-layer), never formed.

    ``(F V)_l = (1/m) Σ_nc p_nc(V) δ_nc,l ā_n,lᵀ`` with ``p_nc(V) = Σ_l' δ_nc,l'ᵀ V_l' ā_n,l'``
    (module docstring); ``O(m r d)``.

    Args:
        samples: Layer → ``ā [m, a_l]``, ``δ [m, (r,) g_l]`` of the same samples and rows.
        matrices: Layer → ``V_l`` ``[g_l, a_l]``, for every layer of ``samples``.

    Returns:
        Layer → ``(F V)_l`` ``[g_l, a_l]`` (``λ`` not included).
    """
    return _back_project(samples, _projections(samples, matrices))


class RankOneRows(NamedTuple):
    """Coarse rows of one layer that are outer products, ``R_j = u_j v_jᵀ`` ``[g, a]``.

    NICOLAIDES (``1_g 1_aᵀ``) and SPECTRAL (``q_g q_aᵀ``) rows; their projections
    ``δ_ncᵀ u_j v_jᵀ ā_n = (δ_ncᵀu_j)(v_jᵀā_n)`` cost ``O(m r g + m a)`` instead of
    ``O(m g a)``. Everything else accepts them wherever dense rows ``[q_l, g, a]`` go.

    Attributes:
        left: ``u_j``, ``[q_l, g]``.
        right: ``v_j``, ``[q_l, a]``.
    """

    left: Tensor
    right: Tensor

    def dense(self) -> Tensor:
        """The rows as matrices, ``[q_l, g, a]``."""
        return self.left.unsqueeze(2) * self.right.unsqueeze(1)


Rows = Tensor | RankOneRows
"""One layer's coarse rows: matrices ``[q_l, g, a]`` or :class:`RankOneRows`."""


def _count(R: Rows) -> int:
    return R.left.shape[0] if isinstance(R, RankOneRows) else R.shape[0]


def _row_projections(samples: KronSamples, R: Rows) -> Tensor:
    """``C`` of one layer's rows, ``[q_l, m, r]`` (:func:`sample_projections` of each row)."""
    if not isinstance(R, RankOneRows):
        return sample_projections(samples, R)
    output_side = samples.rows @ R.left.T  # [m, r, q]
    input_side = samples.a @ R.right.T  # [m, q]
    return (output_side * input_side.unsqueeze(1)).permute(2, 0, 1)


def _row_inner(R: Rows, V: Tensor) -> Tensor:
    """``⟨R_j, V⟩`` for one layer's rows, ``[q_l]``."""
    if isinstance(R, RankOneRows):
        return ((R.left @ V) * R.right).sum(1)
    return (R * V).sum((1, 2))


def _row_combination(R: Rows, beta: Tensor) -> Tensor:
    """``Σ_j β_j R_j``, ``[g, a]``."""
    if isinstance(R, RankOneRows):
        return (R.left * beta.unsqueeze(1)).T @ R.right
    return torch.einsum("j,jga->ga", beta, R)


def _unit_rows(R: Rows) -> Rows:
    """The rows scaled to unit Frobenius norm (a zero row stays zero)."""
    if isinstance(R, RankOneRows):
        norms = torch.linalg.vector_norm(R.left, dim=1) * torch.linalg.vector_norm(R.right, dim=1)
        return RankOneRows(R.left / _safe(norms).unsqueeze(1), R.right)
    norms = torch.linalg.vector_norm(R.flatten(1), dim=1)
    return R / _safe(norms)[:, None, None]


def _safe(norms: Tensor) -> Tensor:
    return torch.where(norms > 0, norms, torch.ones_like(norms))


def _row_gram(rows: Mapping[str, Rows]) -> Tensor:
    """``R₀R₀ᵀ``, block-diagonal by layer (rows of different layers do not overlap), ``[q, q]``."""
    grams = []
    for R in rows.values():
        if isinstance(R, RankOneRows):
            grams.append((R.left @ R.left.T) * (R.right @ R.right.T))
        else:
            grams.append(R.flatten(1) @ R.flatten(1).T)
    return torch.block_diag(*grams)


def _coarse_projections(samples: Mapping[str, KronSamples], rows: Mapping[str, Rows]) -> Tensor:
    """``C`` as ``[q, m, r]``: ``C[j, n, c] = δ_nc,lᵀ R_j ā_n,l`` for row ``j`` on layer ``l``."""
    return torch.cat([_row_projections(samples[layer], R) for layer, R in rows.items()])


def coarse_matrix(
    samples: Mapping[str, KronSamples], rows: Mapping[str, Rows], damping: float
) -> Tensor:
    """``F_c = R₀ F_λ R₀ᵀ = (1/m) CᵀC + λ R₀R₀ᵀ`` from the per-sample projections.

    Args:
        samples: Layer → ``ā [m, a_l]``, ``δ [m, (r,) g_l]``.
        rows: Layer → its rows as matrices ``R_l`` ``[q_l, g_l, a_l]`` or
            :class:`RankOneRows`; the coarse rows are numbered layer by layer in the order of
            ``rows``.
        damping: ``λ ≥ 0``.

    Returns:
        ``[q, q]``.
    """
    return _coarse_matrix(samples, rows, _coarse_projections(samples, rows).flatten(1), damping)


def _coarse_matrix(
    samples: Mapping[str, KronSamples], rows: Mapping[str, Rows], flat: Tensor, damping: float
) -> Tensor:
    """``(1/m) CᵀC + λR₀R₀ᵀ`` from ``C`` as ``[q, m r]``."""
    m = next(iter(samples.values())).a.shape[0]
    return flat @ flat.T / m + damping * _row_gram(rows)


class CoarseSolve(NamedTuple):
    """One coarse solve ``F_c β = b`` and what it gains.

    Attributes:
        matrix: ``F_c`` ``[q, q]``.
        rhs: ``b``: ``R₀ρ`` (residual form) or ``R₀∇`` (additive form), ``[q]``.
        beta: ``β`` ``[q]``.
        projected_residual: ``R₀ρ`` ``[q]``.
    """

    matrix: Tensor
    rhs: Tensor
    beta: Tensor
    projected_residual: Tensor

    def gain(self) -> float:
        """``E(ζ₀ + R₀ᵀβ) − E(ζ₀) = βᵀF_cβ − 2βᵀR₀ρ`` (``−ρᵀR₀ᵀF_c⁻¹R₀ρ`` in residual form)."""
        beta = self.beta.double()
        residual = self.projected_residual.double()
        return float(beta @ self.matrix.double() @ beta - 2 * beta @ residual)

    def condition(self) -> float:
        """``λ_max(F_c) / λ_min(F_c)`` (``inf`` when ``F_c`` is singular)."""
        w = torch.linalg.eigvalsh(symmetrize(self.matrix.double()))
        low, high = float(w[0]), float(w[-1])
        return high / low if low > 0 else math.inf


def coarse_correction(
    samples: Mapping[str, KronSamples],
    rows: Mapping[str, Rows],
    vectors: Mapping[str, Tensor],
    zeta0: Mapping[str, Tensor],
    damping: float,
    *,
    additive: bool = False,
    projections: Tensor | None = None,
) -> tuple[dict[str, Tensor], CoarseSolve]:
    """The coarse correction ``R₀ᵀβ`` of the two-level direction (module docstring).

    ``β`` solves ``F_c β = R₀ρ`` (``additive=False``) or ``F_c β = R₀∇`` (``additive=True``),
    with ``ρ = ∇ − F_λζ₀``, ``R₀ρ = R₀∇ − (1/m) Cᵀw − λR₀ζ₀`` and ``F_c`` from
    :func:`coarse_matrix`. The rows are used as given (no scaling).

    Args:
        samples: Layer → ``ā [m, a_l]``, ``δ [m, (r,) g_l]``.
        rows: Layer → ``R_l`` ``[q_l, g_l, a_l]`` or :class:`RankOneRows` (layers without
            rows may be left out).
        vectors: Layer → ``∇_l`` ``[g_l, a_l]``, for every layer of ``samples``.
        zeta0: Layer → ``ζ₀,l`` ``[g_l, a_l]``, for every layer of ``samples``.
        damping: ``λ ≥ 0``.
        additive: The additive form (Tselepidis et al.).
        projections: ``w = p(ζ₀)`` ``[m, r]`` if already computed.

    Returns:
        ``(correction, solve)``: layer → ``Σ_{j on l} β_j R_j`` ``[g_l, a_l]`` for the layers of
        ``rows``, and the :class:`CoarseSolve`.
    """
    w = _projections(samples, zeta0) if projections is None else projections
    flat = _coarse_projections(samples, rows).flatten(1)
    m = next(iter(samples.values())).a.shape[0]
    matrix = _coarse_matrix(samples, rows, flat, damping)
    on_v = torch.cat([_row_inner(R, vectors[layer]) for layer, R in rows.items()])
    on_zeta = torch.cat([_row_inner(R, zeta0[layer]) for layer, R in rows.items()])
    projected_residual = on_v - flat @ w.reshape(-1) / m - damping * on_zeta
    rhs = on_v if additive else projected_residual
    beta = damped_solve(matrix, rhs, 0.0)
    correction, start = {}, 0
    for layer, R in rows.items():
        stop = start + _count(R)
        correction[layer] = _row_combination(R, beta[start:stop])
        start = stop
    return correction, CoarseSolve(matrix, rhs, beta, projected_residual)


# ----------------------------------------------------------------------------- method
class _Setup(NamedTuple):
    """What a direction and the coarse space are built from (:meth:`TwoLevelKFAC._setup`)."""

    zeta0: dict[str, Tensor]
    """``ζ₀`` of every layer, §2 order."""
    samples: dict[str, KronSamples]
    """The stored samples of the Linear layers."""
    vectors: dict[str, Tensor]
    """``∇_l`` as ``[g, a]`` matrices (Linear layers)."""
    zeta0_matrices: dict[str, Tensor]
    """``ζ₀,l`` as ``[g, a]`` matrices (Linear layers)."""
    projections: Tensor | None
    """``w = p(ζ₀)`` ``[m, r]`` (``None`` without Linear layers)."""
    rows: dict[str, Rows]
    """``R_l`` ``[q_l, g, a]`` or :class:`RankOneRows`, unscaled."""


@dataclass(kw_only=True)
class TwoLevelKFACConfig(KFACConfig):
    """Configuration of :class:`TwoLevelKFAC`: :class:`~mbf_analysis.methods.KFACConfig`'s
    fields (the one-level KFAC, whose ``damping`` is also the ``λ`` of ``F_λ``) and the coarse
    space.

    Attributes:
        coarse: One of :data:`COARSE_SPACES` (module docstring).
    """

    coarse: CoarseSpace = "nicolaides"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "coarse", COARSE_SPACES)

    def kfac_config(self) -> KFACConfig:
        """The configuration of the one-level KFAC (every field but ``coarse``)."""
        names = KFACConfig.field_names()
        return KFACConfig(**{name: getattr(self, name) for name in names})


class TwoLevelKFAC(Method):
    """Two-level KFAC (module docstring): one-level KFAC plus a cross-layer coarse correction.

    :meth:`direction` is **cross-layer**: its per-layer pieces are those of one direction
    ``ζ = ζ₀ + R₀ᵀβ`` of the whole network, in which every Linear layer's piece depends on the
    vectors and statistics of every other Linear layer; a layer's piece alone is not a layer's
    preconditioner applied to that layer's vector.

    State (shared with the inner :attr:`kfac`, whose own state keys it keeps): per Linear layer
    also ``"coarse_a"`` ``[m, a]`` and ``"coarse_delta"`` ``[m, (r,) g]``, the samples of the last
    statistics step; for ``coarse="spectral"`` ``"coarse_q_a"`` ``[a]``, ``"coarse_q_g"`` ``[g]``,
    and for ``"krylov-nicolaides"`` ``"coarse_inverse_ones"`` ``[g, a]`` (``M_l⁻¹1``), both
    refreshed with KFAC's inverses. :meth:`matrix` is KFAC's ``A ⊗ G`` (the one-level curvature;
    the coarse level couples layers, which no layer block expresses).
    """

    config: TwoLevelKFACConfig

    def __init__(self, config: TwoLevelKFACConfig | None = None, name: str = "kfac-two-level"):
        super().__init__(config or TwoLevelKFACConfig(), name)
        self._kfac = KFAC(self.config.kfac_config())
        self._kfac_source: TwoLevelKFACConfig = self.config
        self.state = self._kfac.state
        self._last: CoarseSolve | None = None

    @property
    def kfac(self) -> KFAC:
        """The one-level KFAC whose direction is ``ζ₀`` (same settings, shared state)."""
        if self._kfac_source is not self.config:  # the config was replaced (e.g. one_shot())
            self._kfac.config = self.config.kfac_config()
            self._kfac_source = self.config
        return self._kfac

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({GRAD, *_NEEDS[self.config.fisher]})

    def next_needs(self) -> frozenset[str]:
        """What the next :meth:`update` reads: everything on statistics steps (``k ≡ 0 mod T1``),
        the gradient and KFAC's factors on the other inverse steps (``k ≡ 0 mod T2``: KFAC reads
        which layers have factors), the gradient alone otherwise."""
        factors, samples = _NEEDS[self.config.fisher]
        if self._due(self.config.stat_period):
            return frozenset({GRAD, factors, samples})
        if self._due(self.config.inverse_period):
            return frozenset({GRAD, factors})
        return frozenset({GRAD})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        kfac = self.kfac
        kfac.state, kfac.step, kfac.layouts = self.state, self.step, None
        self._last = None

    def diagnostics(self) -> dict[str, float | int]:
        """The coarse solve of the last :meth:`direction` call.

        Returns:
            ``{"gain": E(ζ) − E(ζ₀), "condition": cond(F_c), "rows": q}`` with
            ``E(ζ) = ‖ζ − F_λ⁻¹∇‖²_{F_λ}`` for the coarse level's ``F`` (residual form:
            ``−ρᵀR₀ᵀF_c⁻¹R₀ρ ≤ 0``), ``cond(F_c)`` for unit-norm rows.

        Raises:
            RuntimeError: Before the first :meth:`direction` call.
        """
        if self._last is None:
            raise RuntimeError(
                f"method {self.name!r} has solved no coarse problem yet; call direction() first."
            )
        return {
            "gain": self._last.gain(),
            "condition": self._last.condition(),
            "rows": int(self._last.beta.numel()),
        }

    def coarse_space(self, grads: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``R₀`` for the vectors ``grads`` (default: the momentum), as :meth:`direction` uses it.

        Returns:
            Linear layer → its rows ``[q_l, d_l]`` in METHODS §2 order, unscaled (``q_l = 1``,
            or 2 for the Krylov spaces).
        """
        rows = self._setup(self._vectors(grads)).rows
        return {
            layer: (R.dense() if isinstance(R, RankOneRows) else R).flatten(1)
            for layer, R in rows.items()
        }

    # ------------------------------------------------------------------ statistics
    def _check_layers(self, stats: Stats) -> None:
        conv = [layer for layer, layout in stats.layouts.items() if layout.kind == "conv2d"]
        if conv:
            if not self.state:
                self.layouts = None
            raise UnsupportedModuleError(
                f"method {self.name!r} supports nn.Linear layers only (its coarse level uses the "
                f"per-sample Kronecker factors of METHODS.md §6.2); layer '{conv[0]}' is an "
                "nn.Conv2d. Use 'kfac' for convolutional layers."
            )

    def _update(self, stats: Stats) -> None:
        self._check_layers(stats)
        cfg = self.config
        factors, samples_need = _NEEDS[cfg.fisher]
        statistics_step = self._due(cfg.stat_period)
        if not (statistics_step or self._due(cfg.inverse_period)):
            stats = dataclasses.replace(stats, **{_FACTOR_FIELDS[factors]: {}})
        self.kfac.update(stats)
        linear = [layer for layer, layout in stats.layouts.items() if layout.kind == "linear"]
        if statistics_step:
            samples = stats.statistic(samples_need)
            for layer in linear:
                slot = self.state[layer]
                slot["coarse_a"], slot["coarse_delta"] = samples[layer]
        if cfg.coarse == "spectral" and self._due(cfg.inverse_period):
            for layer in linear:
                slot = self.state[layer]
                slot["coarse_q_a"] = _lowest_eigenvector(slot["A"])
                slot["coarse_q_g"] = _lowest_eigenvector(slot["G"])
        if cfg.coarse == "krylov-nicolaides" and self._due(cfg.inverse_period):
            layouts = self._require_layouts()
            ones = {
                layer: _matrix_of(
                    layouts[layer], self.state[layer]["m"].new_ones(layouts[layer].dim)
                )
                for layer in linear
            }
            for layer, inverse in self._fine(ones).items():
                self.state[layer]["coarse_inverse_ones"] = inverse

    def _first_moment(self) -> dict[str, Tensor]:
        return {layer: self.state[layer]["m"] for layer in self._require_layouts()}

    # ------------------------------------------------------------------ direction
    def _vectors(self, grads: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        layouts = self._require_layouts()
        if grads is None:
            return self._first_moment()
        missing = [name for name in layouts if name not in grads]
        if missing:
            raise UnknownNameError(f"grads lack layer(s) {missing}; expected {list(layouts)}.")
        vectors = {name: grads[name] for name in layouts}
        self._check_finite(vectors, "the vector to precondition")
        return vectors

    def _samples(self) -> dict[str, KronSamples]:
        return {
            layer: KronSamples(slot["coarse_a"], slot["coarse_delta"])
            for layer, slot in self.state.items()
            if "coarse_a" in slot
        }

    def _fine(self, matrices: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``M_l⁻¹ V_l`` (KFAC's inverse) for the Linear layers' matrices ``matrices``.

        Calls the inner KFAC's ``_direction`` on these layers alone: the vectors are built
        here, from checked ones, so the public check for NaN/Inf would only repeat.
        """
        out = self.kfac._direction({layer: V.reshape(-1) for layer, V in matrices.items()})
        return {layer: out[layer].view_as(V) for layer, V in matrices.items()}

    def _setup(self, vectors: Mapping[str, Tensor]) -> _Setup:
        """``ζ₀``, the stored samples, ``∇`` and ``ζ₀`` as matrices, ``w = p(ζ₀)`` and ``R₀``.

        A Linear layer's §2 vector is the row-major flatten of ``W̄`` (module docstring), so
        its matrix is a reshape (the same as :func:`~mbf_analysis.curvature.kfac.to_matrix`).
        """
        layouts = self._require_layouts()
        zeta0 = self.kfac._direction(dict(vectors))  # vectors checked by direction()
        samples = self._samples()
        V = {layer: _matrix_of(layouts[layer], vectors[layer]) for layer in samples}
        Z0 = {layer: _matrix_of(layouts[layer], zeta0[layer]) for layer in samples}
        if not samples:
            return _Setup(zeta0, samples, V, Z0, None, {})
        w = _projections(samples, Z0)
        coarse = self.config.coarse
        if coarse in _RESIDUAL_ROWS:
            F_zeta = _back_project(samples, w)
            lam = self.config.damping
            residual = {layer: V[layer] - F_zeta[layer] - lam * Z0[layer] for layer in samples}
            first = self._fine(residual)
            if coarse == "residual":
                rows = {layer: R.unsqueeze(0) for layer, R in first.items()}
            else:
                second = self._fine(first)
                rows = {layer: torch.stack([first[layer], second[layer]]) for layer in samples}
        elif coarse == "spectral":
            rows = {
                layer: RankOneRows(
                    self.state[layer]["coarse_q_g"].unsqueeze(0),
                    self.state[layer]["coarse_q_a"].unsqueeze(0),
                )
                for layer in samples
            }
        elif coarse == "krylov-nicolaides":
            rows = {
                layer: torch.stack([torch.ones_like(M), self.state[layer]["coarse_inverse_ones"]])
                for layer, M in V.items()
            }
        else:
            rows = {
                layer: RankOneRows(M.new_ones(1, M.shape[0]), M.new_ones(1, M.shape[1]))
                for layer, M in V.items()
            }
        return _Setup(zeta0, samples, V, Z0, w, rows)

    def _direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        setup = self._setup(vectors)
        if not setup.samples:
            return setup.zeta0
        unit = {layer: _unit_rows(R) for layer, R in setup.rows.items()}
        correction, self._last = coarse_correction(
            setup.samples,
            unit,
            setup.vectors,
            setup.zeta0_matrices,
            self.config.damping,
            additive=self.config.coarse == "tselepidis",
            projections=setup.projections,
        )
        layouts = self._require_layouts()
        return {
            layer: setup.zeta0[layer] + correction[layer].reshape(-1)
            if layer in correction
            else setup.zeta0[layer]
            for layer in layouts
        }

    def _matrix(self, layer: str) -> Tensor:
        return self.kfac.matrix(layer)


def _matrix_of(layout: LayerLayout, vector: Tensor) -> Tensor:
    """A Linear layer's §2 vector ``[d]`` as ``W̄`` ``[g, a]`` (its row-major flatten)."""
    return vector.reshape(layout.param_shapes[0][0], -1)


def _lowest_eigenvector(factor: Tensor) -> Tensor:
    """A unit eigenvector of the smallest eigenvalue of a symmetric PSD ``factor`` ``[n, n]``.

    Computed in float64 (float32 ``eigh`` fails to converge on the exactly repeated zero
    eigenvalues of, e.g., the input factor of constant pixels) and returned in the input dtype.
    """
    return torch.linalg.eigh(symmetrize(factor.double()))[1][:, 0].to(factor.dtype)
