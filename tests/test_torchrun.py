"""``mbf-analyze train`` under ``torchrun`` (2 CPU processes, gloo) against one process (issue 22).

Each test starts real ``torchrun`` jobs (``python -m torch.distributed.run --standalone``) on the
embedded digits, in float64 with one thread per process, so that the two-process runs can be
compared with the one-process run to rounding.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--problem", "mlp-digits", "--dtype", "float64", "--no-progress"]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "MBF_DIST_TIMEOUT": "60",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def _torchrun(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(processes), "-m", "mbf_analysis", *args]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)


def _one(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mbf_analysis", *args]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)


def _steps(folder: Path) -> pd.DataFrame:
    log = pd.read_csv(folder / "train_log.csv")
    return log[log.kind == "step"].set_index(["optimizer", "step"]).sort_index()


def test_two_processes_follow_the_one_process_run_with_one_writer(tmp_path):
    """Every optimizer kind: plain (SGD-m, Adam), gradient statistics (MBF, Shampoo), all-reduced
    factors with sampled labels (KFAC, the paper's true-Fisher form), a gathered Fisher batch
    (KPSVD, the generic front-end)."""
    optimizers = "sgdm,adam,mbf,shampoo,kfac,kpsvd"
    args = [*TRAIN, "--optimizer", optimizers, "--max-steps", "12"]
    one = _one([*args, "--out", "one"], tmp_path)
    two = _torchrun([*args, "--out", "two"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert a.index.equals(b.index) and len(a) == 6 * 12
    assert ((a.loss - b.loss).abs() / a.loss.abs()).max() < 1e-12
    logs = [pd.read_csv(tmp_path / d / "train_log.csv") for d in ("one", "two")]
    assert len(logs[0]) == len(logs[1])  # one writer: no row twice
    evals = [log[log.kind == "eval"].train_loss.to_numpy() for log in logs]
    assert abs(evals[0] - evals[1]).max() < 1e-12
    assert two.stdout.count("mlp-digits, seed 0:") == 1  # only rank 0 prints
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["processes"]["world_size"] == 2 and record["processes"]["backend"] == "gloo"
    assert "rank 0" in record["processes"]["writes_and_evaluates"]
    assert json.loads((tmp_path / "one" / "run.json").read_text())["processes"] == {"world_size": 1}


def test_a_resume_continues_bit_for_bit_with_the_same_number_of_processes(tmp_path):
    args = [*TRAIN, "--optimizer", "kfac,mbf"]
    straight = _torchrun([*args, "--max-steps", "16", "--out", "straight"], tmp_path)
    first = _torchrun([*args, "--max-steps", "8", "--out", "parts"], tmp_path)
    for done in (straight, first):
        assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-1500:]
    resumed = _torchrun(["train", "--resume", "--out", "parts", "--max-steps", "16"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _steps(tmp_path / "straight"), _steps(tmp_path / "parts")
    assert a.index.equals(b.index)
    assert (a.loss == b.loss).all()

    alone = _one(["train", "--resume", "--out", "parts", "--max-steps", "24"], tmp_path)
    assert alone.returncode == 2
    assert "was trained by 2 process(es) and this resume has 1; resume it with 2" in alone.stderr


def test_a_global_batch_that_does_not_divide_is_refused_in_one_line(tmp_path):
    done = _torchrun([*TRAIN, "--batch-size", "99", "--max-steps", "2", "--out", "x"], tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("mbf-analyze")]
    assert errors == [
        "mbf-analyze: error: --batch-size 99 (the global batch) does not divide among the 2 "
        "processes of this torchrun job; give a multiple of 2"
    ]


def test_an_analysis_runs_on_rank_0_alone(tmp_path):
    done = _torchrun(["fisher", "--batch-size", "16", "--out", "f"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 1 of a torchrun job exits; rank 0 runs the analysis alone" in done.stderr
    assert done.stdout.count("wrote ") == 1
    written = sorted(p.name for p in (tmp_path / "f").iterdir() if not p.name.startswith("."))
    assert written == ["fisher_summary.csv", "run.json"]


def _rank_pids(agent: int) -> dict[int, int]:
    """RANK → pid of the worker processes that the torchrun agent ``agent`` started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent:
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_killed_rank_stops_the_job_and_the_checkpoint_stays_good(tmp_path):
    args = [*TRAIN, "--optimizer", "mbf", "--epochs", "1000", "--checkpoint-every", "5"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "mbf_analysis", *args, "--out", "k"]
    job = subprocess.Popen(
        command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    checkpoints = tmp_path / "k" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*.pt")) or len(_steps(tmp_path / "k")) < 12:
        assert job.poll() is None and time.monotonic() < deadline, "the job did not start"
        time.sleep(0.5)
    os.kill(_rank_pids(job.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    job.communicate(timeout=90)
    assert job.returncode != 0 and time.monotonic() - killed < 60
    (path,) = [p for p in checkpoints.glob("*.pt") if ".prev" not in p.name]
    saved = torch.load(path, weights_only=True)
    step = int(saved["position"]["step"])
    assert step >= 5 and saved["settings"]["world_size"] == 2
    resumed = _torchrun(["train", "--resume", "--out", "k", "--max-steps", str(step + 3)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = _steps(tmp_path / "k")
    assert log.index.is_unique and log.index.get_level_values("step").max() == step + 3
