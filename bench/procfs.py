"""What the benchmark reads from /proc: CPU time of process trees, peak RSS, database servers.

CPU is utime + stime from /proc/PID/stat (proc(5)), summed over a process
and all its descendants, with each one's cutime + cstime: the time of its
children that have exited and been waited for. A PostgreSQL backend that
ends during a run is so still counted, in the postmaster's cutime.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_image.settings import settings_from_mapping
from serve_image.storage import make_layout

TICKS = os.sysconf("SC_CLK_TCK")
# The command names (/proc/PID/comm) a database server's processes have.
SERVER_NAMES = {"mysql": ("mariadbd", "mysqld"), "pgsql": ("postgres", "postmaster")}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its waited-for children)."""
    try:
        text = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ")".
    fields = text.rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) / TICKS


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and every process under it; 0.0 if it is gone."""
    parents: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got is not None:
                parents.setdefault(got[0], []).append(int(entry.name))
                cpu[int(entry.name)] = got[1]
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += parents.get(pid, [])
    return total


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got is not None and got[0] == pid:
                out.append(int(entry.name))
    return out


def command_name(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


def reset_peak_rss(pids: list[int]) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (proc(5)).
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mib(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) / 1024)
    return out


@dataclass(frozen=True)
class DatabaseServer:
    """A database server running on this machine: the root of its processes."""

    backend: str
    pid: int  # mariadbd (one process, a thread per connection) or the postmaster

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)


class NotHere(Exception):
    """The database server's processes cannot be read from this machine's /proc."""


async def database_server(constants: dict[str, Any]) -> DatabaseServer:
    """The server behind a site's settings, found by asking it.

    MariaDB names its pid file (`@@pid_file`); a PostgreSQL backend's parent
    is the postmaster (`pg_backend_pid()`), which every backend and
    background process descends from. Raises NotHere for a server on
    another host or in another pid namespace (a container), or SQLite.
    """
    backend = constants.get("STORAGE_BACKEND", "sqlite")
    if backend not in SERVER_NAMES:
        raise NotHere(f"{backend} has no server process")
    if constants.get("STORAGE_HOST", "127.0.0.1") not in LOOPBACK:
        raise NotHere(f"{backend} runs on {constants['STORAGE_HOST']}, not here")
    b = make_layout(settings_from_mapping(constants, "<bench>", "bench"))
    await b.connect()
    try:
        question = "SELECT @@pid_file" if backend == "mysql" else "SELECT pg_backend_pid()"
        [(answer,)] = await b.driver.fetch(question)
        pid = _server_pid(backend, answer)  # while the backend asked is still there
    finally:
        await b.close()
    if command_name(pid) not in SERVER_NAMES[backend]:
        raise NotHere(f"process {pid} is {command_name(pid)!r}, not a {backend} server")
    return DatabaseServer(backend, pid)


def _server_pid(backend: str, answer: Any) -> int:
    """The server's pid from MariaDB's pid file name or a PostgreSQL backend's pid."""
    if backend == "mysql":
        try:
            return int(Path(str(answer)).read_text().split()[0])
        except (OSError, ValueError, IndexError) as e:
            raise NotHere(f"cannot read MariaDB's pid file {answer}: {e}") from e
    got = _stat(int(answer))
    if got is None:
        raise NotHere(f"PostgreSQL backend {answer} is not in this machine's /proc")
    return got[0]
