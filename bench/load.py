"""The clients: wrk running bench/random_paths.lua, slow readers, and single checked GETs."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bench import report
from bench.systems import ROOT, System

LUA = ROOT / "bench" / "random_paths.lua"
SLOW_READ_BYTES = 16 * 1024  # per read; then a pause, so each reader gets ~160 KB/s
SLOW_READ_PAUSE = 0.1


def get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None
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
            raise RuntimeError(f"{system.name} exited with {system.proc.returncode}; its log "
                               f"ends:\n{system.log_tail()}")
        conn = http.client.HTTPConnection("127.0.0.1", system.port, timeout=5)
        try:
            if get(conn, path)[0] == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system.name} not ready on port {system.port} after {timeout}s")
        time.sleep(0.2)


async def run_wrk(system: System, paths_file: Path, connections: int, seconds: int,
                  threads: int, inm: bool = False, walk: bool = False) -> report.WrkRun:
    argv = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections),
            "-d", f"{seconds}s", "--timeout", "10s", "-s", str(LUA),
            f"http://127.0.0.1:{system.port}", "--", str(paths_file)]
    argv += ["inm"] if inm else []
    argv += ["seq"] if walk else []
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
    """Fetch files at about 160 KB/s until told to stop."""
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


@contextlib.asynccontextmanager
async def slow_readers(port: int, paths: list[str], count: int) -> AsyncIterator[None]:
    """`count` slow readers of `paths` for as long as the block runs, each mid-file at its start."""
    stop = asyncio.Event()
    readers = [asyncio.create_task(_slow_reader(port, paths, i, stop)) for i in range(count)]
    await asyncio.sleep(1.0)
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*readers, return_exceptions=True)
