"""Dense linear algebra shared by the preconditioners (METHODS.md §3–4).

Damped inverses and solves of batches of symmetric PSD blocks (MBF, BDF), inverse ``p``-th roots
(Shampoo), a Woodbury solve for low-rank-plus-damping matrices (BDF with a batch smaller than the
layer) and Kronecker-factored solves (KFAC). Everything runs on the device of its inputs, in
float32 or float64 (lower precisions are computed in float32 and cast back), and is batched over
leading dimensions where the signature says ``[*, ...]``.

Index conventions (used in every docstring below):

- ``*``: any leading batch dimensions, left untouched; ``B`` is their product once flattened.
- ``s``: the size of a square block ``M [*, s, s]``; ``n`` the size of a matrix whose root is
  taken; ``k`` the number of right-hand-side columns.
- ``m``, ``d``: rows and columns of a low-rank factor ``U [m, d]`` (samples × parameters).
- ``a``, ``g``: sizes of the Kronecker factors ``A [a, a]`` (input side) and ``G [g, g]`` (output
  side); ``V``, ``X`` are weight-shaped ``[g, a]`` (out × in).
- ``vec`` stacks columns, so ``(A ⊗ G) vec(V) = vec(G V Aᵀ)``; in torch, ``vec(V)`` is
  ``V.mT.reshape(-1)``.
- ``λ`` is the damping, ``I`` the identity of the size the context implies.

Fallback chain of :func:`damped_inverse` / :func:`damped_solve` (each stage only sees the blocks
that the previous one rejected):

1. batched Cholesky of ``M + λI`` in the input precision;
2. for a float32 input, Cholesky again in float64;
3. an eigendecomposition in float64 with the eigenvalues ``w`` of ``M + λI`` clamped to
   ``max(w, λ)`` (``M`` is treated as PSD) and those at or below the numerical-rank floor
   ``s · eps64 · max(w)`` *truncated* (inverted as 0): for ``λ = 0`` and a singular ``M`` this is
   the Moore–Penrose pseudo-inverse, the minimum-norm solution on the range of ``M``.

A Cholesky stage rejects a block when the factorization fails (``info != 0``), when a pivot is
lost in rounding (``L_ii² ≤ s · eps · A_ii``, where ``A = M + λI``: the factorization "succeeded"
on rounding noise, as it does for an exactly singular ``M`` and ``λ = 0``), or when the result is
not finite. Truncating rather than flooring the tiny eigenvalues matters: a floor ``δ`` would
amplify the rounding noise in the null space by ``1/δ``, to the size of the solution itself.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "damped_inverse",
    "damped_solve",
    "inverse_root",
    "kron_damped_solve_eigen",
    "kron_damped_solve_split",
    "split_damping_pi",
    "kron_matvec",
    "symmetrize",
    "woodbury_damped_solve",
]

logger = logging.getLogger(__name__)

_DEFAULT_ROOT_TOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float64: 1e-7}
"""Default bound on the relative residual ``‖X^p A − I‖_F / √n`` that a Newton root must meet."""


def symmetrize(mats: Tensor) -> Tensor:
    """The symmetric part ``(M + Mᵀ) / 2`` of a batch of square matrices.

    Args:
        mats: ``[*, s, s]``.

    Returns:
        ``[*, s, s]``, a new tensor (one allocation: the halving is in place).
    """
    return (mats + mats.mT).mul_(0.5)


def damped_inverse(mats: Tensor, damping: float | Tensor) -> Tensor:
    """Inverse ``(M + λI)⁻¹`` of every block of a batch of symmetric PSD matrices.

    The input is symmetrized first. Blocks go through the fallback chain of the module docstring
    (Cholesky → float64 Cholesky → eigendecomposition), only the rejected blocks moving on; the
    result is finite for any finite input.

    Args:
        mats: ``M``, ``[*, s, s]``, symmetric PSD up to rounding.
        damping: ``λ ≥ 0``, a number or a tensor broadcastable to ``[*]`` (one per block).

    Returns:
        ``[*, s, s]`` in the dtype of ``mats``.

    Raises:
        ValueError: If ``mats`` or ``damping`` contains NaN/Inf, or ``damping`` is negative.
    """
    _check_square("mats", mats)
    return _damped_apply(mats, damping, None)


def damped_solve(mats: Tensor, rhs: Tensor, damping: float | Tensor) -> Tensor:
    """Solution ``x = (M + λI)⁻¹ b`` for every block of a batch of symmetric PSD matrices.

    Same symmetrization and fallback chain as :func:`damped_inverse`, with
    ``torch.cholesky_solve`` in place of the explicit inverse.

    Args:
        mats: ``M``, ``[*, s, s]``, symmetric PSD up to rounding.
        rhs: ``b``, ``[*, s]`` (one vector per block) or ``[*, s, k]``; its batch dimensions must
            equal those of ``mats``.
        damping: ``λ ≥ 0``, a number or a tensor broadcastable to ``[*]`` (one per block).

    Returns:
        ``x``, shaped like ``rhs``, in the dtype ``mats`` and ``rhs`` promote to.

    Raises:
        ValueError: If an input contains NaN/Inf, ``damping`` is negative, or the shapes do not
            match.
    """
    _check_square("mats", mats)
    vector = rhs.dim() == mats.dim() - 1
    rhs_mat = rhs.unsqueeze(-1) if vector else rhs
    if rhs_mat.shape[:-1] != mats.shape[:-1]:
        raise ValueError(
            f"rhs of shape {tuple(rhs.shape)} does not match mats of shape {tuple(mats.shape)}: "
            "expected [*, s] or [*, s, k] with the same batch dimensions [*]"
        )
    out = _damped_apply(mats, damping, rhs_mat)
    return out.squeeze(-1) if vector else out


def inverse_root(
    mat: Tensor,
    p: int,
    eps: float = 0.0,
    *,
    method: Literal["newton", "eigh"] = "newton",
    max_iter: int = 100,
    tol: float | None = None,
) -> Tensor:
    """Inverse ``p``-th root ``X = (M + εI)^(-1/p)`` of a batch of symmetric PSD matrices.

    With ``A = (M + Mᵀ)/2 + εI``:

    - ``method="newton"``: the coupled Newton iteration (Guo & Higham 2006; as in Shampoo's
      implementations). With ``z = (p + 1) / (2 c)`` for ``c = min(‖A‖_F, ‖A‖_∞) ≥ λ_max(A)``,
      so that the spectrum of ``z A`` lies in ``(0, (p + 1)/2]``::

          X₀ = z^(1/p) I,   M₀ = z A,
          T_k = ((p + 1) I − M_k) / p,   X_{k+1} = X_k T_k,   M_{k+1} = T_k^p M_k,

      keeping ``M_k = X_k^p A`` so that ``M_k → I`` and ``X_k → A^(-1/p)``. The iteration stops
      when ``‖M_k − I‖_F`` stops decreasing (rounding level) or after ``max_iter`` steps. A block
      is accepted if its relative residual ``‖X^p A − I‖_F / √n`` is at most ``tol``; the others
      go to the eigendecomposition (logged at DEBUG level).
    - ``method="eigh"``: ``X = Q diag(w^(-1/p)) Qᵀ`` from ``A = Q diag(w) Qᵀ`` in float64, with
      ``w`` clamped to ``max(w, ε)`` and eigenvalues at or below the floor ``n · eps64 · max(w)``
      truncated (mapped to 0), which gives the root of the pseudo-inverse for a singular ``A``.

    Args:
        mat: ``M``, ``[*, n, n]``, symmetric PSD up to rounding.
        p: The root, an integer ``≥ 1`` (Shampoo uses ``2k`` for a tensor of order ``k``).
        eps: ``ε ≥ 0``.
        method: ``"newton"`` (with eigh fallback) or ``"eigh"``.
        max_iter: Maximum number of Newton steps.
        tol: Accepted relative residual of a Newton root; default ``1e-3`` in float32 and
            ``1e-7`` in float64.

    Returns:
        ``X``, ``[*, n, n]`` in the dtype of ``mat``.

    Raises:
        ValueError: If ``mat`` contains NaN/Inf or an argument is out of range.
    """
    _check_square("mat", mat)
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"p must be an integer >= 1, got {p!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if method not in ("newton", "eigh"):
        raise ValueError(f"method must be 'newton' or 'eigh', got {method!r}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    _check_finite("mat", mat)
    if mat.numel() == 0:
        return torch.empty_like(mat)
    batch, n = mat.shape[:-2], mat.shape[-1]
    out_dtype = mat.dtype
    work = _work_dtype(out_dtype)
    m = symmetrize(mat.to(work)).reshape(batch.numel(), n, n)
    if method == "eigh":
        return _eigh_inverse_root(m, p, eps, out_dtype).reshape(*batch, n, n)
    if tol is None:
        tol = _DEFAULT_ROOT_TOL[work]
    a = _add_to_diagonal(m, eps)
    out, ok = _newton_inverse_root(a, p, max_iter, tol)
    out = out.to(out_dtype)
    failed = (~ok).nonzero().squeeze(-1)
    if failed.numel():
        out[failed] = _eigh_inverse_root(m[failed], p, eps, out_dtype)
        logger.debug(
            "inverse_root: Newton missed tol=%g for %d of %d matrices (n=%d, p=%d); used eigh",
            tol,
            failed.numel(),
            a.shape[0],
            n,
            p,
        )
    return out.reshape(*batch, n, n)


def woodbury_damped_solve(U: Tensor, rhs: Tensor, damping: float, scale: float = 1.0) -> Tensor:
    """Solve ``(c UᵀU + λI) x = b`` at ``O(m² d)`` cost through the Woodbury identity.

    With ``c = scale`` and ``λ = damping``, the Woodbury identity
    ``(λI + Uᵀ (cI) U)⁻¹ = λ⁻¹I − λ⁻¹ Uᵀ (c⁻¹I + λ⁻¹ U Uᵀ)⁻¹ U λ⁻¹`` gives (for ``c > 0``;
    the result also holds at ``c = 0``)::

        x = (1/λ) (b − (c/λ) Uᵀ (I_m + (c/λ) U Uᵀ)⁻¹ U b),

    so only the ``[m, m]`` system ``((c/λ) U Uᵀ + I_m) y = U b`` is solved (by
    :func:`damped_solve`, so with its fallback chain). For BDF with ``G [m, d]`` the per-sample
    gradients, ``F = (1/m) GᵀG`` is ``U = G``, ``c = 1/m``. An EMA of such terms,
    ``Σ_j c_j U_jᵀ U_j``, is of the same form with ``U`` the stacked ``√c_j U_j`` and ``c = 1``,
    as long as the stacked row count stays below ``d``. For ``m ≥ d`` the dense
    ``damped_solve(c UᵀU, b, λ)`` is cheaper.

    Args:
        U: ``[*, m, d]``.
        rhs: ``b``, ``[*, d]`` or ``[*, d, k]``.
        damping: ``λ > 0``.
        scale: ``c ≥ 0``.

    Returns:
        ``x``, shaped like ``rhs``.

    Raises:
        ValueError: If ``damping ≤ 0``, ``scale < 0``, an input contains NaN/Inf, or the shapes
            do not match.
    """
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"woodbury_damped_solve needs damping > 0, got {damping}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    vector = rhs.dim() == U.dim() - 1
    b = rhs.unsqueeze(-1) if vector else rhs
    if U.dim() < 2 or b.shape[:-1] != U.shape[:-2] + U.shape[-1:]:
        raise ValueError(
            f"rhs of shape {tuple(rhs.shape)} does not match U of shape {tuple(U.shape)}: "
            "expected [*, d] or [*, d, k] for U [*, m, d]"
        )
    _check_finite("U", U)
    ratio = scale / damping
    inner = ratio * (U @ U.mT)
    y = damped_solve(inner, U @ b, 1.0)
    x = (b - ratio * (U.mT @ y)) / damping
    return x.squeeze(-1) if vector else x


def kron_matvec(A: Tensor, G: Tensor, V: Tensor) -> Tensor:
    """Kronecker product times a vector, ``(A ⊗ G) vec(V) = vec(G V Aᵀ)``.

    ``vec`` stacks columns, so the Kronecker product is never formed.

    Args:
        A: ``[*, a, a]``.
        G: ``[*, g, g]``.
        V: ``[*, g, a]``.

    Returns:
        ``G V Aᵀ``, ``[*, g, a]``.
    """
    return G @ V @ A.mT


def kron_damped_solve_eigen(A: Tensor, G: Tensor, V: Tensor, damping: float) -> Tensor:
    """Exact solve of ``(A ⊗ G + λI) vec(X) = vec(V)`` through eigendecompositions.

    With ``A = Q_A diag(w_A) Q_Aᵀ`` and ``G = Q_G diag(w_G) Q_Gᵀ`` (symmetrized, eigenvalues
    clamped at 0), ``G X A + λX = V`` becomes diagonal in the eigenbases::

        X = Q_G [(Q_Gᵀ V Q_A) ⊘ (w_G w_Aᵀ + λ)] Q_Aᵀ,

    with ``⊘`` the elementwise division. Costs two eigendecompositions in the input dtype.

    Args:
        A: ``[*, a, a]``, symmetric PSD.
        G: ``[*, g, g]``, symmetric PSD.
        V: ``[*, g, a]``.
        damping: ``λ > 0``.

    Returns:
        ``X``, ``[*, g, a]``.

    Raises:
        ValueError: If ``damping ≤ 0`` or an input contains NaN/Inf.
    """
    _check_kron_args(A, G, V, damping)
    w_a, q_a = torch.linalg.eigh(symmetrize(A))
    w_g, q_g = torch.linalg.eigh(symmetrize(G))
    denom = w_g.clamp_min(0).unsqueeze(-1) * w_a.clamp_min(0).unsqueeze(-2) + damping
    return q_g @ ((q_g.mT @ V @ q_a) / denom) @ q_a.mT


def split_damping_pi(A: Tensor, G: Tensor) -> Tensor:
    """KFAC's damping split ``π = √((tr A / a) / (tr G / g))``; ``π = 1`` for a trace ≤ 0.

    Args:
        A: ``[*, a, a]``.
        G: ``[*, g, g]``.

    Returns:
        ``[*]``, float64.
    """
    mean_a = A.diagonal(dim1=-2, dim2=-1).mean(-1).double()
    mean_g = G.diagonal(dim1=-2, dim2=-1).mean(-1).double()
    valid = (mean_a > 0) & (mean_g > 0)
    return torch.where(valid, mean_a / torch.where(valid, mean_g, 1.0), 1.0).sqrt()


def kron_damped_solve_split(A: Tensor, G: Tensor, V: Tensor, damping: float) -> Tensor:
    """KFAC's factored Tikhonov damping: ``X = (G + π⁻¹√λ I)⁻¹ V (A + π√λ I)⁻¹``.

    This is the exact solve of ``((A + π√λ I) ⊗ (G + π⁻¹√λ I)) vec(X) = vec(V)``, an
    approximation of ``A ⊗ G + λI`` (Martens & Grosse 2015, §6.3) with
    ``π² = (tr A / a) / (tr G / g)``; ``π = 1`` when either trace is not positive. Both factor
    solves go through :func:`damped_solve`.

    Args:
        A: ``[*, a, a]``, symmetric PSD.
        G: ``[*, g, g]``, symmetric PSD.
        V: ``[*, g, a]``.
        damping: ``λ > 0``.

    Returns:
        ``X``, ``[*, g, a]``.

    Raises:
        ValueError: If ``damping ≤ 0`` or an input contains NaN/Inf.
    """
    _check_kron_args(A, G, V, damping)
    pi = split_damping_pi(A, G)
    root = math.sqrt(damping)
    left = damped_solve(G, V, root / pi)
    return damped_solve(A, left.mT, root * pi).mT


def _check_square(name: str, mats: Tensor) -> None:
    if mats.dim() < 2 or mats.shape[-1] != mats.shape[-2]:
        raise ValueError(f"{name} must have shape [*, s, s], got {tuple(mats.shape)}")
    if not mats.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {mats.dtype}")


def _check_finite(name: str, tensor: Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN/Inf")


def _check_kron_args(A: Tensor, G: Tensor, V: Tensor, damping: float) -> None:
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"Kronecker solves need damping > 0, got {damping}")
    _check_square("A", A)
    _check_square("G", G)
    if V.shape[-2:] != (G.shape[-1], A.shape[-1]):
        raise ValueError(
            f"V must have shape [*, g, a] = [*, {G.shape[-1]}, {A.shape[-1]}], got {tuple(V.shape)}"
        )
    for name, tensor in (("A", A), ("G", G), ("V", V)):
        _check_finite(name, tensor)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or float64: the precision a ``dtype`` input is computed in."""
    return torch.promote_types(dtype, torch.float32)


def _add_to_diagonal(mats: Tensor, shift: float | Tensor) -> Tensor:
    """``M + diag(shift)`` for ``mats [B, s, s]`` and ``shift`` a number or ``[B]``."""
    out = mats.clone()
    diag = out.diagonal(dim1=-2, dim2=-1)
    diag += shift.unsqueeze(-1) if isinstance(shift, Tensor) else shift
    return out


def _as_damping(damping: float | Tensor, batch: torch.Size, device: torch.device) -> Tensor:
    """The damping as a float64 tensor ``[B]``, validated."""
    lam = torch.as_tensor(damping, dtype=torch.float64, device=device)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("damping contains NaN/Inf")
    if bool((lam < 0).any()):
        raise ValueError(f"damping must be >= 0, got {damping}")
    return lam.expand(batch).reshape(batch.numel())


def _damped_apply(mats: Tensor, damping: float | Tensor, rhs: Tensor | None) -> Tensor:
    """The fallback chain: ``(M + λI)⁻¹`` (``rhs=None``) or ``(M + λI)⁻¹ rhs``.

    Args:
        mats: ``[*, s, s]``.
        damping: A number or a tensor broadcastable to ``[*]``.
        rhs: ``[*, s, k]`` or ``None``.

    Returns:
        ``[*, s, s]`` or ``[*, s, k]``.
    """
    _check_finite("mats", mats)
    batch, s = mats.shape[:-2], mats.shape[-1]
    out_dtype = mats.dtype if rhs is None else torch.promote_types(mats.dtype, rhs.dtype)
    if rhs is not None:
        _check_finite("rhs", rhs)
    work = _work_dtype(out_dtype)
    lam = _as_damping(damping, batch, mats.device)
    # One fresh tensor (M + Mᵀ)/2 + λI for the first stage; the fallbacks re-read their blocks.
    shifted = symmetrize(mats.to(work)).reshape(batch.numel(), s, s)
    shifted.diagonal(dim1=-2, dim2=-1).add_(lam.to(work).unsqueeze(-1))
    b = None if rhs is None else rhs.to(work).reshape(batch.numel(), s, rhs.shape[-1])

    out, ok = _cholesky_apply(shifted, b, out_dtype)
    failed = (~ok).nonzero().squeeze(-1)
    n_failed = failed.numel()
    if n_failed:
        m = symmetrize(mats.reshape(batch.numel(), s, s)[failed].double())
        lam_failed = lam[failed]
        b_failed = None if b is None else b[failed].double()
    if n_failed and work != torch.float64:
        sub, sub_ok = _cholesky_apply(_add_to_diagonal(m, lam_failed), b_failed, out_dtype)
        out[failed[sub_ok]] = sub[sub_ok]
        m, lam_failed, failed = m[~sub_ok], lam_failed[~sub_ok], failed[~sub_ok]
        b_failed = None if b_failed is None else b_failed[~sub_ok]
    if failed.numel():
        out[failed] = _eigh_damped_apply(m, lam_failed, b_failed, out_dtype)
    if n_failed:
        logger.debug(
            "%d of %d blocks (s=%d) failed Cholesky in %s; %d went to the float64 eigh fallback",
            n_failed,
            shifted.shape[0],
            s,
            work,
            failed.numel(),
        )
    return out.reshape(*batch, s, out.shape[-1])


def _cholesky_apply(a: Tensor, b: Tensor | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One Cholesky stage in the dtype of ``a``.

    Args:
        a: ``[B, s, s]``, the damped symmetric matrices ``M + λI``.
        b: ``[B, s, k]`` or ``None``.
        out_dtype: The dtype the result is returned (and checked for finiteness) in.

    Returns:
        ``(out, ok)``: ``[B, s, s]`` or ``[B, s, k]`` (garbage where not ok), and ``[B]`` bool.
    """
    s = a.shape[-1]
    factor, info = torch.linalg.cholesky_ex(a)
    pivots = factor.diagonal(dim1=-2, dim2=-1).square()
    rtol = s * torch.finfo(a.dtype).eps
    ok = (info == 0) & (pivots > rtol * a.diagonal(dim1=-2, dim2=-1)).all(-1)
    if not bool(ok.all()):
        # Rejected factors may hold zeros or garbage; an identity keeps the batched call posed.
        eye = torch.eye(s, dtype=a.dtype, device=a.device)
        factor = torch.where(ok[:, None, None], factor, eye)
    out = torch.cholesky_inverse(factor) if b is None else torch.cholesky_solve(b, factor)
    out = out.to(out_dtype)
    return out, ok & torch.isfinite(out).flatten(1).all(-1)


def _eigh_damped_apply(m: Tensor, lam: Tensor, b: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """Last stage: ``Q diag(1/w̃) Qᵀ`` (times ``b``), float64, small eigenvalues truncated.

    Args:
        m: ``[B, s, s]``, float64, symmetric.
        lam: ``[B]``, float64.
        b: ``[B, s, k]`` (float64) or ``None``.
        out_dtype: The dtype the result is returned in.

    Returns:
        ``[B, s, s]`` or ``[B, s, k]`` in ``out_dtype``.
    """
    w, q = torch.linalg.eigh(_add_to_diagonal(m, lam))
    w = torch.maximum(w, lam.unsqueeze(-1))
    inv_w = _truncated_power(w, -1.0, out_dtype)
    if b is None:
        return ((q * inv_w.unsqueeze(-2)) @ q.mT).to(out_dtype)
    return (q @ (inv_w.unsqueeze(-1) * (q.mT @ b))).to(out_dtype)


def _truncated_power(w: Tensor, power: float, out_dtype: torch.dtype) -> Tensor:
    """``w ** power`` (``power < 0``) with eigenvalues at or below the rank floor mapped to 0.

    The floor is ``max(s · eps64 · max(w), (s / finfo(out_dtype).max) ** (-1/power))``: the
    relative part is the numerical rank tolerance, the absolute part keeps every entry of
    ``Q diag(w ** power) Qᵀ`` representable in ``out_dtype``.

    Args:
        w: ``[B, s]`` float64 eigenvalues, non-negative.
        power: The negative exponent.
        out_dtype: The dtype the caller returns.

    Returns:
        ``[B, s]`` float64.
    """
    s = w.shape[-1]
    absolute = (s / torch.finfo(out_dtype).max) ** (-1.0 / power)
    floor = (s * torch.finfo(torch.float64).eps * w.amax(-1, keepdim=True)).clamp_min(absolute)
    keep = w > floor
    return torch.where(keep, torch.where(keep, w, 1.0) ** power, 0.0)


def _eigh_inverse_root(m: Tensor, p: int, eps: float, out_dtype: torch.dtype) -> Tensor:
    """``(M + εI)^(-1/p)`` by a float64 eigendecomposition; ``m`` is ``[B, n, n]``, symmetric."""
    w, q = torch.linalg.eigh(_add_to_diagonal(m.double(), eps))
    w = w.clamp_min(eps)
    return ((q * _truncated_power(w, -1.0 / p, out_dtype).unsqueeze(-2)) @ q.mT).to(out_dtype)


def _newton_inverse_root(a: Tensor, p: int, max_iter: int, tol: float) -> tuple[Tensor, Tensor]:
    """Coupled Newton iteration for ``A^(-1/p)`` (see :func:`inverse_root`).

    Args:
        a: ``[B, n, n]``, symmetric, float32 or float64.
        p: The root.
        max_iter: Maximum number of steps.
        tol: Accepted relative residual ``‖X^p A − I‖_F / √n``.

    Returns:
        ``(X, ok)``: ``[B, n, n]`` and ``[B]`` bool (residual within ``tol``).
    """
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    bound = torch.minimum(
        torch.linalg.matrix_norm(a), torch.linalg.matrix_norm(a, ord=float("inf"))
    )
    z = ((p + 1) / (2 * bound.clamp_min(torch.finfo(a.dtype).tiny)))[:, None, None]
    x = z ** (1.0 / p) * eye
    m = z * a

    def error(m_k: Tensor) -> Tensor:
        return torch.linalg.matrix_norm((m_k - eye).double()) / math.sqrt(n)

    err = error(m)
    stalled = torch.zeros_like(err, dtype=torch.bool)
    for _ in range(max_iter):
        t = ((p + 1) * eye - m) / p
        x = x @ t
        m = torch.linalg.matrix_power(t, p) @ m
        new_err = error(m)
        stalled |= ~(new_err < err)
        err = new_err
        if bool(stalled.all()):
            break
    residual = error(torch.linalg.matrix_power(x, p) @ a)
    return x, residual <= tol
