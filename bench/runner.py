"""The load benchmark: serve-image against nginx and the naive port, driven by wrk.

    .venv/bin/python -m bench.runner [--quick] [--duration S] [--rounds N]
                                     [--systems a,b] [--scenarios a,b]

Run through `scripts/bench`, which installs wrk and nginx when missing. Every
system serves the same files on a loopback port; each scenario runs every
system for the same time, round after round (A B C A B C), so drift of the
machine's load spreads over all of them. Results go to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.data import BenchFiles, Databases, fill, make_files

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = Path(sys.executable).parent
LUA = HERE / "random_paths.lua"
BACKENDS = ("mysql", "pgsql", "sqlite")
SLOW_READERS = 64
LARGE_CONNECTIONS = 4  # the `large` scenario's, for wrk and db-only alike
SLOW_READ_BYTES = 16 * 1024  # per read; then a pause, so each reader gets ~160 KB/s
SLOW_READ_PAUSE = 0.1
# A TTL longer than one interleaved round: each system idles while the others
# run, and a shorter TTL would make every round start with a cold cache,
# which steady traffic does not see.
HOT_CACHE: dict[str, Any] = {"CACHE_MAX_BYTES": 64 * 1024 * 1024, "CACHE_TTL": 60}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class System:
    """A server under test: how to start it, and its processes once started."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    etags: dict[str, str] = field(default_factory=dict)
    # Not a server: bench/db_only.py run for the `large` scenario alone, with
    # `argv` + [file, seconds, connections] appended.
    db_only: bool = False

    def start(self, logs: Path) -> None:
        if self.db_only:
            return
        log = (logs / f"{self.name}.log").open("wb")
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

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the children if any (uvicorn --workers,
        nginx's workers), else the process itself."""
        assert self.proc is not None
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"resource_tracker" not in cmdline:
                children.append(int(entry.name))
        return children or [self.proc.pid]


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


def _site_file(path: Path, constants: dict[str, Any]) -> Path:
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    return path


def make_systems(tmp: Path, docroot: Path, sites: dict[str, dict[str, Any]]) -> list[System]:
    """serve-image per backend with 1 and 2 workers (and MariaDB with aiomysql, with
    the hot cache, and under granian with and without it), nginx from disk, the
    naive port per backend, and the two halves of serve-image alone: its HTTP side
    (files from memory) and its database reads per backend."""
    systems = []
    for backend, constants in sites.items():
        for workers in (1, 2):
            site = _site_file(tmp / f"site_{backend}.py", constants)
            port = free_port()
            systems.append(System(
                f"serve-image-{backend}-{workers}w",
                [str(VENV_BIN / "serve-image"), "serve", "--site", str(site), "--port", str(port),
                 "--workers", str(workers), "--log-level", "warning"], port))
    if "mysql" in sites:
        # variant -> (site constants, `serve` flags) over serve-image-mysql-1w's.
        granian = ["--server", "granian"]
        variants: dict[str, tuple[dict[str, Any], list[str]]] = {
            "aiomysql": ({"STORAGE_DRIVER": "aiomysql"}, []), "cache": (HOT_CACHE, []),
            "granian": ({}, granian), "cache-granian": (HOT_CACHE, granian),
        }
        for variant, (extra, flags) in variants.items():
            site = _site_file(tmp / f"site_mysql_{variant}.py", {**sites["mysql"], **extra})
            port = free_port()
            systems.append(System(
                f"serve-image-mysql-1w-{variant}",
                [str(VENV_BIN / "serve-image"), "serve", "--site", str(site), "--port",
                 str(port), "--log-level", "warning", *flags], port))
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        (HERE / "nginx.conf.template").read_text()
        .replace("@WORKERS@", "auto").replace("@TMP@", str(tmp))
        .replace("@PORT@", str(port)).replace("@ROOT@", str(docroot))
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    systems.append(System("nginx", [nginx, "-c", str(conf), "-p", str(tmp),
                                    "-e", str(tmp / "nginx-error.log")], port))
    for backend in sites:
        port = free_port()
        systems.append(System(
            f"naive-{backend}",
            [str(VENV_BIN / "python"), "-m", "uvicorn", "--factory",
             "bench.baselines.naive:from_environment", "--port", str(port),
             "--log-level", "warning"], port,
            env={"SERVE_IMAGE_SITE": str(tmp / f"site_{backend}.py")}))
    port = free_port()
    systems.append(System(
        "http-only",
        [str(VENV_BIN / "python"), "-m", "uvicorn", "--factory",
         "bench.baselines.http_only:from_environment", "--port", str(port),
         "--log-level", "warning", "--no-access-log", "--no-server-header"], port,
        env={"SERVE_IMAGE_BENCH_ROOT": str(docroot)}))
    for backend in sites:
        systems.append(System(
            f"db-only-{backend}",
            [str(VENV_BIN / "python"), "-m", "bench.db_only", str(tmp / f"site_{backend}.py")],
            0, db_only=True))
    return systems


def _get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def wait_ready(system: System, path: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert system.proc is not None
        if system.proc.poll() is not None:
            raise RuntimeError(f"{system.name} exited with {system.proc.returncode}: see its log")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", system.port, timeout=5)
            if _get(conn, path)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system.name} not ready on port {system.port} after {timeout}s")
        time.sleep(0.2)


def prime(system: System, files: BenchFiles) -> None:
    """GET every file once (warms every cache, checks every answer) and keep the ETags."""
    conn = http.client.HTTPConnection("127.0.0.1", system.port, timeout=30)
    for name in files.small:
        status, headers, body = _get(conn, "/" + name)
        if status != 200 or len(body) != 10 * 1024:
            raise RuntimeError(f"{system.name}: GET /{name} gave {status}, {len(body)} bytes")
        system.etags[name] = headers["etag"]
    first = files.small[0]
    status, _, _ = _get(conn, "/" + first, {"If-None-Match": system.etags[first]})
    if status != 304:
        raise RuntimeError(f"{system.name}: If-None-Match gave {status}, not 304")
    status, _, body = _get(conn, "/" + files.large[0])
    if status != 200 or len(body) != 5 * 1024 * 1024:
        raise RuntimeError(f"{system.name}: GET /{files.large[0]} gave {status}, {len(body)} bytes")


async def run_wrk(system: System, paths_file: Path, connections: int, seconds: int,
                  threads: int, inm: bool = False) -> report.WrkRun:
    argv = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections),
            "-d", f"{seconds}s", "--timeout", "10s", "-s", str(LUA),
            f"http://127.0.0.1:{system.port}", "--", str(paths_file)]
    if inm:
        argv.append("inm")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return report.parse_wrk(out.decode(errors="replace"))


async def run_db_only(system: System, name: str, connections: int, seconds: int
                      ) -> report.WrkRun:
    proc = await asyncio.create_subprocess_exec(
        *system.argv, name, str(seconds), str(connections), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    try:
        return report.parse_wrk(out.decode(errors="replace"))
    except report.WrkOutputError as e:
        # Counted as a failed round, as wrk counts errors, not the end of the run.
        print(f"bench: {system.name} failed: {e}", flush=True)
        return report.WrkRun(0, 0, float(seconds), 1, 0.0, 0.0)


async def _slow_reader(port: int, paths: list[str], index: int, stop: asyncio.Event) -> None:
    """Fetch 5 MiB files at about 160 KB/s until told to stop."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        sock = socket.socket()
        # A small receive buffer, so the server feels the slow reader at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=SLOW_READ_BYTES)
        path = paths[index % len(paths)]
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        try:
            while not stop.is_set():
                if not await reader.read(SLOW_READ_BYTES):
                    break
                await asyncio.sleep(SLOW_READ_PAUSE)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def measure(system: System, scenario: str, paths: dict[str, Path], files: BenchFiles,
                  seconds: int, threads: int, profile: Path | None = None
                  ) -> tuple[report.WrkRun, list[float]]:
    if system.db_only:
        return await run_db_only(system, files.large[0], LARGE_CONNECTIONS, seconds), []
    pids = system.worker_pids()
    reset_peak_rss(pids)
    spy = None
    if profile is not None:
        # Collapsed stacks of the first worker, sampled while wrk runs.
        spy = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "py-spy"), "record", "--format", "raw", "--nonblocking",
            "-o", str(profile), "-d", str(seconds + (1 if scenario == "slow_readers" else 0)),
            "-p", str(pids[0]), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
    if scenario == "small":
        run = await run_wrk(system, paths["small"], 32, seconds, threads)
    elif scenario == "not_modified":
        run = await run_wrk(system, paths["small"], 32, seconds, threads, inm=True)
    elif scenario == "large":
        run = await run_wrk(system, paths["large"], LARGE_CONNECTIONS, seconds, threads)
    else:
        stop = asyncio.Event()
        readers = [asyncio.create_task(_slow_reader(system.port, files.large, i, stop))
                   for i in range(SLOW_READERS)]
        await asyncio.sleep(1.0)  # every reader is mid-file before the clock starts
        try:
            run = await run_wrk(system, paths["small"], 32, seconds, threads)
        finally:
            stop.set()
            await asyncio.gather(*readers, return_exceptions=True)
    if spy is not None:
        await spy.wait()
    return run, peak_rss_mib(pids)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python "
            f"{platform.python_version()}; load average at start {load}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="si-bench-"))
    os.chmod(tmp, 0o755)  # nginx's workers run as an unprivileged user and read the files
    docroot = tmp / "root"
    dbs = Databases(tmp)
    systems: list[System] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_at_start = machine()
    try:
        print(f"bench: writing files under {docroot}", flush=True)
        files = await asyncio.to_thread(make_files, docroot)
        backends = [b for b in BACKENDS if any(b in s for s in args.systems)] if args.systems \
            else list(BACKENDS)
        sites = {b: await dbs.create(b) for b in backends}
        print(f"bench: filling {', '.join(backends)} databases ({dbs.name})", flush=True)
        await asyncio.gather(*(fill(c, docroot, files) for c in sites.values()))
        systems = make_systems(tmp, docroot, sites)
        if args.systems:
            systems = [s for s in systems if s.name in args.systems]
        for s in systems:
            s.start(tmp)
        servers = [s for s in systems if not s.db_only]
        for s in servers:
            wait_ready(s, "/" + files.small[0])
            prime(s, files)
        paths: dict[str, dict[str, Path]] = {}
        for s in servers:
            small = tmp / f"paths_{s.name}.txt"
            small.write_text("".join(f"/{n}\t{s.etags[n]}\n" for n in files.small))
            large = tmp / "paths_large.txt"
            large.write_text(f"/{files.large[0]}\t\n")
            paths[s.name] = {"small": small, "large": large}
        figures: dict[str, dict[str, report.Figures]] = {}
        for scenario in args.scenarios:
            for round_ in range(args.rounds):
                for s in systems if scenario == "large" else servers:
                    print(f"bench: {scenario} round {round_ + 1}/{args.rounds}: {s.name}",
                          flush=True)
                    profile = None
                    if s.name == args.profile and round_ == 0:
                        profile = args.out / f"profile-{s.name}-{scenario}.txt"
                        args.out.mkdir(parents=True, exist_ok=True)
                    result, rss = await measure(s, scenario, paths.get(s.name, {}), files,
                                                args.duration, args.threads, profile)
                    f = figures.setdefault(scenario, {}).setdefault(s.name, report.Figures())
                    f.runs.append(result)
                    f.rss_mib.extend(rss)
                    await asyncio.sleep(0.2)
        summaries = {sc: {name: f.summary() for name, f in by.items()}
                     for sc, by in figures.items()}
        rat = report.ratios(summaries)
        return {
            "started": started,
            "command": args.command,
            "machine": load_at_start + "; at end " +
                       ", ".join(f"{x:.2f}" for x in os.getloadavg()),
            "settings": {"duration_s": args.duration, "rounds": args.rounds,
                         "wrk_threads": args.threads, "slow_readers": SLOW_READERS,
                         "hot_cache": HOT_CACHE},
            "summaries": summaries,
            "ratios": rat,
            "targets": report.target_dicts(report.targets(summaries, rat)),
            "order": [s.name for s in systems],
        }
    finally:
        for s in systems:
            s.stop()
        await dbs.drop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 s per system and round")
    p.add_argument("--duration", type=int, default=3, help="seconds per system and round (3)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per scenario (2)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--systems", type=lambda v: v.split(","), default=None,
                   help="only these systems (comma-separated names)")
    p.add_argument("--scenarios", type=lambda v: v.split(","),
                   default=list(report.SCENARIOS), help=f"({','.join(report.SCENARIOS)})")
    p.add_argument("--profile", metavar="SYSTEM",
                   help="sample SYSTEM's first worker with py-spy in each scenario's first "
                        "round; collapsed stacks go to OUT/profile-SYSTEM-SCENARIO.txt")
    p.add_argument("--out", type=Path, default=HERE / "results", help="bench/results")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 1
    unknown = set(args.scenarios) - set(report.SCENARIOS)
    if unknown:
        p.error(f"unknown scenario {', '.join(sorted(unknown))}")
    given = shlex.join(argv if argv is not None else sys.argv[1:])
    args.command = f"scripts/bench {given}".strip()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report.markdown(result)
    (args.out / "latest.md").write_text(md)
    report.chart(result, str(args.out / "latest.png"), result["order"])
    print(md)
    print(f"bench: wrote {args.out}/latest.json, latest.md, latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
