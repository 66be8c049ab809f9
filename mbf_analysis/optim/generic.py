r"""One ``torch.optim.Optimizer`` that trains with any method of :mod:`mbf_analysis.methods`.

:class:`MethodOptimizer` drives a registry method (or a :class:`~mbf_analysis.methods.Method`
instance) through its public interface only: it asks the method for the statistics it
:attr:`~mbf_analysis.methods.Method.needs`, hands it a
:class:`~mbf_analysis.curvature.collect.Stats` with :meth:`~mbf_analysis.methods.Method.update`,
takes :meth:`~mbf_analysis.methods.Method.direction` and applies it. It serves **every** name of
:func:`mbf_analysis.methods.names` (when this was written ``sgdm``, ``adam``, ``bdf``, ``mbf``,
``mbf-true``, ``mbf-exact``, ``kfac``, ``shampoo``, ``kpsvd``, ``deflation``, ``lanczos``,
``kfac-corrected``): a method trains the day it joins the registry, and the tests walk it.
Prefer the fast front-ends where they exist: :class:`~mbf_analysis.optim.MBF` (bucketed batched
blocks), :class:`~mbf_analysis.optim.KFAC` (factors from the training pass's own hooks, no
extra forward) and :class:`~mbf_analysis.optim.Shampoo` run the same formulas with less
overhead per step (tested to agree with this front-end); this one is for every other method
and for checking them. Its own overhead per step: flattening the gradients into layer vectors,
one host synchronisation (finiteness of the gradients), one for the direction (finiteness and
the KL clip), and on curvature steps one :func:`~mbf_analysis.curvature.collect.collect` pass
(a forward and one to three backward passes) on the Fisher batch.

**One step** ``k`` (``step(inputs=x, targets=y)`` after ``loss.backward()``):

1. ``g_l``: layer ``l``'s minibatch gradient, read from the parameters' ``.grad`` (the user's
   backward pass on the whole batch of ``m`` samples, averaged over the processes by DDP) and
   flattened in METHODS.md §2 order (:meth:`~mbf_analysis.layout.LayerLayout.flatten`). NaN or
   Inf: :class:`~mbf_analysis.errors.NonFiniteError` before anything changes.
2. When the method's next update reads curvature statistics (a *curvature step*, below): the
   Fisher batch is the first ``m_F = ⌈m · fisher_fraction⌉`` samples of ``(x, y)``. Under
   ``torch.distributed`` the global batch is the concatenation of the processes' batches in rank
   order, and the Fisher batch is its first ``⌈m_global · fisher_fraction⌉`` samples, gathered on
   every process (each sends only its part of them); every process then computes the statistics
   of that batch with process 0's generator, so they agree without averaging, and a run whose
   processes hold contiguous slices of a global batch (``mbf-analyze train`` under ``torchrun``)
   sees the Fisher batch of one process on the global batch.
   :func:`~mbf_analysis.curvature.collect.collect` runs on it with the optimizer's generator for
   the sampled labels, with the model in **eval mode** for the duration (**choice**: per-sample
   statistics need it, BatchNorm's running statistics are not touched by the extra pass, and no
   Dropout mask draws from the global RNG; the modules' train/eval flags are restored).
   ``collect`` leaves the parameters' ``.grad`` untouched. The method receives that ``Stats``
   with ``grad`` replaced by ``g``: every other field describes the Fisher batch
   (``batch_size = m_F``). On other steps it receives only ``g``.
3. ``D = method.direction()`` (the method's own first moment preconditioned; the momentum, EMA
   decays, damping and periods are the method's configuration).
4. KL clip (``kl_clip = c``; off with ``None``), with the learning rates folded in as in the
   KFAC code the Kronecker-SVD papers build on:

   .. math::

       \nu = \min\Bigl(1, \sqrt{c \,/\, \textstyle\sum_l \alpha_l^2 \,
       \lvert\langle g_l, D_l\rangle\rvert}\Bigr) \quad (\nu = 1 \text{ when the sum is } 0),

   ``α_l`` the learning rate of the param group holding layer ``l``. ``½ α²ν² ⟨g, D⟩`` is the
   predicted KL divergence of the step when ``D = F⁻¹g``; with momentum ``D = F⁻¹m`` and the
   formula is METHODS.md §6.1's ``⟨∇_l, D_l⟩``.
5. Per param group (decoupled weight decay ``γ``): ``θ ← (1 − αγ) θ − α ν D``.

**Curvature steps.** The interface has no call that says which statistics the *next* update
reads, so the front-end uses the registry's convention (:func:`next_needs`): a method reads the
statistics beyond ``grad`` only on the steps where one of its periods (the configuration's
``*_period`` fields: ``stat_period`` ``T1``, ``inverse_period`` ``T2``) divides ``k``, and at
every step if it has no period. On the other steps the ``Stats`` it receives holds those
statistics as empty mappings (no layer). That makes the papers' schedule cheap
(``stat_period = inverse_period = 100``: one collection every 100 steps). The step-by-step test
walks the registry against a loop that collects everything at every step, so a method that
breaks the convention fails it the day it lands.

**Schedule of the Kronecker methods** (METHODS.md §6.1), e.g. for KFAC::

    MethodOptimizer(model, "kfac", loss_fn=nn.BCEWithLogitsLoss(), lr=lr, kl_clip=0.01,
                    fisher_fraction=0.25, stat_period=100, inverse_period=100, momentum=0.9)

(the per-factor EMA ``ρ = min(1 − 1/k, 0.95)`` is a setting of the method that has it).

**Distributed** (``DistributedDataParallel``, any backend): the gradients arrive averaged; the
Fisher batches are all-gathered (step 2); the generator state of process 0 is broadcast to the
others before the first curvature step after construction or :meth:`load_state_dict`. Every
process then applies the same update, provided the curvature computation is deterministic
(CPU; on GPU ``torch.use_deterministic_algorithms(True)``). Pass the model or its DDP wrapper.

**Conventions.** The gradient is the user's (``.grad``: use a *mean* loss over the batch); the
curvature statistics follow METHODS.md §1 (e.g. MSE as ``½‖f − y‖²`` per sample, where
``nn.MSELoss()``'s gradient is ``2/D`` times that of the convention).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mbf_analysis import methods as registry
from mbf_analysis.curvature.collect import GRAD, Stats, collect
from mbf_analysis.curvature.losses import likelihood_of
from mbf_analysis.errors import ConfigError, NonFiniteError, UnknownNameError
from mbf_analysis.fisher_kinds import OLD_SPELLINGS
from mbf_analysis.methods import Method
from mbf_analysis.optim.common import (
    PlacedLayer,
    PlacedOptimizer,
    check_gradients,
    check_number,
    collective_device,
    decoupled_update_,
    distributed,
    global_head,
    place,
)

__all__ = ["MethodOptimizer", "next_needs"]

_KEYS = ("method", "method_config", "step", "generator", "fisher_fraction", "kl_clip")


def next_needs(method: Method) -> frozenset[str]:
    """The statistics ``method``'s next :meth:`~mbf_analysis.methods.Method.update` reads:
    :meth:`Method.next_needs <mbf_analysis.methods.Method.next_needs>` (by default the
    statistics beyond ``grad`` only on the steps the method's periods select)."""
    return method.next_needs()


class _NotCollected(Mapping):
    """An empty layer → statistic mapping for a statistic this step did not collect."""

    def __init__(self, need: str, step: int) -> None:
        self._need, self._step = need, step

    def __getitem__(self, layer: str) -> Tensor:
        raise UnknownNameError(
            f"statistic {self._need!r} was not collected at method step {self._step}: the "
            "front-end collects the statistics beyond 'grad' only on the steps the method's "
            "periods select (mbf_analysis.optim.generic.next_needs)."
        )

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@dataclass
class _StepStats(Stats):
    """:class:`Stats` whose statistics in ``skipped`` are empty (not collected this step)."""

    skipped: frozenset[str] = frozenset()
    step: int = 0

    def statistic(self, need: str) -> Any:
        if need in self.skipped:
            return _NotCollected(need, self.step)
        return super().statistic(need)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the block; each module's own flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _owned(vector: Tensor, sources: Iterable[Tensor]) -> Tensor:
    """``vector``, copied if it shares memory with one of ``sources`` (a view of a ``.grad``)."""
    pointer = vector.untyped_storage().data_ptr()
    if any(s.untyped_storage().data_ptr() == pointer for s in sources):
        return vector.clone()
    return vector


class MethodOptimizer(PlacedOptimizer):
    """Train with any registry method (module docstring for the step and its formulas).

    Example::

        opt = MethodOptimizer(model, "kfac", loss_fn=nn.CrossEntropyLoss(), lr=0.1,
                              stat_period=10, inverse_period=100)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step(inputs=x, targets=y)

    A closure may run the forward and backward pass instead:
    ``opt.step(closure, inputs=x, targets=y)``. ``inputs`` and ``targets`` are needed on
    curvature steps only (:meth:`needs_batch`); methods that read only the gradient (``sgdm``,
    ``adam``, ``mbf``, ``shampoo``) never need them.

    Args:
        model: The model (or its ``DistributedDataParallel`` wrapper). The method covers every
            layer with a trainable parameter, so the optimized parameters must be exactly the
            model's parameters with ``requires_grad``.
        method: A registry name (:func:`mbf_analysis.methods.names`) or a
            :class:`~mbf_analysis.methods.Method` instance (used as is, with its state).
        lr: ``α ≥ 0`` (per group).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``, the
            likelihood of the curvature statistics (its ``reduction`` is ignored); required
            when the method needs more than the gradient.
        weight_decay: Decoupled ``γ ≥ 0`` (per group).
        fisher_fraction: ``∈ (0, 1]``: the Fisher batch is the first ``⌈m · fraction⌉``
            samples (0.25: the Kronecker-SVD papers' ``m/4``; 1: the whole batch, as the fast
            front-ends).
        kl_clip: ``c > 0`` of the KL clip, or ``None`` (no clip).
        generator: The generator of the sampled labels, or an integer seed for a new one on
            the parameters' device. Its state is part of :meth:`state_dict`.
        params: Parameters or param groups (default: the model's trainable parameters); a
            layer's parameters must share one group.
        **method_config: Settings of the method when ``method`` is a name (e.g. ``damping``,
            ``stat_period``, ``inverse_period``, ``momentum``).

    Attributes:
        method: The :class:`~mbf_analysis.methods.Method` this optimizer drives.
        generator: The generator of the sampled labels.
        kl_scale: ``ν`` of the last step (1 without a clip; ``None`` before the first step).

    Raises:
        TypeError: For a model that is not a module, settings given with a method instance, an
            unknown method setting, an unsupported loss, or a parameter that is not
            float32/float64.
        KeyError: For an unknown method name.
        ValueError: For an invalid setting, a layer split over param groups, a trainable
            parameter that is not optimized (or the reverse), or a module without a mini-block
            layout.
    """

    OWNER = "MethodOptimizer"

    def __init__(
        self,
        model: nn.Module,
        method: str | Method,
        *,
        lr: float,
        loss_fn: nn.Module | None = None,
        weight_decay: float = 0.0,
        fisher_fraction: float = 0.25,
        kl_clip: float | None = None,
        generator: torch.Generator | int = 0,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        **method_config: Any,
    ) -> None:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if isinstance(method, Method):
            if method_config:
                raise TypeError(
                    f"{self.OWNER}: settings {sorted(method_config)} were given with a Method "
                    "instance; configure the instance, or pass the method's name."
                )
            self.method = method
        else:
            self.method = registry.get(method, **method_config)
        if self.method.needs - {GRAD}:
            if loss_fn is None:
                raise ConfigError(
                    f"{self.OWNER}: method {self.method.name!r} needs curvature statistics "
                    f"({sorted(self.method.needs - {GRAD})}); pass loss_fn (the likelihood: "
                    "nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss)."
                )
            likelihood_of(loss_fn)
        self._loss_fn = loss_fn
        self._check_front_end(fisher_fraction, kl_clip)
        self.fisher_fraction = fisher_fraction
        self.kl_clip = kl_clip
        self.kl_scale: float | None = None
        self._steps = 0
        self._synced = False
        defaults = {"lr": lr, "weight_decay": weight_decay}
        super().__init__(model, params, defaults)
        self._device = self._layers[0].params[0].device
        if isinstance(generator, torch.Generator):
            self.generator = generator
        elif isinstance(generator, int) and not isinstance(generator, bool):
            self.generator = torch.Generator(self._device).manual_seed(generator)
        else:
            raise TypeError(
                f"{self.OWNER}: generator must be a torch.Generator or an integer seed, got "
                f"{type(generator).__name__}."
            )

    # ------------------------------------------------------------------ set-up
    def _check_front_end(self, fisher_fraction: Any, kl_clip: Any) -> None:
        owner = self.OWNER
        check_number(
            owner, None, "fisher_fraction", fisher_fraction, low=0.0, low_open=True, high=1.0
        )
        if kl_clip is not None:
            check_number(owner, None, "kl_clip", kl_clip, low=0.0, low_open=True)

    def _check_settings(self, group: Mapping[str, Any], index: int | None) -> None:
        check_number(self.OWNER, index, "lr", group["lr"], low=0.0)
        check_number(self.OWNER, index, "weight_decay", group["weight_decay"], low=0.0)

    def _refresh_placement(self) -> None:
        """Place the parameters on the model's layers; every trainable one must be optimized."""
        placement = place(self._model, self.param_groups, self.OWNER)
        if placement.fallback_reasons:
            listing = "; ".join(f"'{n}' ({why})" for n, why in placement.fallback_reasons.items())
            raise ConfigError(
                f"{self.OWNER}: method {self.method.name!r} works on layers with a mini-block "
                f"layout, but {listing}. Freeze those parameters (requires_grad=False) before "
                "building the optimizer, or optimize every parameter of the module."
            )
        optimized = {p for g in self.param_groups for p in g["params"]}
        names = {p: n for n, p in self._model.named_parameters()}
        left_out = [n for p, n in names.items() if p.requires_grad and p not in optimized]
        frozen = [names[p] for p in optimized if not p.requires_grad]
        if left_out or frozen:
            raise ConfigError(
                f"{self.OWNER}: the method updates every layer with a trainable parameter "
                f"together, so the optimized parameters must be exactly the trainable ones; "
                f"trainable but not optimized: {left_out}, optimized but frozen: {frozen}. "
                "Set requires_grad=False on parameters to leave out (before building the "
                "optimizer), or add them to a param group."
            )
        self._names = placement.names
        self._layers: tuple[PlacedLayer, ...] = placement.layers
        self._layouts = {layer.name: layer.layout for layer in self._layers}

    def _after_load(self) -> None:
        for index, group in enumerate(self.param_groups):
            self._check_settings(group, index)

    # ------------------------------------------------------------------ public API
    def needs_batch(self) -> bool:
        """Whether the next :meth:`step` collects curvature statistics (needs the batch)."""
        return bool(next_needs(self.method) - {GRAD})

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Any:
        """One step of the method for every parameter (module docstring).

        Args:
            closure: Re-evaluates the model and runs the backward pass; called with gradients
                enabled before the step. Its return value is returned.
            inputs: The batch ``[m, *in_shape]`` whose gradient is in ``.grad``; needed on
                curvature steps (:meth:`needs_batch`).
            targets: Its labels ``[m]`` or ``[m, *out_shape]``.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: If a parameter has no (or a sparse) gradient.
            ValueError: If a curvature step lacks ``inputs``/``targets``.
            NonFiniteError: If a gradient or a statistic holds NaN/Inf (nothing changes), or
                the direction does (the method's state has then been updated, the parameters
                are unchanged).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._gradients()
        needs = next_needs(self.method)
        saved = self.generator.get_state()
        try:
            stats = self._statistics(needs, grads, inputs, targets)
            self.method.update(stats)
        except BaseException:
            self.generator.set_state(saved)
            raise
        directions = self.method.direction()
        scale = self._check_and_scale(grads, directions)
        for index, group in enumerate(self.param_groups):
            params, steps = [], []
            for layer in self._layers:
                if layer.group != index:
                    continue
                parts = layer.layout.unflatten(directions[layer.name])
                for name, p in layer.named_params():
                    params.append(p)
                    steps.append(parts[name] if scale == 1.0 else parts[name] * scale)
            decoupled_update_(params, steps, group["lr"], group["weight_decay"])
        self.kl_scale = scale
        self._steps += 1
        return loss

    # ------------------------------------------------------------------ the step's parts
    def _gradients(self) -> dict[str, Tensor]:
        """Layer → ``g_l`` ``[d_l]`` from ``.grad`` (checked: present, dense, finite)."""
        params = [p for layer in self._layers for p in layer.params]
        missing = [self._names[p] for p in params if p.grad is None]
        if missing:
            raise RuntimeError(
                f"{self.OWNER}: parameter(s) {missing} have no gradient; method "
                f"{self.method.name!r} updates every layer together. Run the backward pass "
                "before step() (or pass a closure that does), and freeze parameters the loss "
                "does not reach (requires_grad=False) before building the optimizer."
            )
        sparse = [self._names[p] for p in params if p.grad.is_sparse]
        if sparse:
            raise RuntimeError(f"{self.OWNER}: sparse gradients are not supported ({sparse}).")
        if not bool(torch.isfinite(torch.stack([p.grad.sum() for p in params])).all()):
            check_gradients(self.OWNER, {p: p.grad for p in params}, self._names)
        out = {}
        for layer in self._layers:
            named = {n: p.grad for n, p in layer.named_params()}
            out[layer.name] = _owned(layer.layout.flatten(named), named.values())
        return out

    def _statistics(
        self,
        needs: frozenset[str],
        grads: dict[str, Tensor],
        inputs: Tensor | None,
        targets: Tensor | None,
    ) -> _StepStats:
        """The ``Stats`` of this step: ``g`` plus, on curvature steps, the Fisher batch's."""
        skipped = frozenset(self.method.needs - needs)
        step = self.method.step
        if not needs - {GRAD}:
            size = 0 if inputs is None else len(inputs)
            return _StepStats(
                layouts=dict(self._layouts),
                grad=grads,
                loss=math.nan,
                batch_size=size,
                skipped=skipped,
                step=step,
            )
        if inputs is None or targets is None:
            raise ConfigError(
                f"{self.OWNER}: method {self.method.name!r} updates its curvature statistics at "
                f"this step (method step {step}); pass the batch whose gradient is in .grad: "
                "step(inputs=x, targets=y) (needs_batch() tells which steps need it)."
            )
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ConfigError(
                f"{self.OWNER}: inputs and targets must hold the same, positive number of "
                f"samples, got {len(inputs)} and {len(targets)}."
            )
        if distributed():
            device = collective_device(self._device)
            x, y = global_head(inputs.detach(), targets.detach(), self.fisher_fraction, device)
            self._sync_generator(device)
        else:
            count = math.ceil(len(inputs) * self.fisher_fraction)
            x, y = inputs[:count].detach(), targets[:count].detach()
        with _eval_mode(self._model):
            collected = collect(self._model, self._loss_fn, x, y, needs, generator=self.generator)
        values = {f.name: getattr(collected, f.name) for f in dataclasses.fields(Stats)}
        values["grad"] = grads
        return _StepStats(**values, skipped=skipped, step=step)

    def _sync_generator(self, device: torch.device) -> None:
        """Give every process process 0's generator state (once per construction or load)."""
        if self._synced:
            return
        state = self.generator.get_state().to(device)
        dist.broadcast(state, src=0)
        self.generator.set_state(state.cpu())
        self._synced = True

    def _check_and_scale(self, grads: dict[str, Tensor], directions: dict[str, Tensor]) -> float:
        """Refuse a non-finite direction; return the KL-clip factor ``ν`` (1 without a clip)."""
        sums = torch.stack([d.sum() for d in directions.values()])
        if not bool(torch.isfinite(sums).all()):
            bad = next(n for n, d in directions.items() if not bool(torch.isfinite(d).all()))
            raise NonFiniteError(
                f"{self.OWNER}: the direction of method {self.method.name!r} for layer '{bad}' "
                "contains NaN or Inf; no parameter was changed (the method's state was "
                "updated). Raise the damping or lower the learning rate."
            )
        if self.kl_clip is None:
            return 1.0
        lr = {layer.name: self.param_groups[layer.group]["lr"] for layer in self._layers}
        dots = torch.stack(
            [torch.dot(grads[n], d).abs() * lr[n] ** 2 for n, d in directions.items()]
        )
        total = float(dots.sum())
        if total == 0:
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / total))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (``torch.save``-able).

        Returns:
            ``{"state": {}, "param_groups": [...]}`` (torch's; the groups hold ``lr`` and
            ``weight_decay``) plus ``"method"`` (the method's
            :meth:`~mbf_analysis.methods.Method.state_dict`: name, step, state tensors),
            ``"method_config"`` (its configuration as a dict), ``"step"`` (steps of this
            optimizer), ``"generator"`` (the sampled-label generator's state, a CPU
            ``uint8`` tensor), ``"fisher_fraction"`` and ``"kl_clip"``.
        """
        out = super().state_dict()
        out.update(
            method=self.method.state_dict(),
            method_config=dataclasses.asdict(self.method.config),
            step=self._steps,
            generator=self.generator.get_state(),
            fisher_fraction=self.fisher_fraction,
            kl_clip=self.kl_clip,
        )
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (deep copies; nothing changes if it is refused).

        The param-group settings, ``fisher_fraction`` and ``kl_clip`` are taken from the
        state; the method and its configuration must be the ones the state was saved with.

        Raises:
            ValueError: If the state lacks keys, belongs to another method or configuration,
                holds an invalid generator state or invalid settings.
        """
        missing = [key for key in _KEYS if key not in state_dict]
        if missing:
            raise ConfigError(
                f"{self.OWNER}: the state lacks {missing}; it was not saved by a "
                "MethodOptimizer's state_dict()."
            )
        saved = state_dict["method"]
        if saved.get("method") != self.method.name:
            raise ConfigError(
                f"{self.OWNER}: the state was saved for method {saved.get('method')!r}, this "
                f"optimizer drives {self.method.name!r}."
            )
        config = dataclasses.asdict(self.method.config)
        saved_config = {  # a state saved before the Fisher kinds were renamed ("true")
            key: OLD_SPELLINGS.get(value, value) if key in ("fisher", "statistic") else value
            for key, value in state_dict["method_config"].items()
        }
        differ = {
            key: (value, config.get(key))
            for key, value in saved_config.items()
            if config.get(key) != value
        }
        if differ or set(config) != set(saved_config):
            listing = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ConfigError(
                f"{self.OWNER}: method {self.method.name!r} was configured differently when the "
                f"state was saved ({listing or 'other fields'}); build the optimizer with the "
                "saved settings to resume."
            )
        generator = state_dict["generator"]
        try:
            torch.Generator(self.generator.device).set_state(generator)
        except (RuntimeError, TypeError) as error:
            raise ConfigError(
                f"{self.OWNER}: invalid generator state in the state: {error}"
            ) from None
        self._check_front_end(state_dict["fisher_fraction"], state_dict["kl_clip"])
        super().load_state_dict({k: state_dict[k] for k in ("state", "param_groups")})
        self.method.load_state_dict(saved)
        self.generator.set_state(generator.clone())
        self._steps = int(state_dict["step"])
        self.fisher_fraction = state_dict["fisher_fraction"]
        self.kl_clip = state_dict["kl_clip"]
        self._synced = False
