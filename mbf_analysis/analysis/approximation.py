r"""How well each method's curvature matrix approximates the Fisher (METHODS.md §6.1).

For a Linear layer with the per-sample factors of one batch
(:class:`~mbf_analysis.curvature.kfac.KronSamples`), the reference is that batch's Fisher block

.. math::

    F = \frac{1}{m} \sum_{n=1}^{m} (\bar a_n \bar a_n^\top) \otimes \Gamma_n

of the kind ``fisher`` (``"mc"``: ``Γ_n = δ̂_n δ̂_nᵀ`` with one label sampled from the model
per input, the Kronecker-SVD papers' Fisher; ``"empirical"``: real labels; ``"exact"``: the
``C`` rows of the square-root GGN). Every method approximates the Fisher *of the same kind* from
the same collection pass (the same sampled labels), in its one-shot form (this batch only). Per
layer and method:

- ``error = ‖F − F̂‖_F / ‖F‖_F``;
- ``scale = argmin_α ‖F − αF̂‖_F = ⟨F, F̂⟩ / ‖F̂‖²_F`` and the scale-free
  ``scaled_error = ‖F − scale·F̂‖_F / ‖F‖_F = √(1 − ⟨F, F̂⟩² / (‖F‖²‖F̂‖²))``, the sine of the
  Frobenius angle between ``F`` and ``F̂`` (METHODS.md §6.7). It is computed as
  ``‖F − scale·F̂‖² = ‖F − F̂‖² − ‖F̂‖²(1 − scale)²`` from the same three numbers as ``error``,
  so that ``scaled_error ≤ error`` holds in floating point too, with equality when ``F̂`` is a
  projection of ``F`` (``mbf-exact``, ``bdf``: ``scale = 1``). ``F̂ = 0`` gives ``scale = 0``
  and ``scaled_error = 1``;
- ``singular_error = ‖σ̂ − σ‖₂ / ‖σ‖₂`` for the vectors of the ``top_k`` leading singular
  values of ``F`` and ``F̂`` (``|eigenvalues|``: ``F̂`` is symmetric, indefinite for the
  rank-2 methods);
- ``clamped``: the rank-2 denominators ``1 + s_g s_a`` that the method's inverse clamped
  (:meth:`~mbf_analysis.methods.KroneckerSVD.diagnostics`; 0 for the other methods).

``F̂`` of each method:

===============  =========================================================================
``kfac``         ``A ⊗ G``, KFAC's factors of the kind (``fisher="exact"``: exact ``G``)
``kpsvd``...     ``Σ_k A_k ⊗ G_k`` of the Kronecker-SVD family (``kpsvd``, ``deflation``,
                 ``lanczos``, ``kfac-corrected``)
``mbf``          its one-shot mini-block matrix ``blockdiag(ḡ_j ḡ_jᵀ)`` from the minibatch-mean
                 gradient ``ḡ`` (``mbf-true``: the sampled-label gradient), spatially averaged
                 on the layers the method averages (``I ⊗ F̄``). Over minibatches of ``m``
                 samples at a fixed ``θ``, ``E[ḡḡᵀ] = μμᵀ + (F̃ − μμᵀ)/m`` (``μ`` and ``F̃``
                 the full-data gradient and empirical Fisher, METHODS.md §6.7): about ``F/m``
                 plus the mean-gradient term, so its ``error`` mostly measures the factor
                 ``1/m`` (``error ≈ 1``) and its ``scaled_error`` the shape
``mbf-ema``      the matrix MBF inverts: MBF's own EMA ``F_b ← β F_b + (1 − β) ḡ_b ḡ_bᵀ`` on
                 its statistics period ``T1`` (:class:`~mbf_analysis.methods.MBFConfig`
                 ``decay``, ``stat_period``) of the whole training minibatch's gradient,
                 carried along a trajectory (``mbf-true-ema``: of the sampled-label
                 gradient); see :class:`ApproximationRun`
``mbf-exact``    the mini-blocks of ``F`` itself (averaged the same way)
``bdf``          ``F`` itself: 0 by construction
===============  =========================================================================

The carried methods (:data:`CARRIED`: ``mbf-ema``, ``mbf-true-ema``) have no one-shot form: a
call of :func:`approximation_errors` compares the MBF methods it is given (``carried=``), as
:class:`ApproximationRun` keeps them; without them it refuses these names.

**Two paths.** A layer with ``d ≤ max_dense_dim`` parameters is compared densely: ``F`` from the
per-sample rows in METHODS §2 order, ``F̂ = method.matrix(layer)``, ``torch.linalg.eigvalsh``
(the reference). A larger layer is never formed: with ``K_a[n,n'] = (ā_nᵀā_{n'})²`` and
``K_g[n,n'] = ⟨Γ_n, Γ_{n'}⟩``,

.. math::

    \|F\|_F^2 = \frac{1}{m^2} \sum_{n,n'} K_a K_g, \qquad
    \langle F, A \otimes G \rangle = \frac{1}{m} \sum_n (\bar a_n^\top A \bar a_n)
    \langle \Gamma_n, G \rangle, \qquad
    \|\textstyle\sum_k A_k \otimes G_k\|_F^2 = \sum_{k,l} \langle A_k, A_l \rangle
    \langle G_k, G_l \rangle,

``⟨F, blockdiag(P_j)⟩ = (1/m) Σ_n Σ_j γ_nj ā_nᵀ P_j ā_n`` with ``γ_nj = (Γ_n)_jj``, and
``‖F − F̂‖² = ‖F‖² − 2⟨F, F̂⟩ + ‖F̂‖²`` in float64. The leading eigenvalues of ``F`` are those
of the ``mr × mr`` kernel ``(1/m)(ā_nᵀā_{n'})(δ_ncᵀδ_{n'c'})``; of a single Kronecker product
the products of the factors' eigenvalues; of mini-blocks the union of the blocks'; otherwise
(a sum of two Kronecker products, or a kernel above 4096) ARPACK (``scipy.sparse.linalg.eigsh``)
on the matrix-free product, started deterministically.

:class:`ApproximationRun` records these errors every ``every`` iterations while a torch
optimizer (Adam by default, as the paper's figure) trains the network: the trajectory form,
resumable like :class:`~mbf_analysis.analysis.cosine.CosineRun`. It also carries the EMA of
the carried methods, updated at every iteration on its training minibatch.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn
from tqdm.auto import tqdm

from mbf_analysis import methods as registry
from mbf_analysis.curvature.collect import (
    KRON_SAMPLES,
    KRON_SAMPLES_EXACT,
    KRON_SAMPLES_SAMPLED,
    collect,
)
from mbf_analysis.curvature.fisher import prepare_batch
from mbf_analysis.curvature.kfac import KronFactors, KronSamples
from mbf_analysis.errors import (
    ConfigError,
    NonFiniteError,
    UnknownNameError,
    UnsupportedModuleError,
)
from mbf_analysis.fisher_kinds import OLD_SPELLINGS, check_fisher_kind
from mbf_analysis.layout import LayerLayout, model_layouts
from mbf_analysis.methods import KFAC, MBF, BlockPlan, KroneckerSVD, Method
from mbf_analysis.methods.kronecker_svd import sample_grams
from mbf_analysis.stopping import stop_requests

__all__ = [
    "APPROXIMATED",
    "CARRIED",
    "DEFAULT_APPROXIMATIONS",
    "ERROR_COLUMNS",
    "TRAJECTORY_COLUMNS",
    "SkippedLayersWarning",
    "ApproximationConfig",
    "ApproximationRun",
    "approximation_errors",
    "approximation_trajectory",
]

logger = logging.getLogger(__name__)

DEFAULT_APPROXIMATIONS: tuple[str, ...] = (
    "kfac",
    "kpsvd",
    "deflation",
    "lanczos",
    "kfac-corrected",
)
"""The methods of the Kronecker-SVD paper's figure."""
APPROXIMATED: tuple[str, ...] = (
    *DEFAULT_APPROXIMATIONS,
    "mbf",
    "mbf-true",
    "mbf-ema",
    "mbf-true-ema",
    "mbf-exact",
    "bdf",
)
"""Every method whose matrix approximates the Fisher: registry methods in one-shot form and the
:data:`CARRIED` ones."""
CARRIED: dict[str, str] = {"mbf-ema": "mbf", "mbf-true-ema": "mbf-true"}
"""The methods compared as a trajectory carries them (name → registry method): MBF's EMA of
``F_b`` with its own ``decay`` and ``stat_period``, not its one-shot form."""
ERROR_COLUMNS: tuple[str, ...] = (
    "layer",
    "method",
    "fisher",
    "error",
    "scale",
    "scaled_error",
    "singular_error",
    "clamped",
    "fisher_norm",
    "path",
)
"""Columns of :func:`approximation_errors` (``fisher_norm`` is ``‖F‖_F``, ``path`` ``"dense"``
or ``"factored"``)."""
TRAJECTORY_COLUMNS: tuple[str, ...] = ("iteration", "loss", *ERROR_COLUMNS)
"""Columns of :class:`ApproximationRun`'s records."""

_KINDS = {"mc": KRON_SAMPLES_SAMPLED, "empirical": KRON_SAMPLES, "exact": KRON_SAMPLES_EXACT}
_WITH_FISHER = frozenset({"kfac", "kpsvd", "deflation", "lanczos", "kfac-corrected"})
_FROM_REFERENCE = frozenset({"mbf-exact", "bdf"})
_MAX_KERNEL = 4096
_NEVER = 2**62
"""The carried methods' default ``inverse_period``: the analysis reads ``F_b``, never ``P_b``
(one inversion, at ``k = 0``)."""
_CHUNK_BYTES = 2**28


# ----------------------------------------------------------------------------- spectra
def _top(values: Tensor, k: int) -> Tensor:
    """The ``k`` largest ``|values|`` in decreasing order, padded with zeros, float64."""
    mags = values.detach().abs().flatten().double()
    if mags.numel() >= k:
        return torch.topk(mags, k).values
    return torch.cat([torch.sort(mags, descending=True).values, mags.new_zeros(k - mags.numel())])


def _operator_top(matvec: Callable[[Tensor], Tensor], like: Tensor, k: int) -> Tensor:
    """The ``k`` largest ``|λ|`` of the symmetric operator ``X ↦ matvec(X)`` on ``like``-shaped
    ``X`` (ARPACK, or a dense matrix of a small operator), float64."""
    n = like.numel()
    if n <= max(2 * k + 1, 64):
        eye = torch.eye(n, dtype=like.dtype, device=like.device)
        dense = torch.stack([matvec(col.reshape(like.shape)).reshape(-1) for col in eye], dim=1)
        return _top(torch.linalg.eigvalsh((dense + dense.T) / 2), k)

    def apply(x: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(like)
        return matvec(tensor.reshape(like.shape)).reshape(-1).double().cpu().numpy()

    start = like.reshape(-1).double().cpu().numpy()
    op = LinearOperator((n, n), matvec=apply, dtype=np.float64)
    values = eigsh(op, k=k, which="LM", v0=start, tol=1e-10, return_eigenvectors=False)
    return _top(torch.from_numpy(values), k)


# ----------------------------------------------------------------------------- the reference
class _Reference:
    """One layer's Fisher block from its per-sample factors (module docstring), float64."""

    def __init__(self, samples: KronSamples) -> None:
        self.a = samples.a.double()
        self.rows = samples.rows.double()
        self.m = self.a.shape[0]
        self.k_a, self.k_g = sample_grams(KronSamples(self.a, self.rows))
        self.norm_sq = float((self.k_a * self.k_g).sum()) / self.m**2
        self.gamma_diag = self.rows.square().sum(1)
        self._spans: tuple[Tensor, Tensor] | None = None

    def quad_a(self, A: Tensor) -> Tensor:
        """``ā_nᵀ A ā_n``, ``[m]``."""
        return ((self.a @ A.double()) * self.a).sum(1)

    def quad_g(self, G: Tensor) -> Tensor:
        """``⟨Γ_n, G⟩``, ``[m]``."""
        return ((self.rows @ G.double()) * self.rows).sum((1, 2))

    def inner_kron(self, A: Tensor, G: Tensor) -> float:
        return float((self.quad_a(A) * self.quad_g(G)).sum()) / self.m

    def inner_blocks(self, blocks: Tensor) -> float:
        """``⟨F, blockdiag(P_j)⟩`` for ``P [g, a, a]`` (one block per output neuron)."""
        total = 0.0
        chunk = max(1, _CHUNK_BYTES // (8 * self.m * self.a.shape[1]))
        for start in range(0, blocks.shape[0], chunk):
            part = blocks[start : start + chunk].double()
            quad = torch.einsum("na,jab,nb->nj", self.a, part, self.a)
            total += float((self.gamma_diag[:, start : start + chunk] * quad).sum())
        return total / self.m

    def own_blocks_norm_sq(self) -> float:
        """``Σ_j ‖F_jj‖² = (1/m²) Σ_{n,n'} (ā_nᵀā_{n'})² γ_nᵀγ_{n'}``."""
        return float((self.k_a * (self.gamma_diag @ self.gamma_diag.T)).sum()) / self.m**2

    def own_blocks(self, start: int, stop: int) -> Tensor:
        """``F_jj = (1/m) Σ_n γ_nj ā_nā_nᵀ`` for ``start ≤ j < stop``, ``[stop - start, a, a]``."""
        weights = self.gamma_diag[:, start:stop]
        return torch.einsum("nj,na,nb->jab", weights, self.a, self.a) / self.m

    def dense(self) -> Tensor:
        """``F`` in METHODS §2 order (the row-major ``W̄``): rows ``δ_nc ⊗ ā_n``, ``[d, d]``."""
        grads = (self.rows.unsqueeze(3) * self.a.unsqueeze(1).unsqueeze(2)).flatten(2)
        flat = grads.flatten(0, 1)
        return flat.T @ flat / self.m

    def spans(self) -> tuple[Tensor, Tensor]:
        """Orthonormal bases ``Q_a [a, p]`` of ``span{ā_n}`` and ``Q_g [g, q]`` of
        ``span{δ_nc}`` (QR; ``p ≤ m``, ``q ≤ mr``). The one-shot factors of every Kronecker
        method lie in them (``A = Āᵀ diag(α) Ā``, ``G = Σ β_n Γ_n``)."""
        if self._spans is None:
            q_a = torch.linalg.qr(self.a.T).Q
            q_g = torch.linalg.qr(self.rows.flatten(0, 1).T).Q
            self._spans = (q_a, q_g)
        return self._spans

    def top(self, k: int) -> Tensor:
        m, r, g = self.rows.shape
        if m * r <= _MAX_KERNEL:
            gram_a = (self.a @ self.a.T).repeat_interleave(r, 0).repeat_interleave(r, 1)
            flat = self.rows.flatten(0, 1)
            return _top(torch.linalg.eigvalsh(gram_a * (flat @ flat.T) / m), k)
        flat = self.rows.flatten(0, 1)
        a_rep = self.a.repeat_interleave(r, 0)

        def matvec(X: Tensor) -> Tensor:
            weights = ((flat @ X) * a_rep).sum(1, keepdim=True)
            return flat.T @ (weights * a_rep) / m

        return _operator_top(matvec, self.a.new_ones(g, self.a.shape[1]), k)


# ----------------------------------------------------------------------------- F̂ (factored)
class _KronSum:
    """``F̂ = Σ_k A_k ⊗ G_k``; ``ref`` gives the sample spans for the spectrum (:meth:`top`)."""

    def __init__(self, pairs: Sequence[KronFactors], ref: _Reference) -> None:
        self.eps = torch.finfo(pairs[0].A.dtype).eps
        self.pairs = [KronFactors(A.double(), G.double()) for A, G in pairs]
        self.ref = ref

    def inner(self, ref: _Reference) -> float:
        return sum(ref.inner_kron(A, G) for A, G in self.pairs)

    def norm_sq(self) -> float:
        return sum(
            float((A1 * A2).sum() * (G1 * G2).sum())
            for A1, G1 in self.pairs
            for A2, G2 in self.pairs
        )

    def top(self, k: int) -> Tensor:
        if len(self.pairs) == 1:
            A, G = self.pairs[0]
            w_a, w_g = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(G)
            return _top(w_g.unsqueeze(1) * w_a.unsqueeze(0), k)

        pairs = self.pairs
        q_a, q_g = self.ref.spans()
        reduced = [KronFactors(q_a.T @ A @ q_a, q_g.T @ G @ q_g) for A, G in pairs]

        def inside(x: Tensor, basis: Tensor, small: Tensor) -> bool:
            residual = torch.linalg.matrix_norm(basis @ small @ basis.T - x)
            return float(residual) <= 1e3 * self.eps * float(torch.linalg.matrix_norm(x))

        if all(
            inside(A, q_a, r.A) and inside(G, q_g, r.G)
            for r, (A, G) in zip(reduced, pairs, strict=True)
        ):  # F̂ = (Q_a ⊗ Q_g)(Σ_k Ã_k ⊗ G̃_k)(Q_a ⊗ Q_g)ᵀ: the same nonzero spectrum
            pairs = reduced

        def matvec(X: Tensor) -> Tensor:
            return sum(G @ X @ A.T for A, G in pairs)

        A, G = pairs[0]
        start = torch.linalg.eigh(G)[1][:, -1:] @ torch.linalg.eigh(A)[1][:, -1:].T
        return _operator_top(matvec, start, k)


class _Blocks:
    """``F̂ = blockdiag(P_j)``, one ``[a, a]`` block per output neuron (MBF)."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks.double()

    def inner(self, ref: _Reference) -> float:
        return ref.inner_blocks(self.blocks)

    def norm_sq(self) -> float:
        return float(self.blocks.square().sum())

    def top(self, k: int) -> Tensor:
        return _top(torch.linalg.eigvalsh(self.blocks), k)


class _OwnBlocks:
    """``F̂ = blockdiag(F_jj)``, the mini-blocks of ``F`` itself (MBF-exact)."""

    def __init__(self, ref: _Reference) -> None:
        self.ref = ref

    def inner(self, ref: _Reference) -> float:
        return ref.own_blocks_norm_sq()

    def norm_sq(self) -> float:
        return self.ref.own_blocks_norm_sq()

    def top(self, k: int) -> Tensor:
        """The union of the blocks' eigenvalues; ``F_jj`` shares its nonzero eigenvalues with
        the ``[m, m]`` kernel ``(1/m) diag(√γ_j) Ā Āᵀ diag(√γ_j)``, used when ``m < a``."""
        ref = self.ref
        (m, a), g = ref.a.shape, ref.gamma_diag.shape[1]
        size = min(m, a)
        chunk = max(1, _CHUNK_BYTES // (8 * size * size))
        gram = ref.a @ ref.a.T
        best = ref.a.new_zeros(0)
        for start in range(0, g, chunk):
            stop = min(g, start + chunk)
            if m < a:
                root = ref.gamma_diag[:, start:stop].T.sqrt()
                blocks = root.unsqueeze(2) * gram * root.unsqueeze(1) / m
            else:
                blocks = ref.own_blocks(start, stop)
            best = _top(torch.cat([best, torch.linalg.eigvalsh(blocks).flatten()]), k)
        return best


class _Itself:
    """``F̂ = F`` (BDF)."""

    def __init__(self, ref: _Reference) -> None:
        self.ref = ref

    def inner(self, ref: _Reference) -> float:
        return ref.norm_sq

    def norm_sq(self) -> float:
        return self.ref.norm_sq

    def top(self, k: int) -> Tensor:
        return self.ref.top(k)


# ----------------------------------------------------------------------------- one batch
def _check_names(methods: Sequence[str] | str) -> tuple[str, ...]:
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [name for name in names if name not in APPROXIMATED]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(
            f"methods must be distinct names from {list(APPROXIMATED)} (the registry methods "
            f"whose matrix approximates the Fisher), got {list(names)}."
        )
    return names


class SkippedLayersWarning(UserWarning):
    """Layers with parameters that an analysis leaves out, named in the message."""


def _check_fisher(fisher: str) -> None:
    check_fisher_kind(fisher, "fisher", tuple(_KINDS))


def _linear_layers(layouts: Mapping[str, LayerLayout], layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        chosen = [name for name, layout in layouts.items() if layout.kind == "linear"]
        if not chosen:
            raise UnsupportedModuleError(
                "the model has no nn.Linear layer; the Fisher-approximation errors cover "
                "Linear layers (METHODS.md §6.1)."
            )
        left_out = [
            f"{name} ({layout.kind})" for name, layout in layouts.items() if layout.kind != "linear"
        ]
        if left_out:
            warnings.warn(
                f"the Fisher-approximation errors cover nn.Linear layers only so far; these "
                f"layers have no rows: {', '.join(left_out)}. Pass layers=[...] (--layers) of "
                "Linear layers to choose them explicitly.",
                SkippedLayersWarning,
                stacklevel=3,
            )
        return chosen
    chosen = [layers] if isinstance(layers, str) else list(layers)
    for name in chosen:
        if name not in layouts:
            raise UnknownNameError(
                f"unknown layer {name!r}; the model's layers are {list(layouts)}."
            )
        if layouts[name].kind != "linear":
            raise UnsupportedModuleError(
                f"layer {name!r} is not an nn.Linear layer ({layouts[name].kind}); the "
                "Fisher-approximation errors cover Linear layers (METHODS.md §6.1)."
            )
    return chosen


def _build(
    names: Sequence[str], fisher: str, options: Mapping[str, Mapping[str, Any]]
) -> dict[str, Method]:
    """Fresh methods: one-shot ones (``bdf`` and ``mbf-exact`` are built for their
    configuration: their ``F̂`` comes from the reference) and the :data:`CARRIED` ones with
    their own configuration (``inverse_period`` :data:`_NEVER` unless given)."""
    stray = sorted(set(options) - set(names))
    if stray:
        raise ConfigError(f"method_options given for {stray}, which are not compared: {names}.")
    per_method = {}
    for name in names:
        opts = dict(options.get(name, {}))
        if name in _WITH_FISHER:
            if "fisher" in opts:
                raise ConfigError(
                    f"method_options[{name!r}] sets 'fisher'; the analysis sets it for every "
                    "method at once (fisher=...)."
                )
            opts["fisher"] = fisher
        per_method[name] = opts
    one_shot = [name for name in names if name not in CARRIED]
    built = registry.build_methods(one_shot, **{n: per_method[n] for n in one_shot})
    for method in built.values():
        method.config = method.config.one_shot()
    for name in names:
        if name in CARRIED:
            opts = {"inverse_period": _NEVER, **per_method[name]}
            built[name] = registry.get(CARRIED[name], **opts)
    return {name: built[name] for name in names}


def _plan(method: MBF, layouts: Mapping[str, LayerLayout], layer: str) -> BlockPlan:
    """The method's block plan of ``layer``. MBF-exact is not updated (its ``F̂`` comes from the
    reference), and its plan depends on its configuration and the layouts only."""
    if method.layouts is None:
        method.layouts = dict(layouts)
    return next(p for p in method.plans() if p.layer == layer)


def _factored(
    name: str, method: Method, ref: _Reference, layer: str, layouts: Mapping[str, LayerLayout]
) -> _KronSum | _Blocks | _OwnBlocks | _Itself:
    """The factored ``F̂`` of one method and layer."""
    if name == "bdf":
        return _Itself(ref)
    if isinstance(method, KFAC | KroneckerSVD):
        return _KronSum(method.kronecker_factors(layer), ref)
    plan = _plan(method, layouts, layer)
    if method.config.block_size_one:
        raise ConfigError(
            f"{name} with block_size_one=True is compared densely only; layer {layer!r} has "
            f"{layouts[layer].dim} parameters, above max_dense_dim."
        )
    g = plan.count
    eye = ref.a.new_zeros(g, g).fill_diagonal_(1.0)
    if name == "mbf-exact":
        if plan.mode == "shared":
            shared = (ref.gamma_diag.sum(1).unsqueeze(1) * ref.a).T @ ref.a / (ref.m * g)
            return _KronSum([KronFactors(shared, eye)], ref)
        return _OwnBlocks(ref)
    blocks = method.state[plan.key]["F"]
    if plan.mode == "shared":
        return _KronSum([KronFactors(blocks[0], eye)], ref)
    return _Blocks(blocks)


def _dense_approximation(
    name: str, method: Method, dense: Tensor, layer: str, layouts: Mapping[str, LayerLayout]
) -> Tensor:
    if name == "bdf":
        return dense
    if name != "mbf-exact":
        return method.matrix(layer).double()
    if method.config.block_size_one:
        return torch.diag(dense.diagonal())
    layout = layouts[layer]
    blocks = layout.extract_blocks(dense)
    if _plan(method, layouts, layer).mode == "shared":
        blocks = {key: b.mean(0, keepdim=True).expand_as(b) for key, b in blocks.items()}
    return layout.blockdiag(blocks)


def _relative(numerator_sq: float, denominator_sq: float) -> float:
    if denominator_sq == 0.0:
        return 0.0 if numerator_sq == 0.0 else math.inf
    return math.sqrt(max(numerator_sq, 0.0) / denominator_sq)


def _scaled(
    residual_sq: float, norm_sq: float, inner: float, approx_sq: float
) -> tuple[float, float]:
    """``(scale, scaled_error)`` from ``‖F − F̂‖²``, ``‖F‖²``, ``⟨F, F̂⟩`` and ``‖F̂‖²``:
    ``α = ⟨F, F̂⟩/‖F̂‖²`` and ``‖F − αF̂‖² = ‖F − F̂‖² − ‖F̂‖²(1 − α)²`` relative to ``‖F‖²``
    (``F̂ = 0``: ``α = 0``, the residual is ``‖F‖²``)."""
    if approx_sq == 0.0:
        return 0.0, _relative(norm_sq, norm_sq)
    scale = inner / approx_sq
    return scale, _relative(residual_sq - (approx_sq - inner) ** 2 / approx_sq, norm_sq)


def approximation_errors(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    methods: Sequence[str] | str = DEFAULT_APPROXIMATIONS,
    *,
    fisher: str = "mc",
    layers: Sequence[str] | str | None = None,
    top_k: int = 10,
    max_dense_dim: int = 2048,
    generator: torch.Generator | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    memory_budget: int | None = None,
    carried: Mapping[str, Method] | None = None,
) -> pd.DataFrame:
    """Per Linear layer and method, the error of the method's one-shot ``F̂`` against ``F``.

    One collection pass (:func:`~mbf_analysis.curvature.collect.collect`) gives every method's
    statistics and the reference's per-sample factors; the methods run in one-shot form
    (:meth:`~mbf_analysis.methods.MethodConfig.one_shot`), except the :data:`CARRIED` ones,
    which are compared as given in ``carried`` (this batch does not update them). See the
    module docstring for the quantities and the two paths.

    Args:
        model: The network (the Kronecker-SVD methods refuse a model with a Conv2d layer).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: ``[m, *in_shape]``.
        targets: ``[m]`` or ``[m, *out_shape]``.
        methods: Names from :data:`APPROXIMATED` (default :data:`DEFAULT_APPROXIMATIONS`).
        fisher: ``"mc"``, ``"empirical"`` or ``"exact"``: the kind of the reference and of
            every method's Fisher.
        layers: Linear layers to compare (default: every Linear layer).
        top_k: Number of leading singular values compared (0: skip, ``singular_error`` NaN).
        max_dense_dim: Layers with at most this many parameters are compared densely.
        generator: Randomness of the sampled labels.
        method_options: Method name → its configuration fields (e.g.
            ``{"lanczos": {"lanczos_steps": 4}}``); ``fisher`` is set by the analysis.
        memory_budget: Bytes for the exact-Fisher pass (see ``collect``).
        carried: :data:`CARRIED` name → its MBF method as a trajectory carries it, updated up to
            this batch (:class:`ApproximationRun` passes its own); needed for every carried
            name in ``methods``.

    Returns:
        A tidy frame with :data:`ERROR_COLUMNS`, one row per layer and method, in that order.

    Raises:
        ValueError: For an unknown method or Fisher kind, a bad ``top_k``, or a carried method
            that ``carried`` lacks (it has no one-shot form: it needs a trajectory).
        UnsupportedModuleError: For a layer that is not Linear (and, from the Kronecker-SVD
            methods, for a model with a Conv2d layer).
    """
    names = _check_names(methods)
    _check_fisher(fisher)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k must be an integer ≥ 0, got {top_k!r}.")
    layouts = model_layouts(model)
    chosen = _linear_layers(layouts, layers)
    built = _build(names, fisher, method_options or {})
    carried = carried or {}
    lacking = [name for name in names if name in CARRIED and name not in carried]
    if lacking:
        raise ConfigError(
            f"{lacking} are MBF's EMA along a training trajectory and have no one-shot form; "
            "record them with ApproximationRun or mbf-analyze error (or pass carried=...)."
        )
    built.update({name: carried[name] for name in names if name in CARRIED})
    fresh = [name for name in names if name not in _FROM_REFERENCE and name not in CARRIED]
    needs = frozenset().union(*(built[name].needs for name in fresh))
    stats = collect(
        model,
        loss_fn,
        inputs,
        targets,
        needs | {_KINDS[fisher]},
        generator=generator,
        memory_budget=memory_budget,
    )
    for name in fresh:
        built[name].update(stats)
    samples = stats.statistic(_KINDS[fisher])
    rows = []
    for layer in chosen:
        ref = _Reference(samples[layer])
        dense_path = layouts[layer].dim <= max_dense_dim
        dense = ref.dense() if dense_path else None
        ref_top = None
        if top_k:
            ref_top = _top(torch.linalg.eigvalsh(dense), top_k) if dense_path else ref.top(top_k)
        for name in names:
            method = built[name]
            if dense_path:
                approx = _dense_approximation(name, method, dense, layer, layouts)
                residual = float((dense - approx).square().sum())
                inner, approx_sq = float((dense * approx).sum()), float(approx.square().sum())
                approx_top = _top(torch.linalg.eigvalsh(approx), top_k) if top_k else None
            else:
                factored = _factored(name, method, ref, layer, layouts)
                inner, approx_sq = factored.inner(ref), factored.norm_sq()
                residual = 0.0 if name == "bdf" else ref.norm_sq - 2 * inner + approx_sq
                approx_top = factored.top(top_k) if top_k else None
            error = _relative(residual, ref.norm_sq)
            scale, scaled_error = _scaled(residual, ref.norm_sq, inner, approx_sq)
            singular = math.nan
            if top_k:
                singular = _relative(
                    float((approx_top - ref_top).square().sum()), float(ref_top.square().sum())
                )
            clamped = 0
            if isinstance(method, KroneckerSVD):
                clamped = method.diagnostics()[layer]["clamped"]
            rows.append(
                {
                    "layer": layer,
                    "method": name,
                    "fisher": fisher,
                    "error": error,
                    "scale": scale,
                    "scaled_error": scaled_error,
                    "singular_error": singular,
                    "clamped": clamped,
                    "fisher_norm": math.sqrt(ref.norm_sq),
                    "path": "dense" if dense_path else "factored",
                }
            )
    return pd.DataFrame(rows, columns=list(ERROR_COLUMNS))


# ----------------------------------------------------------------------------- trajectory
def _optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    }


def _positive_int(config: object, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"ApproximationConfig.{name} must be a positive integer, got {value!r}.")


@dataclass(kw_only=True)
class ApproximationConfig:
    """Settings of the trajectory form (:class:`ApproximationRun`).

    Attributes:
        methods: Names from :data:`APPROXIMATED`.
        fisher: ``"mc"``, ``"empirical"`` or ``"exact"``.
        iterations: Training iterations :meth:`ApproximationRun.run` does by default.
        every: Errors are recorded at iterations ``k ≡ 0 (mod every)``, before the step.
        batch_size: Training minibatch size ``m``.
        fisher_batch_size: Samples of the minibatch (its first ones) on which the errors are
            computed; ``None``: all ``m``.
        optimizer: A ``torch.optim`` class name, case-insensitive (``"adam"``, ``"sgd"``, ...).
        lr: Its learning rate.
        optimizer_options: Further keyword arguments of the optimizer.
        layers: Linear layers to record (``None``: all).
        top_k: As for :func:`approximation_errors`.
        max_dense_dim: As for :func:`approximation_errors`.
        seed: Seed (``≥ 0``) of the minibatch order and of the sampled labels.
        method_options: As for :func:`approximation_errors`; a :data:`CARRIED` method takes
            the fields of :class:`~mbf_analysis.methods.MBFConfig` (``decay`` ``β``, default
            0.9; ``stat_period`` ``T1``, default 1).
    """

    methods: Sequence[str] = DEFAULT_APPROXIMATIONS
    fisher: str = "mc"
    iterations: int = 1000
    every: int = 100
    batch_size: int = 512
    fisher_batch_size: int | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    layers: Sequence[str] | None = None
    top_k: int = 10
    max_dense_dim: int = 2048
    seed: int = 0
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = _check_names(self.methods)
        _check_fisher(self.fisher)
        for name in ("iterations", "every", "batch_size"):
            _positive_int(self, name)
        if self.fisher_batch_size is not None:
            _positive_int(self, "fisher_batch_size")
            if self.fisher_batch_size > self.batch_size:
                raise ConfigError(
                    f"ApproximationConfig.fisher_batch_size {self.fisher_batch_size} exceeds "
                    f"batch_size {self.batch_size}."
                )
        if self.optimizer.lower() not in _optimizers():
            raise ConfigError(
                f"ApproximationConfig.optimizer {self.optimizer!r} is not a torch.optim "
                f"optimizer; choose from {sorted(_optimizers())}."
            )
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or self.lr <= 0:
            raise ConfigError(f"ApproximationConfig.lr must be a number > 0, got {self.lr!r}.")
        self.optimizer_options = dict(self.optimizer_options)
        if self.layers is not None:
            self.layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(
                f"ApproximationConfig.top_k must be an integer ≥ 0, got {self.top_k}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(
                f"ApproximationConfig.seed must be an integer ≥ 0, got {self.seed!r}."
            )
        self.method_options = {name: dict(opts) for name, opts in self.method_options.items()}
        _build(self.methods, self.fisher, self.method_options)


class ApproximationRun:
    """Fisher-approximation errors along a training trajectory (module docstring).

    Per iteration ``k``: draw a minibatch (a fresh permutation of the ``N`` samples every epoch,
    the last ``N mod m`` dropped, as :class:`~mbf_analysis.analysis.cosine.CosineRun`); fold
    it into the :data:`CARRIED` methods (MBF's own :meth:`~mbf_analysis.methods.Method.update`
    on the whole minibatch at ``θ_k``: ``F_b ← β F_b + (1 − β) ḡ_b ḡ_bᵀ`` when
    ``k ≡ 0 (mod T1)``, so that a record at ``k`` sees the matrix MBF's step ``k`` inverts);
    when ``k ≡ 0 (mod every)``, record :func:`approximation_errors` on its first
    ``fisher_batch_size`` samples at ``θ_k``; then take one optimizer step on the minibatch
    loss ``L = (1/m) Σ_n ℓ_n`` (METHODS §1 convention, e.g. ``½‖f − y‖²`` for MSE). The model
    is trained in place. The carried methods' sampled labels (``mbf-true-ema``) have their own
    random stream, so adding them changes no other row.

    Args:
        model, loss_fn: The network (trained in place) and its loss.
        inputs: Training inputs ``[N, *in_shape]``.
        targets: Training targets ``[N]`` or ``[N, *out_shape]``.
        config: The settings (default :class:`ApproximationConfig`).

    Attributes:
        iteration: ``k`` of the next iteration (the number of optimizer steps taken).
        optimizer: The torch optimizer.
        carried: :data:`CARRIED` name → its :class:`~mbf_analysis.methods.MBF` method, updated
            through iteration ``k − 1`` (``method.matrix(layer)`` is its ``blockdiag(F_b)``).

    Raises:
        ValueError: For mismatched inputs/targets or a batch size above ``N``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        config: ApproximationConfig | None = None,
    ) -> None:
        self.config = config or ApproximationConfig()
        if len(inputs) != len(targets):
            raise ConfigError(
                f"inputs and targets differ in length: {len(inputs)} vs {len(targets)}."
            )
        if self.config.batch_size > len(inputs):
            raise ConfigError(
                f"ApproximationConfig.batch_size {self.config.batch_size} exceeds the "
                f"{len(inputs)} training samples."
            )
        _linear_layers(model_layouts(model), self.config.layers)
        self.model, self.loss_fn = model, loss_fn
        self.inputs, self.targets = inputs, targets
        cls = _optimizers()[self.config.optimizer.lower()]
        self.optimizer = cls(model.parameters(), lr=self.config.lr, **self.config.optimizer_options)
        self.iteration = 0
        device = next(model.parameters()).device
        seeds = np.random.SeedSequence(self.config.seed).generate_state(3)
        batch_seed, label_seed, carried_seed = (int(seed) for seed in seeds)
        self._batch_generator = torch.Generator().manual_seed(batch_seed)
        self._label_generator = torch.Generator(device=device).manual_seed(label_seed)
        self._carried_generator = torch.Generator(device=device).manual_seed(carried_seed)
        built = _build(self.config.methods, self.config.fisher, self.config.method_options)
        self.carried = {name: built[name] for name in self.config.methods if name in CARRIED}
        self._permutation: Tensor | None = None
        self._position = 0

    def run(
        self,
        n_iterations: int | None = None,
        *,
        on_record: Callable[[pd.DataFrame], None] | None = None,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Do ``n_iterations`` more iterations (default :attr:`ApproximationConfig.iterations`).

        Args:
            n_iterations: Number of iterations, ``≥ 0``.
            on_record: Called with each record's rows (:data:`TRAJECTORY_COLUMNS`), e.g. to
                append them to a CSV file as they come.
            progress: Show a tqdm bar.

        Returns:
            The rows recorded by this call (:data:`TRAJECTORY_COLUMNS`); ``loss`` is the
            minibatch loss at the recorded iterate.

        Raises:
            NonFiniteError: When the training loss is NaN or Inf.
            StopRequested: After Ctrl-C or SIGTERM (a ``KeyboardInterrupt``,
                :mod:`mbf_analysis.stopping`), raised once the iteration in progress is whole
                and its rows have gone to ``on_record``: :meth:`state_dict` and another
                :meth:`run` then continue exactly. A second Ctrl-C stops at once and may leave
                the runner inside an iteration; continue from a saved :meth:`state_dict` then.
        """
        n = self.config.iterations if n_iterations is None else n_iterations
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_iterations must be an integer ≥ 0, got {n!r}.")
        frames = []
        bar = tqdm(range(n), desc="Fisher-approximation errors", disable=not progress)
        with stop_requests() as stop:
            for _ in bar:
                frame, loss = self._iterate()
                bar.set_postfix(loss=f"{loss:.4g}")
                if frame is not None:
                    frames.append(frame)
                    if on_record is not None:
                        on_record(frame)
                stop.check()
        if not frames:
            return pd.DataFrame(columns=list(TRAJECTORY_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        size = self.config.batch_size
        if self._permutation is None or self._position + size > len(self._permutation):
            self._permutation = torch.randperm(len(self.inputs), generator=self._batch_generator)
            self._position = 0
        index = self._permutation[self._position : self._position + size]
        self._position += size
        return self.inputs[index.to(self.inputs.device)], self.targets[
            index.to(self.targets.device)
        ]

    def _iterate(self) -> tuple[pd.DataFrame | None, float]:
        cfg = self.config
        k = self.iteration
        inputs, targets = self._next_batch()
        likelihood, inputs, targets = prepare_batch(self.model, self.loss_fn, inputs, targets)
        frame = None
        with torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            loss = likelihood.per_sample_loss(self.model(inputs), targets).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the training loss is {value} at iteration {k}; lower the learning rate "
                f"(now {cfg.lr:g})."
            )
        if self.carried:
            self._update_carried(inputs, targets)
        if k % cfg.every == 0:
            count = cfg.fisher_batch_size or len(inputs)
            frame = approximation_errors(
                self.model,
                self.loss_fn,
                inputs[:count],
                targets[:count],
                cfg.methods,
                fisher=cfg.fisher,
                layers=cfg.layers,
                top_k=cfg.top_k,
                max_dense_dim=cfg.max_dense_dim,
                generator=self._label_generator,
                method_options=cfg.method_options,
                carried=self.carried,
            )
            frame.insert(0, "loss", value)
            frame.insert(0, "iteration", k)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return frame, value

    def _update_carried(self, inputs: Tensor, targets: Tensor) -> None:
        """One :meth:`~mbf_analysis.methods.Method.update` of every carried method on the
        minibatch, from one collection pass of the statistics their next update reads."""
        needs = frozenset().union(*(m.next_needs() for m in self.carried.values()))
        stats = collect(
            self.model,
            self.loss_fn,
            inputs,
            targets,
            needs,
            generator=self._carried_generator,
        )
        for method in self.carried.values():
            method.update(stats)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue identically (``torch.save``-able).

        Returns:
            ``{"iteration", "config", "model", "optimizer", "batch_generator",
            "label_generator", "permutation", "position", "carried", "carried_generator"}``
            (``carried``: name → the carried method's state dict).
        """
        return {
            "iteration": self.iteration,
            "config": asdict(self.config),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "batch_generator": self._batch_generator.get_state(),
            "label_generator": self._label_generator.get_state(),
            "permutation": None if self._permutation is None else self._permutation.clone(),
            "position": self._position,
            "carried": {name: method.state_dict() for name, method in self.carried.items()},
            "carried_generator": self._carried_generator.get_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (model, optimizer, carried methods, generators, iteration
        counter).

        Raises:
            ValueError: If the state was saved with other methods or another optimizer.
        """
        saved = dict(state_dict["config"])
        if saved.get("fisher") in OLD_SPELLINGS:  # a state saved before the kinds were renamed
            saved["fisher"] = OLD_SPELLINGS[saved["fisher"]]
        for key in ("methods", "optimizer"):
            ours = getattr(self.config, key)
            theirs = saved[key]
            if (tuple(theirs) if key == "methods" else theirs) != ours:
                raise ConfigError(
                    f"the state was saved with {key} {theirs!r}; this run uses {ours!r}."
                )
        ours = asdict(self.config)
        changed = sorted(k for k in ours if k != "iterations" and saved.get(k) != ours[k])
        if changed:
            logger.warning("resuming with changed settings %s; the run will not match", changed)
        self.model.load_state_dict(state_dict["model"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._batch_generator.set_state(state_dict["batch_generator"])
        self._label_generator.set_state(state_dict["label_generator"])
        permutation = state_dict["permutation"]
        self._permutation = None if permutation is None else permutation.clone()
        self._position = int(state_dict["position"])
        self.iteration = int(state_dict["iteration"])
        for name, method in self.carried.items():
            method.load_state_dict(state_dict["carried"][name])
        if self.carried:
            self._carried_generator.set_state(state_dict["carried_generator"])


def approximation_trajectory(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    on_record: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = True,
    **config: Any,
) -> pd.DataFrame:
    """Run the whole trajectory form on a copy of ``model`` (the caller's model is untouched).

    Args:
        model, loss_fn, inputs, targets: As for :class:`ApproximationRun`.
        on_record, progress: As for :meth:`ApproximationRun.run`.
        **config: Fields of :class:`ApproximationConfig`.

    Returns:
        The records of :attr:`ApproximationConfig.iterations` iterations.
    """
    run = ApproximationRun(
        copy.deepcopy(model), loss_fn, inputs, targets, ApproximationConfig(**config)
    )
    return run.run(on_record=on_record, progress=progress)
