"""Stopping a long computation cleanly on Ctrl-C (SIGINT) or SIGTERM.

A batch scheduler sends SIGTERM before it preempts a job, and a user presses Ctrl-C: both should
cost at most the step in progress. Inside :func:`stop_requests`:

- the **first** SIGINT or SIGTERM only sets a flag (and logs one warning); the loop finishes the
  step or iteration in progress, reaches a point where its state is whole, and calls
  :meth:`StopRequests.check`, which raises :class:`StopRequested` there, so that the caller can
  save that whole state;
- a **second** signal raises :class:`Interrupted` at once, wherever the loop is: nothing is
  saved, and the state saved before stays the last good one.

Both are ``KeyboardInterrupt`` subclasses, so code that already treats Ctrl-C keeps working;
their :attr:`~Interrupted.exit_code` is ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), and
``isinstance(err, StopRequested)`` tells a clean stop from an abrupt one.

The handlers are process-wide, so :func:`stop_requests` is re-entrant: a loop inside another (a
training run inside a comparison, an analysis inside a command) shares the outer request.
Outside the main thread (where Python cannot install signal handlers) it installs nothing, and
the flag can still be set by :meth:`StopRequests.request`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupted", "StopRequested", "StopRequests", "exit_code", "stop_requests"]

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that ask for a clean stop."""


class Interrupted(KeyboardInterrupt):
    """A stop by a signal, at once: the state may be inside a step (a ``KeyboardInterrupt``).

    Args:
        signum: The signal.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """``128 + signum``: 130 after Ctrl-C, 143 after SIGTERM."""
        return 128 + self.signum


class StopRequested(Interrupted):
    """A stop asked for by SIGINT or SIGTERM, raised at a clean point: the state there is
    whole."""


def exit_code(err: BaseException) -> int:
    """The exit code of a stop: ``128 + signal``, 130 for a bare ``KeyboardInterrupt``."""
    return getattr(err, "exit_code", 128 + signal.SIGINT)


class StopRequests:
    """The flag set by the first SIGINT/SIGTERM (:func:`stop_requests`)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        """Whether a stop has been asked for."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop, as the first signal does."""
        if self.signum is None:
            self.signum = int(signum)

    def check(self) -> None:
        """Raise :class:`StopRequested` if a stop has been asked for (call it where the state is
        whole)."""
        if self.signum is not None:
            raise StopRequested(self.signum)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.request(signum)
        logger.warning(
            "%s received: stopping after the step in progress and saving what it reached "
            "(Ctrl-C again to stop at once, keeping only what was saved before)",
            signal.Signals(signum).name,
        )


_active: StopRequests | None = None


@contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Install the handlers of SIGINT and SIGTERM (module docstring) for the ``with`` block and
    yield the flag; an enclosing block's flag is shared. The previous handlers come back at the
    end of the outermost block."""
    global _active
    if _active is not None:
        yield _active
        return
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {signum: signal.signal(signum, requests._handler) for signum in SIGNALS}
    _active = requests
    try:
        yield requests
    finally:
        _active = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
