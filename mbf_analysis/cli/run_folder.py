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
- **Record.** :meth:`RunFolder.write_record` writes ``run.json`` atomically, with the
  subcommand's fields plus what makes a result traceable (:func:`environment`): the full command
  line, the package versions (from the installed metadata, without importing them), the git
  commit of the source tree when there is one (and whether it had uncommitted changes), and the
  thread settings.

This module imports neither torch nor numpy, so that a refusal answers at once.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from mbf_analysis.cli.common import UsageError

__all__ = ["RECORD_NAME", "RunFolder", "environment", "set_invocation"]

RECORD_NAME = "run.json"

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


class RunFolder:
    """The ``--out`` folder of one subcommand (module docstring).

    Args:
        path: The folder.
        command: The subcommand (``"cosine"``, ``"train"``, ...).
        outputs: The file (or sub-folder) names the subcommand writes there.
        resumable: Whether the subcommand has ``--resume``.
    """

    def __init__(
        self, path: Path, command: str, outputs: Iterable[str], *, resumable: bool
    ) -> None:
        self.path = Path(path)
        self.command = command
        self.outputs = tuple(outputs)
        self.resumable = resumable
        self.written: list[str] = []

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
            UsageError: ``--resume`` with ``--overwrite``, ``--resume`` without a run of this
                subcommand to continue, or a folder holding a run without either option.
        """
        if resume and overwrite:
            raise UsageError(
                "--resume continues the run in --out, --overwrite replaces it: pick one"
            )
        record = self.read_record()
        if resume:
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
            return record
        found = [name for name in self.outputs if (self.path / name).exists()]
        if record is None and not found:
            self.path.mkdir(parents=True, exist_ok=True)
            return None
        if not overwrite:
            raise UsageError(self._refusal(record, found))
        self._remove(record, found)
        return None

    def _refusal(self, record: dict[str, Any] | None, found: list[str]) -> str:
        if record is None:
            what = f"files of an earlier run ({', '.join(found)})"
            same = True
        else:
            status = record.get("status", "unknown")
            what = f"a {status} run of `mbf-analyze {record['command']}`"
            same = record["command"] == self.command
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

    def write_record(self, fields: Mapping[str, Any]) -> None:
        """Write ``run.json`` atomically: ``command``, the given fields, ``files`` and
        :func:`environment`."""
        record = {
            "command": self.command,
            **fields,
            "files": sorted(set(self.written)),
            "environment": environment(),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{RECORD_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as fh:
                json.dump(record, fh, indent=2, default=str)
                fh.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.record_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
