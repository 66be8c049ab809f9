"""What the optimizer front-ends share: placing parameters, validating settings, applying steps.

- :func:`place` pairs every optimized parameter with its layer through
  :func:`~mbf_analysis.layout.layout_of` (so that a Linear weight and its bias form the
  mini-blocks ``[W[j, :], b[j]]``), and gives parameters without a layout a synthetic one-parameter
  layout flagged as a *fallback*;
- ``check_*`` validate hyper-parameters with messages that name the setting and the group;
- :func:`check_gradients` refuses NaN/Inf gradients (naming the parameter) before any state changes;
- :func:`decoupled_update_` applies ``θ ← (1 − αγ) θ`` then ``θ ← θ − α d`` with
  ``torch._foreach_*`` kernels;
- :func:`sampled_label_loss` is the mean loss on labels sampled from the model, whose backward
  pass gives the true-Fisher statistics of MBF-True and of KFAC with ``fisher="mc"``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from mbf_analysis.curvature.losses import likelihood_of
from mbf_analysis.errors import ConfigError, NonFiniteError, UnsupportedModuleError
from mbf_analysis.layout import BlockGroup, LayerLayout, layout_of
from mbf_analysis.linalg import all_finite

__all__ = [
    "CheckedLoad",
    "PlacedOptimizer",
    "check_curvature_settings",
    "PlacedLayer",
    "Placement",
    "place",
    "check_number",
    "check_period",
    "check_choice",
    "check_bool",
    "check_params",
    "check_gradients",
    "group_gradients",
    "decoupled_update_",
    "resolve_params",
    "sampled_label_loss",
    "warn_fallback",
]


@dataclass(frozen=True, eq=False)
class PlacedLayer:
    """One layer (or one fallback parameter) and the parameter group that holds it.

    Attributes:
        layout: The layer's mini-block layout; for a fallback parameter a synthetic layout of
            kind ``"diagonal"`` with one parameter and one block group of ``numel`` size-1
            blocks keyed by the parameter's name.
        group: Index of the parameter group that holds every parameter of the layer.
        params: The parameters, in ``layout.param_names`` order.
        fallback: Whether the layer is a fallback parameter (no layout of its own).
        module: The module owning the parameters (``None`` for a fallback parameter).
    """

    layout: LayerLayout
    group: int
    params: tuple[Tensor, ...]
    fallback: bool
    module: nn.Module | None

    @property
    def name(self) -> str:
        """The layer's name (module name, or parameter name for a fallback)."""
        return self.layout.name

    def named_params(self) -> list[tuple[str, Tensor]]:
        """``(qualified name, parameter)`` pairs in layout order."""
        return list(zip(self.layout.param_names, self.params, strict=True))


@dataclass(frozen=True)
class Placement:
    """Where every optimized parameter sits.

    Attributes:
        layers: Placed layers in model order (fallback parameters where their module appears).
        names: Parameter → its qualified name in the model.
        fallback_reasons: Fallback parameter name → why it has no layout.
    """

    layers: tuple[PlacedLayer, ...]
    names: dict[Tensor, str]
    fallback_reasons: dict[str, str]


def _fallback_layout(name: str, param: Tensor) -> LayerLayout:
    numel = param.numel()
    return LayerLayout(
        name, "diagonal", (name,), (tuple(param.shape),), (BlockGroup(name, numel, 1, 0),)
    )


def place(model: nn.Module, param_groups: Sequence[Mapping[str, Any]], owner: str) -> Placement:
    """Pair the optimized parameters with their layers.

    A module's parameters form one placed layer when the module has a layout
    (:data:`~mbf_analysis.layout.SUPPORTED_MODULES`), all of its parameters are optimized and none
    is shared with a module met earlier. Otherwise each of its optimized parameters is a fallback
    (a parameter shared by several modules stays with the first one, in ``named_modules`` order).

    Args:
        model: The model whose parameters are optimized.
        param_groups: The optimizer's parameter groups (dicts with ``"params"``).
        owner: The optimizer's name, for messages.

    Returns:
        The :class:`Placement`.

    Raises:
        ValueError: If a parameter is not a parameter of ``model``, or the parameters of one
            layer are spread over several parameter groups.
    """
    group_of = {p: i for i, g in enumerate(param_groups) for p in g["params"]}
    names = {p: n for n, p in model.named_parameters() if p in group_of}
    stray = [i for p, i in group_of.items() if p not in names]
    if stray:
        raise ConfigError(
            f"{owner}: {len(stray)} optimized parameter(s) (in param group(s) "
            f"{sorted(set(stray))}) are not parameters of the model; pass the model whose "
            "parameters are optimized."
        )
    layers: list[PlacedLayer] = []
    reasons: dict[str, str] = {}
    claimed: set[Tensor] = set()
    for module_name, module in model.named_modules():
        own = [p for _, p in module.named_parameters(recurse=False)]
        mine = [p for p in own if p in group_of and p not in claimed]
        if not mine:
            continue
        try:
            layout = layout_of(module_name, module)
            reason = None
        except UnsupportedModuleError:
            layout, reason = None, f"{type(module).__name__} has no mini-block layout"
        if layout is not None and len(mine) < len(own):
            layout, reason = None, f"only some parameters of {type(module).__name__} are optimized"
        if layout is None:
            for p in mine:
                reasons[names[p]] = reason
                fake = _fallback_layout(names[p], p)
                layers.append(PlacedLayer(fake, group_of[p], (p,), True, None))
                claimed.add(p)
            continue
        by_name = dict(module.named_parameters(recurse=False))
        prefix = f"{module_name}." if module_name else ""
        params = tuple(by_name[n.removeprefix(prefix)] for n in layout.param_names)
        groups = {group_of[p] for p in params}
        if len(groups) > 1:
            listing = ", ".join(f"'{names[p]}' in group {group_of[p]}" for p in params)
            raise ConfigError(
                f"{owner}: the parameters of layer '{module_name}' ({type(module).__name__}) are "
                f"in different param groups ({listing}); a weight and its bias share mini-blocks "
                "and must be in the same param group."
            )
        layers.append(PlacedLayer(layout, group_of[params[0]], params, False, module))
        claimed.update(params)
    return Placement(tuple(layers), names, reasons)


def warn_fallback(owner: str, reasons: Mapping[str, str], treatment: str) -> None:
    """One warning listing every fallback parameter and why it has no layout."""
    if not reasons:
        return
    listing = "; ".join(f"'{name}' ({why})" for name, why in reasons.items())
    warnings.warn(
        f"{owner}: {len(reasons)} parameter(s) have no mini-block layout and fall back to "
        f"{treatment}: {listing}.",
        UserWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------- validation
def _where(owner: str, group: int | None) -> str:
    return owner if group is None else f"{owner} (param group {group})"


def check_number(
    owner: str,
    group: int | None,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in the given interval."""
    where = _where(owner, group)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigError(f"{where}: {name} must lie in {left}{lo}, {hi}{right}, got {value!r}.")


def check_period(owner: str, group: int | None, name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``≥ 1``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{_where(owner, group)}: {name} must be a positive integer (a period in steps), "
            f"got {value!r}."
        )


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {choices}, got {value!r}.")


def check_bool(owner: str, group: int | None, name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(owner, group)}: {name} must be True or False, got {value!r}.")


def check_curvature_settings(owner: str, group: Mapping[str, Any], index: int | None) -> None:
    """Validate the settings every curvature optimizer shares.

    ``lr ≥ 0``, ``momentum ∈ [0, 1)``, ``dampening ∈ [0, 1]``, ``stat_decay ∈ [0, 1)``,
    ``weight_decay ≥ 0`` and the periods ``stat_period, inverse_period ≥ 1``.
    """
    check_number(owner, index, "lr", group["lr"], low=0.0)
    check_number(owner, index, "momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    check_number(owner, index, "dampening", group["dampening"], low=0.0, high=1.0)
    check_number(owner, index, "stat_decay", group["stat_decay"], low=0.0, high=1.0, high_open=True)
    check_number(owner, index, "weight_decay", group["weight_decay"], low=0.0)
    check_period(owner, index, "stat_period", group["stat_period"])
    check_period(owner, index, "inverse_period", group["inverse_period"])


def resolve_params(
    model: nn.Module, params: Iterable[Tensor] | Iterable[dict[str, Any]] | None, owner: str
) -> list[Tensor] | list[dict[str, Any]]:
    """The ``params`` argument of ``torch.optim.Optimizer``: default, the trainable parameters.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If there is nothing to optimize, or a parameter is not float32/float64.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}.")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ConfigError(f"{owner}: no parameters to optimize.")
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    check_params(owner, tensors)
    return params


def check_params(owner: str, params: Sequence[Tensor]) -> None:
    """Raise for parameters that are not float32 or float64 or that appear twice.

    Raises:
        TypeError: For a dtype other than float32 and float64.
        ValueError: For a duplicate.
    """
    if len({id(p) for p in params}) != len(params):
        raise ConfigError(f"{owner}: a parameter appears twice in the parameters to optimize.")
    for p in params:
        if isinstance(p, Tensor) and p.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{owner}: parameters must be float32 or float64, got {p.dtype} for a parameter "
                f"of shape {tuple(p.shape)}."
            )


# ----------------------------------------------------------------------------- gradients
def group_gradients(owner: str, group: Mapping[str, Any], names: Mapping[Tensor, str]) -> bool:
    """Whether a parameter group takes part in this step.

    Returns:
        ``True`` if every parameter of the group has a gradient, ``False`` if none has.

    Raises:
        RuntimeError: If only some have one (the others are named), or a gradient is sparse.
    """
    params = group["params"]
    missing = [names.get(p, "?") for p in params if p.grad is None]
    if len(missing) == len(params):
        return False
    if missing:
        raise RuntimeError(
            f"{owner}: parameter(s) {missing} have no gradient while the others of their param "
            "group do; the group's blocks are updated together. Freeze unused parameters "
            "(requires_grad=False) or put them in a separate param group."
        )
    sparse = [names.get(p, "?") for p in params if p.grad.is_sparse]
    if sparse:
        raise RuntimeError(f"{owner}: sparse gradients are not supported (parameters {sparse}).")
    return True


def check_gradients(
    owner: str, grads: Mapping[Tensor, Tensor], names: Mapping[Tensor, str], what: str = "gradient"
) -> None:
    """Raise :class:`~mbf_analysis.errors.NonFiniteError` naming the first non-finite tensor.

    One fused norm decides the common all-finite case (:func:`~mbf_analysis.linalg.all_finite`);
    only then are the tensors looked at one by one, to name the culprit.

    Args:
        owner: The optimizer's name, for the message.
        grads: Parameter → its gradient (or any tensor shaped like it).
        names: Parameter → name.
        what: What the tensors are, for the message.
    """
    if all_finite(list(grads.values())):
        return
    for p, g in grads.items():
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError(
                f"{owner}: the {what} of parameter '{names.get(p, '?')}' contains NaN or Inf; "
                "the step was refused and no parameter or state was changed. Check the inputs, "
                "the learning rate and the loss."
            )


def decoupled_update_(
    params: Sequence[Tensor], directions: Sequence[Tensor], lr: float, weight_decay: float
) -> None:
    """``θ ← (1 − αγ) θ`` then ``θ ← θ − α d`` for every parameter (decoupled weight decay).

    Args:
        params: ``θ``, updated in place.
        directions: ``d``, shaped like ``params``.
        lr: ``α``.
        weight_decay: ``γ``.
    """
    with torch.no_grad():
        if weight_decay != 0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_add_(params, directions, alpha=-lr)


def refuse_true_fisher(owner: str, value: object) -> None:
    """Refuse the earlier ``true_fisher=`` keyword with the word that replaced it."""
    if value is not None:
        word = "mc" if value else "empirical"
        raise ConfigError(
            f"{owner}: true_fisher= is now fisher= (one vocabulary, mbf_analysis.fisher_kinds): "
            f"true_fisher={value!r} is fisher={word!r}."
        )


def migrate_fisher_setting(group: dict[str, Any]) -> None:
    """A param group loaded from a state saved with ``true_fisher`` (or before it): ``fisher``."""
    if "fisher" not in group:
        group["fisher"] = "mc" if group.pop("true_fisher", False) else "empirical"
    group.pop("true_fisher", None)


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group of more than one process is open."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def batch_sizes(n: int, device: torch.device) -> list[int]:
    """Every process's batch size ``n_r``, in rank order (one all-gather)."""
    size = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def gather_batch(tensor: Tensor, device: torch.device) -> Tensor:
    """Every process's ``[n_r, *]`` concatenated in rank order (the ``n_r`` may differ)."""
    local = tensor.to(device)
    counts = batch_sizes(len(local), device)
    padded = local.new_zeros(max(counts), *local.shape[1:])
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def global_head(
    inputs: Tensor, targets: Tensor, fraction: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The first ``⌈N · fraction⌉`` samples of the global batch (the processes' ``[n_r, *]``
    batches concatenated in rank order, ``N = Σ_r n_r``), on every process."""
    counts = batch_sizes(len(inputs), device)
    head = math.ceil(sum(counts) * fraction)
    rank = dist.get_rank()
    keep = max(0, min(counts[rank], head - sum(counts[:rank])))
    return gather_batch(inputs[:keep], device), gather_batch(targets[:keep], device)


def collective_device(device: torch.device) -> torch.device:
    """Where the tensors of a collective live: ``device`` under nccl, the CPU under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def sampled_label_loss(
    loss_fn: nn.Module, outputs: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``L̂ = (1/m) Σ_n ℓ(f_n, ŷ_n)`` with one label ``ŷ_n ~ p(· | f_n)`` per sample.

    The labels come from :meth:`~mbf_analysis.curvature.losses.Likelihood.sample_targets` and
    ``ℓ`` follows METHODS.md §1 (MSE as ``½‖f − ŷ‖²``; ``loss_fn``'s ``reduction`` is ignored),
    so ``∇L̂`` is the ``sampled_grad`` of :func:`~mbf_analysis.curvature.collect.collect` and
    ``m · ∂L̂/∂s`` its per-sample pre-activation gradient. With the same generator state the
    labels are those ``collect`` draws from the same outputs.

    Under ``torch.distributed`` the labels are drawn for the global batch (every process's
    outputs gathered in rank order) and each process keeps its slice: with the same generator
    state on every process, the labels are those of one process on the global batch.

    Args:
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        outputs: ``f``, ``[m, C]`` (``[m, *]`` for MSE and BCE), attached to the graph.
        generator: Randomness of the sampled labels.

    Returns:
        The scalar ``L̂`` (differentiable with respect to ``outputs``).

    Raises:
        TypeError: For an unsupported loss module (see
            :func:`~mbf_analysis.curvature.losses.likelihood_of`).
    """
    likelihood = likelihood_of(loss_fn)
    if distributed():
        device = collective_device(outputs.device)
        counts = batch_sizes(len(outputs), device)
        everything = gather_batch(outputs.detach(), device).to(outputs.device)
        start = sum(counts[: dist.get_rank()])
        sampled = likelihood.sample_targets(everything, generator)[start : start + len(outputs)]
    else:
        sampled = likelihood.sample_targets(outputs, generator)
    return likelihood.summed_loss()(outputs, sampled) * (likelihood.grad_scale / len(outputs))


class CheckedLoad(Optimizer):
    """``load_state_dict`` that deep-copies its input and rolls back if the result is invalid.

    Subclasses implement :meth:`_after_load`, which validates the loaded settings and state and
    raises ``ValueError`` to refuse them; the optimizer then keeps its previous state.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()`` (never aliased with the source).

        Raises:
            ValueError: If :meth:`_after_load` refuses the loaded state (nothing changes).
        """
        previous = {"state": self.state, "param_groups": self.param_groups}
        super().load_state_dict(copy.deepcopy(state_dict))
        try:
            self._after_load()
        except Exception:
            Optimizer.__setstate__(self, previous)
            raise

    def _after_load(self) -> None:
        """Validate the loaded settings and state; raise ``ValueError`` to refuse them."""
        raise NotImplementedError


class PlacedOptimizer(CheckedLoad):
    """An optimizer whose parameters are placed on the model's layers (:func:`place`).

    Subclasses set ``OWNER``, implement :meth:`_check_settings` and :meth:`_refresh_placement`,
    and set ``self._ready = True`` once their constructor has built the placement.
    """

    OWNER = "optimizer"
    _ready = False

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
    ) -> None:
        """Validate ``defaults``, build the param groups, then place them on ``model``'s layers."""
        self._model = model
        self._warned: set[str] = set()
        self._check_settings(defaults, None)
        super().__init__(resolve_params(model, params, self.OWNER), defaults)
        self._ready = True
        self._refresh_placement()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (validated; its layers must not be split with other groups)."""
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            check_params(self.OWNER, group["params"])
            self._check_settings(group, len(self.param_groups) - 1)
            if self._ready:
                self._refresh_placement()
        except Exception:
            self.param_groups.pop()
            raise

    def _check_settings(self, group: Mapping[str, Any], index: int | None) -> None:
        raise NotImplementedError

    def _refresh_placement(self) -> None:
        raise NotImplementedError
