"""The systems under test: how each is started, and what is read from it around a run.

Each builder below makes one kind of system; a data set (bench/datasets.py)
lists the ones it runs. A system's figures besides wrk's are read around
each run: the CPU time of its process tree and of its database server
(bench/procfs.py), and its hot cache's hits when it serves metrics.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procfs
from bench.report import Usage
from tests.servers import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = Path(sys.executable).parent
METRICS_PATH = "/-/metrics"
_LOOKUPS = re.compile(r'^serve_image_cache_lookups_total\{result="(hit|miss)"\} (\S+)$', re.M)


@dataclass
class System:
    """A server under test: how to start it, and its processes once started."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    # The database server it reads from, when it has one on this machine.
    database: procfs.DatabaseServer | None = None
    # Where it serves Prometheus metrics (hot-cache hits), if it does.
    metrics_path: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    etags: dict[str, str] = field(default_factory=dict)
    # Not a server: bench/db_only.py run for the `large` scenario alone, with
    # `argv` + [file, seconds, connections] appended.
    db_only: bool = False

    def start(self, logs: Path) -> None:
        if self.db_only:
            return
        self.log = logs / f"{self.name}.log"
        with self.log.open("wb") as log:  # the child writes to its own copy
            self.proc = subprocess.Popen(
                self.argv, env={**os.environ, **self.env}, cwd=ROOT, stdout=log, stderr=log,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:] if self.log else ""
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the children if any (uvicorn --workers,
        nginx's workers), else the process itself."""
        assert self.proc is not None
        children = [pid for pid in procfs.children(self.proc.pid)
                    if "resource_tracker" not in _cmdline(pid)]
        return children or [self.proc.pid]

    def usage(self) -> Usage:
        """The counters read before and after a run: their difference is what it cost."""
        assert self.proc is not None
        hits = lookups = None
        if self.metrics_path is not None:
            hits, lookups = cache_lookups(self.port, self.metrics_path)
        return Usage(
            worker_cpu_s=procfs.tree_cpu_seconds(self.proc.pid),
            db_cpu_s=self.database.cpu_seconds() if self.database is not None else None,
            cache_hits=hits, cache_lookups=lookups,
        )


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def cache_lookups(port: int, path: str) -> tuple[int | None, int | None]:
    """(hits, lookups) of the hot cache, summed over the workers; None without a cache."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = {kind: int(float(value)) for kind, value in _LOOKUPS.findall(text)}
    if not found:
        return None, None
    return found.get("hit", 0), found.get("hit", 0) + found.get("miss", 0)


def site_file(path: Path, constants: dict[str, Any]) -> Path:
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    return path


# -- the kinds of system ---------------------------------------------------------


def serve_image(name: str, site: Path, workers: int = 1,
                database: procfs.DatabaseServer | None = None,
                metrics: bool = False, flags: Sequence[str] = ()) -> System:
    """`serve-image serve` of a site file (which sets METRICS_PATH when `metrics`),
    with any further `serve` flags."""
    port = free_port()
    return System(
        name, [str(VENV_BIN / "serve-image"), "serve", "--site", str(site), "--port", str(port),
               "--workers", str(workers), "--log-level", "warning", *flags],
        port, database=database, metrics_path=METRICS_PATH if metrics else None)


# nginx's own location: every file from disk.
STATIC = """        location / {
            expires 100m;
            add_header X-Content-Type-Options nosniff;
        }"""


def _nginx_argv(tmp: Path, docroot: Path, name: str, port: int, locations: str) -> list[str]:
    conf = tmp / f"{name}.conf"
    conf.write_text(
        (HERE / "nginx.conf.template").read_text()
        .replace("@WORKERS@", "auto").replace("@TMP@", str(tmp)).replace("@NAME@", name)
        .replace("@PORT@", str(port)).replace("@ROOT@", str(docroot))
        .replace("@LOCATIONS@", locations)
    )
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    return [binary, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / f"{name}-error.log")]


def nginx(tmp: Path, docroot: Path, name: str = "nginx") -> System:
    """nginx serving `docroot` from disk, one worker per CPU."""
    port = free_port()
    return System(name, _nginx_argv(tmp, docroot, name, port, STATIC), port)


def nginx_offload(name: str, tmp: Path, site: Path,
                  database: procfs.DatabaseServer | None = None) -> System:
    """nginx in front of `serve-image serve` of a DFS site with OFFLOAD x-accel-redirect:
    serve-image answers, nginx sends the files from the mount. One system: nginx's
    and serve-image's processes are one tree (`sh` starts serve-image, then becomes
    nginx), so its CPU is both."""
    from serve_image.apache import nginx_location, nginx_offload_location
    from serve_image.settings import load_site

    settings = load_site(str(site))
    upstream_port, port = free_port(), free_port()
    locations = (nginx_location(settings, f"http://127.0.0.1:{upstream_port}")
                 + nginx_offload_location(settings))
    indented = "\n".join(f"        {line}" if line else "" for line in locations.splitlines())
    nginx_argv = _nginx_argv(tmp, Path(settings.dfs_mount_point or "/"), name, port, indented)
    serve = [str(VENV_BIN / "serve-image"), "serve", "--site", str(site), "--port",
             str(upstream_port), "--log-level", "warning"]
    script = f"{shlex.join(serve)} & exec {shlex.join(nginx_argv)}"
    return System(name, ["/bin/sh", "-c", script], port, database=database)


def naive(backend: str, site: Path, database: procfs.DatabaseServer | None = None) -> System:
    """bench/baselines/naive.py under uvicorn, reading the site file's database."""
    port = free_port()
    return System(
        f"naive-{backend}",
        [str(VENV_BIN / "python"), "-m", "uvicorn", "--factory",
         "bench.baselines.naive:from_environment", "--port", str(port),
         "--log-level", "warning"], port,
        env={"SERVE_IMAGE_SITE": str(site)}, database=database)


def http_only(docroot: Path) -> System:
    """bench/baselines/http_only.py: serve-image's HTTP half, files from memory."""
    port = free_port()
    return System(
        "http-only",
        [str(VENV_BIN / "python"), "-m", "uvicorn", "--factory",
         "bench.baselines.http_only:from_environment", "--port", str(port),
         "--log-level", "warning", "--no-access-log", "--no-server-header"], port,
        env={"SERVE_IMAGE_BENCH_ROOT": str(docroot)})


def db_only(backend: str, site: Path, database: procfs.DatabaseServer | None = None) -> System:
    """bench/db_only.py: serve-image's database half, no HTTP (the `large` scenario)."""
    return System(
        f"db-only-{backend}",
        [str(VENV_BIN / "python"), "-m", "bench.db_only", str(site)],
        0, database=database, db_only=True)
