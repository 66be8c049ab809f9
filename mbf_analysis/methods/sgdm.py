"""SGD with momentum (METHODS.md §4): no curvature, ``d = m``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mbf_analysis.curvature.collect import GRAD, Stats
from mbf_analysis.methods.base import Method, MethodConfig, check_range, momentum_

__all__ = ["SGDMConfig", "SGDM"]


@dataclass(kw_only=True)
class SGDMConfig(MethodConfig):
    """Configuration of :class:`SGDM`.

    Attributes:
        momentum: ``μ ∈ [0, 1)``.
        dampening: ``τ ∈ [0, 1]`` (torch SGD convention).
    """

    momentum: float = 0.9
    dampening: float = 0.0

    ONE_SHOT: ClassVar[dict] = {"momentum": 0.0}

    def __post_init__(self) -> None:
        check_range(self, "momentum", low=0.0, high=1.0, high_open=True)
        check_range(self, "dampening", low=0.0, high=1.0)


class SGDM(Method):
    """SGD-m: ``m ← μ m + (1 − τ) g`` (``m = g`` on the first step), ``d = m``.

    Its curvature matrix is the identity.
    """

    config: SGDMConfig

    def __init__(self, config: SGDMConfig | None = None, name: str = "sgdm") -> None:
        super().__init__(config or SGDMConfig(), name)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({GRAD})

    def _update(self, stats: Stats) -> None:
        for layer, g in stats.grad.items():
            slot = self.state.setdefault(layer, {})
            slot["m"] = momentum_(slot.get("m"), g, self.config.momentum, self.config.dampening)

    def _first_moment(self) -> dict[str, Tensor]:
        return {layer: self.state[layer]["m"] for layer in self._require_layouts()}

    def _direction(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {layer: v.clone() for layer, v in vectors.items()}

    def _matrix(self, layer: str) -> Tensor:
        m = self.state[layer]["m"]
        return torch.eye(m.numel(), dtype=m.dtype, device=m.device)
