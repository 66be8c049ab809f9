r"""The Mini-Block Fisher method (Bahamou, Goldfarb & Ren, Algorithm 2; METHODS.md §3).

Each layer's parameters split into mini-blocks (:mod:`mbf_analysis.layout`); MBF keeps per block
``b`` an EMA ``F_b`` of outer products, its damped inverse ``P_b`` and the momentum ``m_b``:

.. math::

    m_b \leftarrow \mu m_b + (1 - \tau) g_b, \qquad
    F_b \leftarrow \beta F_b + (1 - \beta) \, \overline{u_b u_b^\top}
    \ \ (k \equiv 0 \bmod T_1), \qquad
    P_b \leftarrow (F_b + \lambda I)^{-1} \ \ (k \equiv 0 \bmod T_2), \qquad
    d_b = P_b m_b,

where ``u_b`` is the block of the minibatch gradient (``"mbf"``, the paper's cheap statistic),
of the minibatch gradient on labels sampled from the model (``"mbf-true"``), or of every
per-sample gradient, averaged (``"mbf-exact"``, ``(1/m) Σ_n g_{n,b} g_{n,b}ᵀ``, analysis only).
Special blocks:

- size-1 blocks (a Conv2d bias) are ordinary blocks: ``d = m / (v + λ)``, no square root;
- normalization layers (and any layout of kind ``"diagonal"``): Adam's direction
  ``d = m / (√v + λ)`` with ``v`` the size-1 ``F_b`` (the paper: "mini-blocks of size 1, divided
  by the square root");
- spatial averaging: a Linear layer with ``n_out·(n_in + 1)² > spatial_threshold`` keeps one
  shared ``F̄ ← β F̄ + (1 − β) (1/n_out) Σ_j u_j u_jᵀ`` and ``D = M P̄`` for the momentum matrix
  ``M [n_out, n_in + 1]``.

The numerical core is a set of pure functions on batched block tensors (:func:`ema_outer_`,
:func:`inverse_by_size`, :func:`precondition`, :func:`adam_like`, and
:func:`~mbf_analysis.methods.base.momentum_`) that the optimizer reuses.

Index conventions: ``B`` blocks of size ``s``; ``*`` leading sample dimensions that an EMA
averages over; a shared (spatially averaged) matrix is a batch of ``B = 1``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import GRAD, PER_SAMPLE_GRAD, SAMPLED_GRAD, Stats
from mbf_analysis.layout import LayerLayout
from mbf_analysis.linalg import damped_inverse
from mbf_analysis.methods.base import (
    Method,
    MethodConfig,
    check_choice,
    check_period,
    check_range,
    momentum_,
)

__all__ = [
    "BlockMode",
    "MBFConfig",
    "MBF",
    "BlockPlan",
    "plan_blocks",
    "ema_outer_",
    "inverse_by_size",
    "precondition",
    "adam_like",
]

Statistic = Literal["minibatch", "sampled", "per_sample"]
BlockMode = Literal["blocks", "shared", "adam"]


# ----------------------------------------------------------------------------- numerical core
def ema_outer_(mats: Tensor, vecs: Tensor, decay: float) -> Tensor:
    """In place ``F ← β F + (1 − β) mean_* (u uᵀ)`` for every block.

    Args:
        mats: ``F``, ``[B, s, s]``.
        vecs: ``u``, ``[B, s]`` (one vector per block), or ``[*, B, s]``, whose outer products
            are averaged over ``*`` (per-sample gradients; the ``n_out`` rows of a spatially
            averaged layer with ``B = 1``).
        decay: ``β ∈ [0, 1)``; ``β = 0`` replaces ``F``.

    Returns:
        ``mats``.
    """
    if vecs.dim() == 2:
        return mats.baddbmm_(vecs.unsqueeze(-1), vecs.unsqueeze(-2), beta=decay, alpha=1 - decay)
    rows = vecs.reshape(-1, *vecs.shape[-2:])
    outer = torch.einsum("nbi,nbj->bij", rows, rows)
    if decay == 0:
        return mats.copy_(outer).div_(rows.shape[0])
    return mats.mul_(decay).add_(outer, alpha=(1 - decay) / rows.shape[0])


def inverse_by_size(mats: Mapping[str, Tensor], damping: float) -> dict[str, Tensor]:
    """``P = (F + λI)⁻¹`` for every block, one batched :func:`~mbf_analysis.linalg.damped_inverse`
    call per block size (Cholesky, float64 and eigh fallbacks; never NaN for finite input).

    Args:
        mats: Key → ``[B, s, s]``.
        damping: ``λ ≥ 0``.

    Returns:
        Key → ``[B, s, s]``.
    """
    by_size: dict[int, list[str]] = defaultdict(list)
    for key, value in mats.items():
        by_size[value.shape[-1]].append(key)
    out = {}
    for keys in by_size.values():
        inverses = damped_inverse(torch.cat([mats[k] for k in keys]), damping)
        out.update(zip(keys, inverses.split([mats[k].shape[0] for k in keys]), strict=True))
    return out


def precondition(inverses: Tensor, vecs: Tensor) -> Tensor:
    """``d_b = P_b m_b`` for every block.

    Args:
        inverses: ``P``, ``[B, s, s]``, or ``[1, s, s]`` shared by every block (spatial
            averaging: ``D = M P̄`` for the symmetric ``P̄``).
        vecs: ``m``, ``[B, s]``.

    Returns:
        ``[B, s]``.
    """
    return (inverses @ vecs.unsqueeze(-1)).squeeze(-1)


def adam_like(vecs: Tensor, second: Tensor, eps: float) -> Tensor:
    """Adam's direction without bias correction, ``m / (√v + ε)``, for size-1 blocks.

    Args:
        vecs: ``m``, ``[B]`` (or any shape).
        second: ``v``, shaped like ``vecs``.
        eps: ``ε ≥ 0`` (MBF passes its damping ``λ``).
    """
    return vecs / (second.sqrt() + eps)


# ----------------------------------------------------------------------------- block plan
@dataclass(frozen=True)
class BlockPlan:
    """How MBF treats one run of equal mini-blocks of a layer.

    Attributes:
        key: State key (the layout's block-group key, or the layer name when every block of a
            layer is forced to size 1).
        layer: Layer (module) name.
        offset: Position of the run in the layer vector.
        count: Number of blocks ``B``.
        size: Block size ``s``.
        mode: ``"blocks"`` (one ``F_b`` per block), ``"shared"`` (spatial averaging: one ``F̄``)
            or ``"adam"`` (normalization layers: ``m / (√v + λ)``).
    """

    key: str
    layer: str
    offset: int
    count: int
    size: int
    mode: BlockMode

    @property
    def stored(self) -> int:
        """Number of ``s × s`` matrices kept: ``B``, or 1 when shared."""
        return 1 if self.mode == "shared" else self.count

    def split(self, vector: Tensor) -> Tensor:
        """The run's slice of layer vectors ``[*, d]`` as ``[*, B, s]``."""
        return vector[..., self.offset : self.offset + self.count * self.size].unflatten(
            -1, (self.count, self.size)
        )


def plan_blocks(
    layouts: Mapping[str, LayerLayout],
    *,
    block_size_one: bool = False,
    spatial_threshold: int | None = None,
) -> list[BlockPlan]:
    """The :class:`BlockPlan` of every block group of every layer, in model and layer order.

    Args:
        layouts: Layer → layout.
        block_size_one: Force every block of Linear and Conv2d layers to size 1.
        spatial_threshold: Linear layers with ``n_out·(n_in + 1)² >`` this are spatially
            averaged (``None``: never).
    """
    plans = []
    for layer, layout in layouts.items():
        if layout.kind == "diagonal":
            plans += [BlockPlan(g.key, layer, g.offset, g.count, 1, "adam") for g in layout.groups]
        elif block_size_one:
            plans.append(BlockPlan(layer, layer, 0, layout.dim, 1, "blocks"))
        else:
            for g in layout.groups:
                shared = (
                    layout.kind == "linear"
                    and spatial_threshold is not None
                    and g.count * g.size**2 > spatial_threshold
                )
                mode: BlockMode = "shared" if shared else "blocks"
                plans.append(BlockPlan(g.key, layer, g.offset, g.count, g.size, mode))
    return plans


# ----------------------------------------------------------------------------- method
@dataclass(kw_only=True)
class MBFConfig(MethodConfig):
    """Configuration of :class:`MBF`.

    Attributes:
        damping: ``λ ≥ 0`` (paper: 0.003 for CNNs, results insensitive around it).
        momentum: ``μ ∈ [0, 1)``.
        dampening: ``τ ∈ [0, 1]`` (torch SGD convention; the paper's choice is 0).
        decay: EMA decay ``β ∈ [0, 1)`` of ``F_b``.
        stat_period: ``T1 ≥ 1``, steps between updates of ``F_b``.
        inverse_period: ``T2 ≥ 1``, steps between inversions. The paper used ``T1 = 1``,
            ``T2 = 20`` for autoencoders and ``T1 = 10``, ``T2 = 100`` for CNNs; the defaults
            (1, 1) suit the analyses, where every step is looked at.
        statistic: ``"minibatch"`` (MBF), ``"sampled"`` (MBF-True) or ``"per_sample"``
            (MBF-exact); set by the registry name.
        block_size_one: Force all Linear/Conv2d blocks to size 1 (then MBF is "Adam without the
            square root", ``d = m / (v + λ)``).
        spatial_threshold: Spatially average Linear layers with ``n_out·(n_in + 1)²`` above
            this (``None``: never). The default 10⁸ averages 1000-wide autoencoder layers and
            the 4096-wide VGG layers, as the paper did.
    """

    damping: float = 0.003
    momentum: float = 0.9
    dampening: float = 0.0
    decay: float = 0.9
    stat_period: int = 1
    inverse_period: int = 1
    statistic: Statistic = "minibatch"
    block_size_one: bool = False
    spatial_threshold: int | None = 10**8

    ONE_SHOT: ClassVar[dict] = {
        "momentum": 0.0,
        "decay": 0.0,
        "stat_period": 1,
        "inverse_period": 1,
    }

    def __post_init__(self) -> None:
        check_range(self, "damping", low=0.0)
        check_range(self, "momentum", low=0.0, high=1.0, high_open=True)
        check_range(self, "dampening", low=0.0, high=1.0)
        check_range(self, "decay", low=0.0, high=1.0, high_open=True)
        check_period(self, "stat_period")
        check_period(self, "inverse_period")
        check_choice(self, "statistic", ("minibatch", "sampled", "per_sample"))
        if not isinstance(self.block_size_one, bool):
            raise ValueError(
                f"MBFConfig.block_size_one must be a bool, got {self.block_size_one!r}."
            )
        if self.spatial_threshold is not None:
            check_period(self, "spatial_threshold")


_SOURCE = {"minibatch": GRAD, "sampled": SAMPLED_GRAD, "per_sample": PER_SAMPLE_GRAD}


class MBF(Method):
    """MBF, MBF-True and MBF-exact (module docstring).

    State: per layer ``"m"`` (``[d]``); per block group ``"F"`` and ``"P"`` (``[B, s, s]``, or
    ``[1, s, s]`` when shared; ``[B, 1, 1]`` for normalization layers, which have no ``"P"``).
    The curvature matrix is ``blockdiag(F_b)`` (``v`` on the diagonal for normalization layers).
    """

    config: MBFConfig

    def __init__(self, config: MBFConfig | None = None, name: str = "mbf") -> None:
        super().__init__(config or MBFConfig(), name)
        self._plans: list[BlockPlan] | None = None

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({GRAD, _SOURCE[self.config.statistic]})

    def plans(self) -> list[BlockPlan]:
        """The block plans of the model (after the first update)."""
        if self._plans is None:
            self._plans = plan_blocks(
                self._require_layouts(),
                block_size_one=self.config.block_size_one,
                spatial_threshold=self.config.spatial_threshold,
            )
        return self._plans

    def load_state_dict(self, state_dict: Mapping) -> None:
        super().load_state_dict(state_dict)
        self._plans = None

    def _update(self, stats: Stats) -> None:
        cfg = self.config
        for layer, g in stats.grad.items():
            slot = self.state.setdefault(layer, {})
            slot["m"] = momentum_(slot.get("m"), g, cfg.momentum, cfg.dampening)
        if self._due(cfg.stat_period):
            source = stats.statistic(_SOURCE[cfg.statistic])
            for plan in self.plans():
                vecs = plan.split(source[plan.layer])
                if plan.mode == "shared":
                    vecs = vecs.reshape(-1, 1, plan.size)
                slot = self.state.setdefault(plan.key, {})
                if "F" not in slot:
                    slot["F"] = vecs.new_zeros(plan.stored, plan.size, plan.size)
                ema_outer_(slot["F"], vecs, cfg.decay)
        if self._due(cfg.inverse_period):
            mats = {p.key: self.state[p.key]["F"] for p in self.plans() if p.mode != "adam"}
            for key, inverse in inverse_by_size(mats, cfg.damping).items():
                self.state[key]["P"] = inverse

    def _first_moment(self) -> dict[str, Tensor]:
        return {layer: self.state[layer]["m"] for layer in self._require_layouts()}

    def _direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {layer: torch.empty_like(v) for layer, v in vectors.items()}
        for plan in self.plans():
            m = plan.split(vectors[plan.layer])
            slot = self.state[plan.key]
            if plan.mode == "adam":
                d = adam_like(m, slot["F"][:, :, 0], self.config.damping)
            else:
                d = precondition(slot["P"], m)
            plan.split(out[plan.layer]).copy_(d)
        return out

    def _matrix(self, layer: str) -> Tensor:
        mats = []
        for plan in self.plans():
            if plan.layer == layer:
                f = self.state[plan.key]["F"]
                mats += [f[0]] * plan.count if plan.mode == "shared" else list(f.unbind(0))
        return torch.block_diag(*mats)
