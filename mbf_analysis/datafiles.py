"""Where the data files are, how to fetch them, and the errors when they are missing: no torch.

This module is the part of :mod:`mbf_analysis.data` that needs neither torch nor numpy, so that
the command line can check for a data set's files (and answer a missing file in one line)
before it imports the numerical stack. :mod:`mbf_analysis.data` reads the files it locates.

Where files are looked for (the first folder that holds every file of a data set wins):

1. the ``data_dir`` argument (the CLI's ``--data-dir``),
2. the environment variable ``MBF_DATA_DIR``,
3. the cache folder ``~/.cache/mbf_analysis``.

Each of these roots is tried as is and with the data set's sub-folder appended (``mnist/``,
``fashion_mnist/``, ``cifar-10-batches-py/``, ...; see :attr:`DatasetSpec.subdirs`), so a root
may be the folder holding the files or a parent of several data sets. MNIST and Fashion-MNIST use
the same file names: a folder whose train labels carry the canonical md5 of the other data set is
skipped, so pointing Fashion-MNIST at an MNIST folder never loads the wrong images.

With ``download=True`` (the CLI's ``--download``) missing files are fetched from their
canonical URLs into the first root (``data_dir`` if given, else ``MBF_DATA_DIR`` if set, else
the cache), inside the data set's sub-folder, and checked against the md5 values that the
standard loaders use (MNIST, Fashion-MNIST, CIFAR-10/100, SVHN). CURVES and FACES have no
published checksum and are not verified.

Errors are subclasses of :class:`DataError`, so a caller can catch one class and print one line.
Their messages name the option to use in the caller's terms: ``download=True`` / ``data_dir=``
from Python, ``--download`` / ``--data-dir`` from the command line (``interface="cli"``).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "ChecksumError",
    "CorruptDataError",
    "DATASETS",
    "DEFAULT_DATASET",
    "DataError",
    "DataNotFoundError",
    "DatasetSpec",
    "DownloadError",
    "ENV_VAR",
    "Interface",
    "RemoteFile",
    "data_search_dirs",
    "dataset_names",
    "default_cache_dir",
    "get_dataset_spec",
    "locate",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MBF_DATA_DIR"
"""Environment variable naming a folder to search for data files."""

DEFAULT_DATASET = "digits"
"""The data set that needs no files (scikit-learn's bundled digits)."""

_DOWNLOAD_TIMEOUT_S = 60.0

Interface = Literal["python", "cli"]
"""Who asks: error messages name ``download=True`` / ``data_dir=`` or ``--download`` /
``--data-dir``."""

_OPTIONS: dict[str, tuple[str, str]] = {
    "python": ("download=True", "data_dir="),
    "cli": ("--download", "--data-dir"),
}


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
    fingerprint: str | None = None


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


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
"""The CIFAR-10 training batches, in the order the reader concatenates them."""

_SPECS = (
    DatasetSpec(
        name="digits",
        title="scikit-learn digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        files=(),
    ),
    DatasetSpec(
        name="mnist",
        title="MNIST",
        num_classes=10,
        input_shape=(1, 28, 28),
        files=_MNIST_FILES,
        subdirs=("mnist", "MNIST/raw"),
        remotes=_remotes(_MNIST_URL, _MNIST_FILES, _MNIST_MD5),
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
    ),
    DatasetSpec(
        name="curves",
        title="CURVES",
        num_classes=0,
        input_shape=(1, 28, 28),
        files=("digs3pts_1.mat",),
        subdirs=("curves", "CURVES"),
        remotes=(RemoteFile(_MARTENS_URL + "digs3pts_1.mat", None),),
    ),
    DatasetSpec(
        name="faces",
        title="FACES",
        num_classes=0,
        input_shape=(1, 25, 25),
        files=("newfaces_rot_single.mat",),
        subdirs=("faces", "FACES"),
        remotes=(RemoteFile(_MARTENS_URL + "newfaces_rot_single.mat", None),),
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


def _not_found(spec: DatasetSpec, search: _Search, interface: Interface) -> DataNotFoundError:
    download, data_dir = _OPTIONS[interface]
    notes = f" ({'; '.join(search.notes)})" if search.notes else ""
    return DataNotFoundError(
        f"{spec.title} files not found: {spec.name!r} needs {', '.join(spec.files)} in one "
        f"folder. Searched: {', '.join(map(str, search.searched))}{notes}. To get them: "
        f"{_how_to_get(spec)} into one of the searched folders, or pass {download}; "
        f"{data_dir} or the {ENV_VAR} environment variable may point at the folder holding them "
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


def _download(spec: DatasetSpec, root: Path, interface: Interface) -> None:
    """Fetch the remotes of ``spec`` that are missing into ``root / spec.subdirs[0]``.

    Plain files go into the sub-folder; archives are fetched into ``root``, checked, unpacked
    there (they hold the sub-folder) and deleted. A file is written under a ``.part`` name and
    renamed only after its md5 checks out.

    Raises:
        DownloadError: If a fetch fails; the message says what to fetch and where to put it.
        ChecksumError: If a file has the wrong md5 (the file is deleted).
        CorruptDataError: If an archive cannot be unpacked.
    """
    data_dir = _OPTIONS[interface][1]
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
                f"point {data_dir} / {ENV_VAR} at a folder that already holds the {spec.title} "
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


def locate(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    interface: Interface = "python",
) -> dict[str, Path]:
    """The path of every file of data set ``name``, downloading first if allowed and needed.

    Args:
        name: One of :func:`dataset_names` (case-insensitive, ``_`` or ``-``).
        data_dir: Folder searched first (see the module docstring).
        download: Fetch missing files from their canonical URLs.
        interface: ``"cli"`` makes the messages name the command-line options.

    Returns:
        File name → path; empty for a bundled data set.

    Raises:
        ValueError: Unknown ``name``.
        DataNotFoundError: Files missing and ``download`` false.
        DownloadError, ChecksumError: Downloading failed.
        CorruptDataError: The download did not produce the files.
    """
    spec = get_dataset_spec(name)
    if not spec.files:
        return {}
    roots = data_search_dirs(data_dir)
    search = _search(spec, roots)
    if search.folder is None and download:
        _download(spec, roots[0], interface)
        search = _search(spec, roots[:1])
        if search.folder is None:
            raise CorruptDataError(
                f"downloaded {spec.title} into {roots[0]}, but the expected files "
                f"({', '.join(spec.files)}) are still missing there"
            )
    if search.folder is None:
        raise _not_found(spec, search, interface)
    return {f: search.folder / f for f in spec.files}
