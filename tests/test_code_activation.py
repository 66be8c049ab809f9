"""An activation after the autoencoder's code layer: the KPSVD papers' network (issue 18)."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from mbf_analysis.cli import main
from mbf_analysis.errors import ConfigError
from mbf_analysis.models import autoencoder, build_model
from mbf_analysis.training import get_problem

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_the_code_activation_follows_the_narrowest_layer_and_only_it():
    linear = autoencoder([6, 5, 2, 5, 6])
    relu = autoencoder([6, 5, 2, 5, 6], code_activation="relu")
    assert [n for n, _ in linear.named_children()] == [
        "flatten",
        "fc1",
        "act1",
        "fc2",
        "fc3",
        "act3",
        "fc4",
    ]
    assert [n for n, _ in relu.named_children()] == [
        "flatten",
        "fc1",
        "act1",
        "fc2",
        "act2",
        "fc3",
        "act3",
        "fc4",
    ]
    assert isinstance(relu.act2, nn.ReLU)
    relu.load_state_dict(linear.state_dict())  # the same parameters, one module more
    x = torch.randn(7, 6)
    code = relu[:4](x)  # flatten, fc1, act1, fc2: the code before its activation
    torch.testing.assert_close(relu(x), relu.fc4(relu.act3(relu.fc3(code.clamp(min=0)))))
    torch.testing.assert_close(linear(x), linear.fc4(linear.act3(linear.fc3(code))))


@pytest.mark.parametrize(
    "name, code", [("mnist-ae", "fc4"), ("curves-ae", "fc6"), ("faces-ae", "fc4")]
)
def test_every_autoencoder_takes_it_by_name(name, code):
    model = build_model(name, code_activation="relu")
    names = [n for n, _ in model.named_children()]
    assert names[names.index(code) + 1] == f"act{code[2:]}"
    assert f"act{code[2:]}" not in dict(build_model(name).named_children())


def test_a_problem_with_a_code_activation_is_labelled_and_checked():
    problem = get_problem("mnist-ae").with_code_activation("relu")
    assert problem.label == "mnist-ae (relu code)" and problem.code_activation == "relu"
    assert get_problem("mnist-ae").with_code_activation(None) is get_problem("mnist-ae")
    with pytest.raises(ConfigError, match="not an autoencoder"):
        get_problem("mlp-digits").with_code_activation("relu")
    with pytest.raises(ConfigError, match="unknown code activation 'swish'"):
        get_problem("mnist-ae").with_code_activation("swish")


def test_error_on_real_mnist_records_it_and_uses_that_network(tmp_path, capsys):
    out = tmp_path / "relu"
    argv = ["error", "--problem", "mnist-ae", "--code-activation", "relu", "--iterations", "1"]
    argv += ["--data-dir", str(SHARED_DATA), "--layers", "fc5", "--methods", "kfac"]
    argv += ["--fisher-batch-size", "32", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "mnist-ae (relu code)" in capsys.readouterr().out
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["code_activation"] == "relu"
    # The reference batch's Fisher norm of fc5 differs from the linear-code network's at the
    # same seed: the first iteration's fc5 input went through the ReLU.
    linear = tmp_path / "linear"
    assert main([*argv[:3], *argv[5:-1], str(linear)]) == 0
    ours, theirs = (pd.read_csv(d / "error.csv").fisher_norm.iloc[0] for d in (out, linear))
    assert ours != pytest.approx(theirs, rel=1e-3)


def test_train_keeps_it_on_resume_and_refuses_it_off_the_autoencoders(tmp_path, capsys):
    out = tmp_path / "train"
    argv = ["train", "--problem", "mnist-ae", "--code-activation", "relu", "--optimizer", "sgdm"]
    argv += ["--max-steps", "2", "--eval-samples", "64", "--data-dir", str(SHARED_DATA)]
    assert main([*argv, "--batch-size", "32", "--no-progress", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["code_activation"] == "relu"
    resume = ["train", "--resume", "--out", str(out), "--no-progress"]
    assert main([*resume, "--code-activation", "tanh"]) == 2
    assert "--code-activation 'tanh'" in capsys.readouterr().err
    assert (
        main(["train", "--problem", "mlp-digits", "--code-activation", "relu", "--max-steps", "1"])
        == 2
    )
    assert "applies to the autoencoders" in capsys.readouterr().err


def test_the_kpsvd_paper_preset_is_one_flag_and_says_where_each_value_comes_from(tmp_path, capsys):
    out = tmp_path / "paper"
    argv = ["error", "--preset", "kpsvd-paper", "--iterations", "1", "--methods", "kfac"]
    argv += ["--fisher-batch-size", "16", "--data-dir", str(SHARED_DATA), "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--preset kpsvd-paper:" in printed
    assert "code_activation = 'relu' (the paper's public code puts a ReLU" in printed
    assert "iterations = 1 (given; the preset's 2500" in printed
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["preset"] == "kpsvd-paper" and settings["code_activation"] == "relu"
    assert settings["layers"] == ["fc5"] and settings["batch_size"] == 512
    assert main(["error", "--preset", "kpsvd-paper", "--problem", "mnist-ae"]) == 2
    assert "--preset kpsvd-paper sets the problem" in capsys.readouterr().err
