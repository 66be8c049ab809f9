"""``mbf-analyze cosine``: files, resume without duplicates or gaps, presets, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mbf_analysis.analysis import FULL_COLUMNS, NETWORK, CosineRun
from mbf_analysis.cli import main
from mbf_analysis.cli.cosine import PRESETS, _Recorder, median_table

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = ["--batch-size", "64", "--methods", "mbf,kfac,sgdm", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out: Path, *extra: str) -> int:
    return main(["cosine", "--out", str(out), *SMALL, *extra])


def _rows(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "cosine.csv")


def test_a_run_writes_every_file_and_prints_the_median_table(tmp_path, capsys):
    assert _run(tmp_path, "--iterations", "4", "--checkpoint-every", "3") == 0
    rows = _rows(tmp_path)
    assert list(rows.columns) == ["iteration", "layer", "method", "cosine", "loss"]
    assert len(rows) == 4 * 3 * 3  # iterations × layers (fc1-fc3) × methods
    assert sorted(rows.iteration.unique()) == [0, 1, 2, 3]
    assert rows.cosine.between(-1, 1).all()
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["settings"]["iterations"] == 4 and record["settings"]["model"] == "digits-mlp"
    assert record["timings_s"]["per_iteration"] > 0
    assert record["environment"]["versions"]["torch"]
    assert record["environment"]["threads"]["torch_threads"] == 1
    for name in ("cosine.png", "cosine.pdf", "cosine_state.pt"):
        assert (tmp_path / name).stat().st_size > 0
    state = torch.load(tmp_path / "cosine_state.pt", weights_only=True)
    assert state["iteration"] == 4  # saved at the end, not only at the checkpoint (3)
    printed = capsys.readouterr().out
    table = median_table(rows)
    assert list(table.index) == ["mbf", "kfac", "sgdm"] and list(table.columns) == [
        "fc1",
        "fc2",
        "fc3",
    ]
    assert f"{table.loc['kfac', 'fc2']:.3f}" in printed


def test_median_table_is_the_median_per_method_and_layer():
    frame = pd.DataFrame(
        {
            "iteration": [0, 1, 2, 0, 1, 2],
            "layer": ["a"] * 6,
            "method": ["x", "x", "x", "y", "y", "y"],
            "cosine": [0.1, 0.9, 0.5, 0.2, 0.4, 0.3],
            "loss": [1.0] * 6,
        }
    )
    table = median_table(frame)
    assert table.loc["x", "a"] == pytest.approx(0.5) and table.loc["y", "a"] == pytest.approx(0.3)


def _interrupt_at(monkeypatch, iteration: int) -> None:
    original = CosineRun._iterate

    def iterate(self):
        if self.iteration == iteration:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(CosineRun, "_iterate", iterate)


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(whole, "--iterations", "8") == 0
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 6)
        with pytest.raises(SystemExit) as exit_info:
            _run(parts, "--iterations", "8", "--checkpoint-every", "4")
    assert exit_info.value.code == 130
    assert "--resume --out" in capsys.readouterr().out
    assert sorted(_rows(parts).iteration.unique()) == list(range(6))  # a valid partial CSV
    assert json.loads((parts / "run.json").read_text())["status"] == "interrupted"
    with (parts / "cosine.csv").open("a") as fh:
        fh.write("6,fc1,mb")  # a line cut short by a kill
    assert main(["cosine", "--resume", "--out", str(parts), "--no-progress"]) == 0
    resumed, expected = _rows(parts), _rows(whole)
    assert not resumed.duplicated(["iteration", "layer", "method"]).any()
    pd.testing.assert_frame_equal(resumed, expected)


def test_by_default_the_state_is_saved_by_time_and_at_the_start(tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(whole, "--iterations", "5") == 0
    monkeypatch.setattr(_Recorder, "SAVE_INTERVAL_S", 1e9)  # no save by time in this run
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        with pytest.raises(SystemExit):
            _run(parts, "--iterations", "5")
    assert torch.load(parts / "cosine_state.pt", weights_only=True)["iteration"] == 0
    assert main(["cosine", "--resume", "--out", str(parts), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(_rows(parts), _rows(whole))
    monkeypatch.setattr(_Recorder, "SAVE_INTERVAL_S", 0.0)  # a save after every iteration
    saved = []
    monkeypatch.setattr(_Recorder, "save", lambda self: saved.append(self.run.iteration))
    assert _run(tmp_path / "each", "--iterations", "3") == 0
    assert saved == [0, 1, 2, 3, 3]  # start, each iteration, end


def test_resume_extends_a_finished_run_to_more_iterations(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(whole, "--iterations", "5") == 0
    assert _run(parts, "--iterations", "3") == 0
    first = json.loads((parts / "run.json").read_text())["timings_s"]
    assert main(["cosine", "--resume", "--out", str(parts), "--iterations", "5"]) == 0
    pd.testing.assert_frame_equal(_rows(parts), _rows(whole))
    # the timings add up over the sessions; a resume with nothing left keeps them
    second = json.loads((parts / "run.json").read_text())["timings_s"]
    assert first["iterations_done"] == 3 and second["iterations_done"] == 5
    assert second["iterations"] > first["iterations"] > 0
    assert second["per_iteration"] == pytest.approx(second["iterations"] / 5)
    assert main(["cosine", "--resume", "--out", str(parts), "--no-progress"]) == 0
    third = json.loads((parts / "run.json").read_text())["timings_s"]
    assert third["iterations_done"] == 5
    assert third["iterations"] == pytest.approx(second["iterations"], abs=0.05)


def test_the_paper_preset_runs_the_paper_setting_on_real_data(tmp_path):
    assert PRESETS["paper"]["layers"] == ["fc2", "fc3", "fc4", "fc5"]
    args = ["cosine", "--preset", "paper", "--data-dir", str(SHARED_DATA), "--out", str(tmp_path)]
    assert main([*args, "--iterations", "2", "--methods", "mbf", "--no-progress"]) == 0
    rows = _rows(tmp_path)
    assert sorted(rows.layer.unique()) == ["fc2", "fc3", "fc4", "fc5"]
    settings = json.loads((tmp_path / "run.json").read_text())["settings"]
    assert (settings["dataset"], settings["model"]) == ("mnist16", "paper-mlp")
    assert settings["iterations"] == 2  # explicit options override the preset's 500


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "mbf,newton"], "choose from"),
        (["--layers", "fc9"], "fc9 not in the model"),
        (["--seed", "-1"], "--seed"),
        (["--dataset", "mnist16", "--data-dir", "{empty}"], "mnist16"),
        (["--resume"], "no run to continue"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MBF_DATA_DIR", str(empty))
    monkeypatch.setenv("MBF_CACHE_DIR", str(empty))
    extra = [str(empty) if arg == "{empty}" else arg for arg in extra]
    assert _run(tmp_path / "out", "--iterations", "1", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mbf-analyze: error:") and "\n" not in err
    assert message in err


def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert _run(tmp_path, "--iterations", "1") == 0
    assert main(["cosine", "--resume", "--out", str(tmp_path), "--lr", "0.5"]) == 2
    assert "lr=0.5 (saved 0.1)" in capsys.readouterr().err


def test_a_diverging_run_keeps_its_rows_and_says_what_to_change(tmp_path, capsys):
    code = _run(
        tmp_path, "--iterations", "30", "--lr", "1e38", "--dtype", "float32", "--methods", "sgdm"
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "diverged at iteration" in err and "larger damping" in err
    rows = _rows(tmp_path)
    first_bad = int(err.split("diverged at iteration ")[1].split(":")[0])
    assert sorted(rows.iteration.unique()) == list(range(first_bad))
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "diverged"


def test_the_all_layer_reference_writes_the_energy_error_and_the_network_rows(tmp_path, capsys):
    out = tmp_path / "full"
    argv = ["cosine", "--reference", "full", "--fisher", "exact", "--coarse", "residual,spectral"]
    argv += ["--methods", "kfac,kfac-two-level", "--iterations", "3", "--batch-size", "64"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    rows = pd.read_csv(out / "cosine.csv")
    assert list(rows.columns) == list(FULL_COLUMNS)
    two_level = ["kfac-two-level-residual", "kfac-two-level-spectral"]  # one per coarse space
    assert list(dict.fromkeys(rows.method)) == ["kfac", *two_level, "bdf"]  # BDF is compared too
    assert set(rows.layer) == {"fc1", "fc2", "fc3", NETWORK}
    network = rows[rows.layer == NETWORK].set_index(["iteration", "method"]).energy_error
    for k in range(3):  # the coarse correction never raises the network's energy error
        for name in two_level:
            assert network[k, name] <= network[k, "kfac"] + 1e-12
    assert network[0, two_level[0]] != network[0, two_level[1]]  # different coarse spaces
    for name in ("cosine.png", "energy_error.png", "energy_error.pdf"):
        assert (out / name).stat().st_size > 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["reference"], settings["fisher"], settings["coarse"]) == (
        "full",
        "exact",
        ["residual", "spectral"],
    )
    assert settings["methods"] == ["kfac", *two_level]
    printed = capsys.readouterr().out
    assert "median F_λ-norm relative error against F_λ⁻¹∇ (exact Fisher, all layers)" in printed
    assert main(["cosine", "--resume", "--out", str(out), "--iterations", "4"]) == 0
    assert sorted(pd.read_csv(out / "cosine.csv").iteration.unique()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fisher", "exact"], "--fisher exact sets the F of --reference full"),
        (["--coarse", "spectral"], "--coarse sets kfac-two-level's coarse space"),
    ],
)
def test_full_reference_options_need_their_context(extra, message, tmp_path, capsys):
    assert main(["cosine", "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_iteration_timings_read_a_record_written_before_the_count():
    from mbf_analysis.cli.recording import iteration_timings

    legacy = {"load": 1.0, "iterations": 30.0, "per_iteration": 3.0}  # 10 iterations
    assert iteration_timings(legacy, 0.0, 0) == {
        "iterations": 30.0,
        "iterations_done": 10,
        "per_iteration": 3.0,
    }
    assert iteration_timings(None, 0.5, 0) == {"iterations": 0.5, "iterations_done": 0}
