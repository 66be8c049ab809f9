"""GPU benchmarks: MBF against Adam and KFAC on ResNet32 and VGG16-BN, and MBF on the MNIST
autoencoder against SGD-m, with synchronised timings (``benchmarks/gpu.sh`` runs it).

CNN problems (float32, ``nn.CrossEntropyLoss``, seeded random inputs and labels, train mode,
batch 128; ``cudnn.benchmark`` on for every optimizer):

- ``resnet32``: :func:`mbf_analysis.models.resnet32`, CIFAR shape ``3×32×32``, 10 classes;
- ``vgg16``: :func:`mbf_analysis.models.vgg16_bn` with 100 classes.

An *iteration* is ``zero_grad``, forward, backward and ``step``; the device is synchronised
before every clock read (start, before the step, end), so a time covers the kernels it launched.
SGD-m, Adam, :class:`~mbf_analysis.optim.MBF` and :class:`~mbf_analysis.optim.KFAC` (split
damping, empirical Fisher, weight decay 5e-4) own copies of the same initial model. MBF and KFAC
run at ``T1 = 10``, ``T2 = 100``; their *plain*, *stats* and *inverse* iterations are timed on
their own (the periods are set before each, as in ``bench_optim.py``) and amortized as
``(90 plain + 9 stats + 1 inverse) / 100``. After ``--warmup`` untimed iterations of every
(optimizer, kind) (cuDNN autotuning, lazy CUDA initialisation), each round times every
(optimizer, kind) once, in an order that rotates from round to round, each paired with an Adam
iteration right before or after it (alternating); ratios are medians over rounds of the ratio
within a pair. Rounds repeat until ``--rounds`` or until the problem's share of
``--time-limit`` is spent (at least two rounds; ``--quick``: one warm-up iteration and one
round, a functional check rather than a measurement).

``mnist-ae``: ``bench_autoencoder.py``'s measurement (MBF at the ``mnist-ae`` preset and with
the size rule, T1 = 1, T2 = 20, batch 1000 of synthetic images, against SGD-m) on the same
device, 20 rounds (``--quick``: 1).

Targets: MBF ≤ 1.3× Adam amortized on ResNet32 and VGG16-BN; MBF faster than KFAC.

Run::

    python benchmarks/bench_gpu.py                       # CUDA; writes results_gpu.md
    python benchmarks/bench_gpu.py --device cpu --quick --problems resnet32 --batch 4

Without CUDA, ``--device cuda`` (the default) refuses with an error.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_autoencoder import run as run_autoencoder
from bench_autoencoder import synchronizer
from bench_optim import AMORTIZED, KINDS, state_bytes
from torch import Tensor, nn

from mbf_analysis.models import resnet32, vgg16_bn
from mbf_analysis.optim import KFAC, MBF

logger = logging.getLogger("bench_gpu")

LABELS = {"resnet32": "ResNet32", "vgg16": "VGG16-BN", "mnist-ae": "MNIST autoencoder"}
PROBLEMS = ("resnet32", "vgg16", "mnist-ae")
SHARE = {"resnet32": 0.3, "vgg16": 0.5, "mnist-ae": 0.2}
"""Share of ``--time-limit`` that each problem's rounds may use."""
TARGET = 1.3


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


def build_variants(base: nn.Module) -> list[Variant]:
    """SGD-m, Adam, MBF and KFAC, each on a deep copy of ``base``."""
    lr = 1e-4  # small: the parameters barely move, so every round times the same problem
    builders: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], tuple[str, ...]]] = {
        "Adam": (lambda m: torch.optim.Adam(m.parameters(), lr=lr), ("plain",)),
        "SGD-m": (lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), ("plain",)),
        "MBF": (lambda m: MBF(m, lr=lr, weight_decay=5e-4), tuple(KINDS)),
        "KFAC": (lambda m: KFAC(m, lr=lr, weight_decay=5e-4), tuple(KINDS)),
    }
    variants = []
    for name, (build, kinds) in builders.items():
        model = copy.deepcopy(base)
        variants.append(Variant(name, model, build(model), kinds))
    return variants


def iteration(variant: Variant, x: Tensor, y: Tensor, sync: Callable[[], None]):
    """One timed iteration: ``(total seconds, step seconds)``."""
    sync()
    start = time.perf_counter()
    variant.optimizer.zero_grad()
    nn.functional.cross_entropy(variant.model(x), y).backward()
    sync()
    before_step = time.perf_counter()
    variant.optimizer.step()
    sync()
    end = time.perf_counter()
    return end - start, end - before_step


def run_cnn(
    problem: str,
    device: torch.device,
    batch: int,
    max_rounds: int,
    min_rounds: int,
    warmup: int,
    budget: float,
) -> dict:
    """Time every (optimizer, kind) of one CNN problem; return the rows and metadata."""
    sync = synchronizer(device)
    torch.manual_seed(0)
    if problem == "resnet32":
        base, classes = resnet32(), 10
        description = "ResNet32 (0.46M parameters), CIFAR-10 shape 3×32×32"
    else:
        base, classes = vgg16_bn(num_classes=100), 100
        description = "VGG16-BN, 100 classes (34M parameters), 3×32×32"
    base = base.to(device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    variants = build_variants(base)
    adam = variants[0]
    start = time.perf_counter()
    for variant in variants:
        for kind in variant.kinds:
            for _ in range(warmup):
                variant.set_kind(kind)
                iteration(variant, x, y, sync)
    warm = time.perf_counter() - start
    logger.info("%s: warm-up %.1f s", problem, warm)
    memory = {v.name: state_bytes(v.optimizer) for v in variants}
    jobs = [(v, kind) for v in variants[1:] for kind in v.kinds]
    ratios: dict[tuple[str, str], list[float]] = {}
    overheads: dict[tuple[str, str], list[float]] = {}
    rounds = 0
    start = time.perf_counter()
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget):
        r = rounds
        shift = r % len(jobs)
        for j, (variant, kind) in enumerate(jobs[shift:] + jobs[:shift]):
            variant.set_kind(kind)
            if (r + j) % 2:
                ours = iteration(variant, x, y, sync)
                reference = iteration(adam, x, y, sync)
            else:
                reference = iteration(adam, x, y, sync)
                ours = iteration(variant, x, y, sync)
            key = (variant.name, kind)
            variant.times.setdefault(kind, []).append(ours[0])
            variant.step_times.setdefault(kind, []).append(ours[1])
            adam.times.setdefault("plain", []).append(reference[0])
            adam.step_times.setdefault("plain", []).append(reference[1])
            ratios.setdefault(key, []).append(ours[0] / reference[0])
            overheads.setdefault(key, []).append((ours[1] - reference[1]) / reference[0])
        rounds += 1
    logger.info("%s: %d rounds in %.1f s", problem, rounds, time.perf_counter() - start)
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
            mixed = [row for row in rows if row[0] == variant.name]
            rows.append(
                (
                    variant.name,
                    "amortized",
                    *(sum(AMORTIZED[row[1]] * row[i] for row in mixed) for i in range(2, 6)),
                )
            )
    return {
        "description": description,
        "rows": rows,
        "memory": memory,
        "rounds": rounds,
        "warmup_s": warm,
    }


def device_line(device: torch.device) -> str:
    """The device, in words."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def render(results: dict[str, dict], command: str, device: torch.device, batch: int) -> str:
    """The markdown report."""
    lines = [
        "# GPU benchmarks: MBF against Adam, KFAC and SGD-m",
        "",
        f"{datetime.datetime.now().isoformat(timespec='minutes')}; {device_line(device)}; "
        f"{platform.platform()}, torch {torch.__version__}. Command: `{command}`.",
        "",
        f"CNNs: batch {batch}, float32, train mode, forward + backward + step, synchronised "
        "before every clock read. MBF and KFAC (split damping, empirical Fisher) at T1 = 10, "
        "T2 = 100: *plain* (90 of 100), *stats* (9 of 100), *inverse* (1 of 100), *amortized* "
        "(that mix of the medians). × Adam: median over rounds of the ratio to an Adam "
        "iteration right before or after; *step overhead*: median of (step − Adam's step) / "
        "Adam's iteration. Weight decay 5e-4.",
    ]
    targets = []
    for problem, result in results.items():
        if problem == "mnist-ae":
            continue
        rows = {(row[0], row[1]): row[2:] for row in result["rows"]}
        lines += [
            "",
            f"## {result['description']}",
            "",
            f"{result['rounds']} round(s) after {result['warmup_s']:.0f} s of warm-up.",
            "",
            "| optimizer | iteration | time (ms) | × Adam | step alone (ms) | step overhead |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, kind, total, ratio, step, overhead in result["rows"]:
            lines.append(
                f"| {name} | {kind} | {total * 1e3:.1f} | {ratio:.3f} | {step * 1e3:.2f} | "
                f"{overhead:+.1%} |"
            )
        adam_mem = result["memory"]["Adam"]
        lines += ["", "| optimizer | state memory (MiB) | × Adam |", "|---|---:|---:|"]
        for name, nbytes in result["memory"].items():
            lines.append(f"| {name} | {nbytes / 2**20:.1f} | {nbytes / adam_mem:.2f} |")
        label = LABELS[problem]
        mbf, kfac = rows[("MBF", "amortized")], rows[("KFAC", "amortized")]
        verdict = "met" if mbf[1] <= TARGET else "missed"
        kinds = (*KINDS, "amortized")
        faster = [k for k in kinds if rows[("MBF", k)][1] < rows[("KFAC", k)][1]]
        targets += [
            f"- {label}: MBF {mbf[1]:.3f}× Adam amortized (step overhead {mbf[3]:+.1%}); "
            f"target ≤ {TARGET}×: {verdict}.",
            f"- {label}: MBF {mbf[1]:.3f}× vs KFAC {kfac[1]:.3f}× Adam amortized; MBF faster "
            f"than KFAC on {len(faster)} of {len(kinds)} kinds ({', '.join(faster) or 'none'}).",
        ]
    if "mnist-ae" in results:
        result = results["mnist-ae"]
        lines += [
            "",
            "## MNIST autoencoder, batch 1000, T1 = 1, T2 = 20 (against SGD-m)",
            "",
            f"{result['rounds']} round(s); {result['source']}.",
            "",
            "| optimizer | iteration | time (ms) | × SGD-m | step alone (ms) | step overhead |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, kind, total, ratio, step, overhead in result["rows"]:
            lines.append(
                f"| {name} | {kind} | {total * 1e3:.1f} | {ratio:.3f} | {step * 1e3:.2f} | "
                f"{overhead:+.1%} |"
            )
        rows = {(row[0], row[1]): row[2:] for row in result["rows"]}
        targets.append(
            f"- MNIST autoencoder: MBF (preset) {rows[('MBF (preset)', 'amortized')][1]:.3f}× "
            f"SGD-m amortized (size rule {rows[('MBF (size rule)', 'amortized')][1]:.3f}×)."
        )
    lines += ["", "## Targets", "", *targets, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--batch", type=int, default=128, help="CNN batch size (default 128)")
    parser.add_argument("--rounds", type=int, default=30, help="at most this many rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per kind")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=150.0,
        help="seconds of timed rounds for all problems together (default 150)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a functional run: 1 warm-up iteration, 1 round"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_gpu.md"))
    args = parser.parse_args(argv)
    for name in ("batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
            "(torch.cuda.is_available() is False); run on a GPU machine with a CUDA build of "
            "torch, or pass --device cpu for a functional run"
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    max_rounds, min_rounds, warmup = (1, 1, 1) if args.quick else (args.rounds, 2, args.warmup)
    results = {}
    for problem in args.problems:
        budget = SHARE[problem] * args.time_limit
        if problem == "mnist-ae":
            rounds = 1 if args.quick else min(args.rounds, 20)
            results[problem] = run_autoencoder(rounds, None, True, device)
        else:
            results[problem] = run_cnn(
                problem, device, args.batch, max_rounds, min_rounds, warmup, budget
            )
    command = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = render(results, command.strip(), device, args.batch)
    args.out.write_text(report)
    logger.info("wrote %s\n%s", args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
