"""``mbf-analyze train``: train a problem with one optimizer, compare several (and several seeds)
on equal budgets, or grid-search one (paper §6, Fig. 7/8, Tables 4-8); resumable.

Files in ``--out``: ``train_log.csv`` (every run appends its rows as they come, column ``run``),
``checkpoints/<run>.pt`` (everything a run needs to continue, :mod:`mbf_analysis.training`),
``train_summary.csv`` (one row per run), ``train_seeds.csv`` (mean and spread over the seeds,
with several seeds), ``grid_search.csv`` (with ``--grid``), ``train_curves.png``/``.pdf`` and
``run.json``.

``--resume --out DIR`` needs nothing else: it continues every run of the folder with the saved
settings. Finished runs are kept as they are, the interrupted one continues from its last
checkpoint (its rows after that checkpoint are dropped, so every step appears once), and runs
not started yet start. A larger ``--epochs``, ``--max-steps`` or ``--time-budget`` extends
finished runs; other changed settings are refused, naming them. Ctrl-C saves a checkpoint after
the step in progress, prints the resume command and exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from mbf_analysis.cli.choices import (
    AUTOENCODERS,
    COARSE_SPACES,
    OPTIMIZERS,
    PRESET_SETS,
    PROBLEM_DATA,
    PROBLEMS,
    TWO_LEVEL_VARIANTS,
)
from mbf_analysis.cli.common import (
    UsageError,
    add_code_activation,
    add_data_dir,
    add_download,
    add_out,
    add_threads,
    apply_threads,
    coarse_list,
    config_of,
    csv_list,
    exit_stopped,
    expand_coarse,
    non_negative_float,
    positive_float,
    positive_int,
    require_data,
)
from mbf_analysis.cli.recording import Recorder, format_duration
from mbf_analysis.cli.run_folder import RunFolder
from mbf_analysis.errors import StorageError
from mbf_analysis.stopping import StopRequested

LOG_NAME = "train_log.csv"
SUMMARY_NAME = "train_summary.csv"
SEEDS_NAME = "train_seeds.csv"
GRID_NAME = "grid_search.csv"
CHECKPOINTS = "checkpoints"
FIGURE_NAME = "train_curves"
OUTPUTS = (
    LOG_NAME,
    SUMMARY_NAME,
    SEEDS_NAME,
    GRID_NAME,
    CHECKPOINTS,
    f"{FIGURE_NAME}.png",
    f"{FIGURE_NAME}.pdf",
)
"""Every file (and folder) ``train`` writes into ``--out`` (besides ``run.json``)."""

TRAJECTORY = (
    "problem",
    "code_activation",
    "presets",
    "optimizer",
    "coarse",
    "seed",
    "batch_size",
    "lr",
    "damping",
    "weight_decay",
    "dtype",
    "eval_samples",
    "grid",
    "grid_lr",
    "grid_damping",
    "grid_weight_decay",
)
"""Settings a ``--resume`` keeps from the saved run; giving another value is refused."""

EXTENDABLE = ("time_budget", "epochs", "max_steps", "budget_clock")
"""Settings a ``--resume`` may change (limits reaching further extend finished runs)."""


def _optimizer_list(text: str) -> list[str]:
    names = csv_list(text)
    unknown = [n for n in names if n not in OPTIMIZERS and n not in TWO_LEVEL_VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid choice {','.join(unknown) or text!r} (choose from {', '.join(OPTIMIZERS)}, "
            "comma-separated; kfac-two-level-<coarse> for a coarse space)"
        )
    return list(dict.fromkeys(names))


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in csv_list(text)]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(
            f"give seeds ≥ 0, comma-separated (e.g. 0,1,2), got {text!r}"
        )
    return list(dict.fromkeys(seeds))


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
        "(--optimizer mbf,adam,sgdm) and seeds (--seed 0,1,2) run one after another with the "
        "same limits. A run ends at the first of --time-budget (seconds of training on "
        "--budget-clock; evaluations and MBF's warm start excluded), --epochs and --max-steps; "
        "give at least one. With --out: train_log.csv (appended step by step), checkpoints/, "
        "train_summary.csv, run.json and train_curves.png/.pdf; --resume --out DIR continues "
        "an interrupted run. --grid runs the paper's grid search (Tables 5/7) instead, writing "
        "grid_search.csv; --grid-lr/--grid-damping/--grid-weight-decay give the axes "
        "explicitly (comma-separated; an axis not given: --lr/--damping/--weight-decay, else "
        "the preset when another axis is given, else the paper's grid).",
    )
    train.add_argument(
        "--problem", default=None, choices=PROBLEMS, help="the problem (required unless --resume)"
    )
    add_code_activation(train)
    train.add_argument(
        "--optimizer",
        type=_optimizer_list,
        default=None,
        help=f"optimizer(s), comma-separated, from {', '.join(OPTIMIZERS)} (default: mbf)",
    )
    train.add_argument(
        "--coarse",
        type=coarse_list,
        default=None,
        help="coarse space(s) of kfac-two-level, comma-separated: one run per coarse space "
        f"(from {', '.join(COARSE_SPACES)}; default: nicolaides)",
    )
    train.add_argument(
        "--presets",
        choices=PRESET_SETS,
        default=None,
        help="hyper-parameters: 'ours' (default) are the paper's (Tables 4, 8) except where "
        "they do not train here (MBF on mnist-ae); 'paper' are the published values as they are",
    )
    train.add_argument("--time-budget", type=positive_float, default=None, help="seconds per run")
    train.add_argument(
        "--budget-clock",
        choices=["wall", "process"],
        default=None,
        help="what --time-budget counts: wall-clock seconds, or process (CPU) seconds as the "
        "paper timed them, fairer on a shared machine (default: wall)",
    )
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
        type=non_negative_float,
        default=None,
        help="decoupled weight decay γ (default: the preset)",
    )
    train.add_argument(
        "--seed",
        type=_seed_list,
        default=None,
        help="seed(s) of weights and batches, comma-separated: each optimizer runs once per "
        "seed (default: 0)",
    )
    train.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="minibatch size (default: the problem's, the paper's: 1000 for the autoencoders, "
        "128 for the CNNs)",
    )
    train.add_argument("--device", default=None, help="torch device (default: cpu)")
    train.add_argument(
        "--dtype", default=None, choices=["float32", "float64"], help="precision (float32)"
    )
    add_data_dir(train)
    add_download(train)
    train.add_argument(
        "--eval-samples",
        type=positive_int,
        default=None,
        help="evaluate on this many training and test samples (default: all)",
    )
    add_threads(train)
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
        type=_float_list(non_negative_float),
        default=None,
        help="weight decays of the grid, comma-separated (implies --grid)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        help="steps between checkpoints (default: after the first step a minute after the "
        "last save); checkpoints also at Ctrl-C and at the end of every run",
    )
    train.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars"
    )
    add_out(train, resumable=True, default="default: print only, no checkpoints")
    train.set_defaults(run=run)


_DEFAULTS: dict[str, Any] = {
    "presets": "ours",
    "optimizer": ["mbf"],
    "seed": [0],
    "device": "cpu",
    "dtype": "float32",
    "budget_clock": "wall",
}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings from the options (defaults filled in), checked for consistency."""
    settings = {
        key: getattr(args, key)
        for key in (*TRAJECTORY, *EXTENDABLE, "device")
        if getattr(args, key) is not None
    }
    for key, value in _DEFAULTS.items():
        settings.setdefault(key, value)
    explicit = (args.grid_lr, args.grid_damping, args.grid_weight_decay)
    settings["grid"] = bool(args.grid or any(v is not None for v in explicit))
    if settings.get("coarse") is not None:
        if "kfac-two-level" not in settings["optimizer"]:
            raise UsageError("--coarse sets kfac-two-level's coarse space; add it to --optimizer")
        settings["optimizer"] = expand_coarse(settings["optimizer"], settings["coarse"])
    return settings


def _resumed_settings(record: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    saved = dict(record.get("settings", {}))
    given = {
        k: getattr(args, k) for k in TRAJECTORY if k != "grid" and getattr(args, k) is not None
    }
    if args.grid:
        given["grid"] = True
    if "optimizer" in given and "coarse" in given:
        given["optimizer"] = expand_coarse(given["optimizer"], given["coarse"])
    clash = {k: v for k, v in given.items() if saved.get(k) != v}
    if clash:
        shown = ", ".join(
            f"--{k.replace('_', '-')} {v!r} ({_saved_text(saved, record, k)})"
            for k, v in clash.items()
        )
        raise UsageError(
            f"--resume continues the runs in {args.out} with their saved settings, but {shown} "
            "would change their trajectory; drop those options or start a new run with another "
            "--out"
        )
    for key in (*EXTENDABLE, "device"):
        if getattr(args, key) is not None:
            saved[key] = getattr(args, key)
    return saved


def _saved_text(saved: dict[str, Any], record: dict[str, Any], key: str) -> str:
    """How a clash message shows the saved ``key``: its value, or, when it was not set, what
    the presets gave each optimizer (the record's ``effective``)."""
    if saved.get(key) is not None:
        return f"saved {saved[key]!r}"
    effective = record.get("effective", {})
    values = {opt: values.get(key) for opt, values in effective.items() if key in values}
    if not values:
        return "not set in the saved run"
    shown = ", ".join(f"{opt} {value!r}" for opt, value in values.items())
    return f"not set: the preset's value, {shown}"


def _effective(
    settings: dict[str, Any], presets: dict[str, Any], problem: Any
) -> dict[str, dict[str, Any]]:
    """What each optimizer of the run uses, preset values included (``run.json``'s
    ``effective``; a grid's points replace ``lr`` and ``damping``)."""
    batch = settings.get("batch_size") or problem.batch_size
    return {
        name: {
            "lr": preset.lr,
            "damping": preset.damping,
            "weight_decay": preset.weight_decay,
            "stat_period": preset.stat_period,
            "inverse_period": preset.inverse_period,
            "batch_size": batch,
            "source": preset.source,
        }
        for name, preset in presets.items()
    }


def _announce_duration(settings: dict[str, Any]) -> None:
    """Say up front how long a comparison of time-budgeted runs takes, when that is over five
    minutes (the budgets alone; evaluations, warm starts and data loading come on top)."""
    budget = settings.get("time_budget")
    if budget is None or settings["grid"]:
        return
    runs = len(settings["optimizer"]) * len(settings["seed"])
    total = runs * budget
    if total > Recorder.ESTIMATE_OVER_S:
        print(
            f"estimate: at least {format_duration(total)} ({runs} runs × {budget:g} s of "
            f"training on the {settings['budget_clock']} clock, plus evaluations); Ctrl-C or "
            "SIGTERM stops after the step in progress and --resume continues",
            flush=True,
        )


def _check(settings: dict[str, Any]) -> None:
    if settings.get("problem") is None:
        raise UsageError("give --problem (or --resume --out DIR to continue a run)")
    if settings.get("code_activation") is not None and settings["problem"] not in AUTOENCODERS:
        raise UsageError(
            f"--code-activation applies to the autoencoders ({', '.join(AUTOENCODERS)}), not "
            f"to --problem {settings['problem']}"
        )
    if all(settings.get(k) is None for k in ("time_budget", "epochs", "max_steps")):
        raise UsageError("give --time-budget SECONDS and/or --epochs N (or --max-steps N)")
    damping = settings.get("damping") is not None or settings.get("grid_damping") is not None
    if damping and "sgdm" in settings["optimizer"]:
        raise UsageError("--damping does not apply to sgdm; leave sgdm out or drop --damping")
    if settings["grid"] and len(settings["seed"]) > 1:
        raise UsageError("--grid runs one seed; give a single --seed")


def _print_table(frame) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=False))


def _divergence_notes(summary, settings: dict[str, Any]) -> None:
    """Say why the published MBF presets of the autoencoders diverge, when they do."""
    from mbf_analysis.training import get_preset

    diverged = summary[(summary.status == "diverged") & (summary.optimizer == "mbf")]
    if diverged.empty or settings.get("lr") is not None or settings.get("damping") is not None:
        return
    preset = get_preset(
        settings["problem"],
        "mbf",
        lr=settings.get("lr"),
        damping=settings.get("damping"),
        presets=settings["presets"],
    )
    if preset.source != "Table 4":
        return
    print(
        f"note: MBF diverged with the paper's published {settings['problem']} preset (Table 4: "
        f"lr {preset.lr:g}, λ {preset.damping:g}). At initialization the mini-block statistics "
        f"‖g_b‖² are far below λ, so MBF acts as SGD-m with learning rate lr/λ = "
        f"{preset.lr / preset.damping:.3g}, which is too large here (the stable settings of our "
        "grid have lr/λ ≤ 3.3e-3; the best was lr 3e-5, λ 1e-2, see "
        "benchmarks/results_training.md); --presets ours (the default) uses that point"
    )


def run(args: argparse.Namespace) -> None:
    """Train (module docstring); under ``torchrun``, one process per device (README, "Several
    GPUs or nodes"): rank 0 checks the options, claims ``--out`` and writes every file; the
    others train their slice of each global batch and print nothing."""
    world = torchrun_world()
    if world is None:
        _run(args, None, None)
        return
    from mbf_analysis.cli.common import parse_device
    from mbf_analysis.errors import MBFError
    from mbf_analysis.training import distributed

    device = distributed.start(world, parse_device(_device_name(args)))
    try:
        _run(args, world, device)
    except (UsageError, MBFError, SystemExit):
        # Refusals, a stop at an agreed step, "every run diverged": every process leaves here
        # together, so they close together too (a barrier, bounded by the collective timeout).
        distributed.finish(world)
        raise
    else:
        distributed.finish(world)
    finally:
        distributed.stop()


def _device_name(args: argparse.Namespace) -> str:
    """The device of a torchrun job, known before the process group exists: ``--device``, else
    the saved one of the run ``--resume`` continues, else ``cpu``."""
    if args.device is not None or not args.resume or args.out is None:
        return args.device or "cpu"
    import json

    try:
        saved = json.loads((Path(args.out) / "run.json").read_text())["settings"]["device"]
    except (OSError, ValueError, KeyError, TypeError):
        return "cpu"  # rank 0 will say what is wrong with the folder
    return saved or "cpu"


def _run(args: argparse.Namespace, world: Any, started_device: Any) -> None:
    main = world is None or world.main
    folder = None
    if main:
        try:
            folder, record, settings, data_folder = _claim(args, world)
        except BaseException:
            _share(world, None)
            raise
        _share(world, (settings, data_folder))
    else:
        shared = _share(world, None)
        if shared is None:
            raise SystemExit(2)  # rank 0 refused the run and said why
        settings, data_folder = shared

    import torch

    from mbf_analysis.cli.common import parse_device
    from mbf_analysis.data import load_dataset
    from mbf_analysis.training import compare, get_preset, get_problem, grid_search, summarize

    apply_threads(args.threads)
    device = started_device if world is not None else parse_device(settings["device"])
    problem = get_problem(settings["problem"]).with_code_activation(settings.get("code_activation"))
    presets = {
        optimizer: get_preset(
            problem,
            optimizer,
            lr=settings.get("lr"),
            damping=None if optimizer == "sgdm" else settings.get("damping"),
            weight_decay=settings.get("weight_decay"),
            presets=settings["presets"],
        )
        for optimizer in settings["optimizer"]
    }
    start = time.perf_counter()
    dataset = load_dataset(problem.dataset, data_folder)
    loaded = time.perf_counter()
    common: dict[str, Any] = {
        "time_budget": settings.get("time_budget"),
        "epochs": settings.get("epochs"),
        "max_steps": settings.get("max_steps"),
        "budget_clock": settings["budget_clock"],
        "presets": settings["presets"],
        "batch_size": settings.get("batch_size"),
        "device": device,
        "dtype": getattr(torch, settings["dtype"]),
        "eval_samples": settings.get("eval_samples"),
        "progress": args.progress,
        "dataset": dataset,
    }
    if args.out is not None:
        common.update(
            csv_path=Path(args.out) / LOG_NAME,
            checkpoint_dir=Path(args.out) / CHECKPOINTS,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
        )
    if folder is not None:
        folder.add_files(LOG_NAME, CHECKPOINTS)
    timings: dict[str, float] = {"load": loaded - start}

    def write(status: str, **extra: Any) -> None:
        if folder is not None:
            folder.write_record(
                {
                    "status": status,
                    "settings": settings,
                    "effective": _effective(settings, presets, problem),
                    "data_folder": data_folder,
                    "options": {
                        "threads": args.threads,
                        "checkpoint_every": args.checkpoint_every,
                        "progress": args.progress,
                        "parsed": config_of(args),
                    },
                    "timings_s": timings,
                    "processes": _processes(world, device),
                    **extra,
                }
            )

    if not main:
        _train_slices(problem, settings, common, compare, grid_search)
        return
    write("running")
    _announce_duration(settings)
    summary = None
    try:
        if settings["grid"]:
            _grid(problem, settings, common, folder, grid_search, timings, loaded)
        else:
            summary = _compare(
                problem, settings, common, folder, compare, summarize, timings, loaded
            )
    except KeyboardInterrupt as err:
        timings["train"] = time.perf_counter() - loaded
        write("interrupted")
        how = (
            "stopped after the step in progress, checkpointed"
            if isinstance(err, StopRequested)
            else "aborted; the last checkpoint is kept"
        )
        where = (
            ""
            if folder is None
            else f"; continue with: mbf-analyze train --resume --out {folder.path}"
        )
        exit_stopped(err, f"{how}{where}")
    except StorageError as err:
        timings["train"] = time.perf_counter() - loaded
        with contextlib.suppress(StorageError):
            write("failed")
        raise err.with_context(
            "the last good checkpoint is kept"
            + (
                ""
                if folder is None
                else f"; `mbf-analyze train --resume --out {folder.path}` "
                "continues from it once the file can be written"
            )
        ) from err
    except BaseException:
        timings["train"] = time.perf_counter() - loaded
        with contextlib.suppress(StorageError):
            write("failed")
        raise
    if summary is not None and (summary.status == "diverged").all():
        write("diverged")
        raise UsageError(
            f"every run diverged ({', '.join(summary.optimizer)}); lower --lr or raise --damping"
        )
    write("complete")


def torchrun_world() -> Any:
    """The ``torchrun`` world of this process (``WORLD_SIZE > 1``), else ``None``; torch is
    imported only in a world."""
    import os

    text = os.environ.get("WORLD_SIZE", "1") or "1"
    if not text.strip().isdigit():
        raise UsageError(f"WORLD_SIZE={text!r} is not a number of processes")
    if int(text) <= 1:
        return None
    from mbf_analysis.training.distributed import world_from_env

    return world_from_env()


def _claim(args: argparse.Namespace, world: Any) -> tuple[Any, Any, dict[str, Any], str | None]:
    """Rank 0's part before training: the run folder, its record, the checked settings (the
    global batch must divide among the processes) and the data folder."""
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out, the folder of the run to continue")
    folder = None
    record = None
    if args.out is not None:
        folder = RunFolder(args.out, "train", OUTPUTS, resumable=True)
        record = folder.claim(resume=args.resume, overwrite=args.overwrite)
    settings = _resumed_settings(record, args) if record is not None else _settings(args)
    _check(settings)
    if world is not None:
        from mbf_analysis.training import get_problem

        batch = settings.get("batch_size") or get_problem(settings["problem"]).batch_size
        if batch % world.size:
            raise UsageError(
                f"--batch-size {batch} (the global batch) does not divide among the "
                f"{world.size} processes of this torchrun job; give a multiple of {world.size}"
            )
    dataset_name = PROBLEM_DATA[settings["problem"]]
    data_dir = args.data_dir or (record or {}).get("data_folder")
    data_folder = require_data(dataset_name, data_dir, args.download)
    return folder, record, settings, None if data_folder is None else str(data_folder)


def _processes(world: Any, device: Any) -> dict[str, Any]:
    """How many processes trained, and who did what (``run.json``)."""
    if world is None:
        return {"world_size": 1}
    return {
        "world_size": world.size,
        "backend": "nccl" if str(device).startswith("cuda") else "gloo",
        "batches": "each process trains its contiguous slice of every global batch",
        "writes_and_evaluates": "rank 0 (its evaluations are sent to the others)",
        "time_budget_clock": "rank 0's",
    }


def _share(world: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every process of ``world`` (``value`` itself without one)."""
    if world is None:
        return value
    from mbf_analysis.training.distributed import share

    return share(value, world)


def _train_slices(problem, settings, common, compare, grid_search) -> None:
    """A process other than rank 0: the same runs, on its slice of every batch, silently (rank 0
    logs, checkpoints, evaluates and prints)."""
    try:
        if settings["grid"]:
            for optimizer in settings["optimizer"]:
                grid_search(problem, optimizer, **_grid_axes(settings), **common)
        else:
            compare(problem, settings["optimizer"], **_compare_options(settings), **common)
    except KeyboardInterrupt as err:
        from mbf_analysis.stopping import exit_code

        raise SystemExit(exit_code(err)) from None


def _compare_options(settings: dict[str, Any]) -> dict[str, Any]:
    """``compare``'s seeds and the overrides of every optimizer's preset."""
    return {
        "seeds": settings["seed"],
        "lr": settings.get("lr"),
        "damping": settings.get("damping"),
        "weight_decay": settings.get("weight_decay"),
    }


def _grid_axes(settings: dict[str, Any]) -> dict[str, Any]:
    """``grid_search``'s axes and seed: each axis given, else the single value, else ``None``
    (the preset's or the paper's grid)."""

    def axis(values, single):
        if values is not None:
            return values
        return None if single is None else [single]

    return {
        "lrs": axis(settings.get("grid_lr"), settings.get("lr")),
        "dampings": axis(settings.get("grid_damping"), settings.get("damping")),
        "weight_decays": axis(settings.get("grid_weight_decay"), settings.get("weight_decay")),
        "seed": settings["seed"][0],
    }


def _grid(problem, settings, common, folder, grid_search, timings, loaded) -> None:
    import pandas as pd

    frames = []
    for optimizer in settings["optimizer"]:
        frame = grid_search(problem, optimizer, **_grid_axes(settings), **common)
        frames.append(frame)
        if not frame.best.any():
            print(f"{optimizer}: no grid point both trained (lowered the loss) and stayed finite")
            continue
        best = frame[frame.best].iloc[0]
        criterion = "final training loss" if problem.is_autoencoder else "final test accuracy"
        print(
            f"{optimizer}: best lr {best.lr:g}, damping {best.damping}, weight decay "
            f"{best.weight_decay:g} ({criterion} {best.score:.4g})"
        )
    grid = pd.concat(frames, ignore_index=True)
    timings["train"] = time.perf_counter() - loaded
    _print_table(
        grid[["optimizer", "lr", "damping", "weight_decay", "status", "steps", "score", "best"]]
    )
    if folder is not None:
        grid.to_csv(folder.path / GRID_NAME, index=False)
        folder.add_files(GRID_NAME)
        print(f"wrote {folder.path / GRID_NAME}")


def _compare(problem, settings, common, folder, compare, summarize, timings, loaded) -> None:
    from mbf_analysis.plotting import plot_training_curves, save_figure
    from mbf_analysis.training import summarize_seeds

    log = compare(problem, settings["optimizer"], **_compare_options(settings), **common)
    timings["train"] = time.perf_counter() - loaded
    summary = summarize(log)
    seeds = ", ".join(str(s) for s in settings["seed"])
    print(f"{problem.label}, seed{'s' if len(settings['seed']) > 1 else ''} {seeds}:")
    shown = summary.drop(columns=["run", "problem", "initial_train_loss"], errors="ignore")
    if len(settings["seed"]) == 1:
        shown = shown.drop(columns=["seed"])
    _print_table(shown)
    spread = summarize_seeds(summary) if len(settings["seed"]) > 1 else None
    if spread is not None:
        print("mean ± std over the seeds:")
        _print_table(spread.drop(columns=["problem"]))
    _divergence_notes(summary, settings)
    if folder is not None:
        budget = settings.get("time_budget")
        clock = "process_time" if settings["budget_clock"] == "process" else "wall_time"
        fig = plot_training_curves(
            log,
            (clock, "epoch"),
            y="loss",
            title=f"{problem.label}: training loss (minibatch, smoothed), seeds {seeds}"
            + (f", budget {budget:g} s" if budget else ""),
        )
        written = save_figure(fig, folder.path / FIGURE_NAME)
        summary.to_csv(folder.path / SUMMARY_NAME, index=False)
        folder.add_files(SUMMARY_NAME, *written)
        if spread is not None:
            spread.to_csv(folder.path / SEEDS_NAME, index=False)
            folder.add_files(SEEDS_NAME)
        print(
            f"wrote {folder.path / LOG_NAME}, {folder.path / SUMMARY_NAME}, "
            f"{', '.join(str(p) for p in written)}"
        )
    return summary
