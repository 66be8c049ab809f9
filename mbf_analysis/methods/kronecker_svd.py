r"""The Kronecker-product SVD family (Koroko et al. 2022, METHODS.md §6.1): KPSVD, Deflation,
Lanczos and KFAC-corrected, for ``nn.Linear`` layers.

A Linear layer's Fisher block (for ``vec W̄`` column-stacked, ``W̄ = [W b]``) is, with the
per-sample factors of :class:`~mbf_analysis.curvature.kfac.KronSamples`,

.. math::

    F = \frac{1}{m} \sum_{n=1}^{m} (\bar a_n \bar a_n^\top) \otimes \Gamma_n, \qquad
    \Gamma_n = \sum_{c} \delta_{nc} \delta_{nc}^\top,

and the Van Loan–Pitsianis rearrangement ``Z = (1/m) Σ_n vec(ā_nā_nᵀ) vec(Γ_n)ᵀ``
(``[a², g²]``) turns Kronecker approximation into low-rank approximation:
``‖F − Σ_k A_k ⊗ G_k‖_F = ‖Z − Σ_k vec(A_k) vec(G_k)ᵀ‖_F``. With ``(σ_k, u_k, v_k)`` singular
triplets of an operator (unit ``u``, ``v`` seen as symmetric matrices):

- ``kpsvd``: ``F̂ = A ⊗ G`` from the leading triplet of ``Z``, by power iteration;
- ``deflation``: ``F̂ = A₁⊗G₁ + A₂⊗G₂``, the second pair by the same iteration on
  ``Z − σ₁ u₁ v₁ᵀ``;
- ``lanczos``: the same form from the top-2 Ritz triplets of a Golub–Kahan bidiagonalization
  of ``Z`` with ``K`` steps (``lanczos_steps``, default 2 as the paper) and full
  reorthogonalization;
- ``kfac-corrected``: ``F̂ = A⊗G + R⊗S`` with ``(A, G)`` KFAC's factors
  ``A = (1/m) Σ ā_nā_nᵀ``, ``G = (1/m) Σ Γ_n`` and ``(R, S)`` the leading pair of
  ``Z − vec(A) vec(G)ᵀ``.

Every pair is ``(A_k, G_k) = s √σ_k (mat u_k, mat v_k)`` with the sign ``s`` that makes
``tr A_k ≥ 0`` (then KPSVD's factors are PSD; the second pairs are indefinite in general). A
singular pair's sign is arbitrary (``A⊗G = (−A)⊗(−G)``), so a method fixes it before averaging,
or the averages of flipped pairs cancel (METHODS §6.3): the first pair by ``tr A₁ > 0``, a
second pair by ``⟨A₂, A₂_avg⟩ ≥ 0`` against its running average (``tr A₂ ≥ 0`` at the first
update). ``fisher`` chooses ``Γ_n``: ``"mc"`` (one label sampled from the model per input, as
the papers), ``"empirical"`` (real labels) or ``"exact"`` (the ``C`` rows of the square-root
GGN).

A power iteration starts from the averaged ``G_k`` of the previous updates (KFAC's ``G`` for a
first pair without history; ``Xᵀ(Σ_n ξ_n ā_nā_nᵀ)`` with fixed pseudo-random ``ξ`` for a second
one) and stops when its unit vector moves by at most ``tol``; a pair whose ``σ`` is below
``100 ε σ₁`` (rounding, e.g. ``Z`` of rank 1 for one sample) is zero.

**Two representations of the same iteration** (``solver``). ``"matrix"`` applies ``Z`` and
``Zᵀ`` to ``[g, g]`` and ``[a, a]`` matrices matrix-free (:func:`z_matvec`, :func:`z_rmatvec`,
``O(m (a² + r g²))`` each). ``"gram"`` (default) runs the *same* iterates on coefficient vectors:
every vector the iteration forms lies in ``span{vec(ā_nā_nᵀ)}`` (A side) or
``span{vec(Γ_n)} + span{warm starts}`` (G side), and ``Z`` is ``(1/m)`` times the identity
between the two spans, so with the Gram matrices ``K_a[n, n'] = (ā_nᵀā_{n'})²`` and
``K_g[n, n'] = ⟨Γ_n, Γ_{n'}⟩`` (:func:`sample_grams`) an iteration step costs ``O(m²)``; the
factors are formed once at the end, ``A = Āᵀ diag(α) Ā``. ``Z`` is never formed in either.

**Method** (state per Linear layer; normalization layers get ``d = m`` and matrix ``I``, as in
KFAC; a Conv2d layer is refused by name). Torch-style momentum ``m ← μ m + (1 − τ) g`` is
preconditioned. On steps ``k ≡ 0 (mod T1)`` each factor is averaged on its own,

.. math::

    A_k \leftarrow \rho_j A_k + (1 - \rho_j) A_{k,\mathrm{batch}}, \qquad
    \rho_j = \min(1 - 1/j, \beta) \ \ (j\text{-th curvature update}, \rho_1 = 0),

(``decay_warmup=False``: ``ρ_j = β`` for ``j ≥ 2``), the power iterations warm-started from the
averaged ``G_k``. On steps ``k ≡ 0 (mod T2)`` the inverse is refreshed:

- rank 1 (``kpsvd``): ``damping_mode="unit"`` ``D = (G + √λ I)⁻¹ M̄ (A + √λ I)⁻¹`` (``π = 1``,
  the KPSVD paper), ``"split"`` the same with KFAC's ``π``, ``"eigen"`` the exact
  ``(A ⊗ G + λI)⁻¹``;
- rank 2: the exact inverse of ``A₁'⊗G₁' + A₂⊗G₂`` with ``A₁' = A₁ + π√λ I``,
  ``G₁' = G₁ + π⁻¹√λ I`` (``π = 1`` for ``"unit"``) by simultaneous diagonalisation
  (:func:`~mbf_analysis.linalg.rank2_kron_inverse`); denominators ``1 + s_g s_a`` at or below
  ``denominator_floor`` are clamped and counted (:meth:`KroneckerSVD.diagnostics`).

**Applying a rank-2 inverse** (``low_rank_apply``, :func:`split_rank2_inverse`). ``K_a`` is
square and ``K_aᵀ A₁' K_a = I``, so ``K_a K_aᵀ = A₁'⁻¹`` (likewise ``G``), and with
``C = 1 ⊘ denom − 1``

.. math::

    K_g [(K_g^\top M K_a) \oslash \mathrm{denom}] K_a^\top
    = G_1'^{-1} M A_1'^{-1} + K_{g,I} [(K_{g,I}^\top M K_{a,J}) \odot C_{IJ}] K_{a,J}^\top,

``I``, ``J`` the rows and columns of ``C`` that hold a non-zero entry (above rounding:
:func:`split_rank2_inverse`). ``C_ij = 0`` wherever ``s_g,i s_a,j = 0``, and ``s_a`` has at
most ``rank(A₂)`` non-zero entries: a batch's ``A₂`` lies in
``span{ā_nā_nᵀ}``, so ``rank(A₂) ≤ m_F j`` after ``j`` curvature updates (``m_F`` Fisher
samples), and likewise for ``G₂``. A step then costs ``g a (g + a)`` (KFAC's two products) plus
``g a (|I| + |J|) + |I| |J| (g + a)`` instead of ``2 g a (g + a)``; the split form is used when
it is the cheaper one (while ``|I| + |J| < g + a``, roughly), the four-product form
(:func:`~mbf_analysis.linalg.apply_rank2_kron_inverse`, the reference) otherwise.
``K_a`` and ``K_g`` are stored with their negligible entries set to 0 (:func:`clear_negligible`:
at most ``ε`` times the largest of their column, below the rounding error of that column).
Factors with exactly zero rows and columns (the MNIST autoencoder's dead pixels and dead ReLU
units) give eigenvectors whose exact zeros come out as rounding noise down to ``1e-39``; their
products with the momentum are subnormal, and a CPU matrix product that forms subnormal
partial products ran up to 10× slower (fc7: 67 → 24 ms for the four products, the direction
changing by 1e-7 relative).

The paper's schedule is :data:`PAPER_SCHEDULE` (curvature and inverse every 100 steps,
``ρ = min(1 − 1/j, 0.95)``, momentum 0.9; the Fisher batch of ``m/4`` and the KL clip belong to
the optimizer front-end). :meth:`KroneckerSVD.matrix` is ``Σ_k A_k ⊗ G_k`` in METHODS §2 order,
the approximation itself (indefinite for the rank-2 methods in general), not its damped form.

Index conventions: ``m`` samples, ``r`` rows per sample (1, or ``C`` for the exact Fisher),
``a`` the input side (``n_in + 1``, ``n_in`` without bias), ``g`` the output side (``n_out``);
``Ā [m, a]`` the rows ``ā_nᵀ``, ``D [m, r, g]`` the rows ``δ_ncᵀ``; ``U [a, a]`` and
``V [g, g]`` symmetric matrices standing for ``vec U`` and ``vec V``;
``⟨X, Y⟩ = Σ_ij X_ij Y_ij``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import (
    GRAD,
    KRON_SAMPLES,
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    Stats,
)
from mbf_analysis.curvature.kfac import (
    EigenInverse,
    KronFactors,
    KronSamples,
    SplitInverse,
    apply_eigen_inverse,
    apply_split_inverse,
    eigen_inverse,
    from_matrix,
    kron_layout_matrix,
    split_inverse,
    to_matrix,
)
from mbf_analysis.errors import ConfigError, UnknownNameError, UnsupportedModuleError
from mbf_analysis.fisher_kinds import check_fisher_kind
from mbf_analysis.linalg import (
    Rank2KronInverse,
    apply_rank2_kron_inverse,
    damped_inverse,
    rank2_kron_inverse,
    split_damping_pi,
)
from mbf_analysis.methods.base import (
    Method,
    MethodConfig,
    check_choice,
    check_period,
    check_range,
    momentum_,
)

__all__ = [
    "APPROXIMATIONS",
    "PAPER_SCHEDULE",
    "RANK",
    "KroneckerApproximation",
    "KroneckerSVD",
    "KroneckerSVDConfig",
    "SplitRank2Inverse",
    "apply_split_rank2_inverse",
    "kfac_factors",
    "kronecker_approximation",
    "rearranged_fisher",
    "sample_grams",
    "default_tol",
    "clear_negligible",
    "split_rank2_inverse",
    "z_matvec",
    "z_rmatvec",
]

logger = logging.getLogger(__name__)

Approximation = Literal["kpsvd", "deflation", "lanczos", "kfac-corrected"]
APPROXIMATIONS: tuple[str, ...] = ("kpsvd", "deflation", "lanczos", "kfac-corrected")
"""The approximations, which are also their registry names."""
RANK: dict[str, int] = {"kpsvd": 1, "deflation": 2, "lanczos": 2, "kfac-corrected": 2}
"""Number of Kronecker products in ``F̂``."""

PAPER_SCHEDULE: dict[str, Any] = {
    "stat_period": 100,
    "inverse_period": 100,
    "decay": 0.95,
    "decay_warmup": True,
    "momentum": 0.9,
}
"""The settings of Koroko et al. (METHODS §6.1), for a training run."""

_NEEDS = {"mc": KRON_SAMPLES_SAMPLED, "empirical": KRON_SAMPLES, "exact": KRON_SAMPLES_EXACT}
_PAIR2_SEED = 0
"""Seed of the fixed start of a second pair without a warm start."""
_CHUNK_BYTES = 2**28
"""Working memory of one chunk of the exact-Fisher Gram matrix."""


# ----------------------------------------------------------------------------- Z and its Grams
def z_matvec(samples: KronSamples, V: Tensor) -> Tensor:
    """``Z vec(V) = (1/m) Σ_n ⟨Γ_n, V⟩ vec(ā_nā_nᵀ)`` as an ``[a, a]`` matrix.

    ``⟨Γ_n, V⟩ = Σ_c δ_ncᵀ V δ_nc``; costs ``O(m r g² + m a²)``.

    Args:
        samples: ``ā [m, a]``, ``δ [m, (r,) g]``.
        V: ``[g, g]``.

    Returns:
        ``[a, a]``.
    """
    a, rows = samples.a, samples.rows
    weights = ((rows @ V) * rows).sum((1, 2))
    return a.T @ (weights.unsqueeze(1) * a) / a.shape[0]


def z_rmatvec(samples: KronSamples, U: Tensor) -> Tensor:
    """``Zᵀ vec(U) = (1/m) Σ_n (ā_nᵀ U ā_n) vec(Γ_n)`` as a ``[g, g]`` matrix.

    Args:
        samples: ``ā [m, a]``, ``δ [m, (r,) g]``.
        U: ``[a, a]``.

    Returns:
        ``[g, g]``.
    """
    a, rows = samples.a, samples.rows
    weights = ((a @ U) * a).sum(1)
    flat = rows.flatten(0, 1)
    scaled = flat * weights.repeat_interleave(rows.shape[1]).unsqueeze(1)
    return flat.T @ scaled / a.shape[0]


def rearranged_fisher(samples: KronSamples) -> Tensor:
    """The dense ``Z = (1/m) Σ_n vec(ā_nā_nᵀ) vec(Γ_n)ᵀ``, ``[a², g²]`` (small layers, tests).

    ``vec`` stacks columns; both matrices are symmetric, so it is also the row-major flatten.
    """
    a, rows = samples.a, samples.rows
    outer_a = (a.unsqueeze(2) * a.unsqueeze(1)).flatten(1)
    gammas = torch.einsum("nci,ncj->nij", rows, rows).flatten(1)
    return outer_a.T @ gammas / a.shape[0]


def kfac_factors(samples: KronSamples) -> KronFactors:
    """KFAC's ``A = (1/m) Σ_n ā_nā_nᵀ`` and ``G = (1/m) Σ_n Γ_n`` from the per-sample factors."""
    a, rows = samples.a, samples.rows
    flat = rows.flatten(0, 1)
    return KronFactors(a.T @ a / a.shape[0], flat.T @ flat / a.shape[0])


def sample_grams(samples: KronSamples) -> tuple[Tensor, Tensor]:
    """The Gram matrices ``K_a[n, n'] = (ā_nᵀā_{n'})²`` and ``K_g[n, n'] = ⟨Γ_n, Γ_{n'}⟩``.

    ``⟨Γ_n, Γ_{n'}⟩ = ‖D_n D_{n'}ᵀ‖_F²`` (``D_n [r, g]``), computed in chunks of samples for
    ``r > 1``. Then ``‖F‖_F² = ‖Z‖_F² = Σ_{n,n'} K_a K_g / m²``.

    Returns:
        ``(K_a [m, m], K_g [m, m])``.
    """
    a, rows = samples.a, samples.rows
    k_a = (a @ a.T).square()
    if rows.shape[1] == 1:
        flat = rows[:, 0]
        return k_a, (flat @ flat.T).square()
    m, r, _ = rows.shape
    flat = rows.flatten(0, 1)
    chunk = max(1, _CHUNK_BYTES // (m * r * r * rows.element_size()))
    parts = []
    for start in range(0, m, chunk):
        block = rows[start : start + chunk].flatten(0, 1) @ flat.T
        parts.append(block.reshape(-1, r, m, r).square().sum((1, 3)))
    return k_a, torch.cat(parts)


def _gamma_duals(samples: KronSamples, V: Tensor) -> Tensor:
    """``⟨Γ_n, V⟩`` for every sample, ``[m]``."""
    rows = samples.rows
    return ((rows @ V) * rows).sum((1, 2))


# ----------------------------------------------------------------------------- the two spaces
class _Space(Protocol):
    """An operator ``X`` between an A-side and a G-side space, in some representation."""

    def apply(self, v: Tensor) -> Tensor:
        """``X v`` (G side → A side)."""

    def apply_t(self, u: Tensor) -> Tensor:
        """``Xᵀ u`` (A side → G side)."""

    def dot_a(self, x: Tensor, y: Tensor) -> Tensor:
        """``⟨x, y⟩`` on the A side (a 0-d tensor)."""

    def dot_g(self, x: Tensor, y: Tensor) -> Tensor:
        """``⟨x, y⟩`` on the G side."""


class _MatrixSpace:
    """``Z`` on ``[a, a]`` / ``[g, g]`` matrices, matrix-free (the readable reference)."""

    def __init__(self, samples: KronSamples, extra: list[Tensor]) -> None:
        self.samples = samples
        self.extra = extra

    def apply(self, v: Tensor) -> Tensor:
        return z_matvec(self.samples, v)

    def apply_t(self, u: Tensor) -> Tensor:
        return z_rmatvec(self.samples, u)

    def dot_a(self, x: Tensor, y: Tensor) -> Tensor:
        return (x * y).sum()

    dot_g = dot_a

    def g_extra(self, index: int) -> Tensor:
        return self.extra[index]

    def a_combination(self, weights: Tensor) -> Tensor:
        """``Σ_n w_n ā_nā_nᵀ``."""
        a = self.samples.a
        return a.T @ (weights.unsqueeze(1) * a)

    def kfac(self) -> tuple[Tensor, Tensor]:
        return tuple(kfac_factors(self.samples))

    def a_matrix(self, u: Tensor) -> Tensor:
        return u

    def g_matrix(self, v: Tensor) -> Tensor:
        return v


class _GramSpace:
    """``Z`` on coefficient vectors: A side ``Σ_n α_n vec(ā_nā_nᵀ)``, G side
    ``Σ_n β_n vec(Γ_n) + Σ_j β_{m+j} vec(V_j)`` with the warm starts ``V_j`` (module docstring).

    ``Z = B_a C B_gᵀ`` with the bases ``B_a``, ``B_g`` and ``C = [I/m | 0]`` (``[m, m + q]``), so
    ``Z (B_g β) = B_a (C K̃_g β)`` and ``Zᵀ (B_a α) = B_g (Cᵀ K_a α)``. The Gram matrices and
    the iteration are float64 whatever the samples' dtype (``O(m² (a + r² g))`` once, then
    ``O(m²)`` per step), so the iteration has no float32 noise floor; the factors are formed
    in the samples' dtype.
    """

    def __init__(self, samples: KronSamples, extra: list[Tensor]) -> None:
        self.samples = samples
        self.extra = extra
        k_a, k_g = sample_grams(KronSamples(samples.a.double(), samples.delta.double()))
        m, q = k_a.shape[0], len(extra)
        if q:
            duals = torch.stack([_gamma_duals(samples, v) for v in extra], dim=1).double()
            cross = torch.stack([torch.stack([(x * y).sum() for y in extra]) for x in extra])
            cross = cross.double()
            k_g = torch.cat([torch.cat([k_g, duals], 1), torch.cat([duals.T, cross], 1)], 0)
        self.m, self.q = m, q
        self.k_a, self.k_g = k_a, k_g

    def apply(self, v: Tensor) -> Tensor:
        return (self.k_g @ v)[: self.m] / self.m

    def apply_t(self, u: Tensor) -> Tensor:
        return torch.cat([self.k_a @ u / self.m, u.new_zeros(self.q)])

    def dot_a(self, x: Tensor, y: Tensor) -> Tensor:
        return x @ (self.k_a @ y)

    def dot_g(self, x: Tensor, y: Tensor) -> Tensor:
        return x @ (self.k_g @ y)

    def g_extra(self, index: int) -> Tensor:
        out = self.k_g.new_zeros(self.m + self.q)
        out[self.m + index] = 1.0
        return out

    def a_combination(self, weights: Tensor) -> Tensor:
        return weights.to(self.k_a)

    def kfac(self) -> tuple[Tensor, Tensor]:
        ones = self.k_a.new_full((self.m,), 1.0 / self.m)
        return ones, torch.cat([ones, ones.new_zeros(self.q)])

    def a_matrix(self, u: Tensor) -> Tensor:
        a = self.samples.a
        return a.T @ (u.to(a.dtype).unsqueeze(1) * a)

    def g_matrix(self, v: Tensor) -> Tensor:
        rows = self.samples.rows
        flat = rows.flatten(0, 1)
        v = v.to(rows.dtype)
        weights = v[: self.m].repeat_interleave(rows.shape[1]).unsqueeze(1)
        out = flat.T @ (weights * flat)
        for j, extra in enumerate(self.extra):
            out = out + v[self.m + j] * extra
        return out


class _Deflated:
    """``X − σ u vᵀ`` for an operator ``X`` (a second pair, or KFAC-corrected's residual)."""

    def __init__(self, space: _Space, sigma: Tensor | float, u: Tensor, v: Tensor) -> None:
        self.space, self.sigma, self.u, self.v = space, sigma, u, v

    def apply(self, v: Tensor) -> Tensor:
        return self.space.apply(v) - self.sigma * self.space.dot_g(self.v, v) * self.u

    def apply_t(self, u: Tensor) -> Tensor:
        return self.space.apply_t(u) - self.sigma * self.space.dot_a(self.u, u) * self.v

    def dot_a(self, x: Tensor, y: Tensor) -> Tensor:
        return self.space.dot_a(x, y)

    def dot_g(self, x: Tensor, y: Tensor) -> Tensor:
        return self.space.dot_g(x, y)


# ----------------------------------------------------------------------------- iterations
class _Triplet(NamedTuple):
    sigma: Tensor
    u: Tensor
    v: Tensor


def _norm(dot: Callable[[Tensor, Tensor], Tensor], x: Tensor) -> Tensor:
    return dot(x, x).clamp_min(0).sqrt()


def default_tol(dtype: torch.dtype) -> float:
    """The default tolerance of the power iterations: ``max(1e-10, 100 ε)`` of ``dtype``."""
    return max(1e-10, 100 * torch.finfo(dtype).eps)


def _power(
    op: _Space, start: Tensor, *, tol: float, max_iter: int, negligible: float
) -> tuple[_Triplet | None, int, bool]:
    """Leading singular triplet of ``op`` by alternating power iteration from a G-side start.

    ``u = X v / ‖X v‖``, ``v' = Xᵀ u / σ`` with ``σ = ‖Xᵀ u‖``, until the unit vector moves
    by ``‖v' − v‖ ≤ tol`` (a relative tolerance: ``σ`` is then accurate to about ``tol²``);
    ``⟨u, X v'⟩ = σ`` exactly. ``None`` when ``σ ≤ negligible`` (the operator vanishes up to
    rounding).

    Returns:
        ``(triplet or None, iterations, converged)``.
    """
    size = _norm(op.dot_g, start)
    if float(size) == 0.0:
        return None, 0, True
    v = start / size
    for iteration in range(1, max_iter + 1):
        u = op.apply(v)
        alpha = float(_norm(op.dot_a, u))
        if alpha <= negligible:
            return None, iteration, True
        u = u / alpha
        w = op.apply_t(u)
        sigma = _norm(op.dot_g, w)
        if float(sigma) <= negligible:
            return None, iteration, True
        step = w / sigma - v
        v = v + step
        if float(_norm(op.dot_g, step)) <= tol:
            return _Triplet(sigma, u, v), iteration, True
    return _Triplet(sigma, u, v), max_iter, False


def _orthogonalize(
    dot: Callable[[Tensor, Tensor], Tensor], x: Tensor, basis: list[Tensor]
) -> Tensor:
    """``x`` minus its projection on an orthonormal ``basis`` (classical Gram–Schmidt, twice)."""
    for _ in range(2):
        for b in basis:
            x = x - dot(b, x) * b
    return x


def _lanczos(op: _Space, start: Tensor, *, steps: int, count: int) -> list[_Triplet]:
    """Top ``count`` Ritz triplets of a Golub–Kahan bidiagonalization with ``steps`` steps.

    ``Z V_k = U_k B_k`` with ``B_k`` upper bidiagonal (``α_j`` on the diagonal, ``β_j`` above),
    both bases fully reorthogonalized; ``B_k = P Σ Qᵀ`` gives the Ritz triplets
    ``(Σ_jj, U_k P_j, V_k Q_j)``, for which ``⟨u_i, Z v_j⟩ = Σ_ij``. The recursion stops early
    when the Krylov space is invariant (``α`` or ``β`` below ``√ε α₁``).
    """
    size = _norm(op.dot_g, start)
    if float(size) == 0.0:
        return []
    us: list[Tensor] = []
    vs = [start / size]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    breakdown = 0.0
    for j in range(steps):
        u = op.apply(vs[j])
        if j:
            u = u - betas[j - 1] * us[j - 1]
        u = _orthogonalize(op.dot_a, u, us)
        alpha = _norm(op.dot_a, u)
        if float(alpha) <= breakdown or float(alpha) == 0.0:
            break
        if not j:
            breakdown = float(alpha) * math.sqrt(torch.finfo(alpha.dtype).eps)
        us.append(u / alpha)
        alphas.append(alpha)
        if j == steps - 1:
            break
        w = _orthogonalize(op.dot_g, op.apply_t(us[j]) - alpha * vs[j], vs)
        beta = _norm(op.dot_g, w)
        if float(beta) <= breakdown:
            break
        vs.append(w / beta)
        betas.append(beta)
    k = len(alphas)
    if not k:
        return []
    bidiagonal = torch.diag(torch.stack(alphas))
    if k > 1:
        bidiagonal = bidiagonal + torch.diag(torch.stack(betas[: k - 1]), 1)
    left, values, right_t = torch.linalg.svd(bidiagonal)
    out = []
    for i in range(min(count, k)):
        u = sum(left[j, i] * us[j] for j in range(k))
        v = sum(right_t[i, j] * vs[j] for j in range(k))
        out.append(_Triplet(values[i], u, v))
    return out


# ----------------------------------------------------------------------------- approximation
class KroneckerApproximation(NamedTuple):
    """``F̂ = Σ_k A_k ⊗ G_k`` of one batch.

    Attributes:
        factors: The pairs ``(A_k [a, a], G_k [g, g])`` (one or two; a pair that vanishes up to
            rounding is zero).
        sigma: Their singular values, ``[rank]``: ``σ_k`` of ``Z``; for KFAC-corrected
            ``‖A‖_F ‖G‖_F`` and the leading ``σ`` of ``Z − vec(A) vec(G)ᵀ``; ``0`` for a
            vanishing pair.
        iterations: Power iterations (all pairs) or Lanczos steps.
        converged: Whether every power iteration met the tolerance (always ``True`` for
            Lanczos, which runs its ``K`` steps).
    """

    factors: tuple[KronFactors, ...]
    sigma: Tensor
    iterations: int
    converged: bool


def kronecker_approximation(
    samples: KronSamples,
    approximation: Approximation,
    *,
    warm: tuple[Tensor | None, Tensor | None] = (None, None),
    solver: Literal["gram", "matrix"] = "gram",
    tol: float | None = None,
    max_iter: int = 500,
    lanczos_steps: int = 2,
) -> KroneckerApproximation:
    """The Kronecker approximation of one batch's Fisher block (module docstring).

    Args:
        samples: ``ā [m, a]``, ``δ [m, (r,) g]``.
        approximation: One of :data:`APPROXIMATIONS`.
        warm: G-side starts ``(G₁, G₂)`` of the first and second pair (the averaged factors of
            the previous updates; only ``G₂`` of a rank-2 method is used for its second pair,
            KFAC-corrected's residual pair included); ``None``: KFAC's ``G`` for the first, and
            ``Xᵀ(Σ_n ξ_n ā_nā_nᵀ)`` with fixed pseudo-random ``ξ`` (seed 0) for a second pair
            (``X`` the deflated operator).
        solver: ``"gram"`` (coefficient vectors) or ``"matrix"`` (the reference); the same
            iterates.
        tol: Power iterations stop when the unit G-side vector moves by at most ``tol``
            (default :func:`default_tol` of the samples' dtype).
        max_iter: Most power iterations per pair.
        lanczos_steps: ``K ≥ 2``, the Golub–Kahan steps of ``"lanczos"``.

    Returns:
        The :class:`KroneckerApproximation`.
    """
    tol = default_tol(samples.a.dtype) if tol is None else tol
    extra = [w for w in warm if w is not None]
    space: Any = (_GramSpace if solver == "gram" else _MatrixSpace)(samples, extra)
    slots = iter(range(len(extra)))
    first, second = (None if w is None else space.g_extra(next(slots)) for w in warm)
    if first is None:
        first = space.kfac()[1]
    eps = 100 * torch.finfo(torch.float64 if solver == "gram" else samples.a.dtype).eps
    zero = samples.a.new_zeros(())

    def pair(triplet: _Triplet | None) -> tuple[KronFactors, Tensor]:
        if triplet is None:
            a, g = samples.a.shape[1], samples.rows.shape[2]
            return KronFactors(samples.a.new_zeros(a, a), samples.a.new_zeros(g, g)), zero
        return _factors(space, triplet), triplet.sigma.to(zero.dtype)

    def second_start(op: _Space) -> Tensor:
        if second is not None:
            return second
        gen = torch.Generator().manual_seed(_PAIR2_SEED)
        xi = torch.randn(samples.a.shape[0], generator=gen, dtype=torch.float64)
        return op.apply_t(space.a_combination(xi.to(samples.a)))

    if approximation == "kfac-corrected":
        a_vec, g_vec = space.kfac()
        norm = _norm(space.dot_a, a_vec) * _norm(space.dot_g, g_vec)
        residual = _Deflated(space, 1.0, a_vec, g_vec)
        found, iterations, converged = _power(
            residual,
            second_start(residual),
            tol=tol,
            max_iter=max_iter,
            negligible=eps * float(norm),
        )
        kfac = KronFactors(space.a_matrix(a_vec), space.g_matrix(g_vec))
        correction, sigma = pair(found)
        return KroneckerApproximation(
            (kfac, correction), torch.stack([norm.to(sigma.dtype), sigma]), iterations, converged
        )
    if approximation == "lanczos":
        triplets = _lanczos(space, first, steps=lanczos_steps, count=2)
        triplets += [None] * (2 - len(triplets))
        leading = triplets[0]
        if triplets[1] is not None and leading is not None:
            if float(triplets[1].sigma) <= eps * float(leading.sigma):
                triplets[1] = None
        pairs = [pair(t) for t in triplets]
        return KroneckerApproximation(
            tuple(p[0] for p in pairs), torch.stack([p[1] for p in pairs]), lanczos_steps, True
        )
    leading, iterations, converged = _power(
        space, first, tol=tol, max_iter=max_iter, negligible=0.0
    )
    pairs = [pair(leading)]
    if approximation == "deflation":
        found = None
        if leading is not None:
            deflated = _Deflated(space, leading.sigma, leading.u, leading.v)
            found, more, ok = _power(
                deflated,
                second_start(deflated),
                tol=tol,
                max_iter=max_iter,
                negligible=eps * float(leading.sigma),
            )
            iterations, converged = iterations + more, converged and ok
        pairs.append(pair(found))
    return KroneckerApproximation(
        tuple(p[0] for p in pairs), torch.stack([p[1] for p in pairs]), iterations, converged
    )


def _factors(space: Any, triplet: _Triplet) -> KronFactors:
    """``s √σ (mat u, mat v)`` with unit ``u``, ``v`` and ``s`` the sign making ``tr A ≥ 0``."""
    u, v = space.a_matrix(triplet.u), space.g_matrix(triplet.v)
    u = u / u.norm()
    v = v / v.norm()
    root = triplet.sigma.sqrt().to(u.dtype)
    if float(u.trace()) < 0:
        root = -root
    return KronFactors(root * u, root * v)


# ----------------------------------------------------------------------------- rank-2 inverse
def clear_negligible(k: Tensor) -> Tensor:
    """``k`` with the entries ``|k_ij| ≤ ε max_i |k_ij|`` (``ε`` of the dtype, the largest entry
    of column ``j``) set to 0: below the rounding error of the column (module docstring).

    Args:
        k: ``[*, n, n]``, e.g. ``K_a`` of :func:`~mbf_analysis.linalg.rank2_kron_inverse`.

    Returns:
        ``[*, n, n]``.
    """
    size = k.abs()
    return k.masked_fill(size <= torch.finfo(k.dtype).eps * size.amax(-2, keepdim=True), 0.0)


class SplitRank2Inverse(NamedTuple):
    """A rank-2 inverse as KFAC's plus a low-rank correction (:func:`split_rank2_inverse`).

    Attributes:
        p_a: ``A₁'⁻¹ = K_a K_aᵀ``, ``[a, a]``.
        p_g: ``G₁'⁻¹ = K_g K_gᵀ``, ``[g, g]``.
        r_a: ``K_{a,J}``, the columns ``J`` of ``K_a``, ``[a, q]``.
        r_g: ``K_{g,I}``, ``[g, p]``.
        corr: ``C_IJ = (1 ⊘ denom − 1)_IJ``, ``[p, q]``.
    """

    p_a: Tensor
    p_g: Tensor
    r_a: Tensor
    r_g: Tensor
    corr: Tensor


def split_rank2_inverse(inverse: Rank2KronInverse) -> SplitRank2Inverse | None:
    """The split form of a rank-2 inverse (module docstring), or ``None`` when the
    four-product form costs less.

    ``I``, ``J``: the rows and columns of ``C = 1 ⊘ denom − 1`` with an entry above
    ``τ = (g + a) ε max|C|`` in magnitude (``ε`` of the dtype). A dropped entry is within the
    rounding-error bound of the four-product form's correction term (its products sum ``g`` and
    ``a`` terms), and the ``s`` that vanish in exact arithmetic come out of the
    eigendecomposition at a few ulps of the largest.

    Args:
        inverse: From :func:`~mbf_analysis.linalg.rank2_kron_inverse` (one layer: ``K_a
            [a, a]``, ``K_g [g, g]``, ``denom [g, a]``).

    Returns:
        The :class:`SplitRank2Inverse` if ``g a (p + q) + p q (g + a) < g a (g + a)``
        (``p = |I|``, ``q = |J|``: then it costs less than the four products); else ``None``.
    """
    k_a, k_g, denom, _ = inverse
    g, a = denom.shape
    corr = denom.reciprocal() - 1.0
    size = corr.abs()
    kept = size > (g + a) * torch.finfo(corr.dtype).eps * size.max()
    rows, cols = kept.any(1).nonzero().squeeze(1), kept.any(0).nonzero().squeeze(1)
    p, q = len(rows), len(cols)
    if g * a * (p + q) + p * q * (g + a) >= g * a * (g + a):
        return None
    return SplitRank2Inverse(
        k_a @ k_a.T, k_g @ k_g.T, k_a[:, cols], k_g[:, rows], corr[rows][:, cols]
    )


def apply_split_rank2_inverse(inverse: SplitRank2Inverse, V: Tensor) -> Tensor:
    """``X = G₁'⁻¹ V A₁'⁻¹ + K_{g,I} [(K_{g,I}ᵀ V K_{a,J}) ⊙ C_IJ] K_{a,J}ᵀ``.

    Equals :func:`~mbf_analysis.linalg.apply_rank2_kron_inverse` of the inverse it was split
    from, up to rounding (module docstring).

    Args:
        inverse: From :func:`split_rank2_inverse`.
        V: ``[g, a]``.

    Returns:
        ``X``, ``[g, a]``.
    """
    p_a, p_g, r_a, r_g, corr = inverse
    return p_g @ V @ p_a + r_g @ ((r_g.T @ V @ r_a) * corr) @ r_a.T


# ----------------------------------------------------------------------------- method
@dataclass(kw_only=True)
class KroneckerSVDConfig(MethodConfig):
    """Configuration of :class:`KroneckerSVD`.

    Attributes:
        damping: ``λ > 0``.
        damping_mode: ``"unit"`` (``π = 1``, the papers), ``"split"`` (KFAC's ``π`` from the
            traces of ``A₁``, ``G₁``) or, for ``kpsvd`` only, ``"eigen"`` (exact
            ``(A⊗G + λI)⁻¹``).
        fisher: ``"mc"`` (one sampled label per input), ``"empirical"`` or ``"exact"``.
        momentum: ``μ ∈ [0, 1)`` of the torch-style momentum that is preconditioned.
        dampening: ``τ ∈ [0, 1]``.
        decay: ``β ∈ [0, 1)``, the cap of the per-factor EMA ``ρ_j = min(1 − 1/j, β)``.
        decay_warmup: ``True``: ``ρ_j = min(1 − 1/j, β)``; ``False``: ``ρ_j = β`` for
            ``j ≥ 2``. ``ρ_1 = 0`` either way.
        stat_period: ``T1 ≥ 1``, steps between curvature updates (paper: 100).
        inverse_period: ``T2 ≥ 1``, steps between inverse refreshes (paper: 100).
        tol: Power iterations stop when the unit vector moves by at most ``tol``, in
            ``(0, 1)``; ``None``: ``max(1e-10, 100 ε)`` of the statistics' dtype.
        max_iter: Most power iterations per pair.
        lanczos_steps: ``K ≥ 2``, Golub–Kahan steps (``lanczos`` only; paper: 2).
        denominator_floor: Floor of the rank-2 denominators ``1 + s_g s_a``, in ``(0, 1]``.
        low_rank_apply: Rank 2: apply the inverse as KFAC's plus the low-rank correction when
            that is cheaper (:func:`split_rank2_inverse`; the same up to rounding); ``False``:
            always the four-product form.
        solver: ``"gram"`` (fast, default) or ``"matrix"`` (the reference); the same iterates.
        approximation: ``"kpsvd"``, ``"deflation"``, ``"lanczos"`` or ``"kfac-corrected"``;
            set by the registry name.
    """

    damping: float = 0.003
    damping_mode: Literal["unit", "split", "eigen"] = "unit"
    fisher: Literal["mc", "empirical", "exact"] = "mc"
    momentum: float = 0.9
    dampening: float = 0.0
    decay: float = 0.95
    decay_warmup: bool = True
    stat_period: int = 1
    inverse_period: int = 1
    tol: float | None = None
    max_iter: int = 500
    lanczos_steps: int = 2
    denominator_floor: float = 1e-2
    low_rank_apply: bool = True
    solver: Literal["gram", "matrix"] = "gram"
    approximation: Approximation = "kpsvd"

    ONE_SHOT: ClassVar[dict] = {
        "momentum": 0.0,
        "decay": 0.0,
        "stat_period": 1,
        "inverse_period": 1,
    }

    def __post_init__(self) -> None:
        check_range(self, "damping", low=0.0, low_open=True)
        check_choice(self, "approximation", APPROXIMATIONS)
        modes = ("unit", "split", "eigen") if RANK[self.approximation] == 1 else ("unit", "split")
        check_choice(self, "damping_mode", modes)
        check_fisher_kind(self.fisher, f"{type(self).__name__}.fisher")
        check_range(self, "momentum", low=0.0, high=1.0, high_open=True)
        check_range(self, "dampening", low=0.0, high=1.0)
        check_range(self, "decay", low=0.0, high=1.0, high_open=True)
        if not isinstance(self.decay_warmup, bool):
            raise ConfigError(
                f"KroneckerSVDConfig.decay_warmup must be a bool, got {self.decay_warmup!r}."
            )
        check_period(self, "stat_period")
        check_period(self, "inverse_period")
        if self.tol is not None:
            check_range(self, "tol", low=0.0, high=1.0, low_open=True, high_open=True)
        check_period(self, "max_iter")
        check_period(self, "lanczos_steps")
        if self.lanczos_steps < 2:
            raise ConfigError(
                "KroneckerSVDConfig.lanczos_steps must be at least 2 (two Ritz pairs), got "
                f"{self.lanczos_steps!r}."
            )
        check_range(self, "denominator_floor", low=0.0, high=1.0, low_open=True)
        if not isinstance(self.low_rank_apply, bool):
            raise ConfigError(
                f"KroneckerSVDConfig.low_rank_apply must be a bool, got {self.low_rank_apply!r}."
            )
        check_choice(self, "solver", ("gram", "matrix"))


class KroneckerSVD(Method):
    """KPSVD, Deflation, Lanczos and KFAC-corrected (module docstring).

    State per Linear layer: ``"m"``; ``"A1"``, ``"G1"`` (and ``"A2"``, ``"G2"`` for rank 2), the
    averaged factors; the cached inverse (``"p_a"``, ``"p_g"`` for ``"unit"``/``"split"``
    rank 1; ``"q_a"``, ``"w_a"``, ``"q_g"``, ``"w_g"`` for ``"eigen"``; ``"k_a"``, ``"k_g"``,
    ``"denom"``, ``"clamped"`` for rank 2, and ``"p_a"``, ``"p_g"``, ``"r_a"``, ``"r_g"``,
    ``"corr"`` where its split form is used); and the last batch's ``"sigma"``, ``"iterations"``
    and ``"converged"``. Other layers (normalization): ``"m"`` only.
    """

    config: KroneckerSVDConfig

    def __init__(self, config: KroneckerSVDConfig | None = None, name: str = "kpsvd") -> None:
        super().__init__(config or KroneckerSVDConfig(), name)
        self._warned = False

    @property
    def rank(self) -> int:
        """Number of Kronecker products in ``F̂``."""
        return RANK[self.config.approximation]

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({GRAD, _NEEDS[self.config.fisher]})

    def kronecker_factors(self, layer: str) -> list[KronFactors]:
        """The averaged pairs ``(A_k, G_k)`` of a Linear layer: ``F̂ = Σ_k A_k ⊗ G_k``.

        Raises:
            KeyError: For a layer without Kronecker factors.
        """
        slot = self.state.get(layer, {})
        if "A1" not in slot:
            raise UnknownNameError(
                f"layer {layer!r} has no Kronecker factors in method {self.name!r}."
            )
        return [KronFactors(slot[f"A{k}"], slot[f"G{k}"]) for k in range(1, self.rank + 1)]

    def diagnostics(self) -> dict[str, dict[str, Any]]:
        """Per Linear layer: the last curvature and inverse updates.

        Returns:
            Layer → ``{"clamped": int, "denominators": int, "sigma": tuple[float, ...],
            "iterations": int, "converged": bool}``: how many of the ``g·a`` denominators
            ``1 + s_g s_a`` of the rank-2 inverse were at or below ``denominator_floor`` and
            clamped (0 of 0 for rank 1), the last batch's singular values, and its power
            iterations (Lanczos: steps) and whether they all met the tolerance.
        """
        out = {}
        for layer, slot in self.state.items():
            if "A1" not in slot:
                continue
            out[layer] = {
                "clamped": int(slot["clamped"]) if "clamped" in slot else 0,
                "denominators": int(slot["denom"].numel()) if "denom" in slot else 0,
                "sigma": tuple(float(s) for s in slot["sigma"]),
                "iterations": int(slot["iterations"]),
                "converged": bool(slot["converged"]),
            }
        return out

    def _check_layers(self, stats: Stats) -> None:
        conv = [layer for layer, layout in stats.layouts.items() if layout.kind == "conv2d"]
        if conv:
            if not self.state:
                self.layouts = None
            raise UnsupportedModuleError(
                f"method {self.name!r} supports nn.Linear layers only (the Kronecker-SVD family "
                f"of METHODS.md §6.1 is defined for MLPs); layer '{conv[0]}' is an nn.Conv2d. "
                "Use 'kfac' for convolutional layers."
            )
        if not self._warned:
            other = [layer for layer, layout in stats.layouts.items() if layout.kind != "linear"]
            if other:
                logger.info(
                    "%s: %d layer(s) without Kronecker factors (%s, ...): direction d = m",
                    self.name,
                    len(other),
                    other[0],
                )
            self._warned = True

    def _rho(self) -> float:
        """``ρ_j`` of this curvature update (module docstring)."""
        cfg = self.config
        count = self.step // cfg.stat_period + 1
        if count == 1:
            return 0.0
        return min(1.0 - 1.0 / count, cfg.decay) if cfg.decay_warmup else cfg.decay

    def _update(self, stats: Stats) -> None:
        self._check_layers(stats)
        cfg = self.config
        for layer, g in stats.grad.items():
            slot = self.state.setdefault(layer, {})
            slot["m"] = momentum_(slot.get("m"), g, cfg.momentum, cfg.dampening)
        linear = [layer for layer, layout in stats.layouts.items() if layout.kind == "linear"]
        if self._due(cfg.stat_period):
            samples = stats.statistic(_NEEDS[cfg.fisher])
            rho = self._rho()
            for layer in linear:
                self._curvature(self.state[layer], samples[layer], rho)
        if self._due(cfg.inverse_period):
            for layer in linear:
                self._inverse(self.state[layer])

    def _curvature(self, slot: dict[str, Tensor], samples: KronSamples, rho: float) -> None:
        cfg = self.config
        warm = (slot.get("G1"), slot.get("G2") if self.rank == 2 else None)
        batch = kronecker_approximation(
            samples,
            cfg.approximation,
            warm=warm,
            solver=cfg.solver,
            tol=cfg.tol,
            max_iter=cfg.max_iter,
            lanczos_steps=cfg.lanczos_steps,
        )
        for k, (a, g) in enumerate(batch.factors, start=1):
            if k > 1 and f"A{k}" in slot and float((a * slot[f"A{k}"]).sum()) < 0:
                a, g = -a, -g
            for key, value in ((f"A{k}", a), (f"G{k}", g)):
                if key in slot and rho > 0:
                    slot[key].mul_(rho).add_(value, alpha=1 - rho)
                else:
                    slot[key] = value.clone()
        slot["sigma"] = batch.sigma
        slot["iterations"] = torch.tensor(batch.iterations)
        slot["converged"] = torch.tensor(batch.converged)

    def _inverse(self, slot: dict[str, Tensor]) -> None:
        cfg = self.config
        a1, g1 = slot["A1"], slot["G1"]
        if self.rank == 2:
            pi = float(split_damping_pi(a1, g1)) if cfg.damping_mode == "split" else 1.0
            inverse = self._rank2_inverse(a1, g1, slot["A2"], slot["G2"], pi)
            slot.update(inverse._asdict())
            split = split_rank2_inverse(inverse) if cfg.low_rank_apply else None
            for key in SplitRank2Inverse._fields:
                slot.pop(key, None)
            if split is not None:
                slot.update(split._asdict())
        elif cfg.damping_mode == "eigen":
            slot.update(eigen_inverse(a1, g1)._asdict())
        elif cfg.damping_mode == "split":
            slot.update(split_inverse(a1, g1, cfg.damping)._asdict())
        else:
            root = math.sqrt(cfg.damping)
            slot.update(p_a=damped_inverse(a1, root), p_g=damped_inverse(g1, root))

    def _rank2_inverse(
        self, a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, pi: float
    ) -> Rank2KronInverse:
        """:func:`~mbf_analysis.linalg.rank2_kron_inverse` with the negligible entries of
        ``K_a``, ``K_g`` set to 0 (:func:`clear_negligible`)."""
        cfg = self.config
        inverse = rank2_kron_inverse(
            a1, g1, a2, g2, cfg.damping, pi=pi, floor=cfg.denominator_floor
        )
        return inverse._replace(
            k_a=clear_negligible(inverse.k_a), k_g=clear_negligible(inverse.k_g)
        )

    def _first_moment(self) -> dict[str, Tensor]:
        return {layer: self.state[layer]["m"] for layer in self._require_layouts()}

    def _direction(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        layouts = self._require_layouts()
        out = {}
        for layer, v in vectors.items():
            slot = self.state[layer]
            if "A1" not in slot:
                out[layer] = v.clone()
                continue
            mat = to_matrix(layouts[layer], v)
            if self.rank == 2 and "corr" in slot:
                split = SplitRank2Inverse(*(slot[key] for key in SplitRank2Inverse._fields))
                solved = apply_split_rank2_inverse(split, mat)
            elif self.rank == 2:
                inverse = Rank2KronInverse(slot["k_a"], slot["k_g"], slot["denom"], slot["clamped"])
                solved = apply_rank2_kron_inverse(inverse, mat)
            elif self.config.damping_mode == "eigen":
                inverse = EigenInverse(slot["q_a"], slot["w_a"], slot["q_g"], slot["w_g"])
                solved = apply_eigen_inverse(inverse, mat, self.config.damping)
            else:
                solved = apply_split_inverse(SplitInverse(slot["p_a"], slot["p_g"]), mat)
            out[layer] = from_matrix(layouts[layer], solved)
        return out

    def _matrix(self, layer: str) -> Tensor:
        slot = self.state[layer]
        if "A1" not in slot:
            m = slot["m"]
            return torch.eye(m.numel(), dtype=m.dtype, device=m.device)
        layout = self._require_layouts()[layer]
        return sum(kron_layout_matrix(layout, a, g) for a, g in self.kronecker_factors(layer))
