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

Local files are checked too. Every located file whose canonical md5 is known (the MNIST and
Fashion-MNIST IDX files, the SVHN ``.mat`` files, the CIFAR batches a canonical archive unpacks
to, as torchvision checks them) is hashed on first use; a file whose md5 differs is read anyway
(a smaller file in the canonical format is a legitimate test or subset) but logged once per
process as a one-line warning naming the file, its md5 and the canonical one. Only the files of
:attr:`DatasetSpec.files` are checked; nothing the package derives from them (the 16×16 MNIST
is computed in memory) is compared with a canonical md5. Digests are remembered in
``md5.json`` (``{absolute path: [size, mtime_ns, md5]}``) in ``$MBF_CACHE_DIR``, else the cache
folder, so a file is hashed again only when its size or modification time changes. The record
is a convenience: one that cannot be read is started afresh and one that cannot be written
(read-only folder, a home folder that does not exist) means hashing on every use, logged at
debug level, never an error. The md5 check guards against damaged and substituted files, not
against someone who can write the cache; what keeps a crafted CIFAR pickle from running code is
the restricted unpickler of :mod:`mbf_analysis.data`.

Errors are subclasses of :class:`DataError`, so a caller can catch one class and print one line.
Their messages name the option to use in the caller's terms: ``download=True`` / ``data_dir=``
from Python, ``--download`` / ``--data-dir`` from the command line (``interface="cli"``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
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

from mbf_analysis.errors import ConfigError, MBFError
from mbf_analysis.files import atomic_write_json

__all__ = [
    "CACHE_ENV_VAR",
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

CACHE_ENV_VAR = "MBF_CACHE_DIR"
"""Environment variable replacing ``~/.cache/mbf_analysis`` as the folder of the package's own
records (the md5 record here, the pretrained checkpoints); data files are not searched there."""

_MD5_RECORD = "md5.json"

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


class DataError(MBFError):
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
        contents: For an archive, ``(file name, md5)`` of the canonical files it unpacks to,
            against which local copies are checked (see the module docstring).
    """

    url: str
    md5: str | None
    archive: bool = False
    contents: tuple[tuple[str, str], ...] = ()

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

    @property
    def canonical_md5s(self) -> dict[str, str]:
        """File name → md5 of the canonical copy, for the files of ``files`` whose md5 is known
        (a plain remote's own md5, or an archive's ``contents``)."""
        known: dict[str, str] = {}
        for remote in self.remotes:
            if remote.archive:
                known.update(remote.contents)
            elif remote.md5 is not None:
                known[remote.filename] = remote.md5
        return {name: known[name] for name in self.files if name in known}


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
                contents=(
                    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
                    ("test_batch", "40351d587109b95175f43aff81a1287e"),
                ),
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
                contents=(
                    ("train", "16019d7e3df5f24257cddd939b257f8d"),
                    ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
                ),
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
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
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
    """md5 hex digest of a file's bytes; the one place that hashes (tests count its calls)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _md5_record_path() -> Path:
    """``$MBF_CACHE_DIR/md5.json`` if that is set, else ``~/.cache/mbf_analysis/md5.json``."""
    root = os.environ.get(CACHE_ENV_VAR)
    return (Path(root).expanduser() if root else default_cache_dir()) / _MD5_RECORD


class _Md5Record:
    """md5 digests of local files, remembered across runs by path, size and modification time.

    The JSON file :func:`_md5_record_path` maps an absolute path to ``[size, mtime_ns, md5]``;
    a file whose size or ``mtime_ns`` differs from its entry is hashed again. The record never
    makes a load fail: a missing or unreadable one starts empty, and one that cannot be written
    is skipped (logged at debug level), so that every use hashes again.
    """

    def __init__(self) -> None:
        self.path = _md5_record_path()
        self._entries = self._read()
        self._changed = False

    def _read(self) -> dict[str, list]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            logger.debug("md5 record %s unreadable (%s); starting afresh", self.path, exc)
            return {}
        if not isinstance(entries, dict):
            logger.debug("md5 record %s holds no mapping; starting afresh", self.path)
            return {}
        return entries

    def md5(self, file: Path) -> str:
        """The md5 of ``file``: its recorded one if size and mtime match, else hashed now."""
        key, stamp = self._key_and_stamp(file)
        entry = self._entries.get(key)
        valid = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str)
        if valid and entry[:2] == stamp:
            return entry[2]
        digest = _md5(file)  # stamp taken before: a change while hashing shows up next time
        self._entries[key] = [*stamp, digest]
        self._changed = True
        return digest

    def remember(self, file: Path, digest: str) -> None:
        """Record ``digest`` as the md5 of ``file`` as it is now (a file just verified)."""
        key, stamp = self._key_and_stamp(file)
        self._entries[key] = [*stamp, digest]
        self._changed = True

    @staticmethod
    def _key_and_stamp(file: Path) -> tuple[str, list[int]]:
        stat = file.stat()
        return str(file.resolve()), [stat.st_size, stat.st_mtime_ns]

    def save(self) -> None:
        """Write the new entries, merged into what other processes wrote meanwhile; atomic.

        The folder is created if missing, but never inside a home folder that does not exist.
        """
        if not self._changed:
            return
        self._changed = False
        folder = self.path.parent
        if not os.environ.get(CACHE_ENV_VAR) and not Path.home().is_dir():
            logger.debug("md5 record not written: home folder %s does not exist", Path.home())
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {**self._read(), **self._entries})
        except OSError as exc:  # a StorageError too
            logger.debug("md5 record %s not written (%s); files are hashed again", self.path, exc)


_warned_md5: set[tuple[str, str]] = set()
"""``(path, md5)`` pairs already warned about in this process (the CLI locates twice)."""


def _check_local_md5s(
    spec: DatasetSpec, paths: dict[str, Path], record: _Md5Record, interface: Interface
) -> None:
    """Warn (once per process and file content) about files whose md5 is not the canonical one.

    A differing file is still read: the readers reject malformed content, and a smaller file in
    the canonical format (a test or a subset) is legitimate.
    """
    download = _OPTIONS[interface][0]
    for name, expected in spec.canonical_md5s.items():
        path = paths[name]
        actual = record.md5(path)
        key = (str(path.resolve()), actual)
        if actual == expected or key in _warned_md5:
            continue
        _warned_md5.add(key)
        logger.warning(
            "%s: md5 %s differs from the canonical %s file's %s; reading it anyway (if it "
            "should be the canonical file, it is damaged or replaced: delete it and pass %s)",
            path,
            actual,
            spec.title,
            expected,
            download,
        )


def _foreign_data(spec: DatasetSpec, folder: Path, record: _Md5Record) -> str | None:
    """If ``folder`` holds another data set's canonical files, say which; else ``None``."""
    if spec.fingerprint is None:
        return None
    owner = _FINGERPRINTS.get(record.md5(folder / spec.fingerprint))
    if owner is None or owner == spec.title:
        return None
    return f"{folder} holds {owner}, not {spec.title}"


@dataclass
class _Search:
    """Outcome of looking for a data set's files under some roots."""

    folder: Path | None = None
    searched: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _search(spec: DatasetSpec, roots: Iterable[Path], record: _Md5Record) -> _Search:
    result = _Search()
    for root in roots:
        for folder in (root, *(root / sub for sub in spec.subdirs)):
            result.searched.append(folder)
            missing = [f for f in spec.files if not (folder / f).is_file()]
            if not missing:
                foreign = _foreign_data(spec, folder, record)
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


def _download(spec: DatasetSpec, root: Path, interface: Interface, record: _Md5Record) -> None:
    """Fetch the remotes of ``spec`` that are missing into ``root / spec.subdirs[0]``.

    Plain files go into the sub-folder; archives are fetched into ``root``, checked, unpacked
    there (they hold the sub-folder) and deleted. A file is written under a ``.part`` name and
    renamed only after its md5 checks out; that md5 goes into ``record``, so the first use does
    not hash the file again.

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
        if remote.md5 is not None and not remote.archive:
            record.remember(dest, remote.md5)
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

    Files whose canonical md5 is known are checked against it (hashed on first use, then
    remembered; see the module docstring); one that differs is logged as a warning, not raised.

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
    record = _Md5Record()
    try:
        search = _search(spec, roots, record)
        if search.folder is None and download:
            _download(spec, roots[0], interface, record)
            search = _search(spec, roots[:1], record)
            if search.folder is None:
                raise CorruptDataError(
                    f"downloaded {spec.title} into {roots[0]}, but the expected files "
                    f"({', '.join(spec.files)}) are still missing there"
                )
        if search.folder is None:
            raise _not_found(spec, search, interface)
        paths = {f: search.folder / f for f in spec.files}
        _check_local_md5s(spec, paths, record, interface)
    finally:
        record.save()
    return paths
