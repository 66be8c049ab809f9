"""Cost of curvature extraction, as a ratio to one plain forward + backward of the same batch.

Problems (float32, ``nn.CrossEntropyLoss``, random inputs and labels):

- ``mlp``: the 256-20-20-20-20-20-10 tanh MLP (:func:`mbf_analysis.models.paper_mlp`),
  ``N = 1000`` inputs ``[1, 16, 16]``;
- ``cnn``: the Simple CNN (:func:`mbf_analysis.models.simple_cnn`), ``N = 128`` inputs
  ``[1, 28, 28]``.

Operations, each timed against ``loss = CrossEntropyLoss()(model(x), y); loss.backward()``:

- ``per_sample_grads``, ``miniblock_fisher``, ``layer_fisher`` (our wrappers, empirical Fisher);
- ``backpack BatchGrad (raw)``: one backward inside ``backpack(BatchGrad())`` on a copy of the
  model that was extended once, outside the timing (no wrapper overhead);
- ``torch.func vmap(grad)``: per-sample gradients with ``vmap(grad(f))`` and ``functional_call``;
- with ``--exact``, ``kind="exact"`` of both Fisher wrappers on the MLP.

For the Simple CNN, ``fc1`` has 3.2M parameters: its dense block (``[d, d]``, 40 TB) and its
mini-blocks (``[1024, 3137, 3137]``, 40 GB) cannot be formed, and ``conv2``'s dense block is
``51264²`` (10.5 GB); the Fisher rows therefore name the layers they cover.

Every round times each operation once (in alternating order from round to round) together with
the plain forward + backward; the table reports the median over rounds of the per-round ratio,
so background load that drifts between rounds cancels. Short operations are repeated inside one
measurement until it lasts at least ``--min-time`` seconds.

libgomp's default wait policy makes a 2-thread torch run on a 2-core machine that other processes
also load up to 400x slower (a 1 ms MLP step took 300-430 ms here): threads of a parallel region
wait for a sibling that is descheduled. The script therefore re-executes itself with
``OMP_WAIT_POLICY=PASSIVE`` unless the variable is already set (``OMP_WAIT_POLICY=ACTIVE`` or
``--threads 1`` are the other ways out); the header records the value.

Run: ``python benchmarks/bench_curvature.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from backpack import backpack as backpack_ctx
from backpack import extend
from backpack.extensions import BatchGrad
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mbf_analysis.curvature import layer_fisher, miniblock_fisher, per_sample_grads
from mbf_analysis.curvature.memory import chunk_size_for, default_budget
from mbf_analysis.models import paper_mlp, simple_cnn

REFERENCE = "forward+backward"


@dataclass
class Problem:
    """A model, a batch, and the operations to time on it."""

    name: str
    description: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    ops: dict[str, Callable[[], object]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _plain_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        loss = loss_fn(model(x), y)
        loss.backward()

    return step


def _raw_backpack(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """BatchGrad with BackPACK's own API on an extended copy (extension not timed)."""
    extended_model = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def step() -> None:
        for p in extended_model.parameters():
            p.grad = None
        loss = loss_fn(extended_model(x), y)
        with warnings.catch_warnings(), backpack_ctx(BatchGrad()):
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()

    return step


def _functorch(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], dict[str, Tensor]]:
    """Per-sample gradients with torch.func: ``vmap(grad(f))`` over the batch."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def loss_one(params: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        out = functional_call(model, params, (xn.unsqueeze(0),))
        return loss_fn(out, yn.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step() -> dict[str, Tensor]:
        params = {n: p.detach() for n, p in model.named_parameters()}
        return per_sample(params, x, y)

    return step


def _library_chunk(model: nn.Module, n: int, rows_per_sample: int = 1) -> int:
    """The chunk size the wrappers pick from the current memory budget (it varies with load)."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return chunk_size_for(n, 2 * rows_per_sample * n_params * 4, default_budget("cpu"))


def _mlp_problem(exact: bool) -> Problem:
    torch.manual_seed(0)
    model = paper_mlp().float()
    x = torch.randn(1000, 1, 16, 16)
    y = torch.randint(0, 10, (1000,))
    ce = nn.CrossEntropyLoss()
    p = Problem("mlp", "paper MLP 256-20×5-10 tanh, N=1000, [1,16,16]", model, x, y)
    p.ops = {
        "per_sample_grads": lambda: per_sample_grads(model, ce, x, y),
        "miniblock_fisher": lambda: miniblock_fisher(model, ce, x, y),
        "layer_fisher": lambda: layer_fisher(model, ce, x, y),
        "backpack BatchGrad (raw)": _raw_backpack(model, x, y),
        "torch.func vmap(grad)": _functorch(model, x, y),
    }
    if exact:
        p.ops["miniblock_fisher exact"] = lambda: miniblock_fisher(model, ce, x, y, kind="exact")
        p.ops["layer_fisher exact"] = lambda: layer_fisher(model, ce, x, y, kind="exact")
    p.notes.append(
        f"mlp: library chunk size {_library_chunk(model, 1000)} (empirical), "
        f"{_library_chunk(model, 1000, 10)} (exact) of N=1000."
    )
    return p


def _cnn_problem() -> Problem:
    torch.manual_seed(0)
    model = simple_cnn().float()
    x = torch.randn(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    ce = nn.CrossEntropyLoss()
    mini_layers = ["conv1", "conv2", "fc2"]
    dense_layers = ["conv1", "fc2"]
    p = Problem("cnn", "Simple CNN, N=128, [1,28,28]", model, x, y)
    p.ops = {
        "per_sample_grads": lambda: per_sample_grads(model, ce, x, y),
        "miniblock_fisher (conv1,conv2,fc2)": lambda: miniblock_fisher(
            model, ce, x, y, layers=mini_layers
        ),
        "layer_fisher (conv1,fc2)": lambda: layer_fisher(model, ce, x, y, layers=dense_layers),
        "backpack BatchGrad (raw)": _raw_backpack(model, x, y),
        "torch.func vmap(grad)": _functorch(model, x, y),
    }
    p.notes.append(
        f"cnn: library chunk size {_library_chunk(model, 128)} of N=128 (from the free memory "
        "at start; fewer than N means several BackPACK passes)."
    )
    p.notes.append(
        "cnn: miniblock_fisher leaves out fc1 (mini-blocks [1024, 3137, 3137], 40 GB); "
        "layer_fisher also conv2 (dense 51264², 10.5 GB). BatchGrad still runs for all layers."
    )
    return p


def make_problems(names: list[str], exact: bool) -> list[Problem]:
    builders = {"mlp": lambda: _mlp_problem(exact), "cnn": _cnn_problem}
    return [builders[name]() for name in names]


def _timer(fn: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _repeats_for(fn: Callable[[], object], min_time: float) -> int:
    """Calls per measurement so that one lasts ``min_time``; also the first (warm-up) calls."""
    _timer(fn, 1)  # the first call includes lazy initialisation (vmap tracing, allocator)
    elapsed = _timer(fn, 1)
    if elapsed < min_time:
        elapsed = min(elapsed, *(_timer(fn, 1) for _ in range(2)))
    return 1 if elapsed >= min_time else min(200, int(min_time / max(elapsed, 1e-6)) + 1)


def bench(problem: Problem, rounds: int, warmup: int, min_time: float) -> list[dict]:
    """Interleaved timing; returns one row per operation (the reference included)."""
    reference = _plain_step(problem.model, problem.inputs, problem.targets)
    ops = {REFERENCE: reference, **problem.ops}
    repeats = {name: _repeats_for(fn, min_time) for name, fn in ops.items()}
    names = list(problem.ops)
    times: dict[str, list[float]] = {name: [] for name in ops}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        round_times = {}
        # The reference is timed before and after the operations; its round time is the mean.
        ref_before = _timer(reference, repeats[REFERENCE])
        for name in order:
            round_times[name] = _timer(ops[name], repeats[name])
        ref_after = _timer(reference, repeats[REFERENCE])
        ref = 0.5 * (ref_before + ref_after)
        if r < warmup:
            continue
        times[REFERENCE].append(ref)
        for name in names:
            times[name].append(round_times[name])
            ratios[name].append(round_times[name] / ref)
        print(
            f"  [{problem.name}] round {r - warmup + 1}/{rounds}: ref {ref * 1e3:.2f} ms",
            file=sys.stderr,
        )
    rows = [
        {
            "problem": problem.name,
            "operation": REFERENCE,
            "ratio": 1.0,
            "ms": statistics.median(times[REFERENCE]) * 1e3,
            "spread": "",
            "repeats": repeats[REFERENCE],
        }
    ]
    for name in names:
        q = sorted(ratios[name])
        rows.append(
            {
                "problem": problem.name,
                "operation": name,
                "ratio": statistics.median(q),
                "ms": statistics.median(times[name]) * 1e3,
                "spread": f"{q[0]:.3g}–{q[-1]:.3g}",
                "repeats": repeats[name],
            }
        )
    return rows


def render(rows: list[dict], problems: list[Problem], args: argparse.Namespace, cmd: str) -> str:
    lines = [
        "# Curvature extraction: cost relative to one forward + backward",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load average at start {args.load_average}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"backpack {importlib.metadata.version('backpack-for-pytorch')}, float32",
        f"- command: `{cmd}`",
        f"- {args.rounds} rounds after {args.warmup} warm-up rounds, operations interleaved "
        "(order reversed every other round); ratio = median over rounds of "
        "op time / forward+backward time of the same round; spread = min–max ratio.",
    ]
    for p in problems:
        lines.append(f"- {p.name}: {p.description}")
        lines.extend(f"- {note}" for note in p.notes)
    lines += [
        "",
        "| problem | operation | median ratio to fwd+bwd | ratio spread | median ms | repeats |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['problem']} | {row['operation']} | {row['ratio']:.2f} | {row['spread']} "
            f"| {row['ms']:.2f} | {row['repeats']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=2, help="discarded rounds before them")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--min-time", type=float, default=0.1, help="seconds per measurement (short ops repeat)"
    )
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument(
        "--exact", action="store_true", help="also kind='exact' on the MLP (adds about 1 minute)"
    )
    parser.add_argument("--out", default="benchmarks/results_curvature.md")
    args = parser.parse_args(argv)
    if "OMP_WAIT_POLICY" not in os.environ:
        # Must be set before libgomp loads, i.e. before `import torch`: start afresh.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    cmd = shlex.join([Path(sys.executable).name, *sys.argv])
    torch.set_num_threads(args.threads)
    args.load_average = " ".join(f"{v:.1f}" for v in os.getloadavg())
    problems = make_problems(args.problems, args.exact)
    rows = []
    for problem in problems:
        print(f"benchmarking {problem.name} ...", file=sys.stderr)
        rows += bench(problem, args.rounds, args.warmup, args.min_time)
    text = render(rows, problems, args, cmd)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
