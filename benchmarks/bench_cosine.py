"""Per-iteration cost of the cosine analysis, as a ratio to BDF stepping alone.

The cosine analysis (:class:`mbf_analysis.analysis.CosineRun`) shares one statistics pass per
iteration among all compared methods, so comparing six methods should cost little more than
following BDF alone. Two runs with the same seed are timed side by side on real data:

- ``bdf alone``: ``CosineRun(methods=("bdf",))``: collect (gradient, per-sample gradients),
  BDF update and direction, the step;
- ``all default methods``: ``CosineRun()`` with MBF, MBF-True, KFAC, Shampoo, Adam and SGD-m
  (one collect of the union: gradient, per-sample gradients, KFAC factors, sampled-label
  gradients), every update and direction, the cosines, the step.

Problems (float64, as the CLI): ``digits`` (``digits-mlp`` on the embedded 8×8 digits, batch 256)
and ``mnist16`` (the paper preset: ``paper-mlp`` on 16×16 MNIST, batch 256, layers fc2-fc5
recorded). Each run first takes ``--warmup`` untimed iterations, so that BDF's blocks have
switched from Woodbury to the dense form (its steady state); then every round times
``--block`` iterations of each run in alternating order, and the table reports the median over
rounds of the per-iteration seconds and of the per-round ratio, so that background load that
drifts between rounds cancels. ``500 × median`` estimates the paper preset's 500 iterations.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_cosine.py`` (about 4 minutes on 2 cores;
needs ``../shared/data`` or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mbf_analysis.analysis import CosineConfig, CosineRun
from mbf_analysis.data import load_dataset
from mbf_analysis.models import build_model

PROBLEMS = {
    "digits": ("digits", "digits-mlp", None),
    "mnist16": ("mnist16", "paper-mlp", ("fc2", "fc3", "fc4", "fc5")),
}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _runs(problem: str, data_dir: Path) -> dict[str, CosineRun]:
    dataset_name, model_name, layers = PROBLEMS[problem]
    dataset = load_dataset(dataset_name, data_dir)
    runs = {}
    for label, methods in (("bdf alone", ("bdf",)), ("all default methods", None)):
        torch.manual_seed(0)
        model = build_model(model_name).double()
        config = (
            CosineConfig(layers=layers)
            if methods is None
            else CosineConfig(methods=methods, layers=layers)
        )
        runs[label] = CosineRun(
            model, nn.CrossEntropyLoss(), dataset.train_x, dataset.train_y, config
        )
    return runs


def bench(problem: str, data_dir: Path, warmup: int, rounds: int, block: int) -> dict:
    runs = _runs(problem, data_dir)
    for run in runs.values():
        run.run(warmup, progress=False)
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    ratios = []
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        this_round = {}
        for label in order:
            start = time.perf_counter()
            runs[label].run(block, progress=False)
            this_round[label] = (time.perf_counter() - start) / block
            seconds[label].append(this_round[label])
        ratios.append(this_round["all default methods"] / this_round["bdf alone"])
        logging.info("%s round %d: %s", problem, r, this_round)
    return {
        "seconds": {label: statistics.median(values) for label, values in seconds.items()},
        "ratio": statistics.median(ratios),
    }


def render(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        "# Cosine analysis: cost per iteration vs BDF alone",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.warmup} warm-up iterations, median of "
        f"{args.rounds} rounds of {args.block} iterations. Command: `python {' '.join(sys.argv)}`.",
        "",
        "| problem | BDF alone (s/it) | all methods (s/it) | ratio | 500 iterations (min) |",
        "|---|---:|---:|---:|---:|",
    ]
    for problem, result in results.items():
        alone, full = result["seconds"]["bdf alone"], result["seconds"]["all default methods"]
        lines.append(
            f"| {problem} | {alone:.3f} | {full:.3f} | {result['ratio']:.2f} | "
            f"{500 * full / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--warmup", type=int, default=15, help="untimed iterations per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=5, help="iterations timed per round")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results_cosine.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    results = {
        problem: bench(problem, args.data_dir, args.warmup, args.rounds, args.block)
        for problem in args.problems
    }
    text = render(results, args)
    sys.stdout.write(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
