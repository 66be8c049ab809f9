"""Start-up of ``mbf-analyze``: light imports, the thread policy, Ctrl-C at any moment, and the
name lists that answer ``--help`` without the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mbf_analysis import datafiles, methods, models, training
from mbf_analysis.cli import choices
from mbf_analysis.curvature import FISHER_KINDS
from mbf_analysis.methods.two_level import COARSE_SPACES
from mbf_analysis.training import presets
from mbf_analysis.training.presets import PRESET_SETS

HEAVY = ("torch", "numpy", "pandas", "scipy", "seaborn", "matplotlib", "backpack", "sklearn")
"""Modules that --help, argument errors, refusals and missing data must not import."""


def test_the_light_name_lists_equal_the_registries():
    assert choices.DATASETS == tuple(datafiles.dataset_names())
    assert choices.MODELS == tuple(models.model_names())
    assert choices.ACTIVATIONS == tuple(models.ACTIVATIONS)
    autoencoders = [p.name for p in training.PROBLEMS.values() if p.is_autoencoder]
    assert set(choices.AUTOENCODERS) == set(autoencoders)
    assert choices.METHODS == tuple(methods.names())
    assert choices.PROBLEMS == tuple(training.problem_names())
    assert choices.PROBLEM_DATA == {p.name: p.dataset for p in training.PROBLEMS.values()}
    assert choices.OPTIMIZERS == tuple(training.OPTIMIZERS)
    assert set(choices.PRESET_SETS) == set(PRESET_SETS) and choices.PRESET_SETS[0] == "ours"
    assert choices.COARSE_SPACES == COARSE_SPACES == presets.COARSE_SPACES
    assert choices.TWO_LEVEL_VARIANT == methods.TWO_LEVEL_VARIANT
    assert choices.TWO_LEVEL_VARIANTS == tuple(methods.variants())
    assert choices.FISHER_KINDS == tuple(FISHER_KINDS)


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _loaded_after(argv: list[str], env: dict[str, str] | None = None) -> tuple[list, str, int]:
    """Run ``main(argv)`` in a fresh interpreter; the heavy modules it loaded, stderr, code."""
    code = f"""
import sys
from mbf_analysis.cli import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
print("LOADED", sorted(m for m in {HEAVY!r} if m in sys.modules))
print("CODE", code)
"""
    done = _python(code, env)
    lines = dict(
        line.split(" ", 1) for line in done.stdout.splitlines() if line[:4] in ("LOAD", "CODE")
    )
    return eval(lines["LOADED"]), done.stderr, int(lines["CODE"])  # noqa: S307 (our own output)


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["--help"], 0, ""),
        (["cosine", "--help"], 0, ""),
        (["train", "--problem", "nope", "--epochs", "1"], 2, "invalid choice: 'nope'"),
        (["cosine", "--methods", "mbf,nope"], 2, "unknown nope"),
        (["train", "--problem", "mlp-digits"], 2, "give --time-budget"),
    ],
)
def test_help_and_argument_errors_do_not_import_the_numerical_stack(argv, code, message):
    loaded, err, exit_code = _loaded_after(argv)
    assert exit_code == code
    assert message in err
    assert loaded == []


def test_a_missing_data_file_and_a_refused_folder_do_not_import_it(tmp_path):
    env = {"HOME": str(tmp_path), "MBF_DATA_DIR": str(tmp_path / "none")}
    argv = ["train", "--problem", "mnist-ae", "--epochs", "1", "--data-dir", str(tmp_path)]
    loaded, err, code = _loaded_after(argv, env)
    assert code == 2 and "MNIST files not found" in err and "--download" in err
    assert loaded == []
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"command": "cosine", "status": "complete"}))
    loaded, err, code = _loaded_after(["cosine", "--out", str(out)], env)
    assert code == 2 and "already holds a complete run of `mbf-analyze cosine`" in err
    assert loaded == []


def test_the_wait_policy_is_passive_unless_the_user_chose_one(tmp_path):
    code = """
import os
from mbf_analysis.cli import main
main(["fisher", "--batch-size", "8", "--kinds", "empirical", "--threads", "1",
      "--out", os.environ["OUT"]])
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for policy, chosen_by in ((None, "mbf-analyze"), ("ACTIVE", "user")):
        out = tmp_path / f"run-{chosen_by}"
        run_env = {**env, "OUT": str(out)}
        if policy is not None:
            run_env["OMP_WAIT_POLICY"] = policy
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=run_env
        )
        assert done.returncode == 0, done.stderr
        threads = json.loads((out / "run.json").read_text())["environment"]["threads"]
        assert threads["OMP_WAIT_POLICY"] == (policy or "PASSIVE")
        assert threads["wait_policy_from"] == chosen_by
        assert threads["policy_before_torch"] is True
        assert threads["torch_threads"] == 1


@pytest.mark.parametrize("delay", [0.01, 0.05, 0.3, 1.0, 2.5])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_code_130(tmp_path, delay):
    """SIGINT ``delay`` seconds after the command starts (the interpreter's own start-up is not
    ours to handle): while the CLI and the numerical stack load, while the data loads, or during
    the iterations."""
    out = tmp_path / "run"
    code = f"""
import os, signal, sys, threading, time
go = threading.Event()
def interrupt():
    go.wait()
    time.sleep({delay})
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=interrupt, daemon=True).start()
go.set()
from mbf_analysis.cli import main
sys.exit(main(["cosine", "--out", {str(out)!r}, "--iterations", "1000"]))
"""
    done = _python(code)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    said = [line for line in (done.stdout + done.stderr).splitlines() if "interrupted" in line]
    assert len(said) == 1
    if (out / "cosine_state.pt").is_file():
        assert "--resume --out" in said[0]
