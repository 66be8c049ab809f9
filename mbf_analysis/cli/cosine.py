"""``mbf-analyze cosine``: cosine of each method's direction with BDF's along the BDF trajectory
(paper Fig. 6, Algorithm 5; :mod:`mbf_analysis.analysis.cosine`).

Files in ``--out`` (default ``runs/cosine-<dataset>-<model>``):

- ``cosine.csv``: the tidy rows (``iteration, layer, method, cosine, loss``), appended after every
  iteration, so an interrupted run leaves every finished iteration in it;
- ``cosine_state.pt``: the resumable state (:meth:`~mbf_analysis.analysis.CosineRun.state_dict`)
  written atomically every ``--checkpoint-every`` iterations (default: once a minute) and at the
  end;
- ``run.json``: the settings, package versions, timings and the run's status;
- ``cosine.png`` / ``cosine.pdf``: the Fig. 6-like figure.

``--resume`` loads ``cosine_state.pt`` (iteration ``k``), keeps the CSV rows of iterations
``< k`` (dropping rows written after that checkpoint, and a line cut short by a kill), and
continues to ``--iterations`` in total with the saved settings, so the CSV ends with every
iteration exactly once.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mbf_analysis.cli.choices import COARSE_SPACES, DATASETS, METHODS, MODELS, TWO_LEVEL_VARIANTS
from mbf_analysis.cli.common import (
    DEFAULT_MODEL,
    UsageError,
    add_data_dir,
    add_download,
    add_out,
    add_threads,
    apply_threads,
    coarse_list,
    csv_list,
    expand_coarse,
    positive_float,
    positive_int,
    require_data,
)
from mbf_analysis.cli.recording import (
    Recorder,
    add_recording_options,
    load_state,
    per_iteration_text,
    recorded_rows,
    resumed_settings,
    run_recorded,
    state_outputs,
)
from mbf_analysis.cli.run_folder import RunFolder

if TYPE_CHECKING:
    import pandas as pd

CSV_NAME = "cosine.csv"
STATE_NAME = "cosine_state.pt"
RUN_NAME = "run.json"
FIGURE_NAME = "cosine"
ENERGY_FIGURE_NAME = "energy_error"
OUTPUTS = (
    CSV_NAME,
    *state_outputs(STATE_NAME),
    *(f"{name}.{ext}" for name in (FIGURE_NAME, ENERGY_FIGURE_NAME) for ext in ("png", "pdf")),
)
"""Every file ``cosine`` writes into ``--out`` (besides ``run.json``)."""

_Recorder = Recorder
"""The CSV and state recorder of this subcommand (a name the tests patch)."""

COLLAPSE_RATIO = 1e-2
"""The loss has *collapsed* once it is below this fraction of its first value: from then on
the directions mostly measure convergence, and most cosines drift towards 1."""

DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "model": None,
    "iterations": 100,
    "batch_size": 256,
    "lr": 0.1,
    "damping": 0.003,
    "methods": ["mbf", "mbf-true", "kfac", "shampoo", "adam", "sgdm"],
    "layers": None,
    "seed": 0,
    "dtype": "float64",
    "reference": "bdf",
    "fisher": "empirical",
    "coarse": None,
}
"""Settings without ``--preset``: the embedded digits data, finished in well under a minute."""

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "dataset": "mnist16",
        "model": "paper-mlp",
        "iterations": 500,
        "layers": ["fc2", "fc3", "fc4", "fc5"],
    },
}
"""``--preset paper``: the paper's Fig. 6 setting, the 256-20-20-20-20-20-10 tanh MLP on 16×16
MNIST with the middle four layers shown (METHODS.md §5); other settings keep :data:`DEFAULTS`."""

SETTINGS = tuple(DEFAULTS)
"""The options that define a run; ``--resume`` takes them from the saved ``run.json``."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``cosine`` on the subcommand parsers."""
    parser = sub.add_parser(
        "cosine",
        help="cosine of each method's direction with BDF's along the BDF trajectory (Fig. 6)",
        description="Train the network with BDF (one dense empirical-Fisher block per layer) and "
        "record at every iteration, per layer, the cosine of each method's direction with "
        "BDF's (paper Fig. 6, Algorithm 5). Writes cosine.csv (appended every iteration), "
        "cosine_state.pt, run.json and cosine.png/.pdf to --out, and prints the median cosine "
        "per method and layer. Without options it runs 100 iterations on the embedded digits "
        "data.",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="paper: mnist16, paper-mlp (256-20×5-10 tanh), 500 iterations, layers fc2-fc5; "
        "explicit options override it",
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default=None, help="data set (default: digits)"
    )
    add_data_dir(parser)
    add_download(parser)
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="network (default: digits-mlp for digits, paper-mlp for mnist16, simple-cnn for "
        "(fashion-)mnist)",
    )
    parser.add_argument(
        "--iterations", type=positive_int, default=None, help="BDF steps in all (default: 100)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="minibatch size (default: 256)"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=None, help="BDF's learning rate α (default: 0.1)"
    )
    parser.add_argument(
        "--damping",
        type=positive_float,
        default=None,
        help="λ of BDF, MBF, MBF-True and KFAC (default: 0.003)",
    )
    parser.add_argument(
        "--methods",
        type=csv_list,
        default=None,
        help=f"comma-separated methods compared with BDF, from {', '.join(METHODS)}, or "
        "kfac-two-level-<coarse> for one coarse space "
        f"(default: {','.join(DEFAULTS['methods'])})",
    )
    parser.add_argument(
        "--layers",
        type=csv_list,
        default=None,
        help="comma-separated layers whose cosines are recorded (default: all)",
    )
    parser.add_argument(
        "--reference",
        choices=["bdf", "full"],
        default=None,
        help="what each direction is compared with: bdf (the paper's Fig. 6, BDF's direction) "
        "or full, the damped natural gradient F_λ⁻¹∇ over all layers, with the F_λ-norm error "
        "next to the cosine per layer and for the whole network (BDF is then compared too; "
        "small networks only: the paper MLP, the digits MLP)",
    )
    parser.add_argument(
        "--fisher",
        choices=["empirical", "exact"],
        default=None,
        help="the F of --reference full (and of the compared methods with a Fisher setting): "
        "empirical or exact (the Fisher in closed form, the GGN; the KPSVD paper's 'exact Fisher') "
        "(default: empirical)",
    )
    parser.add_argument(
        "--coarse",
        type=coarse_list,
        default=None,
        help="coarse space(s) of kfac-two-level, comma-separated: kfac-two-level in --methods "
        "becomes one kfac-two-level-<coarse> per coarse space, compared side by side along the "
        f"same trajectory (from {', '.join(COARSE_SPACES)}; default: nicolaides)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed (default: 0)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="floating-point precision (default: float64)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    add_threads(parser)
    add_out(parser, resumable=True, default="default: runs/cosine-<dataset>-<model>")
    add_recording_options(parser, state_name=STATE_NAME, smoothing=10, unit="iterations")
    parser.set_defaults(run=run)


# ----------------------------------------------------------------------------- settings
def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in SETTINGS if getattr(args, key) is not None}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the preset, then the explicit options."""
    settings = dict(DEFAULTS)
    settings.update(PRESETS.get(args.preset, {}))
    settings.update(_given(args))
    if settings["seed"] < 0:
        raise UsageError(f"--seed {settings['seed']}: must be 0 or more")
    unknown = [m for m in settings["methods"] if m not in METHODS + TWO_LEVEL_VARIANTS]
    if unknown or not settings["methods"]:
        raise UsageError(
            f"--methods {','.join(settings['methods'])}: unknown {', '.join(unknown) or 'empty'}"
            f"; choose from {', '.join(METHODS)}"
        )
    if settings["fisher"] != "empirical" and settings["reference"] != "full":
        raise UsageError(
            f"--fisher {settings['fisher']} sets the F of --reference full; add --reference full "
            "(BDF's reference is its own empirical-Fisher blocks)"
        )
    if settings["coarse"] is not None:
        if "kfac-two-level" not in settings["methods"]:
            raise UsageError("--coarse sets kfac-two-level's coarse space; add it to --methods")
        settings["methods"] = expand_coarse(settings["methods"], settings["coarse"])
    return settings


def _default_out(settings: dict[str, Any]) -> Path:
    model = settings["model"] or DEFAULT_MODEL.get(settings["dataset"], "model")
    return Path("runs") / f"cosine-{settings['dataset']}-{model}"


# ----------------------------------------------------------------------------- output
def median_table(frame: pd.DataFrame, value: str = "cosine") -> pd.DataFrame:
    """Median ``value`` (the cosine, or the energy error) per method (rows, in the run's order)
    and layer (columns)."""
    methods = list(dict.fromkeys(frame.method))
    layers = list(dict.fromkeys(frame.layer))
    table = frame.pivot_table(index="method", columns="layer", values=value, aggfunc="median")
    return table.reindex(index=methods, columns=layers)


def collapse_iteration(
    frame: pd.DataFrame, ratio: float = COLLAPSE_RATIO, window: int = 5
) -> int | None:
    """The first iteration at which the median loss of the last ``window`` iterations is below
    ``ratio`` times the first loss (a lasting fall, not one lucky minibatch), or ``None``."""
    losses = frame.groupby("iteration", sort=True)["loss"].first()
    if losses.empty or not losses.iloc[0] > 0:
        return None
    typical = losses.rolling(window, min_periods=1).median()
    below = losses.index[typical < ratio * losses.iloc[0]]
    return int(below[0]) if len(below) else None


def _print_table(table: pd.DataFrame) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(table.to_string())


def _record(
    folder: RunFolder,
    settings: dict[str, Any],
    args: argparse.Namespace,
    status: str,
    timings: dict[str, float],
    data_folder: str | None,
    **extra: Any,
) -> None:
    folder.write_record(
        {
            "status": status,
            "settings": settings,
            "data_folder": data_folder,
            "options": {
                "preset": args.preset,
                "device": args.device,
                "threads": args.threads,
                "checkpoint_every": args.checkpoint_every,
                "smoothing": args.smoothing,
            },
            "timings_s": timings,
            **extra,
        }
    )


def run(args: argparse.Namespace) -> None:
    """Run (or resume) the analysis; see the module docstring for the files."""
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out, the folder of the run to continue")
    given = _settings(args) if not args.resume else None
    out = args.out or _default_out(given)
    folder = RunFolder(out, "cosine", OUTPUTS, resumable=True)
    record = folder.claim(resume=args.resume, overwrite=args.overwrite)
    if record is not None:
        given = _given(args)
        if "methods" in given and "coarse" in given:
            given["methods"] = expand_coarse(given["methods"], given["coarse"])
        if args.preset is not None:
            given.update({k: v for k, v in PRESETS[args.preset].items() if k != "iterations"})
        settings = resumed_settings(record, folder, STATE_NAME, given)
        data_dir = args.data_dir or record.get("data_folder")
    else:
        settings, data_dir = given, args.data_dir
    data_folder = require_data(settings["dataset"], data_dir, args.download)
    data_folder = None if data_folder is None else str(data_folder)

    import pandas as pd
    from torch import nn

    from mbf_analysis.analysis import CosineConfig, CosineDivergedError, CosineRun
    from mbf_analysis.cli.common import check_layers, dataset_and_model, parse_device
    from mbf_analysis.errors import MBFError
    from mbf_analysis.plotting import plot_cosines, save_figure

    apply_threads(args.threads)
    start = time.perf_counter()
    problem_args = argparse.Namespace(
        **{k: settings[k] for k in ("dataset", "model", "seed", "dtype")},
        data_dir=data_folder,
        download=False,
        device=args.device,
    )
    dataset, model_name, model = dataset_and_model(
        problem_args, check=lambda built: check_layers(built, settings["layers"])
    )
    settings["model"] = model_name
    config = CosineConfig(
        methods=settings["methods"],
        iterations=settings["iterations"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        damping=settings["damping"],
        layers=settings["layers"],
        seed=settings["seed"],
        reference=settings.get("reference", "bdf"),
        fisher=settings.get("fisher", "empirical"),
    )
    columns = config.columns
    device = parse_device(args.device)
    analysis = CosineRun(model, nn.CrossEntropyLoss(), dataset.train_x, dataset.train_y, config)
    recorder = _Recorder(
        out / CSV_NAME, out / STATE_NAME, analysis, columns, args.checkpoint_every, "cosine"
    )
    folder.add_files(CSV_NAME, STATE_NAME)
    if record is not None:
        load_state(out / STATE_NAME, analysis, device)
        previous = recorded_rows(out / CSV_NAME, columns, analysis.iteration)
        print(f"resuming {out} at iteration {analysis.iteration} of {config.iterations}")
    else:
        previous = pd.DataFrame(columns=list(columns))
    recorder.start(previous)
    if record is None:
        recorder.save()  # iteration 0, so that even an early interruption can be resumed
    remaining = max(config.iterations - analysis.iteration, 0)
    loaded = time.perf_counter()
    timings: dict[str, float] = {"load": loaded - start}
    _record(folder, settings, args, "running", timings, data_folder)
    print(
        f"cosine along the BDF trajectory: {model_name} on {dataset.name}, "
        f"{remaining} iterations of batch {config.batch_size}, lr {config.lr:g}, "
        f"damping {config.damping:g}, methods {','.join(config.methods)} → {out}"
    )
    done = run_recorded(
        analysis,
        remaining,
        recorder,
        progress=args.progress,
        timings=timings,
        loaded=loaded,
        previous_timings=None if record is None else record.get("timings_s"),
        write_record=lambda status: _record(folder, settings, args, status, timings, data_folder),
        diverged=CosineDivergedError,
        refuse_diverged=lambda err: MBFError(
            f"{err} The iterations before it are in {out / CSV_NAME}; start a new run with "
            "another --out."
        ),
    )
    frame = pd.read_csv(out / CSV_NAME)
    collapsed = collapse_iteration(frame)
    full = config.reference == "full"
    against = f"F_λ⁻¹∇ ({config.fisher} Fisher, all layers)" if full else "BDF"
    setting = f"lr {config.lr:g}, λ = {config.damping:g}, batch {config.batch_size}"
    title = f"{model_name} on {dataset.name}: cosine with {against} ({setting})"
    figures = [(FIGURE_NAME, "cosine", title)]
    if full:
        title = f"{model_name} on {dataset.name}: F_λ-norm error against F_λ⁻¹∇ ({setting})"
        figures.append((ENERGY_FIGURE_NAME, "energy_error", title))
    written = []
    for name, value, title in figures:
        fig = plot_cosines(
            frame,
            smoothing=args.smoothing,
            title=title,
            collapse=collapsed,
            value=value,
            reference="F_λ⁻¹∇" if full else "BDF",
        )
        written.extend(save_figure(fig, out / name))
    folder.add_files(*written)
    timings["plot"] = time.perf_counter() - done
    final = frame.groupby("iteration")["loss"].first()
    values = ["cosine", "energy_error"] if full else ["cosine"]
    for value in values:
        what = "cosine with" if value == "cosine" else "F_λ-norm relative error against"
        print(
            f"median {what} {against} over iterations 0-{int(final.index.max())} "
            f"(loss {final.iloc[0]:.3g} → {final.iloc[-1]:.3g}):"
        )
        _print_table(median_table(frame, value))
    if collapsed is not None:
        typical = final.loc[:collapsed].tail(5).median()
        before = frame[frame.iteration < collapsed]
        print(
            f"warning: the loss collapsed below {COLLAPSE_RATIO:g}× its first value by "
            f"iteration {collapsed} (median of the last 5: {typical:.3g}); after that the "
            "directions mostly measure convergence and most cosines drift towards 1. Medians over "
            f"iterations 0-{collapsed - 1}, before the collapse:"
        )
        if len(before):
            for value in values:
                _print_table(median_table(before, value))
    _record(folder, settings, args, "complete", timings, data_folder, collapse_iteration=collapsed)
    print(
        f"{per_iteration_text(timings)}; wrote {out / CSV_NAME}, "
        f"{out / STATE_NAME}, {folder.record_path}, {', '.join(p.name for p in written)}"
    )
