"""Training runs that survive interruption (issue #13): checkpoints, SIGKILL and Ctrl-C, resume
bit for bit, grids resumed at the right point, corrupt checkpoints, extension, refused changes,
and the budget rules (process clock, no overshoot, warm start outside the clock)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mbf_analysis.cli import main
from mbf_analysis.data import load_dataset
from mbf_analysis.training import (
    PRESETS,
    CheckpointError,
    get_preset,
    grid_search,
    read_log,
    run_name,
    train,
)
from mbf_analysis.training import loop as training_loop
from mbf_analysis.training.checkpoint import checkpoint_files

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
STEPS = 60


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _with_warm_start(optimizer: str) -> dict:
    """The mlp-digits preset of ``optimizer``, with one epoch of warm start for MBF."""
    preset = PRESETS["mlp-digits", optimizer]
    if optimizer == "mbf":
        preset = dataclasses.replace(preset, warm_start_epochs=1)
    return {("mlp-digits", optimizer): preset}


SCRIPT = """
import dataclasses, json, sys, time
import torch
from mbf_analysis.training import PRESETS, grid_search, train

torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
if spec.get("warm"):
    key = ("mlp-digits", "mbf")
    PRESETS[key] = dataclasses.replace(PRESETS[key], warm_start_epochs=1)

def slow(row):  # slow enough for the test to kill it mid-run; the arithmetic is unchanged
    time.sleep(0.01)

common = dict(max_steps=spec["steps"], checkpoint_dir=spec["out"], checkpoint_every=5,
              on_step=slow, progress=False)
if spec.get("grid"):
    grid_search("mlp-digits", "sgdm", lrs=spec["grid"], **common)
else:
    train("mlp-digits", spec["optimizer"], **common)
"""


def _start(tmp_path: Path, spec: dict) -> subprocess.Popen:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(spec)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _steps_logged(path: Path, run: str | None = None) -> int:
    if not path.is_file():
        return 0
    try:
        frame = read_log(path)
    except (ValueError, pd.errors.ParserError):
        return 0
    rows = frame[frame.kind == "step"]
    return int((rows.run == run).sum()) if run is not None else len(rows)


def _kill_after(process: subprocess.Popen, log: Path, steps: int, run: str | None = None) -> None:
    deadline = time.monotonic() + 120
    while _steps_logged(log, run) < steps:
        assert process.poll() is None, f"the run ended before it was killed: {process.stderr}"
        assert time.monotonic() < deadline, "the run did not reach the kill point"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def _step_rows(path: Path) -> pd.DataFrame:
    frame = read_log(path)
    return frame[frame.kind == "step"][["run", "step", "epoch", "lr", "loss"]].reset_index(
        drop=True
    )


@pytest.mark.parametrize("optimizer", ["mbf", "kfac", "shampoo", "adam", "kpsvd"])
def test_a_killed_run_resumes_bit_for_bit(optimizer, tmp_path, monkeypatch, digits):
    """Run A is uninterrupted; run B is SIGKILLed after 23 steps and resumed. MBF has its warm
    start, KFAC (the presets' true-Fisher KFAC) draws sampled labels, Shampoo has inverse roots
    every 20 steps."""
    for key, preset in _with_warm_start(optimizer).items():
        monkeypatch.setitem(PRESETS, key, preset)
    a, b = tmp_path / "a", tmp_path / "b"
    train(
        "mlp-digits", optimizer, max_steps=STEPS, checkpoint_dir=a, progress=False, dataset=digits
    )
    process = _start(
        tmp_path, {"optimizer": optimizer, "steps": STEPS, "out": str(b), "warm": True}
    )
    _kill_after(process, b / "train_log.csv", 23)
    killed_at = _steps_logged(b / "train_log.csv")
    assert 23 <= killed_at < STEPS
    saved = torch.load(
        checkpoint_files(b, run_name(optimizer, get_preset("mlp-digits", optimizer), 0))[0],
        weights_only=True,
    )
    assert 0 < saved["position"]["step"] <= killed_at and saved["status"] is None
    log = train(
        "mlp-digits",
        optimizer,
        max_steps=STEPS,
        checkpoint_dir=b,
        resume=True,
        progress=False,
        dataset=digits,
    )
    resumed, expected = _step_rows(b / "train_log.csv"), _step_rows(a / "train_log.csv")
    assert list(resumed.step) == list(range(1, STEPS + 1))  # every step once
    pd.testing.assert_frame_equal(resumed, expected)  # equal losses, bit for bit
    assert list(log[log.kind == "step"].step) == list(range(1, STEPS + 1))
    if optimizer == "mbf":
        assert (read_log(b / "train_log.csv").kind == "warm_start").sum() == 1


def test_an_interrupted_grid_resumes_at_the_right_point(tmp_path, digits):
    lrs = [0.05, 0.02, 0.01]
    a, b = tmp_path / "a", tmp_path / "b"
    whole = grid_search(
        "mlp-digits",
        "sgdm",
        lrs=lrs,
        max_steps=20,
        checkpoint_dir=a,
        progress=False,
        dataset=digits,
    )
    process = _start(tmp_path, {"grid": lrs, "steps": 20, "out": str(b)})
    second = run_name("sgdm", get_preset("mlp-digits", "sgdm", lr=0.02), 0)
    _kill_after(process, b / "train_log.csv", 8, run=second)
    first = checkpoint_files(b, run_name("sgdm", get_preset("mlp-digits", "sgdm", lr=0.05), 0))[0]
    finished_at = first.stat().st_mtime_ns
    resumed = grid_search(
        "mlp-digits",
        "sgdm",
        lrs=lrs,
        max_steps=20,
        checkpoint_dir=b,
        resume=True,
        progress=False,
        dataset=digits,
    )
    assert first.stat().st_mtime_ns == finished_at  # the finished point was kept, not rerun
    columns = ["lr", "status", "steps", "train_loss", "score", "best"]
    pd.testing.assert_frame_equal(resumed[columns], whole[columns])
    pd.testing.assert_frame_equal(_step_rows(b / "train_log.csv"), _step_rows(a / "train_log.csv"))


def test_ctrl_c_saves_a_checkpoint_prints_the_resume_command_and_exits_130(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "adam", "--max-steps", "1500"]
    argv += ["--threads", "1", "--checkpoint-every", "1000", "--no-progress"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mbf_analysis.cli", *argv, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 120
    while _steps_logged(out / "train_log.csv") < 10:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"mbf-analyze train --resume --out {out}" in stdout
    assert "Traceback" not in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    log = read_log(out / "train_log.csv")
    assert log.status.iloc[-1] == "interrupted"
    run = log.run.iloc[0]
    saved = torch.load(out / "checkpoints" / f"{run}.pt", weights_only=True)
    assert saved["position"]["step"] == log[log.kind == "step"].step.max()  # the step it stopped at
    assert main(["train", "--resume", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    whole = tmp_path / "whole"
    assert main([*argv, "--out", str(whole)]) == 0
    pd.testing.assert_frame_equal(
        _step_rows(out / "train_log.csv"), _step_rows(whole / "train_log.csv")
    )
    ends = read_log(out / "train_log.csv").query("kind == 'end'")
    assert list(ends.status) == ["max_steps"]  # the interrupted end row was dropped


def test_resume_extends_a_finished_run_and_keeps_a_finished_one(tmp_path, capsys):
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "mbf,sgdm", "--no-progress"]
    short, long = tmp_path / "short", tmp_path / "long"
    assert main([*argv, "--max-steps", "20", "--out", str(short)]) == 0
    before = (short / "train_log.csv").read_text()
    assert main(["train", "--resume", "--out", str(short), "--no-progress"]) == 0
    assert (short / "train_log.csv").read_text() == before  # finished: kept as it is
    assert main(["train", "--resume", "--out", str(short), "--max-steps", "40"]) == 0
    assert main([*argv, "--max-steps", "40", "--out", str(long)]) == 0

    def by_run(path: Path) -> pd.DataFrame:  # the extension appends after the other runs
        return _step_rows(path).sort_values(["run", "step"], kind="stable", ignore_index=True)

    pd.testing.assert_frame_equal(by_run(short / "train_log.csv"), by_run(long / "train_log.csv"))
    assert json.loads((short / "run.json").read_text())["settings"]["max_steps"] == 40


def test_resume_refuses_settings_that_change_the_trajectory(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--problem",
                "mlp-digits",
                "--optimizer",
                "sgdm",
                "--max-steps",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--lr", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.3 (not set: the preset's value, " in err and "None" not in err
    assert "trajectory" in err and err.count("\n") == 1


def test_a_corrupt_checkpoint_falls_back_to_the_last_good_one(tmp_path, caplog, digits):
    run = run_name("sgdm", get_preset("mlp-digits", "sgdm"), 0)
    common = dict(checkpoint_dir=tmp_path, checkpoint_every=5, progress=False, dataset=digits)

    def crash(row):  # a crash after step 12: checkpoints of steps 10 (latest) and 5 remain
        if row["step"] == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("mlp-digits", "sgdm", max_steps=15, on_step=crash, **common)
    latest, previous = checkpoint_files(tmp_path, run)
    assert torch.load(latest, weights_only=True)["position"]["step"] == 10
    assert torch.load(previous, weights_only=True)["position"]["step"] == 5
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    log = train("mlp-digits", "sgdm", max_steps=15, resume=True, **common)
    assert "not a readable checkpoint" in caplog.text and str(previous) in caplog.text
    assert list(log[log.kind == "step"].step) == list(range(1, 16))
    assert latest.is_file() and not previous.exists()  # a finished run keeps its final one
    assert (tmp_path / f"{run}.corrupt.pt").stat().st_size == 100  # the damaged one, kept
    for path in checkpoint_files(tmp_path, run):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint of run .*garbage|no usable"):
        train("mlp-digits", "sgdm", max_steps=20, resume=True, **common)


def test_a_corrupt_checkpoint_is_one_line_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "sgdm", "--no-progress"]
    assert main([*argv, "--max-steps", "3", "--out", str(out)]) == 0
    for path in (out / "checkpoints").glob("*.pt"):
        path.write_bytes(b"\x00" * 10)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbf-analyze: error: no usable checkpoint") and err.count("\n") == 1


def test_a_log_that_already_holds_the_run_is_not_appended_to_without_resume(tmp_path, digits):
    path = tmp_path / "log.csv"
    train("mlp-digits", "sgdm", max_steps=2, csv_path=path, progress=False, dataset=digits)
    with pytest.raises(ValueError, match="already holds rows of run"):
        train("mlp-digits", "sgdm", max_steps=2, csv_path=path, progress=False, dataset=digits)


class _FakeTime:
    """``time.perf_counter``/``process_time`` that advance only when a step says so."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu


def _timed_optimizer(monkeypatch, clock: _FakeTime, *, wall: bool, cpu: bool, period: int):
    """Every step costs 1 s, and 10 s on steps ``k ≡ 0 (mod period)`` (the inverse steps)."""
    make = training_loop.make_optimizer

    def timed(name, model, preset, *args):
        opt = make(name, model, preset, *args)
        original, count = opt.step, [0]

        def step(*args, **kwargs):
            cost = 10.0 if count[0] % period == 0 else 1.0
            count[0] += 1
            clock.wall += cost if wall else 0.0
            clock.cpu += cost if cpu else 0.0
            return original(*args, **kwargs)

        opt.step = step
        return opt

    monkeypatch.setattr(training_loop, "time", clock)
    monkeypatch.setattr(training_loop, "make_optimizer", timed)


def test_a_time_budget_is_used_up_but_never_passed(monkeypatch, digits):
    """MBF refreshes its inverses every 20 steps (10 s here, 1 s otherwise). Steps 1-20 take
    29 s, step 21 (an inverse step) 10 s, then 1 s each: with a 47 s budget the run takes steps
    22-29 and ends at exactly 47 s."""
    clock = _FakeTime()
    _timed_optimizer(monkeypatch, clock, wall=True, cpu=False, period=20)
    log = train("mlp-digits", "mbf", time_budget=47.0, epochs=10, progress=False, dataset=digits)
    end = log[log.kind == "end"].iloc[-1]
    steps = log[log.kind == "step"]
    assert end.status == "time_budget" and end.wall_time == 47.0
    assert len(steps) == 29 and steps.wall_time.max() == 47.0


def test_the_inverse_step_that_would_pass_the_budget_is_not_taken(monkeypatch, digits):
    """With 35 s, a 1 s step would still fit after step 20 (29 s), but the next step refreshes
    the inverses (10 s, as the last such step took): the run stops at 29 s instead of passing
    the budget by 4 s, as a check after each step would."""
    clock = _FakeTime()
    _timed_optimizer(monkeypatch, clock, wall=True, cpu=False, period=20)
    log = train("mlp-digits", "mbf", time_budget=35.0, epochs=10, progress=False, dataset=digits)
    steps = log[log.kind == "step"]
    assert len(steps) == 20 and steps.wall_time.max() == 29.0
    assert log[log.kind == "end"].status.iloc[-1] == "time_budget"


def test_the_budget_can_count_process_time(monkeypatch, digits):
    clock = _FakeTime()
    _timed_optimizer(monkeypatch, clock, wall=False, cpu=True, period=20)
    log = train(
        "mlp-digits",
        "mbf",
        time_budget=47.0,
        budget_clock="process",
        epochs=10,
        progress=False,
        dataset=digits,
    )
    steps = log[log.kind == "step"]
    assert len(steps) == 29 and steps.process_time.max() == 47.0 and steps.wall_time.max() == 0
    assert log[log.kind == "end"].status.iloc[-1] == "time_budget"


def test_the_warm_start_is_outside_the_clock_and_draws_its_own_batches(monkeypatch, digits):
    monkeypatch.setitem(
        PRESETS, ("mlp-digits", "mbf"), _with_warm_start("mbf")[("mlp-digits", "mbf")]
    )
    clock = _FakeTime()
    _timed_optimizer(monkeypatch, clock, wall=True, cpu=True, period=20)
    warm_start = training_loop.MBF.warm_start

    def slow_warm_start(self, *args, **kwargs):  # 100 s of warm start on the fake clock
        clock.wall += 100.0
        clock.cpu += 100.0
        return warm_start(self, *args, **kwargs)

    monkeypatch.setattr(training_loop.MBF, "warm_start", slow_warm_start)
    seen: list[list[float]] = []
    build = training_loop.build_model

    def recording(name, **kwargs):
        model = build(name, **kwargs)
        inputs: list[float] = []
        model.register_forward_hook(
            lambda module, args, out: (
                inputs.append(args[0].sum().item()) if module.training else None
            )
        )
        seen.append(inputs)
        return model

    monkeypatch.setattr(training_loop, "build_model", recording)
    mbf = train("mlp-digits", "mbf", max_steps=5, time_budget=50.0, progress=False, dataset=digits)
    train("mlp-digits", "sgdm", max_steps=5, progress=False, dataset=digits)
    mbf_inputs, sgdm_inputs = seen
    assert len(mbf_inputs) == 15 + 5 and len(sgdm_inputs) == 5  # one warm-start epoch first
    assert mbf_inputs[-5:] == sgdm_inputs  # MBF trains on the same batches as SGD-m
    assert mbf_inputs[:5] != sgdm_inputs  # the warm start drew its own order
    warm = mbf[mbf.kind == "warm_start"]
    assert list(warm.wall_time) == [100.0] and list(warm.process_time) == [100.0]
    steps = mbf[mbf.kind == "step"]
    assert list(steps.wall_time) == [10.0, 11.0, 12.0, 13.0, 14.0]  # the 100 s are not in it
    assert mbf[mbf.kind == "end"].status.iloc[-1] == "max_steps"  # not the 50 s budget
