"""A real server (uvicorn or granian) in the test's event loop, and a raw-socket client
that reads slowly."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from serve_image.servers import SERVERS, ServerOptions
from tests.helpers import free_port

# Every server of serve_image/servers/, for tests where the server matters.
SERVER_NAMES = list(SERVERS)

Answer = tuple[int, dict[bytes, bytes], bytes, list[dict[str, Any]]]


async def call(app: Any, raw_path: bytes, method: str = "GET",
               headers: list[tuple[bytes, bytes]] | None = None,
               client: tuple[str, int] | None = ("127.0.0.1", 1)) -> Answer:
    """Call the ASGI app with any bytes as the path; (status, headers, body, messages)."""
    path = urllib.parse.unquote(raw_path.split(b"?")[0].decode("latin-1"))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": raw_path, "root_path": "",
        "query_string": raw_path.partition(b"?")[2], "headers": headers or [],
        "client": client, "server": ("127.0.0.1", 80),
    }
    sent: list[dict[str, Any]] = []
    never = asyncio.Event()
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body, sent


@asynccontextmanager
async def live_server(
    app: Any, server: str = "uvicorn", options: ServerOptions | None = None
) -> AsyncIterator[int]:
    """Serve `app` (already started) on a loopback port for the block; yields the port.

    The server gets the arguments serve_image/servers/ gives it for `options`,
    but its logging: the test's own (caplog) stays as it is.
    """
    options = dataclasses.replace(options or ServerOptions(), port=free_port(), log_level="warning")
    runner = uvicorn_server if server == "uvicorn" else granian_server
    async with runner(app, options):
        await _until_listening(options.port)
        yield options.port


async def _until_listening(port: int) -> None:
    for _ in range(500):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listening on port {port}")


@asynccontextmanager
async def uvicorn_server(app: Any, options: ServerOptions) -> AsyncIterator[None]:
    from serve_image.servers import uvicorn as chosen

    config = {**chosen.config(options), "log_config": None}
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", **config))
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        await task  # raises what made it fail
        raise RuntimeError("uvicorn did not start")
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@asynccontextmanager
async def granian_server(app: Any, options: ServerOptions) -> AsyncIterator[None]:
    """granian's embedded server: the same Rust worker as `serve --server granian`,
    in this event loop."""
    from granian.constants import Interfaces
    from granian.server.embed import Server

    from serve_image.servers import granian as chosen

    arguments = {**chosen.server_arguments(options), "log_dictconfig": None}
    server = Server(app, interface=Interfaces.ASGINL, **arguments)
    task = asyncio.create_task(server.serve())
    try:
        yield
    finally:
        server.stop()
        await asyncio.wait_for(task, 30)


@contextmanager
def serve_process(
    site: Path, server: str, log: Path, *, command: str = "serve", extra: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[int]:
    """`serve-image serve` (or `demo`) under `server`, its output in `log`, until its
    health check answers; yields the port, and stops it however the block ends."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve_image", command, "--site", str(site),
             "--port", str(port), "--server", server, *extra],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=preexec_fn,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server} did not start: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RawClient:
    """One HTTP/1.1 request over a socket with a small receive buffer: a slow reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()

    @classmethod
    async def get(cls, port: int, target: str, rcvbuf: int = 16384,
                  extra: bytes = b"") -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect, so the window the server sees stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"\r\n")
        await writer.drain()
        client = cls(reader, writer)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        client.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                client.headers[k.strip().lower()] = v.strip()
        return client

    @property
    def length(self) -> int:
        return int(self.headers["content-length"])

    async def read(self, n: int) -> bool:
        """Read up to n more body bytes; False at end of stream."""
        want = min(n, self.length - len(self.body))
        while want > 0:
            data = await self.reader.read(want)
            if not data:
                return False
            self.body += data
            want -= len(data)
        return len(self.body) < self.length

    async def read_all(self, pause: float = 0.0, step: int = 65536) -> None:
        while await self.read(step):
            if pause:
                await asyncio.sleep(pause)

    def close(self) -> None:
        self.writer.close()


class Recorder:
    """A plain HTTP/1.1 server on a loopback port that records each request and
    answers `status` with an empty body (keep-alive, as a cache would)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, target, headers
        self.port = 0
        self.connections: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def targets(self, method: str = "PURGE") -> list[str]:
        return [t for m, t, _ in self.requests if m == method]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                self.requests.append((method, target, headers))
                writer.write(f"HTTP/1.1 {self.status} Status\r\nContent-Length: 0\r\n\r\n"
                             .encode())
                await writer.drain()
        finally:
            self.connections.discard(writer)
            writer.close()


@asynccontextmanager
async def recorder(status: int = 200) -> AsyncIterator[Recorder]:
    rec = Recorder(status)
    server = await asyncio.start_server(rec._serve, "127.0.0.1", 0)
    rec.port = server.sockets[0].getsockname()[1]
    try:
        yield rec
    finally:
        server.close()
        for writer in list(rec.connections):
            writer.close()
        await server.wait_closed()
