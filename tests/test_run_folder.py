"""The output folder of every subcommand: refusal to overwrite, --overwrite, --resume with only
--out, and what run.json records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mbf_analysis.cli import main
from mbf_analysis.cli.common import UsageError
from mbf_analysis.cli.run_folder import RunFolder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COSINE = ["cosine", "--iterations", "3", "--batch-size", "32", "--methods", "mbf,sgdm"]
TRAIN = ["train", "--problem", "mlp-digits", "--optimizer", "sgdm", "--max-steps", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mbf-analyze: error:") and err.count("\n") == 1
    return err


@pytest.mark.parametrize(
    "argv, resumable",
    [
        (COSINE, True),
        (TRAIN, True),
        (["fisher", "--batch-size", "16", "--kinds", "empirical"], False),
        (["heatmap", "--batch-size", "16", "--kinds", "empirical", "--epochs", "0"], False),
    ],
    ids=["cosine", "train", "fisher", "heatmap"],
)
def test_a_second_run_into_a_finished_folder_is_refused_and_says_how_on(
    argv, resumable, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = _err(capsys)
    command = argv[0]
    assert f"{out} already holds a complete run of `mbf-analyze {command}`" in err
    assert "--overwrite to replace it" in err
    assert ("--resume to continue it" in err) == resumable
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_overwrite_replaces_only_the_runs_own_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*COSINE, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    recorded = json.loads((out / "run.json").read_text())["files"]
    assert {"cosine.csv", "cosine_state.pt", "cosine.png", "cosine.pdf"} <= set(recorded)
    assert main([*COSINE, "--iterations", "2", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(pd.read_csv(out / "cosine.csv").iteration.unique()) == [0, 1]


def test_a_partial_folder_without_a_record_is_refused_too(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "cosine.csv").write_text("iteration,layer,method,cosine,loss\n")
    assert main([*COSINE, "--out", str(out)]) == 2
    assert "files of an earlier run (cosine.csv)" in _err(capsys)


def test_resume_and_overwrite_exclude_each_other_and_resume_needs_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*COSINE, "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "pick one" in _err(capsys)
    assert main(["cosine", "--out", str(out), "--resume"]) == 2
    assert "no run to continue" in _err(capsys)
    assert main([*TRAIN, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["cosine", "--out", str(out), "--resume"]) == 2
    assert "holds a run of `mbf-analyze train`, not of `cosine`" in _err(capsys)


def test_cosine_resume_of_a_run_on_real_data_needs_only_out(tmp_path, monkeypatch, capsys):
    """The README's `--resume --out runs/fig6` after a run with --data-dir: the data folder is
    saved with the run, so no --data-dir, $MBF_DATA_DIR or cache is needed to continue."""
    data = tmp_path / "data"
    shutil.copytree(SHARED_DATA / "mnist", data / "mnist")
    out = tmp_path / "fig6"
    argv = ["cosine", "--preset", "paper", "--iterations", "2", "--batch-size", "64"]
    assert main([*argv, "--methods", "mbf", "--data-dir", str(data), "--out", str(out)]) == 0
    monkeypatch.delenv("MBF_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["cosine", "--resume", "--out", str(out), "--iterations", "3"]) == 0
    rows = pd.read_csv(out / "cosine.csv")
    assert sorted(rows.iteration.unique()) == [0, 1, 2]
    record = json.loads((out / "run.json").read_text())
    assert record["data_folder"] == str((data / "mnist").resolve())


def test_run_json_records_what_makes_a_run_traceable(tmp_path):
    out = tmp_path / "run"
    assert main([*COSINE, "--out", str(out), "--threads", "1"]) == 0
    record = json.loads((out / "run.json").read_text())
    env = record["environment"]
    assert env["command_line"].startswith("mbf-analyze cosine --iterations 3")
    assert "--threads 1" in env["command_line"]
    for name in ("mbf-analysis", "torch", "backpack-for-pytorch", "numpy", "pandas"):
        assert env["versions"][name] and env["versions"][name] != "unknown"
    assert env["threads"]["torch_threads"] == 1
    git = env["git"]
    assert git is not None and len(git["commit"]) == 40 and isinstance(git["dirty"], bool)


def test_the_folder_records_its_files_and_refuses_a_broken_record(tmp_path):
    folder = RunFolder(tmp_path / "run", "fisher", ("fisher_summary.csv",), resumable=False)
    folder.claim()
    folder.add_files(folder.path / "fisher_summary.csv")
    folder.write_record({"status": "complete"})
    record = json.loads(folder.record_path.read_text())
    assert record["files"] == ["fisher_summary.csv"] and record["command"] == "fisher"
    (folder.path / "run.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a readable run record"):
        RunFolder(folder.path, "fisher", (), resumable=False).claim()
