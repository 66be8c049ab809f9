"""Exceptions the toolkit raises for bad input; the CLI turns each into a one-line error.

Every error the toolkit raises on purpose is an :class:`MBFError`; it also derives from the
built-in class a Python caller would expect (``ValueError`` for a bad setting, ``KeyError`` for
an unknown name, ``MemoryError`` for a refused allocation, ...). ``mbf-analyze`` prints an
``MBFError`` as one line and exits 2; any other exception is a bug in the toolkit, shown with
its traceback (exit 1).
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = [
    "MBFError",
    "ConfigError",
    "UnknownNameError",
    "UnsupportedModuleError",
    "InplaceModuleError",
    "TrainModeError",
    "NonFiniteError",
    "MemoryBudgetError",
    "StorageError",
]


class MBFError(Exception):
    """Base class of the toolkit's input errors."""


class ConfigError(MBFError, ValueError):
    """A setting, argument or input value that the toolkit refuses, with the reason."""


class UnknownNameError(MBFError, KeyError):
    """A method, layer or statistic name that does not exist; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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


class StorageError(MBFError, OSError):
    """A result file could not be written (disk full, quota, read-only folder, permissions).

    Args:
        path: The file.
        cause: The operating system's error.
        context: What was kept and how to continue, added by the caller that knows
            (:meth:`with_context`).
    """

    def __init__(self, path: Path, cause: OSError, context: str = "") -> None:
        reason = cause.strerror or str(cause)
        name = errno.errorcode.get(cause.errno or 0)
        super().__init__(cause.errno, reason)
        self.path = Path(path)
        self.cause = cause
        self.context = context
        self.reason = f"{reason} ({name})" if name else reason

    def with_context(self, context: str) -> StorageError:
        """The same error with ``context`` (e.g. which state is kept and how to resume)."""
        return StorageError(self.path, self.cause, context)

    def __str__(self) -> str:
        text = f"could not write {self.path}: {self.reason}"
        return f"{text}; {self.context}" if self.context else text
