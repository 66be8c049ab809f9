"""The `mbf-analyze` command line: defaults, saved files, and one-line errors with exit code 2."""

import json
from pathlib import Path

import pandas as pd
import pytest

from mbf_analysis.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_fisher_default_run_prints_and_saves(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["fisher", "--batch-size", "64", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fc1" in printed and "exact" in printed and "mass_vs_area" in printed
    frame = pd.read_csv(out / "fisher_summary.csv")
    assert set(frame.kind) == {"empirical", "exact"}
    assert list(frame.layer.unique()) == ["fc1", "fc2", "fc3"]
    assert (frame.miniblock_mass > frame.miniblock_area).all()
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["batch_size"] == 64
    assert "torch" in record["versions"]


def test_fisher_on_real_mnist16(capsys):
    code = main(
        [
            "fisher",
            "--dataset",
            "mnist16",
            "--data-dir",
            str(SHARED_DATA),
            "--batch-size",
            "32",
            "--kinds",
            "empirical",
            "--layers",
            "fc3",
        ]
    )
    assert code == 0
    assert "fc3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["fisher", "--layers", "nope"],
            "--layers: nope not in the model; its layers are fc1, fc2, fc3",
        ),
        (["fisher", "--kinds", "true"], "--kinds true: choose from empirical, exact, mc"),
        (["fisher", "--dataset", "mnist", "--data-dir", "/nonexistent"], "Searched: /nonexistent"),
        (["fisher", "--model", "simple-cnn"], "does not accept digits inputs"),
        (["fisher", "--device", "cuda:0"], "cuda"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("MBF_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    if "cuda:0" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("needs a machine without CUDA")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mbf-analyze: error:") and err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize(
    "argv",
    [
        ["fisher", "--batch-size", "0"],
        ["fisher", "--damping", "-1"],
        ["fisher", "--dataset", "imagenet"],
        ["nope"],
    ],
)
def test_invalid_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
