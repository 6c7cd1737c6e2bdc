"""A real `serve-image serve` process, under each server, fetched over HTTP by httpx and curl."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve_image.conditional import http_date
from serve_image.settings import load_site
from serve_image.storage import make_layout
from tests.helpers import IMG, free_port, payload, store
from tests.live import SERVER_NAMES, start_serve, stop, wait_serving

MTIME = 1_700_000_000
BIG = payload(3 * 1024 * 1024 + 5, seed=9)
SMALL = payload(5000, seed=1)


class Server:
    def __init__(self, site: Path, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.site, self.port, self.proc, self.log = site, port, proc, log
        self.base = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def site_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("server")
    site = tmp / "srv.py"
    site.write_text('STORAGE_DB = "srv.sqlite"\nSTORAGE_CHUNK_SIZE = 65535\nVAR_DIR = "var/site"\n')

    async def fill() -> None:
        settings = load_site(str(site))
        b = make_layout(settings)
        await b.connect()
        await b.create_tables()
        await store(b, f"{IMG}/big.bin", BIG, mtime=MTIME, datatype="application/octet-stream")
        await store(b, f"{IMG}/small.jpg", SMALL, mtime=MTIME)
        await b.close()

    asyncio.run(fill())
    return site


@pytest.fixture(scope="module", params=SERVER_NAMES)
def server(site_file: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    port = free_port()
    log = site_file.parent / f"server-{request.param}.log"
    proc = start_serve(["serve", "--site", str(site_file), "--port", str(port),
                        "--server", request.param], log)
    try:
        assert wait_serving(proc, port, log) == 200
        yield Server(site_file, port, proc, log)
    finally:
        stop(proc)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=30)


def test_get_over_http(server: Server) -> None:
    r = httpx.get(f"{server.base}/{IMG}/big.bin", timeout=10)
    assert r.status_code == 200
    assert r.content == BIG
    r = httpx.get(f"{server.base}/{IMG}/small.jpg", timeout=10)
    assert (r.status_code, r.headers["content-type"], r.content) == (200, "image/jpeg", SMALL)


def test_curl_range(server: Server) -> None:
    out = curl("-r", "65534-131072", f"{server.base}/{IMG}/big.bin")
    assert out.returncode == 0
    assert out.stdout == BIG[65534:131073]


def test_curl_resumes_interrupted_download(server: Server, tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    target.write_bytes(BIG[:1_000_003])  # what an interrupted download left
    out = curl("-C", "-", "-o", str(target), f"{server.base}/{IMG}/big.bin")
    assert out.returncode == 0, out.stderr
    assert target.read_bytes() == BIG


def test_curl_if_modified_since_304(server: Server) -> None:
    out = curl(
        "-z",
        http_date(MTIME + 10),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"{server.base}/{IMG}/small.jpg",
    )
    assert out.stdout == b"304"
    out = curl("-z", http_date(MTIME - 10), "-w", "%{http_code}", f"{server.base}/{IMG}/small.jpg")
    assert out.stdout == SMALL + b"200"


def test_server_answers_404_and_405(server: Server) -> None:
    assert httpx.get(f"{server.base}/var/other/storage/images/a.jpg").status_code == 404
    r = httpx.post(f"{server.base}/{IMG}/small.jpg")
    assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")


def test_replaced_mid_stream_breaks_the_transfer(server: Server) -> None:
    """A real client sees a broken transfer, not a complete 200 with mixed bytes."""
    name = f"{IMG}/swap.bin"
    old, new = payload(8 * 1024 * 1024, 1), payload(8 * 1024 * 1024, 2)

    async def put(data: bytes, mtime: int) -> None:
        b = make_layout(load_site(str(server.site)))
        await b.connect()
        await store(b, name, data, mtime=mtime)
        await b.close()

    asyncio.run(put(old, MTIME))
    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("GET", f"{server.base}/{name}", timeout=10) as r,
    ):
        assert r.status_code == 200
        for part in r.iter_bytes():
            if not received:
                asyncio.run(put(new, MTIME + 1))
            received += part
    assert 0 < len(received) < len(old)
    assert received == old[: len(received)]
    assert "aborted var/site/storage/images/swap.bin" in server.log.read_text()
