"""``mbf-analyze fisher``: a per-layer summary of the empirical and true Fisher on one batch.

The network is the seeded initialization unless ``--epochs N`` pretrains it first with SGD-m
(cached, as ``heatmap`` does); the output says which. Files in ``--out``:
``fisher_summary.csv`` and ``run.json``.
"""

from __future__ import annotations

import argparse
import time

from mbf_analysis.cli.common import (
    DEFAULT_MODEL,
    add_fisher_kinds,
    add_out,
    add_problem_options,
    apply_threads,
    check_kinds,
    config_of,
    csv_list,
    non_negative_int,
    positive_float,
    require_data,
)
from mbf_analysis.cli.pretraining import add_pretraining, claim_folder, pretrain, stopped

CSV_NAME = "fisher_summary.csv"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fisher`` on the subcommand parsers."""
    fisher = sub.add_parser(
        "fisher",
        help="per-layer summary of the empirical and true Fisher",
        description="Per-layer summary of the empirical and true Fisher of a network on one "
        "batch: sizes, traces, extreme eigenvalues, condition numbers of F + λI, and the "
        "fraction of |(F + λI)⁻¹| inside the mini-blocks next to the area they cover. The "
        "network is its seeded initialization unless --epochs pretrains it with SGD-m.",
    )
    add_problem_options(fisher)
    add_fisher_kinds(fisher)
    fisher.add_argument(
        "--damping", type=positive_float, default=1e-3, help="λ in F + λI (default: 1e-3)"
    )
    fisher.add_argument(
        "--layers", type=csv_list, default=None, help="comma-separated module names (default: all)"
    )
    add_pretraining(fisher, epochs_type=non_negative_int, default_epochs="0: untrained")
    add_out(fisher, resumable=True, default="default: print only")
    fisher.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    check_kinds(args.kinds)
    folder = claim_folder(args, "fisher", (CSV_NAME,))
    data_folder = require_data(args.dataset, args.data_dir, args.download)

    import pandas as pd
    import torch

    from mbf_analysis.analysis import fisher_summary
    from mbf_analysis.cli.common import batch_of, check_layers, dataset_and_model

    apply_threads(args.threads)
    start = time.perf_counter()
    dataset, model_name, model = dataset_and_model(
        args, check=lambda built: check_layers(built, args.layers)
    )
    try:
        model, trained = pretrain(args, dataset, model_name, model, epochs=args.epochs or 0)
    except KeyboardInterrupt as err:
        stopped(err, args, folder, "fisher")
    inputs, targets = batch_of(dataset, args.batch_size, args.seed)
    loaded = time.perf_counter()
    frame = fisher_summary(
        model,
        torch.nn.CrossEntropyLoss(),
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
        f"Fisher of {args.model or DEFAULT_MODEL[dataset.name]} ({trained}) on {len(inputs)} "
        f"{dataset.name} samples (λ = {args.damping:g}, {args.dtype}):"
    )
    shown = frame.assign(
        mass_vs_area=frame.miniblock_mass.map("{:.3f}".format)
        + " / "
        + frame.miniblock_area.map("{:.3f}".format)
    ).drop(columns=["miniblock_mass", "miniblock_area"])
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(shown.to_string(index=False))
    if not args.epochs:
        print(
            "note: the network is untrained (its seeded initialization); pass --epochs N to "
            "pretrain it with SGD-m first, as the paper's analyses do"
        )
    if folder is None:
        return
    frame.to_csv(folder.path / CSV_NAME, index=False)
    folder.add_files(CSV_NAME)
    folder.write_record(
        {
            "status": "complete",
            "settings": {**config_of(args), "model": model_name, "network": trained},
            "data_folder": None if data_folder is None else str(data_folder),
            "timings_s": {"load": loaded - start, "fisher": done - loaded},
        }
    )
    print(f"wrote {folder.path / CSV_NAME} and {folder.record_path}")
