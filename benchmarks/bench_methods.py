"""Cost of each method's statistics, update and direction, as a ratio to one forward + backward.

Problems (float32, ``nn.CrossEntropyLoss``, random inputs and labels, default configurations):

- ``mlp``: the 256-20×5-10 tanh MLP (:func:`mbf_analysis.models.paper_mlp`), batch 1000;
- ``resnet32``: ResNet32 (:func:`mbf_analysis.models.resnet32`) in eval mode, batch 128.

Per method, three operations are timed against the reference
``loss = CrossEntropyLoss()(model(x), y); loss.backward()``:

- ``collect``: :func:`~mbf_analysis.curvature.collect.collect` of the statistics the method needs
  (methods with the same needs share one measurement); the row ``(all methods)`` collects the
  union in one pass;
- ``update``: one :meth:`Method.update` with the default periods (1, so the statistics and the
  inverses are refreshed: the most expensive step);
- ``direction``: one :meth:`Method.direction`.

After one untimed warm-up call of everything, every round times the reference (before and
after, averaged) and each operation once, in alternating order from round to round; the table
reports the median over rounds of the per-round ratio, so background load that drifts between
rounds cancels. Operations shorter than ``--min-time`` are repeated and averaged. ``update`` and
``direction`` use the statistics of the round's own ``collect``.

Run: ``python benchmarks/bench_methods.py`` (about 3 minutes on 2 cores; ``--quick``: one round,
about a minute).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mbf_analysis import methods
from mbf_analysis.curvature.collect import Stats, collect
from mbf_analysis.errors import UnsupportedModuleError
from mbf_analysis.models import paper_mlp, resnet32

logger = logging.getLogger("bench_methods")

REFERENCE = "forward+backward"
ALL = "(all methods)"


@dataclass
class Problem:
    """A model and one batch."""

    name: str
    description: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor


def make_problem(name: str) -> Problem:
    """The ``mlp`` or ``resnet32`` problem (module docstring), seeded."""
    torch.manual_seed(0)
    if name == "mlp":
        return Problem(
            name,
            "paper_mlp (256-20×5-10 tanh), batch 1000",
            paper_mlp(),
            torch.randn(1000, 1, 16, 16),
            torch.randint(0, 10, (1000,)),
        )
    return Problem(
        name,
        "resnet32 (eval mode), batch 128",
        resnet32().eval(),
        torch.randn(128, 3, 32, 32),
        torch.randint(0, 10, (128,)),
    )


def _timed(fn: Callable[[], object], min_time: float) -> tuple[float, object]:
    """Seconds per call of ``fn``, repeating calls that are shorter than ``min_time``."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    if elapsed >= min_time:
        return elapsed, result
    repeats = math.ceil(min_time / max(elapsed, 1e-6))
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return (time.perf_counter() - start) / repeats, result


def bench(problem: Problem, names: list[str], rounds: int, min_time: float) -> list[dict]:
    """Median ratios per method and operation (module docstring)."""
    model, x, y = problem.model, problem.inputs, problem.targets
    loss_fn = nn.CrossEntropyLoss()

    def reference() -> None:
        for p in model.parameters():
            p.grad = None
        loss_fn(model(x), y).backward()

    built = {name: methods.get(name) for name in names}
    # Warm-up: one untimed call of everything (allocations, first-update state). Methods that
    # refuse the network's layers (the Linear-only Kronecker-SVD family on a CNN) are left out.
    reference()
    warm = collect(model, loss_fn, x, y, frozenset().union(*(m.needs for m in built.values())))
    for name, method in list(built.items()):
        try:
            method.update(warm)
        except UnsupportedModuleError as err:
            logger.info("%s: %s left out (%s)", problem.name, name, err)
            del built[name]
            continue
        method.direction()
    names = [name for name in names if name in built]
    need_sets = {name: m.needs for name, m in built.items()}
    union = frozenset().union(*need_sets.values())
    distinct = sorted(set(need_sets.values()) | {union}, key=lambda s: (len(s), sorted(s)))
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        forward = r % 2 == 0
        ref, _ = _timed(reference, min_time)
        stats: dict[frozenset[str], Stats] = {}
        times: dict[tuple[str, str], float] = {}
        for needs in distinct if forward else distinct[::-1]:
            times[("collect", "+".join(sorted(needs)))], stats[needs] = _timed(
                lambda needs=needs: collect(model, loss_fn, x, y, needs), min_time
            )
        for name in names if forward else names[::-1]:
            method, batch = built[name], stats[need_sets[name]]
            times[("update", name)], _ = _timed(lambda m=method, s=batch: m.update(s), min_time)
            times[("direction", name)], _ = _timed(method.direction, min_time)
        ref = 0.5 * (ref + _timed(reference, min_time)[0])
        for key, value in times.items():
            ratios.setdefault(key, []).append(value / ref)
        ratios.setdefault(("reference", REFERENCE), []).append(ref)
        logger.info("%s: round %d/%d done", problem.name, r + 1, rounds)

    def median(op: str, key: str) -> float:
        return statistics.median(ratios[(op, key)])

    rows = []
    for name in names:
        needs = "+".join(sorted(need_sets[name]))
        c, u, d = median("collect", needs), median("update", name), median("direction", name)
        rows.append(
            {
                "method": name,
                "needs": needs,
                "collect": c,
                "update": u,
                "direction": d,
                "total": c + u + d,
            }
        )
    joined = "+".join(sorted(union))
    rows.append({"method": ALL, "needs": joined, "collect": median("collect", joined)})
    rows.append({"method": REFERENCE, "seconds": median("reference", REFERENCE)})
    return rows


def render(
    results: dict[str, list[dict]], problems: dict[str, Problem], args: argparse.Namespace
) -> str:
    """Markdown tables, one per problem."""
    lines = [
        "# Method costs (ratio to one plain forward + backward of the same batch)",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} round(s) after one "
        f"untimed warm-up call of everything. Command: `python {' '.join(sys.argv)}`.",
        "",
    ]
    for name, rows in results.items():
        ref = next(row for row in rows if row["method"] == REFERENCE)
        lines += [
            f"## {problems[name].description}",
            "",
            f"Reference forward+backward: {ref['seconds'] * 1e3:.1f} ms.",
            "",
            "| method | statistics needed | collect | update | direction | total |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for row in rows:
            if row["method"] == REFERENCE:
                continue
            if row["method"] == ALL:
                lines.append(f"| {ALL} | {row['needs']} | {row['collect']:.2f} | | | |")
                continue
            lines.append(
                f"| {row['method']} | {row['needs']} | {row['collect']:.2f} | "
                f"{row['update']:.2f} | {row['direction']:.2f} | {row['total']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (median)")
    parser.add_argument(
        "--min-time", type=float, default=0.05, help="repeat shorter operations up to this (s)"
    )
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--problems", nargs="+", default=["mlp", "resnet32"], choices=["mlp", "resnet32"]
    )
    parser.add_argument("--methods", nargs="+", default=methods.names(), choices=methods.names())
    parser.add_argument("--out", default="benchmarks/results_methods.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message="Extension saving to grad_batch")
    torch.set_num_threads(args.threads)
    problems = {name: make_problem(name) for name in args.problems}
    results = {
        name: bench(problem, args.methods, args.rounds, args.min_time)
        for name, problem in problems.items()
    }
    text = render(results, problems, args)
    sys.stdout.write(text + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
