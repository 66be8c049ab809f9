"""Time per training step of the Kronecker-SVD family relative to KFAC on its schedule.

Issue #9's step-time measurement: the MNIST autoencoder (784-1000-500-250-30-250-500-1000-784,
BCE summed over pixels, METHODS.md §6.1's setting), minibatch ``--batch-size`` (512, the
Koroko et al. papers'), float32, ``torch.set_num_threads(--threads)`` (1), through the real
training path: :func:`mbf_analysis.training.train` with ``max_steps``, each optimizer at its
preset (``--presets ours``): the family, ``kfac-two-level`` (coarse space ``nicolaides``) and
the reference ``kfac-koroko`` (the registry KFAC) on Koroko et al.'s schedule (curvature and
inverse every 100 steps, Fisher batch ``m/4``, momentum 0.9, EMA 0.95, KL clip 0.01, through
:class:`~mbf_analysis.optim.MethodOptimizer`), and for scale the fast ``kfac`` (the MBF paper's
``T1 = 1``, ``T2 = 20``), ``mbf``, ``adam`` and ``sgdm``. ``NAME:four`` is a rank-2 method
with its split form switched off (``low_rank_apply=False``: every step applies the
four-product form), for the saving side by side. Any other optimizer name of
:func:`~mbf_analysis.training.train` works in ``--optimizers`` too, e.g. the coarse spaces of
two-level KFAC (``kfac-two-level-<coarse>``: issue #10's step times, written to
``results_two_level_training.md``; ``benchmarks/RESULTS.md`` has the command).

**What is timed.** The log's step rows carry the run's training clock (``process_time``: CPU
seconds, the clock the papers timed; evaluations, MBF's warm start and the optimizer's
construction are outside it). A step's duration is the difference of consecutive rows. Each
run takes ``--steps + 1`` steps; the first (cold caches, first allocation, the first power
iterations from KFAC's ``G``) is dropped, and the amortized time per step is the mean over
steps ``2 … --steps + 1``, i.e. optimizer steps ``k = 1 … --steps``: with ``--steps`` a multiple
of 100 every run holds the same ``--steps / 100`` curvature-and-inverse steps (``k ≡ 0 mod
100``), all warm-started from averaged factors as in a long run. The table also gives the
median of the curvature steps (``k ≡ 0`` mod the optimizer's inverse period: 100 for the
schedule of Koroko et al., 20 for the fast ``kfac`` and ``mbf``) and of the other steps.

**Side by side.** One process, ``--rounds`` rounds, the optimizers in a rotated order each
round; every round runs every optimizer from the same seed (same initial weights and
batches). Ratios are per round to ``kfac-koroko`` of the same round; the table gives their
median and spread over the rounds. A run that diverges is reported as such (its steps up to
the divergence are still timed).

**Section 2: the rank-2 inverse applied, split against four products** (``--apply-updates``).
A rank-2 method's ordinary step preconditions with ``K_g [(K_gᵀ M K_a) ⊘ denom] K_aᵀ``: four
products, twice KFAC's two. Its split form (``low_rank_apply``,
:func:`~mbf_analysis.methods.kronecker_svd.split_rank2_inverse`) is KFAC's two products plus a
correction through the ``p`` rows and ``q`` columns of ``C = 1 ⊘ denom − 1`` that are not zero;
``p``, ``q`` grow with the rank of the averaged second pair, at most ``m_F = 128`` per curvature
update. Each rank-2 method is updated ``j`` times (the paper's EMA, periods 1) on ``j`` Fisher
batches of 128 real training images at the initial weights (batch ``i`` = images
``128 i … 128 i + 127`` of a seed-0 permutation); after update ``j`` in the list, the three
applications to a random ``[g, a]`` matrix per layer are timed over the 8 layers (interleaved,
median of ``--apply-rounds``), as ratios to KFAC's ``P_g M P_a`` with the same ``P``.

**Profile** (``--profile NAME[,NAME]``): instead of the sections above, one
``train(..., max_steps=--steps + 1)`` run per name under :mod:`cProfile`, printing the functions
with the largest cumulative process time (``--profile-top``). Names as in
``--optimizers`` (``NAME:four``).

Run serialized with the other helpers' timings::

    flock /tmp/mbf-timing.lock env OMP_WAIT_POLICY=PASSIVE \\
        python benchmarks/bench_kronecker_training.py --rounds 3 --steps 300

Writes the table to ``--out`` (``benchmarks/results_kronecker_training.md``) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import datetime
import io
import logging
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from mbf_analysis import methods
from mbf_analysis.curvature.collect import collect
from mbf_analysis.data import load_dataset
from mbf_analysis.linalg import apply_rank2_kron_inverse
from mbf_analysis.methods.kronecker_svd import SplitRank2Inverse, apply_split_rank2_inverse
from mbf_analysis.models import mnist_autoencoder
from mbf_analysis.training import PRESETS, TrainingDiverged, get_preset, get_problem, train

ROOT = Path(__file__).resolve().parents[1]
_BESIDE_REPO = ROOT.parent / "shared" / "data"
DATA = _BESIDE_REPO if _BESIDE_REPO.is_dir() else Path("/work/shared/data")
REFERENCE = "kfac-koroko"
OPTIMIZERS = (
    REFERENCE,
    "kpsvd",
    "deflation",
    "deflation:four",
    "lanczos",
    "lanczos:four",
    "kfac-corrected",
    "kfac-corrected:four",
    "kfac-two-level",
    "kfac",
    "mbf",
    "adam",
    "sgdm",
)
TARGETS = {"kpsvd": 1.1, "kfac-corrected": 1.3, "deflation": 1.4, "lanczos": 1.9}
"""Koroko et al. (2022)'s time per step relative to KFAC, the issue's targets."""

logger = logging.getLogger("bench_kronecker_training")


def step_times(log: pd.DataFrame, steps: int, period: int | None) -> dict[str, float]:
    """Amortized and per-phase step durations (seconds) of one run's log.

    Args:
        log: The run's log (:data:`~mbf_analysis.training.LOG_COLUMNS`).
        steps: Timed steps: rows ``2 … steps + 1`` (optimizer steps ``k = 1 … steps``).
        period: The optimizer's inverse period (``None``: no curvature steps).

    Returns:
        ``{"mean", "curvature", "other", "wall_mean", "timed"}``: the mean process time per
        timed step, the medians of the curvature steps (``k ≡ 0 mod period``; NaN without)
        and of the others, the mean wall time per timed step, and how many steps were timed
        (fewer than ``steps`` after a divergence).
    """
    rows = log[log.kind == "step"].sort_values("step")
    cpu = rows.process_time.diff()
    wall = rows.wall_time.diff()
    k = rows.step - 1
    timed = (k >= 1) & (k <= steps)
    cpu, wall, k = cpu[timed], wall[timed], k[timed]
    curvature = (k % period == 0) if period else pd.Series(False, index=k.index)
    return {
        "mean": float(cpu.mean()),
        "curvature": float(cpu[curvature].median()) if curvature.any() else float("nan"),
        "other": float(cpu[~curvature].median()),
        "wall_mean": float(wall.mean()),
        "timed": int(timed.sum()),
    }


def run_one(spec: str, args: argparse.Namespace, dataset) -> tuple[dict[str, float], str]:
    """One run of ``spec`` (:func:`variant`); returns its step times and status."""
    started = time.perf_counter()
    try:
        with variant(spec) as name:
            log = train(
                "mnist-ae",
                name,
                max_steps=args.steps + 1,
                batch_size=args.batch_size,
                budget_clock="process",
                seed=args.seed,
                dataset=dataset,
                eval_samples=args.eval_samples,
                progress=False,
            )
        status = "ok"
    except TrainingDiverged as err:
        log, status = err.log, "diverged"
    period = get_preset("mnist-ae", spec.partition(":")[0]).inverse_period
    times = step_times(log, args.steps, period)
    logger.info(
        "%-20s %.1f ms/step (curvature %.0f ms, other %.1f ms), %s, %.0f s wall",
        spec,
        1e3 * times["mean"],
        1e3 * times["curvature"],
        1e3 * times["other"],
        status,
        time.perf_counter() - started,
    )
    return times, status


@contextlib.contextmanager
def variant(spec: str):
    """``NAME`` or ``NAME:four`` (the rank-2 split form off: ``low_rank_apply=False`` in the
    preset's options while the block runs); yields ``NAME``."""
    name, _, kind = spec.partition(":")
    if kind not in ("", "four"):
        raise ValueError(f"unknown variant {spec!r}: use NAME or NAME:four")
    if not kind:
        yield name
        return
    key = ("mnist-ae", name)
    saved = PRESETS[key]
    if kind == "four":
        PRESETS[key] = dataclasses.replace(
            saved, options={**saved.options, "low_rank_apply": False}
        )
    try:
        yield name
    finally:
        PRESETS[key] = saved


def profile(args: argparse.Namespace, dataset) -> str:
    """``--profile``: cProfile of one run per name (module docstring)."""
    out = []
    for spec in args.profile.split(","):
        profiler = cProfile.Profile(time.process_time)
        with variant(spec) as name:
            profiler.enable()
            train(
                "mnist-ae",
                name,
                max_steps=args.steps + 1,
                batch_size=args.batch_size,
                seed=args.seed,
                dataset=dataset,
                eval_samples=args.eval_samples,
                progress=False,
            )
            profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(args.profile_top)
        out.append(f"### {spec}, {args.steps + 1} steps\n\n```\n{stream.getvalue()}```\n")
    return "\n".join(out)


def _seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench_apply(args: argparse.Namespace, dataset) -> list[dict]:
    """Section 2 (module docstring): rank-2 application, split and four products, vs KFAC's."""
    counts = sorted({int(j) for j in args.apply_updates.split(",") if j})
    problem = get_problem("mnist-ae")
    torch.manual_seed(args.seed)
    model = mnist_autoencoder()
    order = torch.randperm(len(dataset.train_x), generator=torch.Generator().manual_seed(0))
    loss = problem.likelihood_loss()
    rows = []
    for name in ("deflation", "lanczos", "kfac-corrected"):
        method = methods.get(
            name, damping=0.3, fisher="mc", stat_period=1, inverse_period=1, decay=0.95
        )
        gen = torch.Generator().manual_seed(args.seed)
        for j in range(1, counts[-1] + 1):
            x = dataset.train_x[order[128 * (j - 1) : 128 * j]].flatten(1).float()
            stats = collect(model, loss, x, problem.targets(x, None), method.needs, generator=gen)
            method.update(stats)
            if j not in counts:
                continue
            slots = [method.state[layer] for layer in method.diagnostics()]
            mats = [torch.randn(slot["G1"].shape[0], slot["A1"].shape[0]) for slot in slots]
            rank1 = [
                (slot["p_g"], slot["p_a"])
                if "corr" in slot
                else (slot["k_g"] @ slot["k_g"].T, slot["k_a"] @ slot["k_a"].T)
                for slot in slots
            ]

            def kfac(rank1=rank1, mats=mats):
                for (p_g, p_a), mat in zip(rank1, mats, strict=True):
                    p_g @ mat @ p_a

            def four(slots=slots, mats=mats):
                for slot, mat in zip(slots, mats, strict=True):
                    apply_rank2_kron_inverse((slot["k_a"], slot["k_g"], slot["denom"], 0), mat)

            def split(slots=slots, mats=mats):
                for slot, mat in zip(slots, mats, strict=True):
                    if "corr" in slot:
                        fields = SplitRank2Inverse(*(slot[k] for k in SplitRank2Inverse._fields))
                        apply_split_rank2_inverse(fields, mat)
                    else:
                        apply_rank2_kron_inverse((slot["k_a"], slot["k_g"], slot["denom"], 0), mat)

            ops = {"kfac": kfac, "four": four, "split": split}
            for fn in ops.values():
                fn()
            times = {key: [] for key in ops}
            for r in range(args.apply_rounds):
                for key in list(ops) if r % 2 == 0 else list(ops)[::-1]:
                    times[key].append(_seconds(ops[key]))
            split_layers = [slot for slot in slots if "corr" in slot]
            kfac_time = statistics.median(times["kfac"])
            rows.append(
                {
                    "method": name,
                    "updates": j,
                    "split layers": f"{len(split_layers)}/{len(slots)}",
                    "p": sum(slot["corr"].shape[0] for slot in split_layers),
                    "q": sum(slot["corr"].shape[1] for slot in split_layers),
                    "g": sum(slot["G1"].shape[0] for slot in slots),
                    "a": sum(slot["A1"].shape[0] for slot in slots),
                    "kfac ms": 1e3 * kfac_time,
                    "four ms": 1e3 * statistics.median(times["four"]),
                    "split ms": 1e3 * statistics.median(times["split"]),
                }
            )
            logger.info("apply: %s after %d updates: %s", name, j, rows[-1])
    return rows


def render_apply(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """Section 2 as markdown."""
    lines = [
        "",
        "## 2. The rank-2 inverse applied: split form against four products",
        "",
        f"`--apply-updates {args.apply_updates}`, median of {args.apply_rounds} interleaved "
        "rounds, process time, the 8 layers of the MNIST autoencoder at its initial weights "
        "after `updates` curvature updates on Fisher batches of 128 real images (λ = 0.3, EMA "
        "min(1 − 1/j, 0.95)). `p`, `q`: rows and columns of the correction summed over the "
        "layers that use the split form (of `g`, `a` in all); `kfac`: KFAC's two products with "
        "the same `P_g = G₁'⁻¹`, `P_a = A₁'⁻¹`. `split / four` is the saving "
        "on an ordinary step's preconditioning.",
        "",
        "| method | updates | split layers | p / g | q / a | kfac ms | four products ms "
        "| split ms | split / four | split / kfac |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['updates']} | {row['split layers']} | "
            f"{row['p']} / {row['g']} | {row['q']} / {row['a']} | {row['kfac ms']:.1f} | "
            f"{row['four ms']:.1f} | {row['split ms']:.1f} | "
            f"{row['split ms'] / row['four ms']:.2f} | {row['split ms'] / row['kfac ms']:.2f} |"
        )
    return lines


def render(results: dict[str, list[dict]], status: dict[str, str], args, load) -> str:
    """The markdown results file."""
    ref = results[REFERENCE]
    sgdm = results.get("sgdm")
    lines = [
        "# Time per training step relative to KFAC on the same schedule, MNIST autoencoder "
        "(issues #9, #10)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average at start "
        f"{' '.join(f'{v:.1f}' for v in load[0])}, at end "
        f"{' '.join(f'{v:.1f}' for v in load[1])}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- setting: `train('mnist-ae', name, max_steps={args.steps + 1}, "
        f"batch_size={args.batch_size}, seed={args.seed})`, float32, presets `ours`; "
        f"{args.rounds} round(s), optimizers in a rotated order per round; timed: optimizer "
        f"steps k = 1 … {args.steps} (the first step dropped), process time (CPU seconds) from "
        "the log's step rows.",
        "",
        f"`ratio` is the median over rounds of the per-round ratio of the mean time per step "
        f"to `{REFERENCE}` (the registry KFAC on the same schedule as the family: curvature and "
        "inverse every 100 steps, so the timed steps hold "
        f"{args.steps // 100} curvature steps each); `target` is Koroko et al. (2022)'s ratio. "
        "`curvature`: median of the steps that refresh the curvature and inverse (every 100 "
        "steps for the schedule of Koroko et al., every 20 (inverse; statistics every step) for "
        "`kfac` and `mbf`); `other`: median of the remaining steps. `vs sgdm`: ratio to SGD-m.",
        "",
        "| optimizer | ratio to kfac-koroko | spread | target | ms/step | curvature step ms "
        "| other step ms | vs sgdm | wall ms/step | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, runs in results.items():
        ratios = [r["mean"] / q["mean"] for r, q in zip(runs, ref, strict=True)]
        vs_sgdm = "—"
        if sgdm:
            pairs = zip(runs, sgdm, strict=True)
            vs_sgdm = f"{statistics.median(r['mean'] / s['mean'] for r, s in pairs):.2f}"
        target = TARGETS.get(name.partition(":")[0])
        curvature = statistics.median(r["curvature"] for r in runs)
        lines.append(
            f"| {name} | {statistics.median(ratios):.2f} | "
            f"{min(ratios):.2f}–{max(ratios):.2f} | {'' if target is None else f'≤ {target}'} | "
            f"{1e3 * statistics.median(r['mean'] for r in runs):.1f} | "
            f"{'—' if curvature != curvature else f'{1e3 * curvature:.0f}'} | "
            f"{1e3 * statistics.median(r['other'] for r in runs):.1f} | {vs_sgdm} | "
            f"{1e3 * statistics.median(r['wall_mean'] for r in runs):.1f} | {status[name]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median over them)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run (300)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-samples", type=int, default=512, help="evaluation subset (outside the clock)"
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated")
    parser.add_argument(
        "--apply-updates",
        default="1,2,4,8,12",
        help="section 2: curvature updates after which to time the rank-2 application ('' off)",
    )
    parser.add_argument("--apply-rounds", type=int, default=7, help="section 2 rounds")
    parser.add_argument("--skip-training", action="store_true", help="section 2 only")
    parser.add_argument("--profile", default="", help="NAME[:four],...: cProfile runs instead")
    parser.add_argument("--profile-top", type=int, default=40)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results_kronecker_training.md"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.optimizers.split(",") if n]
    if REFERENCE not in names:
        parser.error(f"--optimizers must include the reference {REFERENCE!r}")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mbf_analysis").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    dataset = load_dataset("mnist", args.data_dir)
    if args.profile:
        text = profile(args, dataset)
        sys.stdout.write(text)
        args.out.write_text(text)
        return
    load_start = os.getloadavg()
    results: dict[str, list[dict]] = {n: [] for n in names}
    status = dict.fromkeys(names, "ok")
    apply_rows = bench_apply(args, dataset) if args.apply_updates else []
    for r in range(0 if args.skip_training else args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times, state = run_one(name, args, dataset)
            results[name].append(times)
            if state != "ok":
                status[name] = state
        logger.info("round %d/%d done", r + 1, args.rounds)
    load = (load_start, os.getloadavg())
    text = render(results, status, args, load) if not args.skip_training else ""
    text += "\n".join(render_apply(apply_rows, args)) + "\n" if apply_rows else ""
    sys.stdout.write(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
