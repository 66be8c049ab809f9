"""No code from data files (issue 21): the restricted CIFAR unpickler, the md5 check of local
files with its record, and ``weights_only=True`` on every ``torch.load`` of the package."""

from __future__ import annotations

import builtins
import codecs
import gzip
import hashlib
import json
import logging
import os
import pathlib
import pickle
import re
import shlex
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mbf_analysis
from mbf_analysis import datafiles
from mbf_analysis.data import CorruptDataError, DataError, load_dataset

_BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = _BESIDE_REPO if _BESIDE_REPO.is_dir() else Path("/work/shared/data")

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Canonical md5s, written out independently of the module's constants.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_BATCH_1_MD5 = "c99cafc152244af753f735de768cd75f"
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the real data folders, the real md5 record or earlier warnings."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(datafiles.ENV_VAR, raising=False)
    monkeypatch.setenv(datafiles.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(datafiles, "_warned_md5", set())


@pytest.fixture
def md5_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files hashed, in order (``datafiles._md5`` wrapped)."""
    calls: list[str] = []
    real = datafiles._md5

    def counting(path: Path) -> str:
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(datafiles, "_md5", counting)
    return calls


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Writes protocol 2 as Python 2's cPickle wrote the canonical CIFAR batches: ``str`` and
    ``bytes`` as Python 2 strings (``BINSTRING``), numpy's globals under ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _python3_dump(obj: Any, path: Path) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _python2_dump(obj: Any, path: Path) -> None:
    with path.open("wb") as fh:
        _Python2Pickler(fh, protocol=2).dump(obj)


def _batch(rng: np.random.Generator, n: int, labels: dict[bytes, int]) -> dict[bytes, Any]:
    """A CIFAR batch as the canonical files hold it; ``labels``: key → number of classes."""
    batch: dict[bytes, Any] = {
        b"batch_label": b"training batch 1 of 5",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
    }
    batch.update({key: rng.integers(0, k, n).tolist() for key, k in labels.items()})
    return batch


def _write_cifar10(folder: Path, dump: Callable[[Any, Path], None]) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in zip(CIFAR10_FILES, (3, 2, 3, 1, 2, 4), strict=True):
        written[name] = _batch(rng, n, {b"labels": 10})
        dump(written[name], folder / name)
    return written


def _write_tiny_mnist(folder: Path, n_train: int = 6, n_test: int = 4) -> None:
    """Four valid IDX gz files of random content (so md5s that are not the canonical ones)."""
    rng = np.random.default_rng(n_train)
    folder.mkdir(parents=True, exist_ok=True)
    for name, shape in zip(
        MNIST_FILES, ((n_train, 28, 28), (n_train,), (n_test, 28, 28), (n_test,)), strict=True
    ):
        array = rng.integers(0, 10, shape, dtype=np.uint8)
        header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes()))


def _as_bytes(x: torch.Tensor) -> np.ndarray:
    """Undo the division by 255 (exact for values that were bytes)."""
    return (x.double() * 255).round().to(torch.uint8).numpy()


# --------------------------------------------------------------------------------------------
# The restricted CIFAR unpickler
# --------------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call of ``func(*args)``, run by a plain ``pickle.load``."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


def _os_system(marker: Path) -> tuple[Any, int, str]:
    return _Payload(os.system, f"touch {shlex.quote(str(marker))}"), 2, f"{os.name}.system"


def _exec(marker: Path) -> tuple[Any, int, str]:
    code = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"
    return _Payload(builtins.exec, code), 4, "builtins.exec"


def _touch_inside_a_batch(marker: Path) -> tuple[Any, int, str]:
    """The payload after a legitimate array, so numpy's globals are resolved first."""
    batch = _batch(np.random.default_rng(1), 2, {b"labels": 10})
    batch[b"filenames"] = [b"a.png", _Payload(pathlib.Path.touch, pathlib.Path(marker))]
    return batch, 4, "pathlib.Path.touch"


@pytest.mark.parametrize("make", [_os_system, _exec, _touch_inside_a_batch])
def test_cifar_pickle_that_calls_code_is_refused_and_runs_nothing(
    tmp_path: Path, make: Callable[[Path], tuple[Any, int, str]]
) -> None:
    folder = tmp_path / "data" / "cifar-10-batches-py"
    _write_cifar10(folder, _python3_dump)  # every file the loader expects, all legitimate ...
    marker = tmp_path / "payload-ran"
    payload, protocol, global_name = make(marker)
    crafted = pickle.dumps(payload, protocol=protocol)
    (folder / "data_batch_1").write_bytes(crafted)  # ... but the first batch it reads
    with pytest.raises(CorruptDataError) as info:
        load_dataset("cifar10", tmp_path / "data")
    message = str(info.value)
    assert message.startswith(f"{folder / 'data_batch_1'}: refuses to load the global ")
    assert f" {global_name} " in message and "download" in message
    assert "\n" not in message and isinstance(info.value, DataError)
    assert not marker.exists()
    pickle.loads(crafted)  # the control: a plain unpickler runs the payload
    assert marker.exists()


def test_codecs_encode_is_allowed_only_as_latin1(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, _python3_dump)
    batch = _batch(np.random.default_rng(2), 2, {b"labels": 10})
    batch[b"batch_label"] = _Payload(codecs.encode, "payload", "rot13")
    _python3_dump(batch, folder / "test_batch")
    with pytest.raises(CorruptDataError, match=r"test_batch: not a readable pickle.*'rot13'"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("dump", [_python2_dump, _python3_dump], ids=["python2", "python3"])
def test_canonical_cifar10_batches_load(
    tmp_path: Path, dump: Callable[[Any, Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar10(folder, dump)
    if dump is _python2_dump:  # the spelling of the canonical files, checked to be what we wrote
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in (folder / "test_batch").read_bytes()
    ds = load_dataset("cifar10", tmp_path)
    train = [written[name] for name in CIFAR10_FILES[:5]]
    assert ds.train_x.shape == (11, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    expected_x = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(_as_bytes(ds.train_x), expected_x)
    assert ds.train_y.tolist() == [y for b in train for y in b[b"labels"]]
    test = written["test_batch"]
    np.testing.assert_array_equal(_as_bytes(ds.test_x), test[b"data"].reshape(-1, 3, 32, 32))
    assert ds.test_y.tolist() == test[b"labels"]
    # The tiny batches are not the canonical ones: loaded, with a warning naming both md5s.
    batch_1 = folder / "data_batch_1"
    actual = hashlib.md5(batch_1.read_bytes()).hexdigest()
    assert f"{batch_1}: md5 {actual} differs from the canonical CIFAR-10 file's" in caplog.text
    assert CIFAR10_BATCH_1_MD5 in caplog.text


def test_canonical_cifar100_files_load(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(3)
    written = {}
    for split, n in (("train", 5), ("test", 3)):
        written[split] = _batch(rng, n, {b"fine_labels": 100, b"coarse_labels": 20})
        _python2_dump(written[split], folder / split)
    ds = load_dataset("cifar100", tmp_path)
    for x, y, batch in (
        (ds.train_x, ds.train_y, written["train"]),
        (ds.test_x, ds.test_y, written["test"]),
    ):
        np.testing.assert_array_equal(_as_bytes(x), batch[b"data"].reshape(-1, 3, 32, 32))
        assert y.tolist() == batch[b"fine_labels"]
    assert ds.num_classes == 100


# --------------------------------------------------------------------------------------------
# md5 of local files
# --------------------------------------------------------------------------------------------


def test_shared_mnist_and_fashion_files_are_canonical(caplog: pytest.LogCaptureFixture) -> None:
    for name, sub in (("mnist", "mnist"), ("fashion-mnist", "fashion_mnist")):
        paths = datafiles.locate(name, SHARED_DATA / sub)
        assert sorted(paths) == sorted(MNIST_FILES)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    record = json.loads((Path(os.environ[datafiles.CACHE_ENV_VAR]) / "md5.json").read_text())
    for name, md5 in MNIST_MD5.items():
        assert record[str((SHARED_DATA / "mnist" / name).resolve())][2] == md5


def test_local_file_with_another_md5_is_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_tiny_mnist(tmp_path / "mnist")
    images = tmp_path / "mnist" / MNIST_FILES[0]
    actual = hashlib.md5(images.read_bytes()).hexdigest()
    # The command line locates first, then loads: one warning per file, naming --download.
    datafiles.locate("mnist", tmp_path, interface="cli")
    ds = load_dataset("mnist", tmp_path)
    assert ds.train_x.shape == (6, 1, 28, 28)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(MNIST_FILES)
    expected = (
        f"{images}: md5 {actual} differs from the canonical MNIST file's {MNIST_MD5[images.name]}"
    )
    assert expected in warnings[0] and "--download" in warnings[0] and "\n" not in warnings[0]


def test_second_use_of_a_file_does_not_hash_it_again(tmp_path: Path, md5_calls: list[str]):
    _write_tiny_mnist(tmp_path / "mnist")
    load_dataset("mnist", tmp_path)
    assert sorted(md5_calls) == sorted(MNIST_FILES)  # each once, the fingerprint included
    load_dataset("mnist", tmp_path)
    assert len(md5_calls) == len(MNIST_FILES)
    record = json.loads((tmp_path / "cache" / "md5.json").read_text())
    images = tmp_path / "mnist" / MNIST_FILES[0]
    stat = images.stat()
    expected = [stat.st_size, stat.st_mtime_ns, hashlib.md5(images.read_bytes()).hexdigest()]
    assert record[str(images.resolve())] == expected
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "modified"
    md5_calls.clear()
    load_dataset("mnist", tmp_path)
    assert md5_calls == [images.name]


def test_downloaded_files_are_not_hashed_again_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, md5_calls: list[str]
) -> None:
    def fetch(url: str, dest: Path) -> None:
        shutil.copyfile(SHARED_DATA / "mnist" / url.rsplit("/", 1)[-1], dest)

    monkeypatch.setattr(datafiles, "_fetch", fetch)
    load_dataset("mnist", tmp_path, download=True)
    assert sorted(md5_calls) == sorted(f"{name}.part" for name in MNIST_FILES)


def _file_in_the_way(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "cache"  # mkdir fails, even for root


def _folder_in_the_way(tmp_path: Path) -> Path:
    (tmp_path / "cache" / "md5.json").mkdir(parents=True)  # neither read nor replaced
    return tmp_path / "cache"


@pytest.mark.parametrize("cache", [_file_in_the_way, _folder_in_the_way])
def test_unwritable_md5_record_only_costs_hashing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    md5_calls: list[str],
    cache: Callable[[Path], Path],
) -> None:
    monkeypatch.setenv(datafiles.CACHE_ENV_VAR, str(cache(tmp_path)))
    caplog.set_level(logging.DEBUG, logger=datafiles.__name__)
    _write_tiny_mnist(tmp_path / "mnist")
    for _ in range(2):
        assert load_dataset("mnist", tmp_path).test_x.shape == (4, 1, 28, 28)
    assert len(md5_calls) == 2 * len(MNIST_FILES)
    not_written = [r for r in caplog.records if "not written" in r.getMessage()]
    assert not_written and all(r.levelno == logging.DEBUG for r in not_written)


def test_unreadable_md5_record_is_replaced(tmp_path: Path, md5_calls: list[str]) -> None:
    record = tmp_path / "cache" / "md5.json"
    record.parent.mkdir()
    record.write_bytes(b"\xff not json")
    _write_tiny_mnist(tmp_path / "mnist")
    load_dataset("mnist", tmp_path)
    assert len(json.loads(record.read_text())) == len(MNIST_FILES)
    load_dataset("mnist", tmp_path)
    assert len(md5_calls) == len(MNIST_FILES)


def test_md5_record_never_creates_a_missing_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, md5_calls: list[str]
) -> None:
    monkeypatch.delenv(datafiles.CACHE_ENV_VAR)
    _write_tiny_mnist(tmp_path / "mnist")
    load_dataset("mnist", tmp_path)
    assert not (tmp_path / "home").exists()
    (tmp_path / "home").mkdir()
    load_dataset("mnist", tmp_path)
    assert (tmp_path / "home" / ".cache" / "mbf_analysis" / "md5.json").is_file()
    md5_calls.clear()
    load_dataset("mnist", tmp_path)
    assert md5_calls == []


# --------------------------------------------------------------------------------------------
# torch.load
# --------------------------------------------------------------------------------------------

_TORCH_LOAD = re.compile(r"\btorch\s*\.\s*load\s*\(")
_OTHER_SPELLINGS = re.compile(r"from\s+torch\s+import\s+[^\n]*\bload\b|serialization\s*\.\s*load\b")


def _arguments(source: str, open_paren: int) -> str:
    """The text between the parenthesis at ``open_paren`` and the one that closes it."""
    depth = 0
    for i in range(open_paren, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source[open_paren + 1 : i]
    raise AssertionError(f"unbalanced parenthesis at {open_paren}")


def test_every_torch_load_passes_weights_only_true() -> None:
    package = Path(mbf_analysis.__file__).parent
    sites, unsafe = [], []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(package)
        assert not _OTHER_SPELLINGS.search(source), f"{where}: torch's load under another name"
        for match in _TORCH_LOAD.finditer(source):
            site = f"{where}:{source.count(chr(10), 0, match.start()) + 1}"
            sites.append(site)
            if not re.search(r"\bweights_only\s*=\s*True\b", _arguments(source, match.end() - 1)):
                unsafe.append(site)
    assert sites, "the scan found no torch.load at all"
    assert unsafe == [], "torch.load without weights_only=True"
