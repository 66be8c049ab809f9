"""``mbf-analyze fisher``: a per-layer summary of the empirical and true Fisher on one batch."""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from mbf_analysis.analysis import fisher_summary
from mbf_analysis.cli.common import (
    DEFAULT_MODEL,
    add_fisher_kinds,
    add_problem_options,
    check_kinds,
    check_layers,
    csv_list,
    positive_float,
    problem,
    save_run,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fisher`` on the subcommand parsers."""
    fisher = sub.add_parser(
        "fisher",
        help="per-layer summary of the empirical and true Fisher",
        description="Per-layer summary of the empirical and true Fisher of a network on one "
        "batch: sizes, traces, extreme eigenvalues, condition numbers of F + λI, and the "
        "fraction of |(F + λI)⁻¹| inside the mini-blocks next to the area they cover.",
    )
    add_problem_options(fisher)
    add_fisher_kinds(fisher)
    fisher.add_argument(
        "--damping", type=positive_float, default=1e-3, help="λ in F + λI (default: 1e-3)"
    )
    fisher.add_argument(
        "--layers", type=csv_list, default=None, help="comma-separated module names (default: all)"
    )
    fisher.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_kinds(args.kinds)
    start = time.perf_counter()
    dataset, model, loss_fn, inputs, targets = problem(args)
    loaded = time.perf_counter()
    check_layers(model, args.layers)
    frame = fisher_summary(
        model,
        loss_fn,
        inputs,
        targets,
        kinds=args.kinds,
        damping=args.damping,
        layers=args.layers,
        mc_samples=args.mc_samples,
        generator=torch.Generator(device=inputs.device).manual_seed(args.seed),
        progress=True,
    )
    done = time.perf_counter()
    print(
        f"Fisher of {args.model or DEFAULT_MODEL[dataset.name]} on {len(inputs)} {dataset.name} "
        f"samples (λ = {args.damping:g}, {args.dtype}):"
    )
    shown = frame.assign(
        mass_vs_area=frame.miniblock_mass.map("{:.3f}".format)
        + " / "
        + frame.miniblock_area.map("{:.3f}".format)
    ).drop(columns=["miniblock_mass", "miniblock_area"])
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(shown.to_string(index=False))
    save_run(
        args.out, "fisher_summary", frame, args, {"load": loaded - start, "fisher": done - loaded}
    )
