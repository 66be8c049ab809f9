"""``mbf-analyze train``: train a problem with one optimizer, compare several on equal budgets,
or grid-search one (paper §6, Fig. 7/8, Tables 4-8)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from mbf_analysis.cli.common import (
    UsageError,
    add_data_dir,
    csv_list,
    parse_device,
    positive_float,
    positive_int,
    save_run,
)
from mbf_analysis.data import load_dataset
from mbf_analysis.plotting import plot_training_curves, save_figure
from mbf_analysis.training import (
    OPTIMIZERS,
    compare,
    get_preset,
    get_problem,
    grid_search,
    problem_names,
    summarize,
)

LOG_NAME = "train_log.csv"


def _optimizer_list(text: str) -> list[str]:
    names = csv_list(text)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid choice {','.join(unknown) or text!r} (choose from {', '.join(OPTIMIZERS)}, "
            "comma-separated)"
        )
    return list(dict.fromkeys(names))


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _float_list(check):
    """An argparse type: a comma-separated list of numbers, each passed through ``check``."""

    def parse(text: str) -> list[float]:
        values = [check(item) for item in csv_list(text)]
        if not values:
            raise argparse.ArgumentTypeError(f"give at least one number, got {text!r}")
        return list(dict.fromkeys(values))

    parse.__name__ = "comma-separated number list"
    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``train`` on the subcommand parsers."""
    train = sub.add_parser(
        "train",
        help="train a problem with MBF or a baseline; compare optimizers on equal budgets",
        description="Train one of the paper's problems with the paper's best hyper-parameters "
        "(presets from Tables 4 and 8; mlp-digits and fashion-cnn are ours). Several optimizers "
        "(--optimizer mbf,adam,sgdm) run one after another with the same seed and the same "
        "limits. The run ends at the first of --time-budget (seconds of training, evaluations "
        "excluded), --epochs and --max-steps; give at least one. With --out: train_log.csv "
        "(appended step by step), train_summary.csv, run.json and train_curves.png/.pdf. "
        "--grid runs the paper's grid search (Tables 5/7) instead, writing grid_search.csv; "
        "--grid-lr/--grid-damping/--grid-weight-decay give the axes explicitly (comma-separated; "
        "an axis not given: --lr/--damping/--weight-decay, else the preset when another axis is "
        "given, else the paper's grid).",
    )
    train.add_argument("--problem", required=True, choices=problem_names(), help="the problem")
    train.add_argument(
        "--optimizer",
        type=_optimizer_list,
        default=["mbf"],
        help=f"optimizer(s), comma-separated, from {', '.join(OPTIMIZERS)} (default: mbf)",
    )
    train.add_argument("--time-budget", type=positive_float, default=None, help="seconds per run")
    train.add_argument("--epochs", type=positive_int, default=None, help="epochs per run")
    train.add_argument("--max-steps", type=positive_int, default=None, help="steps per run")
    train.add_argument(
        "--lr", type=positive_float, default=None, help="learning rate (default: the preset)"
    )
    train.add_argument(
        "--damping",
        type=positive_float,
        default=None,
        help="damping λ (ε for adam and shampoo; default: the preset; not for sgdm)",
    )
    train.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=None,
        help="decoupled weight decay γ (default: the preset)",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of weights and batches (0)")
    train.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    train.add_argument(
        "--dtype", default="float32", choices=["float32", "float64"], help="precision (float32)"
    )
    add_data_dir(train)
    train.add_argument(
        "--eval-samples",
        type=positive_int,
        default=None,
        help="evaluate on this many training and test samples (default: all)",
    )
    train.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads (default: torch's)",
    )
    train.add_argument("--grid", action="store_true", help="grid search instead of one run each")
    train.add_argument(
        "--grid-lr",
        type=_float_list(positive_float),
        default=None,
        help="learning rates of the grid, comma-separated (implies --grid)",
    )
    train.add_argument(
        "--grid-damping",
        type=_float_list(positive_float),
        default=None,
        help="dampings of the grid, comma-separated (implies --grid; not for sgdm)",
    )
    train.add_argument(
        "--grid-weight-decay",
        type=_float_list(_non_negative_float),
        default=None,
        help="weight decays of the grid, comma-separated (implies --grid)",
    )
    train.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars"
    )
    train.add_argument("--out", type=Path, default=None, help="folder for the logs and figures")
    train.set_defaults(run=run)


def _axis(values: list[float] | None, single: float | None) -> list[float] | None:
    """A grid axis: the explicit list, else the single value, else ``None`` (preset/paper)."""
    if values is not None:
        return values
    return None if single is None else [single]


def _check(args: argparse.Namespace) -> None:
    explicit = (args.grid_lr, args.grid_damping, args.grid_weight_decay)
    args.grid = args.grid or any(v is not None for v in explicit)
    if args.time_budget is None and args.epochs is None and args.max_steps is None:
        raise UsageError("give --time-budget SECONDS and/or --epochs N (or --max-steps N)")
    if (args.damping is not None or args.grid_damping is not None) and "sgdm" in args.optimizer:
        raise UsageError("--damping does not apply to sgdm; leave sgdm out or drop --damping")
    if args.out is not None and (args.out / LOG_NAME).exists():
        raise UsageError(
            f"{args.out / LOG_NAME} already exists; remove it or choose another --out "
            "(runs append to it)"
        )
    for optimizer in args.optimizer:
        get_preset(args.problem, optimizer, lr=args.lr, weight_decay=args.weight_decay)


def _print_table(frame: pd.DataFrame) -> None:
    with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=False))


def run(args: argparse.Namespace) -> None:
    _check(args)
    device = parse_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    problem = get_problem(args.problem)
    start = time.perf_counter()
    dataset = load_dataset(problem.dataset, args.data_dir)
    loaded = time.perf_counter()
    common = {
        "time_budget": args.time_budget,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "device": device,
        "dtype": getattr(torch, args.dtype),
        "eval_samples": args.eval_samples,
        "progress": args.progress,
        "dataset": dataset,
    }
    if args.grid:
        frames = []
        for optimizer in args.optimizer:
            frame = grid_search(
                problem,
                optimizer,
                lrs=_axis(args.grid_lr, args.lr),
                dampings=_axis(args.grid_damping, args.damping),
                weight_decays=_axis(args.grid_weight_decay, args.weight_decay),
                **common,
            )
            frames.append(frame)
            if not frame.best.any():
                print(f"{optimizer}: every grid point diverged")
                continue
            best = frame[frame.best].iloc[0]
            criterion = "final training loss" if problem.is_autoencoder else "final test accuracy"
            print(
                f"{optimizer}: best lr {best.lr:g}, damping {best.damping}, weight decay "
                f"{best.weight_decay:g} ({criterion} {best.score:.4g})"
            )
        grid = pd.concat(frames, ignore_index=True)
        _print_table(
            grid[["optimizer", "lr", "damping", "weight_decay", "status", "score", "best"]]
        )
        save_run(
            args.out,
            "grid_search",
            grid,
            args,
            {"load": loaded - start, "grid": time.perf_counter() - loaded},
        )
        return
    csv_path = None if args.out is None else args.out / LOG_NAME
    log = compare(
        problem,
        args.optimizer,
        lr=args.lr,
        damping=args.damping,
        weight_decay=args.weight_decay,
        csv_path=csv_path,
        **common,
    )
    trained = time.perf_counter()
    summary = summarize(log)
    print(f"{problem.name}, seed {args.seed}:")
    _print_table(summary.drop(columns=["problem", "seed"]))
    if args.out is not None:
        fig = plot_training_curves(
            log,
            ("wall_time", "epoch"),
            y="train_loss",
            title=f"{problem.name}: training loss (seed {args.seed})",
        )
        written = save_figure(fig, args.out / "train_curves")
        print(f"wrote {csv_path}, {', '.join(str(p) for p in written)}")
        timings = {"load": loaded - start, "train": trained - loaded}
        save_run(args.out, "train_summary", summary, args, timings)
    if (summary.status == "diverged").all():
        raise UsageError(
            f"every run diverged ({', '.join(summary.optimizer)}); lower --lr or raise --damping"
        )
