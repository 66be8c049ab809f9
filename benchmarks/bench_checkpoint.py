"""Size and write time of a training checkpoint (issue #13): ResNet32 with MBF, and the others.

What is measured: the checkpoint that ``mbf_analysis.training.train`` writes for a run of
``resnet32-cifar10`` (the paper's preset of each optimizer: MBF ``T1 = 10``, ``T2 = 100``,
batch 128, float32) after one real step, when every state tensor exists: the model, the
optimizer's ``state_dict``, the data order (a 50 000-index permutation), the generators and the
clocks (:mod:`mbf_analysis.training.checkpoint`). The batch is random (no CIFAR files needed:
the sizes and costs do not depend on the pixels). The write is :func:`save_checkpoint`
(``torch.save`` to a temporary file, ``fsync``, rename, after moving the last one aside); the
time is the median of ``--repeats`` writes, each to the same folder, so every write but the
first also replaces the previous checkpoint, as in a run.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_checkpoint.py`` (writes
``benchmarks/results_checkpoint.md``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from mbf_analysis.models import build_model
from mbf_analysis.training import get_preset, make_optimizer, run_name
from mbf_analysis.training.checkpoint import checkpoint_files, save_checkpoint

RESULTS = Path(__file__).with_name("results_checkpoint.md")


def _payload(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What ``train`` saves, in the same layout (see ``training/loop.py``)."""
    return {
        "settings": {},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": {
            "step": 1,
            "epoch": 0,
            "batch": 1,
            "seen": 128,
            "order": torch.randperm(50_000),
            "log_rows": 2,
        },
        "rng": {"batches": torch.Generator().get_state(), "torch": torch.get_rng_state()},
        "clock": {
            "wall": 0.0,
            "cpu": 0.0,
            "warm_wall": 0.0,
            "warm_cpu": 0.0,
            "durations": {},
            "last_duration": 0.0,
        },
        "status": None,
    }


def measure(optimizer_name: str, repeats: int, folder: Path) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet32").train()
    preset = get_preset("resnet32-cifar10", optimizer_name)
    optimizer = make_optimizer(optimizer_name, model, preset)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    optimizer.zero_grad()
    outputs = model(x)
    loss = nn.functional.cross_entropy(outputs, y)
    sampled = getattr(optimizer, "needs_sampled_backward", lambda: False)()
    loss.backward(retain_graph=sampled)
    if sampled:
        optimizer.sampled_backward(outputs, nn.CrossEntropyLoss())
    optimizer.step()
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    run = run_name(optimizer_name, preset, 0)
    payload = _payload(model, optimizer)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        save_checkpoint(folder, run, payload)
        times.append(time.perf_counter() - start)
    latest, _ = checkpoint_files(folder, run)
    return {
        "optimizer": optimizer_name,
        "bytes": latest.stat().st_size,
        "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "write_s": statistics.median(times),
        "steps_per_epoch": 391,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--optimizers", default="mbf,adam,sgdm,kfac,shampoo", help="comma-separated"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.optimizers.split(","):
            rows.append(measure(name, args.repeats, Path(tmp) / name))
            print(rows[-1])
    mib = 2**20
    lines = [
        "# Checkpoint size and write time, ResNet32 on CIFAR-10 (issue #13)",
        "",
        f"`OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_checkpoint.py` on {date.today()}, "
        f"{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}; "
        f"median of {args.repeats} writes (atomic: temporary file, fsync, rename) to a local "
        "disk. The model's own weights and buffers are the 'model' column.",
        "",
        "| optimizer | checkpoint (MiB) | model (MiB) | write (s) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['optimizer']} | {row['bytes'] / mib:.1f} | {row['model_bytes'] / mib:.1f} | "
            f"{row['write_s']:.3f} |"
        )
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
