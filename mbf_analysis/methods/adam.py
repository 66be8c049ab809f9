"""Adam (Kingma & Ba 2015) as a preconditioner (METHODS.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import GRAD, Stats
from mbf_analysis.methods.base import Method, MethodConfig, check_range

__all__ = ["AdamConfig", "Adam"]


@dataclass(kw_only=True)
class AdamConfig(MethodConfig):
    """Configuration of :class:`Adam`.

    Attributes:
        beta1: First-moment decay ``β₁ ∈ [0, 1)``.
        beta2: Second-moment decay ``β₂ ∈ [0, 1)``.
        eps: ``ε ≥ 0`` (the paper's grid: 1e-8 .. 1e-2).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    ONE_SHOT: ClassVar[dict] = {"beta1": 0.0, "beta2": 0.0}

    def __post_init__(self) -> None:
        check_range(self, "beta1", low=0.0, high=1.0, high_open=True)
        check_range(self, "beta2", low=0.0, high=1.0, high_open=True)
        check_range(self, "eps", low=0.0)


class Adam(Method):
    """Adam with bias correction.

    At step ``k`` (``t = k + 1``)::

        m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
        m̂ = m / (1 − β₁ᵗ),       v̂ = v / (1 − β₂ᵗ),       d = m̂ / (√v̂ + ε).

    ``direction(grads)`` divides ``grads`` by ``√v̂ + ε``. The curvature matrix is
    ``diag(v̂)``, the diagonal empirical Fisher whose square root Adam uses.
    """

    config: AdamConfig

    def __init__(self, config: AdamConfig | None = None, name: str = "adam") -> None:
        super().__init__(config or AdamConfig(), name)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({GRAD})

    def _update(self, stats: Stats) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for layer, g in stats.grad.items():
            slot = self.state.setdefault(layer, {})
            if "m" not in slot:
                slot["m"], slot["v"] = torch.zeros_like(g), torch.zeros_like(g)
            slot["m"].mul_(b1).add_(g, alpha=1 - b1)
            slot["v"].mul_(b2).addcmul_(g, g, value=1 - b2)

    def _corrections(self) -> tuple[float, float]:
        t = self.step
        return 1 - self.config.beta1**t, 1 - self.config.beta2**t

    def _first_moment(self) -> dict[str, Tensor]:
        c1, _ = self._corrections()
        return {layer: self.state[layer]["m"] / c1 for layer in self._require_layouts()}

    def _direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        _, c2 = self._corrections()
        return {
            layer: v / ((self.state[layer]["v"] / c2).sqrt() + self.config.eps)
            for layer, v in vectors.items()
        }

    def _matrix(self, layer: str) -> Tensor:
        _, c2 = self._corrections()
        return torch.diag(self.state[layer]["v"] / c2)
