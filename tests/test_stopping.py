"""Nothing lost on Ctrl-C or SIGTERM (issue #21): every long command stops after the iteration in
progress, saves, says how to continue and exits 128 + signal; ``--resume`` then gives the CSV of
an uninterrupted run, bit for bit; a second Ctrl-C aborts and leaves the last saved state good.
Also: one run per folder (the lock), failed writes in one line, one-line usage errors, and the
record of every session in ``run.json``."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mbf_analysis import checkpoints, files
from mbf_analysis.analysis import CosineConfig, CosineRun
from mbf_analysis.checkpoints import TrainConfig, checkpoint_path, partial_path, train_model
from mbf_analysis.cli import main
from mbf_analysis.cli.run_folder import LOCK_NAME
from mbf_analysis.data import load_dataset
from mbf_analysis.models import build_model
from mbf_analysis.stopping import StopRequested, stop_requests
from mbf_analysis.training import read_log

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]

COSINE = ["cosine", "--batch-size", "64", "--methods", "mbf,kfac,sgdm", "--iterations", "30"]
ERROR = ["error", "--batch-size", "64", "--methods", "kfac,kpsvd,mbf-ema", "--every", "1"]
ERROR += ["--iterations", "30"]
QUIET = ["--no-progress", "--threads", "1"]
STATE = {"cosine": ("cosine.csv", "cosine_state.pt"), "error": ("error.csv", "error_state.pt")}


def _start(argv: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mbf_analysis", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def _iterations_in(path: Path) -> int:
    """Iterations with complete rows in an analysis CSV (0 while there is none)."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()[1:]
    return len({line.split(",")[0] for line in lines[:-1]})  # the last line may be cut short


def _wait_for(process: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"the run did not reach {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted CSVs of the two analyses."""
    out = tmp_path_factory.mktemp("whole")
    frames = {}
    for argv in (COSINE, ERROR):
        assert main([*argv, *QUIET, "--out", str(out / argv[0])]) == 0
        frames[argv[0]] = pd.read_csv(out / argv[0] / STATE[argv[0]][0])
    return frames


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("argv", [COSINE, ERROR], ids=["cosine", "error"])
def test_a_signal_stops_after_the_iteration_saves_and_resume_gives_the_whole_run(
    argv, signum, tmp_path, whole, capsys
):
    command = argv[0]
    out = tmp_path / "run"
    csv_name, state_name = STATE[command]
    process = _start([*argv, *QUIET, "--out", str(out)])
    _wait_for(process, lambda: _iterations_in(out / csv_name) >= 3, "three iterations")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert f"continue with: mbf-analyze {command} --resume --out {out}" in stdout
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    recorded = pd.read_csv(out / csv_name).iteration.max()
    saved = torch.load(out / state_name, weights_only=True)["iteration"]
    assert saved == recorded + 1  # the state of the iteration after the last recorded one
    assert f"stopped at iteration {saved} (state saved)" in stdout
    capsys.readouterr()
    assert main([command, "--resume", "--out", str(out), *QUIET]) == 0
    assert f"resuming {out} at iteration {saved} of 30" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out / csv_name), whole[command])


@pytest.mark.parametrize("argv", [COSINE, ERROR], ids=["cosine", "error"])
def test_a_second_ctrl_c_aborts_and_leaves_the_last_saved_state_good(argv, tmp_path, whole):
    command = argv[0]
    out = tmp_path / "run"
    csv_name, state_name = STATE[command]
    process = _start([*argv, *QUIET, "--out", str(out), "--checkpoint-every", "2"])
    _wait_for(process, lambda: _iterations_in(out / csv_name) >= 3, "three iterations")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    state = torch.load(out / state_name, weights_only=True)  # loadable
    assert state["iteration"] >= 2
    assert not list(out.glob(".*.tmp"))
    assert main([command, "--resume", "--out", str(out), *QUIET]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / csv_name), whole[command])


def test_sigterm_checkpoints_a_training_run_and_exits_143(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "adam", "--max-steps", "3000"]
    argv += ["--checkpoint-every", "1000", *QUIET]
    process = _start([*argv, "--out", str(out)])

    def steps() -> int:
        try:
            return int((read_log(out / "train_log.csv").kind == "step").sum())
        except (OSError, ValueError, pd.errors.ParserError):
            return 0

    _wait_for(process, lambda: steps() >= 10, "ten steps")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert f"continue with: mbf-analyze train --resume --out {out}" in stdout
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    log = read_log(out / "train_log.csv")
    saved = torch.load(out / "checkpoints" / f"{log.run.iloc[0]}.pt", weights_only=True)
    assert saved["position"]["step"] == log[log.kind == "step"].step.max() > 0


def test_a_stopped_pretraining_continues_to_the_uninterrupted_weights(tmp_path, capsys):
    """``heatmap`` pretrains first: Ctrl-C keeps the unfinished pretraining in the cache, and
    ``--resume`` finishes it to the weights an uninterrupted pretraining gives."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    argv = ["heatmap", "--batch-size", "16", "--kinds", "empirical", "--epochs", "400"]
    argv += ["--train-batch-size", "8", "--cache-dir", str(cache), "--threads", "1"]
    config = TrainConfig(model="digits-mlp", dataset="digits", epochs=400, lr=0.01, batch_size=8)
    partial = partial_path(checkpoint_path(config, cache))
    process = _start([*argv, "--out", str(out)])
    _wait_for(process, partial.is_file, "the end of the first epoch")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"continue with: mbf-analyze heatmap --resume --out {out}" in stdout
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    stopped = torch.load(partial, weights_only=True)
    assert 0 < stopped["epoch"] < 400
    assert main(["heatmap", "--resume", "--out", str(out), "--threads", "1"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert not partial.exists()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and len(record["resumes"]) == 1
    resumed = torch.load(checkpoint_path(config, cache), weights_only=True)["state_dict"]
    reference, _ = train_model(config, load_dataset("digits"), progress=False)
    for name, value in reference.state_dict().items():
        assert torch.equal(resumed[name], value), name


def test_train_model_stops_at_a_whole_step_and_continues_bit_for_bit(tmp_path, monkeypatch):
    """In process: a stop asked for inside step 7 of epoch 2 saves the partial training there;
    the next call continues to the weights of an uninterrupted training."""
    data = load_dataset("digits")
    config = TrainConfig(model="digits-mlp", dataset="digits", epochs=3, lr=0.05, batch_size=64)
    partial = tmp_path / "partial.pt"
    whole, whole_history = train_model(config, data, progress=False)
    calls = {"n": 0}
    real = torch.autograd.grad

    def grad(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 35:  # inside step 35, in the second epoch
            from mbf_analysis import stopping

            stopping._active.request(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    with pytest.raises(StopRequested):
        train_model(config, data, progress=False, partial=partial)
    monkeypatch.setattr(torch.autograd, "grad", real)
    saved = torch.load(partial, weights_only=True)
    per_epoch = math.ceil(len(data.train_x) / 64)
    assert per_epoch < 35 < 2 * per_epoch
    assert (saved["epoch"], saved["batch"]) == (1, 35 - per_epoch)
    model, history = train_model(config, data, progress=False, partial=partial)
    assert history == whole_history
    for (name, value), expected in zip(
        model.state_dict().items(), whole.state_dict().values(), strict=True
    ):
        assert torch.equal(value, expected), name


def test_cosine_run_in_python_stops_at_a_whole_iteration(monkeypatch):
    """``CosineRun.run``: a Ctrl-C inside an iteration raises once that iteration is done; the
    runner then continues exactly where an uninterrupted one would be."""
    data = load_dataset("digits")

    def runner() -> CosineRun:
        torch.manual_seed(0)
        model = build_model("digits-mlp").double()
        config = CosineConfig(methods=["mbf", "sgdm"], iterations=6, batch_size=64)
        return CosineRun(
            model, torch.nn.CrossEntropyLoss(), data.train_x.double(), data.train_y, config
        )

    expected = runner().run(6, progress=False)
    stopped = runner()
    real = CosineRun._iterate

    def iterate(self):
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside the iteration
        return real(self)

    monkeypatch.setattr(CosineRun, "_iterate", iterate)
    recorded = []
    with pytest.raises(StopRequested):
        stopped.run(6, on_record=recorded.append, progress=False)
    monkeypatch.setattr(CosineRun, "_iterate", real)
    assert stopped.iteration == 3  # iteration 2 finished
    rest = stopped.run(3, progress=False)
    got = pd.concat([*recorded, rest], ignore_index=True)
    pd.testing.assert_frame_equal(got, expected)


def test_stop_requests_are_shared_by_nested_loops_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with stop_requests() as outer, stop_requests() as inner:
        assert inner is outer
        os.kill(os.getpid(), signal.SIGTERM)
        assert outer.requested and outer.signum == signal.SIGTERM
        with pytest.raises(StopRequested) as info:
            inner.check()
        assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- one run a folder
def test_a_second_run_into_a_folder_in_use_is_refused_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "race"
    process = _start([*COSINE, *QUIET, "--out", str(out)])
    _wait_for(process, lambda: _iterations_in(out / "cosine.csv") >= 1, "its first iteration")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "cosine.csv"}
    for extra in ([], ["--overwrite"], ["--resume"]):
        argv = [*COSINE, *QUIET, "--out", str(out), *extra]
        if extra == ["--resume"]:
            argv = ["cosine", "--resume", "--out", str(out), *QUIET]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"{out} is in use by another run (pid {process.pid} on " in err
        assert "wait for it to end or choose another --out" in err
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "cosine.csv"}
    assert set(after) == set(before)
    assert all(after[name] == before[name] for name in (LOCK_NAME,))
    process.communicate(timeout=300)
    assert process.returncode == 0
    rows = pd.read_csv(out / "cosine.csv")
    assert not rows.duplicated(["iteration", "layer", "method"]).any()
    assert sorted(rows.iteration.unique()) == list(range(30))


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, whole):
    out = tmp_path / "killed"
    process = _start([*COSINE, *QUIET, "--out", str(out), "--checkpoint-every", "1"])
    _wait_for(process, lambda: _iterations_in(out / "cosine.csv") >= 2, "two iterations")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert (out / LOCK_NAME).is_file()
    assert main(["cosine", "--resume", "--out", str(out), *QUIET]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "cosine.csv"), whole["cosine"])


# ----------------------------------------------------------------------------- damaged states
@pytest.mark.parametrize("argv", [COSINE, ERROR], ids=["cosine", "error"])
def test_a_damaged_state_falls_back_to_the_previous_one_and_resume_gives_the_whole_run(
    argv, tmp_path, whole, caplog
):
    command = argv[0]
    out = tmp_path / "run"
    csv_name, state_name = STATE[command]
    process = _start([*argv, *QUIET, "--out", str(out), "--checkpoint-every", "1"])
    _wait_for(process, lambda: _iterations_in(out / csv_name) >= 4, "four iterations")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    latest, previous = out / state_name, out / state_name.replace(".pt", ".prev.pt")
    kept = torch.load(previous, weights_only=True)["iteration"]
    assert torch.load(latest, weights_only=True)["iteration"] == kept + 1
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    assert main([command, "--resume", "--out", str(out), *QUIET]) == 0
    assert "not a readable state" in caplog.text and str(previous) in caplog.text
    assert (out / state_name.replace(".pt", ".corrupt.pt")).stat().st_size == 100
    assert not previous.exists()  # a complete run keeps its final state only
    pd.testing.assert_frame_equal(pd.read_csv(out / csv_name), whole[command])


@pytest.mark.parametrize("argv", [COSINE, ERROR], ids=["cosine", "error"])
def test_a_run_without_a_usable_state_is_refused_in_one_line(argv, tmp_path, capsys):
    command = argv[0]
    out = tmp_path / "run"
    csv_name, state_name = STATE[command]
    assert main([*argv[:-1], "2", *QUIET, "--out", str(out)]) == 0
    (out / state_name).write_bytes(b"\x00" * 10)
    rows = (out / csv_name).read_text()
    capsys.readouterr()
    assert main([command, "--resume", "--out", str(out), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mbf-analyze: error: no usable state in {out}: {out / state_name}")
    assert err.count("\n") == 1 and "Delete" in err
    assert (out / csv_name).read_text() == rows  # nothing computed is lost


# ----------------------------------------------------------------------------- failed writes
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_state(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "full"
    real = os.replace
    saves = {"n": 0}

    def replace(src, dst):
        if str(dst).endswith("cosine_state.pt"):
            saves["n"] += 1
            if saves["n"] == 3:  # start, iteration 2, then the disk is full at iteration 4
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    assert main([*COSINE, *QUIET, "--out", str(out), "--checkpoint-every", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"could not write {out / 'cosine_state.pt'}: No space left on device (ENOSPC)" in err
    assert "the last good state (cosine_state.pt, iteration 2) is kept" in err
    assert f"`mbf-analyze cosine --resume --out {out}` continues from it" in err
    assert torch.load(out / "cosine_state.pt", weights_only=True)["iteration"] == 2
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_a_failed_checkpoint_write_of_train_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"

    def no_room(payload, fh):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(checkpoints.torch, "save", no_room)
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "sgdm", "--max-steps", "5"]
    assert main([*argv, *QUIET, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "could not write" in err and "Disk quota exceeded (EDQUOT)" in err
    assert f"`mbf-analyze train --resume --out {out}` continues from it" in err
    assert not list((out / "checkpoints").glob(".*.tmp"))


# ----------------------------------------------------------------------------- errors, records
@pytest.mark.parametrize(
    "argv, message",
    [
        (["cosine", "--iterations", "x"], "argument --iterations: invalid positive_int value"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["train", "--threads", "0"], "argument --threads"),
    ],
)
def test_a_usage_error_is_one_line_that_says_where_help_is(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    command = "mbf-analyze" if argv[0] == "nonsense" else f"mbf-analyze {argv[0]}"
    assert err.rstrip().endswith(f"(see '{command} --help')")


def test_run_json_keeps_the_first_command_line_and_each_resume(tmp_path):
    out = tmp_path / "run"
    first = [*COSINE[:-1], "3", *QUIET, "--out", str(out)]
    assert main(first) == 0
    assert main(["cosine", "--resume", "--out", str(out), "--iterations", "4", *QUIET]) == 0
    assert main(["cosine", "--resume", "--out", str(out), "--iterations", "5", *QUIET]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["started"]["command_line"].endswith(" ".join(first[-6:]))
    assert "--resume" not in record["started"]["command_line"]
    assert [r["command_line"].split("--iterations ")[1][0] for r in record["resumes"]] == ["4", "5"]
    assert all(re.match(r"\d{4}-\d\d-\d\dT", r["time"]) for r in record["resumes"])


def test_a_resume_clash_with_an_unset_preset_value_names_the_preset_value(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "adam", "--max-steps", "3"]
    assert main([*argv, *QUIET, "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    lr = record["effective"]["adam"]["lr"]
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--lr", "0.5", *QUIET]) == 2
    err = capsys.readouterr().err
    assert f"--lr 0.5 (not set: the preset's value, adam {lr!r})" in err
    assert "None" not in err


# ----------------------------------------------------------------------------- costs up front
def test_a_long_analysis_prints_its_estimate_once_and_a_short_one_does_not(
    tmp_path, monkeypatch, capsys
):
    from mbf_analysis.cli.recording import Recorder

    short = [*COSINE[:-1], "4", *QUIET]
    assert main([*short, "--out", str(tmp_path / "short")]) == 0
    assert "estimate:" not in capsys.readouterr().out
    monkeypatch.setattr(Recorder, "ESTIMATE_OVER_S", 0.0)
    assert main([*short, "--out", str(tmp_path / "long")]) == 0
    out = capsys.readouterr().out
    assert out.count("estimate: about") == 1
    assert "for the 2 remaining iterations" in out  # at the second record (iteration 2 of 4)
    assert f"mbf-analyze cosine --resume --out {tmp_path / 'long'}` continues" in out


def test_train_announces_the_sum_of_its_time_budgets(tmp_path, monkeypatch, capsys):
    from mbf_analysis.cli.recording import Recorder

    monkeypatch.setattr(Recorder, "ESTIMATE_OVER_S", 1.0)
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "sgdm,adam", "--seed", "0,1"]
    assert main([*argv, "--time-budget", "0.5", *QUIET]) == 0
    assert "estimate: at least 2 s (4 runs × 0.5 s of training on the" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["cosine", "--layers", "nope"],
        ["error", "--layers", "nope"],
        ["error", "--problem", "mnist-ae", "--layers", "nope"],
        ["fisher", "--layers", "nope"],
        ["heatmap", "--layers", "nope"],
    ],
    ids=["cosine", "error", "error-problem", "fisher", "heatmap"],
)
def test_a_wrong_layer_name_is_reported_before_the_data_is_loaded(
    argv, tmp_path, monkeypatch, capsys
):
    from mbf_analysis import data

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the layer names were checked")

    monkeypatch.setattr(data, "load_dataset", no_loading)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert main([*argv, "--data-dir", str(shared), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--layers: nope not in the model" in err and err.count("\n") == 1
