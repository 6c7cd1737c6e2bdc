"""The test servers themselves: a server that does not start fails the test at once."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port
from tests.live import start_serve, uvicorn_server, wait_serving


async def never_starts(scope: Any, receive: Any, send: Any) -> None:
    """An app whose start-up never completes (a lifespan that hangs)."""
    await receive()  # lifespan.startup
    await asyncio.Event().wait()


async def test_an_in_process_server_stuck_starting_fails_with_its_output() -> None:
    with pytest.raises(RuntimeError) as e:
        async with asyncio.timeout(30):  # a hang fails here, not at the suite's timeout
            async with uvicorn_server(never_starts, lifespan="on", log_level="info",
                                      startup_seconds=0.5):
                pytest.fail("the server started")
    port = str(e.value).split()[3]
    assert str(e.value) == (
        f"uvicorn on port {port} did not start within 0.5 s; its output:\n"
        f"INFO: Started server process [{os.getpid()}]\n"
        "INFO: Waiting for application startup."
    )


async def test_an_in_process_server_that_cannot_bind_fails_with_its_output() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as e:
            async with asyncio.timeout(30), uvicorn_server(never_starts, port=port):
                pytest.fail("the server started")
    assert str(e.value).startswith(
        f"uvicorn on port {port} exited while starting (uvicorn exited with status 3); "
        "its output:\nERROR: [Errno 98] "
    )


def test_a_server_process_that_exits_fails_at_once_with_its_output(tmp_path: Path) -> None:
    site = tmp_path / "broken.py"
    site.write_text('STORAGE_DB = "x"\nSTORAGE_CHUNK_SIZE = 0\n')
    log = tmp_path / "server.log"
    port = free_port()
    proc = start_serve(["serve", "--site", str(site), "--port", str(port)], log)
    with pytest.raises(RuntimeError) as e:
        wait_serving(proc, port, log, seconds=600)  # the exit is noticed, not the deadline
    assert str(e.value) == (
        f"serve-image on port {port} exited with 2 while starting; its output:\n"
        f"serve-image: error: {site}: STORAGE_CHUNK_SIZE must be a whole number "
        "from 1 to 16777216, not 0\n"
    )


def test_a_server_process_that_never_answers_fails_after_the_deadline(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError) as e:
            wait_serving(proc, free_port(), log, seconds=0.5)
        assert "did not answer within 0.5 s; its output:\n" in str(e.value)
    finally:
        proc.kill()
        proc.wait()
