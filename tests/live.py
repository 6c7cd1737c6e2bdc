"""Servers for the tests: a real uvicorn in the test's event loop, `serve-image serve` in a
process of its own, and a raw-socket client that reads slowly."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from tests.helpers import free_port

Answer = tuple[int, dict[bytes, bytes], bytes, list[dict[str, Any]]]


async def call(app: Any, raw_path: bytes, method: str = "GET",
               headers: list[tuple[bytes, bytes]] | None = None,
               on_body: Callable[[int, bool], Awaitable[None]] | None = None) -> Answer:
    """Call the ASGI app with any bytes as the path; (status, headers, body, messages).

    The client never disconnects. `on_body(bytes so far, more to come)` is
    awaited as each part of the body is sent, before the app goes on: a test
    acts there while the response is in flight. A response cut off ends with
    `more_body` True.
    """
    path = urllib.parse.unquote(raw_path.split(b"?")[0].decode("latin-1"))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": raw_path, "root_path": "",
        "query_string": raw_path.partition(b"?")[2], "headers": headers or [],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
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


# An in-process uvicorn binds a socket and starts: a few milliseconds even on
# a loaded machine. A server not started by then is stuck: fail at once.
STARTUP_SECONDS = 5.0
# `serve-image serve` in a process of its own imports Python, the app and the
# driver first: seconds on a loaded machine.
PROCESS_STARTUP_SECONDS = 60.0


class _Output(logging.Handler):
    """uvicorn's log lines while it starts: the output a failed start is reported with."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


@asynccontextmanager
async def uvicorn_server(
    app: Any, *, port: int | None = None, startup_seconds: float = STARTUP_SECONDS,
    sndbuf: int | None = None, **config: Any,
) -> AsyncIterator[int]:
    """Serve `app` (already started) on a loopback port for the block; yields the port.

    A server that has not started within `startup_seconds` fails the test
    then, with uvicorn's output, instead of holding it to the suite's timeout.
    `sndbuf`: the send buffer of each connection, in bytes. Linux grows a
    loopback connection's to megabytes, so a server whose client stopped
    reading may have most of a file sent already; a small one keeps it from
    getting far ahead of the client.
    """
    port = port or free_port()
    sockets = None
    if sndbuf is not None:
        # Accepted connections inherit the listening socket's buffer size.
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        listener.bind(("127.0.0.1", port))
        sockets = [listener]
    config.setdefault("lifespan", "off")
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, http="httptools", **config,
    ))
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
