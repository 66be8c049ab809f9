"""``mbf-analyze``: the command line. It parses, builds configurations and calls the library.

One module per subcommand (``fisher``, ``heatmap``, ``cosine``, ``train``), each with
``add_parser(sub)`` and ``run(args)``; :mod:`~mbf_analysis.cli.common` holds what they share.
Every error a user can cause (an unknown name, missing data, a model that does not fit the data)
ends in one line on stderr, ``mbf-analyze: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mbf_analysis import __version__
from mbf_analysis.cli import cosine, fisher, heatmap, train
from mbf_analysis.cli.common import UsageError
from mbf_analysis.data import DataError
from mbf_analysis.errors import MBFError

__all__ = ["main", "build_parser"]

SUBCOMMANDS = (fisher, heatmap, cosine, train)
"""The subcommand modules, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mbf-analyze`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="mbf-analyze",
        description="Curvature analysis of the Mini-Block Fisher method (Bahamou, Goldfarb, Ren).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mbf-analyze``; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (UsageError, DataError, MBFError, ValueError) as err:
        message = str(err).replace("\n", " ")
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    return 0
