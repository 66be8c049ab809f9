"""Every snippet and command of the README works as written.

The Python blocks run in order in one namespace from the repository root (they read
``../shared/data``, as the README says); the training snippet must lower the loss. Every
``mbf-analyze`` command of the shell blocks must parse; the Quickstart's analysis runs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mbf_analysis.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
FIGURES_README = (REPO / "figures" / "README.md").read_text()

pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _commands(text: str = README) -> list[list[str]]:
    """The ``mbf-analyze`` commands of the shell blocks, continuation lines joined."""
    commands = []
    for block in _blocks("bash", text):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split("#", 1)[0])
                if words and words[0] == "mbf-analyze":
                    commands.append(words[1:])
    return commands


def test_the_readme_has_snippets_and_commands():
    assert len(_blocks("python")) >= 3 and len(_commands()) >= 10


def test_the_python_snippets_run_as_written_and_the_optimizer_trains(monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    losses = namespace["losses"]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("argv", _commands(), ids=lambda argv: " ".join(argv)[:60])
def test_every_command_parses(argv):
    build_parser().parse_args(argv)


def _figure_commands() -> list[list[str]]:
    """The shell blocks' commands of ``figures/README.md`` and those of its tables (inline)."""
    inline = re.findall(r"`mbf-analyze ([^`]+)`", FIGURES_README)
    return _commands(FIGURES_README) + [shlex.split(text) for text in inline]


@pytest.mark.parametrize("argv", _figure_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_every_figure_command_parses(argv):
    """The commands that made the figures (``figures/README.md``) still parse as written."""
    build_parser().parse_args(argv)


def test_the_quickstart_analysis_runs_as_written(tmp_path, monkeypatch, capsys):
    quickstart = [argv for argv in _commands() if argv == ["cosine"]]
    assert quickstart, "the Quickstart runs `mbf-analyze cosine`"
    monkeypatch.chdir(tmp_path)
    assert main([*quickstart[0], "--no-progress"]) == 0
    out = tmp_path / "runs" / "cosine-digits-digits-mlp"
    printed = capsys.readouterr().out
    assert "median cosine with BDF" in printed
    # on digits the loss collapses: the run says so, with the medians before the collapse
    losses = pd.read_csv(out / "cosine.csv").groupby("iteration").loss.first().to_numpy()
    typical = [np.median(losses[max(0, k - 4) : k + 1]) for k in range(len(losses))]
    collapsed = next(k for k, value in enumerate(typical) if value < 0.01 * losses[0])
    assert json.loads((out / "run.json").read_text())["collapse_iteration"] == collapsed
    assert f"collapsed below 0.01× its first value by iteration {collapsed}" in printed
    assert f"Medians over iterations 0-{collapsed - 1}, before the collapse:" in printed
