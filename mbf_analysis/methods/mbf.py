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
- spatial averaging: a Linear layer that the rule :class:`SpatialAveraging` selects (by
  default the size rule ``n_out·(n_in + 1)² > 10⁸``) keeps one shared
  ``F̄ ← β F̄ + (1 − β) (1/n_out) Σ_j u_j u_jᵀ`` and ``D = M P̄`` for the momentum matrix
  ``M [n_out, n_in + 1]``.

The numerical core is a set of pure functions on batched block tensors (:func:`ema_outer_`,
:func:`inverse_by_size`, :func:`precondition`, :func:`adam_like`, and
:func:`~mbf_analysis.methods.base.momentum_`) that the optimizer reuses.

Index conventions: ``B`` blocks of size ``s``; ``*`` leading sample dimensions that an EMA
averages over; a shared (spatially averaged) matrix is a batch of ``B = 1``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import GRAD, PER_SAMPLE_GRAD, SAMPLED_GRAD, Stats
from mbf_analysis.errors import ConfigError
from mbf_analysis.fisher_kinds import check_fisher_kind
from mbf_analysis.layout import LayerLayout
from mbf_analysis.linalg import damped_inverse
from mbf_analysis.methods.base import (
    Method,
    MethodConfig,
    check_period,
    check_range,
    momentum_,
)

__all__ = [
    "BlockMode",
    "DEFAULT_SPATIAL_THRESHOLD",
    "SpatialAveraging",
    "spatial_rule",
    "MBFConfig",
    "MBF",
    "BlockPlan",
    "plan_blocks",
    "ema_outer_",
    "inverse_by_size",
    "precondition",
    "adam_like",
]

Statistic = Literal["minibatch", "mc", "per_sample"]
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
    """``d_b = P_b m_b`` for every block, computed as the row product ``d_bᵀ = m_bᵀ P_b``.

    The two are equal because every ``P_b`` is symmetric (a damped inverse of a symmetric
    matrix). The row form reads ``P_b`` along its rows: on CPU ``bmm(M.unsqueeze(1), P)`` takes
    0.4–0.5× the time of ``bmm(P, M.unsqueeze(-1))`` for 250 blocks of size 501
    (``benchmarks/results_autoencoder.md``).

    Args:
        inverses: ``P``, ``[B, s, s]`` symmetric, or ``[1, s, s]`` shared by every block
            (spatial averaging: ``D = M P̄``).
        vecs: ``m``, ``[B, s]``.

    Returns:
        ``[B, s]``.
    """
    return (vecs.unsqueeze(-2) @ inverses).squeeze(-2)


def adam_like(vecs: Tensor, second: Tensor, eps: float) -> Tensor:
    """Adam's direction without bias correction, ``m / (√v + ε)``, for size-1 blocks.

    Args:
        vecs: ``m``, ``[B]`` (or any shape).
        second: ``v``, shaped like ``vecs``.
        eps: ``ε ≥ 0`` (MBF passes its damping ``λ``).
    """
    return vecs / (second.sqrt() + eps)


# ----------------------------------------------------------------------------- spatial averaging
DEFAULT_SPATIAL_THRESHOLD = 10**8
"""The size rule's default threshold: it averages VGG's 4096-wide layers, as the paper did."""


@dataclass(frozen=True)
class SpatialAveraging:
    r"""Which ``nn.Linear`` layers MBF spatially averages (METHODS.md §3).

    An averaged layer ``n_in → n_out`` with blocks of size ``s`` (``n_in + 1`` with a bias,
    ``n_in`` without) keeps one ``F̄ ← β F̄ + (1 − β) (1/n_out) Σ_j u_j u_jᵀ`` (``[s, s]``)
    instead of ``n_out`` per-neuron blocks, and takes ``D = M P̄`` for its momentum matrix
    ``M [n_out, s]``. A rule gives exactly one of:

    - ``threshold``, the *size rule*: average when ``n_out · s² > threshold``, i.e. when the
      per-neuron blocks would hold more than ``threshold`` numbers (the default of
      :class:`~mbf_analysis.optim.MBF` and :class:`MBFConfig`, ``10⁸``);
    - ``min_width``, the *width rule*: average when ``n_in ≥ min_width`` and
      ``n_out ≥ min_width`` (the autoencoder presets: 250);
    - ``layers``: average exactly the Linear layers with these module names (``()``: none).

    Convolutions and normalization layers are never averaged.

    Example::

        MBF(model, lr=1e-5, spatial_averaging=SpatialAveraging(min_width=250))

    Attributes:
        threshold: The size rule's bound (an integer ``≥ 1``).
        min_width: The width rule's bound (an integer ``≥ 1``).
        layers: Module names (a list or tuple of strings; stored as a tuple).

    Raises:
        ValueError: If not exactly one attribute is given, or a value is invalid (the message
            names it).
    """

    threshold: int | None = None
    min_width: int | None = None
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("threshold", "min_width", "layers") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(
                "SpatialAveraging takes exactly one of threshold, min_width or layers, got "
                f"{', '.join(given) or 'none'}; e.g. SpatialAveraging(min_width=250)."
            )
        for name in ("threshold", "min_width"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(
                    f"SpatialAveraging.{name} must be a positive integer, got {value!r}."
                )
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
                raise ConfigError(
                    "SpatialAveraging.layers must be a list or tuple of module names (strings), "
                    f"got {layers!r}; e.g. layers=('fc3', 'fc6')."
                )
            object.__setattr__(self, "layers", tuple(layers))

    def averages(self, layout: LayerLayout) -> bool:
        """Whether the layer of ``layout`` is spatially averaged (only Linear layers can be)."""
        if layout.kind != "linear":
            return False
        n_out, n_in = layout.param_shapes[0]
        group = layout.groups[0]
        if self.threshold is not None:
            return group.count * group.size**2 > self.threshold
        if self.min_width is not None:
            return n_in >= self.min_width and n_out >= self.min_width
        return layout.name in self.layers

    def check_layers(self, linear: Iterable[str], owner: str) -> None:
        """Raise ``ValueError`` if :attr:`layers` names a module not among ``linear``.

        Args:
            linear: The names of the model's ``nn.Linear`` modules.
            owner: Who asks, for the message (``"MBF"``, ``"MBFConfig"``).
        """
        if self.layers is None:
            return
        linear = list(linear)
        unknown = [n for n in self.layers if n not in linear]
        if unknown:
            raise ConfigError(
                f"{owner}: spatial_averaging names {unknown}, which are not Linear layers of the "
                f"model; its Linear layers are {linear}."
            )


def spatial_rule(
    owner: str, spatial_threshold: int | None, spatial_averaging: SpatialAveraging | None
) -> SpatialAveraging | None:
    """The rule that the two settings of MBF give (``None``: no layer is averaged).

    ``spatial_averaging`` when given; else the size rule with ``spatial_threshold`` (``None``:
    never). Giving a rule together with a threshold other than
    :data:`DEFAULT_SPATIAL_THRESHOLD` is an error.

    Raises:
        ValueError: For both settings, a rule that is not a :class:`SpatialAveraging`, or a
            threshold that is not a positive integer.
    """
    if spatial_averaging is not None:
        if not isinstance(spatial_averaging, SpatialAveraging):
            raise ConfigError(
                f"{owner}: spatial_averaging must be a SpatialAveraging rule or None, got "
                f"{spatial_averaging!r}; e.g. SpatialAveraging(min_width=250)."
            )
        if spatial_threshold != DEFAULT_SPATIAL_THRESHOLD:
            raise ConfigError(
                f"{owner}: give spatial_averaging or spatial_threshold, not both (got "
                f"spatial_threshold={spatial_threshold!r}); for the size rule pass "
                "spatial_averaging=SpatialAveraging(threshold=...)."
            )
        return spatial_averaging
    if spatial_threshold is None:
        return None
    if (
        isinstance(spatial_threshold, bool)
        or not isinstance(spatial_threshold, int)
        or spatial_threshold < 1
    ):
        raise ConfigError(
            f"{owner}: spatial_threshold must be a positive integer (or None: never average), "
            f"got {spatial_threshold!r}."
        )
    return SpatialAveraging(threshold=spatial_threshold)


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
    averaging: SpatialAveraging | None = None,
) -> list[BlockPlan]:
    """The :class:`BlockPlan` of every block group of every layer, in model and layer order.

    Args:
        layouts: Layer → layout.
        block_size_one: Force every block of Linear and Conv2d layers to size 1.
        averaging: The Linear layers it selects are spatially averaged (``None``: none).
    """
    plans = []
    for layer, layout in layouts.items():
        if layout.kind == "diagonal":
            plans += [BlockPlan(g.key, layer, g.offset, g.count, 1, "adam") for g in layout.groups]
        elif block_size_one:
            plans.append(BlockPlan(layer, layer, 0, layout.dim, 1, "blocks"))
        else:
            shared = averaging is not None and averaging.averages(layout)
            for g in layout.groups:
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
        statistic: ``"minibatch"`` (MBF), ``"mc"`` (MBF-True: labels sampled from the model)
            or ``"per_sample"`` (MBF-exact); set by the registry name.
        block_size_one: Force all Linear/Conv2d blocks to size 1 (then MBF is "Adam without the
            square root", ``d = m / (v + λ)``).
        spatial_threshold: The size rule: spatially average Linear layers with
            ``n_out·(n_in + 1)²`` above this (``None``: never), unless ``spatial_averaging`` is
            given. The default 10⁸ averages the 4096-wide VGG layers, as the paper did, and
            four of the MNIST autoencoder's eight layers (fc1, fc2, fc7, fc8).
        spatial_averaging: The rule that selects the averaged Linear layers
            (:class:`SpatialAveraging`; e.g. ``SpatialAveraging(min_width=250)``, the
            autoencoder presets' rule); replaces ``spatial_threshold``. ``layers`` must name
            Linear layers of the model (checked at the first update).
    """

    damping: float = 0.003
    momentum: float = 0.9
    dampening: float = 0.0
    decay: float = 0.9
    stat_period: int = 1
    inverse_period: int = 1
    statistic: Statistic = "minibatch"
    block_size_one: bool = False
    spatial_threshold: int | None = DEFAULT_SPATIAL_THRESHOLD
    spatial_averaging: SpatialAveraging | None = None

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
        check_fisher_kind(self.statistic, "MBFConfig.statistic", ("minibatch", "mc", "per_sample"))
        if not isinstance(self.block_size_one, bool):
            raise ConfigError(
                f"MBFConfig.block_size_one must be a bool, got {self.block_size_one!r}."
            )
        if self.spatial_threshold is not None:
            check_period(self, "spatial_threshold")
        spatial_rule("MBFConfig", self.spatial_threshold, self.spatial_averaging)

    @property
    def averaging(self) -> SpatialAveraging | None:
        """The spatial-averaging rule in force (:func:`spatial_rule`)."""
        return spatial_rule("MBFConfig", self.spatial_threshold, self.spatial_averaging)


_SOURCE = {"minibatch": GRAD, "mc": SAMPLED_GRAD, "per_sample": PER_SAMPLE_GRAD}


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
            layouts = self._require_layouts()
            averaging = self.config.averaging
            if averaging is not None:
                linear = [n for n, layout in layouts.items() if layout.kind == "linear"]
                averaging.check_layers(linear, "MBFConfig")
            self._plans = plan_blocks(
                layouts, block_size_one=self.config.block_size_one, averaging=averaging
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
