"""StateFile: the one reader and writer of every resumable command's state."""

import errno
import os

import pytest
import torch

from mbf_analysis.errors import StorageError
from mbf_analysis.state_file import StateFile, StateFileError


def _state(k: int) -> dict:
    return {"iteration": k, "weights": torch.full((3,), float(k))}


def _save_on_a_full_disk(state, monkeypatch, fails) -> None:
    """Save iteration 2 while ``os.replace(src, dst)`` raises ENOSPC wherever ``fails`` is true."""
    real = os.replace

    def replace(src, dst):
        if fails(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StorageError, match="No space left on device"):
        state.save(_state(2))
    monkeypatch.undo()


def test_save_keeps_the_state_before_the_latest(tmp_path):
    state = StateFile(tmp_path / "run_state.pt")
    assert state.load() is None and not state.exists()
    for k in range(3):
        state.save(_state(k))
    assert state.previous == tmp_path / "run_state.prev.pt"
    assert torch.load(state.path, weights_only=True)["iteration"] == 2
    assert torch.load(state.previous, weights_only=True)["iteration"] == 1
    assert state.load()["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_state.prev.pt", "run_state.pt"]
    state.drop_previous()
    assert not state.previous.exists() and state.exists()


def test_a_failed_write_changes_neither_file(tmp_path, monkeypatch):
    state = StateFile(tmp_path / "run_state.pt")
    state.save(_state(0))
    state.save(_state(1))
    _save_on_a_full_disk(state, monkeypatch, lambda src, dst: str(src).endswith(".tmp"))
    assert state.load()["iteration"] == 1
    assert torch.load(state.previous, weights_only=True)["iteration"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_state.prev.pt", "run_state.pt"]


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_latest_state_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    state = StateFile(tmp_path / "run_state.pt")
    state.save(_state(4))
    state.save(_state(5))
    if damage == "truncated":
        state.path.write_bytes(state.path.read_bytes()[:50])
    else:
        torch.save({"something": "else"}, state.path)
    restored = {}

    def accept(payload):
        restored["iteration"] = payload["iteration"]  # a KeyError for the foreign payload

    assert state.load(accept=accept)["iteration"] == 4
    assert restored == {"iteration": 4}
    assert str(state.previous) in caplog.text and "run_state.corrupt.pt" in caplog.text
    assert torch.load(state.path, weights_only=True)["iteration"] == 4  # the latest again
    assert state.damaged.is_file() and not state.previous.exists()


def test_no_usable_state_is_one_line_naming_every_file(tmp_path):
    state = StateFile(tmp_path / "run_state.pt")
    state.path.write_bytes(b"garbage")
    state.previous.write_bytes(b"\x00" * 8)
    with pytest.raises(StateFileError) as caught:
        state.load()
    message = str(caught.value)
    assert "\n" not in message
    assert str(state.path) in message and str(state.previous) in message
    assert message.endswith("Delete run_state.pt and run_state.prev.pt to start the run again.")
    assert state.path.read_bytes() == b"garbage"  # nothing is moved or deleted


def test_a_state_that_runs_code_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    state = StateFile(tmp_path / "run_state.pt")
    with state.path.open("wb") as fh:
        pickle.dump(Payload(), fh)
    with pytest.raises(StateFileError, match="not a readable state"):
        state.load()
    assert not (tmp_path / "ran").exists()


def test_a_failed_save_leaves_the_latest_state_and_no_staged_file(tmp_path, monkeypatch):
    """The disk fills at the last rename: the latest state is still the one before the call,
    at its own path, and nothing staged is left behind."""

    state = StateFile(tmp_path / "run_state.pt")
    state.save(_state(0))
    state.save(_state(1))
    _save_on_a_full_disk(state, monkeypatch, lambda src, dst: str(dst) == str(state.path))
    assert torch.load(state.path, weights_only=True)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_state.prev.pt", "run_state.pt"]
