"""Two-level KFAC and the all-layer reference (issue #10): costs as ratios, side by side.

Part ``cosine``: the cost of one cosine iteration under ``reference="full"`` relative to the
BDF reference, on the paper MLP (256-20×5-10 tanh, 7030 parameters) with 16×16 MNIST, batch 256,
float64 (as the CLI), layers fc2-fc5 recorded. Every run compares the paper's six methods and
``kfac-two-level``; the full-reference runs add BDF as a compared method and solve
``ζ* = F_λ⁻¹∇`` for the empirical or the exact Fisher, with the Woodbury form (``auto``:
``R < D`` rows) or the dense ``F`` (the readable reference). By default they compare the
methods' one-shot forms with the reference's Fisher; the run "methods as the bdf run" keeps the
methods' work as in the BDF-reference run (stateful, KFAC and two-level KFAC on sampled labels),
so that its ratio is the reference's own cost (its ``F`` rows, solve, norms, and one more
direction per method, BDF's dense solve included). All runs follow the same seeded BDF
trajectory; each first takes ``--warmup`` untimed iterations (BDF's blocks reach their dense
form), then every round times ``--block`` iterations of each run in alternating order; the
table gives the medians over rounds of the seconds per iteration and of the per-round ratio to
the BDF reference.

Part ``directions``: one ``direction()`` of ``kfac-two-level`` per coarse space against one of
``kfac`` with the same settings, on the MNIST autoencoder (784-1000-500-250-30-250-500-1000-784,
sigmoid cross-entropy), float32: the statistics of a Fisher batch of 128 (sampled labels, the
papers' setting), the gradient of the batch of 512, ``damping=0.01``, ``"split"`` damping,
periods 1. ``update`` (statistics, inverses; SPECTRAL's eigendecompositions) is timed
separately. Medians over interleaved rounds; ratios to KFAC's direction (and update).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_two_level.py`` (about 10 minutes on 2
cores; needs ``../shared/data`` or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mbf_analysis import methods
from mbf_analysis.analysis import DEFAULT_METHODS, CosineConfig, CosineRun
from mbf_analysis.curvature.collect import collect
from mbf_analysis.data import load_dataset
from mbf_analysis.methods.two_level import COARSE_SPACES
from mbf_analysis.models import build_model, mnist_autoencoder

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAME_WORK = {
    "one_shot": False,
    "method_options": {"kfac": {"fisher": "mc"}, "kfac-two-level": {"fisher": "mc"}},
}
"""Settings that leave the compared methods' work as in the BDF-reference run."""
COSINE_RUNS = {
    "bdf reference": {},
    "full, empirical, woodbury, methods as the bdf run": {"reference": "full", **SAME_WORK},
    "full, empirical, woodbury": {"reference": "full"},
    "full, empirical, dense": {"reference": "full", "reference_solver": "dense"},
    "full, exact, woodbury": {"reference": "full", "fisher": "exact"},
    "full, exact, dense": {"reference": "full", "fisher": "exact", "reference_solver": "dense"},
}


def _median_rounds(
    jobs: dict[str, Callable[[], object]], rounds: int, per_call: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Seconds per call of each job, in alternating order per round: medians and all rounds."""
    seconds: dict[str, list[float]] = {label: [] for label in jobs}
    for r in range(rounds):
        order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for label in order:
            start = time.perf_counter()
            for _ in range(per_call):
                jobs[label]()
            seconds[label].append((time.perf_counter() - start) / per_call)
        logging.info("round %d: %s", r, {k: round(v[-1], 4) for k, v in seconds.items()})
    return {k: statistics.median(v) for k, v in seconds.items()}, seconds


def bench_cosine(data_dir: Path, warmup: int, rounds: int, block: int) -> dict:
    data = load_dataset("mnist16", data_dir)
    runs = {}
    for label, settings in COSINE_RUNS.items():
        torch.manual_seed(0)
        model = build_model("paper-mlp").double()
        config = CosineConfig(
            methods=(*DEFAULT_METHODS, "kfac-two-level"),
            layers=("fc2", "fc3", "fc4", "fc5"),
            **settings,
        )
        runs[label] = CosineRun(model, nn.CrossEntropyLoss(), data.train_x, data.train_y, config)
    for run in runs.values():
        run.run(warmup, progress=False)
    jobs = {label: (lambda run=run: run.run(block, progress=False)) for label, run in runs.items()}
    medians, per_round = _median_rounds(jobs, rounds, 1)
    base = per_round["bdf reference"]
    ratios = {
        label: statistics.median(t / b for t, b in zip(values, base, strict=True))
        for label, values in per_round.items()
    }
    return {
        "seconds": {k: v / block for k, v in medians.items()},
        "ratio": ratios,
    }


def bench_directions(data_dir: Path, rounds: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = mnist_autoencoder()
    images = load_dataset("mnist", data_dir).train_x[:512].flatten(1)
    loss_fn = nn.BCEWithLogitsLoss()
    settings = {"damping": 0.01, "fisher": "mc"}
    built = {"kfac": methods.get("kfac", **settings)}
    for coarse in COARSE_SPACES:
        built[coarse] = methods.get("kfac-two-level", coarse=coarse, **settings)
    needs = frozenset().union(*(m.needs for m in built.values()))
    gen = torch.Generator().manual_seed(0)
    stats = collect(model, loss_fn, images[:128], images[:128], needs, generator=gen)
    grad = collect(model, loss_fn, images, images, {"grad"}).grad
    stats = dataclasses.replace(stats, grad=grad)
    for method in built.values():  # warm-up: first update and direction
        method.update(stats)
        method.direction()
    directions = {name: (lambda m=m: m.direction()) for name, m in built.items()}
    updates = {name: (lambda m=m: m.update(stats)) for name, m in built.items()}
    direction_s, direction_rounds = _median_rounds(directions, rounds, repeats)
    update_s, update_rounds = _median_rounds(updates, rounds, 1)

    def ratios(per_round: dict[str, list[float]]) -> dict[str, float]:
        base = per_round["kfac"]
        return {
            k: statistics.median(t / b for t, b in zip(v, base, strict=True))
            for k, v in per_round.items()
        }

    diagnostics = {name: m.diagnostics() for name, m in built.items() if name != "kfac"}
    return {
        "direction": direction_s,
        "direction_ratio": ratios(direction_rounds),
        "update": update_s,
        "update_ratio": ratios(update_rounds),
        "diagnostics": diagnostics,
    }


def render(cosine: dict | None, directions: dict | None, args: argparse.Namespace) -> str:
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        "# Two-level KFAC and the all-layer reference (issue #10)",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average at the end {load}. "
        f"Command: `python {' '.join(sys.argv)}`.",
        "",
    ]
    if cosine is not None:
        lines += [
            f"## Cosine iteration on the paper MLP ({args.threads} threads, float64, batch 256)",
            "",
            f"{args.warmup} warm-up iterations, median of {args.rounds} rounds of {args.block} "
            "iterations; ratio = per-round time / the BDF reference's.",
            "",
            "| run | s/iteration | ratio to the BDF reference | 500 iterations (min) |",
            "|---|---:|---:|---:|",
        ]
        for label, sec in cosine["seconds"].items():
            lines.append(
                f"| {label} | {sec:.3f} | {cosine['ratio'][label]:.2f} | {500 * sec / 60:.1f} |"
            )
        lines.append("")
    if directions is not None:
        lines += [
            f"## One direction on the MNIST autoencoder ({args.direction_threads} thread(s), "
            "float32, Fisher batch 128, batch 512)",
            "",
            f"Median of {args.rounds} rounds ({args.repeats} directions per round, one update); "
            "ratios to KFAC's direction and update with the same settings. `gain` and "
            "`cond(F_c)` are the last direction's coarse diagnostics.",
            "",
            "| method | direction (ms) | ratio | update (ms) | ratio | gain | cond(F_c) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in directions["direction"]:
            label = "kfac" if name == "kfac" else f"kfac-two-level, {name}"
            diag = directions["diagnostics"].get(name)
            extra = "| | " if diag is None else f"| {diag['gain']:.3g} | {diag['condition']:.3g} "
            lines.append(
                f"| {label} | {1e3 * directions['direction'][name]:.1f} | "
                f"{directions['direction_ratio'][name]:.2f} | "
                f"{1e3 * directions['update'][name]:.1f} | "
                f"{directions['update_ratio'][name]:.2f} {extra}|"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["cosine", "directions"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--warmup", type=int, default=12, help="untimed cosine iterations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=3, help="cosine iterations per round")
    parser.add_argument("--repeats", type=int, default=5, help="directions per round")
    parser.add_argument("--threads", type=int, default=2, help="threads of the cosine part")
    parser.add_argument("--direction-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_two_level.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cosine = directions = None
    if "cosine" in args.parts:
        torch.set_num_threads(args.threads)
        cosine = bench_cosine(args.data_dir, args.warmup, args.rounds, args.block)
    if "directions" in args.parts:
        torch.set_num_threads(args.direction_threads)
        directions = bench_directions(args.data_dir, args.rounds, args.repeats)
    text = render(cosine, directions, args)
    sys.stdout.write(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
