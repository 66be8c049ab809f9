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

Where files are looked for, how missing ones are downloaded (``download=True``), how local files
are checked against their canonical md5 and the errors raised when they are missing live in
:mod:`mbf_analysis.datafiles`, which needs no torch; its names are re-exported here.

No code from data files: nothing here runs what a data file asks for. IDX and ``.mat`` files are
parsed as data. CIFAR batches are pickles, so they are read by a restricted unpickler that
resolves only the globals a CIFAR batch needs: numpy's array reconstruction
(``numpy.core.multiarray._reconstruct``, spelled ``numpy._core.multiarray._reconstruct`` by
numpy 2, ``numpy.ndarray``, ``numpy.dtype``) and ``_codecs.encode`` restricted to latin-1 (how
Python 3 writes ``bytes`` at pickle protocol 2). Dicts, lists, strings, bytes and numbers need
no global. Any other global (``os.system``, ``builtins.exec``, ...) is refused before it is
called, with a one-line :class:`CorruptDataError` that names the file and the global.

Errors are subclasses of :class:`DataError`, so a caller can catch one class and print one line.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from mbf_analysis.datafiles import (
    _CIFAR10_TRAIN,
    DATASETS,
    DEFAULT_DATASET,
    ENV_VAR,
    ChecksumError,
    CorruptDataError,
    DataError,
    DataNotFoundError,
    DatasetSpec,
    DownloadError,
    RemoteFile,
    data_search_dirs,
    dataset_names,
    default_cache_dir,
    get_dataset_spec,
    locate,
)
from mbf_analysis.errors import ConfigError

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
    "locate",
]

logger = logging.getLogger(__name__)

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_DIGITS_TRAIN_SIZE = 1500

Splits = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(train_x, train_y, test_x, test_y)`` as returned by a reader."""


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
                raise ConfigError(
                    f"{self.name} {split}_x: expected float32 "
                    f"[N, {', '.join(map(str, self.input_shape))}], "
                    f"got {x.dtype} {list(x.shape)}"
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ConfigError(
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
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_x)}, test={len(self.test_x)},"
            f" input_shape={tuple(self.input_shape)}, num_classes={self.num_classes})"
        )


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


_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),  # the canonical files (numpy 1)
        ("numpy._core.multiarray", "_reconstruct"),  # the same, pickled under numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
"""``(module, name)`` of the globals a CIFAR batch may load: those that rebuild numpy arrays."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Stand-in for ``_codecs.encode`` in CIFAR batches, limited to what Python 3 pickles at
    protocol 2 write for a ``bytes`` object: ``_codecs.encode(text, "latin1")``."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(
            f"_codecs.encode is allowed only on text with 'latin1', got {encoding!r}"
        )
    return text.encode("latin-1")


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`_CIFAR_GLOBALS`; ``args[0]`` names it."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :data:`_CIFAR_GLOBALS` (and a latin-1
    ``_codecs.encode``), so a crafted pickle cannot name a callable that runs code.

    Every way a pickle reaches a callable (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``OBJ``, the
    extension registry) goes through :meth:`find_class`; persistent ids are refused by the base
    class. The names are checked as written in the file, before Python 2 names are mapped.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


def _unpickle(path: Path) -> dict[str, Any]:
    """Load a CIFAR batch (a Python 2 pickle of a dict) with :class:`_CifarUnpickler`; byte
    strings stay ``bytes`` (``encoding="bytes"``), keys are returned as ``str``.

    Raises:
        CorruptDataError: If the file is not a readable pickle of a dict, or asks for a global
            that a CIFAR batch does not hold (the global is never called).
    """
    try:
        with path.open("rb") as fh:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise CorruptDataError(
            f"{path}: refuses to load the global {exc.args[0]} (a CIFAR batch holds only numpy "
            "arrays, lists, bytes and numbers); the file is not a canonical CIFAR batch: delete "
            "it and download the data set again (download=True, or --download)"
        ) from exc
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
# Readers by data set
# --------------------------------------------------------------------------------------------

_READERS: dict[str, Callable[[Mapping[str, Path]], Splits]] = {
    "digits": _read_digits,
    "mnist": _read_mnist_like,
    "mnist16": _read_mnist16,
    "fashion-mnist": _read_mnist_like,
    "cifar10": _read_cifar10,
    "cifar100": _read_cifar100,
    "svhn": _read_svhn,
    "curves": _read_curves,
    "faces": _read_faces,
}
"""Data set name → the reader that turns its located files (name → path) into the four splits."""


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
    paths = locate(spec.name, data_dir, download=download)
    train_x, train_y, test_x, test_y = _READERS[spec.name](paths)
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
