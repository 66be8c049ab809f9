"""``benchmarks/bench_commands.py`` finds every README command and plans its runs; nothing is
timed here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import README, _commands

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_commands.py"
_spec = importlib.util.spec_from_file_location("bench_commands", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_commands"] = bench  # for its dataclass
_spec.loader.exec_module(bench)


def test_it_finds_every_command_that_test_readme_finds():
    expected = {tuple(argv) for argv in _commands() if not bench.HELP_FLAGS & set(argv)}
    found = bench.readme_commands(README)
    assert {c.argv for c in found} == expected
    assert len(found) == len(expected)  # each once
    flat = " ".join(README.replace("\\\n", " ").split())
    assert all(c.text in flat for c in found)  # the text as written


def test_help_lines_are_skipped_and_continuations_joined():
    text = (
        "```bash\nmbf-analyze --help\nmbf-analyze cosine --help\n"
        "mbf-analyze error --layers fc5 \\\n    --out runs/e   # a comment\n"
        "pip install -e . && mbf-analyze cosine\n```\n"
    )
    assert [c.text for c in bench.readme_commands(text)] == [
        "mbf-analyze error --layers fc5 --out runs/e",
        "mbf-analyze cosine",
    ]


def test_a_resume_runs_after_the_command_it_continues():
    commands = bench.readme_commands(README)
    texts = [c.text for c in commands]
    resume = texts.index("mbf-analyze cosine --resume --out runs/fig6")
    chosen = bench.plan(commands, ["cosine --resume"])
    assert [texts[i] for i in chosen] == [
        "mbf-analyze cosine --preset paper --data-dir ../shared/data --out runs/fig6",
        texts[resume],
    ]
    assert bench.plan(commands, ["mbf-analyze cosine"]) == [texts.index("mbf-analyze cosine")]


def test_outputs_go_to_the_temporary_folder_and_data_comes_from_the_repository(tmp_path):
    argv = ("cosine", "--data-dir", "../shared/data", "--out", "runs/fig6", "--cache-dir=c")
    assert bench.rewrite(argv, tmp_path) == [
        "cosine",
        "--data-dir",
        str((SCRIPT.parents[1] / "../shared/data").resolve()),
        "--out",
        str(tmp_path / "runs/fig6"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]


def test_the_readme_table_needs_its_markers():
    with pytest.raises(ValueError, match="costs:start"):
        bench.replace_marked("no markers", "table")
    text = f"a\n{bench.START_MARK}\nold\n{bench.END_MARK}\nb"
    assert bench.replace_marked(text, "new") == f"a\n{bench.START_MARK}\nnew\n{bench.END_MARK}\nb"


def test_list_prints_every_command():
    listed = subprocess.run(
        [sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, check=True
    ).stdout
    assert all(c.text in listed for c in bench.readme_commands(README))
