"""Servers for the tests: uvicorn or granian in the test's event loop, `serve-image serve`
in a process of its own, and a raw-socket client that reads slowly."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
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
               on_body: Callable[[int, bool], Awaitable[None]] | None = None,
               client: tuple[str, int] | None = ("127.0.0.1", 1)) -> Answer:
    """Call the ASGI app with any bytes as the path; (status, headers, body, messages).

    The client (`client`: its address, None for none) never disconnects.
    `on_body(bytes so far, more to come)` is awaited as each part of the body
    is sent, before the app goes on: a test acts there while the response is
    in flight. A response cut off ends with `more_body` True.
    """
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

    received = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal received
        sent.append(message)
        received += len(message.get("body", b""))
        if on_body is not None and message["type"] == "http.response.body":
            await on_body(received, bool(message.get("more_body")))

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body, sent



# An in-process server binds a socket and starts: a few milliseconds even on
# a loaded machine. A server not started by then is stuck: fail at once.
STARTUP_SECONDS = 5.0
# `serve-image serve` in a process of its own imports Python, the app and the
# driver first: seconds on a loaded machine.
PROCESS_STARTUP_SECONDS = 60.0


class _Output(logging.Handler):
    """A server's log lines while it starts: the output a failed start is reported with."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


@asynccontextmanager
async def live_server(
    app: Any, server: str = "uvicorn", options: ServerOptions | None = None, **kw: Any,
) -> AsyncIterator[int]:
    """Serve `app` (already started) on a loopback port for the block; yields the port.

    The server gets the arguments serve_image/servers/ gives it for `options`,
    but its logging: the test's own (caplog) stays as it is. `kw` are
    uvicorn_server's own (`sndbuf`, `startup_seconds`, ...), for uvicorn only.
    """
    if server == "uvicorn":
        async with uvicorn_server(app, options, **kw) as port:
            yield port
        return
    options = dataclasses.replace(options or ServerOptions(), port=free_port(), log_level="warning")
    async with granian_server(app, options):
        await _until_listening(options.port)
        yield options.port


async def _until_listening(port: int, seconds: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on port {port} within {seconds:g} s") \
                    from None
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return


@asynccontextmanager
async def uvicorn_server(
    app: Any, options: ServerOptions | None = None, *, port: int | None = None,
    startup_seconds: float = STARTUP_SECONDS, sndbuf: int | None = None, **config: Any,
) -> AsyncIterator[int]:
    """uvicorn with the arguments `serve --server uvicorn` gives it, on a loopback port.

    A server that has not started within `startup_seconds` fails the test
    then, with uvicorn's output, instead of holding it to the suite's timeout.
    `sndbuf`: the send buffer of each connection, in bytes. Linux grows a
    loopback connection's to megabytes, so a server whose client stopped
    reading may have most of a file sent already; a small one keeps it from
    getting far ahead of the client. `config`: uvicorn.Config arguments over those.
    """
    from serve_image.servers import uvicorn as chosen

    options = dataclasses.replace(
        options or ServerOptions(), port=port or free_port(),
        log_level=config.pop("log_level", "warning"),
    )
    port = options.port
    sockets = None
    if sndbuf is not None:
        # Accepted connections inherit the listening socket's buffer size.
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        listener.bind(("127.0.0.1", port))
        sockets = [listener]
    arguments = {**chosen.config(options), "log_config": None, "lifespan": "off", **config}
    server = uvicorn.Server(uvicorn.Config(app, **arguments))
    output = _Output()
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(output)

    async def serve() -> None:
        try:
            await server.serve(sockets)
        except SystemExit as e:  # uvicorn's answer to a failed start; would stop the loop
            raise RuntimeError(f"uvicorn exited with status {e.code}") from None

    task = asyncio.create_task(serve())
    try:
        deadline = time.monotonic() + startup_seconds
        # uvicorn has a flag, not an event, for "started": polled.
        while True:
            if server.started or task.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
    finally:
        uvicorn_logger.removeHandler(output)
    if not server.started:
        why = f"did not start within {startup_seconds:g} s"
        if task.done():
            error = task.exception() if not task.cancelled() else None
            why = f"exited while starting ({error})"
        else:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
        shown = "\n".join(output.lines) or "(no output)"
        raise RuntimeError(f"uvicorn on port {port} {why}; its output:\n{shown}")
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        for listener in sockets or ():
            listener.close()


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



def start_serve(
    args: list[str], log: Path, *, env: dict[str, str] | None = None,
    prefix: list[str] | None = None, **popen: Any,
) -> subprocess.Popen[bytes]:
    """`serve-image ARGS` in a process of its own, its output in `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "serve_image", *args],
            stdout=out, stderr=subprocess.STDOUT,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}, **popen,
        )


def wait_serving(
    proc: subprocess.Popen[bytes], port: int, log: Path,
    seconds: float = PROCESS_STARTUP_SECONDS,
) -> int:
    """Poll /-/health until the server answers; its status (200, or 503 with no database).

    Fails at once, with the server's output, when the process exits; after
    `seconds` when it never answers.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=2).status_code
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            why = f"exited with {proc.returncode} while starting"
            break
        if time.monotonic() > deadline:
            why = f"did not answer within {seconds:g} s"
            break
        time.sleep(0.05)
    raise RuntimeError(
        f"serve-image on port {port} {why}; its output:\n{log.read_text(errors='replace')}"
    )


def stop(proc: subprocess.Popen[bytes], seconds: float = 20) -> int:
    """Terminate a server (SIGTERM, then SIGKILL after `seconds`); its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode



@contextmanager
def serve_process(
    site: Path, server: str, log: Path, *, command: str = "serve", extra: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[int]:
    """`serve-image serve` (or `demo`) under `server`, its output in `log`, until its
    health check answers; yields the port, and stops it however the block ends."""
    port = free_port()
    proc = start_serve([command, "--site", str(site), "--port", str(port), "--server", server,
                        *extra], log, preexec_fn=preexec_fn)
    try:
        status = wait_serving(proc, port, log)
        if status != 200:
            raise RuntimeError(f"{server}: /-/health answered {status}: {log.read_text()[-3000:]}")
        yield port
    finally:
        stop(proc)


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
