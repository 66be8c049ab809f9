"""MNIST autoencoder: MBF against SGD-m, Adam, KFAC and Shampoo on an equal wall-clock budget.

The paper's Fig. 8 (MNIST panel) on a CPU: the 784-1000-500-250-30-250-500-1000-784 ReLU
autoencoder, loss ``(1/m) Σ_n Σ_pixels BCE`` (:mod:`mbf_analysis.training.problems`), batch
1000, each optimizer with its preset (the paper's Table 4 best (lr, damping); ``T1 = 1``,
``T2 = 20``; MBF's warm start over one epoch inside the budget), seed 0, for ``--budget``
seconds of training each (evaluations excluded from the clock), one after another in one
process, with ``torch.set_num_threads(--threads)``.

Reported: the training loss at the end of each run on a fixed subset of ``--eval-samples``
training images (the first of a seed-0 permutation, the same for every optimizer; default
10 000 of 60 000, to keep evaluations cheap), the test loss on the first 10 000 test images,
steps, epochs and seconds per step, and whether MBF ends below SGD-m and Adam.

KFAC is the paper's true-Fisher KFAC (the preset's ``fisher="mc"``: ``G`` from labels
sampled from the model, one extra backward pass per statistics step, inside the budget).

``--extra-mbf LR[:DAMPING][,...]`` adds MBF runs at other settings (damping at its preset when
not given), labelled ``mbf (lr …)`` / ``mbf (lr …, λ …)``; ``--grid-best-mbf LR:DAMPING`` adds
one labelled ``mbf (our grid's best: lr …, λ …)``, the best point of our own MBF grid search
(``figures/mnist_ae_training/mbf_grid.csv``, which the results file then tabulates too).

Writes ``train_log.csv`` (every step and evaluation, appended as the runs go, then rewritten
with the runs' labels in its ``optimizer`` column), ``train_summary.csv``, ``run.json`` and
``train_curves.{png,pdf}`` (loss against training time and epochs) in ``--out`` (default
``figures/mnist_ae_training``) and the table to ``--results``
(``benchmarks/results_training.md``).

Run: ``python benchmarks/bench_training.py --budget 120 --grid-best-mbf 3e-5:1e-2`` (6 runs:
about 12 minutes with evaluations; the MBF grid first, see ``benchmarks/results_training.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from mbf_analysis.cli.common import versions
from mbf_analysis.data import load_dataset
from mbf_analysis.plotting import plot_training_curves, save_figure
from mbf_analysis.training import (
    OPTIMIZERS,
    TrainingDiverged,
    get_preset,
    summarize,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
_BESIDE_REPO = ROOT.parent / "shared" / "data"
DATA = _BESIDE_REPO if _BESIDE_REPO.is_dir() else Path("/work/shared/data")
PAPER_TABLE4 = {"mbf": 51.49, "kfac": 53.56, "shampoo": 53.80, "adam": 53.67, "sgdm": 55.63}
"""The paper's final MNIST training losses (Table 4: 500 s on a V100 GPU)."""


def cpu_model() -> str:
    """``lscpu``'s model name, else the platform's processor string."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per run (120)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--eval-samples", type=int, default=10_000, help="evaluation subset")
    parser.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help="comma-separated (all five)"
    )
    parser.add_argument(
        "--extra-mbf",
        default="",
        help="further MBF settings LR or LR:DAMPING, comma-separated",
    )
    parser.add_argument(
        "--grid-best-mbf",
        default="",
        help="LR:DAMPING of our MBF grid's best point, run and labelled as such",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "figures" / "mnist_ae_training")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results_training.md")
    return parser.parse_args(argv)


GRID_BEST = "our grid's best"


def parse_setting(text: str) -> tuple[float, float | None]:
    """``"LR"`` or ``"LR:DAMPING"`` → ``(lr, damping or None)``."""
    lr, _, damping = text.partition(":")
    return float(lr), float(damping) if damping else None


def run_label(optimizer: str, lr: float | None, damping: float | None, tag: str = "") -> str:
    if lr is None and damping is None:
        return optimizer
    settings = ", ".join(
        [f"lr {lr:g}"] * (lr is not None) + [f"λ {damping:g}"] * (damping is not None)
    )
    return f"{optimizer} ({tag + ': ' if tag else ''}{settings})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = load_dataset("mnist", args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.csv"
    log_path.unlink(missing_ok=True)
    runs = [(o, None, None, "") for o in args.optimizers.split(",") if o]
    runs += [("mbf", *parse_setting(t), "") for t in args.extra_mbf.split(",") if t]
    if args.grid_best_mbf:
        runs.append(("mbf", *parse_setting(args.grid_best_mbf), GRID_BEST))
    load_before = os.getloadavg()
    started = time.perf_counter()
    frames = []
    for optimizer, lr, damping, tag in runs:
        try:
            frame = train(
                "mnist-ae",
                optimizer,
                time_budget=args.budget,
                lr=lr,
                damping=damping,
                seed=args.seed,
                dataset=dataset,
                eval_samples=args.eval_samples,
                csv_path=log_path,
                progress=False,
            )
        except TrainingDiverged as err:
            print(f"diverged: {err}", file=sys.stderr)
            frame = err.log
        frames.append(frame.assign(optimizer=run_label(optimizer, lr, damping, tag)))
        print(summarize(frames[-1]).to_string(index=False), flush=True)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    log = pd.concat(frames, ignore_index=True)
    log.to_csv(log_path, index=False)  # the live log, rewritten with the runs' labels
    summary = summarize(log)
    summary["s_per_step"] = summary.wall_time / summary.steps.clip(lower=1)
    summary.to_csv(args.out / "train_summary.csv", index=False)
    fig = plot_training_curves(
        log,
        ("wall_time", "epoch"),
        title=f"MNIST autoencoder, {args.budget:g} s per optimizer, CPU, {args.threads} thread(s)",
    )
    save_figure(fig, args.out / "train_curves")
    command = "python benchmarks/bench_training.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    record = {
        "command": command.strip(),
        "budget_s": args.budget,
        "threads": args.threads,
        "eval_samples": args.eval_samples,
        "seed": args.seed,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "elapsed_s": elapsed,
        "versions": versions(),
        "presets": {
            run_label(o, lr, damping, tag): {
                k: v
                for k, v in vars(get_preset("mnist-ae", o, lr=lr, damping=damping)).items()
                if k
                in (
                    "lr",
                    "damping",
                    "stat_period",
                    "inverse_period",
                    "warm_start_epochs",
                    "options",
                )
            }
            for o, lr, damping, tag in runs
        },
    }
    (args.out / "run.json").write_text(json.dumps(record, indent=2))
    write_results(args, summary, record)
    print(summary.to_string(index=False))
    print(f"wrote {args.out} and {args.results}")


def write_results(args: argparse.Namespace, summary: pd.DataFrame, record: dict) -> None:
    """The markdown table (the analysis below it is written by hand after a run)."""
    rows = summary.set_index("optimizer")
    lines = [
        "# MNIST autoencoder: equal wall-clock budget on CPU",
        "",
        f"2026-11-21; {record['cpu']}, {record['cores']} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s); load average (1, 5, 15 min) before "
        f"{', '.join(f'{v:.2f}' for v in record['load_average_before'])}, after "
        f"{', '.join(f'{v:.2f}' for v in record['load_average_after'])} (other agents share the "
        f"cores). Command: `{record['command']}` ({record['elapsed_s'] / 60:.1f} min).",
        "",
        f"Each optimizer: {args.budget:g} s of training (wall clock; evaluations excluded), "
        "preset hyper-parameters (paper Table 4) unless the row's label gives others, batch "
        "1000, seed 0; KFAC is the paper's true-Fisher KFAC (sampled labels). Losses: "
        "(1/m) Σ_n Σ_pixels BCE, the paper's convention. *train loss*: on a fixed subset of "
        f"{args.eval_samples} training images (the same for all); *test loss*: the first "
        f"{args.eval_samples} test images. Paper: final training loss after 500 s on a V100.",
        "",
        "| optimizer | lr | damping | status | steps | epochs | s/step | train loss | test loss "
        "| paper (500 s, GPU) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.iterrows():
        preset = record["presets"][name]
        base = name.split(" ")[0]
        paper = PAPER_TABLE4.get(base) if name == base else None
        lines.append(
            f"| {name} | {preset['lr']:g} | {preset['damping'] if preset['damping'] else '—'} "
            f"| {row.status} | {row.steps} | {row.epochs:.2f} | {row.s_per_step:.3f} "
            f"| {row.train_loss:.2f} | {row.test_loss:.2f} "
            f"| {'—' if paper is None else paper} |"
        )
    verdict = []
    mbf_rows = [n for n in rows.index if n == "mbf" or GRID_BEST in n]
    if {"sgdm", "adam"} <= set(rows.index):
        for name in mbf_rows:
            for other in ("sgdm", "adam"):
                beats = rows.train_loss[name] < rows.train_loss[other]  # NaN (diverged): False
                verdict.append(f"{name} {'beats' if beats else 'does not beat'} {other}")
    lines += ["", "Verdict (final training loss): " + "; ".join(verdict) + ".", ""]
    lines += grid_table(args.out / "mbf_grid.csv")
    args.results.write_text("\n".join(lines))


def grid_table(path: Path) -> list[str]:
    """Our MBF grid (``mbf_grid.csv``, from ``mbf-analyze train --grid-lr … --grid-damping …``)
    as a markdown table of final training losses, lr down, damping across (empty if absent)."""
    if not path.exists():
        return []
    grid = pd.read_csv(path)
    best = grid[grid.best].iloc[0] if grid.best.any() else None
    dampings = sorted(grid.damping.unique())
    lines = [
        "## MBF grid (ours, inside the paper's Table 5 grid)",
        "",
        f"`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`: final training loss "
        f"after {grid.wall_time.max():.0f} s or less per point (the budget; warm start "
        "included), same subset and seed as above; *div. @k*: diverged at step k.",
        "",
        "| lr \\ λ | " + " | ".join(f"{d:g}" for d in dampings) + " |",
        "|---|" + "---:|" * len(dampings),
    ]
    for lr, row in grid.groupby("lr", sort=True):
        cells = []
        for damping in dampings:
            point = row[row.damping == damping]
            if point.empty:
                cells.append("—")
                continue
            point = point.iloc[0]
            if point.status == "diverged":
                cells.append(f"div. @{int(point.steps) + 1}")
            else:
                mark = "**" if point.best else ""
                cells.append(f"{mark}{point.train_loss:.1f}{mark} ({int(point.steps)} st.)")
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    found = "every point diverged" if best is None else f"lr {best.lr:g}, λ {best.damping:g}"
    lines += ["", f"Best: {found} (bold).", ""]
    return lines


if __name__ == "__main__":
    main()
