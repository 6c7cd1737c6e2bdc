"""Serving clients directly: late headers, a flood of half-open connections under a low
open-file limit, the connection bound, malformed requests, under every server.

What granian cannot do (docs/internet-facing.md) is asserted as what it does
instead, so that a granian that learns it fails here and the doc is updated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_image.app import ServeImage
from serve_image.servers import ServerImportError, ServerOptions, load
from serve_image.servers.uvicorn import INVALID_REQUEST, InvalidRequestLog
from serve_image.settings import load_site
from serve_image.storage import make_layout
from tests.conftest import server_missing
from tests.helpers import IMG, free_port, payload, store
from tests.live import SERVER_NAMES, live_server, serve_process

pytestmark = pytest.mark.slow

DATA = payload(3000, seed=5)
A = f"/{IMG}/a.jpg"
PARTIAL = f"GET {A} HTTP/1.1\r\nHost: t\r\n".encode()  # a request line and one header
FLOOD = 2000


async def make_site(tmp_path: Path, extra: str = "") -> Path:
    site = tmp_path / "facing.py"
    site.write_text(f'STORAGE_DB = "facing.sqlite"\nMETRICS_PATH = "/-/metrics"\n{extra}')
    b = make_layout(load_site(str(site)))
    await b.connect()
    await b.create_tables()
    await store(b, A[1:], DATA)
    await b.close()
    return site


@pytest.fixture
async def site(tmp_path: Path) -> Path:
    return await make_site(tmp_path)


def metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/-/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def open_half(port: int, count: int, data: bytes = PARTIAL
                    ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]:
    """`count` connections that each send `data` and never end their headers."""
    out = []
    for start in range(0, count, 100):
        pairs = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                       for _ in range(min(100, count - start))))
        for reader, writer in pairs:
            if data:
                writer.write(data)
            out.append((reader, writer, time.monotonic()))
    return out


async def closed_by_server(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """What the server sent before it closed the connection, and when it did."""
    try:
        data = await reader.read()
    except ConnectionResetError:
        data = b""
    return data, time.monotonic()


async def raw_get(port: int, target: str = A) -> bytes:
    """One request on a connection of its own; everything until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return data


# -- the header-read timeout ------------------------------------------------------
@pytest.fixture
async def started(site: Path) -> AsyncIterator[ServeImage]:
    app = ServeImage(load_site(str(site)))
    await app.startup()
    try:
        yield app
    finally:
        await app.shutdown()


IDLE_CASES = [
    # Nothing at all. (granian serves HTTP/1 only for this: in its "auto"
    # mode, which waits for a first byte to tell HTTP/1 from HTTP/2, such a
    # connection is never timed out.)
    *(pytest.param(s, b"", id=f"{s}-nothing") for s in SERVER_NAMES),
    *(pytest.param(s, PARTIAL, id=f"{s}-partial") for s in SERVER_NAMES),
    # A keep-alive connection whose second request never ends its headers.
    *(pytest.param(s, f"GET {A} HTTP/1.1\r\nHost: t\r\n\r\nGET {A} HTTP/1.1\r\n".encode(),
                   id=f"{s}-second-request") for s in SERVER_NAMES),
]


@pytest.mark.parametrize(("server", "data"), IDLE_CASES)
async def test_headers_not_complete_in_time_close_the_connection(
    started: ServeImage, server: str, data: bytes
) -> None:
    timeout = 0.5
    async with live_server(started, server, ServerOptions(header_timeout=timeout)) as port:
        [(reader, writer, opened)] = await open_half(port, 1, data)
        sent, closed = await asyncio.wait_for(closed_by_server(reader), 5)
        writer.close()
    # The server's clock starts when it sees the connection: never before ours.
    assert closed - opened >= timeout * 0.9
    if data.count(b"\r\n\r\n"):  # the first request was answered whole
        assert sent.startswith(b"HTTP/1.1 200 ") and sent.endswith(DATA)
    else:
        assert sent == b""


@pytest.mark.parametrize("server", SERVER_NAMES)
async def test_a_slow_download_is_not_cut_by_the_header_timeout(
    started: ServeImage, server: str
) -> None:
    """The timer stops when the headers are complete; the response takes what it takes."""
    async with live_server(started, server, ServerOptions(header_timeout=0.3)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {A} HTTP/1.1\r\nHost: t\r\n".encode())
        await asyncio.sleep(0.1)
        writer.write(b"\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.6)  # twice the timeout on a kept-alive connection
        body = await reader.readexactly(len(DATA))
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == DATA


# -- 2,000 half-open connections under a soft limit of 1,024 -----------------------
def _low_soft_limit(hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


@pytest.mark.parametrize("server", SERVER_NAMES)
async def test_half_open_flood_under_a_low_soft_limit(
    tmp_path: Path, server: str
) -> None:
    """serve-image raises its soft open-file limit to the hard one: 2,000 half-open
    connections leave room for a normal request, and HEADER_TIMEOUT closes them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if hard < wanted:
        pytest.fail(f"the hard open-file limit is {hard}: the test needs {wanted}")
    # This process holds the 2,000 client ends.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    timeout = 3
    site = await make_site(tmp_path, f"HEADER_TIMEOUT = {timeout}\n")
    with serve_process(site, server, tmp_path / "log",
                       preexec_fn=lambda: _low_soft_limit(wanted)) as port:
        # The bound derives from the raised limit: 3/4 of 4,096 per worker.
        assert metrics(port)["serve_image_connections_limit"] == wanted * 3 // 4
        flood = await open_half(port, FLOOD)
        during = time.monotonic()
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{port}{A}", timeout=20)
        served = time.monotonic()
        assert (r.status_code, r.content) == (200, DATA)
        ends = await asyncio.wait_for(
            asyncio.gather(*(closed_by_server(reader) for reader, _, _ in flood)), 60)
        for _, writer, _ in flood:
            writer.close()
    assert [sent for sent, _ in ends] == [b""] * FLOOD
    # Every one closed by the server after its timeout, the request served before.
    assert min(closed - opened for (_, closed), (_, _, opened) in zip(ends, flood, strict=True)
               ) >= timeout * 0.9
    assert during < served < min(closed for _, closed in ends)


# -- MAX_CONNECTIONS -----------------------------------------------------------
async def test_over_the_connection_bound_a_fast_503_uvicorn(tmp_path: Path) -> None:
    site = await make_site(tmp_path, "MAX_CONNECTIONS = 4\nHEADER_TIMEOUT = 30\n")
    with serve_process(site, "uvicorn", tmp_path / "log") as port:
        idle = await open_half(port, 4)
        over = await raw_get(port)
        head, _, body = over.partition(b"\r\n\r\n")
        status, *fields = head.split(b"\r\n")
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert {b"retry-after: 5", b"connection: close"} <= set(fields)
        assert body == b"503 Service Unavailable\n"
        # The health check too: a load balancer sends clients elsewhere (docs/internet-facing.md).
        health = await raw_get(port, "/-/health")
        assert health.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert health.endswith(b"\r\n\r\n503 Service Unavailable\n")
        # Under the bound again once two idle clients leave.
        for _, writer, _ in idle[:2]:
            writer.close()
        deadline = time.monotonic() + 10
        while not (answer := await raw_get(port)).startswith(b"HTTP/1.1 200 "):
            assert time.monotonic() < deadline, answer[:200]
            await asyncio.sleep(0.05)
        health = await raw_get(port, "/-/health")
        assert health.startswith(b"HTTP/1.1 200 OK\r\n") and health.endswith(b"\r\n\r\nok\n")
        # Two idle connections and the scrape's own.
        while (m := metrics(port))["serve_image_connections_open"] != 3:
            assert time.monotonic() < deadline, m
            await asyncio.sleep(0.05)
        assert m["serve_image_connections_limit"] == 4
        assert m["serve_image_requests_total"] >= 1
        for _, writer, _ in idle[2:]:
            writer.close()


async def test_over_the_connection_bound_granian_holds_the_client(tmp_path: Path) -> None:
    """granian stops accepting at the bound (its backpressure): the client over it is
    neither reset nor answered 503, it waits in the listen backlog for a free slot."""
    site = await make_site(tmp_path, "MAX_CONNECTIONS = 4\nHEADER_TIMEOUT = 30\n")
    with serve_process(site, "granian", tmp_path / "log") as port:
        m = metrics(port)
        assert m["serve_image_connections_limit"] == 4
        assert "serve_image_connections_open" not in m  # granian does not report them
        idle = await open_half(port, 4)
        over = asyncio.create_task(raw_get(port))
        done, _ = await asyncio.wait([over], timeout=1)
        assert not done  # held, not refused
        for _, writer, _ in idle:
            writer.close()
        answer = await asyncio.wait_for(over, 20)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(DATA)


# -- malformed requests ----------------------------------------------------------
@pytest.mark.parametrize("server", SERVER_NAMES)
async def test_malformed_requests_are_counted_not_logged_one_by_one(
    site: Path, tmp_path: Path, server: str
) -> None:
    log = tmp_path / "log"
    n = 300
    with serve_process(site, server, log) as port:
        answers = []
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /\x01\x02 nonsense\r\n\r\n")
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        m = metrics(port)
    assert all(a.startswith(b"HTTP/1.1 400 ") for a in answers)
    lines = [line for line in log.read_text().splitlines() if INVALID_REQUEST in line]
    if server == "uvicorn":
        assert len(lines) == 1  # the first; the next ones within a minute are only counted
        assert m["serve_image_bad_requests_total"] == n
    else:  # granian answers them itself, and neither logs nor reports them
        assert lines == []
        assert "serve_image_bad_requests_total" not in m


async def test_invalid_request_log_holds_lines_and_gives_their_count() -> None:
    logger = logging.getLogger("test.invalid_requests")
    logger.propagate = False
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger.addHandler(Keep())
    logger.addFilter(held := InvalidRequestLog(interval=0.2))
    try:
        for _ in range(5):
            logger.warning("Invalid HTTP request received.")
        logger.warning("something else")
        assert records == ["Invalid HTTP request received.", "something else"]
        deadline = time.monotonic() + 5
        while len(records) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert records[2] == f"{INVALID_REQUEST}: 4 more in the last 0.2 s, each answered 400"
        logger.warning("Invalid HTTP request received.")  # within the next interval: held
        while len(records) < 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert records[3] == f"{INVALID_REQUEST}: 1 more in the last 0.2 s, each answered 400"
        while held.timer is not None:  # a quiet interval: the next one is logged at once
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        logger.warning("Invalid HTTP request received.")
        assert records[4:] == ["Invalid HTTP request received."]
    finally:
        if held.timer is not None:
            held.timer.cancel()
        logger.removeFilter(held)
        logger.handlers.clear()


def test_a_server_whose_package_is_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_image import servers

    monkeypatch.setitem(servers.SERVERS, "nosuchserver", "nosuchserver.asgi")
    with pytest.raises(ServerImportError) as e:
        load("nosuchserver")
    assert str(e.value) == ("--server nosuchserver needs the nosuchserver package: "
                            "pip install 'serve-image[nosuchserver]'")


# -- the front servers' settings in docs/internet-facing.md ---------------------
DOC = Path(__file__).resolve().parent.parent / "docs" / "internet-facing.md"


def doc_block(after: str) -> str:
    """The indented block that follows the paragraph starting with `after`."""
    text = DOC.read_text()
    m = re.search(rf"^{re.escape(after)}.*?\n\n((?:    [^\n]*\n)+)", text, re.M | re.S)
    assert m is not None, after
    return "\n".join(line[4:] for line in m.group(1).splitlines())


def test_apache_settings_in_the_doc_pass_apaches_config_test(tmp_path: Path) -> None:
    apache = shutil.which("apache2") or "/usr/sbin/apache2"
    if not os.access(apache, os.X_OK):
        server_missing("apache2", FileNotFoundError(apache))
    conf = tmp_path / "httpd.conf"
    conf.write_text(
        f"ServerRoot {tmp_path}\nServerName 127.0.0.1\n"
        "LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so\n"
        "LoadModule reqtimeout_module /usr/lib/apache2/modules/mod_reqtimeout.so\n"
        f"Listen 127.0.0.1:{free_port()}\nPidFile {tmp_path}/httpd.pid\n"
        f"ErrorLog {tmp_path}/error.log\n{doc_block('Apache, with mod_reqtimeout')}\n"
    )
    done = subprocess.run([apache, "-t", "-f", str(conf)], capture_output=True, text=True,
                          timeout=30)
    assert (done.returncode, done.stderr.strip()) == (0, "Syntax OK")


def test_nginx_settings_in_the_doc_pass_nginxs_config_test(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        server_missing("nginx", FileNotFoundError(nginx))
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n{doc_block('nginx, in the')}\n"
        f"    server {{ listen 127.0.0.1:{free_port()}; access_log off; }}\n}}\n"
    )
    done = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
