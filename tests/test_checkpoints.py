"""Pretraining with SGD-m and the on-disk checkpoint cache (tiny settings on the digits)."""

import logging
from dataclasses import replace

import pytest
import torch

from mbf_analysis import checkpoints
from mbf_analysis.checkpoints import (
    CorruptCheckpointError,
    TrainConfig,
    checkpoint_path,
    default_checkpoint_dir,
    load_checkpoint,
    pretrained_model,
    save_checkpoint,
    train_model,
)
from mbf_analysis.data import load_dataset
from mbf_analysis.errors import NonFiniteError
from mbf_analysis.models import build_model

CONFIG = TrainConfig(model="digits-mlp", dataset="digits", epochs=2, lr=0.05, batch_size=256)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of ``checkpoints.train_model`` (the real one still runs)."""
    calls = []
    real = checkpoints.train_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "train_model", counting)
    return calls


def _same_weights(a, b):
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_second_call_loads_the_cache_instead_of_training(tmp_path, digits, counted):
    first = pretrained_model(CONFIG, dataset=digits, cache_dir=tmp_path, progress=False)
    path = checkpoint_path(CONFIG, tmp_path)
    assert path.is_file() and len(counted) == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    second = pretrained_model(CONFIG, dataset=digits, cache_dir=tmp_path, progress=False)
    assert len(counted) == 1
    assert _same_weights(first, second) and not second.training
    other = replace(CONFIG, seed=1)
    pretrained_model(other, dataset=digits, cache_dir=tmp_path, progress=False)
    assert len(counted) == 2 and checkpoint_path(other, tmp_path) != path


def test_training_is_seeded_lowers_the_loss_and_logs_it(digits, caplog):
    with caplog.at_level(logging.INFO, logger="mbf_analysis.checkpoints"):
        model, history = train_model(CONFIG, digits, progress=False)
    again, _ = train_model(CONFIG, digits, progress=False)
    assert _same_weights(model, again)
    assert len(history) == CONFIG.epochs and history[-1] < history[0]
    assert f"final training loss {history[-1]:.4f}" in caplog.text
    torch.manual_seed(CONFIG.seed)
    untrained = build_model(CONFIG.model)
    assert not _same_weights(model, untrained)
    zero, zero_history = train_model(replace(CONFIG, epochs=0), digits, progress=False)
    assert _same_weights(zero, untrained) and zero_history == []


def test_update_is_torch_sgd_with_momentum(digits):
    config = replace(CONFIG, epochs=1, dtype="float64")
    model, _ = train_model(config, digits, progress=False)
    torch.manual_seed(config.seed)
    reference = build_model(config.model).double()
    optimizer = torch.optim.SGD(reference.parameters(), lr=config.lr, momentum=config.momentum)
    order = torch.randperm(1500, generator=torch.Generator().manual_seed(config.seed))
    x, y = digits.train_x.double(), digits.train_y
    for batch in order.split(config.batch_size):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
        optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_training_in_float64(digits):
    model, _ = train_model(replace(CONFIG, epochs=1, dtype="float64"), digits, progress=False)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_corrupt_cache_file_is_retrained_with_a_warning(tmp_path, digits, counted, caplog):
    path = checkpoint_path(CONFIG, tmp_path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path, CONFIG)
    with caplog.at_level(logging.WARNING, logger="mbf_analysis.checkpoints"):
        model = pretrained_model(CONFIG, dataset=digits, cache_dir=tmp_path, progress=False)
    assert len(counted) == 1
    assert "retraining" in caplog.text and str(path) in caplog.text
    loaded, _ = load_checkpoint(path, CONFIG)
    assert _same_weights(model, loaded)


def test_checkpoint_of_another_configuration_is_refused(tmp_path, digits):
    model, history = train_model(replace(CONFIG, epochs=1), digits, progress=False)
    path = checkpoint_path(CONFIG, tmp_path)
    save_checkpoint(path, replace(CONFIG, epochs=1), model, history)
    with pytest.raises(CorruptCheckpointError, match="holds configuration"):
        load_checkpoint(path, CONFIG)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", CONFIG)


def test_interrupted_write_leaves_the_old_file_intact(tmp_path, digits, monkeypatch):
    model, history = train_model(replace(CONFIG, epochs=1), digits, progress=False)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, CONFIG, model, history)
    before = path.read_bytes()

    def interrupted(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, CONFIG, model, history)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_cache_location_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("MBF_CACHE_DIR", str(tmp_path))
    assert default_checkpoint_dir() == tmp_path / "checkpoints"
    assert checkpoint_path(CONFIG).parent == tmp_path / "checkpoints"
    monkeypatch.delenv("MBF_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_checkpoint_dir() == tmp_path / "home" / ".cache" / "mbf_analysis" / "checkpoints"
    assert CONFIG.key == TrainConfig(**vars(CONFIG)).key and len(CONFIG.key) == 16
    changes = dict(
        model="paper-mlp",
        dataset="mnist16",
        epochs=3,
        lr=0.1,
        batch_size=64,
        momentum=0.5,
        seed=7,
        dtype="float64",
    )
    keys = {replace(CONFIG, **{field: value}).key for field, value in changes.items()}
    assert len(keys) == len(changes) and CONFIG.key not in keys


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": -1}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"momentum": 1.0}, "momentum"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_invalid_configurations(change, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **change)


def test_wrong_dataset_and_divergence_are_reported(digits):
    with pytest.raises(ValueError, match="config is for dataset 'mnist16'"):
        train_model(replace(CONFIG, dataset="mnist16"), digits, progress=False)
    poisoned = replace(digits, train_x=digits.train_x.clone())
    poisoned.train_x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="training loss became nan in epoch 1"):
        train_model(replace(CONFIG, epochs=1), poisoned, progress=False)
