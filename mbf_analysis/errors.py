"""Exceptions the toolkit raises for bad input; the CLI turns each into a one-line error."""

from __future__ import annotations

__all__ = [
    "MBFError",
    "UnsupportedModuleError",
    "InplaceModuleError",
    "TrainModeError",
    "NonFiniteError",
    "MemoryBudgetError",
]


class MBFError(Exception):
    """Base class of the toolkit's input errors."""


class UnsupportedModuleError(MBFError, TypeError):
    """A module (or model structure) that an operation does not support."""


class InplaceModuleError(MBFError, ValueError):
    """A module computes in place, which breaks BackPACK's backward hooks."""


class TrainModeError(MBFError, ValueError):
    """BatchNorm or Dropout in train mode make per-sample quantities ill-defined."""


class NonFiniteError(MBFError, FloatingPointError):
    """A gradient or curvature statistic holds NaN or Inf."""


class MemoryBudgetError(MBFError, MemoryError):
    """A dense matrix would not fit in the memory budget; refused before allocating it."""
