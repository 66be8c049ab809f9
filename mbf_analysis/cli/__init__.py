"""``mbf-analyze``: the command line. It parses, builds configurations and calls the library.

One module per subcommand (``fisher``, ``heatmap``, ``cosine``, ``error``, ``train``), each with
``add_parser(sub)`` and ``run(args)``; :mod:`~mbf_analysis.cli.common` holds what they share and
:mod:`~mbf_analysis.cli.run_folder` owns the output folder (refusal to overwrite, resume,
``run.json``).

Start-up is light: the parser, ``--help``, argument errors, a refused output folder and a
missing data file are answered before torch, numpy, pandas or BackPACK are imported; each
subcommand imports the numerical stack when it runs.

Threads: unless the user set ``OMP_WAIT_POLICY``, :func:`main` sets it to ``PASSIVE`` before
torch is imported. Torch's default (active spinning) made the paper preset 17× slower on a
shared 2-core machine; ``--threads N`` sets torch's intra-op threads. Both are recorded in
``run.json``.

Every error a user can cause (an unknown name, missing data, a model that does not fit the data)
ends in one line on stderr, ``mbf-analyze: error: ...``, and exit code 2. Ctrl-C ends with one
line and exit code 130 at any moment (subcommands that save state print how to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main", "build_parser"]

PROG = "mbf-analyze"

SUBCOMMANDS = ("fisher", "heatmap", "cosine", "error", "train")
"""The subcommand modules of this package, in the order ``--help`` lists them (imported by
:func:`build_parser`, so that a Ctrl-C while they load is caught by :func:`main`)."""

INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT)."""

TERMINATED = 143
"""Exit code after SIGTERM (128 + SIGTERM)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: the error and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mbf-analyze`` and its subcommands (a usage error prints one
    line, ``mbf-analyze CMD: error: ... (see 'mbf-analyze CMD --help')``, and exits 2)."""
    import importlib

    from mbf_analysis import __version__

    parser = _Parser(
        prog=PROG,
        description="Curvature analysis of the Mini-Block Fisher method (Bahamou, Goldfarb, Ren).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"mbf_analysis.cli.{name}").add_parser(sub)
    return parser


def _choose_wait_policy() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose one; say who chose."""
    if "OMP_WAIT_POLICY" in os.environ:
        return "user"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return PROG


def _interruption(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that ``err`` is or was caused by (an import cut short by
    ``SIGINT`` can surface as an ``ImportError`` chained to the ``KeyboardInterrupt``), or
    ``None``. A ``SystemExit`` is an exit a subcommand chose (it has said how to resume), never
    an interruption to report."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen and not isinstance(err, SystemExit):
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def _other_rank() -> bool:
    """Whether this process is a ``torchrun`` rank other than 0 (``WORLD_SIZE > 1``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0
    except ValueError:
        return False


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM outside a loop that stops cleanly: stop at once, as Ctrl-C does."""
    from mbf_analysis.stopping import Interrupted

    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mbf-analyze``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return _main(argv)
    except BaseException as err:
        interruption = _interruption(err)
        if interruption is None:
            raise
        code = getattr(interruption, "exit_code", INTERRUPTED)
        print(f"{PROG}: {'terminated' if code == TERMINATED else 'interrupted'}", file=sys.stderr)
        return code
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if "mbf_analysis.cli.run_folder" in sys.modules:
            sys.modules["mbf_analysis.cli.run_folder"].release_all()


def _main(argv: list[str]) -> int:
    """Run one subcommand: exit 0, or 2 with one line for the toolkit's own errors.

    Only :class:`~mbf_analysis.errors.MBFError` (bad settings, data, memory, state files, ...)
    and :class:`~mbf_analysis.cli.common.UsageError` are the user's to fix. Any other exception
    is a bug of the toolkit or of a library under it: its traceback is printed with a line that
    says so, and the exit code is 1.
    """
    from mbf_analysis.cli.common import UsageError
    from mbf_analysis.cli.run_folder import set_invocation
    from mbf_analysis.errors import MBFError

    set_invocation(
        argv, wait_policy_from=_choose_wait_policy(), torch_loaded="torch" in sys.modules
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "train" and _other_rank():
        print(
            f"{PROG} {args.command}: rank {os.environ['RANK']} of a torchrun job exits; rank 0 "
            "runs the analysis alone (only train uses several processes)",
            file=sys.stderr,
        )
        return 0
    try:
        args.run(args)
    except (UsageError, MBFError) as err:
        message = str(err).replace("\n", " ")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:
        if _interruption(err) is not None:
            raise
        traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(err).__name__} is not an error the toolkit expects, "
            "so this is a bug in mbf-analysis (or a library under it), not in your command. "
            "Please report it with the traceback above and the command line; results already "
            "saved in --out are kept.",
            file=sys.stderr,
        )
        return 1
    return 0
