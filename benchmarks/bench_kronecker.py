"""Cost of the Kronecker-SVD family (METHODS.md §6.1) next to KFAC, as ratios side by side.

Two measurements in one process, float32, one torch thread, random data (timing only):

1. **Error evaluation of the 1001 × 1000 layer.** ``nn.Linear(1000, 1000)`` (``a = 1001``,
   ``g = 1000``, ``d ≈ 10⁶``, far beyond a dense ``F``) of a 1000-1000-10 sigmoid MLP,
   cross-entropy, 128 samples, ``fisher="mc"``: one
   :func:`~mbf_analysis.analysis.approximation_errors` call per method (collection pass,
   one-shot update with its inverse, the factored error, and with ``top_k=10`` the leading
   singular values), ratio to the same call for KFAC; ``collect`` alone for scale.
2. **Curvature + inverse update on the MNIST autoencoder** (784-1000-500-250-30-250-500-1000-784,
   BCE-with-logits), a batch of 512 whose first 128 samples are the Fisher batch (``m/4``, as the
   paper): one ``collect`` of each method's statistics on the Fisher batch, then one
   :meth:`Method.update` with curvature and inverse due (periods 1, the EMA of the paper's
   schedule), after one untimed update so that the power iterations start warm as in training;
   ratio to KFAC's update (its default ``"split"`` damping: two Cholesky inverses per layer). The
   ``matrix`` rows run the same iterations with the matrix-free reference solver.

Rounds alternate the order of the operations; the tables give the median over rounds of the
per-round ratio (and seconds). Run serialized with the other helpers' timings:
``flock /tmp/mbf-timing.lock env OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_kronecker.py``.
"""

from __future__ import annotations

import argparse
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
from mbf_analysis.analysis import approximation_errors
from mbf_analysis.curvature.collect import collect
from mbf_analysis.models import mnist_autoencoder

logger = logging.getLogger("bench_kronecker")

FAMILY = ("kpsvd", "deflation", "lanczos", "kfac-corrected")
ERROR_METHODS = ("kfac", *FAMILY, "mbf", "mbf-exact", "bdf")


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(times: dict[str, list[float]], reference: str) -> list[dict]:
    rows = []
    for key, values in times.items():
        ratios = [v / r for v, r in zip(values, times[reference], strict=True)]
        rows.append(
            {
                "operation": key,
                "ratio": statistics.median(ratios),
                "spread": f"{min(ratios):.2f}–{max(ratios):.2f}",
                "seconds": statistics.median(values),
            }
        )
    return rows


def bench_errors(rounds: int) -> list[dict]:
    """Measurement 1 (module docstring)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Sigmoid(), nn.Linear(1000, 10))
    x, y = torch.randn(128, 1000), torch.randint(0, 10, (128,))
    loss_fn = nn.CrossEntropyLoss()

    def errors(name: str, top_k: int) -> None:
        gen = torch.Generator().manual_seed(0)
        approximation_errors(model, loss_fn, x, y, [name], layers=["0"], top_k=top_k, generator=gen)

    def stats_only() -> None:
        collect(model, loss_fn, x, y, {"kron_samples_sampled"}, generator=torch.Generator())

    operations = {"collect (kron_samples_sampled)": stats_only}
    for top_k in (0, 10):
        for name in ERROR_METHODS:
            operations[f"{name}, top_k={top_k}"] = lambda n=name, k=top_k: errors(n, k)
    for fn in operations.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {key: [] for key in operations}
    keys = list(operations)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            times[key].append(_seconds(operations[key]))
        logger.info("errors: round %d/%d done", r + 1, rounds)
    return _medians(times, "kfac, top_k=0")


def bench_updates(rounds: int) -> list[dict]:
    """Measurement 2 (module docstring)."""
    torch.manual_seed(0)
    model = mnist_autoencoder()
    batch = torch.rand(512, 784)
    fisher_x = batch[:128]
    loss_fn = nn.BCEWithLogitsLoss()
    configs = {"kfac": ("kfac", {})}
    for name in FAMILY:
        configs[name] = (name, {})
    configs["kpsvd (matrix solver)"] = ("kpsvd", {"solver": "matrix"})
    configs["deflation (matrix solver)"] = ("deflation", {"solver": "matrix"})
    built = {key: methods.get(name, **options) for key, (name, options) in configs.items()}
    gen = torch.Generator().manual_seed(0)
    union = frozenset().union(*(m.needs for m in built.values()))
    stats = collect(model, loss_fn, fisher_x, fisher_x, union, generator=gen)
    for method in built.values():  # the untimed first update (cold power iterations)
        method.update(stats)
    operations: dict[str, Callable[[], object]] = {
        "collect kfac_factors_sampled": lambda: collect(
            model, loss_fn, fisher_x, fisher_x, built["kfac"].needs, generator=gen
        ),
        "collect kron_samples_sampled": lambda: collect(
            model, loss_fn, fisher_x, fisher_x, built["kpsvd"].needs, generator=gen
        ),
    }
    for key, method in built.items():
        operations[f"update {key}"] = lambda m=method: m.update(stats)
    times: dict[str, list[float]] = {key: [] for key in operations}
    keys = list(operations)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            times[key].append(_seconds(operations[key]))
        logger.info("updates: round %d/%d done", r + 1, rounds)
    rows = _medians(times, "update kfac")
    diagnostics = {key: m.diagnostics() for key, m in built.items() if key in FAMILY}
    for row in rows:
        key = row["operation"].removeprefix("update ")
        if key in diagnostics:
            layers = diagnostics[key].values()
            row["iterations"] = sum(d["iterations"] for d in layers)
            row["clamped"] = sum(d["clamped"] for d in layers)
    return rows


def render(errors: list[dict], updates: list[dict], args: argparse.Namespace) -> str:
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        "# Kronecker-SVD family: error evaluation and update cost, ratios to KFAC",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average at end "
        f"{load}",
        f"- command: `python {' '.join(sys.argv)}`; medians of {args.rounds} round(s) after "
        "one untimed warm-up.",
        "",
        "## 1. One error evaluation of the 1001 × 1000 layer (128 samples, fisher='mc')",
        "",
        "Ratio to `approximation_errors` of KFAC alone with `top_k=0`; each call includes its "
        "own collection pass.",
        "",
        "| operation | ratio | spread | median s |",
        "|---|---:|---:|---:|",
    ]
    for row in errors:
        lines.append(
            f"| {row['operation']} | {row['ratio']:.2f} | {row['spread']} | {row['seconds']:.3f} |"
        )
    lines += [
        "",
        "## 2. Curvature + inverse update, MNIST autoencoder, Fisher batch 128 of 512",
        "",
        "Ratio to one KFAC update (same statistics pass); `iterations` = power iterations "
        "(Lanczos: steps) summed over the 8 layers in the last update, `clamped` = rank-2 "
        "denominators clamped over the 8 layers.",
        "",
        "| operation | ratio | spread | median s | iterations | clamped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in updates:
        lines.append(
            f"| {row['operation']} | {row['ratio']:.2f} | {row['spread']} | "
            f"{row['seconds']:.3f} | {row.get('iterations', '')} | {row.get('clamped', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", default="benchmarks/results_kronecker.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    updates = bench_updates(args.rounds)
    errors = bench_errors(args.rounds)
    text = render(errors, updates, args)
    sys.stdout.write(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
