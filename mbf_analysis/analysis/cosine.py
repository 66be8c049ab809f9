r"""Cosine along the BDF trajectory (paper Fig. 6 and Algorithm 5; METHODS.md §5).

The network is trained with BDF (:class:`~mbf_analysis.methods.BDF`, one dense empirical-Fisher
block per layer, gradient and blocks both averaged with decay ``β = 0.9``), and at every iterate
``θ_k`` each compared method ``X`` folds the same minibatch statistics into its own state; per
layer ``l`` we record how well ``X``'s direction agrees with BDF's:

.. math::

    c_{X,l}^{(k)} = \frac{\langle d_{X,l}^{(k)}, d_{\mathrm{BDF},l}^{(k)} \rangle}
                         {\lVert d_{X,l}^{(k)} \rVert \, \lVert d_{\mathrm{BDF},l}^{(k)} \rVert},
    \qquad
    \theta_{k+1} = \theta_k - \alpha \, d_{\mathrm{BDF}}^{(k)} .

Per iteration ``k`` (:class:`CosineRun`):

1. draw a minibatch of ``m`` samples (see *Minibatches*);
2. run **one** :func:`~mbf_analysis.curvature.collect.collect` pass for the union of what the
   compared methods and BDF need (one forward pass, one backward pass, plus one backward pass on
   sampled labels when MBF-True or true-Fisher KFAC is compared);
3. let every method ``update(stats)`` at ``θ_k`` (stateful: momenta and EMAs carry over from
   step to step), and take every method's ``direction()`` (its preconditioned first moment);
4. record ``c_{X,l}^{(k)}`` for every chosen layer and method (flat vectors in METHODS §2 order,
   the cosine computed in float64 and clipped to ``[−1, 1]``; ``NaN`` when either direction is
   zero or not finite) and the minibatch loss ``L(θ_k)`` on the real labels;
5. step ``θ ← θ − α d_BDF`` (every layer, in place).

Methods run with their registry defaults, which are the stateful forms the paper compares:
SGD-m ``μ = 0.9``; Adam ``β₁ = 0.9``, ``β₂ = 0.999``, ``ε = 1e-8``; MBF and MBF-True ``μ = 0.9``,
``β = 0.9``, ``T1 = T2 = 1``; KFAC (true Fisher, ``"split"`` damping) and Shampoo (``ε = 1e-4``)
``μ = 0.9``, ``β = 0.9``, periods 1; BDF ``β = 0.9``. :attr:`CosineConfig.one_shot` replaces
the compared methods by their one-shot forms (the followed BDF keeps its averages).
:attr:`CosineConfig.damping` is given to every method with a ``damping`` field (BDF, the MBF
family, the Kronecker methods); anything else goes through :attr:`CosineConfig.method_options`.
Cosines do not depend on the scale of a direction, so BDF's EMA first moment
``(1 − β) Σ β^j g`` and the torch-style momenta ``Σ μ^j g`` compare directly.

Minibatches: sampled without replacement within an epoch. At the start of every epoch a fresh
permutation of the ``N`` training samples is drawn, and consecutive slices of ``m`` indices form
the minibatches; the last ``N mod m`` indices of an epoch are dropped, so every minibatch has
exactly ``m`` samples. The permutation comes from a CPU generator, the sampled labels from a
second generator on the model's device; both are seeded from :attr:`CosineConfig.seed`
(``numpy.random.SeedSequence(seed).generate_state(2)``), so the minibatch sequence does not
depend on which methods are compared, and a run is deterministic for a seed.

Defaults: ``α = 0.1`` and ``λ = 0.003`` (the registry default of every damped method and the
paper's value), ``m = 256``. On ``digits-mlp`` with the embedded 8×8 digits (cross-entropy,
float64, seed 0) BDF's minibatch loss then falls 2.30 → 0.66 → 0.055 → 0.0039 → 0.0003 at
iterations 0, 9, 24, 49, 99, with every direction finite. A grid over 50 iterations stayed finite
and decreasing for ``α ∈ {0.03, 0.1, 0.3, 1}`` with ``λ = 0.01`` and for ``λ ∈ {0.001, 0.003,
0.01, 0.03}`` with ``α = 0.1``; a larger ``λ`` pulls every damped direction towards its first
moment (MBF's cosine towards SGD-m's: on ``fc1`` over iterations 0–24, MBF 0.72/0.60 vs SGD-m
0.61/0.43 at ``λ = 0.003``, but 0.86/0.68 vs 0.84/0.62 at ``λ = 0.01``). Other models need
their own ``α`` and ``λ``; a diverging run stops with :class:`CosineDivergedError`.

**The all-layer reference** (``reference="full"``). Every method so far is block-diagonal by
layer; on networks small enough to form the Fisher over all layers, each compared method's
direction is measured against the exact natural-gradient direction

.. math::

    \zeta^* = F_\lambda^{-1} \nabla, \qquad F_\lambda = F + \lambda I,

with ``∇`` the minibatch gradient ``g`` and ``F`` the dense Fisher of the minibatch over **all**
layers (every layer with parameters, METHODS §2 order, layers in model order): the empirical
Fisher ``(1/m) Σ_n g_n g_nᵀ`` from the per-sample gradients the collection pass already computed
for BDF (``fisher="empirical"``), or the exact Fisher ``(1/m) Σ_n J_nᵀ H_n J_n`` from
:func:`~mbf_analysis.curvature.fisher_rows` (``fisher="exact"``, one more pass). ``λ`` is
:attr:`CosineConfig.damping`. ``F = (1/m) UᵀU`` comes as its ``R`` rows ``U`` ``[R, D]`` (``R = m``
empirical, ``R = m C`` exact, ``D`` parameters). :attr:`CosineConfig.reference_solver` either forms
``F`` densely and solves by Cholesky (:func:`~mbf_analysis.linalg.damped_solve`, ``O(R D² +
D³)``: the readable reference), or solves through the Woodbury identity
(:func:`~mbf_analysis.linalg.woodbury_damped_solve`, ``O(R² D + R³)``) with the norms
``vᵀF_λv = ‖Uv‖²/m + λ‖v‖²``; ``"auto"`` takes Woodbury when ``R < D`` (the paper MLP: ``R = 256``
or ``2560`` against ``D = 7030``). Both give the same numbers up to rounding. A run whose rows and
the three ``D × D`` (dense) or ``R × R`` (Woodbury) matrices of its solve exceed the memory
budget (half the free memory, or ``$MBF_MEMORY_BUDGET``) is refused when it is built, with the
sizes in the message. Under this reference

- each compared method's direction is its preconditioner applied to ``∇``, ``ζ_X =
  X.direction(g)`` (not to its own momentum), so that both sides precondition the same vector;
- BDF is one of the compared methods (added when not listed): its row shows what
  block-diagonality itself costs;
- the compared methods run in their one-shot form by default (:attr:`CosineConfig.one_shot`:
  statistics of this minibatch only, no momentum; :meth:`~mbf_analysis.methods.MethodConfig.
  one_shot`), so that their curvature and ``F`` come from the same samples; with
  ``one_shot=False`` they keep their running averages;
- :attr:`CosineConfig.fisher` is also given to every compared method with a ``fisher`` field
  (KFAC, the Kronecker-SVD family, two-level KFAC), unless :attr:`CosineConfig.method_options`
  set it; two-level KFAC with ``fisher="exact"`` and ``one_shot`` then solves its coarse problem
  with this very ``F``, and its energy error never exceeds KFAC's;
- besides the cosine, every row records the ``F_λ``-norm relative error

  .. math::

      e_X = \frac{\lVert \zeta_X - \zeta^* \rVert_{F_\lambda}}{\lVert \zeta^* \rVert_{F_\lambda}},
      \qquad \lVert v \rVert_{F_\lambda}^2 = v^\top F_\lambda v,

  per layer with the diagonal block ``(F_λ)_ll`` and ``ζ_X,l − ζ*_l``, and for the whole network
  (rows with ``layer`` :data:`NETWORK`, also holding the cosine of the concatenated directions)
  with ``F_λ`` itself (column ``energy_error``, :data:`FULL_COLUMNS`);
- the trajectory is unchanged: the step is still ``θ ← θ − α d_BDF`` with the stateful BDF's own
  direction, so both references see the same iterates for a seed.

Example::

    run = CosineRun(model, nn.CrossEntropyLoss(), x, y, CosineConfig(iterations=50))
    frame = run.run(on_record=lambda rows: rows.to_csv(path, mode="a", header=False))
    frame.groupby(["layer", "method"]).cosine.mean()
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mbf_analysis import methods as registry
from mbf_analysis.curvature.collect import Stats, collect
from mbf_analysis.curvature.fisher import fisher_rows, prepare_batch
from mbf_analysis.curvature.memory import check_dense, format_bytes, resolve_budget
from mbf_analysis.errors import ConfigError, MemoryBudgetError, NonFiniteError
from mbf_analysis.layout import LayerLayout, model_layouts
from mbf_analysis.linalg import add_gram_, damped_solve, woodbury_damped_solve
from mbf_analysis.methods import Method
from mbf_analysis.stopping import stop_requests

__all__ = [
    "COLUMNS",
    "DEFAULT_METHODS",
    "FULL_COLUMNS",
    "NETWORK",
    "REFERENCE",
    "REFERENCES",
    "CosineConfig",
    "CosineDivergedError",
    "CosineRun",
    "cosine_trajectory",
]

logger = logging.getLogger(__name__)

REFERENCE = "bdf"
"""The method whose direction is followed (and, by default, compared against)."""

REFERENCES: tuple[str, ...] = ("bdf", "full")
"""What the directions are compared with: BDF's direction, or ``ζ* = F_λ⁻¹∇`` over all layers."""

REFERENCE_FISHERS: tuple[str, ...] = ("empirical", "exact")
"""The kinds of ``F`` of the all-layer reference."""

NETWORK = "network"
"""The ``layer`` of the whole-network rows of the all-layer reference."""

DEFAULT_METHODS: tuple[str, ...] = ("mbf", "mbf-true", "kfac", "shampoo", "adam", "sgdm")
"""The methods of the paper's Fig. 6."""

COLUMNS: tuple[str, ...] = ("iteration", "layer", "method", "cosine", "loss")
"""Columns of the tidy frames (one row per iteration, layer and compared method)."""

FULL_COLUMNS: tuple[str, ...] = (*COLUMNS, "energy_error")
"""Columns under ``reference="full"``: :data:`COLUMNS`, then the ``F_λ``-norm relative error."""


def _positive_int(config: object, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"CosineConfig.{name} must be a positive integer, got {value!r}.")


def _positive_float(config: object, name: str) -> None:
    value = getattr(config, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"CosineConfig.{name} must be a finite number > 0, got {value!r}.")


@dataclass(kw_only=True)
class CosineConfig:
    """Settings of the trajectory analysis (module docstring).

    Attributes:
        methods: Registry names of the compared methods (:func:`mbf_analysis.methods.names`)
            or variants (:func:`mbf_analysis.methods.variants`: one
            ``"kfac-two-level-<coarse>"`` per coarse space), in the order of the rows;
            ``"bdf"`` is allowed (its cosine is 1).
        iterations: Number of iterations :meth:`CosineRun.run` does by default.
        batch_size: Minibatch size ``m`` (at most the number of training samples).
        lr: Learning rate ``α`` of the BDF step.
        damping: ``λ``, given to every method with a ``damping`` field (BDF, MBF, MBF-True,
            MBF-exact, KFAC).
        layers: Layers (module names) whose cosines are recorded; ``None``: every layer with
            parameters. The step always moves every layer.
        seed: Seed (``≥ 0``) of the minibatch order and of the sampled labels.
        method_options: Method name → its own configuration fields, taking precedence over
            ``damping`` (and ``fisher``) (e.g. ``{"kfac": {"damping_mode": "eigen"}, "bdf":
            {"decay": 0.95}}``); names must be compared methods or ``"bdf"``. The options of
            ``"bdf"`` also reach the BDF that is followed.
        reference: ``"bdf"`` (paper Fig. 6) or ``"full"``, ``ζ* = F_λ⁻¹∇`` with the Fisher
            over all layers (module docstring).
        fisher: The ``F`` of ``reference="full"``: ``"empirical"`` or ``"exact"``; also given
            to the compared methods with a ``fisher`` field. Must stay ``"empirical"`` under
            ``reference="bdf"``.
        one_shot: Whether the compared methods run in their one-shot form (this minibatch's
            statistics, no momentum); ``None``: ``True`` under ``"full"``, ``False`` under
            ``"bdf"`` (see :attr:`is_one_shot`). The followed BDF always keeps its averages.
        reference_solver: How ``reference="full"`` solves ``F_λ ζ* = ∇`` (module docstring):
            ``"dense"`` (forms ``F``, ``O(R D² + D³)``), ``"woodbury"`` (``O(R² D + R³)``,
            ``F`` never formed) or ``"auto"``: Woodbury when ``F`` has fewer rows ``R`` than
            parameters ``D``.

    Raises:
        ValueError: For an unknown or repeated method, an option for a method that is not run,
            or an invalid value.
        TypeError: For an option field that the method does not have.
    """

    methods: Sequence[str] = DEFAULT_METHODS
    iterations: int = 100
    batch_size: int = 256
    lr: float = 0.1
    damping: float = 0.003
    layers: Sequence[str] | None = None
    seed: int = 0
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    reference: Literal["bdf", "full"] = "bdf"
    fisher: Literal["empirical", "exact"] = "empirical"
    one_shot: bool | None = None
    reference_solver: Literal["auto", "dense", "woodbury"] = "auto"

    def __post_init__(self) -> None:
        self.methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        known = registry.names() + registry.variants()
        if not self.methods:
            raise ConfigError(f"CosineConfig.methods is empty; choose from {known}.")
        unknown = [name for name in self.methods if name not in known]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {known}.")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"CosineConfig.methods repeats a method: {list(self.methods)}.")
        _positive_int(self, "iterations")
        _positive_int(self, "batch_size")
        _positive_float(self, "lr")
        _positive_float(self, "damping")
        if self.layers is not None:
            self.layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not self.layers or len(set(self.layers)) != len(self.layers):
                raise ConfigError(
                    f"CosineConfig.layers must be None or distinct layer names, got "
                    f"{list(self.layers)}."
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"CosineConfig.seed must be an integer ≥ 0, got {self.seed!r}.")
        if self.reference not in REFERENCES:
            raise ConfigError(
                f"CosineConfig.reference must be one of {REFERENCES}, got {self.reference!r}."
            )
        if self.fisher not in REFERENCE_FISHERS:
            raise ConfigError(
                f"CosineConfig.fisher must be one of {REFERENCE_FISHERS}, got {self.fisher!r}."
            )
        if self.reference == "bdf" and self.fisher != "empirical":
            raise ConfigError(
                f"CosineConfig.fisher={self.fisher!r} needs reference='full' (BDF's reference "
                "is its own empirical-Fisher blocks); set reference='full', or give the methods "
                "their Fisher through method_options."
            )
        if self.reference_solver not in ("auto", "dense", "woodbury"):
            raise ConfigError(
                "CosineConfig.reference_solver must be one of ('auto', 'dense', 'woodbury'), "
                f"got {self.reference_solver!r}."
            )
        if self.one_shot is not None and not isinstance(self.one_shot, bool):
            raise ConfigError(
                f"CosineConfig.one_shot must be None or a bool, got {self.one_shot!r}."
            )
        self.method_options = {name: dict(opts) for name, opts in self.method_options.items()}
        stray = sorted(set(self.method_options) - set(self.run_methods))
        if stray:
            raise ConfigError(
                f"method_options given for {stray}, which this run does not use; it runs "
                f"{list(self.run_methods)}."
            )
        self.build_methods()
        self.build_stepper()

    @property
    def compared(self) -> tuple[str, ...]:
        """The methods with rows: :attr:`methods`, and BDF under ``reference="full"``."""
        if self.reference == "full" and REFERENCE not in self.methods:
            return (*self.methods, REFERENCE)
        return self.methods

    @property
    def run_methods(self) -> tuple[str, ...]:
        """The compared methods, then the followed BDF if it is not among them."""
        return self.compared + (() if REFERENCE in self.compared else (REFERENCE,))

    @property
    def is_one_shot(self) -> bool:
        """:attr:`one_shot`, with ``None`` resolved (``True`` exactly under ``"full"``)."""
        return self.reference == "full" if self.one_shot is None else self.one_shot

    @property
    def columns(self) -> tuple[str, ...]:
        """The frame's columns: :data:`COLUMNS`, or :data:`FULL_COLUMNS` under ``"full"``."""
        return FULL_COLUMNS if self.reference == "full" else COLUMNS

    def _options(self, name: str) -> dict[str, Any]:
        registered, fixed = registry.resolve(name)
        fields = registry.config_class(registered).field_names()
        shared: dict[str, Any] = {"damping": self.damping}
        if self.reference == "full":
            shared["fisher"] = self.fisher
        shared = {k: v for k, v in shared.items() if k in fields}
        return shared | fixed | self.method_options.get(name, {})

    def build_methods(self) -> dict[str, Method]:
        """Fresh instances of :attr:`compared` (one-shot when :attr:`is_one_shot`); a variant
        name (:func:`~mbf_analysis.methods.variants`, e.g. ``"kfac-two-level-residual"``) is its
        registered method with the variant's settings."""
        built = {}
        for name in self.compared:
            method = registry.get(registry.resolve(name)[0], **self._options(name))
            if self.is_one_shot:
                method.config = method.config.one_shot()
            built[name] = method
        return built

    def build_stepper(self) -> Method:
        """A fresh BDF to follow (its own averages, never one-shot)."""
        return registry.get(REFERENCE, **self._options(REFERENCE))


class CosineDivergedError(NonFiniteError):
    """The BDF trajectory produced NaN or Inf.

    Attributes:
        iteration: The iteration ``k`` at which it happened (its rows are not recorded).
        frame: The rows that the failing :meth:`CosineRun.run` call recorded before it (columns
            :attr:`CosineConfig.columns`; they were also handed to ``on_record``).
    """

    def __init__(self, message: str, *, iteration: int, columns: Sequence[str] = COLUMNS) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.frame = pd.DataFrame(columns=list(columns))


def _cosine(a: Tensor, b: Tensor) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` in float64, clipped to ``[−1, 1]``; NaN if undefined."""
    a, b = a.double(), b.double()
    denom = a.norm() * b.norm()
    if not bool(torch.isfinite(denom)) or float(denom) == 0.0:
        return math.nan
    return float((a @ b / denom).clamp(-1.0, 1.0))


class _AllLayerFisher:
    """``F_λ = (1/m) UᵀU + λI`` over all layers from its rows ``U`` ``[R, D]`` (``R`` = samples ×
    rows per sample), dense (``F`` formed, Cholesky) or low rank (Woodbury, ``F`` never formed).

    Both give the same ``ζ* = F_λ⁻¹∇`` and norms ``vᵀ(F_λ)_{pp}v`` of a slice ``p`` of the
    parameters up to rounding; the dense form is the readable reference.
    """

    def __init__(self, rows: Tensor, m: int, damping: float, dense: bool) -> None:
        self.rows, self.m, self.damping = rows, m, damping
        self.F: Tensor | None = None
        if dense:
            total = rows.shape[1]
            self.F = add_gram_(rows.new_zeros(total, total), rows.T, alpha=1.0 / m)

    def solve(self, rhs: Tensor) -> Tensor:
        """``F_λ⁻¹ b`` for ``b`` ``[D]``."""
        if self.F is not None:
            return damped_solve(self.F, rhs, self.damping)
        return woodbury_damped_solve(self.rows, rhs, self.damping, scale=1.0 / self.m)

    def energy_errors(self, errors: Tensor, star: Tensor, part: slice) -> list[float]:
        """``‖e_X‖ / ‖ζ*‖`` in the norm of ``(F_λ)_{pp}``, for the rows ``e_X`` of ``errors``
        ``[K, D]`` and ``ζ*`` ``[D]`` restricted to ``part``; NaN where undefined."""
        vectors = torch.cat([errors[:, part], star[part].unsqueeze(0)]).double()
        if self.F is not None:
            block = self.F[part, part].double()
            quadratic = ((vectors @ block) * vectors).sum(1)
        else:
            quadratic = (vectors @ self.rows[:, part].double().T).square().sum(1) / self.m
        squares = (quadratic + self.damping * vectors.square().sum(1)).tolist()
        den = squares.pop()
        if not math.isfinite(den) or den <= 0.0:
            return [math.nan] * len(squares)
        return [math.sqrt(v / den) if math.isfinite(v) and v >= 0 else math.nan for v in squares]


class CosineRun:
    """A resumable trajectory analysis (module docstring): the model follows BDF in place.

    Args:
        model: The network; its parameters are updated in place by the BDF steps. With
            per-sample gradients (always needed by BDF), it must suit BackPACK
            (:func:`~mbf_analysis.curvature.backend.check_model`).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: Training inputs ``[N, *in_shape]`` (moved batch by batch to the model's device
            and dtype).
        targets: Training targets ``[N]`` or ``[N, *out_shape]``.
        config: The settings (default :class:`CosineConfig`).

    Attributes:
        iteration: ``k`` of the next iteration (the number of BDF steps taken).
        layers: The layers whose cosines are recorded.
        methods: Name → method, for :attr:`CosineConfig.run_methods`; ``"bdf"`` is the
            followed BDF unless a one-shot BDF is compared (then that one).
        stepper: The followed BDF (the same object as ``methods["bdf"]`` when shared).
        columns: The frame's columns (:attr:`CosineConfig.columns`).

    Raises:
        ValueError: For an unknown layer (listing the model's layers), mismatched
            inputs/targets, a batch size above ``N``, or (``reference="full"``) a layer named
            :data:`NETWORK`.
        MemoryBudgetError: Under ``reference="full"``, when the all-layer Fisher's rows and
            the matrices of its solve would not fit the memory budget.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        config: CosineConfig | None = None,
    ) -> None:
        self.config = config or CosineConfig()
        if len(inputs) != len(targets):
            raise ConfigError(
                f"inputs and targets differ in length: {len(inputs)} vs {len(targets)}."
            )
        if self.config.batch_size > len(inputs):
            raise ConfigError(
                f"CosineConfig.batch_size {self.config.batch_size} exceeds the {len(inputs)} "
                "training samples."
            )
        layouts = model_layouts(model)
        if self.config.layers is None:
            self.layers: tuple[str, ...] = tuple(layouts)
        else:
            unknown = [name for name in self.config.layers if name not in layouts]
            if unknown:
                raise ConfigError(
                    f"unknown layer(s) {unknown}; the model's layers with parameters are "
                    f"{list(layouts)}."
                )
            self.layers = tuple(self.config.layers)
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.columns = self.config.columns
        self._params = dict(model.named_parameters())
        device = next(iter(self._params.values())).device
        self._layouts = layouts
        self._dense_reference = False
        if self.config.reference == "full":
            if NETWORK in layouts:
                raise ConfigError(
                    f"the model has a layer named {NETWORK!r}, the name of the whole-network rows "
                    "of reference='full'; rename the module."
                )
            self._check_full_memory(model, device)
        compared = self.config.build_methods()
        shared = REFERENCE in compared and not self.config.is_one_shot
        self.stepper = compared[REFERENCE] if shared else self.config.build_stepper()
        self.methods = compared if REFERENCE in compared else {**compared, REFERENCE: self.stepper}
        self.needs = frozenset().union(*(m.needs for m in (*self.methods.values(), self.stepper)))
        self.iteration = 0
        batch_seed, label_seed = np.random.SeedSequence(self.config.seed).generate_state(2)
        self._batch_generator = torch.Generator().manual_seed(int(batch_seed))
        self._label_generator = torch.Generator(device=device).manual_seed(int(label_seed))
        self._permutation: Tensor | None = None
        self._position = 0
        logger.info(
            "cosine along the BDF trajectory: reference %s, methods %s, statistics %s, layers %s",
            self.config.reference,
            list(self.config.compared),
            sorted(self.needs),
            list(self.layers),
        )

    def _check_full_memory(self, model: nn.Module, device: torch.device) -> None:
        """Refuse, before any allocation, an all-layer Fisher that would not fit the budget, and
        choose its form (:attr:`CosineConfig.reference_solver`)."""
        total = sum(layout.dim for layout in self._layouts.values())
        per_sample = 1
        if self.config.fisher == "exact":
            _, x, _ = prepare_batch(model, self.loss_fn, self.inputs[:1], self.targets[:1])
            with torch.no_grad():
                per_sample = model(x)[0].numel()
        count = self.config.batch_size * per_sample
        solver = self.config.reference_solver
        self._dense_reference = solver == "dense" or (solver == "auto" and count >= total)
        itemsize = next(iter(self._params.values())).element_size()
        budget = resolve_budget(None, device)
        square = total if self._dense_reference else count
        rows = count * total * itemsize
        parts = {"matrix": square, "its damped copy": square, "its Cholesky factor": square}
        try:
            check_dense(parts, itemsize, budget - rows, what="all-layer Fisher solve")
        except MemoryBudgetError as err:
            form = (
                f"the dense Fisher over all {total} parameters ({total}×{total}, three copies)"
                if self._dense_reference
                else f"a Woodbury solve with {square}×{square} matrices (three copies)"
            )
            raise MemoryBudgetError(
                f"reference='full' needs the Fisher's {count}×{total} rows ({format_bytes(rows)}) "
                f"and {form}: {format_bytes(rows + 3 * square * square * itemsize)} in all, over "
                f"the memory budget of {format_bytes(budget)}. Use reference='bdf' (one block per "
                "layer), a smaller model or batch, or raise the budget ($MBF_MEMORY_BUDGET)."
            ) from err

    # ------------------------------------------------------------------ running
    def run(
        self,
        n_iterations: int | None = None,
        *,
        on_record: Callable[[pd.DataFrame], None] | None = None,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Do ``n_iterations`` more iterations (default :attr:`CosineConfig.iterations`).

        Args:
            n_iterations: Number of iterations, ``≥ 0``.
            on_record: Called after every iteration with its rows (a frame with
                :attr:`columns`: ``len(layers) · len(compared)`` rows, and ``len(compared)``
                more whole-network rows under ``reference="full"``), e.g. to append them to a
                CSV file as they come.
            progress: Show a tqdm bar.

        Returns:
            The rows of this call: columns :attr:`columns`; ``iteration`` counts from the
            runner's start (it continues after :meth:`load_state_dict`), ``loss`` is the
            minibatch loss at the iterate where the directions were taken; under
            ``reference="full"`` ``energy_error`` is the ``F_λ``-norm relative error (module
            docstring) and rows with ``layer == NETWORK`` are the whole network's.

        Raises:
            CosineDivergedError: When the parameters, the loss, a statistic or BDF's direction
                hold NaN or Inf; it carries the rows of this call so far (``.frame``). The
                methods' states then include the failed iteration's statistics, so continue from
                a saved :meth:`state_dict` rather than from this runner.
            ValueError: When a minibatch has NaN or Inf inputs.
            StopRequested: After Ctrl-C or SIGTERM (a ``KeyboardInterrupt``,
                :mod:`mbf_analysis.stopping`), raised once the iteration in progress is whole and
                its rows have gone to ``on_record``: the runner then stands at the start of the
                next iteration, so :meth:`state_dict` and another :meth:`run` continue exactly.
                A second Ctrl-C stops at once and may leave the runner inside an iteration;
                continue from a saved :meth:`state_dict` then.
        """
        n = self.config.iterations if n_iterations is None else n_iterations
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_iterations must be an integer ≥ 0, got {n!r}.")
        rows: list[dict[str, Any]] = []
        bar = tqdm(range(n), desc="cosine (BDF trajectory)", disable=not progress)
        with stop_requests() as stop:
            for _ in bar:
                try:
                    new, loss = self._iterate()
                except CosineDivergedError as err:
                    err.frame = self._frame(rows)
                    raise
                rows += new
                bar.set_postfix(loss=f"{loss:.4g}")
                if on_record is not None:
                    on_record(self._frame(new))
                stop.check()
        return self._frame(rows)

    def _frame(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=list(self.columns))

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        """The next ``m`` indices of the epoch's permutation (a new epoch when too few remain)."""
        size = self.config.batch_size
        if self._permutation is None or self._position + size > len(self._permutation):
            self._permutation = torch.randperm(len(self.inputs), generator=self._batch_generator)
            self._position = 0
        index = self._permutation[self._position : self._position + size]
        self._position += size
        inputs = self.inputs[index.to(self.inputs.device)]
        return inputs, self.targets[index.to(self.targets.device)]

    def _iterate(self) -> tuple[list[dict[str, Any]], float]:
        """One iteration: statistics, updates, cosines, BDF step. Returns its rows and loss."""
        k = self.iteration
        bad = [name for name, p in self._params.items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise self._diverged(k, f"parameter(s) {bad} hold NaN or Inf after the last step")
        inputs, targets = self._next_batch()
        if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            raise ConfigError(f"the minibatch of iteration {k} has NaN or Inf inputs.")
        stats = self._collect(k, inputs, targets)
        if not math.isfinite(stats.loss):
            raise self._diverged(k, f"the minibatch loss is {stats.loss}")
        try:
            for method in self._instances():
                method.update(stats)
        except NonFiniteError as err:
            raise self._diverged(k, str(err)) from err
        step = self.stepper.direction()
        bad = [layer for layer, d in step.items() if not bool(torch.isfinite(d).all())]
        if bad:
            raise self._diverged(k, f"BDF's direction of layer(s) {bad} holds NaN or Inf")
        if self.config.reference == "full":
            rows = self._full_rows(k, stats, inputs, targets)
        else:
            directions = {
                name: step if self.methods[name] is self.stepper else self.methods[name].direction()
                for name in self.config.compared
            }
            rows = [
                {
                    "iteration": k,
                    "layer": layer,
                    "method": name,
                    "cosine": _cosine(directions[name][layer], step[layer]),
                    "loss": stats.loss,
                }
                for layer in self.layers
                for name in self.config.compared
            ]
        self._step(stats.layouts, step)
        self.iteration += 1
        return rows, stats.loss

    def _instances(self) -> list[Method]:
        """Every method instance once: :attr:`methods`, and the stepper when held apart."""
        apart = [] if self.stepper is self.methods[REFERENCE] else [self.stepper]
        return [*self.methods.values(), *apart]

    def _full_rows(
        self, k: int, stats: Stats, inputs: Tensor, targets: Tensor
    ) -> list[dict[str, Any]]:
        """The rows of ``reference="full"``: every compared ``ζ_X = X.direction(g)`` against
        ``ζ* = F_λ⁻¹ g`` per recorded layer and for the whole network (module docstring)."""
        layers = list(self._layouts)
        fisher = _AllLayerFisher(
            self._all_layer_rows(stats, inputs, targets),
            stats.batch_size,
            self.config.damping,
            self._dense_reference,
        )
        dtype = fisher.rows.dtype
        star = fisher.solve(torch.cat([stats.grad[layer] for layer in layers]).to(dtype))
        names = self.config.compared
        zetas = torch.stack(
            [
                torch.cat([d[layer] for layer in layers]).to(dtype)
                for d in (self.methods[name].direction(stats.grad) for name in names)
            ]
        )
        offsets, start = {}, 0
        for layer in layers:
            offsets[layer] = slice(start, start + self._layouts[layer].dim)
            start += self._layouts[layer].dim
        errors = zetas - star
        rows = []
        for layer in (*self.layers, NETWORK):
            part = offsets.get(layer, slice(None))
            energy = fisher.energy_errors(errors, star, part)
            for index, name in enumerate(names):
                rows.append(
                    {
                        "iteration": k,
                        "layer": layer,
                        "method": name,
                        "cosine": _cosine(zetas[index, part], star[part]),
                        "loss": stats.loss,
                        "energy_error": energy[index],
                    }
                )
        return rows

    def _all_layer_rows(self, stats: Stats, inputs: Tensor, targets: Tensor) -> Tensor:
        """The rows ``U`` ``[R, D]`` of ``F = (1/m) UᵀU`` over every layer (§2 order, layers in
        model order): the per-sample gradients (empirical) or the ``C`` rows ``J_nᵀ s_nc`` of
        every sample (exact)."""
        layers = list(self._layouts)
        if self.config.fisher == "empirical":
            return torch.cat([stats.per_sample[layer] for layer in layers], dim=1)
        chunks = fisher_rows(self.model, self.loss_fn, inputs, targets, kind="exact")
        return torch.cat([torch.cat([c[layer] for layer in layers], dim=1) for c in chunks])

    def _collect(self, k: int, inputs: Tensor, targets: Tensor) -> Stats:
        """The one statistics pass; overflowing outputs (which break label sampling) diverge."""
        finite: list[bool] = []

        def watch(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, Tensor):
                finite.append(bool(torch.isfinite(output).all()))

        handle = self.model.register_forward_hook(watch)
        try:
            return collect(
                self.model,
                self.loss_fn,
                inputs,
                targets,
                self.needs,
                generator=self._label_generator,
            )
        except RuntimeError as err:
            if not all(finite):
                raise self._diverged(k, "the network's outputs hold NaN or Inf") from err
            raise
        finally:
            handle.remove()

    def _step(self, layouts: Mapping[str, LayerLayout], direction: Mapping[str, Tensor]) -> None:
        """``θ ← θ − α d`` for every layer, with ``d`` in METHODS §2 order."""
        with torch.no_grad():
            for layer, layout in layouts.items():
                for name, delta in layout.unflatten(direction[layer]).items():
                    self._params[name].sub_(delta, alpha=self.config.lr)

    def _diverged(self, k: int, what: str) -> CosineDivergedError:
        return CosineDivergedError(
            f"the BDF trajectory diverged at iteration {k}: {what}. Try a larger damping "
            f"(now {self.config.damping:g}) or a smaller lr (now {self.config.lr:g}); the rows "
            "recorded before it are in this error's .frame and were handed to on_record.",
            iteration=k,
            columns=self.columns,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue identically (``torch.save``-able).

        Returns:
            ``{"iteration", "config", "model", "methods", "batch_generator",
            "label_generator", "permutation", "position"}``: the iteration counter, the
            configuration (as a dict), cloned model parameters and buffers, every method's
            :meth:`~mbf_analysis.methods.Method.state_dict` (by :attr:`methods` name), both
            generator states and the epoch's permutation with the position in it; and
            ``"stepper"``, the followed BDF's, when it is not ``methods["bdf"]`` (a one-shot BDF
            is compared).
        """
        state = {
            "iteration": self.iteration,
            "config": asdict(self.config),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "methods": {name: m.state_dict() for name, m in self.methods.items()},
            "batch_generator": self._batch_generator.get_state(),
            "label_generator": self._label_generator.get_state(),
            "permutation": None if self._permutation is None else self._permutation.clone(),
            "position": self._position,
        }
        if self.stepper is not self.methods[REFERENCE]:
            state["stepper"] = self.stepper.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (model, methods, generators, iteration counter).

        Raises:
            ValueError: If the state was saved with other methods, or with a BDF held apart
                from the compared one where this run shares it (or the reverse: another
                ``reference``/``one_shot``).
        """
        saved = state_dict["config"]
        if tuple(saved["methods"]) != tuple(self.config.methods):
            raise ConfigError(
                f"the state was saved with methods {list(saved['methods'])}, this run compares "
                f"{list(self.config.methods)}."
            )
        apart = self.stepper is not self.methods[REFERENCE]
        if ("stepper" in state_dict) != apart or set(state_dict["methods"]) != set(self.methods):
            raise ConfigError(
                f"the state was saved with reference={saved.get('reference', 'bdf')!r}, "
                f"one_shot={saved.get('one_shot')!r}, methods {sorted(state_dict['methods'])}; "
                f"this run (reference={self.config.reference!r}, one_shot="
                f"{self.config.one_shot!r}) keeps {sorted(self.methods)}"
                f"{' and a separate BDF to follow' if apart else ''}."
            )
        ours = asdict(self.config)
        defaults = {
            "reference": "bdf",
            "fisher": "empirical",
            "one_shot": None,
            "reference_solver": "auto",
        }
        changed = sorted(
            k for k in ours if k != "iterations" and saved.get(k, defaults.get(k)) != ours[k]
        )
        if changed:
            logger.warning("resuming with changed settings %s; the run will not match", changed)
        self.model.load_state_dict(state_dict["model"])
        for name, method in self.methods.items():
            method.load_state_dict(state_dict["methods"][name])
        if apart:
            self.stepper.load_state_dict(state_dict["stepper"])
        self._batch_generator.set_state(state_dict["batch_generator"])
        self._label_generator.set_state(state_dict["label_generator"])
        permutation = state_dict["permutation"]
        self._permutation = None if permutation is None else permutation.clone()
        self._position = int(state_dict["position"])
        self.iteration = int(state_dict["iteration"])


def cosine_trajectory(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    on_record: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = True,
    **config: Any,
) -> pd.DataFrame:
    """Run the whole analysis on a copy of ``model`` (the caller's model is left untouched).

    Args:
        model, loss_fn, inputs, targets: As for :class:`CosineRun`.
        on_record, progress: As for :meth:`CosineRun.run`.
        **config: Fields of :class:`CosineConfig`.

    Returns:
        The tidy frame of :attr:`CosineConfig.iterations` iterations (columns
        :attr:`CosineConfig.columns`).
    """
    run = CosineRun(copy.deepcopy(model), loss_fn, inputs, targets, CosineConfig(**config))
    return run.run(on_record=on_record, progress=progress)
