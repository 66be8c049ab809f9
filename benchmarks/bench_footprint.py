"""The per-sample memory estimate of a BackPACK pass against the measured peak (issue 21).

For each case (model, selected layers, Fisher kind), a fresh subprocess builds the model in
float64 and a batch of ``--chunk`` random samples, records its peak RSS (``ru_maxrss``), runs
:func:`mbf_analysis.curvature.fisher_rows` over the batch in one chunk
(``chunk_size = --chunk``), and records the peak RSS again. The measured cost of a sample is the
growth of the peak divided by the chunk; the estimate is
:func:`mbf_analysis.curvature.footprint.pass_footprint`'s total, as ``fisher_rows`` computes it
for the pass. The ratio estimate / measured must be at least 1 (an upper bound) and should stay
small (chunks not needlessly small). The rows-only estimate that sized the chunks before
(``2·r·d·itemsize``) is shown beside it.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_footprint.py`` (writes
``benchmarks/results_footprint.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).with_name("results_footprint.md")

CASES: list[tuple[str, str, str, int]] = [
    ("simple-cnn", "conv1", "empirical", 64),
    ("simple-cnn", "conv1", "exact", 64),
    ("simple-cnn", "conv1", "mc", 64),
    ("simple-cnn", "conv2", "empirical", 64),
    ("simple-cnn", "conv2", "exact", 32),
    ("simple-cnn", "conv1,conv2", "empirical", 64),
    ("simple-cnn", "conv1,conv2", "exact", 32),
    ("simple-cnn", "fc1", "empirical", 32),
    ("simple-cnn", "fc1", "exact", 8),
    ("simple-cnn", "fc2", "exact", 64),
    ("mnist-ae", "fc1,fc2", "empirical", 64),
    ("mnist-ae", "fc1,fc2", "mc", 64),
    ("resnet32", "stage1.block1.conv1", "empirical", 32),
    ("resnet32", "stage1.block1.conv1", "exact", 8),
    ("resnet32", "conv1", "exact", 8),
    ("vgg11-bn", "conv1", "exact", 8),
]

CHILD = r"""
import json, resource, sys, torch
from torch import nn
from mbf_analysis.curvature import fisher_rows
from mbf_analysis.curvature.fisher import _rows_per_sample
from mbf_analysis.curvature.footprint import pass_footprint
from mbf_analysis.curvature.backend import check_model, is_exact_chain
from mbf_analysis.models import build_model

name, layers, kind, chunk = sys.argv[1], sys.argv[2].split(","), sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
kwargs = {"in_channels": 1} if name == "resnet32" else {}
model = build_model(name, **kwargs).double().eval()
shape = (3, 32, 32) if name == "vgg11-bn" else (1, 28, 28)
x = torch.randn(chunk, *shape, dtype=torch.float64)
with torch.no_grad():
    n_out = model(x[:1]).shape[1]
y = torch.randint(0, n_out, (chunk,))
layouts = check_model(model)
selected = [layouts[n] for n in layers]
exact_backpack = kind == "exact" and is_exact_chain(model)
r = _rows_per_sample(kind, 1, n_out)
fp = pass_footprint(model, x[:1], selected, rows_per_sample=r,
                    backprop_rows=n_out if exact_backpack else 1, itemsize=8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for rows in fisher_rows(model, nn.CrossEntropyLoss(), x, y, kind=kind, layers=layers,
                        chunk_size=chunk, memory_budget=2**40):
    del rows
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": (after - before) / chunk, "estimate": fp.total,
                  "rows_only": fp.rows, "backend": "backpack" if exact_backpack else "autograd"}))
"""


def measure(model: str, layers: str, kind: str, chunk: int) -> dict:
    """Run one case in a fresh process; bytes per sample, measured and estimated."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, layers, kind, str(chunk)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose model contains this")
    args = parser.parse_args()
    mib = 2**20
    lines = [
        "# Per-sample memory of a BackPACK pass: estimate against measurement",
        "",
        f"{datetime.now():%Y-%m-%d}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; float64; `OMP_WAIT_POLICY=PASSIVE python "
        "benchmarks/bench_footprint.py`. Measured: growth of the peak RSS over one "
        "`fisher_rows` pass of one chunk, divided by the chunk. Estimate: `pass_footprint`. "
        "Rows only: the factor rows alone (`2·r·d·itemsize`), which sized the chunks before.",
        "",
        "| model | layers | kind | backend | chunk | measured MiB/sample | estimate MiB/sample "
        "| estimate / measured | rows only / measured |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, layers, kind, chunk in CASES:
        if args.only not in model:
            continue
        result = measure(model, layers, kind, chunk)
        measured = result["measured"]
        row = (
            f"| {model} | {layers} | {kind} | {result['backend']} | {chunk} "
            f"| {measured / mib:.2f} | {result['estimate'] / mib:.2f} "
            f"| {result['estimate'] / measured:.2f} | {result['rows_only'] / measured:.2f} |"
        )
        print(row, flush=True)
        lines.append(row)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
