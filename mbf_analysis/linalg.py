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
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from mbf_analysis.errors import ConfigError

__all__ = [
    "add_gram_",
    "all_finite",
    "damped_inverse",
    "damped_solve",
    "inverse_root",
    "kron_damped_solve_eigen",
    "kron_damped_solve_split",
    "split_damping_pi",
    "kron_matvec",
    "symmetrize",
    "woodbury_damped_solve",
    "Rank2KronInverse",
    "rank2_kron_inverse",
    "apply_rank2_kron_inverse",
    "rank2_kron_damped_solve",
]

logger = logging.getLogger(__name__)

_DEFAULT_ROOT_TOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float64: 1e-7}
"""Default bound on the relative residual ``‖X^p A − I‖_F / √n`` that a Newton root must meet."""

RootMethod = Literal["auto", "newton", "eigh"]
"""How :func:`inverse_root` computes a root."""
ROOT_METHODS: tuple[str, ...] = ("auto", "newton", "eigh")


def symmetrize(mats: Tensor) -> Tensor:
    """The symmetric part ``(M + Mᵀ) / 2`` of a batch of square matrices.

    Args:
        mats: ``[*, s, s]``.

    Returns:
        ``[*, s, s]``, a new tensor (one allocation: the halving is in place).
    """
    return (mats + mats.mT).mul_(0.5)


def all_finite(tensors: Tensor | Sequence[Tensor]) -> bool:
    """Whether every entry of a tensor (or of every tensor of a sequence) is finite.

    A sum or norm that holds an Inf or NaN is not finite, so a finite one proves the claim:
    one sum for a tensor, one fused ``torch._foreach_norm`` for a sequence. Only when it is not
    finite (a non-finite entry, or an overflow of finite ones) are the entries looked at one by
    one. The sum costs one read of the tensor, where ``isfinite(t).all()`` writes a boolean
    tensor first (about 30× slower on a 1568² float32 matrix on one CPU core).

    Args:
        tensors: A floating-point tensor or a sequence of them.

    Returns:
        ``all(bool(torch.isfinite(t).all()) for t in tensors)``.
    """
    if isinstance(tensors, Tensor):
        return bool(torch.isfinite(tensors.sum())) or bool(torch.isfinite(tensors).all())
    tensors = list(tensors)
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _finite_blocks(mats: Tensor) -> Tensor:
    """``isfinite(mats).flatten(1).all(-1)`` for ``mats [B, *]``, by sums (:func:`all_finite`).

    Args:
        mats: ``[B, *]`` (any strides: LAPACK results are column-major, where ``flatten`` copies).

    Returns:
        ``[B]`` bool: whether every entry of block ``b`` is finite.
    """
    finite = torch.isfinite(mats.sum(dim=tuple(range(1, mats.dim()))))
    if bool(finite.all()):
        return finite
    return torch.isfinite(mats).flatten(1).all(-1)


def add_gram_(out: Tensor, x: Tensor, alpha: float = 1.0) -> Tensor:
    """``out ← out + α X Xᵀ`` in place, computing only the block rows of the upper triangle.

    The rows of ``X`` are split into ``q = min(8, max(1, n // 100))`` slices ``X_i``; block row
    ``i`` of the upper triangle is ``out[i, i:] += α X_i X_{i:}ᵀ`` and the strictly lower
    blocks are then copied from the upper ones, which is exact because ``out`` is symmetric on
    entry. That is ``(q + 1) / (2q)`` of the products of ``out.addmm_(X, Xᵀ, alpha=α)`` (the
    reference it is tested against): 0.65× its time for ``X [5140, 1000]`` and 0.75× for
    ``[400, 25088]`` (float32, one thread).

    Args:
        out: ``[n, n]``, symmetric (e.g. zeros), updated in place; may be a view.
        x: ``X``, ``[n, k]`` (any strides, e.g. the transpose of ``[k, n]`` rows).
        alpha: ``α``.

    Returns:
        ``out``.
    """
    n = x.shape[0]
    q = min(8, max(1, n // 100))
    edges = [round(i * n / q) for i in range(q + 1)]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        out[start:stop, start:].addmm_(x[start:stop], x[start:].T, alpha=alpha)
    for start, stop in zip(edges[:-2], edges[1:-1], strict=True):
        out[stop:, start:stop] = out[start:stop, stop:].T
    return out


def damped_inverse(mats: Tensor, damping: float | Tensor, *, trusted: bool = False) -> Tensor:
    """Inverse ``(M + λI)⁻¹`` of every block of a batch of symmetric PSD matrices.

    The input is symmetrized first. Blocks go through the fallback chain of the module docstring
    (Cholesky → float64 Cholesky → eigendecomposition), only the rejected blocks moving on; the
    result is finite for any finite input.

    Args:
        mats: ``M``, ``[*, s, s]``, symmetric PSD up to rounding.
        damping: ``λ ≥ 0``, a number or a tensor broadcastable to ``[*]`` (one per block).
        trusted: For callers whose ``M`` is symmetric by construction (up to rounding) and
            already checked finite, and whose ``λ`` is a checked float64 tensor ``[*]``: skips
            those checks and the symmetrization in the first (Cholesky) stage, which reads only
            the lower triangle, so the result differs from ``trusted=False`` by rounding of
            ``M − Mᵀ``. The later stages, for the blocks the first one rejects, are unchanged.

    Returns:
        ``[*, s, s]`` in the dtype of ``mats``.

    Raises:
        ValueError: If ``mats`` or ``damping`` contains NaN/Inf, or ``damping`` is negative
            (not checked when ``trusted``).
    """
    _check_square("mats", mats)
    return _damped_apply(mats, damping, None, trusted=trusted)


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
        raise ConfigError(
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
    method: RootMethod = "auto",
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
    - ``method="auto"`` (default): per device. On CPU the eigendecomposition of ``"eigh"`` in
      the working precision (a float64 input is exactly ``"eigh"``): for float32, the
      eigenvectors ``Q`` of ``M`` in float32 and the eigenvalues as Rayleigh quotients
      ``q_iᵀ M q_i + ε`` (one more product; with ``ε = 0`` the rank floor is float32's); a batch
      whose float32 decomposition fails, or a matrix whose float32 root is not finite, is redone
      in float64. Its accuracy is that of the float32 Newton root: relative errors against
      float64 on a rank-384 statistic of size 1568 (``ε = 1e-4``, ``p = 4``) of 4.7e-5, against
      9.0e-5 for Newton, 1.6e-3 for the float32 eigenvalues themselves and 6.9e-3 for a float32
      SVD root (pytorch-optimizer's Shampoo). On CPU an eigendecomposition costs about ten
      products of ``n × n`` matrices (n = 1568, float32, one thread: 0.48 s against 0.048 s per
      product), while Newton needs 10–15 steps of ``p + 2`` products each. On CUDA ``"auto"``
      is ``"newton"``, whose products are cheap there next to an eigendecomposition (not yet
      measured in this project: no GPU was available).

    Args:
        mat: ``M``, ``[*, n, n]``, symmetric PSD up to rounding.
        p: The root, an integer ``≥ 1`` (Shampoo uses ``2k`` for a tensor of order ``k``).
        eps: ``ε ≥ 0``.
        method: ``"auto"``, ``"newton"`` (with eigh fallback) or ``"eigh"``.
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
        raise ConfigError(f"p must be an integer >= 1, got {p!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"eps must be finite and >= 0, got {eps}")
    if method not in ROOT_METHODS:
        raise ConfigError(f"method must be one of {ROOT_METHODS}, got {method!r}")
    if max_iter < 0:
        raise ConfigError(f"max_iter must be >= 0, got {max_iter}")
    _check_finite("mat", mat)
    if mat.numel() == 0:
        return torch.empty_like(mat)
    batch, n = mat.shape[:-2], mat.shape[-1]
    out_dtype = mat.dtype
    work = _work_dtype(out_dtype)
    m = symmetrize(mat.to(work)).reshape(batch.numel(), n, n)
    if method == "auto":
        method = "newton" if mat.device.type == "cuda" else "eigh"
        if method == "eigh" and work != torch.float64:
            return _eigh_inverse_root_working(m, p, eps, out_dtype).reshape(*batch, n, n)
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
        raise ConfigError(f"woodbury_damped_solve needs damping > 0, got {damping}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"scale must be finite and >= 0, got {scale}")
    vector = rhs.dim() == U.dim() - 1
    b = rhs.unsqueeze(-1) if vector else rhs
    if U.dim() < 2 or b.shape[:-1] != U.shape[:-2] + U.shape[-1:]:
        raise ConfigError(
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
        raise ConfigError(f"{name} must have shape [*, s, s], got {tuple(mats.shape)}")
    if not mats.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {mats.dtype}")


def _check_finite(name: str, tensor: Tensor) -> None:
    if not all_finite(tensor):
        raise ConfigError(f"{name} contains NaN/Inf")


def _check_kron_args(A: Tensor, G: Tensor, V: Tensor, damping: float) -> None:
    if not (math.isfinite(damping) and damping > 0):
        raise ConfigError(f"Kronecker solves need damping > 0, got {damping}")
    _check_square("A", A)
    _check_square("G", G)
    if V.shape[-2:] != (G.shape[-1], A.shape[-1]):
        raise ConfigError(
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
        raise ConfigError("damping contains NaN/Inf")
    if bool((lam < 0).any()):
        raise ConfigError(f"damping must be >= 0, got {damping}")
    return lam.expand(batch).reshape(batch.numel())


def _damped_apply(
    mats: Tensor, damping: float | Tensor, rhs: Tensor | None, *, trusted: bool = False
) -> Tensor:
    """The fallback chain: ``(M + λI)⁻¹`` (``rhs=None``) or ``(M + λI)⁻¹ rhs``.

    Args:
        mats: ``[*, s, s]``.
        damping: A number or a tensor broadcastable to ``[*]``.
        rhs: ``[*, s, k]`` or ``None``.
        trusted: See :func:`damped_inverse`.

    Returns:
        ``[*, s, s]`` or ``[*, s, k]``.
    """
    batch, s = mats.shape[:-2], mats.shape[-1]
    out_dtype = mats.dtype if rhs is None else torch.promote_types(mats.dtype, rhs.dtype)
    work = _work_dtype(out_dtype)
    if trusted:
        lam = damping.reshape(batch.numel())
        shifted = mats.to(work, copy=True).reshape(batch.numel(), s, s)
    else:
        _check_finite("mats", mats)
        if rhs is not None:
            _check_finite("rhs", rhs)
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
    return out, ok & _finite_blocks(out)


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


def _truncated_power(
    w: Tensor, power: float, out_dtype: torch.dtype, rank_eps: float | None = None
) -> Tensor:
    """``w ** power`` (``power < 0``) with eigenvalues at or below the rank floor mapped to 0.

    The floor is ``max(s · rank_eps · max(w), (s / finfo(out_dtype).max) ** (-1/power))``: the
    relative part is the numerical rank tolerance (``rank_eps`` defaults to float64's machine
    epsilon), the absolute part keeps every entry of ``Q diag(w ** power) Qᵀ`` representable in
    ``out_dtype``.

    Args:
        w: ``[B, s]`` eigenvalues (float64, or float32 from a float32 decomposition),
            non-negative.
        power: The negative exponent.
        out_dtype: The dtype the caller returns.
        rank_eps: The machine epsilon of the relative floor (default: float64's).

    Returns:
        ``[B, s]`` in the dtype of ``w``.
    """
    s = w.shape[-1]
    rank_eps = torch.finfo(torch.float64).eps if rank_eps is None else rank_eps
    absolute = (s / torch.finfo(out_dtype).max) ** (-1.0 / power)
    floor = (s * rank_eps * w.amax(-1, keepdim=True)).clamp_min(absolute)
    keep = w > floor
    return torch.where(keep, torch.where(keep, w, 1.0) ** power, 0.0)


def _eigh_inverse_root(m: Tensor, p: int, eps: float, out_dtype: torch.dtype) -> Tensor:
    """``(M + εI)^(-1/p)`` by a float64 eigendecomposition; ``m`` is ``[B, n, n]``, symmetric."""
    w, q = torch.linalg.eigh(_add_to_diagonal(m.double(), eps))
    w = w.clamp_min(eps)
    return ((q * _truncated_power(w, -1.0 / p, out_dtype).unsqueeze(-2)) @ q.mT).to(out_dtype)


def _eigh_inverse_root_working(m: Tensor, p: int, eps: float, out_dtype: torch.dtype) -> Tensor:
    """``method="auto"`` on CPU: the eigh root in ``m``'s (float32) precision, float64 retries.

    ``M = Q diag(·) Qᵀ`` in float32, then the eigenvalues are taken as the Rayleigh quotients
    ``w_i = q_iᵀ M q_i`` (one more product) plus ``ε``: the decomposition's own eigenvalues carry
    absolute errors of about ``eps32 · λ_max``, which swamp ``ε`` and the small eigenvalues of a
    rank-deficient statistic, and adding ``ε`` after the quotient keeps it exact (measured:
    :func:`inverse_root`). Then ``w ← max(w, ε)`` and :func:`_truncated_power` as in
    :func:`_eigh_inverse_root`.

    Args:
        m: ``[B, n, n]``, symmetric, float32.
        p: The root.
        eps: ``ε``.
        out_dtype: The dtype returned.

    Returns:
        ``[B, n, n]`` in ``out_dtype``.
    """
    try:
        _, q = torch.linalg.eigh(m)
        w = ((m @ q) * q).sum(-2).add_(eps).clamp_min_(eps)
        rank_eps = torch.finfo(m.dtype).eps if eps == 0 else None
        power = _truncated_power(w, -1.0 / p, out_dtype, rank_eps)
        out = ((q * power.unsqueeze(-2)) @ q.mT).to(out_dtype)
        failed = (~_finite_blocks(out)).nonzero().squeeze(-1)
    except torch.linalg.LinAlgError:  # the batched decomposition did not converge
        out = torch.empty(m.shape, dtype=out_dtype, device=m.device)
        failed = torch.arange(m.shape[0], device=m.device)
    if failed.numel():
        out[failed] = _eigh_inverse_root(m[failed], p, eps, out_dtype)
        logger.debug(
            "inverse_root: the %s eigh root failed for %d of %d matrices (n=%d, p=%d); redone "
            "in float64",
            m.dtype,
            failed.numel(),
            m.shape[0],
            m.shape[-1],
            p,
        )
    return out


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


class Rank2KronInverse(NamedTuple):
    """The simultaneous diagonalisation of :func:`rank2_kron_inverse`.

    ``K_aᵀ A₁' K_a = I``, ``K_aᵀ A₂ K_a = diag(s_a)`` and likewise for ``G``.

    Attributes:
        k_a: ``K_a``, ``[*, a, a]``.
        k_g: ``K_g``, ``[*, g, g]``.
        denom: ``1 + s_g s_aᵀ`` with the entries at or below the floor set to the floor,
            ``[*, g, a]``.
        clamped: How many entries of ``denom`` were clamped, int64 ``[*]``.
    """

    k_a: Tensor
    k_g: Tensor
    denom: Tensor
    clamped: Tensor


def rank2_kron_inverse(
    A1: Tensor,
    G1: Tensor,
    A2: Tensor,
    G2: Tensor,
    damping: float,
    *,
    pi: float = 1.0,
    floor: float = 1e-2,
) -> Rank2KronInverse:
    r"""Simultaneous diagonalisation for the inverse of ``A₁' ⊗ G₁' + A₂ ⊗ G₂`` (METHODS §6.1).

    The damping is split as for a rank-1 Kronecker product **(choice)**:
    ``A₁' = A₁ + π√λ I`` and ``G₁' = G₁ + π⁻¹√λ I`` (``π = 1``: the Kronecker-SVD papers), so
    the damped matrix is ``A₁'⊗G₁' + A₂⊗G₂ = A₁⊗G₁ + A₂⊗G₂ + √λ(π A₁⊗I + π⁻¹ I⊗G₁) + λI``.
    With ``A₁ = Q diag(w) Qᵀ`` (``w`` clamped at 0: ``A₁`` is PSD up to rounding) and
    ``W = diag(w + π√λ)^(-1/2)``, the eigendecomposition ``W Qᵀ A₂ Q W = E_a diag(s_a) E_aᵀ``
    gives ``K_a = Q W E_a``; likewise ``K_g``. Then

    .. math::

        (A_1' \otimes G_1' + A_2 \otimes G_2)^{-1}
        = (K_a \otimes K_g) \, \mathrm{diag}(1 + s_a \otimes s_g)^{-1} (K_a \otimes K_g)^\top .

    ``A₂``, ``G₂`` may be indefinite; a denominator ``1 + s_g s_a ≤ floor`` means the damped
    matrix is not positive definite in that direction. Such denominators are set to ``floor``
    and counted (:attr:`Rank2KronInverse.clamped`): nothing is NaN or negative, and the count
    says how far the matrix was changed (taking ``|s|``, as the public code of the papers does,
    changes it silently).

    Args:
        A1: ``[*, a, a]``, symmetric PSD.
        G1: ``[*, g, g]``, symmetric PSD.
        A2: ``[*, a, a]``, symmetric.
        G2: ``[*, g, g]``, symmetric.
        damping: ``λ > 0``.
        pi: ``π > 0``.
        floor: The smallest denominator kept, in ``(0, 1]``.

    Returns:
        The :class:`Rank2KronInverse` for :func:`apply_rank2_kron_inverse`.

    Raises:
        ValueError: For a non-positive damping or ``π``, a floor outside ``(0, 1]``, shapes that
            do not match, or NaN/Inf in an input.
    """
    if not (math.isfinite(pi) and pi > 0):
        raise ConfigError(f"pi must be a finite number > 0, got {pi}")
    if not (math.isfinite(floor) and 0 < floor <= 1):
        raise ConfigError(f"floor must lie in (0, 1], got {floor}")
    probe = A1.new_zeros(*A1.shape[:-2], G1.shape[-1], A1.shape[-1])
    _check_kron_args(A1, G1, probe, damping)
    for name, second, first in (("A2", A2, A1), ("G2", G2, G1)):
        if second.shape != first.shape:
            raise ConfigError(
                f"{name} must have the shape of {name[0]}1, {tuple(first.shape)}, got "
                f"{tuple(second.shape)}"
            )
        _check_finite(name, second)
    root = math.sqrt(damping)
    k_a, s_a = _congruence(A1, A2, root * pi)
    k_g, s_g = _congruence(G1, G2, root / pi)
    raw = 1.0 + s_g.unsqueeze(-1) * s_a.unsqueeze(-2)
    low = raw <= floor
    return Rank2KronInverse(k_a, k_g, raw.masked_fill(low, floor), low.sum((-2, -1)))


def _congruence(first: Tensor, second: Tensor, shift: float) -> tuple[Tensor, Tensor]:
    """``K`` and ``s`` with ``Kᵀ (first + shift I) K = I`` and ``Kᵀ second K = diag(s)``.

    With the Cholesky factor ``first + shift I = L Lᵀ``: ``L⁻¹ second L⁻ᵀ = E diag(s) Eᵀ`` and
    ``K = L⁻ᵀ E``. Where the factorization fails (``first`` has an eigenvalue below
    ``-shift``), ``first = Q diag(w) Qᵀ`` with ``w`` clamped at 0 (treated as PSD) and
    ``K = Q diag(w + shift)^(-1/2) E``.
    """
    first = symmetrize(first)
    eye = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device)
    chol, info = torch.linalg.cholesky_ex(first + shift * eye)
    if not bool((info != 0).any()):
        half = torch.linalg.solve_triangular(chol, second, upper=False)
        inner = torch.linalg.solve_triangular(chol, half.mT, upper=False)
        s, e = _robust_eigh(symmetrize(inner))
        return torch.linalg.solve_triangular(chol.mT, e, upper=True), s
    w, q = _robust_eigh(first)
    scaled = q * (w.clamp_min(0) + shift).rsqrt().unsqueeze(-2)
    s, e = _robust_eigh(symmetrize(scaled.mT @ second @ scaled))
    return scaled @ e, s


def _robust_eigh(mats: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``, retried in float64 where it fails to converge or, without
    raising, returns non-finite values (float32 LAPACK does both on large, nearly
    rank-deficient factors with many repeated eigenvalues, e.g. a rank-128 second factor in
    500 dimensions of the MNIST autoencoder), then with a diagonal shift ``ε‖M‖_F`` that moves
    every eigenvalue alike (subtracted again)."""
    try:
        w, q = torch.linalg.eigh(mats)
        if all_finite([w, q]):
            return w, q
        logger.debug("eigh returned non-finite values in %s; retrying in float64", mats.dtype)
    except torch.linalg.LinAlgError:
        logger.debug("eigh failed in %s; retrying in float64", mats.dtype)
    wide = mats.double()
    try:
        w, q = torch.linalg.eigh(wide)
    except torch.linalg.LinAlgError:
        shift = torch.finfo(torch.float64).eps * torch.linalg.matrix_norm(wide)
        eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
        w, q = torch.linalg.eigh(wide + shift[..., None, None] * eye)
        w = w - shift[..., None]
    return w.to(mats.dtype), q.to(mats.dtype)


def apply_rank2_kron_inverse(inverse: Rank2KronInverse, V: Tensor) -> Tensor:
    """``X = K_g [(K_gᵀ V K_a) ⊘ denom] K_aᵀ``, the solve of :func:`rank2_kron_inverse`'s matrix.

    Args:
        inverse: From :func:`rank2_kron_inverse`.
        V: ``[*, g, a]``.

    Returns:
        ``X``, ``[*, g, a]``: ``vec X = (A₁'⊗G₁' + A₂⊗G₂)⁻¹ vec V`` where nothing was clamped.
    """
    k_a, k_g, denom, _ = inverse
    return k_g @ ((k_g.mT @ V @ k_a) / denom) @ k_a.mT


def rank2_kron_damped_solve(
    A1: Tensor,
    G1: Tensor,
    A2: Tensor,
    G2: Tensor,
    V: Tensor,
    damping: float,
    *,
    pi: float = 1.0,
    floor: float = 1e-2,
) -> tuple[Tensor, Tensor]:
    """Solve ``(A₁'⊗G₁' + A₂⊗G₂) vec(X) = vec(V)`` (:func:`rank2_kron_inverse`, then apply).

    Args:
        A1, G1, A2, G2, damping, pi, floor: As for :func:`rank2_kron_inverse`.
        V: ``[*, g, a]``.

    Returns:
        ``(X [*, g, a], clamped [*])``.
    """
    inverse = rank2_kron_inverse(A1, G1, A2, G2, damping, pi=pi, floor=floor)
    _check_finite("V", V)
    return apply_rank2_kron_inverse(inverse, V), inverse.clamped
