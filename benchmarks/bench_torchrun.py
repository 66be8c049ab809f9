"""Steps per second of MBF training in one process against two ``torchrun`` processes (issue 22).

Cases: MBF (the ``ours`` preset) on the MNIST autoencoder (real data from ``--data-dir``, global
batch 1000) and on ResNet32 (CIFAR-10 shapes, global batch 128; random images and labels, since
no CIFAR files are available offline, and the speed of a step does not depend on the pixel
values). Each case runs three ways, each in a fresh process (group) and one at a time:

- ``1 × 2``: one process, 2 threads (the machine's cores);
- ``1 × 1``: one process, 1 thread;
- ``2 × 1``: ``torchrun --nproc-per-node 2`` with gloo, 1 thread per process, each process on
  half of every global batch (``mbf_analysis.training.distributed``).

Each way trains ``--steps`` steps (with ``eval_samples=500``; evaluations and MBF's warm start are
outside the training clock) and the rate is ``(steps − warmup) / (t_steps − t_warmup)`` from the
run's own ``wall_time`` column, so start-up, imports and the process-group set-up do not count.
Peak RSS: the largest process of the way (``ru_maxrss`` from ``os.wait4``, which covers the
processes ``torchrun`` started). Ratios are against ``1 × 2``.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_torchrun.py --data-dir ../shared/data``
(writes ``benchmarks/results_torchrun.md``). With ``--device cuda`` (``benchmarks/gpu.sh`` on a
machine with 2 GPUs): one process on one GPU against two processes on two GPUs with nccl.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).with_name("results_torchrun.md")
CASES = {
    "mnist-ae": "MBF on the MNIST autoencoder (batch 1000)",
    "resnet32": "MBF on ResNet32 (batch 128)",
}


def worker(case: str, steps: int, data_dir: str | None, log: str, device: str) -> None:
    """One training run (inside ``torchrun`` when ``WORLD_SIZE > 1``)."""
    import torch

    from mbf_analysis.data import Dataset, load_dataset
    from mbf_analysis.training import distributed, train

    world = distributed.world_from_env()
    where = torch.device(device) if world is None else distributed.start(world, device)
    try:
        if case == "mnist-ae":
            problem, dataset = "mnist-ae", load_dataset("mnist", data_dir)
        else:
            generator = torch.Generator().manual_seed(0)
            dataset = Dataset(
                name="cifar10",
                train_x=torch.rand(5000, 3, 32, 32, generator=generator),
                train_y=torch.randint(0, 10, (5000,), generator=generator),
                test_x=torch.rand(500, 3, 32, 32, generator=generator),
                test_y=torch.randint(0, 10, (500,), generator=generator),
                num_classes=10,
                input_shape=(3, 32, 32),
            )
            problem = "resnet32-cifar10"
        frame = train(
            problem,
            "mbf",
            max_steps=steps,
            dataset=dataset,
            eval_samples=500,
            device=where,
            progress=False,
        )
        if world is None or world.main:
            frame.to_csv(log, index=False)
        distributed.finish(world)
    finally:
        distributed.stop()


def _measure(command: list[str], env: dict[str, str]) -> int:
    """Run ``command``; its largest process's peak RSS in bytes (Linux ``ru_maxrss`` in KiB)."""
    process = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    return usage.ru_maxrss * 1024


def _rate(log: Path, warmup: int) -> float:
    import pandas as pd

    steps = pd.read_csv(log).query("kind == 'step'").set_index("step").wall_time
    last = steps.index.max()
    return (last - warmup) / (steps[last] - steps[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--only", choices=list(CASES), default=None)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: gloo, 1 process × 2 threads, 1 × 1, 2 × 1; cuda: nccl, 1 process on 1 GPU "
        "against 2 processes on 2 GPUs",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--worker", nargs=3, metavar=("CASE", "STEPS", "LOG"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        case, steps, log = args.worker
        worker(case, int(steps), args.data_dir, log, args.device)
        return
    script = [__file__, "--data-dir", str(args.data_dir), "--device", args.device]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    ways = {  # name → (threads per process, launcher)
        "1 × 2": (2, [sys.executable]),
        "1 × 1": (1, [sys.executable]),
        "2 × 1": (1, [*torchrun, "--nproc-per-node", "2"]),
    }
    if args.device == "cuda":
        ways = {
            "1 GPU": (2, [sys.executable]),
            "2 GPUs": (2, [*torchrun, "--nproc-per-node", "2"]),
        }
    first = next(iter(ways))
    lines = [
        "# MBF training: one process against two torchrun processes "
        f"({'nccl' if args.device == 'cuda' else 'gloo'})",
        "",
        f"{datetime.now():%Y-%m-%d}; {platform.machine()}, {os.cpu_count()} CPUs; "
        f"`OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_torchrun.py`; {args.steps} steps, "
        f"rate over steps {args.warmup}–{args.steps} from the runs' own clocks. `P × T`: P "
        "processes of T threads. Ratios against the first way.",
        "",
        "| case | way | steps/s | ratio | peak RSS per process |",
        "|---|---|---:|---:|---:|",
    ]
    for case, title in CASES.items():
        if args.only and case != args.only:
            continue
        rates = {}
        with tempfile.TemporaryDirectory() as tmp:
            for way, (threads, launcher) in ways.items():
                log = Path(tmp) / f"{case}-{way.replace(' ', '')}.csv"
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
                command = [*launcher, *script, "--worker", case, str(args.steps), str(log)]
                rss = _measure(command, env)
                rates[way] = _rate(log, args.warmup)
                row = (
                    f"| {title} | {way} | {rates[way]:.3g} | {rates[way] / rates[first]:.2f} "
                    f"| {rss / 2**20:.0f} MiB |"
                )
                print(row, flush=True)
                lines.append(row)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
