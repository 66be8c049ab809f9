"""Per-iteration cost of the optimizers of :mod:`mbf_analysis.optim` relative to Adam.

Problems (float32, ``nn.CrossEntropyLoss``, random inputs and labels, train mode, batch 128):

- ``resnet32``: :func:`mbf_analysis.models.resnet32`, CIFAR shape ``3×32×32``, 10 classes;
- ``vgg16``: :func:`mbf_analysis.models.vgg16_bn` with 100 classes (heavy on CPU).

An *iteration* is ``zero_grad``, forward, backward and ``step``. Every optimizer owns a copy of
the same initial model. MBF, KFAC and Shampoo run at their CNN periods ``T1 = 10``, ``T2 = 100``,
whose iterations are of three kinds: *plain* (no statistics), *stats* (``k ≡ 0 mod T1``: the
curvature statistics are updated, for KFAC also recorded by its hooks) and *inverse*
(``k ≡ 0 mod T2``: statistics and inverses). Each kind is timed on its own by setting the
group's periods before the iteration (``10⁹`` or ``1``; the step counter is past 0 after the
untimed warm-up iteration), and the amortized cost of ``T2 = 100`` iterations is
``(90 plain + 9 stats + 1 inverse) / 100``.

After one untimed warm-up iteration of every optimizer, each round times one iteration of every
(optimizer, kind), in an order that rotates from round to round, each paired with an Adam
iteration run right before or after it (alternating); the tables give the median over rounds of
the ratio within each pair (so that load drifting on the machine cancels), the median of the
step-time difference over Adam's iteration, and the median times. Optimizer state memory is the
sum of the bytes of the distinct storages of the state tensors (MBF's state holds views into its
buckets), after the warm-up.

Threads: ``--threads 1`` by default. On a shared 2-core machine two OpenMP threads turn every
small kernel into a wait for the other core (a 0.5M-element ``add_`` measured 25 ms instead of
0.06 ms while other processes ran); one thread gives stable ratios. ``--threads 2`` is available.

Run: ``python benchmarks/bench_optim.py`` (resnet32 with 5 rounds and vgg16 with 2; ``--quick``:
2 and 1 rounds). Shampoo's inverse roots use ``root_method="eigh"`` on vgg16 (the coupled Newton
iteration on its 4096² statistics takes minutes per matrix on CPU).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mbf_analysis.models import resnet32, vgg16_bn
from mbf_analysis.optim import KFAC, MBF, Shampoo

logger = logging.getLogger("bench_optim")

KINDS = {"plain": (10**9, 10**9), "stats": (1, 10**9), "inverse": (1, 1)}
"""Kind of iteration → (stat_period, inverse_period) set before it."""
AMORTIZED = {"plain": 0.90, "stats": 0.09, "inverse": 0.01}
"""Share of each kind among ``T2 = 100`` iterations with ``T1 = 10``."""
BATCH = 128
LABELS = {"resnet32": "ResNet32", "vgg16": "VGG16-BN"}


@dataclass
class Variant:
    """One optimizer on its own copy of the model, and the kinds of iteration it has."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    kinds: tuple[str, ...]
    times: dict[str, list[float]] = field(default_factory=dict)
    step_times: dict[str, list[float]] = field(default_factory=dict)

    def set_kind(self, kind: str) -> None:
        """Set the periods that make the next iteration of ``kind``."""
        if kind in KINDS:
            for group in self.optimizer.param_groups:
                group["stat_period"], group["inverse_period"] = KINDS[kind]


def build_variants(problem: str, base: nn.Module) -> list[Variant]:
    """SGD-m, Adam, MBF, KFAC and Shampoo, each on a deep copy of ``base``."""
    lr = 1e-4  # small: the parameters barely move, so every round times the same problem
    shampoo_root = "eigh" if problem == "vgg16" else "newton"
    builders: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], tuple[str, ...]]] = {
        "SGD-m": (lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), ("plain",)),
        "Adam": (lambda m: torch.optim.Adam(m.parameters(), lr=lr), ("plain",)),
        "MBF": (lambda m: MBF(m, lr=lr, weight_decay=5e-4), tuple(KINDS)),
        "KFAC": (lambda m: KFAC(m, lr=lr, weight_decay=5e-4), tuple(KINDS)),
        "Shampoo": (
            lambda m: Shampoo(m, lr=lr, weight_decay=5e-4, root_method=shampoo_root),
            tuple(KINDS),
        ),
    }
    variants = []
    for name, (build, kinds) in builders.items():
        model = copy.deepcopy(base)
        variants.append(Variant(name, model, build(model), kinds))
    return variants


def iteration(variant: Variant, x: Tensor, y: Tensor) -> tuple[float, float]:
    """One timed iteration: ``(total seconds, step seconds)``."""
    start = time.perf_counter()
    variant.optimizer.zero_grad()
    nn.functional.cross_entropy(variant.model(x), y).backward()
    before_step = time.perf_counter()
    variant.optimizer.step()
    end = time.perf_counter()
    return end - start, end - before_step


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind the optimizer's state tensors."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def run_problem(problem: str, rounds: int) -> dict:
    """Time every (optimizer, kind) of one problem; return the table rows and metadata."""
    torch.manual_seed(0)
    if problem == "resnet32":
        base, classes = resnet32(), 10
        description = "ResNet32 (0.46M parameters), CIFAR-10 shape 3×32×32"
    else:
        base, classes = vgg16_bn(num_classes=100), 100
        description = "VGG16-BN, 100 classes (34M parameters), 3×32×32"
    base.train()
    x = torch.randn(BATCH, 3, 32, 32)
    y = torch.randint(0, classes, (BATCH,))
    variants = build_variants(problem, base)
    logger.info("%s: warm-up", problem)
    for variant in variants:
        variant.set_kind("inverse")
        iteration(variant, x, y)
    memory = {v.name: state_bytes(v.optimizer) for v in variants}
    adam = next(v for v in variants if v.name == "Adam")
    jobs = [(v, kind) for v in variants if v is not adam for kind in v.kinds]
    # (optimizer, kind) → per round: iteration / Adam's, (step − Adam's step) / Adam's iteration
    ratios: dict[tuple[str, str], list[float]] = {}
    overheads: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        shift = r % len(jobs)
        for j, (variant, kind) in enumerate(jobs[shift:] + jobs[:shift]):
            variant.set_kind(kind)
            if (r + j) % 2:
                ours, reference = iteration(variant, x, y), iteration(adam, x, y)
            else:
                reference, ours = iteration(adam, x, y), iteration(variant, x, y)
            key = (variant.name, kind)
            variant.times.setdefault(kind, []).append(ours[0])
            variant.step_times.setdefault(kind, []).append(ours[1])
            adam.times.setdefault("plain", []).append(reference[0])
            adam.step_times.setdefault("plain", []).append(reference[1])
            ratios.setdefault(key, []).append(ours[0] / reference[0])
            overheads.setdefault(key, []).append((ours[1] - reference[1]) / reference[0])
            logger.info(
                "%s round %d: %s %s %.3f s (Adam %.3f s)", problem, r, *key, ours[0], reference[0]
            )
    ratios[("Adam", "plain")] = [1.0]
    overheads[("Adam", "plain")] = [0.0]
    rows = []
    for variant in variants:
        for kind in variant.kinds:
            key = (variant.name, kind)
            rows.append(
                (
                    variant.name,
                    kind,
                    statistics.median(variant.times[kind]),
                    statistics.median(ratios[key]),
                    statistics.median(variant.step_times[kind]),
                    statistics.median(overheads[key]),
                )
            )
        if len(variant.kinds) > 1:
            mixed = [r for r in rows if r[0] == variant.name]
            rows.append(
                (
                    variant.name,
                    "amortized",
                    *(sum(AMORTIZED[r[1]] * r[i] for r in mixed) for i in range(2, 6)),
                )
            )
    return {"description": description, "rows": rows, "memory": memory, "rounds": rounds}


def render(results: dict[str, dict], command: str, threads: int) -> str:
    """The markdown report."""
    lines = [
        "# Optimizer cost per iteration (forward + backward + step), relative to Adam",
        "",
        f"{datetime.date.today().isoformat()}; {platform.platform()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s); load average "
        f"at the end {os.getloadavg()[0]:.1f}. Command: `{command}`.",
        "",
        "Batch 128, float32, train mode. MBF, KFAC, Shampoo at T1 = 10, T2 = 100: *plain* "
        "iterations (90 of 100), *stats* (k ≡ 0 mod T1; 9 of 100), *inverse* (k ≡ 0 mod T2; 1 of "
        "100) and their *amortized* mix (amortized × Adam: the same mix of the medians). × Adam: "
        "median over rounds of the ratio to an Adam iteration run right before or after (the "
        "order alternates); *step overhead*: median of (step − Adam's step) / Adam's iteration, "
        "the part of the ratio the optimizer's step is responsible for, less noisy than the "
        "ratio (KFAC's hooks add to its forward and backward passes on stats and inverse "
        "iterations, which only the ratio shows). Times: medians. Weight decay 5e-4; KFAC in its "
        "default `split` damping mode.",
    ]
    targets = []
    for problem, result in results.items():
        rows = {(row[0], row[1]): row[2:] for row in result["rows"]}
        lines += [
            "",
            f"## {result['description']}, batch {BATCH}",
            "",
            f"{result['rounds']} round(s) after one untimed warm-up iteration of everything.",
            "",
            "| optimizer | iteration | time (ms) | × Adam | step alone (ms) | step overhead |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, kind, total, ratio, step, overhead in result["rows"]:
            lines.append(
                f"| {name} | {kind} | {total * 1e3:.0f} | {ratio:.3f} | {step * 1e3:.1f} | "
                f"{overhead:+.1%} |"
            )
        adam_mem = result["memory"]["Adam"]
        lines += ["", "| optimizer | state memory (MB) | × Adam |", "|---|---:|---:|"]
        for name, nbytes in result["memory"].items():
            lines.append(f"| {name} | {nbytes / 2**20:.1f} | {nbytes / adam_mem:.2f} |")
        label = LABELS[problem]
        mbf, kfac = rows[("MBF", "amortized")], rows[("KFAC", "amortized")]
        if problem == "resnet32":
            verdict = "met" if mbf[1] <= 1.10 else "missed"
            targets.append(
                f"- {label}: MBF {mbf[1]:.3f}× Adam amortized (step overhead {mbf[3]:+.1%}), "
                f"{rows[('MBF', 'plain')][1]:.3f}× on plain iterations, "
                f"{rows[('MBF', 'inverse')][1]:.3f}× on an inverse iteration; target ≤ 1.10×: "
                f"{verdict}."
            )
        kinds = (*KINDS, "amortized")
        faster = [k for k in kinds if rows[("MBF", k)][1] < rows[("KFAC", k)][1]]
        targets.append(
            f"- {label}: MBF {mbf[1]:.3f}× vs KFAC {kfac[1]:.3f}× Adam amortized; MBF faster "
            f"than KFAC on {len(faster)} of {len(kinds)} kinds ({', '.join(faster) or 'none'})."
        )
    lines += ["", "## Targets", "", *targets, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problems", nargs="+", default=["resnet32", "vgg16"], choices=["resnet32", "vgg16"]
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds for resnet32 (vgg16: half, at least 1); default 5, with --quick 2",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_optim.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 5)
    results = {}
    for problem in args.problems:
        n = rounds if problem == "resnet32" else max(1, rounds // 2)
        results[problem] = run_problem(problem, n)
    command = "python benchmarks/bench_optim.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = render(results, command.strip(), args.threads)
    args.out.write_text(report)
    logger.info("wrote %s\n%s", args.out, report)


if __name__ == "__main__":
    main()
