"""``mbf-analyze error``: files, values against the library, resume without duplicates, the
paper's autoencoder setting on real data, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from mbf_analysis import analysis
from mbf_analysis.analysis import ApproximationRun
from mbf_analysis.cli import error as error_cli
from mbf_analysis.cli import main
from mbf_analysis.data import load_dataset
from mbf_analysis.models import build_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = ["--iterations", "9", "--every", "4", "--methods", "kfac,kpsvd,bdf", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_cli_knows_every_approximated_method():
    assert error_cli.APPROXIMATED == analysis.APPROXIMATED


def test_a_run_writes_every_file_with_the_librarys_values(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["error", "--out", str(out), *SMALL, "--batch-size", "64"]) == 0
    rows = pd.read_csv(out / "error.csv")
    assert list(rows.columns) == list(analysis.TRAJECTORY_COLUMNS)
    assert sorted(rows.iteration.unique()) == [0, 4, 8]
    assert list(rows.method.unique()) == ["kfac", "kpsvd", "bdf"]
    assert list(rows.layer.unique()) == ["fc1", "fc2", "fc3"]
    assert (rows[rows.method == "bdf"].error.abs() < 1e-12).all()
    # iteration 0: the seeded network and the run's first batch, recomputed with the library
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("digits-mlp").double()
    config = analysis.ApproximationConfig(
        methods=["kfac", "kpsvd", "bdf"], iterations=1, every=4, batch_size=64
    )
    first = ApproximationRun(
        model, nn.CrossEntropyLoss(), data.train_x.double(), data.train_y, config
    )
    expected = first.run(1, progress=False)
    got = rows[rows.iteration == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        got[["layer", "method", "error"]], expected[["layer", "method", "error"]]
    )
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "error" and record["status"] == "complete"
    assert record["settings"]["fisher"] == "mc" and record["settings"]["trajectory"] == "adam"
    for name in ("error.png", "error.pdf", "error_state.pt"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "median relative error" in printed and "kpsvd" in printed


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    argv = ["error", *SMALL, "--batch-size", "64", "--iterations", "13"]
    assert main([*argv, "--out", str(whole)]) == 0
    original = ApproximationRun._iterate

    def iterate(self):
        if self.iteration == 9:
            raise KeyboardInterrupt
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(ApproximationRun, "_iterate", iterate)
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(parts), "--checkpoint-every", "5"])
    assert exit_info.value.code == 130
    assert "mbf-analyze error --resume --out" in capsys.readouterr().out
    assert json.loads((parts / "run.json").read_text())["status"] == "interrupted"
    assert main(["error", "--resume", "--out", str(parts), "--no-progress"]) == 0
    resumed, expected = pd.read_csv(parts / "error.csv"), pd.read_csv(whole / "error.csv")
    assert not resumed.duplicated(["iteration", "layer", "method"]).any()
    pd.testing.assert_frame_equal(resumed, expected)


def test_the_scaled_metric_and_the_carried_ema_from_the_command_line(tmp_path, monkeypatch, capsys):
    import mbf_analysis.plotting as plotting

    drawn = []
    original = plotting.plot_approximation_errors

    def spy(frame, **kwargs):
        drawn.append(kwargs["value"])
        fig = original(frame, **kwargs)
        drawn.append(fig.axes[0].get_ylabel())
        return fig

    monkeypatch.setattr(plotting, "plot_approximation_errors", spy)
    out = tmp_path / "run"
    argv = ["error", "--out", str(out), "--iterations", "5", "--every", "2", "--no-progress"]
    argv += ["--methods", "mbf,mbf-ema,mbf-exact", "--batch-size", "32"]
    assert main([*argv, "--metric", "scaled"]) == 0
    assert drawn == ["scaled_error", "scale-free relative error (mean of 5)"]
    record = json.loads((out / "run.json").read_text())
    assert record["options"]["metric"] == "scaled"
    rows = pd.read_csv(out / "error.csv")
    assert list(rows.columns) == list(analysis.TRAJECTORY_COLUMNS)
    assert (rows.scaled_error <= rows.error + 1e-12).all()
    assert (rows[rows.method == "mbf-exact"].scale - 1).abs().max() < 1e-10
    first = rows[rows.iteration == 0].set_index(["layer", "method"])
    ema, one_shot = first.xs("mbf-ema", level="method"), first.xs("mbf", level="method")
    # iteration 0: one EMA step from zero, (1 − β) ḡḡᵀ with β = 0.9, on the same batch
    pd.testing.assert_series_equal(ema.scale, 10 * one_shot.scale, rtol=1e-9)
    pd.testing.assert_series_equal(ema.scaled_error, one_shot.scaled_error, rtol=1e-9)
    printed = capsys.readouterr().out
    table = printed[printed.index("median relative error") :]
    assert all(word in table for word in ("scaled_error", "scale", "mbf-ema", "fc1"))
    # a CSV from before the two columns is refused on --resume, naming the file
    old = [c for c in analysis.TRAJECTORY_COLUMNS if c not in ("scale", "scaled_error")]
    rows[old].to_csv(out / "error.csv", index=False)
    assert main(["error", "--resume", "--out", str(out), "--iterations", "7"]) == 2
    assert "is not this analysis's CSV" in capsys.readouterr().err


def test_the_papers_autoencoder_setting_on_real_mnist(tmp_path):
    out = tmp_path / "ae"
    argv = ["error", "--problem", "mnist-ae", "--data-dir", str(SHARED_DATA), "--iterations", "2"]
    argv += ["--every", "1", "--layers", "fc5", "--fisher-batch-size", "32", "--no-progress"]
    assert main([*argv, "--methods", "kfac,kpsvd,deflation", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "error.csv")
    assert set(rows.layer) == {"fc5"} and sorted(rows.iteration.unique()) == [0, 1]
    assert rows.loss.iloc[0] > 400  # Σ_pixels BCE of an untrained autoencoder (≈ 543)
    ours = rows[rows.iteration == 0].set_index("method").error
    assert ours["deflation"] <= ours["kpsvd"] + 1e-9 <= ours["kfac"] + 2e-9
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["batch_size"] == 512 and settings["fisher"] == "mc"
    assert settings["model"] == "mnist-ae" and settings["dtype"] == "float32"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "kfac,nope"], "--methods kfac,nope: unknown nope"),
        (["--problem", "mnist-ae", "--dataset", "digits"], "drop --dataset/--model"),
        (["--batch-size", "8", "--fisher-batch-size", "16"], "exceeds --batch-size 8"),
        (["--layers", "fc9"], "--layers: fc9 not in the model"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(extra, message, tmp_path, capsys):
    assert main(["error", "--out", str(tmp_path / "x"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbf-analyze: error:") and err.count("\n") == 1
    assert message in err
