"""One vocabulary for the Fisher kinds in every option, file and title (issue 19)."""

import json

import pandas as pd
import pytest
import torch
from torch import nn

from mbf_analysis import methods
from mbf_analysis.analysis.approximation import ApproximationConfig
from mbf_analysis.cli import main
from mbf_analysis.curvature import fisher_rows
from mbf_analysis.errors import ConfigError
from mbf_analysis.fisher_kinds import FISHER_KINDS
from mbf_analysis.methods.mbf import MBFConfig

SMALL = ["--methods", "kfac,mbf", "--iterations", "3", "--every", "2", "--no-progress"]


@pytest.mark.parametrize("kind", FISHER_KINDS)
def test_every_python_option_takes_the_same_words(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    rows = next(fisher_rows(model, nn.CrossEntropyLoss(), x, y, kind=kind))
    assert rows["0"].shape[1] == 16
    for name in ("kfac", "kpsvd", "deflation", "lanczos", "kfac-corrected", "kfac-two-level"):
        assert methods.get(name, fisher=kind).config.fisher == kind
    assert ApproximationConfig(fisher=kind).fisher == kind


@pytest.mark.parametrize(
    "build",
    [
        lambda word: methods.get("kfac", fisher=word),
        lambda word: methods.get("kpsvd", fisher=word),
        lambda word: ApproximationConfig(fisher=word),
        lambda word: MBFConfig(statistic=word),
    ],
)
@pytest.mark.parametrize("old", ["true", "sampled"])
def test_an_old_spelling_is_refused_in_python_with_the_new_word(build, old):
    with pytest.raises(ConfigError, match=f"'{old}' is now spelled 'mc'"):
        build(old)


def test_the_defaults_are_the_monte_carlo_fisher_under_its_one_name():
    assert methods.get("kfac").config.fisher == "mc"
    assert methods.get("mbf-true").config.statistic == "mc"
    assert ApproximationConfig().fisher == "mc"


def test_error_csv_holds_words_that_read_back_as_words(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["error", "--out", str(out), *SMALL, "--fisher", "true"]) == 0
    err = capsys.readouterr().err
    assert "'true' is deprecated as a Fisher kind; it is read as 'mc'" in err
    rows = pd.read_csv(out / "error.csv")
    assert rows.fisher.dtype != bool and set(rows.fisher) == {"mc"}
    assert json.loads((out / "run.json").read_text())["settings"]["fisher"] == "mc"


def test_resuming_a_run_recorded_with_the_old_word_continues_under_the_new_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["error", "--out", str(out), *SMALL]) == 0
    # The files as the previous version wrote them: 'true' in run.json, in the state's config
    # and in the CSV (which a resume read back through pandas as the boolean True).
    record_path = out / "run.json"
    record = json.loads(record_path.read_text())
    record["settings"]["fisher"] = "true"
    record_path.write_text(json.dumps(record))
    state = torch.load(out / "error_state.pt", weights_only=True)
    state["config"]["fisher"] = "true"
    torch.save(state, out / "error_state.pt")
    csv = out / "error.csv"
    csv.write_text(csv.read_text().replace(",mc,", ",true,"))
    # the new word on the command line agrees with the old one in the record
    assert (
        main(["error", "--resume", "--out", str(out), "--iterations", "5", "--fisher", "mc"]) == 0
    )
    assert "changed settings" not in capsys.readouterr().err
    rows = pd.read_csv(csv)
    assert set(rows.fisher) == {"mc"} and sorted(rows.iteration.unique()) == [0, 2, 4]
