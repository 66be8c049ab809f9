r"""Kronecker factors of KFAC / KFC and their dense and factored use (METHODS.md §4).

For a Linear or Conv2d layer with homogeneous input ``ā = [a; 1]`` (``a`` without the ``1`` when
the layer has no bias) and pre-activation gradient ``δ = ∂ℓ_n/∂s`` (unscaled, METHODS §1),
KFAC (Martens & Grosse 2015) approximates the layer's Fisher block for ``vec(W̄)``, ``W̄ = [W b]``
column-stacked, by ``A ⊗ G`` with

.. math::

    A = \frac{1}{m} \sum_{n=1}^{m} \sum_{t=1}^{T} \bar a_{n,t} \bar a_{n,t}^\top, \qquad
    G = \frac{1}{m T} \sum_{n=1}^{m} \sum_{t=1}^{T} \delta_{n,t} \delta_{n,t}^\top .

For a Linear layer on ``[m, n_in]`` inputs ``T = 1``. For Conv2d (KFC, Grosse & Martens 2016)
``t`` runs over the ``T = o_h·o_w`` output locations, ``ā_{n,t}`` is the unfolded input patch
(``torch.nn.functional.unfold`` order: ``c_in``-major, then ``k_h``, ``k_w``, which is the
row-major flatten of a kernel slice ``W[o]``) with a ``1`` appended for the bias, and
``δ_{n,t}`` the output gradient at location ``t``. This is KFC's scaling: ``Ω = A`` sums over
locations, ``Γ = G`` averages over them. Linear layers applied to ``[m, *, n_in]`` inputs are
treated the same way, with ``T`` the product of the middle dimensions.

**Relation to curvlinops** (``KFACLinearOperator``, ``kfac_approx="expand"``,
``separate_weight_and_bias=False``, a ``reduction="mean"`` loss): curvlinops divides the input
covariance by ``m T`` and multiplies the gradient covariance by ``1/m``, so

.. math::

    A_{\mathrm{curvlinops}} = A / T, \qquad G_{\mathrm{curvlinops}} = T \, G,

and the Kronecker products agree exactly (``T = 1`` for Linear layers), for the empirical and
the sampled-label (``fisher_type="mc"``) variants alike; with the same seed both draw the same
labels. For ``MSELoss(reduction="mean")`` curvlinops' per-sample loss is ``(1/C)‖f − y‖²``
(``C`` outputs), ours ``½‖f − y‖²``: its empirical ``G`` is ``4/C`` times ours, its sampled-label
``G`` ``2/C`` times ours (the ratio of the output Hessians, ``(2/C) I`` and ``I``).

Index conventions: ``m`` samples, ``T`` locations per sample, ``a`` the input side
(``n_in (+1)`` or ``C_in·k_h·k_w (+1)``), ``g`` the output side (``n_out`` or ``C_out``), ``d``
the layer's parameter count; ``V``, ``X`` are weight-shaped ``[*, g, a]`` matrices ``W̄``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mbf_analysis.errors import NonFiniteError, UnsupportedModuleError
from mbf_analysis.layout import LayerLayout
from mbf_analysis.linalg import add_gram_, damped_inverse, split_damping_pi, symmetrize

__all__ = [
    "KronFactors",
    "KronSamples",
    "factor_eigh",
    "per_sample_inputs",
    "KFAC_MODULES",
    "check_kfac_module",
    "conv_padding",
    "input_factor",
    "output_factor",
    "to_matrix",
    "from_matrix",
    "kron_layout_matrix",
    "EigenInverse",
    "SplitInverse",
    "eigen_inverse",
    "split_inverse",
    "apply_eigen_inverse",
    "apply_split_inverse",
]

KFAC_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
"""Modules that have Kronecker factors."""


class KronFactors(NamedTuple):
    """The Kronecker factors of one layer: ``F_l ≈ A ⊗ G``.

    Attributes:
        A: Input side, ``[a, a]``.
        G: Output side, ``[g, g]``.
    """

    A: Tensor
    G: Tensor


class KronSamples(NamedTuple):
    r"""The per-sample factors of a Linear layer's Fisher block (METHODS.md §6.1).

    .. math::

        F = \frac{1}{m} \sum_{n=1}^{m} (\bar a_n \bar a_n^\top) \otimes \Gamma_n, \qquad
        \Gamma_n = \sum_{c=1}^{r} \delta_{nc} \delta_{nc}^\top,

    for ``vec(W̄)`` column-stacked, with ``r = 1`` row per sample (real or sampled labels:
    ``Γ_n = δ_n δ_nᵀ``) or the ``r = C`` rows of the exact Fisher. The per-sample gradient row
    ``c`` of sample ``n`` is ``δ_nc ā_nᵀ``, i.e. ``δ_nc ⊗ ā_n`` in the layer's METHODS §2 order.
    ``δ`` is unscaled (``∂ℓ_n/∂s``, METHODS §1), the convention of :func:`output_factor`.

    Attributes:
        a: ``ā_n``, ``[m, a]``, with the homogeneous ``1`` last when the layer has a bias.
        delta: ``δ_n``, ``[m, g]``, or ``[m, r, g]`` with ``r`` rows per sample.
    """

    a: Tensor
    delta: Tensor

    @property
    def rows(self) -> Tensor:
        """``δ`` as ``[m, r, g]`` (``r = 1`` for a ``[m, g]`` ``delta``)."""
        return self.delta.unsqueeze(1) if self.delta.dim() == 2 else self.delta

    def head(self, count: int) -> KronSamples:
        """The factors of the first ``count`` samples."""
        return KronSamples(self.a[:count], self.delta[:count])


def check_kfac_module(name: str, module: nn.Module) -> None:
    """Refuse Linear/Conv2d configurations the factors do not cover.

    Raises:
        UnsupportedModuleError: For grouped convolutions, non-zero padding modes and "same"
            padding that is not symmetric.
    """
    if not isinstance(module, nn.Conv2d):
        return
    if module.groups != 1:
        raise UnsupportedModuleError(
            f"KFAC factors of module '{name}' (Conv2d with groups={module.groups}) are not "
            "supported; only groups=1 has one Kronecker product per layer."
        )
    if module.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"KFAC factors of module '{name}' need padding_mode='zeros', got "
            f"{module.padding_mode!r}."
        )
    conv_padding(name, module)


def conv_padding(name: str, module: nn.Conv2d, what: str = "KFAC factors") -> tuple[int, int]:
    """The integer padding ``(p_h, p_w)``, equal on both sides, that ``module.padding`` stands for.

    ``"valid"`` is ``(0, 0)``. ``"same"`` (stride 1) pads ``t = d·(k − 1)`` in total along a
    dimension with kernel size ``k`` and dilation ``d``, ``⌊t/2⌋`` before and ``t − ⌊t/2⌋`` after;
    that is ``p = t/2`` on both sides when ``t`` is even.

    Args:
        name: The module's name, for the error message.
        module: The layer.
        what: The quantity that needs the padding, for the error message.

    Raises:
        UnsupportedModuleError: For ``"same"`` with an odd ``t``, which pads one row or column
            more after than before; the message gives the equivalent ``nn.ZeroPad2d``.
    """
    if not isinstance(module.padding, str):
        return module.padding
    if module.padding == "valid":
        return (0, 0)
    t_h, t_w = (d * (k - 1) for k, d in zip(module.kernel_size, module.dilation, strict=True))
    if t_h % 2 or t_w % 2:
        pad = (t_w // 2, t_w - t_w // 2, t_h // 2, t_h - t_h // 2)
        raise UnsupportedModuleError(
            f"{what} of module '{name}': padding='same' is asymmetric for kernel "
            f"{module.kernel_size} and dilation {module.dilation} (dilation·(k − 1) is odd), "
            f"which no integer padding expresses. Use nn.ZeroPad2d({pad}) before the layer and "
            "padding=0: the same padding PyTorch applies."
        )
    return (t_h // 2, t_w // 2)


def _input_columns(module: nn.Module, x: Tensor) -> Tensor:
    """Layer inputs as columns ``[a', m·T]`` (without the homogeneous coordinate).

    For Conv2d, column ``(n, t)`` is the patch that :func:`torch.nn.functional.unfold` extracts
    for sample ``n`` and output location ``t`` (rows ``c_in``-major, then ``k_h``, ``k_w``). It is
    assembled from one strided slice of the padded input per kernel offset, which is several
    times faster than ``unfold`` on CPU and gives the same numbers.
    """
    if not isinstance(module, nn.Conv2d):
        return x.reshape(-1, x.shape[-1]).T
    (k_h, k_w), (s_h, s_w), (d_h, d_w) = module.kernel_size, module.stride, module.dilation
    p_h, p_w = conv_padding("", module)
    padded = nn.functional.pad(x, (p_w, p_w, p_h, p_h)).transpose(0, 1)
    o_h = (padded.shape[2] - d_h * (k_h - 1) - 1) // s_h + 1
    o_w = (padded.shape[3] - d_w * (k_w - 1) - 1) // s_w + 1
    slices = [
        padded[:, :, i * d_h : i * d_h + s_h * (o_h - 1) + 1 : s_h, j * d_w :: s_w][..., :o_w]
        for i in range(k_h)
        for j in range(k_w)
    ]
    return torch.stack(slices, dim=1).reshape(x.shape[1] * k_h * k_w, -1)


def input_factor(module: nn.Module, x: Tensor) -> Tensor:
    """``A = (1/m) Σ_n Σ_t ā_{n,t} ā_{n,t}ᵀ`` from a layer's input (module docstring).

    Args:
        module: The Linear or Conv2d layer.
        x: Its input, ``[m, n_in]``, ``[m, *, n_in]`` or ``[m, C_in, H, W]``.

    Returns:
        ``[a, a]``, with the homogeneous coordinate last when the layer has a bias.
    """
    m = x.shape[0]
    bias = module.bias is not None
    if bias and not isinstance(module, nn.Conv2d):  # small inputs: append the 1 and take one Gram
        rows = x.detach().reshape(-1, x.shape[-1])
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return add_gram_(rows.new_zeros(rows.shape[1], rows.shape[1]), rows.T, alpha=1.0 / m)
    columns = _input_columns(module, x.detach())
    n = columns.shape[0]
    out = columns.new_zeros(n + bias, n + bias)
    add_gram_(out[:n, :n], columns, alpha=1.0 / m)  # (1/m) columns columnsᵀ, symmetric
    if bias:
        total = columns.sum(1) / m
        out[:n, n] = total
        out[n, :n] = total
        out[n, n] = columns.shape[1] / m
    return out


def per_sample_inputs(name: str, module: nn.Linear, x: Tensor) -> Tensor:
    """The homogeneous per-sample inputs ``ā_n = [a_n; 1]`` of a Linear layer.

    Args:
        name: The layer's name, for the error message.
        module: The Linear layer.
        x: Its input, ``[m, n_in]``.

    Returns:
        ``[m, a]`` (detached; ``a = n_in + 1``, or ``n_in`` without bias).

    Raises:
        UnsupportedModuleError: For an input that is not ``[m, n_in]`` (a Linear layer applied
            to ``[m, *, n_in]`` has no per-sample Kronecker structure ``ā_n ⊗ δ_n``).
    """
    if x.dim() != 2:
        raise UnsupportedModuleError(
            f"per-sample Kronecker factors of module '{name}' (Linear) need inputs of shape "
            f"[m, n_in], got {tuple(x.shape)}; a Linear layer applied along extra dimensions "
            "sums T Kronecker products per sample. Flatten the extra dimensions into the batch "
            "or use KFAC."
        )
    x = x.detach()
    if module.bias is None:
        return x
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def output_factor(module: nn.Module, grad_output: Tensor) -> Tensor:
    """``G = (1/(m T)) Σ_n Σ_t δ_{n,t} δ_{n,t}ᵀ`` from the gradient of a layer's output.

    Args:
        module: The Linear or Conv2d layer.
        grad_output: ``δ``, the gradient of the sum of the per-sample losses ``Σ_n ℓ_n`` with
            respect to the layer's output, ``[m, n_out]``, ``[m, *, n_out]`` or
            ``[m, C_out, o_h, o_w]`` (scaled to ``∂ℓ_n/∂s`` by the caller).

    Returns:
        ``[g, g]``.
    """
    delta = grad_output.detach()
    if isinstance(module, nn.Conv2d):
        delta = delta.flatten(2).transpose(1, 2)
    rows = delta.reshape(-1, delta.shape[-1])
    return rows.T @ rows / rows.shape[0]


def to_matrix(layout: LayerLayout, vector: Tensor) -> Tensor:
    """Layer vectors ``[*, d]`` (METHODS §2 order) as weight matrices ``W̄ = [W b]``, ``[*, g, a]``.

    Conv2d kernels are flattened row-major, ``W[o].reshape(-1)``, which matches the order of
    :func:`torch.nn.functional.unfold`.
    """
    parts = layout.unflatten(vector)
    lead = vector.shape[:-1]
    g = layout.param_shapes[0][0]
    weight = parts[layout.param_names[0]].reshape(*lead, g, -1)
    if not layout.has_bias:
        return weight
    return torch.cat([weight, parts[layout.param_names[1]].unsqueeze(-1)], dim=-1)


def from_matrix(layout: LayerLayout, matrix: Tensor) -> Tensor:
    """Inverse of :func:`to_matrix`: ``[*, g, a]`` → ``[*, d]``."""
    lead = matrix.shape[:-2]
    columns = matrix.shape[-1] - int(layout.has_bias)
    tensors = {layout.param_names[0]: matrix[..., :columns].reshape(*lead, *layout.param_shapes[0])}
    if layout.has_bias:
        tensors[layout.param_names[1]] = matrix[..., -1]
    return layout.flatten(tensors)


def kron_layout_matrix(layout: LayerLayout, A: Tensor, G: Tensor) -> Tensor:
    """``A ⊗ G`` (for column-stacked ``vec W̄``) permuted into the layer's METHODS §2 order.

    Args:
        layout: The layer's layout (Linear or Conv2d).
        A: ``[a, a]``.
        G: ``[g, g]``.

    Returns:
        ``[d, d]``, entry ``(i, j)`` pairing the ``i``-th and ``j``-th entries of the layer
        vector.
    """
    g, a = G.shape[0], A.shape[0]
    column_stacked = torch.arange(g * a, device=A.device).reshape(a, g).T
    perm = from_matrix(layout, column_stacked)
    return torch.kron(A, G)[perm][:, perm]


class EigenInverse(NamedTuple):
    """Eigendecompositions ``A = Q_A diag(w_A) Q_Aᵀ``, ``G = Q_G diag(w_G) Q_Gᵀ`` (``w ≥ 0``)."""

    q_a: Tensor
    w_a: Tensor
    q_g: Tensor
    w_g: Tensor


class SplitInverse(NamedTuple):
    """``P_A = (A + π√λ I)⁻¹`` and ``P_G = (G + π⁻¹√λ I)⁻¹`` (Martens & Grosse 2015, §6.3)."""

    p_a: Tensor
    p_g: Tensor


def factor_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of symmetric PSD Kronecker factors ``[*, n, n]``, eigenvalues clamped at 0.

    A float32 ``eigh`` can fail to converge on real factors (seen on the MNIST autoencoder's
    1000-wide layers); it is then redone in float64 and cast back, as is one that returns
    non-finite values.
    """
    M = symmetrize(M)
    try:
        w, q = torch.linalg.eigh(M)
        finite = bool(torch.isfinite(w).all()) and bool(torch.isfinite(q).all())
    except torch.linalg.LinAlgError:
        finite = False
    if not finite:
        if M.dtype == torch.float64:
            raise NonFiniteError(
                "the eigendecomposition of a KFAC factor failed in float64; the factor is not a "
                "finite symmetric matrix"
            )
        w, q = torch.linalg.eigh(M.double())
        w, q = w.to(M.dtype), q.to(M.dtype)
    return w.clamp_min(0), q


def eigen_inverse(A: Tensor, G: Tensor) -> EigenInverse:
    """The decompositions that :func:`apply_eigen_inverse` needs (computed every ``T2`` steps).

    Eigenvalues are clamped at 0 (both factors are PSD up to rounding); a float32 ``eigh`` that
    fails is redone in float64 (:func:`factor_eigh`).
    """
    w_a, q_a = factor_eigh(A)
    w_g, q_g = factor_eigh(G)
    return EigenInverse(q_a, w_a, q_g, w_g)


def apply_eigen_inverse(inverse: EigenInverse, V: Tensor, damping: float) -> Tensor:
    """Exact solve of ``(A ⊗ G + λI) vec(X) = vec(V)``.

    ``X = Q_G [(Q_Gᵀ V Q_A) ⊘ (w_G w_Aᵀ + λ)] Q_Aᵀ`` (``⊘`` elementwise), the formula of
    :func:`mbf_analysis.linalg.kron_damped_solve_eigen` with the decompositions cached.

    Args:
        inverse: From :func:`eigen_inverse`.
        V: ``[*, g, a]``.
        damping: ``λ > 0``.

    Returns:
        ``X``, ``[*, g, a]``.
    """
    q_a, w_a, q_g, w_g = inverse
    denom = w_g.unsqueeze(-1) * w_a.unsqueeze(-2) + damping
    return q_g @ ((q_g.mT @ V @ q_a) / denom) @ q_a.mT


def split_inverse(A: Tensor, G: Tensor, damping: float) -> SplitInverse:
    """Factored Tikhonov damping with ``π² = (tr A / a) / (tr G / g)`` (``π = 1`` if a trace is 0).

    The same ``π`` as :func:`mbf_analysis.linalg.kron_damped_solve_split`; the two damped
    inverses go through :func:`mbf_analysis.linalg.damped_inverse` (Cholesky with fallbacks).
    """
    pi = float(split_damping_pi(A, G))
    root = math.sqrt(damping)
    return SplitInverse(damped_inverse(A, root * pi), damped_inverse(G, root / pi))


def apply_split_inverse(inverse: SplitInverse, V: Tensor) -> Tensor:
    """``X = (G + π⁻¹√λ I)⁻¹ V (A + π√λ I)⁻¹``, the solve with ``(A + π√λI) ⊗ (G + π⁻¹√λI)``.

    Args:
        inverse: From :func:`split_inverse`.
        V: ``[*, g, a]``.

    Returns:
        ``X``, ``[*, g, a]``.
    """
    return inverse.p_g @ V @ inverse.p_a
