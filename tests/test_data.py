"""Tests of mbf_analysis.data: real MNIST / Fashion-MNIST, tiny canonical-format files for the
other readers, file lookup, downloads (with a fake fetch) and error messages."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbf_analysis import data, datafiles
from mbf_analysis.data import (
    DATASETS,
    ENV_VAR,
    ChecksumError,
    CorruptDataError,
    DataError,
    DataNotFoundError,
    Dataset,
    DownloadError,
    RemoteFile,
    dataset_names,
    default_cache_dir,
    get_dataset_spec,
    load_dataset,
)

_BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = _BESIDE_REPO if _BESIDE_REPO.is_dir() else Path("/work/shared/data")

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

# Canonical download locations, written out independently of the module's constants.
SOURCES = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "mnist16": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
    "curves": "https://www.cs.toronto.edu/~jmartens/digs3pts_1.mat",
    "faces": "https://www.cs.toronto.edu/~jmartens/newfaces_rot_single.mat",
}
FILE_BASED = [name for name in dataset_names() if DATASETS[name].files]


@pytest.fixture(autouse=True)
def _isolated_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the real $MBF_DATA_DIR or ~/.cache/mbf_analysis."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_VAR, raising=False)


def _load_shared(name: str, folder: Path = SHARED_DATA) -> Dataset:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", "/nonexistent/mbf-analysis-test-home")
        mp.delenv(ENV_VAR, raising=False)
        return load_dataset(name, folder)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return _load_shared("mnist")


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return _load_shared("fashion-mnist")


@pytest.fixture(scope="module")
def mnist16() -> Dataset:
    return _load_shared("mnist16")


# --------------------------------------------------------------------------------------------
# Writers of tiny files in the canonical formats
# --------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None, dims: tuple[int, ...] | None = None):
    """Uncompressed IDX content of a uint8 array (header overridable to make bad files)."""
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = array.shape if dims is None else dims
    return struct.pack(f">I{len(dims)}I", magic, *dims) + array.astype(np.uint8).tobytes()


def write_gz(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload))


def write_tiny_mnist(folder: Path, seed: int = 0, n_train: int = 6, n_test: int = 4) -> dict:
    """Four valid IDX gz files with random content; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_gz(folder / name, idx_bytes(array))
    return arrays


def as_bytes(x: torch.Tensor) -> np.ndarray:
    """Undo the division by 255 (exact for values that were bytes)."""
    k = (x.double() * 255).round()
    assert torch.equal(x, k.float() / 255), "values are not float32(k) / 255"
    return k.to(torch.uint8).numpy()


def write_cifar_batch(path: Path, data_u8: np.ndarray, labels: dict[bytes, list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"tiny", b"data": data_u8, b"filenames": [b"x"] * len(data_u8)}
    batch.update(labels)
    with path.open("wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def write_tiny_cifar10(folder: Path, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    sizes = [3, 2, 3, 1, 2, 4]  # data_batch_1..5, test_batch
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    xs, ys = [], []
    for name, n in zip(names, sizes, strict=True):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        write_cifar_batch(folder / name, x, {b"labels": y})
        xs.append(x)
        ys.append(y)
    train_x, train_y = np.concatenate(xs[:5]), np.concatenate(ys[:5])
    return train_x, train_y, xs[5], np.array(ys[5])


# --------------------------------------------------------------------------------------------
# Real MNIST and Fashion-MNIST
# --------------------------------------------------------------------------------------------


def test_shared_data_is_present() -> None:
    for sub in ("mnist", "fashion_mnist"):
        for name in MNIST_FILES:
            assert (SHARED_DATA / sub / name).is_file(), f"missing {SHARED_DATA / sub / name}"


@pytest.mark.parametrize("fixture", ["mnist", "fashion"])
def test_real_shapes_dtypes_range(fixture: str, request: pytest.FixtureRequest) -> None:
    ds: Dataset = request.getfixturevalue(fixture)
    assert ds.train_x.shape == (60000, 1, 28, 28)
    assert ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.float32
    assert ds.train_y.shape == (60000,) and ds.test_y.shape == (10000,)
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    for x in (ds.train_x, ds.test_x):
        assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28) and ds.input_dim == 784
    assert ds.has_labels


def test_mnist_class_counts(mnist: Dataset) -> None:
    assert torch.bincount(mnist.train_y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test_y, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_fashion_class_counts(fashion: Dataset) -> None:
    assert torch.bincount(fashion.train_y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(fashion.test_y, minlength=10).tolist() == [1000] * 10


def test_mnist_pixels_match_an_independent_parse(mnist: Dataset) -> None:
    raw = gzip.decompress((SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    pixels = np.frombuffer(raw[16:], dtype=np.uint8).reshape(10000, 1, 28, 28)
    np.testing.assert_array_equal(as_bytes(mnist.test_x), pixels)
    labels = gzip.decompress((SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    np.testing.assert_array_equal(mnist.test_y.numpy(), np.frombuffer(labels[8:], np.uint8))


def test_folder_holding_the_files_directly(mnist: Dataset) -> None:
    direct = _load_shared("mnist", SHARED_DATA / "mnist")
    assert torch.equal(direct.train_x, mnist.train_x)
    assert torch.equal(direct.test_y, mnist.test_y)


@pytest.mark.parametrize(
    ("name", "folder", "other"),
    [("fashion-mnist", "mnist", "MNIST"), ("mnist", "fashion_mnist", "Fashion-MNIST")],
)
def test_folder_of_the_other_dataset_is_not_used(name: str, folder: str, other: str) -> None:
    with pytest.raises(DataNotFoundError, match=f"holds {other}, not"):
        load_dataset(name, SHARED_DATA / folder)


# --------------------------------------------------------------------------------------------
# MNIST 16x16
# --------------------------------------------------------------------------------------------


def _area_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    return [(math.floor(a * n_in / n_out), math.ceil((a + 1) * n_in / n_out)) for a in range(n_out)]


def test_mnist16_shapes_and_labels(mnist16: Dataset, mnist: Dataset) -> None:
    assert mnist16.train_x.shape == (60000, 1, 16, 16)
    assert mnist16.test_x.shape == (10000, 1, 16, 16)
    assert mnist16.train_x.dtype == torch.float32 and mnist16.input_shape == (1, 16, 16)
    assert mnist16.train_x.min() >= 0 and mnist16.train_x.max() <= 1
    assert torch.equal(mnist16.train_y, mnist.train_y)
    assert torch.equal(mnist16.test_y, mnist.test_y)


def test_mnist16_is_the_area_average_computed_by_hand(mnist16: Dataset, mnist: Dataset) -> None:
    windows = _area_windows(28, 16)
    for big, small in ((mnist.train_x, mnist16.train_x), (mnist.test_x, mnist16.test_x)):
        for n in (0, 1, 7, len(big) - 1):
            image = big[n, 0].double()
            by_hand = torch.tensor(
                [[image[r0:r1, c0:c1].mean().item() for c0, c1 in windows] for r0, r1 in windows],
                dtype=torch.float64,
            )
            torch.testing.assert_close(small[n, 0].double(), by_hand, rtol=0, atol=1e-6)


def test_mnist16_mean_is_a_fixed_reweighting_of_the_28x28_mean(
    mnist16: Dataset, mnist: Dataset
) -> None:
    # Exact identity for every image: mean16 = sum_ij x_ij u_i u_j, u_i = (1/16) sum over the
    # windows a containing pixel i of 1/|window a|. The u_i are not all 1/28 (the windows
    # overlap unevenly), so the per-image mean is not preserved exactly.
    u = torch.zeros(28, dtype=torch.float64)
    for r0, r1 in _area_windows(28, 16):
        u[r0:r1] += 1.0 / (r1 - r0) / 16
    assert u.sum().item() == pytest.approx(1.0)
    weights = torch.outer(u, u)
    predicted = torch.einsum("nij,ij->n", mnist.train_x[:, 0].double(), weights)
    actual = mnist16.train_x.double().mean(dim=(1, 2, 3))
    torch.testing.assert_close(actual, predicted, rtol=0, atol=1e-6)
    # Across the data set the reweighting nearly cancels (digits are centred and smooth at the
    # 2-3 pixel scale of the weights' period); measured: 0.5 % relative. 2 % still fails for a
    # resize that drops a border row or rescales intensities.
    mean28 = mnist.train_x.double().mean().item()
    assert abs(actual.mean().item() - mean28) / mean28 < 0.02


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------


def test_digits_shapes_range_and_deterministic_split(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", tmp_path / "no-files-needed")
    assert ds.train_x.shape == (1500, 1, 8, 8) and ds.test_x.shape == (297, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_x.min().item() == 0.0 and ds.train_x.max().item() == 1.0
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    reference = load_digits()
    expected = torch.from_numpy(reference.images / 16.0).float()
    assert torch.equal(ds.train_x[:, 0], expected[:1500])
    assert torch.equal(ds.test_x[:, 0], expected[1500:])
    assert ds.test_y.tolist() == reference.target[1500:].tolist()
    again = load_dataset("DIGITS")
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


# --------------------------------------------------------------------------------------------
# Tiny IDX files: round trip and corruption
# --------------------------------------------------------------------------------------------


def test_tiny_idx_round_trip(tmp_path: Path) -> None:
    arrays = write_tiny_mnist(tmp_path / "mnist")
    ds = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(as_bytes(ds.train_x)[:, 0], arrays[MNIST_FILES[0]])
    np.testing.assert_array_equal(ds.train_y.numpy(), arrays[MNIST_FILES[1]])
    np.testing.assert_array_equal(as_bytes(ds.test_x)[:, 0], arrays[MNIST_FILES[2]])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays[MNIST_FILES[3]])


def _corrupt(folder: Path, kind: str) -> tuple[str, str]:
    """Damage one file of a valid tiny MNIST; return (damaged file, expected message part)."""
    images, labels = folder / MNIST_FILES[0], folder / MNIST_FILES[1]
    train_images = np.zeros((6, 28, 28), dtype=np.uint8)
    if kind == "garbage":
        images.write_bytes(b"<html>403 Forbidden</html>")
        return images.name, "gzip"
    if kind == "truncated-gzip":
        images.write_bytes(images.read_bytes()[:-40])
        return images.name, "gzip"
    if kind == "wrong-magic":
        write_gz(images, idx_bytes(train_images, magic=0x00000801, dims=(6 * 28 * 28,)))
        return images.name, "0x00000801, expected 0x00000803"
    if kind == "short-payload":
        write_gz(images, idx_bytes(train_images)[:-100])
        return images.name, "header gives dimensions [6, 28, 28]"
    if kind == "long-payload":
        write_gz(images, idx_bytes(train_images) + b"\x00")
        return images.name, "4705 bytes of data"
    if kind == "count-mismatch":
        write_gz(labels, idx_bytes(np.zeros(5, dtype=np.uint8)))
        return labels.name, "6 images"
    if kind == "label-out-of-range":
        write_gz(labels, idx_bytes(np.array([0, 1, 2, 3, 4, 10], dtype=np.uint8)))
        return labels.name, "expected 0..9"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "garbage",
        "truncated-gzip",
        "wrong-magic",
        "short-payload",
        "long-payload",
        "count-mismatch",
        "label-out-of-range",
    ],
)
def test_corrupt_idx_file_gives_clear_error(tmp_path: Path, kind: str) -> None:
    write_tiny_mnist(tmp_path)
    filename, expected = _corrupt(tmp_path, kind)
    with pytest.raises(CorruptDataError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert str(tmp_path / filename) in message
    assert expected in message
    assert isinstance(info.value, DataError)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 255), max_size=40),
    change=st.integers(-48, 3).filter(lambda c: c != 0),
)
def test_idx_payload_must_match_header(labels: list[int], change: int) -> None:
    content = idx_bytes(np.array(labels, dtype=np.uint8))
    damaged = content + b"\x07" * change if change > 0 else content[: max(0, len(content) + change)]
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = Path(tmp) / "good.gz", Path(tmp) / "bad-labels.gz"
        write_gz(good, content)
        write_gz(bad, damaged)
        assert data._read_idx(good, 0x00000801).tolist() == labels
        with pytest.raises(CorruptDataError, match="bad-labels.gz"):
            data._read_idx(bad, 0x00000801)


# --------------------------------------------------------------------------------------------
# The other readers, on tiny files in their canonical formats
# --------------------------------------------------------------------------------------------


def test_cifar10_round_trip(tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = write_tiny_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train_x.shape == (11, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(as_bytes(ds.train_x), train_x.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(as_bytes(ds.test_x), test_x.reshape(-1, 3, 32, 32))
    assert ds.train_y.tolist() == train_y.tolist() and ds.test_y.tolist() == test_y.tolist()
    assert ds.train_y.dtype == torch.int64 and ds.num_classes == 10
    # Channel planes: the first 1024 bytes of a row are the red 32x32 image, row-major.
    assert ds.train_x[0, 0, 0, 1].item() * 255 == pytest.approx(train_x[0, 1])
    assert ds.train_x[0, 1, 0, 0].item() * 255 == pytest.approx(train_x[0, 1024])


def test_cifar100_round_trip_uses_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    written = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        coarse = rng.integers(0, 20, n).tolist()
        write_cifar_batch(folder / split, x, {b"fine_labels": fine, b"coarse_labels": coarse})
        written[split] = (x, fine)
    ds = load_dataset("cifar100", folder)
    np.testing.assert_array_equal(as_bytes(ds.train_x), written["train"][0].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(as_bytes(ds.test_x), written["test"][0].reshape(-1, 3, 32, 32))
    assert ds.train_y.tolist() == written["train"][1] and ds.test_y.tolist() == written["test"][1]
    assert ds.num_classes == 100


def test_cifar_garbage_and_wrong_keys(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_tiny_cifar10(folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CorruptDataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)
    write_tiny_cifar10(folder)
    write_cifar_batch(folder / "test_batch", np.zeros((2, 3072), np.uint8), {b"fine": [0, 1]})
    with pytest.raises(CorruptDataError, match="test_batch.*'labels'"):
        load_dataset("cifar10", tmp_path)


def test_svhn_round_trip_maps_label_10_to_0(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "svhn"
    folder.mkdir()
    written = {}
    for split, n in (("train", 12), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.arange(n).reshape(n, 1) % 10 + 1.0  # MATLAB doubles 1..10, 10 = digit 0
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    ds = load_dataset("svhn", tmp_path)
    for got_x, got_y, (x, y) in (
        (ds.train_x, ds.train_y, written["train"]),
        (ds.test_x, ds.test_y, written["test"]),
    ):
        # x[n, c, h, w] == X[h, w, c, n]
        np.testing.assert_array_equal(as_bytes(got_x), x.transpose(3, 2, 0, 1))
        assert got_y.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert 0 in ds.train_y.tolist() and ds.train_y.max().item() <= 9


def test_curves_round_trip_without_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    bdata, bdatatest = rng.random((12, 784)), rng.random((5, 784))
    folder = tmp_path / "curves"
    folder.mkdir()
    scipy.io.savemat(folder / "digs3pts_1.mat", {"bdata": bdata, "bdatatest": bdatatest})
    ds = load_dataset("curves", tmp_path)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert torch.equal(ds.train_x.flatten(1), torch.from_numpy(bdata.astype(np.float32)))
    assert torch.equal(ds.test_x.flatten(1), torch.from_numpy(bdatatest.astype(np.float32)))
    assert ds.num_classes == 0 and not ds.has_labels
    assert ds.train_y.dtype == torch.int64 and not ds.train_y.any() and len(ds.test_y) == 5


def test_faces_round_trip_and_martens_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    columns = rng.normal(size=(625, 80))  # one 25x25 image per column
    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": columns})
    ds = load_dataset("faces", tmp_path)
    # 80 images: first 80*25/40 = 50 train, last 80*10/40 = 20 test, the 10 between unused
    # (as 103,500 / 41,400 of 165,600 in Martens 2010).
    images = torch.from_numpy(columns.T.astype(np.float32))
    assert ds.train_x.shape == (50, 1, 25, 25) and ds.test_x.shape == (20, 1, 25, 25)
    assert torch.equal(ds.train_x.flatten(1), images[:50])
    assert torch.equal(ds.test_x.flatten(1), images[60:])
    assert ds.num_classes == 0 and not ds.train_y.any()


def test_mat_garbage_and_missing_variable(tmp_path: Path) -> None:
    (tmp_path / "digs3pts_1.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(CorruptDataError, match="digs3pts_1.mat"):
        load_dataset("curves", tmp_path)
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": np.zeros((2, 784))})
    with pytest.raises(CorruptDataError, match="bdatatest"):
        load_dataset("curves", tmp_path)
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": np.zeros((2, 10)), "bdatatest": 0})
    with pytest.raises(CorruptDataError, match=r"\[N, 784\]"):
        load_dataset("curves", tmp_path)


# --------------------------------------------------------------------------------------------
# Lookup and errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILE_BASED)
def test_missing_files_error_names_files_folders_and_source(name: str, tmp_path: Path) -> None:
    spec = DATASETS[name]
    empty = tmp_path / "empty"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(name, empty)
    message = str(info.value)
    for filename in spec.files:
        assert filename in message
    for folder in (empty, empty / spec.subdirs[0], default_cache_dir()):
        assert str(folder) in message
    assert SOURCES[name] in message
    assert "download=True" in message and "data_dir=" in message and ENV_VAR in message
    assert "--download" not in message and "--data-dir" not in message
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)


def test_missing_files_error_from_the_command_line_names_the_flags(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        datafiles.locate("mnist", tmp_path / "empty", interface="cli")
    message = str(info.value)
    assert "--download" in message and "--data-dir" in message
    assert "download=True" not in message and "data_dir=" not in message


def test_partial_folder_names_the_missing_files(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path)
    (tmp_path / MNIST_FILES[2]).unlink()
    with pytest.raises(DataNotFoundError, match=re.escape(f"{tmp_path} lacks {MNIST_FILES[2]}")):
        load_dataset("mnist", tmp_path)


def test_lookup_order_argument_then_env_then_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argument = write_tiny_mnist(tmp_path / "arg", seed=1)
    env = write_tiny_mnist(tmp_path / "env" / "mnist", seed=2)
    cache = write_tiny_mnist(default_cache_dir() / "mnist", seed=3)

    def train_labels(ds: Dataset) -> list[int]:
        return ds.train_y.tolist()

    assert train_labels(load_dataset("mnist")) == cache[MNIST_FILES[1]].tolist()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert train_labels(load_dataset("mnist")) == env[MNIST_FILES[1]].tolist()
    assert (
        train_labels(load_dataset("mnist", tmp_path / "arg")) == argument[MNIST_FILES[1]].tolist()
    )
    shutil.rmtree(default_cache_dir())
    shutil.rmtree(tmp_path / "env")
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist")
    assert str(tmp_path / "env" / "mnist") in str(info.value)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in dataset_names():
        assert name in str(info.value)
    assert get_dataset_spec("Fashion_MNIST").name == "fashion-mnist"


def test_registry_is_consistent() -> None:
    assert set(SOURCES) | {"digits"} == set(dataset_names())
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert all(remote.url.startswith(("http://", "https://")) for remote in spec.remotes)
        bases = {remote.url.removesuffix(remote.filename) for remote in spec.remotes}
        assert len(bases) <= 1, "messages name one base URL per data set"
        assert bool(spec.files) == bool(spec.remotes) == bool(spec.subdirs)


def test_dataset_container_checks_and_helpers() -> None:
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 0])
    ds = Dataset(
        name="t",
        train_x=x,
        train_y=y,
        test_x=x[:1],
        test_y=y[:1],
        num_classes=2,
        input_shape=(1, 2, 2),
    )
    assert len(ds.tensor_dataset("train")) == 3 and len(ds.tensor_dataset("test")) == 1
    assert ds.tensor_dataset("train")[1][1].item() == 1
    assert "tensor(" not in repr(ds) and "train=3" in repr(ds)
    with pytest.raises(ValueError, match="split"):
        ds.tensor_dataset("val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float32"):
        dataclasses.replace(ds, train_x=x.double())
    with pytest.raises(ValueError, match="int64"):
        dataclasses.replace(ds, test_y=y)
    with pytest.raises(
        ValueError, match=re.escape("expected float32 [N, 1, 4, 1], got torch.float32 [3, 1, 2, 2]")
    ):
        dataclasses.replace(ds, input_shape=(1, 4, 1))


# --------------------------------------------------------------------------------------------
# Downloads (the network is never touched: data._fetch is replaced)
# --------------------------------------------------------------------------------------------


def copying_fetch(source: Path, calls: list[str]):
    def fetch(url: str, dest: Path) -> None:
        calls.append(url)
        shutil.copyfile(source / url.rsplit("/", 1)[-1], dest)

    return fetch


def failing_fetch(url: str, dest: Path) -> None:
    dest.write_bytes(b"partial")
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_download_mnist_checks_md5_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist: Dataset
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(datafiles, "_fetch", copying_fetch(SHARED_DATA / "mnist", calls))
    ds = load_dataset("mnist", tmp_path, download=True)
    assert calls == [SOURCES["mnist"] + name for name in MNIST_FILES]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(MNIST_FILES)
    assert torch.equal(ds.train_x, mnist.train_x) and torch.equal(ds.test_y, mnist.test_y)
    monkeypatch.setattr(datafiles, "_fetch", failing_fetch)  # present now: no second download
    assert torch.equal(load_dataset("mnist", tmp_path, download=True).test_y, mnist.test_y)


def test_download_fetches_only_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in MNIST_FILES[1:]:
        write_gz(tmp_path / "fashion_mnist" / name, b"")  # present, so not fetched
    calls: list[str] = []
    monkeypatch.setattr(datafiles, "_fetch", copying_fetch(SHARED_DATA / "fashion_mnist", calls))
    with pytest.raises(CorruptDataError):  # the empty placeholders are read and rejected
        load_dataset("fashion-mnist", tmp_path, download=True)
    assert calls == [SOURCES["fashion-mnist"] + MNIST_FILES[0]]


def test_download_bad_checksum_raises_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def garbage_fetch(url: str, dest: Path) -> None:
        dest.write_bytes(b"<html>captive portal</html>")

    monkeypatch.setattr(datafiles, "_fetch", garbage_fetch)
    with pytest.raises(ChecksumError) as info:
        load_dataset("mnist", tmp_path, download=True)
    message = str(info.value)
    assert MNIST_FILES[0] in message and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message
    expected = hashlib.md5(b"<html>captive portal</html>").hexdigest()
    assert expected in message
    assert list((tmp_path / "mnist").iterdir()) == []


def test_download_offline_says_what_to_fetch_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datafiles, "_fetch", failing_fetch)
    with pytest.raises(DownloadError) as info:
        load_dataset("svhn", tmp_path, download=True)
    message = str(info.value)
    assert "http://ufldl.stanford.edu/housenumbers/train_32x32.mat" in message
    assert str(tmp_path / "svhn") in message and "name resolution" in message
    assert list((tmp_path / "svhn").iterdir()) == []
    with pytest.raises(DownloadError, match=re.escape(f"unpack it in {tmp_path}")):
        load_dataset("cifar100", tmp_path, download=True)


def test_download_goes_to_cache_without_data_dir(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bdata, bdatatest = np.full((3, 784), 0.25), np.full((2, 784), 0.75)

    def fetch(url: str, dest: Path) -> None:
        assert url == SOURCES["curves"]
        scipy.io.savemat(dest, {"bdata": bdata, "bdatatest": bdatatest})

    monkeypatch.setattr(datafiles, "_fetch", fetch)
    ds = load_dataset("curves", download=True)
    assert (default_cache_dir() / "curves" / "digs3pts_1.mat").is_file()
    assert ds.train_x.shape == (3, 1, 28, 28) and ds.test_x.max().item() == 0.75
    assert "not verified" in caplog.text


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_download_archive_is_checked_unpacked_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = tmp_path / "staged" / "cifar-10-batches-py"
    train_x, train_y, _, _ = write_tiny_cifar10(staged)
    archive = _tar_gz({f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in staged.iterdir()})
    root = tmp_path / "root"

    def fetch(url: str, dest: Path) -> None:
        assert url == SOURCES["cifar10"]
        dest.write_bytes(archive)

    monkeypatch.setattr(datafiles, "_fetch", fetch)
    # The real md5 rejects the tiny archive ...
    with pytest.raises(ChecksumError, match="c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", root, download=True)
    assert list(root.iterdir()) == []
    # ... which is accepted once the registry expects its md5.
    spec = DATASETS["cifar10"]
    remote = RemoteFile(spec.remotes[0].url, hashlib.md5(archive).hexdigest(), archive=True)
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(spec, remotes=(remote,)))
    ds = load_dataset("cifar10", root, download=True)
    np.testing.assert_array_equal(as_bytes(ds.train_x), train_x.reshape(-1, 3, 32, 32))
    assert ds.train_y.tolist() == train_y.tolist()
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]


def test_download_archive_with_unsafe_paths_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _tar_gz({"../escaped.txt": b"x", "cifar-100-python/train": b"y"})
    spec = DATASETS["cifar100"]
    remote = RemoteFile(spec.remotes[0].url, hashlib.md5(archive).hexdigest(), archive=True)
    monkeypatch.setitem(DATASETS, "cifar100", dataclasses.replace(spec, remotes=(remote,)))
    monkeypatch.setattr(datafiles, "_fetch", lambda url, dest: dest.write_bytes(archive))
    with pytest.raises(CorruptDataError, match="unsafe"):
        load_dataset("cifar100", tmp_path / "root", download=True)
    assert not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "root").iterdir()) == []  # nothing unpacked, archive removed
