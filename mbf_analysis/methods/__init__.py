"""Preconditioning methods behind one interface, and their registry (METHODS.md §3–4).

>>> from mbf_analysis import methods
>>> methods.names()  # doctest: +NORMALIZE_WHITESPACE
['sgdm', 'adam', 'bdf', 'mbf', 'mbf-true', 'mbf-exact', 'kfac', 'shampoo', 'kpsvd',
 'deflation', 'lanczos', 'kfac-corrected', 'kfac-two-level']
>>> mbf = methods.get("mbf", damping=1e-3)

A method declares the statistics it needs (:attr:`Method.needs`);
:func:`~mbf_analysis.curvature.collect.collect` computes the union for a set of methods in one
pass, and each method folds them in with :meth:`Method.update` and returns per-layer directions
with :meth:`Method.direction`. :func:`build_methods` builds several methods from shared and
per-method settings; :func:`directions` builds, updates and asks them for one batch in one-shot
form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mbf_analysis.curvature.collect import Stats, collect
from mbf_analysis.errors import ConfigError, UnknownNameError
from mbf_analysis.methods.adam import Adam, AdamConfig
from mbf_analysis.methods.base import Method, MethodConfig, momentum_
from mbf_analysis.methods.bdf import BDF, BDFConfig
from mbf_analysis.methods.kfac import KFAC, KFACConfig
from mbf_analysis.methods.kronecker_svd import KroneckerSVD, KroneckerSVDConfig
from mbf_analysis.methods.mbf import (
    MBF,
    BlockPlan,
    MBFConfig,
    SpatialAveraging,
    adam_like,
    ema_outer_,
    inverse_by_size,
    plan_blocks,
    precondition,
)
from mbf_analysis.methods.ngd import NGD, NGDConfig
from mbf_analysis.methods.sgdm import SGDM, SGDMConfig
from mbf_analysis.methods.shampoo import Shampoo, ShampooConfig
from mbf_analysis.methods.two_level import COARSE_SPACES, TwoLevelKFAC, TwoLevelKFACConfig

__all__ = [
    "Adam",
    "AdamConfig",
    "BDF",
    "BDFConfig",
    "NGD",
    "NGDConfig",
    "BlockPlan",
    "KFAC",
    "KFACConfig",
    "KroneckerSVD",
    "KroneckerSVDConfig",
    "MBF",
    "MBFConfig",
    "Method",
    "MethodConfig",
    "SGDM",
    "SGDMConfig",
    "Shampoo",
    "ShampooConfig",
    "SpatialAveraging",
    "Stats",
    "TWO_LEVEL_VARIANT",
    "TwoLevelKFAC",
    "TwoLevelKFACConfig",
    "adam_like",
    "build_methods",
    "config_class",
    "directions",
    "ema_outer_",
    "get",
    "inverse_by_size",
    "momentum_",
    "names",
    "plan_blocks",
    "precondition",
    "resolve",
    "variants",
]


@dataclass(frozen=True)
class _Entry:
    cls: Callable[..., Method]
    config: type[MethodConfig]
    fixed: Mapping[str, Any]


_REGISTRY: dict[str, _Entry] = {
    "sgdm": _Entry(SGDM, SGDMConfig, {}),
    "adam": _Entry(Adam, AdamConfig, {}),
    "bdf": _Entry(BDF, BDFConfig, {}),
    "mbf": _Entry(MBF, MBFConfig, {"statistic": "minibatch"}),
    "mbf-true": _Entry(MBF, MBFConfig, {"statistic": "mc"}),
    "mbf-exact": _Entry(MBF, MBFConfig, {"statistic": "per_sample"}),
    "kfac": _Entry(KFAC, KFACConfig, {}),
    "shampoo": _Entry(Shampoo, ShampooConfig, {}),
    "kpsvd": _Entry(KroneckerSVD, KroneckerSVDConfig, {"approximation": "kpsvd"}),
    "deflation": _Entry(KroneckerSVD, KroneckerSVDConfig, {"approximation": "deflation"}),
    "lanczos": _Entry(KroneckerSVD, KroneckerSVDConfig, {"approximation": "lanczos"}),
    "kfac-corrected": _Entry(KroneckerSVD, KroneckerSVDConfig, {"approximation": "kfac-corrected"}),
    "kfac-two-level": _Entry(TwoLevelKFAC, TwoLevelKFACConfig, {}),
    "ngd": _Entry(NGD, NGDConfig, {}),
}


def names() -> list[str]:
    """The registered method names, in a fixed order."""
    return list(_REGISTRY)


TWO_LEVEL_VARIANT = "kfac-two-level-{coarse}"
"""The name of two-level KFAC with one coarse space, e.g. ``"kfac-two-level-residual"``."""


def variants() -> list[str]:
    """Method names that are a registered method with fixed settings: one
    ``"kfac-two-level-<coarse>"`` per coarse space of
    :data:`~mbf_analysis.methods.two_level.COARSE_SPACES`, so that one analysis can compare
    several coarse spaces side by side."""
    return [TWO_LEVEL_VARIANT.format(coarse=coarse) for coarse in COARSE_SPACES]


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """``(registered name, fixed settings)`` of a method name: a registered name (:func:`names`)
    is itself with no settings, ``"kfac-two-level-<coarse>"`` is ``("kfac-two-level",
    {"coarse": coarse})``.

    Raises:
        KeyError: For a name that is neither (the message lists both kinds).
    """
    if name in _REGISTRY:
        return name, {}
    for coarse in COARSE_SPACES:
        if name == TWO_LEVEL_VARIANT.format(coarse=coarse):
            return "kfac-two-level", {"coarse": coarse}
    raise UnknownNameError(f"unknown method {name!r}; choose one of {names()} or {variants()}.")


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown method {name!r}; choose one of {names()}.")
    return _REGISTRY[name]


def config_class(name: str) -> type[MethodConfig]:
    """The configuration dataclass of method ``name``."""
    return _entry(name).config


def get(name: str, **config: Any) -> Method:
    """Build method ``name`` with the given configuration fields.

    Args:
        name: One of :func:`names`.
        **config: Fields of the method's configuration dataclass (validated there).

    Raises:
        KeyError: For an unknown method.
        TypeError: For a field the configuration does not have (or one the name fixes, such as
            ``statistic`` of ``"mbf-true"``).
        ValueError: For an invalid value.
    """
    entry = _entry(name)
    allowed = entry.config.field_names() - set(entry.fixed)
    unknown = set(config) - allowed
    if unknown:
        raise TypeError(
            f"method {name!r} has no setting(s) {sorted(unknown)}; its settings are "
            f"{sorted(allowed)}."
        )
    return entry.cls(entry.config(**config, **entry.fixed), name=name)


def build_methods(names: str | Iterable[str], **config: Any) -> dict[str, Method]:
    """Build several methods at once from shared and per-method settings.

    Args:
        names: Method names (see :func:`names`), in the order of the returned dict.
        **config: Either a configuration field, applied to every selected method that has it
            (e.g. ``damping=1e-3``; it must belong to at least one), or a method name mapping
            to that method's own fields, which take precedence (e.g.
            ``kfac={"damping_mode": "eigen"}``; pass names with a dash as
            ``**{"mbf-true": {...}}``).

    Returns:
        Name → a fresh method (no state yet).

    Raises:
        KeyError: For an unknown method name.
        ValueError: For per-method settings of a method that is not selected.
        TypeError: For a shared setting that no selected method has, or a per-method field
            that method does not have.
    """
    selected = [names] if isinstance(names, str) else list(names)
    for name in selected:
        _entry(name)
    shared = {k: v for k, v in config.items() if k not in _REGISTRY}
    per_method = {k: dict(v) for k, v in config.items() if k in _REGISTRY}
    stray = set(per_method) - set(selected)
    if stray:
        raise ConfigError(f"settings given for method(s) {sorted(stray)} that are not selected.")
    unused = {
        key for key in shared if not any(key in _entry(n).config.field_names() for n in selected)
    }
    if unused:
        raise TypeError(f"no selected method {selected} has the setting(s) {sorted(unused)}.")
    built = {}
    for name in selected:
        fields = _entry(name).config.field_names()
        options = {k: v for k, v in shared.items() if k in fields} | per_method.get(name, {})
        built[name] = get(name, **options)
    return built


def directions(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    names: str | Iterable[str],
    *,
    generator: torch.Generator | None = None,
    **config: Any,
) -> dict[str, dict[str, Tensor]]:
    """The one-shot direction of each method for this batch alone.

    One-shot: statistics from this batch only, no history and no momentum. Every EMA statistic is
    replaced by the batch's statistic (decay ``β = 0``, the same as a first update with bias
    correction) and the momentum is the gradient, ``m = g`` (see
    :meth:`MethodConfig.one_shot`); Adam becomes ``g / (|g| + ε)``. All methods share one
    collection pass.

    Args:
        model, loss_fn, inputs, targets: As for :func:`~mbf_analysis.curvature.collect.collect`.
        names: Method names (see :func:`names`).
        generator: Randomness of the sampled labels (MBF-True, true-Fisher KFAC).
        **config: Shared and per-method settings, as for :func:`build_methods`.

    Returns:
        Method → layer → direction ``[d]`` (METHODS §2 order, as
        :meth:`~mbf_analysis.layout.LayerLayout.flatten`).
    """
    built = build_methods(names, **config)
    for method in built.values():
        method.config = method.config.one_shot()
    needs = frozenset().union(*(m.needs for m in built.values()))
    stats = collect(model, loss_fn, inputs, targets, needs, generator=generator)
    out = {}
    for name, method in built.items():
        method.update(stats)
        out[name] = method.direction()
    return out
