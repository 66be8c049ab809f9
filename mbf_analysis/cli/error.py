"""``mbf-analyze error``: how well each method's curvature matrix approximates the Fisher, along
a training trajectory (the Kronecker-SVD paper's figure;
:mod:`mbf_analysis.analysis.approximation`).

A torch optimizer (``--trajectory``, Adam by default, as in the paper) trains the network; every
``--every`` iterations, before the step, each method's one-shot matrix ``F̂`` of every chosen
Linear layer is compared with that batch's Fisher block ``F`` of the kind ``--fisher`` (``mc``:
one label sampled from the model per input, the paper's Fisher; ``empirical``; ``exact``; see
:mod:`mbf_analysis.fisher_kinds`; ``true`` is read as ``mc`` with a deprecation note):
``error = ‖F − F̂‖_F / ‖F‖_F``; ``scale = ⟨F, F̂⟩ / ‖F̂‖²_F``, the best multiple, and
``scaled_error = ‖F − scale·F̂‖_F / ‖F‖_F``, the error of the shape alone; and
``singular_error``, the relative error of the vector of the leading singular values. ``mbf`` is
MBF's one-shot ``blockdiag(ḡ_j ḡ_jᵀ)`` of the minibatch-mean gradient (about ``F/m``: its
``error`` is ≈ 1 by scale alone), ``mbf-ema`` the EMA of it that MBF inverts, carried along the
run (``mbf-true``, ``mbf-true-ema``: of the sampled-label gradient), ``mbf-exact`` the
mini-blocks of ``F`` itself.

Files in ``--out`` (default ``runs/error-<dataset>-<model>``, or ``runs/error-<problem>``):

- ``error.csv``: the tidy rows (``iteration, loss, layer, method, fisher, error, scale,
  scaled_error, singular_error, clamped, fisher_norm, path``), appended after every record; a
  run recorded before ``scale`` and ``scaled_error`` existed cannot be resumed (its header
  differs);
- ``error_state.pt``: the resumable state, written atomically once a minute (or every
  ``--checkpoint-every`` iterations), at the start and at the end;
- ``run.json`` and ``error.png``/``.pdf`` (one panel per layer, smoothed: ``--metric error`` or
  ``scaled`` solid, the singular values' error dashed).

``--resume --out DIR`` continues a run with its saved settings (a larger ``--iterations``
extends it); every recorded iteration appears once.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mbf_analysis.cli.choices import AUTOENCODERS, DATASETS, MODELS, PROBLEM_DATA
from mbf_analysis.cli.common import (
    DEFAULT_MODEL,
    UsageError,
    add_code_activation,
    add_data_dir,
    add_download,
    add_out,
    add_threads,
    apply_threads,
    csv_list,
    fisher_kind,
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
from mbf_analysis.fisher_kinds import OLD_SPELLINGS

CSV_NAME = "error.csv"
STATE_NAME = "error_state.pt"
FIGURE_NAME = "error"
OUTPUTS = (CSV_NAME, *state_outputs(STATE_NAME), f"{FIGURE_NAME}.png", f"{FIGURE_NAME}.pdf")

APPROXIMATED = (
    "kfac",
    "kpsvd",
    "deflation",
    "lanczos",
    "kfac-corrected",
    "mbf",
    "mbf-true",
    "mbf-ema",
    "mbf-true-ema",
    "mbf-exact",
    "bdf",
)
"""Methods with a matrix (:data:`mbf_analysis.analysis.APPROXIMATED`; a test keeps them equal)."""

MLP_PROBLEMS = ("mlp-digits", "mnist-ae", "curves-ae", "faces-ae")
"""The training problems whose networks are Linear layers only (the methods' domain)."""

DEFAULTS: dict[str, Any] = {
    "preset": None,
    "problem": None,
    "code_activation": None,
    "dataset": "digits",
    "model": None,
    "methods": ["kfac", "kpsvd", "deflation", "lanczos", "kfac-corrected", "mbf", "mbf-exact"],
    "fisher": "mc",
    "trajectory": "adam",
    "lr": 1e-3,
    "iterations": 300,
    "every": 10,
    "batch_size": 256,
    "fisher_batch_size": None,
    "layers": None,
    "seed": 0,
    "dtype": "float64",
}
"""Settings without ``--problem``: the embedded digits, offline, well under a minute."""

PROBLEM_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist-ae": {"batch_size": 512, "iterations": 2500, "dtype": "float32"},
    "curves-ae": {"batch_size": 512, "iterations": 2500, "dtype": "float32"},
    "faces-ae": {"batch_size": 512, "iterations": 2500, "dtype": "float32"},
    "mlp-digits": {},
}
"""``--problem``: the paper's setting for the autoencoders (batch 512, one-sample MC Fisher,
Adam at lr 1e-3, float32 training); explicit options override it."""

PAPER_PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    "kpsvd-paper": {
        "problem": ("mnist-ae", "the paper's MNIST autoencoder (784-1000-500-250-30-...-784)"),
        "code_activation": (
            "relu",
            "the paper's public code puts a ReLU after the code layer (apps/mlp_cnn/models.py; "
            "METHODS.md §6.6)",
        ),
        "layers": (["fc5"], "the layer of the paper's error figure (30 → 250)"),
        "iterations": (2500, "the length of the paper's figure"),
        "every": (10, "ours: 250 records along the run"),
        "batch_size": (512, "the paper's autoencoder batch (as --problem mnist-ae)"),
        "fisher": ("mc", "the paper's Fisher: one label sampled from the model per input"),
        "trajectory": ("adam", "the paper's trajectory: Adam"),
        "lr": (1e-3, "the paper's Adam learning rate"),
        "dtype": ("float32", "ours: float32 training, as --problem mnist-ae"),
    },
}
"""``--preset``: a paper's setting in one flag, each value with where it comes from (printed)."""

SETTINGS = tuple(DEFAULTS)

METRICS = {"error": "error", "scaled": "scaled_error"}
"""``--metric`` → the column the figure draws."""
SUMMARY = ("error", "scaled_error", "scale")
"""The medians the summary prints under each layer."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``error`` on the subcommand parsers."""
    parser = sub.add_parser(
        "error",
        help="how well each method's matrix approximates the Fisher, along a training run",
        description="Train the network with a torch optimizer (--trajectory, default adam) and "
        "record every --every iterations, per Linear layer and method, the relative error "
        "‖F − F̂‖_F / ‖F‖_F of the method's one-shot matrix (mbf-ema, mbf-true-ema: MBF's EMA "
        "carried along the run) against that batch's Fisher of the kind --fisher, the "
        "scale-free error min_α ‖F − αF̂‖_F / ‖F‖_F with its α, and the relative error of the "
        "leading singular values (the Kronecker-SVD paper's figure). Writes error.csv "
        "(appended as it runs), error_state.pt, run.json and error.png/.pdf. Without options "
        "it runs on the embedded digits data.",
    )
    parser.add_argument(
        "--problem",
        choices=MLP_PROBLEMS,
        default=None,
        help="a training problem (its data, network and loss); mnist-ae: the paper's setting "
        "(batch 512, one-sample MC Fisher)",
    )
    add_code_activation(parser)
    parser.add_argument(
        "--preset",
        choices=sorted(PAPER_PRESETS),
        default=None,
        help="a paper's setting in one flag; kpsvd-paper: the Kronecker-SVD paper's figure "
        "(mnist-ae with a ReLU after the code layer, fc5, Adam 1e-3, 2500 iterations, batch "
        "512, MC Fisher); explicit options override it; the run prints where each value "
        "comes from",
    )
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="data set (digits)")
    parser.add_argument(
        "--model", choices=MODELS, default=None, help="network (default: the data set's)"
    )
    add_data_dir(parser)
    add_download(parser)
    parser.add_argument(
        "--methods",
        type=csv_list,
        default=None,
        help=f"comma-separated, from {', '.join(APPROXIMATED)} "
        f"(default: {','.join(DEFAULTS['methods'])}; bdf is 0 by construction)",
    )
    parser.add_argument(
        "--fisher",
        type=fisher_kind,
        choices=["mc", "empirical", "exact"],
        default=None,
        help="the Fisher of the reference and of every method: mc (Monte-Carlo: one label "
        "sampled from the model per input, the papers' 'true Fisher'), empirical (real labels) "
        "or exact (closed form) (default: mc; 'true' is read as mc, deprecated)",
    )
    parser.add_argument(
        "--trajectory",
        default=None,
        help="the torch.optim optimizer that trains the network, e.g. adam, sgd (default: adam)",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=None, help="its learning rate (default: 1e-3)"
    )
    parser.add_argument(
        "--iterations", type=positive_int, default=None, help="training iterations (300)"
    )
    parser.add_argument(
        "--every", type=positive_int, default=None, help="iterations between records (10)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="training minibatch (256)"
    )
    parser.add_argument(
        "--fisher-batch-size",
        type=positive_int,
        default=None,
        help="samples of the minibatch the errors are computed on (default: all)",
    )
    parser.add_argument(
        "--layers", type=csv_list, default=None, help="Linear layers recorded (default: all)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed (default: 0)")
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default=None, help="precision (float64)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--metric",
        choices=list(METRICS),
        default="error",
        help="what the figure draws: error, ‖F − F̂‖_F/‖F‖_F, or scaled, the scale-free "
        "min_α ‖F − αF̂‖_F/‖F‖_F (default: error; the CSV has both)",
    )
    add_threads(parser)
    add_out(parser, resumable=True, default="default: runs/error-<problem or data-model>")
    add_recording_options(parser, state_name=STATE_NAME, smoothing=5, unit="records")
    parser.set_defaults(run=run)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in SETTINGS if getattr(args, key) is not None}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the problem's, then the explicit options."""
    settings = dict(DEFAULTS)
    if args.preset is not None:
        if args.problem is not None or args.dataset is not None or args.model is not None:
            raise UsageError(
                f"--preset {args.preset} sets the problem; drop --problem/--dataset/--model"
            )
        settings.update({key: value for key, (value, _) in PAPER_PRESETS[args.preset].items()})
        settings["dataset"] = PROBLEM_DATA[settings["problem"]]
        settings.update(_given(args))
        return _checked(settings)
    if args.problem is not None:
        if args.dataset is not None or args.model is not None:
            raise UsageError("--problem sets the data and the network; drop --dataset/--model")
        settings.update(PROBLEM_DEFAULTS[args.problem])
        settings["dataset"] = PROBLEM_DATA[args.problem]
    settings.update(_given(args))
    return _checked(settings)


def _checked(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings, refused in one line when they do not fit together."""
    unknown = [m for m in settings["methods"] if m not in APPROXIMATED]
    if unknown or not settings["methods"]:
        raise UsageError(
            f"--methods {','.join(settings['methods'])}: unknown {', '.join(unknown) or 'empty'}; "
            f"choose from {', '.join(APPROXIMATED)}"
        )
    if settings["seed"] < 0:
        raise UsageError(f"--seed {settings['seed']}: must be 0 or more")
    if settings["code_activation"] is not None and settings["problem"] not in AUTOENCODERS:
        raise UsageError(
            "--code-activation applies to the autoencoder problems: give --problem "
            f"{' or '.join(AUTOENCODERS)}"
        )
    fisher_batch = settings["fisher_batch_size"]
    if fisher_batch is not None and fisher_batch > settings["batch_size"]:
        raise UsageError(
            f"--fisher-batch-size {fisher_batch} exceeds --batch-size {settings['batch_size']}"
        )
    return settings


def _default_out(settings: dict[str, Any]) -> Path:
    if settings["problem"] is not None:
        code = settings["code_activation"]
        suffix = "" if code is None else f"-{code}-code"
        return Path("runs") / f"error-{settings['problem']}{suffix}"
    model = settings["model"] or DEFAULT_MODEL.get(settings["dataset"], "model")
    return Path("runs") / f"error-{settings['dataset']}-{model}"


def _problem_parts(settings: dict[str, Any], data_folder: str | None, device: str):
    """The data set, the seeded model and the likelihood loss module; targets as a function of
    the inputs and labels (an autoencoder's are its inputs, flattened)."""
    import torch
    from torch import nn

    from mbf_analysis.cli.common import check_layers, dataset_and_model
    from mbf_analysis.data import load_dataset
    from mbf_analysis.models import build_model
    from mbf_analysis.training import get_problem

    dtype = getattr(torch, settings["dtype"])
    if settings["problem"] is None:
        args = argparse.Namespace(
            **{k: settings[k] for k in ("dataset", "model", "seed", "dtype")},
            data_dir=data_folder,
            download=False,
            device=device,
        )
        dataset, model_name, model = dataset_and_model(
            args, check=lambda built: check_layers(built, settings["layers"])
        )
        return dataset, model_name, model.train(), nn.CrossEntropyLoss(), dataset.train_y
    problem = get_problem(settings["problem"]).with_code_activation(settings.get("code_activation"))
    torch.manual_seed(settings["seed"])
    model = build_model(problem.model, **problem.model_kwargs).to(device=device, dtype=dtype)
    check_layers(model, settings["layers"])
    dataset = load_dataset(problem.dataset, data_folder)
    targets = problem.targets(dataset.train_x, dataset.train_y)
    return dataset, problem.model, model.train(), problem.likelihood_loss(), targets


def _record(folder: RunFolder, settings, args, status: str, timings, data_folder) -> None:
    folder.write_record(
        {
            "status": status,
            "settings": settings,
            "data_folder": data_folder,
            "options": {
                "device": args.device,
                "threads": args.threads,
                "checkpoint_every": args.checkpoint_every,
                "smoothing": args.smoothing,
                "metric": args.metric,
            },
            "timings_s": timings,
        }
    )


def _print_preset_sources(settings: dict[str, Any], given: dict[str, Any]) -> None:
    """Say where each value of a ``--preset`` run comes from."""
    preset = settings.get("preset")
    if preset is None:
        return
    print(f"--preset {preset}:")
    for key, (value, source) in PAPER_PRESETS[preset].items():
        if key in given and given[key] != value:
            print(f"  {key} = {given[key]!r} (given; the preset's {value!r}: {source})")
        else:
            print(f"  {key} = {value!r} ({source})")


def _label(settings: dict[str, Any]) -> str | None:
    """``mnist-ae``, ``mnist-ae (relu code)``, or ``None`` without ``--problem``."""
    activation = settings.get("code_activation")
    if settings["problem"] is None or activation is None:
        return settings["problem"]
    return f"{settings['problem']} ({activation} code)"


def _current_kind(value: Any) -> Any:
    """A ``fisher`` cell of an older ``error.csv`` in today's word (``true``, which pandas read
    as the boolean ``True``, is ``mc``)."""
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return "mc"
    return value


def median_table(frame, value: str = "error"):
    """Median ``value`` per method (rows, in the run's order) and layer (columns)."""
    methods = list(dict.fromkeys(frame.method))
    layers = list(dict.fromkeys(frame.layer))
    table = frame.pivot_table(index="method", columns="layer", values=value, aggfunc="median")
    return table.reindex(index=methods, columns=layers)


def summary_table(frame):
    """The :func:`median_table` of each of :data:`SUMMARY`, side by side under each layer
    (columns ``(layer, value)``)."""
    import pandas as pd

    tables = pd.concat({value: median_table(frame, value) for value in SUMMARY}, axis=1)
    return tables.swaplevel(axis=1)[list(dict.fromkeys(frame.layer))]


def run(args: argparse.Namespace) -> None:
    """Run (or resume) the analysis; see the module docstring for the files."""
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out, the folder of the run to continue")
    given = None if args.resume else _settings(args)
    out = args.out or _default_out(given)
    folder = RunFolder(out, "error", OUTPUTS, resumable=True)
    record = folder.claim(resume=args.resume, overwrite=args.overwrite)
    if record is not None:
        saved = dict(record.get("settings") or {})
        if saved.get("fisher") in OLD_SPELLINGS:  # recorded before the kinds were renamed
            saved["fisher"] = OLD_SPELLINGS[saved["fisher"]]
            record = {**record, "settings": saved}
        settings = resumed_settings(record, folder, STATE_NAME, _given(args))
        data_dir = args.data_dir or record.get("data_folder")
    else:
        settings, data_dir = given, args.data_dir
        _print_preset_sources(settings, _given(args))
    data_folder = require_data(settings["dataset"], data_dir, args.download)
    data_folder = None if data_folder is None else str(data_folder)

    import pandas as pd
    import torch

    from mbf_analysis.analysis import (
        TRAJECTORY_COLUMNS,
        ApproximationConfig,
        ApproximationRun,
    )
    from mbf_analysis.cli.common import parse_device
    from mbf_analysis.errors import NonFiniteError
    from mbf_analysis.plotting import plot_approximation_errors, save_figure

    apply_threads(args.threads)
    start = time.perf_counter()
    device = parse_device(args.device)
    dataset, model_name, model, loss_fn, targets = _problem_parts(
        settings, data_folder, args.device
    )
    settings["model"] = model_name
    config = ApproximationConfig(
        methods=settings["methods"],
        fisher=settings["fisher"],
        iterations=settings["iterations"],
        every=settings["every"],
        batch_size=settings["batch_size"],
        fisher_batch_size=settings["fisher_batch_size"],
        optimizer=settings["trajectory"],
        lr=settings["lr"],
        layers=settings["layers"],
        seed=settings["seed"],
    )
    inputs = dataset.train_x.to(getattr(torch, settings["dtype"]))
    analysis = ApproximationRun(model, loss_fn, inputs, targets, config)
    recorder = Recorder(
        out / CSV_NAME,
        out / STATE_NAME,
        analysis,
        TRAJECTORY_COLUMNS,
        args.checkpoint_every,
        "error",
    )
    folder.add_files(CSV_NAME, STATE_NAME)
    if record is not None:
        load_state(out / STATE_NAME, analysis, device)
        previous = recorded_rows(out / CSV_NAME, TRAJECTORY_COLUMNS, analysis.iteration)
        previous["fisher"] = previous["fisher"].map(_current_kind)
        print(f"resuming {out} at iteration {analysis.iteration} of {config.iterations}")
    else:
        previous = pd.DataFrame(columns=list(TRAJECTORY_COLUMNS))
    recorder.start(previous)
    if record is None:
        recorder.save()
    remaining = max(config.iterations - analysis.iteration, 0)
    loaded = time.perf_counter()
    timings: dict[str, float] = {"load": loaded - start}
    _record(folder, settings, args, "running", timings, data_folder)
    what = _label(settings) or f"{model_name} on {dataset.name}"
    print(
        f"Fisher-approximation errors along {settings['trajectory']} (lr {config.lr:g}): {what}, "
        f"{remaining} iterations of batch {config.batch_size}, every {config.every}, "
        f"{config.fisher} Fisher, methods {','.join(config.methods)} → {out}"
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
        diverged=NonFiniteError,
        refuse_diverged=lambda err: UsageError(
            f"{err} The records before it are in {out / CSV_NAME}; lower --lr and start a new "
            "run with another --out."
        ),
    )
    frame = pd.read_csv(out / CSV_NAME)
    shown = {"error": "‖F − F̂‖/‖F‖", "scaled": "min_α ‖F − αF̂‖/‖F‖"}[args.metric]
    title = (
        f"{what}: {shown} along {settings['trajectory']} (lr {config.lr:g}), "
        f"{config.fisher} Fisher, batch {config.fisher_batch_size or config.batch_size}"
    )
    fig = plot_approximation_errors(
        frame, smoothing=args.smoothing, title=title, value=METRICS[args.metric]
    )
    png, pdf = save_figure(fig, out / FIGURE_NAME)
    folder.add_files(png, pdf)
    timings["plot"] = time.perf_counter() - done
    _record(folder, settings, args, "complete", timings, data_folder)
    losses = frame.groupby("iteration")["loss"].first()
    print(
        f"median relative error ‖F − F̂‖_F/‖F‖_F, scale-free scaled_error "
        f"‖F − scale·F̂‖_F/‖F‖_F and scale = ⟨F, F̂⟩/‖F̂‖²_F over {len(losses)} records "
        f"(loss {losses.iloc[0]:.4g} → {losses.iloc[-1]:.4g}):"
    )
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(summary_table(frame).to_string())
    clamped = frame.groupby("method").clamped.sum()
    clamped = clamped[clamped > 0]
    if len(clamped):
        shown = ", ".join(f"{m} {int(c)}" for m, c in clamped.items())
        print(f"rank-2 inverses clamped denominators at the floor (not positive definite): {shown}")
    print(
        f"{per_iteration_text(timings)}; wrote {out / CSV_NAME}, "
        f"{out / STATE_NAME}, {folder.record_path}, {png.name}, {pdf.name}"
    )
