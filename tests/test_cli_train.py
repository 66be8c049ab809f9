"""`mbf-analyze train`: files written, the printed summary, grid mode, and one-line errors."""

import json
from pathlib import Path

import pandas as pd
import pytest

from mbf_analysis.cli import build_parser, main
from mbf_analysis.training import LOG_COLUMNS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_comparison_on_mlp_digits_writes_log_summary_record_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "mbf,sgdm", "--epochs", "2"]
    code = main([*argv, "--seed", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mlp-digits, seed 1:" in printed and "train_loss" in printed
    log = pd.read_csv(out / "train_log.csv")
    assert list(log.columns) == list(LOG_COLUMNS)
    assert list(log.optimizer.unique()) == ["mbf", "sgdm"]
    assert (log.seed == 1).all()
    assert (log[log.kind == "end"].status == "epochs").all()
    summary = pd.read_csv(out / "train_summary.csv")
    assert list(summary.optimizer) == ["mbf", "sgdm"] and (summary.epochs == 2).all()
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "train" and record["status"] == "complete"
    assert record["settings"]["optimizer"] == ["mbf", "sgdm"] and record["settings"]["epochs"] == 2
    assert record["environment"]["versions"]["torch"] and "train" in record["timings_s"]
    for suffix in ("png", "pdf"):
        assert (out / f"train_curves.{suffix}").stat().st_size > 0
    # a second run into the same folder would mix two runs in one log: refused
    assert main([*argv, "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a complete run of `mbf-analyze train`" in err
    assert "--resume" in err and "--overwrite" in err


def test_overrides_reach_the_run(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "adam", "--max-steps", "3"]
    assert main([*argv, "--lr", "0.02", "--no-progress", "--out", str(out)]) == 0
    log = pd.read_csv(out / "train_log.csv")
    assert (log[log.kind == "step"].lr == 0.02).all()
    assert log.status.iloc[-1] == "max_steps"


def test_grid_mode_writes_the_grid_and_marks_the_best(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "sgdm", "--grid", "--lr", "0.05"]
    code = main([*argv, "--weight-decay", "0", "--epochs", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    assert "sgdm: best lr 0.05" in capsys.readouterr().out
    grid = pd.read_csv(out / "grid_search.csv")
    assert len(grid) == 1 and grid.best.all()


def test_explicit_grid_axes_run_every_pair(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "mbf", "--max-steps", "2"]
    grid = ["--grid-lr", "1e-3,3e-4", "--grid-damping", "1e-3,1e-2", "--no-progress"]
    assert main([*argv, *grid, "--out", str(out)]) == 0  # --grid-* imply --grid
    assert "mbf: best lr" in capsys.readouterr().out
    frame = pd.read_csv(out / "grid_search.csv")
    assert list(zip(frame.lr, frame.damping, strict=True)) == [
        (1e-3, 1e-3),
        (1e-3, 1e-2),
        (3e-4, 1e-3),
        (3e-4, 1e-2),
    ]
    assert (frame.weight_decay == 0.0).all() and frame.best.sum() == 1
    assert (frame.steps == 2).all()


def test_missing_data_is_one_line_naming_the_files(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MBF_DATA_DIR", str(empty))
    monkeypatch.setenv("MBF_CACHE_DIR", str(empty))
    monkeypatch.setenv("HOME", str(empty))
    argv = ["train", "--problem", "mnist-ae", "--max-steps", "1", "--data-dir", str(empty)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbf-analyze: error: MNIST files not found") and err.count("\n") == 1
    assert "train-images-idx3-ubyte.gz" in err and str(empty) in err


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give --time-budget SECONDS and/or --epochs N"),
        (["--epochs", "1", "--optimizer", "sgdm", "--damping", "0.1"], "--damping does not apply"),
        (["--epochs", "1", "--optimizer", "sgdm", "--grid-damping", "0.1"], "does not apply"),
    ],
)
def test_bad_combinations_are_one_line_with_exit_code_2(extra, message, capsys):
    assert main(["train", "--problem", "mlp-digits", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbf-analyze: error:") and err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer", "mbf,lbfgs"], "invalid choice 'lbfgs'"),
        (["--lr", "-1"], "must be a positive number"),
        (["--epochs", "0"], "must be a positive integer"),
        (["--weight-decay", "nan"], "must be 0 or more"),
        (["--grid-lr", "1e-3,-1"], "must be a positive number, got -1"),
        (["--grid-damping", ","], "give at least one number"),
        (["--grid-weight-decay", "0,x"], "invalid"),
    ],
)
def test_invalid_values_are_argparse_errors_with_exit_code_2(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--problem", "mlp-digits", "--epochs", "1", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_problem_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--problem", "mnist", "--epochs", "1"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_the_batch_size_can_replace_the_problems(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "sgdm", "--max-steps", "3"]
    assert main([*argv, "--batch-size", "50", "--no-progress", "--out", str(out)]) == 0
    log = pd.read_csv(out / "train_log.csv")
    assert list(log[log.kind == "step"].epoch) == [50 / 1500, 100 / 1500, 150 / 1500]
    assert json.loads((out / "run.json").read_text())["settings"]["batch_size"] == 50


def test_the_published_mnist_mbf_preset_diverges_and_the_output_says_why(capsys):
    """--presets paper runs Table 4's MBF (1e-5, 3e-4) on MNIST, which diverges here; the run
    says why and which setting trains ('ours', the default)."""
    argv = ["train", "--problem", "mnist-ae", "--optimizer", "mbf", "--presets", "paper"]
    argv += ["--max-steps", "40", "--eval-samples", "500", "--data-dir", str(SHARED_DATA)]
    assert main([*argv, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "every run diverged (mbf)" in captured.err
    note = " ".join(captured.out.split())
    assert (
        "MBF diverged with the paper's published mnist-ae preset (Table 4: lr 1e-05, λ 0.0003)"
        in note
    )
    assert "lr/λ = 0.0333" in note and "--presets ours (the default) uses that point" in note


def test_download_is_a_train_option_too():
    args = build_parser().parse_args(
        ["train", "--problem", "mnist-ae", "--download", "--epochs", "1"]
    )
    assert args.download is True


def test_coarse_runs_two_level_kfac_once_per_coarse_space(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--problem", "mlp-digits", "--optimizer", "kfac-koroko,kfac-two-level"]
    argv += ["--coarse", "residual,tselepidis", "--max-steps", "3", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = pd.read_csv(out / "train_summary.csv")
    assert list(summary.optimizer) == [
        "kfac-koroko",
        "kfac-two-level-residual",
        "kfac-two-level-tselepidis",
    ]
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["coarse"] == ["residual", "tselepidis"]
    assert (
        main(["train", "--problem", "mlp-digits", "--coarse", "residual", "--max-steps", "1"]) == 2
    )
    assert "add it to --optimizer" in capsys.readouterr().err
