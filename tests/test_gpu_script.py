"""The non-GPU parts of ``benchmarks/gpu.sh`` and ``benchmarks/bench_gpu.py``.

CUDA is hidden from the subprocesses (``CUDA_VISIBLE_DEVICES=""``), so these run the same on a
machine with a GPU:

- ``gpu.sh`` refuses with exit status 3 and a message that names the problem and the fix, and
  writes nothing; an unknown argument is exit status 2;
- ``bench_gpu.py --device cuda`` refuses the same way (argparse's exit status 2);
- ``gpu.sh --cpu-check`` selects exactly the CUDA tests (every one skips), runs
  ``bench_gpu.py --device cpu --quick`` and assembles the results file.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _run(args, tmp_path, **env):
    environ = os.environ | {
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHON": sys.executable,
        "OMP_WAIT_POLICY": "PASSIVE",
        **env,
    }
    return subprocess.run(
        args, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300
    )


def test_gpu_sh_refuses_without_cuda(tmp_path):
    results = ROOT / "benchmarks" / "results_gpu.md"
    before = results.read_bytes() if results.exists() else None
    done = _run(["bash", str(SCRIPT)], tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "refused" in done.stderr and "sees no CUDA device" in done.stderr
    assert "--cpu-check" in done.stderr  # the way to check the script without a GPU
    assert (results.read_bytes() if results.exists() else None) == before
    done = _run(["bash", str(SCRIPT), "--bogus"], tmp_path)
    assert done.returncode == 2 and "usage: bash benchmarks/gpu.sh" in done.stderr


def test_bench_gpu_refuses_cuda_without_cuda(tmp_path):
    out = tmp_path / "out.md"
    done = _run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--out", str(out)], tmp_path
    )
    assert done.returncode == 2
    assert "sees no CUDA device" in done.stderr and "--device cpu" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_gpu_sh_cpu_check_selects_the_cuda_tests_and_writes_the_results(tmp_path):
    out = tmp_path / "results.md"
    done = _run(["bash", str(SCRIPT), "--cpu-check"], tmp_path, GPU_SH_OUT=str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    text = out.read_text()
    assert "selected and skipped without CUDA, as expected" in text
    skipped = re.findall(r"^- SKIPPED \[(\d+)\] (tests/\S+?):\d+: (.*)$", text, re.M)
    assert skipped and all("CUDA" in reason for _, _, reason in skipped)
    assert {path for _, path, _ in skipped} >= {"tests/test_optim_mbf.py", "tests/test_linalg.py"}
    assert "### ResNet32" in text and "| MBF | amortized |" in text and "| KFAC | inverse |" in text
    assert "- ResNet32: MBF" in text
