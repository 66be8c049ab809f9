"""The `mbf-analyze` command line: defaults, saved files, and one-line errors with exit code 2."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mbf_analysis import checkpoints
from mbf_analysis.analysis import miniblock_mass
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
    assert record["command"] == "fisher" and record["status"] == "complete"
    assert record["settings"]["batch_size"] == 64
    assert record["environment"]["versions"]["torch"]
    assert "untrained" in printed


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


@pytest.mark.parametrize("error", [ValueError("injected"), KeyError("injected")])
def test_an_unexpected_exception_is_a_bug_with_its_traceback_and_exit_code_1(
    error, tmp_path, capsys, monkeypatch
):
    from mbf_analysis.analysis import summary

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(summary, "layer_fisher", broken)
    code = main(["fisher", "--batch-size", "16", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert f"{type(error).__name__}: " in err and "in broken" in err
    assert "this is a bug in mbf-analysis" in err
    assert "mbf-analyze: error:" not in err


def test_the_toolkit_s_own_errors_stay_one_line(tmp_path, capsys, monkeypatch):
    from mbf_analysis.analysis import summary
    from mbf_analysis.errors import ConfigError

    def refuses(*args, **kwargs):
        raise ConfigError("damping must be positive")

    monkeypatch.setattr(summary, "layer_fisher", refuses)
    code = main(["fisher", "--batch-size", "16", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.endswith("\nmbf-analyze: error: damping must be positive\n")
    assert "Traceback" not in err


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


def test_heatmap_run_saves_figures_matrices_and_uses_the_cache(tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["heatmap", "--batch-size", "48", "--epochs", "2", "--cache-dir", str(cache)]
    assert main([*argv, "--max-dim", "600", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not analysed whole (over --max-dim 600): fc1 (d = 2080)" in printed
    assert "digits-mlp (after 2 epochs of SGD-m" in printed and "mass_vs_area" in printed
    for name in ("heatmap_empirical", "heatmap_exact"):
        for suffix in (".png", ".pdf"):
            assert (out / f"{name}{suffix}").stat().st_size > 1000
    frame = pd.read_csv(out / "heatmap_mass.csv")
    assert list(frame.subset) == ["fc2", "fc3"] * 2
    assert list(frame.blocks) == ["16×33", "10×17"] * 2
    assert (frame.miniblock_mass > frame.miniblock_area).all()
    saved = torch.load(out / "heatmap_matrices.pt", weights_only=True)
    for row in frame.itertuples():
        matrix = saved["matrices"][row.kind][row.subset]
        assert matrix.shape == (row.dim, row.dim)
        mass, area = miniblock_mass(matrix, saved["block_sizes"][row.subset])
        assert (mass, area) == pytest.approx((row.miniblock_mass, row.miniblock_area))
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "heatmap" and record["settings"]["epochs"] == 2
    assert sorted(record["files"]) == sorted(
        ["heatmap_mass.csv", "heatmap_matrices.pt"]
        + [f"heatmap_{k}.{e}" for k in ("empirical", "exact") for e in ("png", "pdf")]
    )
    assert set(record["timings_s"]) == {"load", "pretrain", "fisher", "plot"}
    assert len(list(cache.glob("*.pt"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been loaded")

    monkeypatch.setattr(checkpoints, "train_model", no_training)
    assert main([*argv, "--kinds", "empirical", "--layers", "fc3"]) == 0  # no --out: prints
    assert "fc3 empirical Fisher (EFM) 170 10×17" in " ".join(capsys.readouterr().out.split())


def test_heatmap_conv2_input_channels_on_real_fashion_mnist(tmp_path, capsys):
    out = tmp_path / "cnn"
    argv = [
        "heatmap",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(SHARED_DATA),
        "--epochs",
        "0",
        "--layers",
        "",
        "--channels",
        "conv2=32,32",
        "--batch-size",
        "8",
        "--kinds",
        "empirical",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "conv2 input channel 32 " in printed
    frame = pd.read_csv(out / "heatmap_mass.csv")  # a repeated channel is analysed once
    assert list(frame.dim) == [1600] and list(frame.blocks) == ["64×25"]
    assert frame.miniblock_area.tolist() == pytest.approx([1 / 64])
    saved = torch.load(out / "heatmap_matrices.pt", weights_only=True)
    first = saved["indices"]["conv2 input channel 32"][:3].tolist()
    assert first == [31 * 25, 31 * 25 + 1, 31 * 25 + 2]  # 1-based channel 32 is weight[:, 31]
    assert saved["layers"]["conv2 input channel 32"] == "conv2"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["heatmap", "--layers", "fc9"], "--layers: fc9 not in the model"),
        (["heatmap", "--channels", "fc1=1"], "--channels fc1: not a convolution of the model"),
        (["heatmap", "--kinds", "true"], "--kinds true: choose from empirical, exact, mc"),
        (["heatmap", "--layers", ""], "nothing to analyse"),
        (["heatmap", "--dataset", "mnist16", "--data-dir", "/nonexistent"], "Searched"),
        (
            [
                "heatmap",
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                str(SHARED_DATA),
                "--channels",
                "conv2=33",
            ],
            "--channels conv2=33: channels are 1-based, conv2 reads channels 1..32",
        ),
    ],
)
def test_heatmap_bad_input_gives_one_line_and_exit_code_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("MBF_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mbf-analyze: error:") and err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["heatmap", "--channels", "conv2"], "LAYER=I,J,..."),
        (["heatmap", "--channels", "conv2=a"], "LAYER=I,J,..."),
        (["heatmap", "--epochs", "-1"], "--epochs: must be 0 or more, got -1"),
        (["fisher", "--epochs", "-1"], "--epochs: must be 0 or more, got -1"),
    ],
)
def test_malformed_values_are_argparse_errors_with_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_heatmap_flags_a_subset_that_the_damping_dominates(tmp_path, capsys, monkeypatch):
    """With λ far above the spectrum, (F + λI)⁻¹ ≈ I/λ: the table, a warning and the figure's
    panel title say so."""
    from mbf_analysis import plotting  # the subcommand imports it when it runs

    titles: list[str] = []
    original = plotting.plot_heatmap_grid

    def capture(matrices, *args, **kwargs):
        titles.extend(matrices)
        titles.append(kwargs.get("suptitle", ""))
        return original(matrices, *args, **kwargs)

    monkeypatch.setattr(plotting, "plot_heatmap_grid", capture)
    out = tmp_path / "run"
    argv = ["heatmap", "--batch-size", "32", "--epochs", "0", "--layers", "fc3"]
    assert main([*argv, "--kinds", "empirical", "--damping", "1e3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(λ dominates)" in printed
    assert "warning: λ = 1000 dominates the spectrum of fc3" in printed
    frame = pd.read_csv(out / "heatmap_mass.csv")
    assert frame.damping_dominated.all() and (frame.eig_max <= 1e3).all()
    assert any("λ dominates: max eig(F) ≤ λ" in t for t in titles)
    assert "empirical Fisher (EFM)" in titles[-1] and "digits-mlp on digits" in titles[-1]
