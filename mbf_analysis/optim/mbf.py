r"""The Mini-Block Fisher optimizer (Bahamou, Goldfarb & Ren, Algorithm 2; METHODS.md §3).

Every layer's parameters split into mini-blocks (:mod:`mbf_analysis.layout`): per output neuron
``[W[j, :], b[j]]`` for ``nn.Linear``, per kernel ``vec W[o, i]`` for ``nn.Conv2d`` (its bias in
blocks of size 1), blocks of size 1 for normalization layers. At step ``k`` of a parameter group
(``k = 0, 1, …``), with the minibatch gradient ``g`` (block ``g_b``):

.. math::

    m_b &\leftarrow \mu m_b + (1 - \tau) g_b \quad (m_b = g_b \text{ at } k = 0), \\
    F_b &\leftarrow \beta F_b + (1 - \beta) u_b u_b^\top \quad (k \equiv 0 \bmod T_1), \\
    P_b &\leftarrow (F_b + \lambda I)^{-1} \quad (k \equiv 0 \bmod T_2), \\
    d_b &= P_b m_b, \qquad
    \theta \leftarrow (1 - \alpha\gamma)\,\theta, \qquad \theta \leftarrow \theta - \alpha d,

with ``u = g`` (MBF) or ``u = ĝ``, the minibatch gradient on labels sampled from the model
(MBF-True, ``fisher="mc"``). ``F_b`` starts at 0 (or at the warm-start average, see
:meth:`MBF.warm_start`). Special blocks:

- size-1 blocks (Conv2d biases) follow the same rule, ``d = m / (v + λ)`` (no square root);
- normalization layers (BatchNorm, LayerNorm, GroupNorm): Adam's direction without bias
  correction, ``d = m / (√v + λ)``, with the current ``v`` (the size-1 ``F_b``);
- spatial averaging: a Linear layer that the rule selects
  (:class:`~mbf_analysis.methods.mbf.SpatialAveraging`: by default the size rule
  ``n_out·(n_in + 1)² > 10⁸``; the autoencoder presets average every Linear layer with both
  widths ≥ 250) keeps one ``F̄ ← β F̄ + (1 − β) (1/n_out) Σ_j u_j u_jᵀ`` and ``D = M P̄`` for its
  momentum matrix ``M [n_out, n_in + 1]``;
- parameters without a mini-block layout (e.g. ``nn.Embedding``, a module with a parameter that
  is not ``weight``/``bias``, a layer whose weight is optimized but whose bias is frozen) fall
  back to ``fallback="diagonal"``: size-1 blocks, ``d = m / (v + λ)`` (METHODS.md §2), or
  ``fallback="adam"``: ``d = m / (√v + λ)``. One ``UserWarning`` lists them.

The formulas are those of :mod:`mbf_analysis.methods.mbf` (the block plans come from
:func:`~mbf_analysis.methods.mbf.plan_blocks`, the inverses from
:func:`~mbf_analysis.linalg.damped_inverse`), and the optimizer's directions equal
``methods.get("mbf", ...)``'s for the same gradients (tested).

**Two implementations** (``implementation=``), tested to agree in float64:

- ``"reference"``: per layer and per block, plain loops over :meth:`LayerLayout.flatten`
  vectors and :meth:`BlockPlan.split` blocks; slow, for reading and testing.
- ``"fast"`` (default): the blocks of one size, mode, device and dtype in one parameter group
  form a *bucket*, across layers. A bucket stores the momentum ``M [B, s]``, ``F [B, s, s]`` and
  ``P [B, s, s]`` of all its blocks as single tensors; each step costs, per bucket, one
  ``torch._foreach_copy_`` that gathers the gradients into a scratch matrix ``[B, s]``, one fused
  momentum update, on ``T1`` steps one ``addcmul_`` for the EMA (on CPU 3-4× faster than
  ``baddbmm`` for ``s = 9``; for a spatially averaged layer one ``addmm_`` that also applies
  ``β``), on ``T2`` steps one batched ``damped_inverse``, and one ``bmm`` for the directions in
  the row form ``d_bᵀ = m_bᵀ P_b`` (equal to ``P_b m_b`` as ``P_b`` is symmetric; on CPU
  0.4–0.5× the time of the column form for blocks of size 250–500), written into the scratch
  matrix; then per group one ``_foreach_mul_``
  (weight decay) and one ``_foreach_add_`` that read the directions through parameter-shaped
  views. There is no Python loop over blocks; the loops run over buckets (and, to build the
  views once, over parameters).

Index conventions:

- ``B``: blocks in a bucket (over all its layers); ``s``: their size; a spatially averaged
  layer is a bucket of its own with ``B = n_out`` rows and one stored ``[1, s, s]`` matrix.
- ``M``, ``W`` (scratch): ``[B, s]``, one row per block, in bucket order (layer by layer, in
  model order, each layer's blocks in METHODS.md §2 order).

**State** (``optimizer.state[p]``, the same format for both implementations, so that a state
dict saved by one loads into the other):

- every parameter: ``"step"`` (int, steps of its group) and ``"momentum_buffer"`` (``p``-shaped;
  in the fast path a view into its bucket's ``M``);
- the first parameter of a block run (a Linear or Conv2d weight, a Conv2d bias, a normalization
  or fallback parameter): ``"F"`` ``[B_run, s, s]`` (``[1, s, s]`` when spatially averaged), and,
  unless Adam-like, ``"P"`` of the same shape. A Linear weight's ``F`` covers the whole neuron
  blocks ``[W[j, :], b[j]]``, bias included.

**Distributed**: under ``DistributedDataParallel`` the gradients are already averaged over the
processes, so the statistics (built from ``g``) and every state agree across processes with no
communication. With ``fisher="mc"``, :func:`mbf_true_step` averages ``ĝ`` across processes.

**Non-finite gradients** raise :class:`~mbf_analysis.errors.NonFiniteError` naming the
parameter, before any parameter or state changes. The fast path screens the sum of each
bucket's gradients, in their own dtype (a float64 sum of float32 gradients converts them first:
13× the time of the sum), with one host synchronization per step, and checks parameter by
parameter only when a sum is not finite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mbf_analysis.errors import ConfigError
from mbf_analysis.linalg import damped_inverse
from mbf_analysis.methods.base import momentum_
from mbf_analysis.methods.mbf import (
    DEFAULT_SPATIAL_THRESHOLD,
    BlockMode,
    BlockPlan,
    SpatialAveraging,
    plan_blocks,
    spatial_rule,
)
from mbf_analysis.optim.common import (
    PlacedLayer,
    PlacedOptimizer,
    check_choice,
    check_curvature_settings,
    check_gradients,
    check_number,
    check_period,
    decoupled_update_,
    group_gradients,
    migrate_fisher_setting,
    place,
    refuse_true_fisher,
    sampled_label_loss,
    warn_fallback,
)

__all__ = ["MBF", "SpatialAveraging", "mbf_true_step"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class _Slot:
    """Where one parameter sits in the ``[B_run, s]`` block matrix of a run.

    Attributes:
        param: The parameter.
        cols: Its columns: ``slice(0, n_in)`` for a Linear weight with bias, ``n_in`` for that
            bias, ``slice(None)`` otherwise (the rows, reshaped, are the parameter).
    """

    param: Tensor
    cols: slice | int

    def view(self, rows: Tensor) -> Tensor:
        """The parameter-shaped view of a run's rows ``[B_run, s]``."""
        return rows[:, self.cols].view(self.param.shape)


@dataclass(frozen=True, eq=False)
class _Run:
    """One :class:`~mbf_analysis.methods.mbf.BlockPlan` of a placed layer and its parameters.

    Attributes:
        plan: The run of equal blocks (key, offset in the layer vector, ``B_run``, ``s``, mode).
        layer: The placed layer.
        slots: The parameters the run covers, the state owner first.
    """

    plan: BlockPlan
    layer: PlacedLayer
    slots: tuple[_Slot, ...]

    @property
    def owner(self) -> Tensor:
        """The parameter whose state holds the run's ``F`` and ``P``."""
        return self.slots[0].param


def _runs(
    layer: PlacedLayer, fallback: BlockMode, averaging: SpatialAveraging | None
) -> list[_Run]:
    """The block runs of a placed layer (see the module docstring for the treatment of each)."""
    if layer.fallback:
        p = layer.params[0]
        plan = BlockPlan(layer.name, layer.name, 0, p.numel(), 1, fallback)
        return [_Run(plan, layer, (_Slot(p, slice(None)),))]
    layout = layer.layout
    named = dict(zip(layout.param_names, layer.params, strict=True))
    runs = []
    for plan in plan_blocks({layer.name: layout}, averaging=averaging):
        if layout.kind == "linear" and layout.has_bias:
            n_in = layout.param_shapes[0][1]
            slots = (_Slot(layer.params[0], slice(0, n_in)), _Slot(layer.params[1], n_in))
        elif layout.kind == "linear":
            slots = (_Slot(layer.params[0], slice(None)),)
        else:
            slots = (_Slot(named[plan.key], slice(None)),)
        runs.append(_Run(plan, layer, slots))
    return runs


@dataclass(eq=False)
class _Bucket:
    """The blocks of one size and mode of one parameter group, stacked (fast path).

    Attributes:
        mode: ``"blocks"``, ``"shared"`` or ``"adam"``.
        size: ``s``.
        runs: The runs with their rows in ``momentum``/``work`` and in ``stats``/``inverse``.
        momentum: ``M``, ``[B, s]``.
        stats: ``F``, ``[B, s, s]`` (``[1, s, s]`` when shared).
        inverse: ``P`` shaped like ``stats``, or ``None`` (Adam-like).
        work: Scratch ``[B, s]``: the gathered gradients, then the directions.
        params: The parameters, in slot order.
        work_views: Parameter-shaped views of ``work``, in the order of ``params``.
    """

    mode: BlockMode
    size: int
    runs: list[tuple[_Run, slice, slice]]
    momentum: Tensor
    stats: Tensor
    inverse: Tensor | None
    work: Tensor
    params: list[Tensor] = field(default_factory=list)
    work_views: list[Tensor] = field(default_factory=list)

    def views(self, matrix: Tensor) -> list[Tensor]:
        """Parameter-shaped views of a ``[B, s]`` matrix, in the order of :attr:`params`."""
        return [slot.view(matrix[rows]) for run, rows, _ in self.runs for slot in run.slots]


class MBF(PlacedOptimizer):
    r"""Mini-Block Fisher (Algorithm 2 of the paper; module docstring for the formulas).

    Example::

        model = resnet32()
        optimizer = MBF(model, lr=0.1, weight_decay=5e-4)       # T1 = 10, T2 = 100
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

    Parameter groups (``params=[{"params": ..., "lr": ...}, ...]``) may override every setting
    marked *per group* below; a layer's weight and bias must be in the same group.
    ``state_dict()`` is torch's; ``load_state_dict`` accepts the state of either implementation,
    deep-copies it, and refuses (keeping the previous state) settings or state shapes that do not
    fit this model.

    Args:
        model: The model; it pairs every weight with its bias (:func:`~mbf_analysis.layout.
            model_layouts`).
        lr: ``α ≥ 0`` (per group).
        damping: ``λ > 0`` (per group; the paper: 0.003 for CNNs).
        momentum: ``μ ∈ [0, 1)`` (per group).
        dampening: ``τ ∈ [0, 1]`` of torch-SGD momentum, ``m ← μ m + (1 − τ) g`` (per group).
        stat_decay: EMA decay ``β ∈ [0, 1)`` of ``F_b`` (per group).
        weight_decay: Decoupled weight decay ``γ ≥ 0`` (per group).
        stat_period: ``T1 ≥ 1`` (per group; the paper: 10 for CNNs, 1 for autoencoders).
        inverse_period: ``T2 ≥ 1`` (per group; the paper: 100 for CNNs, 20 for autoencoders).
        fisher: ``"mc"``: MBF-True (per group), ``F_b`` from sampled-label gradients, passed
            to :meth:`step` as ``curvature_grads`` (or use :func:`mbf_true_step`); ``"empirical"``
            (default): MBF, from the minibatch gradient. The earlier ``true_fisher=`` is refused
            with this word in the message.
        params: Parameters or parameter groups to optimize (default: the model's parameters
            with ``requires_grad``); all must be float32 or float64 parameters of ``model``.
        spatial_threshold: The size rule: spatially average Linear layers with
            ``n_out·(n_in + 1)²`` above this (``None``: never), unless ``spatial_averaging``
            is given. The default ``10⁸`` averages VGG's 4096-wide layers, as the paper did.
        spatial_averaging: The rule that selects the averaged Linear layers
            (:class:`~mbf_analysis.methods.mbf.SpatialAveraging`: a size threshold, a minimum
            width, or layer names, which must be ``nn.Linear`` modules of ``model``); replaces
            ``spatial_threshold`` (giving both is an error). The autoencoder presets pass
            ``SpatialAveraging(min_width=250)``.
        fallback: Treatment of parameters without a layout: ``"diagonal"`` (size-1 blocks,
            ``m / (v + λ)``) or ``"adam"`` (``m / (√v + λ)``).
        implementation: ``"fast"`` (bucketed, batched) or ``"reference"`` (plain loops).

    Raises:
        TypeError: If ``model`` is not a module or a parameter is not float32/float64.
        ValueError: For an invalid setting (the message names it and the group), a parameter
            that is not the model's, or a layer split over several groups.
    """

    OWNER = "MBF"

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        damping: float = 0.003,
        momentum: float = 0.9,
        dampening: float = 0.0,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        stat_period: int = 10,
        inverse_period: int = 100,
        fisher: Literal["empirical", "mc"] = "empirical",
        true_fisher: None = None,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        spatial_threshold: int | None = DEFAULT_SPATIAL_THRESHOLD,
        spatial_averaging: SpatialAveraging | None = None,
        fallback: Literal["diagonal", "adam"] = "diagonal",
        implementation: Literal["fast", "reference"] = "fast",
    ) -> None:
        refuse_true_fisher(self.OWNER, true_fisher)
        check_choice(self.OWNER, "fallback", fallback, ("diagonal", "adam"))
        check_choice(self.OWNER, "implementation", implementation, ("fast", "reference"))
        self._averaging = spatial_rule(self.OWNER, spatial_threshold, spatial_averaging)
        self._fallback: BlockMode = "blocks" if fallback == "diagonal" else "adam"
        self.implementation = implementation
        self._runs: list[list[_Run]] = []
        self._buckets: list[list[_Bucket]] | None = None
        defaults = {
            "lr": lr,
            "damping": damping,
            "momentum": momentum,
            "dampening": dampening,
            "stat_decay": stat_decay,
            "weight_decay": weight_decay,
            "stat_period": stat_period,
            "inverse_period": inverse_period,
            "fisher": fisher,
        }
        super().__init__(model, params, defaults)

    # ------------------------------------------------------------------ set-up
    def _check_settings(self, group: Mapping[str, Any], index: int | None) -> None:
        """Validate the per-group settings (module docstring and class Args)."""
        owner = self.OWNER
        check_curvature_settings(owner, group, index)
        check_number(owner, index, "damping", group["damping"], low=0.0, low_open=True)
        check_choice(owner, "fisher", group["fisher"], ("empirical", "mc"))

    def _refresh_placement(self) -> None:
        """Place the parameters, build the block runs, warn once about fallbacks."""
        if self._averaging is not None:
            linear = [n for n, m in self._model.named_modules() if isinstance(m, nn.Linear)]
            self._averaging.check_layers(linear, self.OWNER)
        placement = place(self._model, self.param_groups, self.OWNER)
        self._names = placement.names
        runs: list[list[_Run]] = [[] for _ in self.param_groups]
        for layer in placement.layers:
            runs[layer.group] += _runs(layer, self._fallback, self._averaging)
        shared = [
            r.plan.layer for group_runs in runs for r in group_runs if r.plan.mode == "shared"
        ]
        logger.debug("%s: spatially averaged layers: %s", self.OWNER, shared or "none")
        new = {n: r for n, r in placement.fallback_reasons.items() if n not in self._warned}
        treatment = (
            "diagonal blocks, d = m / (v + λ)"
            if self._fallback == "blocks"
            else "Adam-like blocks, d = m / (√v + λ)"
        )
        warn_fallback(self.OWNER, new, treatment)
        self._warned |= set(new)
        self._runs = runs
        self._buckets = None

    def _after_load(self) -> None:
        """Validate the loaded settings and state shapes; rebuild the buckets from the state."""
        for index, group in enumerate(self.param_groups):
            migrate_fisher_setting(group)
            self._check_settings(group, index)
        for run in (r for runs in self._runs for r in runs):
            stored = run.plan.stored
            expected = (stored, run.plan.size, run.plan.size)
            for key in ("F", "P"):
                value = self.state[run.owner].get(key)
                if value is not None and tuple(value.shape) != expected:
                    raise ConfigError(
                        f"{self.OWNER}: state '{key}' of parameter '{self._names[run.owner]}' "
                        f"has shape {tuple(value.shape)}, expected {expected}; the state was "
                        "saved for another model or another spatial_averaging or "
                        "spatial_threshold."
                    )
        self._buckets = None

    # ------------------------------------------------------------------ public API
    def _group_step(self, index: int) -> int:
        return self.state[self.param_groups[index]["params"][0]].get("step", 0)

    def needs_curvature_grads(self) -> bool:
        """Whether the next :meth:`step` updates the statistics of a ``fisher="mc"`` group.

        Only then must ``curvature_grads`` be passed (and the extra backward pass be run).
        """
        return any(
            group["fisher"] == "mc" and self._group_step(index) % group["stat_period"] == 0
            for index, group in enumerate(self.param_groups)
        )

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        curvature_grads: Mapping[Tensor, Tensor] | None = None,
    ) -> Any:
        """One MBF step for every parameter group whose parameters have gradients.

        A group whose parameters all lack ``.grad`` is skipped (its step count does not
        advance); a group where only some lack it is an error.

        Args:
            closure: Re-evaluates the model and returns the loss (called with gradients
                enabled, before the step).
            curvature_grads: Parameter → ``ĝ`` (shaped like it), the minibatch gradient on
                sampled labels, for ``fisher="mc"`` groups on their statistics steps (see
                :meth:`needs_curvature_grads`); ignored on other steps.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            NonFiniteError: If a gradient (or curvature gradient) holds NaN/Inf; nothing is
                changed.
            ValueError: If ``curvature_grads`` is missing when needed or given without any
                ``fisher="mc"`` group.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [
            index
            for index, group in enumerate(self.param_groups)
            if group_gradients(self.OWNER, group, self._names)
        ]
        sources = self._curvature_sources(active, curvature_grads)
        if self.implementation == "fast":
            self._step_fast(active, sources)
        else:
            self._step_reference(active, sources)
        return loss

    def _curvature_sources(
        self, active: list[int], curvature_grads: Mapping[Tensor, Tensor] | None
    ) -> dict[int, Mapping[Tensor, Tensor]]:
        """Group → the tensors its statistics are built from, for the groups due for them."""
        if curvature_grads is not None and not any(g["fisher"] == "mc" for g in self.param_groups):
            raise ConfigError(
                f"{self.OWNER}: curvature_grads were given, but no param group has "
                "fisher='mc'; they would be ignored."
            )
        sources: dict[int, Mapping[Tensor, Tensor]] = {}
        for index in active:
            group = self.param_groups[index]
            params = group["params"]
            if self._group_step(index) % group["stat_period"] != 0:
                continue
            if group["fisher"] != "mc":
                sources[index] = {p: p.grad for p in params}
                continue
            given = curvature_grads or {}
            missing = [self._names[p] for p in params if p not in given]
            if missing:
                raise ConfigError(
                    f"{self.OWNER}: param group {index} has fisher='mc' and updates its "
                    f"statistics at this step, but curvature_grads lacks {missing}; pass the "
                    "sampled-label gradients (see needs_curvature_grads and mbf_true_step)."
                )
            for p in params:
                if curvature_grads[p].shape != p.shape:
                    raise ConfigError(
                        f"{self.OWNER}: curvature gradient of '{self._names[p]}' has shape "
                        f"{tuple(curvature_grads[p].shape)}, expected {tuple(p.shape)}."
                    )
            sources[index] = {p: curvature_grads[p] for p in params}
        return sources

    def warm_start(
        self,
        batches: Iterable[T],
        backward: Callable[[T], Any] | None = None,
        *,
        max_batches: int | None = None,
    ) -> int:
        r"""Set every ``F_b`` to the average over ``K`` batches before the first step.

        ``F_b = (1/K) Σ_k u_{k,b} u_{k,b}ᵀ`` (``v = (1/K) Σ_k u_k²`` for size-1 blocks; the
        spatially averaged ``F̄`` averages over the rows too), replacing any statistics; the
        first :meth:`step` then folds its own statistic into this average with the EMA, as the
        paper's warm start does. Parameters, momenta and step counts are unchanged.

        Args:
            batches: An iterable (e.g. one pass of a data loader).
            backward: Called with each item; must leave the gradients in ``.grad`` (the
                optimizer zeroes them before each call and after the last). Without it, every
                item must be a mapping parameter → gradient covering all parameters.
                For MBF-True, compute gradients on sampled labels.
            max_batches: Use at most this many batches (``K``).

        Returns:
            ``K``, the number of batches used.

        Raises:
            RuntimeError: After the first step, or if a gradient is missing.
            ValueError: If no batch was used.
            NonFiniteError: For a NaN/Inf gradient; the statistics are then reset to 0.
        """
        if any(self._group_step(i) > 0 for i in range(len(self.param_groups))):
            raise RuntimeError(f"{self.OWNER}: warm_start must be called before the first step.")
        if max_batches is not None:
            check_period(self.OWNER, None, "max_batches", max_batches)
        params = [p for group in self.param_groups for p in group["params"]]
        self._zero_statistics()
        count = 0
        try:
            for item in batches:
                if max_batches is not None and count >= max_batches:
                    break
                if backward is None:
                    grads = item
                else:
                    self.zero_grad()
                    with torch.enable_grad():
                        backward(item)
                    grads = {p: p.grad for p in params if p.grad is not None}
                missing = [self._names[p] for p in params if p not in grads]
                if missing:
                    raise RuntimeError(f"{self.OWNER}: warm_start got no gradient for {missing}.")
                check_gradients(self.OWNER, grads, self._names)
                with torch.no_grad():
                    for index in range(len(self.param_groups)):
                        self._fold_group(index, grads, 1.0, 1.0)
                count += 1
        except BaseException:
            self._zero_statistics()
            raise
        if count == 0:
            raise ConfigError(f"{self.OWNER}: warm_start got no batch.")
        with torch.no_grad():
            for state in self.state.values():
                if "F" in state:
                    state["F"].mul_(1.0 / count)
        self.zero_grad()
        logger.info("MBF warm start: statistics averaged over %d batch(es)", count)
        return count

    def _zero_statistics(self) -> None:
        with torch.no_grad():
            for state in self.state.values():
                if "F" in state:
                    state["F"].zero_()

    def _fold_group(
        self, index: int, sources: Mapping[Tensor, Tensor], keep: float, add: float
    ) -> None:
        """``F ← keep·F + add·(u uᵀ)`` for every block of group ``index`` (warm start)."""
        if self.implementation == "fast":
            for bucket in self._get_buckets()[index]:
                rows = torch.empty_like(bucket.work)
                torch._foreach_copy_(bucket.views(rows), [sources[p] for p in bucket.params])
                _fold_bucket(bucket, rows, keep, add)
        else:
            for run in self._runs[index]:
                _fold_run_reference(self.state[run.owner], run, sources, keep, add)

    def _check_finite(self, active: list[int], sources: dict[int, Mapping[Tensor, Tensor]]):
        """Raise :class:`NonFiniteError` naming the first parameter with a NaN/Inf gradient."""
        for index in active:
            params = self.param_groups[index]["params"]
            check_gradients(self.OWNER, {p: p.grad for p in params}, self._names)
            if index in sources and self.param_groups[index]["fisher"] == "mc":
                check_gradients(self.OWNER, sources[index], self._names, "curvature gradient")

    # ------------------------------------------------------------------ reference path
    def _step_reference(self, active: list[int], sources: dict[int, Mapping[Tensor, Tensor]]):
        """Per layer and per block, plain loops (the definition the fast path is tested on)."""
        self._check_finite(active, sources)
        for index in active:
            group = self.param_groups[index]
            k, lam = self._group_step(index), group["damping"]
            for p in group["params"]:
                state = self.state[p]
                buf = state["momentum_buffer"] if k > 0 else None
                state["momentum_buffer"] = momentum_(
                    buf, p.grad, group["momentum"], group["dampening"]
                )
            if index in sources:
                beta = group["stat_decay"]
                for run in self._runs[index]:
                    _fold_run_reference(self.state[run.owner], run, sources[index], beta, 1 - beta)
            directions: dict[Tensor, Tensor] = {}
            for layer_runs in _by_layer(self._runs[index]):
                layer = layer_runs[0].layer
                layout = layer.layout
                momenta = layout.flatten(
                    {n: self.state[p]["momentum_buffer"] for n, p in layer.named_params()}
                )
                out = torch.empty_like(momenta)
                for run in layer_runs:
                    plan, state = run.plan, self.state[run.owner]
                    if plan.mode != "adam" and k % group["inverse_period"] == 0:
                        state["P"] = torch.stack([damped_inverse(f, lam) for f in state["F"]])
                    m, d = plan.split(momenta), plan.split(out)
                    for b in range(plan.count):
                        if plan.mode == "adam":
                            d[b] = m[b] / (state["F"][b, 0, 0].sqrt() + lam)
                        else:
                            d[b] = state["P"][0 if plan.mode == "shared" else b] @ m[b]
                parts = layout.unflatten(out)
                directions.update({p: parts[n] for n, p in layer.named_params()})
            for p in group["params"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(directions[p], alpha=-group["lr"])
                self.state[p]["step"] = k + 1

    # ------------------------------------------------------------------ fast path
    def _get_buckets(self) -> list[list[_Bucket]]:
        """The buckets of every group, built on first use (after a load: from the state)."""
        if self._buckets is None:
            self._buckets = [self._build_buckets(runs) for runs in self._runs]
        return self._buckets

    def _build_buckets(self, runs: list[_Run]) -> list[_Bucket]:
        """Stack the runs of one group by (mode, size, device, dtype); link the state to them.

        Existing state tensors (after :meth:`load_state_dict`, or built by an earlier bucket
        layout) are copied in; afterwards ``optimizer.state`` holds views into the buckets.
        """
        keyed: dict[tuple, list[_Run]] = {}
        for run in runs:
            p = run.owner
            key = (run.plan.mode, run.plan.size, p.device, p.dtype)
            if run.plan.mode == "shared":
                key += (id(run),)
            keyed.setdefault(key, []).append(run)
        buckets = []
        for (mode, size, device, dtype, *_), members in keyed.items():
            total = sum(r.plan.count for r in members)
            stored = sum(r.plan.stored for r in members)
            new = {"device": device, "dtype": dtype}
            bucket = _Bucket(
                mode=mode,
                size=size,
                runs=[],
                momentum=torch.zeros(total, size, **new),
                stats=torch.zeros(stored, size, size, **new),
                inverse=None if mode == "adam" else torch.zeros(stored, size, size, **new),
                work=torch.empty(total, size, **new),
            )
            row = frow = 0
            for run in members:
                rows = slice(row, row + run.plan.count)
                frows = slice(frow, frow + run.plan.stored)
                row, frow = rows.stop, frows.stop
                bucket.runs.append((run, rows, frows))
                state = self.state[run.owner]
                for key, tensor in (("F", bucket.stats), ("P", bucket.inverse)):
                    if tensor is None:
                        continue
                    if key in state:
                        tensor[frows].copy_(state[key])
                    state[key] = tensor[frows]
                for slot in run.slots:
                    state = self.state[slot.param]
                    view = slot.view(bucket.momentum[rows])
                    if "momentum_buffer" in state:
                        view.copy_(state["momentum_buffer"])
                    state["momentum_buffer"] = view
                    bucket.params.append(slot.param)
            bucket.work_views = bucket.views(bucket.work)
            buckets.append(bucket)
        return buckets

    def _step_fast(self, active: list[int], sources: dict[int, Mapping[Tensor, Tensor]]):
        """Bucketed step (module docstring): gather, check, then update every bucket."""
        buckets = self._get_buckets()
        sums = []
        curvature: dict[int, Tensor] = {}
        for index in active:
            sampled = index in sources and self.param_groups[index]["fisher"] == "mc"
            for bucket in buckets[index]:
                grads = [p.grad for p in bucket.params]
                torch._foreach_copy_(bucket.work_views, grads)
                sums.append(bucket.work.sum())
                if sampled:
                    rows = torch.empty_like(bucket.work)
                    torch._foreach_copy_(
                        bucket.views(rows), [sources[index][p] for p in bucket.params]
                    )
                    sums.append(rows.sum())
                    curvature[id(bucket)] = rows
        # Screen: a NaN/Inf makes its bucket's sum non-finite (one host sync for all buckets);
        # only then are the gradients checked one by one, which raises naming the parameter
        # (an overflowing sum of finite values passes the exact check and the step goes on).
        if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
            self._check_finite(active, sources)
        for index in active:
            group = self.param_groups[index]
            k, lam = self._group_step(index), group["damping"]
            mu, tau, beta = group["momentum"], group["dampening"], group["stat_decay"]
            params: list[Tensor] = []
            directions: list[Tensor] = []
            for bucket in buckets[index]:
                if k == 0:
                    bucket.momentum.copy_(bucket.work)
                else:
                    bucket.momentum.mul_(mu).add_(bucket.work, alpha=1.0 - tau)
                if index in sources:
                    rows = curvature.get(id(bucket), bucket.work)
                    _fold_bucket(bucket, rows, beta, 1.0 - beta)
                if bucket.inverse is not None and k % group["inverse_period"] == 0:
                    bucket.inverse.copy_(damped_inverse(bucket.stats, lam))
                _direction_bucket(bucket, lam)
                params += bucket.params
                directions += bucket.work_views
            decoupled_update_(params, directions, group["lr"], group["weight_decay"])
            for p in group["params"]:
                self.state[p]["step"] = k + 1


def _by_layer(runs: list[_Run]) -> list[list[_Run]]:
    """Consecutive runs grouped by layer."""
    out: list[list[_Run]] = []
    for run in runs:
        if out and out[-1][0].layer is run.layer:
            out[-1].append(run)
        else:
            out.append([run])
    return out


def _fold_run_reference(
    state: dict[str, Any], run: _Run, sources: Mapping[Tensor, Tensor], keep: float, add: float
) -> None:
    """``F_b ← keep·F_b + add·u_b u_bᵀ`` block by block (``F̄`` averages over the rows)."""
    plan, layout = run.plan, run.layer.layout
    u = plan.split(layout.flatten({n: sources[p] for n, p in run.layer.named_params()}))
    if "F" not in state:
        state["F"] = u.new_zeros(plan.stored, plan.size, plan.size)
    F = state["F"]
    if plan.mode == "shared":
        mean_outer = sum(torch.outer(u_j, u_j) for u_j in u) / plan.count
        F[0] = keep * F[0] + add * mean_outer
    else:
        for b in range(plan.count):
            F[b] = keep * F[b] + add * torch.outer(u[b], u[b])


def _fold_bucket(bucket: _Bucket, rows: Tensor, keep: float, add: float) -> None:
    """``F ← keep·F + add·(u uᵀ)`` for all blocks of a bucket at once.

    Args:
        bucket: The bucket; ``bucket.stats`` is ``[B, s, s]`` (``[1, s, s]`` when shared).
        rows: ``u``, ``[B, s]``.
        keep, add: The EMA weights (``β``, ``1 − β``; ``1``, ``1`` for warm-start sums).
    """
    F = bucket.stats
    if bucket.mode == "shared":
        F[0].addmm_(rows.mT, rows, beta=keep, alpha=add / rows.shape[0])
    elif bucket.size == 1:
        F.view(-1).mul_(keep).addcmul_(rows.view(-1), rows.view(-1), value=add)
    else:
        F.mul_(keep).addcmul_(rows.unsqueeze(-1), rows.unsqueeze(-2), value=add)


def _direction_bucket(bucket: _Bucket, damping: float) -> None:
    """Write ``d_b`` of every block into ``bucket.work`` (``[B, s]``).

    ``P_b`` is symmetric, so ``d_b = P_b m_b`` is computed as the row product ``m_bᵀ P_b``:
    ``D = M P̄`` for a shared matrix, ``bmm(M.unsqueeze(1), P)`` for blocks (module docstring).
    """
    M, W = bucket.momentum, bucket.work
    if bucket.mode == "adam":
        torch.div(M, bucket.stats.view(-1, 1).sqrt().add_(damping), out=W)
    elif bucket.mode == "shared":
        torch.mm(M, bucket.inverse[0], out=W)
    elif bucket.size == 1:
        torch.mul(bucket.inverse.view(-1, 1), M, out=W)
    else:
        torch.bmm(M.unsqueeze(1), bucket.inverse, out=W.unsqueeze(1))


def mbf_true_step(
    optimizer: MBF,
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One MBF-True training step: forward, backward, sampled-label backward, :meth:`MBF.step`.

    The momentum uses the gradient of ``loss_fn(model(inputs), targets)``; on statistics steps
    (:meth:`MBF.needs_curvature_grads`) one extra backward pass computes
    ``ĝ = (1/m) Σ_n ∇ℓ(f(x_n), ŷ_n)`` with one label ``ŷ_n`` per input drawn from the model's
    predictive distribution (the convention of
    :func:`~mbf_analysis.curvature.collect.collect`'s ``sampled_grad``: MSE as ``½‖f − y‖²``).
    Under ``torch.distributed``, ``ĝ`` is averaged over the processes like DDP's gradients.

    Args:
        optimizer: An :class:`MBF` with ``fisher="mc"`` groups.
        model: The model (or its DDP wrapper).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: ``[m, *in_shape]``.
        targets: The real labels.
        generator: Randomness of the sampled labels.

    Returns:
        The (detached) loss on the real labels.
    """
    optimizer.zero_grad()
    outputs = model(inputs)
    loss = loss_fn(outputs, targets)
    needed = optimizer.needs_curvature_grads()
    loss.backward(retain_graph=needed)
    curvature = None
    if needed:
        params = [p for g in optimizer.param_groups for p in g["params"] if g["fisher"] == "mc"]
        grads = torch.autograd.grad(sampled_label_loss(loss_fn, outputs, generator), params)
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            for g in grads:
                dist.all_reduce(g)
                g.div_(world)
        curvature = dict(zip(params, grads, strict=True))
    optimizer.step(curvature_grads=curvature)
    return loss.detach()
