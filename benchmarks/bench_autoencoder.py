"""MBF's cost on the MNIST autoencoder relative to SGD-m, at the paper's T1 = 1, T2 = 20.

Problem: :func:`mbf_analysis.models.mnist_autoencoder` (784-1000-500-250-30-250-500-1000-784,
2.8M parameters), float32, the ``mnist-ae`` loss (BCE with logits summed over pixels, mean over
samples), batch 1000 of real MNIST images (``--data-dir``; ``--synthetic`` draws uniform
``[0, 1]`` images instead, for a machine without the data).

An *iteration* is ``zero_grad``, forward, backward and ``step``. Every optimizer owns a copy of
the same initial model. At ``T1 = 1`` every MBF iteration updates the statistics; one in
``T2 = 20`` also inverts them. The two kinds are timed on their own by setting the group's
``inverse_period`` before the iteration (``10⁹``: *stats*; ``1``: *inverse*; the step counter is
past 0 after the untimed warm-up iteration), and the amortized iteration is
``(19 stats + 1 inverse) / 20``.

Variants:

- ``SGD-m`` (the reference of every ratio), ``Adam``: ``torch.optim``;
- ``MBF (size rule)``: :class:`~mbf_analysis.optim.MBF` with
  ``spatial_averaging=SpatialAveraging(threshold=10**8)``, the size rule (the default for the
  other problems), which keeps per-neuron blocks for fc3 (500 → 250) and fc6 (250 → 500);
- ``MBF (preset)``: built as ``mbf-analyze train`` builds it
  (:func:`~mbf_analysis.training.loop.make_optimizer` with the ``mnist-ae`` MBF preset, whose
  rule averages every Linear layer with both widths ≥ 250).

Each round times one iteration of every (variant, kind), in an order that rotates from round to
round, each paired with an SGD-m iteration right before or after it (alternating); the table
gives the median over rounds of the ratio within each pair, the median of the step-time
difference over SGD-m's iteration, and median times. State memory: the bytes of the distinct
storages behind the optimizer's state tensors after the warm-up (MBF's state holds views into
its buckets). A second table times the per-neuron direction of fc3 and fc6 alone, the column
form ``bmm(P, M.unsqueeze(-1))`` against the row form ``bmm(M.unsqueeze(1), P)``.

Run (one thread, serialised with the other timing jobs)::

    flock /tmp/mbf-timing.lock env OMP_WAIT_POLICY=PASSIVE \\
        python benchmarks/bench_autoencoder.py --data-dir /work/shared/data

``--quick``: 2 rounds; ``--rounds N``; ``--device cuda`` (timings synchronised);
``--out`` (default ``results_autoencoder.md`` beside this file). ``bench_gpu.py`` runs the same
measurement on a GPU.
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from mbf_analysis.data import load_dataset
from mbf_analysis.methods.mbf import SpatialAveraging
from mbf_analysis.models import mnist_autoencoder
from mbf_analysis.optim import MBF
from mbf_analysis.training.loop import make_optimizer
from mbf_analysis.training.presets import get_preset
from mbf_analysis.training.problems import get_problem

logger = logging.getLogger("bench_autoencoder")

KINDS = {"stats": 10**9, "inverse": 1}
"""Kind of MBF iteration → ``inverse_period`` set before it (``stat_period`` stays 1)."""
AMORTIZED = {"stats": 19 / 20, "inverse": 1 / 20}
"""Share of each kind among ``T2 = 20`` iterations at ``T1 = 1``."""
BATCH = 1000
LR = {"SGD-m": 1e-4, "Adam": 1e-5, "MBF": 1e-7}
"""Small learning rates: the parameters barely move, so every round times the same problem."""


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
        """Set the period that makes the next iteration of ``kind``."""
        if kind in KINDS:
            for group in self.optimizer.param_groups:
                group["inverse_period"] = KINDS[kind]


def build_variants(base: nn.Module) -> list[Variant]:
    """SGD-m, Adam and the two MBF variants, each on a deep copy of ``base``."""
    preset = replace(get_preset("mnist-ae", "mbf"), lr=LR["MBF"])
    size_rule = SpatialAveraging(threshold=10**8)
    builders = {
        "SGD-m": (lambda m: torch.optim.SGD(m.parameters(), lr=LR["SGD-m"], momentum=0.9), ()),
        "Adam": (lambda m: torch.optim.Adam(m.parameters(), lr=LR["Adam"]), ()),
        "MBF (size rule)": (
            lambda m: MBF(
                m,
                lr=LR["MBF"],
                damping=preset.damping,
                stat_period=1,
                inverse_period=20,
                spatial_averaging=size_rule,
            ),
            tuple(KINDS),
        ),
        "MBF (preset)": (lambda m: make_optimizer("mbf", m, preset), tuple(KINDS)),
    }
    variants = []
    for name, (build, kinds) in builders.items():
        model = copy.deepcopy(base)
        variants.append(Variant(name, model, build(model), kinds or ("plain",)))
    return variants


def synchronizer(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on a CUDA device (so timings cover the kernels), else a no-op."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def iteration(variant: Variant, x: Tensor, loss_fn, sync=lambda: None) -> tuple[float, float]:
    """One timed iteration: ``(total seconds, step seconds)``; ``sync`` before each clock read."""
    sync()
    start = time.perf_counter()
    variant.optimizer.zero_grad()
    loss_fn(variant.model(x), x.flatten(1)).backward()
    sync()
    before_step = time.perf_counter()
    variant.optimizer.step()
    sync()
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


def direction_forms(
    rounds: int, device: str | torch.device = "cpu", sync=lambda: None
) -> list[tuple[str, float, float, float]]:
    """Median times of the column and row forms of ``d_b = P_b m_b`` for fc3 and fc6 shapes."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, count, size in (
        ("fc3 (250 blocks of 501)", 250, 501),
        ("fc6 (500 of 251)", 500, 251),
    ):
        a = torch.randn(count, size, size, generator=gen)
        P = (a @ a.mT / size).to(device)
        M = torch.randn(count, size, generator=gen).to(device)
        out = torch.empty(count, size, device=device)
        col, row = [], []
        for r in range(rounds):
            for form in (0, 1) if r % 2 else (1, 0):
                sync()
                start = time.perf_counter()
                if form == 0:
                    torch.bmm(P, M.unsqueeze(-1), out=out.unsqueeze(-1))
                else:
                    torch.bmm(M.unsqueeze(1), P, out=out.unsqueeze(1))
                sync()
                (col if form == 0 else row).append(time.perf_counter() - start)
        torch.testing.assert_close(
            torch.bmm(M.unsqueeze(1), P).squeeze(1),
            torch.bmm(P, M.unsqueeze(-1)).squeeze(-1),
            rtol=1e-4,
            atol=1e-4,
        )
        c, w = statistics.median(col), statistics.median(row)
        rows.append((label, c, w, w / c))
    return rows


def run(
    rounds: int, data_dir: str | None, synthetic: bool, device: str | torch.device = "cpu"
) -> dict:
    """Time every (variant, kind) on ``device``; return the table rows and metadata."""
    device = torch.device(device)
    sync = synchronizer(device)
    problem = get_problem("mnist-ae")
    if synthetic:
        x = torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        source = "synthetic uniform [0, 1] images"
    else:
        data = load_dataset("mnist", data_dir)
        x = data.train_x[:BATCH].clone()
        source = "the first 1000 MNIST training images"
    x = x.to(device)
    torch.manual_seed(0)
    base = mnist_autoencoder().to(device)
    variants = build_variants(base)
    sgdm = variants[0]
    logger.info("warm-up")
    for variant in variants:
        variant.set_kind("inverse")
        iteration(variant, x, problem.loss_fn, sync)
    memory = {v.name: state_bytes(v.optimizer) for v in variants}
    jobs = [(v, kind) for v in variants[1:] for kind in v.kinds]
    ratios: dict[tuple[str, str], list[float]] = {}
    overheads: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        shift = r % len(jobs)
        for j, (variant, kind) in enumerate(jobs[shift:] + jobs[:shift]):
            variant.set_kind(kind)
            if (r + j) % 2:
                ours = iteration(variant, x, problem.loss_fn, sync)
                reference = iteration(sgdm, x, problem.loss_fn, sync)
            else:
                reference = iteration(sgdm, x, problem.loss_fn, sync)
                ours = iteration(variant, x, problem.loss_fn, sync)
            key = (variant.name, kind)
            variant.times.setdefault(kind, []).append(ours[0])
            variant.step_times.setdefault(kind, []).append(ours[1])
            sgdm.times.setdefault("plain", []).append(reference[0])
            sgdm.step_times.setdefault("plain", []).append(reference[1])
            ratios.setdefault(key, []).append(ours[0] / reference[0])
            overheads.setdefault(key, []).append((ours[1] - reference[1]) / reference[0])
            logger.info("round %d: %s %s %.3f s (SGD-m %.3f s)", r, *key, ours[0], reference[0])
    ratios[("SGD-m", "plain")] = [1.0]
    overheads[("SGD-m", "plain")] = [0.0]
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
        "rows": rows,
        "memory": memory,
        "rounds": rounds,
        "source": source,
        "device": str(device),
        "directions": direction_forms(max(3, rounds), device, sync),
    }


def render(result: dict, command: str, threads: int, load_before: float) -> str:
    """The markdown report."""
    lines = [
        "# MBF on the MNIST autoencoder: cost per iteration relative to SGD-m (T1 = 1, T2 = 20)",
        "",
        f"{datetime.datetime.now().isoformat(timespec='minutes')}; {platform.platform()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average before "
        f"{load_before:.1f}, after {os.getloadavg()[0]:.1f}. Command: `{command}`.",
        "",
        f"Batch {BATCH} ({result['source']}), float32, device {result['device']}, forward + "
        "backward + step (on CUDA synchronised before every clock read). MBF at T1 = 1: "
        "*stats* iterations (statistics, no inverse; 19 of 20), *inverse* (statistics and "
        "inverses; 1 of 20), *amortized* (that mix of the medians). × SGD-m: median over "
        f"{result['rounds']} rounds of the ratio to an SGD-m iteration run right before or "
        "after; *step overhead*: median of (step − SGD-m's step) / SGD-m's iteration.",
        "",
        "| optimizer | iteration | time (ms) | × SGD-m | step alone (ms) | step overhead |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, kind, total, ratio, step, overhead in result["rows"]:
        lines.append(
            f"| {name} | {kind} | {total * 1e3:.0f} | {ratio:.3f} | {step * 1e3:.1f} | "
            f"{overhead:+.1%} |"
        )
    adam = result["memory"]["Adam"]
    lines += ["", "| optimizer | state memory (MiB) | × Adam |", "|---|---:|---:|"]
    for name, nbytes in result["memory"].items():
        lines.append(f"| {name} | {nbytes / 2**20:.1f} | {nbytes / adam:.2f} |")
    lines += [
        "",
        "Per-neuron direction alone (float32, random SPD P; medians):",
        "",
        "| layer | bmm(P, M.unsqueeze(-1)) (ms) | bmm(M.unsqueeze(1), P) (ms) | row / column |",
        "|---|---:|---:|---:|",
    ]
    for label, col, row, ratio in result["directions"]:
        lines.append(f"| {label} | {col * 1e3:.1f} | {row * 1e3:.1f} | {ratio:.2f} |")
    rows = {(row[0], row[1]): row for row in result["rows"]}
    preset = rows[("MBF (preset)", "amortized")][3]
    verdict = "met" if preset <= 1.8 else "missed"
    lines += [
        "",
        "## Target",
        "",
        f"- MBF (preset) {preset:.3f}× SGD-m amortized (size rule: "
        f"{rows[('MBF (size rule)', 'amortized')][3]:.3f}×); target ≤ 1.8× (aim 1.6×): "
        f"{verdict}. State memory {result['memory']['MBF (preset)'] / adam:.2f}× Adam's.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="default 7, with --quick 2")
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="folder with mnist/ (see load_dataset)")
    parser.add_argument("--synthetic", action="store_true", help="random images, no data files")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results_autoencoder.md")
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rounds = args.rounds or (2 if args.quick else 7)
    result = run(rounds, args.data_dir, args.synthetic, args.device)
    command = "python benchmarks/bench_autoencoder.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report = render(result, command.strip(), args.threads, load_before)
    args.out.write_text(report)
    logger.info("wrote %s\n%s", args.out, report)


if __name__ == "__main__":
    main()
