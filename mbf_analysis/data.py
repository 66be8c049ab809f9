"""Datasets as torch tensors.

One entry point, :func:`load_dataset`, returns a :class:`Dataset`: the train and test splits as
whole tensors in memory, plus the metadata that models need (``num_classes``, ``input_shape``).

Conventions (every loader follows them):

- Images: ``float32`` tensors of shape ``[N, C, H, W]``. Pixel data stored as bytes (MNIST,
  Fashion-MNIST, CIFAR, SVHN) is divided by 255 and the digits (0..16) by 16, so values lie in
  ``[0, 1]``; CURVES and FACES keep the values of their ``.mat`` files.
- Labels: ``int64`` tensors of shape ``[N]`` with values in ``0 .. num_classes - 1``.
- Autoencoder data sets (CURVES, FACES) have no labels: ``num_classes == 0`` and the label
  tensors are zeros, so that every :class:`Dataset` has the same structure and works with
  ``TensorDataset``/``DataLoader`` unchanged. Their targets are the inputs flattened, which the
  training code derives; nothing here stores them twice.

Where files are looked for (the first folder that holds every file of a data set wins):

1. the ``data_dir`` argument (the CLI's ``--data-dir``),
2. the environment variable ``MBF_DATA_DIR``,
3. the cache folder ``~/.cache/mbf_analysis``.

Each of these roots is tried as is and with the data set's sub-folder appended (``mnist/``,
``fashion_mnist/``, ``cifar-10-batches-py/``, ...; see :attr:`DatasetSpec.subdirs`), so a root
may be the folder holding the files or a parent of several data sets. MNIST and Fashion-MNIST use
the same file names: a folder whose train labels carry the canonical md5 of the other data set is
skipped, so pointing Fashion-MNIST at an MNIST folder never loads the wrong images.

With ``download=True`` missing files are fetched from their canonical URLs into the first root
(``data_dir`` if given, else ``MBF_DATA_DIR`` if set, else the cache), inside the data set's
sub-folder, and checked against the md5 values that the standard loaders use (MNIST,
Fashion-MNIST, CIFAR-10/100, SVHN). CURVES and FACES have no published checksum and are not
verified.

Errors are subclasses of :class:`DataError`, so a caller can catch one class and print one line.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import pickle
import shutil
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = [
    "ChecksumError",
    "CorruptDataError",
    "DATASETS",
    "DEFAULT_DATASET",
    "DataError",
    "DataNotFoundError",
    "Dataset",
    "DatasetSpec",
    "DownloadError",
    "ENV_VAR",
    "RemoteFile",
    "data_search_dirs",
    "dataset_names",
    "default_cache_dir",
    "get_dataset_spec",
    "load_dataset",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MBF_DATA_DIR"
"""Environment variable naming a folder to search for data files."""

DEFAULT_DATASET = "digits"
"""The data set that needs no files (scikit-learn's bundled digits)."""

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_DOWNLOAD_TIMEOUT_S = 60.0
_DIGITS_TRAIN_SIZE = 1500

Splits = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(train_x, train_y, test_x, test_y)`` as returned by a reader."""


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class DataError(Exception):
    """Base class of every error raised while finding, fetching or reading a data set."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The files of a data set are in none of the searched folders."""


class DownloadError(DataError):
    """A file could not be downloaded (for instance, no network)."""


class ChecksumError(DataError):
    """A downloaded file does not have the expected md5; it has been deleted."""


class CorruptDataError(DataError, ValueError):
    """A data file exists but is malformed: truncated, wrong format or inconsistent."""


# --------------------------------------------------------------------------------------------
# The data set container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Train and test splits of one data set, as whole tensors.

    Not a ``torch.utils.data.Dataset``: use :meth:`tensor_dataset` for one.

    Attributes:
        name: Registry name, e.g. ``"mnist"``.
        train_x: Training inputs, ``float32`` ``[N_train, *input_shape]``.
        train_y: Training labels, ``int64`` ``[N_train]`` (zeros when ``num_classes == 0``).
        test_x: Test inputs, ``float32`` ``[N_test, *input_shape]``.
        test_y: Test labels, ``int64`` ``[N_test]`` (zeros when ``num_classes == 0``).
        num_classes: Number of classes; ``0`` for unlabelled (autoencoder) data.
        input_shape: ``(C, H, W)`` of one input.

    Raises:
        ValueError: If shapes or dtypes break these conventions.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        splits = (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y))
        for split, x, y in splits:
            if x.dtype != torch.float32 or tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{self.name} {split}_x: expected float32 "
                    f"[N, {', '.join(map(str, self.input_shape))}], "
                    f"got {x.dtype} {list(x.shape)}"
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name} {split}_y: expected int64 [{x.shape[0]}], "
                    f"got {y.dtype} {list(y.shape)}"
                )

    @property
    def has_labels(self) -> bool:
        """Whether the labels mean anything (``False`` for autoencoder data sets)."""
        return self.num_classes > 0

    @property
    def input_dim(self) -> int:
        """Number of input features, ``prod(input_shape)`` (e.g. 784 for MNIST)."""
        return math.prod(self.input_shape)

    def tensor_dataset(self, split: Literal["train", "test"]) -> TensorDataset:
        """The split as a ``TensorDataset`` yielding ``(x [*input_shape], y [])`` pairs."""
        if split == "train":
            return TensorDataset(self.train_x, self.train_y)
        if split == "test":
            return TensorDataset(self.test_x, self.test_y)
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_x)}, test={len(self.test_x)},"
            f" input_shape={tuple(self.input_shape)}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """A canonical download.

    Attributes:
        url: Where to fetch it.
        md5: Expected md5 hex digest, or ``None`` where no checksum is published.
        archive: Whether it is a ``.tar.gz`` that unpacks into the data set's sub-folder.
    """

    url: str
    md5: str | None
    archive: bool = False

    @property
    def filename(self) -> str:
        """The last component of the URL."""
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """How to find, fetch and read one data set.

    Attributes:
        name: Registry name.
        title: Human-readable name used in messages.
        num_classes: Number of classes (``0``: unlabelled).
        input_shape: ``(C, H, W)`` of one input.
        files: Files that must all be present in one folder, relative to it (empty: bundled).
        subdirs: Sub-folder names tried under each searched root; the first is where downloads
            go.
        remotes: Canonical downloads that provide ``files``.
        reader: Maps each name of ``files`` to its path and returns the four split tensors.
        fingerprint: File whose md5 identifies which data set a folder holds: a folder is
            skipped when ``_FINGERPRINTS`` maps that md5 to a title other than ``title``.
            ``None``: no check.
    """

    name: str
    title: str
    num_classes: int
    input_shape: tuple[int, int, int]
    files: tuple[str, ...]
    subdirs: tuple[str, ...] = ()
    remotes: tuple[RemoteFile, ...] = ()
    reader: Callable[[Mapping[str, Path]], Splits] = field(repr=False)
    fingerprint: str | None = None


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _images_from_bytes(array: np.ndarray) -> Tensor:
    """``uint8`` ``[N, C, H, W]`` → ``float32`` in ``[0, 1]`` (divided by 255)."""
    return torch.from_numpy(array.astype(np.float32)).div_(255.0)


def _labels(array: np.ndarray, num_classes: int, path: Path) -> Tensor:
    """Any integer array ``[N]`` → ``int64`` ``[N]``, checked to lie in ``0 .. num_classes-1``."""
    labels = np.asarray(array).reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDataError(
            f"{path}: labels range over {labels.min()}..{labels.max()}, "
            f"expected 0..{num_classes - 1}"
        )
    return torch.from_numpy(labels)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes.

    Format: a big-endian ``uint32`` magic number ``0x000008DD`` (``08``: unsigned bytes, ``DD``:
    number of dimensions), one big-endian ``uint32`` per dimension, then the row-major payload.

    Args:
        path: The ``.gz`` file.
        magic: Expected magic number (``0x00000803`` images, ``0x00000801`` labels).

    Returns:
        Read-only ``uint8`` array with the header's dimensions.

    Raises:
        CorruptDataError: If the file is not gzip, is truncated, has another magic number, or
            its payload length does not match the header.
    """
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise CorruptDataError(f"{path}: not a complete gzip file ({exc})") from exc
    if len(raw) < 4:
        raise CorruptDataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise CorruptDataError(f"{path}: IDX magic number 0x{found:08X}, expected 0x{magic:08X}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise CorruptDataError(
            f"{path}: header gives dimensions {list(dims)} ({math.prod(dims)} bytes of data), "
            f"but the file holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_split(paths: Mapping[str, Path], prefix: str) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, H, W]`` and labels ``[N]`` of the ``train`` or ``t10k`` IDX pair."""
    images_path = paths[f"{prefix}-images-idx3-ubyte.gz"]
    labels_path = paths[f"{prefix}-labels-idx1-ubyte.gz"]
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise CorruptDataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return _images_from_bytes(images[:, None]), _labels(labels, 10, labels_path)


def _read_mnist_like(paths: Mapping[str, Path]) -> Splits:
    """MNIST / Fashion-MNIST: ``[N, 1, 28, 28]`` images in ``[0, 1]``, labels 0..9."""
    return (*_read_idx_split(paths, "train"), *_read_idx_split(paths, "t10k"))


def _read_mnist16(paths: Mapping[str, Path]) -> Splits:
    """MNIST area-resized 28 → 16 (Martens & Grosse, 2015): images ``[N, 1, 16, 16]``.

    ``mode="area"`` is adaptive average pooling: output pixel ``a`` averages input rows
    ``floor(28 a / 16) .. ceil(28 (a + 1) / 16) - 1`` (and likewise for columns); the windows
    overlap because 28/16 is not an integer.
    """
    train_x, train_y, test_x, test_y = _read_mnist_like(paths)
    return (
        F.interpolate(train_x, size=(16, 16), mode="area"),
        train_y,
        F.interpolate(test_x, size=(16, 16), mode="area"),
        test_y,
    )


def _read_digits(paths: Mapping[str, Path]) -> Splits:
    """scikit-learn's bundled digits: 1,797 images ``[1, 8, 8]`` with values 0..16, divided by 16.

    Split: the first 1,500 images (in scikit-learn's order) train, the remaining 297 test. No
    randomness; the order groups images by writer, so the test digits come from other writers.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)).div_(16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    n = _DIGITS_TRAIN_SIZE
    return x[:n].clone(), y[:n].clone(), x[n:].clone(), y[n:].clone()


def _unpickle(path: Path) -> dict[str, Any]:
    """Load a CIFAR batch (a Python 2 pickle of a dict); keys are returned as ``str``."""
    try:
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # a malformed pickle can raise nearly any exception type
        raise CorruptDataError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(batch, dict):
        raise CorruptDataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_cifar_batches(
    paths: Iterable[Path], label_key: str, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Concatenate CIFAR batches: ``data`` ``uint8 [n, 3072]`` (R, G, B planes of 32×32) and
    ``label_key`` (``n`` ints) → images ``[N, 3, 32, 32]`` in ``[0, 1]`` and labels ``[N]``."""
    xs, ys = [], []
    for path in paths:
        batch = _unpickle(path)
        if "data" not in batch or label_key not in batch:
            raise CorruptDataError(
                f"{path}: expected keys 'data' and {label_key!r}, got {list(batch)}"
            )
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise CorruptDataError(
                f"{path}: 'data' should be uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
            )
        labels = np.asarray(batch[label_key])
        if labels.shape != (len(data),):
            raise CorruptDataError(
                f"{path}: {len(data)} images but {label_key!r} has shape {list(labels.shape)}"
            )
        xs.append(_images_from_bytes(data.reshape(-1, 3, 32, 32)))
        ys.append(_labels(labels, num_classes, path))
    return torch.cat(xs), torch.cat(ys)


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _read_cifar10(paths: Mapping[str, Path]) -> Splits:
    """CIFAR-10: ``data_batch_1..5`` (in that order) train, ``test_batch`` test; 10 classes."""
    train = _read_cifar_batches((paths[f] for f in _CIFAR10_TRAIN), "labels", 10)
    test = _read_cifar_batches([paths["test_batch"]], "labels", 10)
    return (*train, *test)


def _read_cifar100(paths: Mapping[str, Path]) -> Splits:
    """CIFAR-100: ``train`` and ``test`` with the 100 ``fine_labels`` (coarse labels unused)."""
    train = _read_cifar_batches([paths["train"]], "fine_labels", 100)
    test = _read_cifar_batches([paths["test"]], "fine_labels", 100)
    return (*train, *test)


def _loadmat(path: Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of a MATLAB (v4–v7.2) file."""
    keys = list(keys)
    try:
        mat = scipy.io.loadmat(path, variable_names=keys)
    except (ValueError, TypeError, OSError, NotImplementedError) as exc:
        raise CorruptDataError(f"{path}: not a readable MATLAB v4-v7.2 file ({exc})") from exc
    missing = [k for k in keys if k not in mat]
    if missing:
        raise CorruptDataError(f"{path}: missing variable(s) {missing}")
    return {k: np.asarray(mat[k]) for k in keys}


def _read_svhn_file(path: Path) -> tuple[Tensor, Tensor]:
    """SVHN ``X`` ``uint8 [32, 32, 3, N]`` → ``[N, 3, 32, 32]``; ``y`` ``[N, 1]`` in 1..10 with
    10 standing for the digit 0 → labels 0..9."""
    mat = _loadmat(path, ("X", "y"))
    x, y = mat["X"], mat["y"].reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or len(y) != x.shape[3]:
        raise CorruptDataError(
            f"{path}: expected X uint8 [32, 32, 3, N] and y [N, 1], "
            f"got X {x.dtype} {list(x.shape)} and y {list(mat['y'].shape)}"
        )
    y = np.where(y == 10, 0, y)
    return _images_from_bytes(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), _labels(y, 10, path)


def _read_svhn(paths: Mapping[str, Path]) -> Splits:
    """SVHN cropped digits: ``train_32x32.mat`` and ``test_32x32.mat`` (the ``extra`` split is
    not used)."""
    return (*_read_svhn_file(paths["train_32x32.mat"]), *_read_svhn_file(paths["test_32x32.mat"]))


def _vectors_to_images(vectors: np.ndarray, side: int, path: Path, key: str) -> Tensor:
    """``[N, side²]`` → ``float32 [N, 1, side, side]`` by a row-major reshape, so that
    ``images.flatten(1)`` gives back the stored vectors exactly (the stored pixel order may be
    MATLAB's column-major one, in which case the images appear transposed)."""
    if vectors.ndim != 2 or vectors.shape[1] != side * side:
        raise CorruptDataError(
            f"{path}: {key!r} should be [N, {side * side}], got {list(vectors.shape)}"
        )
    if not np.issubdtype(vectors.dtype, np.number):
        raise CorruptDataError(f"{path}: {key!r} is not numeric ({vectors.dtype})")
    images = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, 1, side, side)
    return torch.from_numpy(images)


def _read_curves(paths: Mapping[str, Path]) -> Splits:
    """CURVES (Hinton & Salakhutdinov, 2006): ``bdata`` ``[20000, 784]`` train and
    ``bdatatest`` ``[10000, 784]`` test, values in ``[0, 1]`` kept as stored; images
    ``[N, 1, 28, 28]``; no labels (zeros)."""
    path = paths["digs3pts_1.mat"]
    mat = _loadmat(path, ("bdata", "bdatatest"))
    train_x = _vectors_to_images(mat["bdata"], 28, path, "bdata")
    test_x = _vectors_to_images(mat["bdatatest"], 28, path, "bdatatest")
    return train_x, _no_labels(train_x), test_x, _no_labels(test_x)


def _read_faces(paths: Mapping[str, Path]) -> Splits:
    """FACES (Hinton & Salakhutdinov, 2006): ``newfaces_single`` ``[625, N]``, one 25×25 image
    per column, real values kept as stored; images ``[N, 1, 25, 25]``; no labels (zeros).

    Split of Martens (2010) and Martens & Grosse (2015): with ``N = 165,600``, the first
    ``25 N / 40 = 103,500`` images train and the last ``10 N / 40 = 41,400`` test; the
    ``20,700`` in between are used by neither. Files of another ``N`` are split in the same
    proportions (rounded down).
    """
    path = paths["newfaces_rot_single.mat"]
    columns = _loadmat(path, ("newfaces_single",))["newfaces_single"]
    if columns.ndim != 2 or columns.shape[0] != 625:
        raise CorruptDataError(
            f"{path}: 'newfaces_single' should be [625, N], got {list(columns.shape)}"
        )
    images = _vectors_to_images(columns.T, 25, path, "newfaces_single")
    n = len(images)
    n_train, n_test = n * 25 // 40, n * 10 // 40
    if n_test == 0:
        raise CorruptDataError(f"{path}: {n} images, too few for a train/test split")
    train_x, test_x = images[:n_train].clone(), images[n - n_test :].clone()
    return train_x, _no_labels(train_x), test_x, _no_labels(test_x)


def _no_labels(x: Tensor) -> Tensor:
    """Placeholder labels of unlabelled data: ``int64`` zeros ``[N]``."""
    return torch.zeros(len(x), dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Registry entries
# --------------------------------------------------------------------------------------------

_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_MD5 = (
    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "d53e105ee54ea40749a09fcbcd1e9432",
    "9fb629c4189551a2d022fa330f9573f3",
    "ec29112dd5afa0611ce80d1b7f02629c",
)
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FASHION_MD5 = (
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "25c81989df183df01b3e8a0aad5dffbe",
    "bef4ecab320f06d8554ea6380940ec79",
    "bb300cfdad3c16e7a12a480ee83cd310",
)
_MARTENS_URL = "https://www.cs.toronto.edu/~jmartens/"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"

_FINGERPRINTS = {_MNIST_MD5[1]: "MNIST", _FASHION_MD5[1]: "Fashion-MNIST"}
"""md5 of the canonical train-label files → the data set they belong to."""


def _remotes(base_url: str, files: Iterable[str], md5s: Iterable[str]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(base_url + f, m) for f, m in zip(files, md5s, strict=True))


_SPECS = (
    DatasetSpec(
        name="digits",
        title="scikit-learn digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        files=(),
        reader=_read_digits,
    ),
    DatasetSpec(
        name="mnist",
        title="MNIST",
        num_classes=10,
        input_shape=(1, 28, 28),
        files=_MNIST_FILES,
        subdirs=("mnist", "MNIST/raw"),
        remotes=_remotes(_MNIST_URL, _MNIST_FILES, _MNIST_MD5),
        reader=_read_mnist_like,
        fingerprint="train-labels-idx1-ubyte.gz",
    ),
    DatasetSpec(
        name="mnist16",
        title="MNIST",
        num_classes=10,
        input_shape=(1, 16, 16),
        files=_MNIST_FILES,
        subdirs=("mnist", "MNIST/raw"),
        remotes=_remotes(_MNIST_URL, _MNIST_FILES, _MNIST_MD5),
        reader=_read_mnist16,
        fingerprint="train-labels-idx1-ubyte.gz",
    ),
    DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        num_classes=10,
        input_shape=(1, 28, 28),
        files=_MNIST_FILES,
        subdirs=("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
        remotes=_remotes(_FASHION_URL, _MNIST_FILES, _FASHION_MD5),
        reader=_read_mnist_like,
        fingerprint="train-labels-idx1-ubyte.gz",
    ),
    DatasetSpec(
        name="cifar10",
        title="CIFAR-10",
        num_classes=10,
        input_shape=(3, 32, 32),
        files=(*_CIFAR10_TRAIN, "test_batch"),
        subdirs=("cifar-10-batches-py",),
        remotes=(
            RemoteFile(
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
                archive=True,
            ),
        ),
        reader=_read_cifar10,
    ),
    DatasetSpec(
        name="cifar100",
        title="CIFAR-100",
        num_classes=100,
        input_shape=(3, 32, 32),
        files=("train", "test"),
        subdirs=("cifar-100-python",),
        remotes=(
            RemoteFile(
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
                archive=True,
            ),
        ),
        reader=_read_cifar100,
    ),
    DatasetSpec(
        name="svhn",
        title="SVHN",
        num_classes=10,
        input_shape=(3, 32, 32),
        files=("train_32x32.mat", "test_32x32.mat"),
        subdirs=("svhn", "SVHN"),
        remotes=(
            RemoteFile(_SVHN_URL + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
            RemoteFile(_SVHN_URL + "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
        ),
        reader=_read_svhn,
    ),
    DatasetSpec(
        name="curves",
        title="CURVES",
        num_classes=0,
        input_shape=(1, 28, 28),
        files=("digs3pts_1.mat",),
        subdirs=("curves", "CURVES"),
        remotes=(RemoteFile(_MARTENS_URL + "digs3pts_1.mat", None),),
        reader=_read_curves,
    ),
    DatasetSpec(
        name="faces",
        title="FACES",
        num_classes=0,
        input_shape=(1, 25, 25),
        files=("newfaces_rot_single.mat",),
        subdirs=("faces", "FACES"),
        remotes=(RemoteFile(_MARTENS_URL + "newfaces_rot_single.mat", None),),
        reader=_read_faces,
    ),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
"""Registry of the data sets :func:`load_dataset` knows, by name."""


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`, in registry order."""
    return list(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name`` (case-insensitive; ``_`` and ``-`` are interchangeable).

    Raises:
        ValueError: If no data set has that name; the message lists the known ones.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[key]


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``~/.cache/mbf_analysis``, where downloads go when no other folder is given."""
    return Path.home() / ".cache" / "mbf_analysis"


def data_search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """The roots searched for data files, in order: ``data_dir``, ``$MBF_DATA_DIR``, the cache.

    Each root is also searched with the data set's sub-folder appended (see the module
    docstring). Duplicates are dropped; ``~`` is expanded.
    """
    roots = [Path(data_dir)] if data_dir is not None else []
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    roots.append(default_cache_dir())
    unique: list[Path] = []
    for root in roots:
        root = root.expanduser()
        if root not in unique:
            unique.append(root)
    return unique


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _foreign_data(spec: DatasetSpec, folder: Path) -> str | None:
    """If ``folder`` holds another data set's canonical files, say which; else ``None``."""
    if spec.fingerprint is None:
        return None
    owner = _FINGERPRINTS.get(_md5(folder / spec.fingerprint))
    if owner is None or owner == spec.title:
        return None
    return f"{folder} holds {owner}, not {spec.title}"


@dataclass
class _Search:
    """Outcome of looking for a data set's files under some roots."""

    folder: Path | None = None
    searched: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _search(spec: DatasetSpec, roots: Iterable[Path]) -> _Search:
    result = _Search()
    for root in roots:
        for folder in (root, *(root / sub for sub in spec.subdirs)):
            result.searched.append(folder)
            missing = [f for f in spec.files if not (folder / f).is_file()]
            if not missing:
                foreign = _foreign_data(spec, folder)
                if foreign is None:
                    result.folder = folder
                    return result
                result.notes.append(foreign)
            elif len(missing) < len(spec.files):
                result.notes.append(f"{folder} lacks {', '.join(missing)}")
    return result


def _how_to_get(spec: DatasetSpec) -> str:
    """Where a person downloads the files of ``spec`` by hand (the remotes of a data set share
    one base URL)."""
    first = spec.remotes[0]
    if len(spec.remotes) == 1:
        unpack = f" and unpack it (it holds {spec.subdirs[0]}/)" if first.archive else ""
        return f"download {first.url}{unpack}"
    base = first.url.removesuffix(first.filename)
    return f"download {', '.join(r.filename for r in spec.remotes)} from {base}"


def _not_found(spec: DatasetSpec, search: _Search) -> DataNotFoundError:
    notes = f" ({'; '.join(search.notes)})" if search.notes else ""
    return DataNotFoundError(
        f"{spec.title} files not found: {spec.name!r} needs {', '.join(spec.files)} in one "
        f"folder. Searched: {', '.join(map(str, search.searched))}{notes}. To get them: "
        f"{_how_to_get(spec)} into one of the searched folders, or pass download=True; "
        f"--data-dir or the {ENV_VAR} environment variable may point at the folder holding them "
        f"or at its parent with a '{spec.subdirs[0]}/' sub-folder."
    )


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (overwritten). The single place that touches the network;
    tests replace it."""
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        with dest.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)


def _safe_member(member: tarfile.TarInfo) -> bool:
    """A plain file or folder whose path stays inside the extraction folder."""
    path = Path(member.name)
    return (member.isfile() or member.isdir()) and not path.is_absolute() and ".." not in path.parts


def _unpack(archive: Path, into: Path) -> None:
    """Extract a ``.tar.gz`` of plain files and folders into ``into``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            unsafe = [m.name for m in members if not _safe_member(m)]
            if unsafe:
                raise CorruptDataError(f"{archive}: refusing to unpack unsafe entries {unsafe[:5]}")
            options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(into, members=members, **options)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise CorruptDataError(f"{archive}: cannot unpack ({exc})") from exc


def _download(spec: DatasetSpec, root: Path) -> None:
    """Fetch the remotes of ``spec`` that are missing into ``root / spec.subdirs[0]``.

    Plain files go into the sub-folder; archives are fetched into ``root``, checked, unpacked
    there (they hold the sub-folder) and deleted. A file is written under a ``.part`` name and
    renamed only after its md5 checks out.

    Raises:
        DownloadError: If a fetch fails; the message says what to fetch and where to put it.
        ChecksumError: If a file has the wrong md5 (the file is deleted).
        CorruptDataError: If an archive cannot be unpacked.
    """
    folder = root / spec.subdirs[0]
    for remote in spec.remotes:
        dest_dir = root if remote.archive else folder
        dest = dest_dir / remote.filename
        if not remote.archive and dest.is_file():
            continue
        dest_dir.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        where = f"unpack it in {root}" if remote.archive else f"put it in {folder}"
        logger.info("downloading %s to %s", remote.url, dest)
        try:
            _fetch(remote.url, part)
        except (OSError, http.client.HTTPException) as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"could not download {remote.url} ({exc}). Fetch it by hand and {where}, or "
                f"point --data-dir / {ENV_VAR} at a folder that already holds the {spec.title} "
                f"files ({', '.join(spec.files)})."
            ) from exc
        if remote.md5 is None:
            logger.warning("%s has no published checksum; not verified", remote.filename)
        else:
            actual = _md5(part)
            if actual != remote.md5:
                part.unlink(missing_ok=True)
                raise ChecksumError(
                    f"{remote.url}: downloaded file has md5 {actual}, expected {remote.md5}; "
                    f"it was deleted. Retry, or fetch it by hand and {where}."
                )
        part.replace(dest)
        if remote.archive:
            try:
                _unpack(dest, root)
            finally:
                dest.unlink()


def _locate(spec: DatasetSpec, data_dir: str | Path | None, download: bool) -> dict[str, Path]:
    """Path of every file of ``spec``, downloading first if allowed and needed."""
    if not spec.files:
        return {}
    roots = data_search_dirs(data_dir)
    search = _search(spec, roots)
    if search.folder is None and download:
        _download(spec, roots[0])
        search = _search(spec, roots[:1])
        if search.folder is None:
            raise CorruptDataError(
                f"downloaded {spec.title} into {roots[0]}, but the expected files "
                f"({', '.join(spec.files)}) are still missing there"
            )
    if search.folder is None:
        raise _not_found(spec, search)
    return {f: search.folder / f for f in spec.files}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = False
) -> Dataset:
    """Load a data set's train and test splits into memory.

    Args:
        name: One of :func:`dataset_names` (case-insensitive, ``_`` or ``-``).
        data_dir: Folder searched first: the one holding the files, or a parent with the data
            set's sub-folder (e.g. ``../shared/data`` with ``mnist/`` and ``fashion_mnist/``).
        download: Fetch missing files from their canonical URLs (see the module docstring).

    Returns:
        The :class:`Dataset`; images ``float32 [N, C, H, W]``, labels ``int64 [N]``.

    Raises:
        ValueError: Unknown ``name``.
        DataNotFoundError: Files missing and ``download`` false.
        DownloadError, ChecksumError: Downloading failed.
        CorruptDataError: A file exists but cannot be read.
    """
    spec = get_dataset_spec(name)
    paths = _locate(spec, data_dir, download)
    train_x, train_y, test_x, test_y = spec.reader(paths)
    dataset = Dataset(
        name=spec.name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
    )
    source = next(iter(paths.values())).parent if paths else "bundled data"
    logger.info("loaded %r from %s", dataset, source)
    return dataset
