"""Writing result files safely: atomic replacement, and one clear error when a write fails.

Every state file, checkpoint, record and rewritten log goes through :func:`atomic_write`: the
content is written to a temporary file in the same folder, flushed to disk, and renamed over the
target only once complete. An interrupted or failed write therefore leaves the previous version
intact and no temporary file behind.

A write that fails in the operating system (disk full, quota, read-only folder, permissions)
raises :class:`~mbf_analysis.errors.StorageError`, which names the file and the OS error in one
line, instead of an ``OSError`` or the ``RuntimeError`` that ``torch.save`` wraps it in. Callers
that know what was kept (the last good state, the rows so far) add that and how to continue
(:meth:`StorageError.with_context`).

This module does not import torch at import time (the command line's refusals stay fast).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mbf_analysis.errors import StorageError

__all__ = ["atomic_write", "atomic_save", "atomic_write_json", "storage_errors", "os_error_in"]


def os_error_in(err: BaseException) -> OSError | None:
    """The ``OSError`` that ``err`` is or was raised from (``torch.save`` turns a failed write
    into a ``RuntimeError`` raised while handling it), or ``None``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and not isinstance(err, StorageError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def storage_errors(path: str | Path) -> Iterator[None]:
    """Turn a failed OS-level write of ``path`` inside the block into a
    :class:`~mbf_analysis.errors.StorageError`; other exceptions pass unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        cause = os_error_in(err)
        if cause is None:
            raise
        raise StorageError(Path(path), cause) from err


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically with ``write(fh)`` on a binary file (module docstring).

    Raises:
        StorageError: If the operating system refused a write (the target is unchanged and the
            temporary file removed).
    """
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(handle, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.chmod(0o644)  # mkstemp creates the file private (0600)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_save(payload: Any, path: str | Path) -> None:
    """``torch.save(payload)`` to ``path`` atomically (:func:`atomic_write`)."""
    import torch

    atomic_write(path, lambda fh: torch.save(payload, fh))


def atomic_write_json(path: str | Path, record: Any) -> None:
    """``record`` as indented JSON (``default=str``), atomically (:func:`atomic_write`)."""
    text = json.dumps(record, indent=2, default=str) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))
