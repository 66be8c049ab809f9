"""Hyper-parameters per (problem, optimizer): the paper's best values, its schedules and grids.

Sources (paper text, Appendix 11.2/11.3 and §6):

- **Table 4** (autoencoders, best ``(lr, damping)``; damping is ``ε`` for Adam and Shampoo);
- **Table 8** (CNNs, best ``(lr, weight decay)``);
- **Tables 5 and 7**: the grids searched (:data:`GRIDS`, used by
  :func:`~mbf_analysis.training.grid_search`);
- §6 and Appendix 11.3 for the rest. CNNs: MBF damping 0.003, KFAC damping 0.03, Adam ``ε`` 1e-8;
  ``T1 = 10``, ``T2 = 100``; the LR decays by 0.1 every ``K`` epochs, ``K = 40`` (SGD-m, Adam),
  50 (MBF), 60 (KFAC, Shampoo) on VGG16/VGG11 and 40, 60, 80 on ResNet32; SGD-m and Adam run
  200 epochs, KFAC and Shampoo 100, MBF 150 (VGG) or 200 (ResNet32). Autoencoders: no weight
  decay, no schedule, runs of 500 s (MNIST, CURVES) and 2000 s (FACES).

Choices of ours, where the text is silent or lost:

- autoencoder periods ``T1 = 1``, ``T2 = 20`` for MBF, KFAC and Shampoo (METHODS.md §3);
- Shampoo's ``ε`` on the CNNs (lost in the text): 1e-4;
- KFAC: the paper's *true-Fisher* KFAC (``fisher="mc"``: ``G`` from one label per input
  sampled from the model, an extra backward pass on statistics steps, METHODS.md §4) on every
  problem; ``damping_mode="split"`` (damped factors inverted, ``π``-split) on the autoencoders
  and ``"eigen"`` on the CNNs, as the paper describes; the paper's KFAC warm start is not done
  (:class:`~mbf_analysis.optim.KFAC` has none); its statistics start from 0;
- MBF's warm start (the paper: one pass over the data set) on the autoencoders: one epoch of
  batches, outside the run's clock (the log's ``warm_start`` row); none on the CNNs (an epoch
  of CIFAR costs minutes);
- MBF's spatial averaging (METHODS.md §3; the paper averages "the wide autoencoder layers" and
  VGG's 4096-wide layers without a rule), an explicit option of every MBF preset
  (``options["spatial_averaging"]``, a :class:`~mbf_analysis.methods.mbf.SpatialAveraging`):
  :data:`AUTOENCODER_AVERAGING` on the autoencoders, every Linear layer whose input and output
  widths are both ≥ 250 (MNIST: fc1, fc2, fc3, fc6, fc7, fc8; per-neuron blocks for fc4
  250 → 30 and fc5 30 → 250; FACES: the same six; CURVES: fc1 784 → 400 and fc12 400 → 784),
  and :data:`SIZE_AVERAGING` on the other problems, the size rule
  ``n_out·(n_in + 1)² > 10⁸`` (the optimizer's default: VGG's three classifier layers, the
  Simple CNN's fc1). On MNIST the width rule adds fc3 (500 → 250) and fc6 (250 → 500) to the
  size rule's four layers: their 750 per-neuron blocks of size 501 and 251 held 719 of MBF's
  768 MiB of state (51 MiB with the rule, momentum included) and made an amortized iteration
  4.2× SGD-m's (1.6× with the rule; ``benchmarks/RESULTS.md``);
- ``mlp-digits`` and ``fashion-cnn`` are not in the paper; their values are ours (tuned
  coarsely so that every optimizer lowers the loss, not searched).

**The Kronecker-SVD family and two-level KFAC** (METHODS.md §6; Koroko et al. 2022, 2023) train
through :class:`~mbf_analysis.optim.MethodOptimizer` (:data:`GENERIC_OPTIMIZERS`: optimizer name →
registry method) with their papers' schedule, :data:`KRONECKER_SCHEDULE`: curvature and inverse
every 100 steps, a Fisher batch of ``m/4`` samples, SGD momentum 0.9, per-factor EMA
``ρ_k = min(1 − 1/k, 0.95)`` (KFAC and two-level KFAC: ``ρ = 0.95`` from the first update, the
registry KFAC's form)
and the KL clip ``c = 0.01``. ``"kfac-koroko"`` is the registry's KFAC on that schedule: the
reference the family is measured against (the fast ``"kfac"`` keeps the MBF paper's schedule).
They have presets on the autoencoders and ``mlp-digits`` (Linear layers only: the papers are
MLP-only); the papers' learning rates and dampings are not in the project's sources, so ours are
untuned starting points (``source="ours"``), the same on every problem of a kind.

**Preset sets** (:data:`PRESET_SETS`, ``get_preset(..., presets=...)``, the CLI's ``--presets``):
``"paper"`` is :data:`PRESETS`, the published values as they are; ``"ours"`` (the default of
:func:`~mbf_analysis.training.train`) is the same except where a published value does not train
here, measured: MBF on ``mnist-ae`` uses the best point of our grid, ``(3e-5, 1e-2)``, instead of
Table 4's ``(1e-5, 3e-4)``, which diverges (below).

Weight decay is decoupled for every optimizer, ``θ ← (1 − αγ) θ`` before the step (SGDW/AdamW,
paper lines 16-17 of Algorithm 2), so ``weight_decay`` values are the paper's ``γ``.

Every learning rate refers to the loss convention of :mod:`mbf_analysis.training.problems`
(mean over samples, autoencoder losses summed over pixels). Caveat, measured
(``benchmarks/results_training.md``): with ``T2 = 20``, MBF at the MNIST preset (1e-5, 3e-4)
diverges within its first inverse period. At initialization ``‖g_b‖² ≪ λ``, so MBF acts as SGD-m
with lr ``α/λ ≈ 0.033``. The preset keeps the paper's values; pass ``lr`` to override them.
Our own short MBF grid inside Table 5 (60 s per point on one CPU thread, same file) found
``(lr, λ) = (3e-5, 1e-2)`` best; every point with ``α/λ ≥ 1e-2`` diverged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mbf_analysis.errors import ConfigError
from mbf_analysis.methods import TWO_LEVEL_VARIANT, resolve, variants
from mbf_analysis.methods.mbf import DEFAULT_SPATIAL_THRESHOLD, SpatialAveraging
from mbf_analysis.methods.two_level import COARSE_SPACES
from mbf_analysis.training.problems import PROBLEMS, Problem, get_problem

__all__ = [
    "AUTOENCODER_AVERAGING",
    "COARSE_SPACES",
    "FAST_OPTIMIZERS",
    "GENERIC_OPTIMIZERS",
    "GRIDS",
    "KRONECKER_SCHEDULE",
    "OPTIMIZERS",
    "PRESETS",
    "PRESET_SETS",
    "Preset",
    "SIZE_AVERAGING",
    "get_preset",
    "lr_at_epoch",
    "split_optimizer",
    "two_level_variant",
]

FAST_OPTIMIZERS = ("mbf", "adam", "sgdm", "kfac", "shampoo")
"""The optimizers of the MBF paper's tables, in their order, each with a front-end of its own."""

GENERIC_OPTIMIZERS: dict[str, str] = {
    "kfac-koroko": "kfac",
    "kpsvd": "kpsvd",
    "deflation": "deflation",
    "lanczos": "lanczos",
    "kfac-corrected": "kfac-corrected",
    "kfac-two-level": "kfac-two-level",
    "ngd": "ngd",
}
"""Optimizer name → registry method, trained by :class:`~mbf_analysis.optim.MethodOptimizer`."""

OPTIMIZERS = (*FAST_OPTIMIZERS, *GENERIC_OPTIMIZERS)
"""Every optimizer name (besides the coarse-space variants of :func:`two_level_variant`)."""

TWO_LEVEL = "kfac-two-level"


def two_level_variant(coarse: str) -> str:
    """The optimizer name of two-level KFAC with coarse space ``coarse``:
    ``"kfac-two-level-<coarse>"`` (``"kfac-two-level"`` itself has the default, nicolaides)."""
    if coarse not in COARSE_SPACES:
        raise ConfigError(
            f"unknown coarse space {coarse!r}; choose one of {', '.join(COARSE_SPACES)}"
        )
    return TWO_LEVEL_VARIANT.format(coarse=coarse)


def split_optimizer(name: str) -> tuple[str, dict[str, Any]]:
    """``(optimizer, extra options)``: a coarse-space variant ``"kfac-two-level-<coarse>"`` is
    ``("kfac-two-level", {"coarse": coarse})`` (:func:`mbf_analysis.methods.resolve`); any other
    name is itself, without options.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
    """
    if name in OPTIMIZERS:
        return name, {}
    if name in variants():
        return resolve(name)
    raise ConfigError(
        f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)} "
        f"(and {', '.join(variants())})"
    )


KRONECKER_SCHEDULE: dict[str, Any] = {
    "stat_period": 100,
    "inverse_period": 100,
    "fisher_fraction": 0.25,
    "kl_clip": 0.01,
    "momentum": 0.9,
}
"""Koroko et al.'s schedule (METHODS.md §6.1), shared by :data:`GENERIC_OPTIMIZERS`."""

AUTOENCODER_AVERAGING = SpatialAveraging(min_width=250)
"""MBF's spatial averaging on the autoencoders: Linear layers with both widths ≥ 250."""
SIZE_AVERAGING = SpatialAveraging(threshold=DEFAULT_SPATIAL_THRESHOLD)
"""MBF's spatial averaging on the other problems: ``n_out·(n_in + 1)² > 10⁸``."""


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Settings of one optimizer on one problem.

    Attributes:
        lr: Initial learning rate ``α``.
        damping: MBF/KFAC ``λ``, Adam/Shampoo ``ε``; ``None`` for SGD-m.
        weight_decay: Decoupled ``γ``.
        stat_period: ``T1`` of MBF, KFAC and Shampoo (``None`` for Adam and SGD-m).
        inverse_period: ``T2`` of MBF, KFAC and Shampoo.
        epochs: Epochs of the paper's run (CNNs), else ``None``.
        time_budget: Seconds of the paper's run (autoencoders), else ``None``.
        lr_decay_every: ``K``: the LR is multiplied by ``lr_decay`` every ``K`` epochs
            (``None``: constant).
        lr_decay: The factor of that step schedule.
        warm_start_epochs: MBF only: epochs of batches averaged into ``F_b`` before the first
            step (0: none).
        options: Further keyword arguments of the optimizer (e.g. KFAC's ``damping_mode``,
            MBF's ``spatial_averaging``).
        source: Where the values come from (``"Table 4"``, ``"Table 8"``, ``"ours"``).
    """

    lr: float
    damping: float | None = None
    weight_decay: float = 0.0
    stat_period: int | None = None
    inverse_period: int | None = None
    epochs: int | None = None
    time_budget: float | None = None
    lr_decay_every: int | None = None
    lr_decay: float = 0.1
    warm_start_epochs: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    source: str = "ours"


def lr_at_epoch(preset: Preset, epoch: int) -> float:
    """``α_e = α · lr_decay^⌊e / K⌋`` for epoch ``e = 0, 1, …`` (``α`` when there is no ``K``)."""
    if preset.lr_decay_every is None:
        return preset.lr
    return preset.lr * preset.lr_decay ** (epoch // preset.lr_decay_every)


# ------------------------------------------------------------------------- the paper's tables
_TABLE4 = {  # autoencoders: (lr, damping)
    "mnist-ae": {
        "mbf": (1e-5, 3e-4),
        "kfac": (3e-3, 3e-1),
        "shampoo": (3e-4, 3e-4),
        "adam": (3e-4, 1e-4),
        "sgdm": (3e-3, None),
    },
    "faces-ae": {
        "mbf": (1e-6, 3e-3),
        "kfac": (1e-1, 1e1),
        "shampoo": (3e-4, 3e-4),
        "adam": (1e-4, 1e-4),
        "sgdm": (1e-3, None),
    },
    "curves-ae": {
        "mbf": (1e-5, 3e-4),
        "kfac": (1e-2, 1e0),
        "shampoo": (1e-3, 3e-3),
        "adam": (3e-4, 1e-4),
        "sgdm": (1e-2, None),
    },
}
_AE_BUDGET = {"mnist-ae": 500.0, "curves-ae": 500.0, "faces-ae": 2000.0}

_TABLE8 = {  # CNNs: (lr, weight decay)
    "resnet32-cifar10": {
        "mbf": (1e-4, 3e0),
        "kfac": (3e-3, 1e-1),
        "shampoo": (1e-2, 1e-1),
        "adam": (3e-3, 1e-1),
        "sgdm": (1e-1, 1e-2),
    },
    "vgg16-cifar100": {
        "mbf": (3e-5, 1e1),
        "kfac": (1e-3, 3e-1),
        "shampoo": (1e-3, 3e-1),
        "adam": (3e-5, 1e1),
        "sgdm": (3e-2, 1e-2),
    },
    "vgg11-svhn": {
        "mbf": (1e-3, 3e-1),
        "kfac": (3e-3, 1e-1),
        "shampoo": (3e-3, 1e-1),
        "adam": (3e-4, 1e0),
        "sgdm": (3e-2, 1e-2),
    },
}
_CNN_DAMPING = {"mbf": 3e-3, "kfac": 3e-2, "adam": 1e-8, "shampoo": 1e-4, "sgdm": None}
_CNN_EPOCHS = {  # (epochs, K) per optimizer
    "resnet32-cifar10": {
        "sgdm": (200, 40),
        "adam": (200, 40),
        "mbf": (200, 60),
        "kfac": (100, 80),
        "shampoo": (100, 80),
    },
    **{
        name: {
            "sgdm": (200, 40),
            "adam": (200, 40),
            "mbf": (150, 50),
            "kfac": (100, 60),
            "shampoo": (100, 60),
        }
        for name in ("vgg16-cifar100", "vgg11-svhn")
    },
}
_CURVATURE = ("mbf", "kfac", "shampoo")
_KFAC_OPTIONS = {  # the paper's KFAC: true Fisher (labels sampled from the model)
    mode: {"damping_mode": mode, "fisher": "mc"} for mode in ("split", "eigen")
}


def _options(optimizer: str, kfac_mode: str, averaging: SpatialAveraging) -> dict[str, Any]:
    """The ``options`` of a preset: KFAC's true Fisher and damping mode, MBF's averaging rule."""
    if optimizer == "kfac":
        return dict(_KFAC_OPTIONS[kfac_mode])
    if optimizer == "mbf":
        return {"spatial_averaging": averaging}
    return {}


def _paper_presets() -> dict[tuple[str, str], Preset]:
    presets = {}
    for problem, row in _TABLE4.items():
        for opt, (lr, damping) in row.items():
            curvature = opt in _CURVATURE
            presets[problem, opt] = Preset(
                lr=lr,
                damping=damping,
                stat_period=1 if curvature else None,
                inverse_period=20 if curvature else None,
                time_budget=_AE_BUDGET[problem],
                warm_start_epochs=1 if opt == "mbf" else 0,
                options=_options(opt, "split", AUTOENCODER_AVERAGING),
                source="Table 4",
            )
    for problem, row in _TABLE8.items():
        for opt, (lr, weight_decay) in row.items():
            curvature = opt in _CURVATURE
            epochs, every = _CNN_EPOCHS[problem][opt]
            presets[problem, opt] = Preset(
                lr=lr,
                damping=_CNN_DAMPING[opt],
                weight_decay=weight_decay,
                stat_period=10 if curvature else None,
                inverse_period=100 if curvature else None,
                epochs=epochs,
                lr_decay_every=every,
                options=_options(opt, "eigen", SIZE_AVERAGING),
                source="Table 8",
            )
    return presets


def _our_presets() -> dict[tuple[str, str], Preset]:
    digits = {
        "sgdm": Preset(lr=0.05, epochs=30),
        "adam": Preset(lr=3e-3, damping=1e-8, epochs=30),
        "mbf": Preset(
            lr=1e-3,
            damping=1e-3,
            stat_period=1,
            inverse_period=20,
            epochs=30,
            options=_options("mbf", "split", SIZE_AVERAGING),
        ),
        "kfac": Preset(
            lr=1e-2,
            damping=1e-2,
            stat_period=1,
            inverse_period=20,
            epochs=30,
            options=dict(_KFAC_OPTIONS["split"]),
        ),
        "shampoo": Preset(lr=3e-3, damping=1e-4, stat_period=1, inverse_period=20, epochs=30),
    }
    fashion = {
        "sgdm": Preset(lr=3e-2, weight_decay=1e-2, epochs=10),
        "adam": Preset(lr=3e-4, damping=1e-8, weight_decay=1e-1, epochs=10),
        "mbf": Preset(
            lr=1e-4,
            damping=3e-3,
            weight_decay=1e-1,
            stat_period=10,
            inverse_period=100,
            epochs=10,
            options=_options("mbf", "eigen", SIZE_AVERAGING),
        ),
        "kfac": Preset(
            lr=3e-3,
            damping=3e-2,
            weight_decay=1e-1,
            stat_period=10,
            inverse_period=100,
            epochs=10,
            options=dict(_KFAC_OPTIONS["eigen"]),
        ),
        "shampoo": Preset(
            lr=3e-3, damping=1e-4, weight_decay=1e-1, stat_period=10, inverse_period=100, epochs=10
        ),
    }
    out = {("mlp-digits", o): p for o, p in digits.items()}
    out.update({("fashion-cnn", o): p for o, p in fashion.items()})
    return out


_GENERIC_VALUES = {"autoencoder": (3e-3, 3e-1), "classifier": (1e-2, 1e-2)}
"""(lr, damping) of the generic optimizers: KFAC's values on ``mnist-ae`` (Table 4) and on
``mlp-digits`` (ours), untuned for the other methods."""


def _generic_presets() -> dict[tuple[str, str], Preset]:
    """The Kronecker-SVD family, two-level KFAC and ``kfac-koroko`` on the MLP problems."""
    out = {}
    for problem in ("mnist-ae", "curves-ae", "faces-ae", "mlp-digits"):
        autoencoder = PROBLEMS[problem].is_autoencoder
        lr, damping = _GENERIC_VALUES["autoencoder" if autoencoder else "classifier"]
        for optimizer, method in GENERIC_OPTIMIZERS.items():
            schedule = dict(KRONECKER_SCHEDULE)
            options = {
                "fisher_fraction": schedule.pop("fisher_fraction"),
                "kl_clip": schedule.pop("kl_clip"),
                "momentum": schedule.pop("momentum"),
                "fisher": "mc",
            }
            if method in ("kfac", "kfac-two-level"):
                options.update(decay=0.95, damping_mode="split")
            elif method == "ngd":  # the Fisher batch's own Fisher, solved exactly
                options.update(decay=0.0)
            else:
                options.update(decay=0.95, decay_warmup=True)
            out[problem, optimizer] = Preset(
                lr=lr,
                damping=damping,
                stat_period=schedule["stat_period"],
                inverse_period=None if method == "ngd" else schedule["inverse_period"],
                time_budget=_AE_BUDGET.get(problem),
                epochs=None if autoencoder else 30,
                options=options,
                source="ours",
            )
    return out


PRESETS: dict[tuple[str, str], Preset] = {
    **_paper_presets(),
    **_our_presets(),
    **_generic_presets(),
}
"""``(problem, optimizer)`` → :class:`Preset`: every problem of
:data:`~mbf_analysis.training.problems.PROBLEMS` with every optimizer of :data:`FAST_OPTIMIZERS`,
and the MLP problems with the :data:`GENERIC_OPTIMIZERS`; the paper's values as published."""

PRESET_SETS: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
    "paper": {},
    "ours": {
        ("mnist-ae", "mbf"): {
            "lr": 3e-5,
            "damping": 1e-2,
            "source": "ours: the best point of our grid (benchmarks/results_training.md); "
            "Table 4's (1e-5, 3e-4) diverges",
        },
    },
}
"""Preset set → the changes it makes to :data:`PRESETS` (``(problem, optimizer)`` → fields):
``"paper"`` none, the published values as they are; ``"ours"`` where a published value does not
train here (module docstring)."""


# ------------------------------------------------------------------------- the paper's grids
_WD_GRID = (1e-2, 3e-2, 1e-1, 3e-1, 1e0, 3e0, 1e1)

GRIDS: dict[str, dict[str, dict[str, tuple[float, ...]]]] = {
    "autoencoder": {  # Table 5: lr × damping (KFAC's repeated "1e-2, 3e-2" listed once)
        "sgdm": {"lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)},
        "adam": {"lr": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "damping": (1e-8, 1e-4, 1e-2)},
        "shampoo": {
            "lr": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
            "damping": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        },
        "mbf": {
            "lr": (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4),
            "damping": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        },
        "kfac": {
            "lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
            "damping": (1e-2, 3e-2, 1e-1, 3e-1, 1e0, 3e0, 1e1),
        },
    },
    "classifier": {  # Table 7: lr × weight decay
        "sgdm": {
            "lr": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1e0),
            "weight_decay": _WD_GRID,
        },
        "adam": {
            "lr": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
            "weight_decay": _WD_GRID,
        },
        "shampoo": {
            "lr": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
            "weight_decay": _WD_GRID,
        },
        "mbf": {
            "lr": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
            "weight_decay": _WD_GRID,
        },
        "kfac": {
            "lr": (3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
            "weight_decay": _WD_GRID,
        },
    },
}
"""The paper's grids: ``GRIDS["autoencoder" | "classifier"][optimizer]`` → setting → values
(Table 5 for the autoencoders, Table 7 for the classifiers)."""
for _kind in GRIDS.values():  # the generic optimizers search KFAC's grid
    _kind.update({name: dict(_kind["kfac"]) for name in GENERIC_OPTIMIZERS})


def get_preset(
    problem: str | Problem,
    optimizer: str,
    *,
    lr: float | None = None,
    damping: float | None = None,
    weight_decay: float | None = None,
    presets: str = "ours",
) -> Preset:
    """The preset of ``(problem, optimizer)`` in the set ``presets`` with the given values
    replaced; a two-level variant ``"kfac-two-level-<coarse>"`` has two-level KFAC's preset with
    that coarse space.

    Raises:
        ValueError: For an unknown optimizer or preset set, a problem without a preset for the
            optimizer, a ``damping`` for SGD-m, or a non-positive ``lr``/``damping`` or negative
            ``weight_decay``.
    """
    problem = get_problem(problem)
    optimizer, extra = split_optimizer(optimizer)
    if presets not in PRESET_SETS:
        raise ConfigError(f"unknown preset set {presets!r}; choose one of {', '.join(PRESET_SETS)}")
    key = (problem.name, optimizer)
    if key not in PRESETS:
        where = sorted(p for p, o in PRESETS if o == optimizer)
        why = " (it preconditions Linear layers only)" if optimizer in GENERIC_OPTIMIZERS else ""
        raise ConfigError(
            f"no preset for optimizer {optimizer!r} on problem {problem.name!r}{why}; it has "
            f"presets for {', '.join(where)}"
        )
    preset = replace(PRESETS[key], **PRESET_SETS[presets].get(key, {}))
    if extra:
        preset = replace(preset, options={**preset.options, **extra})
    if lr is not None:
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        preset = replace(preset, lr=lr)
    if damping is not None:
        if optimizer == "sgdm":
            raise ConfigError("sgdm has no damping; leave damping unset for it")
        if not damping > 0:
            raise ConfigError(f"damping must be positive, got {damping}")
        preset = replace(preset, damping=damping)
    if weight_decay is not None:
        if not weight_decay >= 0:
            raise ConfigError(f"weight_decay must be 0 or more, got {weight_decay}")
        preset = replace(preset, weight_decay=weight_decay)
    return preset
