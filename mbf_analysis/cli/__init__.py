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
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

PROG = "mbf-analyze"

SUBCOMMANDS = ("fisher", "heatmap", "cosine", "error", "train")
"""The subcommand modules of this package, in the order ``--help`` lists them (imported by
:func:`build_parser`, so that a Ctrl-C while they load is caught by :func:`main`)."""

INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mbf-analyze`` and its subcommands."""
    import importlib

    from mbf_analysis import __version__

    parser = argparse.ArgumentParser(
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


def _interrupted(err: BaseException) -> bool:
    """Whether ``err`` is, or was caused by, a Ctrl-C (an import cut short by ``SIGINT`` can
    surface as an ``ImportError`` chained to the ``KeyboardInterrupt``). A ``SystemExit`` is an
    exit a subcommand chose (it has said how to resume), never an interruption to report."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen and not isinstance(err, SystemExit):
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mbf-analyze``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BaseException as err:
        if not _interrupted(err):
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _main(argv: list[str]) -> int:
    from mbf_analysis.cli.common import UsageError
    from mbf_analysis.cli.run_folder import set_invocation
    from mbf_analysis.datafiles import DataError
    from mbf_analysis.errors import MBFError

    set_invocation(
        argv, wait_policy_from=_choose_wait_policy(), torch_loaded="torch" in sys.modules
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (UsageError, DataError, MBFError, ValueError) as err:
        message = str(err).replace("\n", " ")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    return 0
