"""Wall time and peak memory of every ``mbf-analyze`` command of README.md (issue 21).

What is measured: each command of README.md's shell blocks (every ``mbf-analyze`` command,
continuation lines joined, ``--help``-only lines skipped; the same extraction as
``tests/test_readme.py``), run as it is written, alone, one at a time, as a subprocess
``python -m mbf_analysis ...`` with ``OMP_WAIT_POLICY=PASSIVE``:

- wall time from start to exit (``time.perf_counter``);
- peak RSS of that one process (``ru_maxrss`` of the ``os.wait4`` that reaps it, so an earlier
  command's peak never shows up in a later row), and its CPU time (user + system);
- its exit status, and the 1-min load average just before and just after it (it counts the
  measured command too: on a 2-core machine a value near 1 before a command means that another
  process kept one core busy).

Each command runs in a fresh temporary folder with an empty cache (``MBF_CACHE_DIR``), so a
pretraining is never a cache hit: ``--out runs/X`` becomes ``--out TMP/runs/X``, a command
without ``--out`` writes its default ``runs/...`` under TMP (it runs there), and a relative
``--data-dir`` is resolved from the repository root, as the README means it. A ``--resume``
command runs in the folder and cache of the command whose ``--out`` it names, right after it
(selecting a resume with ``--only`` runs that command first). A command still running at
``--timeout`` gets SIGTERM, which makes it finish the step in progress, save and exit 143 (a
SIGKILL follows after 60 s); its row reads ``> N s (stopped)`` with its peak RSS until then.
Nothing is extrapolated: the notes quote the command's own printed estimate where it gave one.

Run: ``python benchmarks/bench_commands.py --timeout 600`` (writes
``benchmarks/results_commands.md`` and ``.json``; ``--update-readme`` also rewrites the table
between ``<!-- costs:start -->`` and ``<!-- costs:end -->`` in README.md). ``--only SUBSTR``
(repeatable) runs the matching commands and keeps the other rows; ``--list`` prints the
commands; ``--render`` rewrites the files from the JSON without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

from mbf_analysis.cli.recording import format_duration

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = Path(__file__).with_name("results_commands.md")
START_MARK = "<!-- costs:start -->"
END_MARK = "<!-- costs:end -->"
HELP_FLAGS = frozenset({"-h", "--help"})
STOP_GRACE_S = 60.0
"""Seconds between the SIGTERM at the timeout and a SIGKILL."""
POLL_S = 0.1


@dataclass(frozen=True)
class Command:
    """One README command: ``text`` as written (comment dropped, lines joined) and its
    arguments after ``mbf-analyze``."""

    text: str
    argv: tuple[str, ...]

    def option(self, name: str) -> str | None:
        """The value of ``--name VALUE`` or ``--name=VALUE``, else ``None``."""
        for i, word in enumerate(self.argv):
            if word == name and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
        return None

    @property
    def is_resume(self) -> bool:
        return "--resume" in self.argv


def readme_commands(text: str) -> list[Command]:
    """Every ``mbf-analyze`` command of the ```` ```bash ```` blocks of ``text``, in order,
    each once: continuation lines joined, ``&&`` chains split, comments dropped, ``--help``-only
    lines skipped (the extraction of ``tests/test_readme.py``)."""
    commands: list[Command] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if not words or words[0] != "mbf-analyze":
                    continue
                if HELP_FLAGS & set(words):
                    continue
                command = Command(shlex.join(words), tuple(words[1:]))
                if command not in commands:
                    commands.append(command)
    return commands


def parent_of(commands: list[Command], index: int) -> int | None:
    """For a ``--resume`` command, the last command before it that starts the run of the same
    ``--out`` (``None`` for other commands, or when there is none)."""
    command = commands[index]
    if not command.is_resume:
        return None
    out = command.option("--out")
    for j in range(index - 1, -1, -1):
        if not commands[j].is_resume and commands[j].option("--out") == out:
            return j
    return None


def plan(commands: list[Command], only: list[str] | None) -> list[int]:
    """Indices to run, in README order: those matching ``only`` (a whole command selects
    itself alone, else any command containing the substring; all when ``only`` is empty) and
    the run that each selected ``--resume`` continues."""
    if not only:
        chosen = set(range(len(commands)))
    else:
        chosen = set()
        for pattern in only:
            wanted = " ".join(pattern.split())
            exact = {i for i, c in enumerate(commands) if c.text == wanted}
            chosen |= exact or {i for i, c in enumerate(commands) if wanted in c.text}
    chosen |= {p for i in chosen if (p := parent_of(commands, i)) is not None}
    return sorted(chosen)


def rewrite(argv: tuple[str, ...], folder: Path) -> list[str]:
    """``argv`` with ``--out``/``--cache-dir`` inside ``folder`` and a relative ``--data-dir``
    resolved from the repository root."""
    out, words = [], list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        if name in ("--out", "--cache-dir", "--data-dir"):
            if not eq:
                i += 1
                value = words[i] if i < len(words) else ""
            path = Path(value)
            if name == "--data-dir":
                path = path if path.is_absolute() else (REPO / path).resolve()
            else:
                path = folder / (path.relative_to(path.anchor) if path.is_absolute() else path)
            out += [name, str(path)]
        else:
            out.append(word)
        i += 1
    return out


def _checkpoints(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (folder / "cache").rglob("*.pt")}


def _wait(proc: subprocess.Popen, timeout: float | None) -> tuple[int, os.rusage, str]:
    """Reap ``proc`` with ``os.wait4`` (its own rusage); SIGTERM at ``timeout`` seconds, SIGKILL
    :data:`STOP_GRACE_S` later. Returns the wait status, the rusage and ``""``, ``"stopped"``
    or ``"killed"``."""
    start, how = time.perf_counter(), ""
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return status, usage, how
            elapsed = time.perf_counter() - start
            if timeout is not None and not how and elapsed > timeout:
                os.kill(proc.pid, signal.SIGTERM)
                how = "stopped"
            elif how == "stopped" and elapsed > timeout + STOP_GRACE_S:
                os.killpg(proc.pid, signal.SIGKILL)
                how = "killed"
            time.sleep(POLL_S)
    except BaseException:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
        raise


def _quote(line: str, folder: Path) -> str:
    return line.replace(f"{folder}/", "").replace(str(folder), "TMP").strip()


def measure(
    command: Command, folder: Path, timeout: float | None, parent: tuple[int, dict] | None
) -> dict:
    """Run one command in ``folder`` (module docstring) and return its row; ``parent``: the
    number and row of the run that a ``--resume`` continues."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = rewrite(command.argv, folder)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MBF_CACHE_DIR": str(folder / "cache")}
    log = folder / f"log-{len(list(folder.glob('log-*.txt')))}.txt"
    checkpoints = _checkpoints(folder)
    load_before, started = os.getloadavg()[0], datetime.now()
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mbf_analysis", *argv],
            cwd=folder,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        status, usage, how = _wait(proc, timeout)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    output = log.read_text(errors="replace")
    lines = [line for line in re.split(r"[\r\n]+", output) if line.strip()]
    notes = []
    if parent is not None:
        number, before = parent
        state = "stopped at its timeout" if before["how"] else "finished"
        if before["exit"] != 0 and not before["how"]:
            state = f"failed (exit {before['exit']})"
        notes.append(f"right after #{number}, which {state}")
    notes += [
        _quote(m, folder) for m in re.findall(r"resuming \S+ at iteration \d+ of \d+", output)
    ]
    if _checkpoints(folder) != checkpoints:
        notes.append("includes the SGD-m pretraining (empty cache)")
    estimate = re.search(r"estimate: [^;(\r\n]*", output)  # tqdm may share its line
    if estimate:
        notes.append("its own " + estimate.group(0).strip())
    if how == "stopped":
        notes.append(f"SIGTERM at {timeout:g} s; it saved and exited after {wall:.0f} s")
    elif how == "killed":
        notes.append(f"SIGTERM at {timeout:g} s, SIGKILL {STOP_GRACE_S:g} s later")
    elif proc.returncode != 0:
        notes.append("failed: " + (_quote(lines[-1], folder) if lines else "no output"))
    return {
        "command": command.text,
        "argv": [_quote(word, folder) for word in argv],
        "started": started.isoformat(timespec="seconds"),
        "wall_s": round(wall, 2),
        "timeout_s": timeout,
        "how": how,
        "exit": proc.returncode,
        "peak_rss_kib": usage.ru_maxrss,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "load_before": round(load_before, 2),
        "load_after": round(load_after, 2),
        "notes": notes,
        "tail": [_quote(line, folder) for line in lines[-5:]],
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    meminfo = Path("/proc/meminfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, flags=re.M)
    mem_kib = int(re.search(r"^MemTotal:\s*(\d+)", meminfo, flags=re.M).group(1))
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "commit": commit,
    }


def _memory(kib: int) -> str:
    return f"{kib / 2**20:.1f} GiB" if kib >= 2**20 else f"{kib / 1024:.0f} MiB"


def _wall(row: dict) -> str:
    if row["how"]:
        return f"> {row['timeout_s']:g} s (stopped)"
    return format_duration(row["wall_s"])


def _exit(row: dict) -> str:
    code = row["exit"]
    return f"killed ({signal.Signals(-code).name})" if code < 0 else str(code)


def table(commands: list[Command], rows: dict, *, full: bool) -> list[str]:
    """The markdown table, one row per README command (``full``: CPU time and run too)."""
    head = ["#", "command", "wall time", "peak RSS", "exit", "load before → after", "notes"]
    if full:
        head[4:4] = ["CPU time"]
        head.append("run")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, command in enumerate(commands, 1):
        row = rows.get(command.text)
        if row is None:
            cells = [str(i), f"`{command.text}`", "not measured", "", "", "", ""]
            cells += ["", ""] if full else []
        else:
            cells = [
                str(i),
                f"`{command.text}`",
                _wall(row),
                _memory(row["peak_rss_kib"]),
                _exit(row),
                f"{row['load_before']:.2f} → {row['load_after']:.2f}",
                "; ".join(row["notes"]),
            ]
            if full:
                cells[4:4] = [format_duration(row["cpu_s"])]
                cells.append(str(row["run"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _machine_text(m: dict) -> str:
    return (
        f"{m['nproc']} CPUs (nproc), {m['cpu']}, {m['mem_gib']} GiB (MemTotal), {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}, commit {m['commit']}"
    )


def _timeouts(run: dict) -> str:
    text = "none" if run["timeout"] is None else f"{run['timeout']:g}"
    if run.get("resume_timeout") is not None:
        text += f" (a resume of a stopped run: {run['resume_timeout']:g})"
    return text


def render(commands: list[Command], results: dict) -> str:
    runs = results["runs"]
    lines = [
        "# Wall time and peak memory of every README command (issue 21)",
        "",
        "Written by `benchmarks/bench_commands.py` (its docstring says how it measures); do",
        "not edit by hand. Each command ran alone, as it is written in README.md, as a",
        "subprocess with `OMP_WAIT_POLICY=PASSIVE`, in a temporary folder with an empty cache",
        "(`MBF_CACHE_DIR`), so a pretraining is never a cache hit (the notes say which times",
        "include one). Peak RSS is that process's own `ru_maxrss` (`os.wait4`). A command still",
        "running at the timeout got SIGTERM (it saves and exits 143) and reads `> N s (stopped)`,",
        "with its peak RSS until then; nothing is extrapolated. A `--resume` ran right after the",
        "command whose `--out` it names: a resume of a finished run has nothing left to compute",
        "unless it extends the run, and one of a stopped run continues it. Load: the 1-min load",
        "average just before and just after the command; it counts the command itself, so a",
        "value near 1 before a command on this 2-core machine means another process kept one",
        "core busy.",
        "",
        "## Runs of the script",
        "",
        "| run | command | date | timeout (s) | measuring time | machine |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['id']} | `{run['command']}` | {run['date']} | {_timeouts(run)} | "
            f"{format_duration(run['total_s'])} | {_machine_text(run['machine'])} |"
        )
    lines += ["", "## Commands", "", *table(commands, results["rows"], full=True), ""]
    return "\n".join(lines)


def readme_table(commands: list[Command], results: dict) -> str:
    dates = sorted(run["date"][:10] for run in results["runs"])
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    m = results["runs"][-1]["machine"]
    return "\n".join(
        [
            *table(commands, results["rows"], full=False),
            "",
            f"Measured {when} on {m['nproc']} cores ({m['cpu']}, {m['mem_gib']} GiB); each "
            "command with its run of the script, CPU time and output in "
            "`benchmarks/results_commands.md`.",
        ]
    )


def replace_marked(text: str, body: str) -> str:
    """``text`` with what lies between :data:`START_MARK` and :data:`END_MARK` replaced by
    ``body``.

    Raises:
        ValueError: A marker is missing or they are out of order.
    """
    start, end = text.find(START_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        raise ValueError(
            f"README.md has no table markers: put `{START_MARK}` and `{END_MARK}` on lines of "
            "their own where the table goes"
        )
    return text[: start + len(START_MARK)] + "\n" + body + "\n" + text[end:]


def _load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": [], "rows": {}}


def _save(commands: list[Command], results: dict, out: Path, update_readme: bool) -> None:
    texts = {c.text for c in commands}
    results["rows"] = {k: v for k, v in results["rows"].items() if k in texts}
    used = {row["run"] for row in results["rows"].values()}
    results["runs"] = [run for run in results["runs"] if run["id"] in used]
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    if not results["runs"]:
        return
    out.write_text(render(commands, results))
    if update_readme:
        README.write_text(replace_marked(README.read_text(), readme_table(commands, results)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="SUBSTR", help="run only these")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per command")
    parser.add_argument(
        "--resume-timeout",
        type=float,
        default=None,
        help="seconds for a --resume whose run was stopped at its timeout (default: --timeout)",
    )
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (.md; .json too)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite README's table")
    parser.add_argument("--render", action="store_true", help="rewrite files from the JSON only")
    args = parser.parse_args(argv)

    readme = README.read_text()
    commands = readme_commands(readme)
    if args.list:
        for i, command in enumerate(commands):
            parent = parent_of(commands, i)
            after = f"   (continues #{parent + 1})" if parent is not None else ""
            print(f"{i + 1:3d}  {command.text}{after}")
        return 0
    if args.update_readme:
        try:
            replace_marked(readme, "")
        except ValueError as err:
            print(f"bench_commands.py: error: {err}", file=sys.stderr)
            return 2
    results = _load(args.out.with_suffix(".json"))
    if args.render:
        _save(commands, results, args.out, args.update_readme)
        return 0
    chosen = plan(commands, args.only)
    if not chosen:
        print(f"bench_commands.py: error: no README command matches {args.only}", file=sys.stderr)
        return 2

    run_id = max((run["id"] for run in results["runs"]), default=0) + 1
    invocation = " ".join(["python benchmarks/bench_commands.py", *map(shlex.quote, sys.argv[1:])])
    run = {
        "id": run_id,
        "command": invocation,
        "date": datetime.now().isoformat(timespec="minutes"),
        "timeout": args.timeout,
        "resume_timeout": args.resume_timeout,
        "machine": machine(),
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "total_s": 0.0,
    }
    results["runs"].append(run)
    print(f"load average at start: {' '.join(map(str, run['load_at_start']))}")
    start = time.perf_counter()
    done: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-commands-") as tmp:
        for i in chosen:
            command, parent = commands[i], parent_of(commands, i)
            home = parent if parent is not None else i
            timeout = args.timeout
            if parent in done and done[parent]["how"] and args.resume_timeout is not None:
                timeout = args.resume_timeout
            print(f"[{i + 1}/{len(commands)}] {command.text}", flush=True)
            before = (parent + 1, done[parent]) if parent in done else None
            row = measure(command, Path(tmp) / f"cmd{home + 1}", timeout, before)
            row["run"] = run_id
            done[i] = row
            results["rows"][command.text] = row
            run["total_s"] = round(time.perf_counter() - start, 1)
            _save(commands, results, args.out, args.update_readme)
            print(
                f"    {_wall(row)}, peak RSS {_memory(row['peak_rss_kib'])}, exit {_exit(row)}, "
                f"load {row['load_before']:.2f} → {row['load_after']:.2f}"
                + (f"; {'; '.join(row['notes'])}" if row["notes"] else ""),
                flush=True,
            )
    print(f"measured {len(chosen)} commands in {format_duration(run['total_s'])}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
