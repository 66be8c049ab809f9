"""The output folder of an ``mbf-analyze`` run: refusal to overwrite, resume, and ``run.json``.

Every subcommand that writes a folder (``--out``) goes through :class:`RunFolder`:

- **Refusal.** A folder that already holds a run (its ``run.json``, or any file the subcommand
  writes) is never written over silently. Without ``--resume`` or ``--overwrite`` the command
  stops with one line that names the run it found (command and status) and the two ways on;
  subcommands that cannot resume offer ``--overwrite`` only.
- **Resume.** ``--resume`` needs the folder's ``run.json`` of the same subcommand, and returns it,
  so that the subcommand continues with the saved settings (nothing else is needed but
  ``--out``).
- **Overwrite.** ``--overwrite`` deletes the files the previous run recorded in its ``run.json``
  (``files``) and the subcommand's own file names, nothing else: a folder shared with other
  files keeps them.
- **One run at a time.** :meth:`RunFolder.claim` first takes an exclusive advisory lock
  (``fcntl.flock``) on the folder's lock file :data:`LOCK_NAME` and holds it until the process
  ends (or :meth:`RunFolder.release`). A second run, ``--resume`` or ``--overwrite`` of a
  locked folder is refused in one line naming the holder's pid, host and command, before it
  reads or touches anything. The kernel drops the lock when its process dies, however it dies,
  so a lock file left by a dead process never blocks. (``flock`` is reliable on local disks; on
  some network file systems it is local to each node.)
- **Record.** :meth:`RunFolder.write_record` writes ``run.json`` atomically, with the
  subcommand's fields plus what makes a result traceable (:func:`environment`): the full command
  line, the package versions (from the installed metadata, without importing them), the git
  commit of the source tree when there is one (and whether it had uncommitted changes), and the
  thread settings. ``started`` keeps the command line and time of the run's first session, and
  ``resumes`` one entry (command line, time) for every ``--resume`` since.

This module imports neither torch nor numpy, so that a refusal answers at once.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from mbf_analysis.cli.common import UsageError
from mbf_analysis.files import atomic_write_json

__all__ = [
    "LOCK_NAME",
    "RECORD_NAME",
    "RunFolder",
    "environment",
    "release_all",
    "set_invocation",
]

RECORD_NAME = "run.json"

LOCK_NAME = ".mbf-analyze.lock"
"""The lock file of a folder in use (:meth:`RunFolder.claim`); it holds the holder's pid, host,
command and start time."""

_PACKAGES = (
    "mbf-analysis",
    "torch",
    "backpack-for-pytorch",
    "numpy",
    "scipy",
    "pandas",
    "matplotlib",
    "seaborn",
)
"""Distributions whose versions every record names."""

_invocation: dict[str, Any] = {"argv": ["mbf-analyze"], "wait_policy_from": "user"}


def set_invocation(argv: Iterable[str], *, wait_policy_from: str, torch_loaded: bool) -> None:
    """Remember this invocation for :func:`environment`: its arguments, who chose
    ``OMP_WAIT_POLICY`` (``"user"`` or ``"mbf-analyze"``) and whether torch was already loaded
    then (in which case the policy did not reach its OpenMP runtime)."""
    _invocation.update(
        argv=["mbf-analyze", *argv],
        wait_policy_from=wait_policy_from,
        policy_before_torch=not torch_loaded,
    )


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(source: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``source``, or ``None``."""
    if shutil.which("git") is None:
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def environment() -> dict[str, Any]:
    """What makes a run traceable: command line, versions, git commit, platform and threads.

    ``threads`` holds ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` as the process sees them,
    ``wait_policy_from`` (``"user"`` when it was set before ``mbf-analyze`` started, else
    ``"mbf-analyze"``), ``policy_before_torch`` (whether it was set before torch was loaded, so
    that OpenMP honours it) and torch's intra-op thread count when torch is loaded.
    """
    threads: dict[str, Any] = {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "wait_policy_from": _invocation["wait_policy_from"],
        "policy_before_torch": _invocation.get("policy_before_torch"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        threads["torch_threads"] = torch.get_num_threads()
    return {
        "command_line": shlex.join(_invocation["argv"]),
        "cwd": os.getcwd(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": _git(Path(__file__).resolve().parent),
        "threads": threads,
    }


_held: dict[Path, int] = {}
"""Folders this process holds the lock of, and the lock files' descriptors."""


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command_line": shlex.join(_invocation["argv"]),
        "since": _now(),
    }


def _holder_text(text: str) -> str:
    try:
        holder = json.loads(text)
        return (
            f"pid {holder['pid']} on {holder['host']} since {holder['since']}: "
            f"{holder['command_line']}"
        )
    except (ValueError, TypeError, KeyError):
        return "a process that has not yet said who it is"


def release_all() -> None:
    """Drop every folder lock this process holds (:meth:`RunFolder.release`)."""
    while _held:
        os.close(_held.popitem()[1])


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class RunFolder:
    """The ``--out`` folder of one subcommand (module docstring).

    Args:
        path: The folder.
        command: The subcommand (``"cosine"``, ``"train"``, ...).
        outputs: The file (or sub-folder) names the subcommand writes there.
        resumable: Whether the subcommand has ``--resume``.
        extendable: Whether ``--resume`` can continue a complete run too (to more iterations,
            steps or epochs); ``fisher`` and ``heatmap`` only resume an interrupted one.
    """

    def __init__(
        self,
        path: Path,
        command: str,
        outputs: Iterable[str],
        *,
        resumable: bool,
        extendable: bool = True,
    ) -> None:
        self.path = Path(path)
        self.command = command
        self.outputs = tuple(outputs)
        self.resumable = resumable
        self.extendable = extendable
        self.written: list[str] = []
        self.previous: dict[str, Any] | None = None
        self._session = {"command_line": shlex.join(_invocation["argv"]), "time": _now()}

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_NAME

    def read_record(self) -> dict[str, Any] | None:
        """The folder's ``run.json``, or ``None`` when there is none.

        Raises:
            UsageError: If it exists but is not a run record.
        """
        if not self.record_path.is_file():
            return None
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(
                f"{self.record_path} is not a readable run record ({err}); move it away or "
                "choose another --out"
            ) from err
        if not isinstance(record, dict) or "command" not in record:
            raise UsageError(f"{self.record_path} is not a run record of mbf-analyze")
        return record

    def claim(self, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any] | None:
        """Decide what happens to the folder before anything is written.

        Returns:
            The saved record when resuming, else ``None`` (the folder then exists and holds no
            file of an earlier run).

        Raises:
            UsageError: ``--resume`` with ``--overwrite``, a folder that another process is
                using (module docstring), ``--resume`` without a run of this subcommand to
                continue, or a folder holding a run without either option.
        """
        if resume and overwrite:
            raise UsageError(
                "--resume continues the run in --out, --overwrite replaces it: pick one"
            )
        if self.path.is_dir() or not resume:
            self._lock()
        record = self.read_record()
        if resume:
            self.previous = record
            if record is None:
                raise UsageError(
                    f"--resume: no run to continue in {self.path} ({RECORD_NAME} missing); "
                    "start it without --resume"
                )
            if record["command"] != self.command:
                raise UsageError(
                    f"--resume: {self.path} holds a run of `mbf-analyze {record['command']}`, "
                    f"not of `{self.command}`; choose the folder of a {self.command} run"
                )
            self.written = list(record.get("files", []))
            self._sign_lock()
            return record
        found = [name for name in self.outputs if (self.path / name).exists()]
        if record is None and not found:
            self._sign_lock()
            return None
        if not overwrite:
            raise UsageError(self._refusal(record, found))
        self._remove(record, found)
        self._sign_lock()
        return None

    def _lock(self) -> None:
        """Take the folder's lock (module docstring), or refuse in one line naming its holder."""
        key = self.path.resolve()
        if key in _held:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise UsageError(
                f"{self.path} is in use by another run ({_holder_text(holder)}); wait for it to "
                "end or choose another --out"
            ) from None
        _held[key] = fd

    def _sign_lock(self) -> None:
        """Write this process into the lock file it holds (after a claim succeeded, so that a
        refused claim changes nothing)."""
        fd = _held.get(self.path.resolve())
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)

    def release(self) -> None:
        """Drop the folder's lock (it also goes when the process ends)."""
        fd = _held.pop(self.path.resolve(), None)
        if fd is not None:
            os.close(fd)

    def _refusal(self, record: dict[str, Any] | None, found: list[str]) -> str:
        if record is None:
            what = f"files of an earlier run ({', '.join(found)})"
            same = True
        else:
            status = record.get("status", "unknown")
            what = f"a {status} run of `mbf-analyze {record['command']}`"
            same = record["command"] == self.command and (self.extendable or status != "complete")
        ways = "pass --overwrite to replace it"
        if self.resumable and same:
            ways = "pass --resume to continue it or --overwrite to replace it"
        return f"{self.path} already holds {what}; {ways}, or choose another --out"

    def _remove(self, record: dict[str, Any] | None, found: list[str]) -> None:
        names = set(found) | set((record or {}).get("files", [])) | {RECORD_NAME}
        for name in sorted(names):
            target = self.path / name
            if not target.resolve().is_relative_to(self.path.resolve()):
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def add_files(self, *paths: str | Path) -> None:
        """Note files written into the folder (paths inside it, or bare names), for the
        record's ``files``."""
        for path in map(Path, paths):
            try:
                name = str(path.relative_to(self.path))
            except ValueError:
                name = str(path)
            if name not in self.written:
                self.written.append(name)

    def _sessions(self) -> dict[str, Any]:
        """``started`` (the first session's command line and time) and ``resumes`` (one entry
        per ``--resume`` since), carried over from the record this session resumed."""
        if self.previous is None:
            return {"started": self._session, "resumes": []}
        saved = self.previous.get("environment", {})
        started = self.previous.get("started") or {
            "command_line": saved.get("command_line"),
            "time": None,
        }
        return {"started": started, "resumes": [*self.previous.get("resumes", []), self._session]}

    def write_record(self, fields: Mapping[str, Any]) -> None:
        """Write ``run.json`` atomically: ``command``, the given fields, ``files`` and
        :func:`environment`."""
        record = {
            "command": self.command,
            **fields,
            "files": sorted(set(self.written)),
            **self._sessions(),
            "environment": environment(),
        }
        atomic_write_json(self.record_path, record)
