"""The image endpoint over real SQLite, MariaDB and PostgreSQL (issue 2)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from serve_image.app import ServeImage
from serve_image.settings import Settings, settings_from_mapping
from serve_image.storage import Layout, make_layout
from tests.helpers import IMG, SpyLayout, md5, payload, running, store
from tests.live import RawClient, uvicorn_server

MTIME = 1_700_000_000


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 3000, 5 * 1024 * 1024 + 7])
async def test_exact_bytes_for_every_size(
    writer: Layout, client: httpx.AsyncClient, size: int
) -> None:
    # The site's chunk size is 1000: 0 bytes, 1 byte, a chunk, a chunk + 1, many chunks.
    data = payload(size, seed=size)
    chunk = 65535 if size > 100_000 else 1000
    await store(writer, f"{IMG}/f{size}.bin", data, chunk=chunk)
    r = await client.get(f"/{IMG}/f{size}.bin")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(size)
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_exact_headers(writer: Layout, client: httpx.AsyncClient) -> None:
    await store(writer, f"{IMG}/a/b.png", b"x" * 10, datatype="image/png", mtime=MTIME)
    r = await client.get(f"/{IMG}/a/b.png")
    assert r.status_code == 200
    h = r.headers
    assert h["content-type"] == "image/png"
    assert h["content-length"] == "10"
    assert h["last-modified"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert h["etag"] == f'"6553f100-a-{md5(f"{IMG}/a/b.png")[:8]}"'
    assert h["cache-control"] == "public, max-age=6000"
    assert h["x-content-type-options"] == "nosniff"
    assert h["accept-ranges"] == "bytes"
    expires = time.mktime(time.strptime(h["expires"], "%a, %d %b %Y %H:%M:%S GMT"))
    now = time.mktime(time.gmtime())
    assert abs(expires - (now + 6000)) <= 2
    assert "content-security-policy" not in h


async def test_versioned_path_is_immutable(writer: Layout, client: httpx.AsyncClient) -> None:
    name = "var/site/storage/images-versioned/a/1/b.png"
    await store(writer, name, b"x")
    r = await client.get(f"/{name}")
    assert r.headers["cache-control"] == "public, max-age=6000, immutable"


async def test_var_storage_without_dir(writer: Layout, client: httpx.AsyncClient) -> None:
    await store(writer, "var/storage/images/x.gif", b"GIF89a")
    r = await client.get("/var/storage/images/x.gif")
    assert (r.status_code, r.content) == (200, b"GIF89a")


async def test_percent_decoded_name_and_query_dropped(
    writer: Layout, client: httpx.AsyncClient
) -> None:
    name = f"{IMG}/caf\u00e9 au lait/it's 100%_done.jpg"
    await store(writer, name, b"bytes")
    r = await client.get(httpx.URL(f"http://t/{quote(name)}?x=1&y=%zz"))
    assert (r.status_code, r.content) == (200, b"bytes")


@pytest.mark.parametrize(
    ("datatype", "expected"),
    [
        ("misc", "application/octet-stream"),
        ("", "application/octet-stream"),
        ("image/jpeg\r\nX-Evil: 1", "application/octet-stream"),
        ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
        # Regression: a non-Latin-1 quoted value made a 500.
        ('image/png; name="\u20ac.png"', "application/octet-stream"),
    ],
)
async def test_malformed_datatype(
    writer: Layout, client: httpx.AsyncClient, datatype: str, expected: str
) -> None:
    await store(writer, f"{IMG}/t", b"x", datatype=datatype)
    r = await client.get(f"/{IMG}/t")
    assert r.headers["content-type"] == expected
    assert "x-evil" not in r.headers


async def test_svg_gets_sandbox_csp(writer: Layout, client: httpx.AsyncClient) -> None:
    await store(writer, f"{IMG}/a.svg", b"<svg/>", datatype="image/svg+xml")
    r = await client.get(f"/{IMG}/a.svg")
    assert r.headers["content-security-policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    )


async def test_missing_is_404(client: httpx.AsyncClient, spy: SpyLayout) -> None:
    r = await client.get(f"/{IMG}/nope.jpg")
    assert (r.status_code, r.text) == (404, "404 Not Found\n")
    assert spy.calls == ["first"]


async def test_soft_deleted_is_404(writer: Layout, client: httpx.AsyncClient) -> None:
    await store(writer, f"{IMG}/gone.jpg", b"x", mtime=-MTIME)
    assert (await client.get(f"/{IMG}/gone.jpg")).status_code == 404
    assert (await client.head(f"/{IMG}/gone.jpg")).status_code == 404


async def test_expired_is_404(writer: Layout, client: httpx.AsyncClient) -> None:
    await store(writer, f"{IMG}/exp.jpg", b"x")
    await writer.driver.execute(
        "UPDATE ezdbfile SET expired = ? WHERE name_hash = ?", True, md5(f"{IMG}/exp.jpg")
    )
    assert (await client.get(f"/{IMG}/exp.jpg")).status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/index.php",
        "/var/site/storage/original/a.pdf",
        "/var/site/cache/x.jpg",
        "/var/site/storage/images/../original/a.pdf",
        "/var/a/b/storage/images/x.jpg",
    ],
)
async def test_other_paths_404_without_database(
    writer: Layout, client: httpx.AsyncClient, spy: SpyLayout, path: str
) -> None:
    await store(writer, "var/site/storage/original/a.pdf", b"%PDF")
    r = await client.get(path)
    assert r.status_code == 404
    assert spy.calls == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_405(client: httpx.AsyncClient, spy: SpyLayout, method: str) -> None:
    r = await client.request(method, f"/{IMG}/a.jpg")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert spy.calls == []


async def test_head_reads_no_chunk(
    writer: Layout, client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    await store(writer, f"{IMG}/h.jpg", payload(5000))
    r = await client.head(f"/{IMG}/h.jpg")
    assert r.status_code == 200
    assert r.headers["content-length"] == "5000"
    assert r.content == b""
    assert spy.calls == ["meta"]
    assert spy.chunk_reads == 0


async def test_small_file_is_one_query(
    writer: Layout, client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    await store(writer, f"{IMG}/s.jpg", payload(900))
    assert (await client.get(f"/{IMG}/s.jpg")).status_code == 200
    assert spy.calls == ["first"]


async def test_chunks_of_unequal_lengths(writer: Layout, client: httpx.AsyncClient) -> None:
    data = payload(3000, seed=3)
    parts = [data[:10], data[10:1500], data[1500:1501], data[1501:2999], data[2999:]]
    await store(writer, f"{IMG}/u.bin", data, chunks=parts)
    r = await client.get(f"/{IMG}/u.bin")
    assert r.content == data


async def _get_raw(
    app: ServeImage, path: str, on_body: Any = None
) -> tuple[int, dict[str, str], bytes, bool]:
    """Drive the ASGI app by hand: status, headers, body and whether it completed."""
    messages: list[dict[str, Any]] = []
    sent = {"done": False}

    async def receive() -> dict[str, Any]:
        if not messages:
            messages.append({})
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # never disconnects
        raise AssertionError

    start: dict[str, Any] = {}
    body = bytearray()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            body.extend(message.get("body", b""))
            if on_body is not None and message.get("more_body"):
                await on_body(len(body))
            if not message.get("more_body", False):
                sent["done"] = True

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "headers": [],
        "query_string": b"",
    }
    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, bytes(body), sent["done"]


async def test_file_replaced_mid_stream_aborts(
    writer: Layout, app: ServeImage, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"{IMG}/big.bin"
    await store(writer, name, payload(1_000_000, 1))
    replaced = {"done": False}

    async def replace(_: int) -> None:
        if not replaced["done"]:
            replaced["done"] = True
            await store(writer, name, payload(1_000_000, 2), mtime=MTIME + 60)

    with caplog.at_level(logging.ERROR, "serve_image.endpoint"):
        status, headers, body, complete = await _get_raw(app, f"/{name}", replace)
    assert status == 200
    assert headers["content-length"] == "1000000"
    assert not complete
    assert len(body) < 1_000_000
    assert body == payload(1_000_000, 1)[: len(body)]  # never a byte of the new version
    assert "aborted var/site/storage/images/big.bin" in caplog.text
    assert "file replaced, deleted or missing chunks" in caplog.text


SWAP = f"{IMG}/swap.jpg"
SWAP_SIZE = 4 * 1024 * 1024
SWAP_OLD, SWAP_NEW = payload(SWAP_SIZE, 11), payload(SWAP_SIZE, 12)


def _multipart(boundary: str, parts: list[tuple[int, int]], data: bytes) -> bytes:
    """A multipart/byteranges body of `data` as RFC 9110 §14.6 writes it."""
    body = b""
    for first, last in parts:
        body += (f"--{boundary}\r\nContent-Type: image/jpeg\r\n"
                 f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n").encode()
        body += data[first:last + 1] + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("wanted", [None, "bytes=100000-", "bytes=0-99,200000-"],
                         ids=["whole", "range", "multipart"])
async def test_file_replaced_mid_stream_over_http_is_cut_off(
    writer: Layout, app: ServeImage, wanted: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Over a real connection: the client gets a broken transfer, a prefix of what the old
    version's response would have been, never a byte of the new one."""
    await store(writer, SWAP, SWAP_OLD, chunk=65535, mtime=MTIME)
    extra = f"Range: {wanted}\r\n".encode() if wanted else b""
    with caplog.at_level(logging.ERROR, "serve_image.endpoint"):
        async with uvicorn_server(app, sndbuf=65536) as port:
            client = await RawClient.get(port, f"/{SWAP}", extra=extra)
            await client.read(65536)
            await store(writer, SWAP, SWAP_NEW, chunk=65535, mtime=MTIME + 60)
            await asyncio.wait_for(client.read_all(), 60)
            client.close()
    if wanted is None:
        expected, status = SWAP_OLD, 200
    elif wanted == "bytes=100000-":
        expected, status = SWAP_OLD[100000:], 206
        assert client.headers["content-range"] == f"bytes 100000-{SWAP_SIZE - 1}/{SWAP_SIZE}"
    else:
        ctype = client.headers["content-type"]
        assert ctype.startswith("multipart/byteranges; boundary=")
        parts = [(0, 99), (200000, SWAP_SIZE - 1)]
        expected, status = _multipart(ctype.split("=", 1)[1], parts, SWAP_OLD), 206
    assert (client.status, client.length) == (status, len(expected))
    assert 65536 <= len(client.body) < len(expected)
    assert bytes(client.body) == expected[:len(client.body)]
    assert f"aborted {SWAP} at byte " in caplog.text
    assert "file replaced, deleted or missing chunks" in caplog.text


async def test_file_deleted_mid_stream_aborts(writer: Layout, app: ServeImage) -> None:
    name = f"{IMG}/del.bin"
    await store(writer, name, payload(1_000_000, 1))

    async def delete(_: int) -> None:
        await writer.driver.execute(
            "UPDATE ezdbfile SET mtime = ?, expired = ? WHERE name_hash = ?",
            -MTIME,
            True,
            md5(name),
        )

    status, _, body, complete = await _get_raw(app, f"/{name}", delete)
    assert (status, complete) == (200, False)
    assert len(body) < 1_000_000


async def test_missing_chunk_aborts(
    writer: Layout, app: ServeImage, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"{IMG}/gap.bin"
    await store(writer, name, payload(5000))
    await writer.driver.execute(
        'DELETE FROM ezdbfile_data WHERE name_hash = ? AND "offset" = ?', md5(name), 3000
    )
    with caplog.at_level(logging.ERROR, "serve_image.endpoint"):
        status, _, body, complete = await _get_raw(app, f"/{name}")
    assert (status, complete, len(body)) == (200, False, 3000)
    assert "no chunk holds byte 3000" in caplog.text


async def test_chunks_short_of_size_abort(writer: Layout, app: ServeImage) -> None:
    name = f"{IMG}/short.bin"
    await store(writer, name, payload(2500))
    await writer.driver.execute("UPDATE ezdbfile SET size = ? WHERE name_hash = ?", 4000, md5(name))
    status, headers, body, complete = await _get_raw(app, f"/{name}")
    assert (status, headers["content-length"], complete, len(body)) == (200, "4000", False, 2500)


async def test_chunks_past_size_abort(writer: Layout, app: ServeImage) -> None:
    name = f"{IMG}/long.bin"
    await store(writer, name, payload(2500))
    await writer.driver.execute("UPDATE ezdbfile SET size = ? WHERE name_hash = ?", 2400, md5(name))
    status, _, body, complete = await _get_raw(app, f"/{name}")
    assert (status, complete) == (200, False)
    assert len(body) < 2400


def _down_settings(backend_name: str, tmp: str) -> Settings:
    values: dict[str, Any] = {
        "STORAGE_BACKEND": backend_name,
        "STORAGE_PASS": "s3cr3t-pw",
        "STORAGE_CONNECT_TIMEOUT": 2,
        "STORAGE_USER": "root",
    }
    if backend_name == "sqlite":
        values["STORAGE_DB"] = f"{tmp}/absent/none.sqlite"
    else:
        values.update(STORAGE_HOST="127.0.0.1", STORAGE_PORT=1, STORAGE_DB="x")
    return settings_from_mapping(values, "<down>")


async def test_database_down_is_fast_503(
    backend_name: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = ServeImage(_down_settings(backend_name, str(tmp_path)))
    with caplog.at_level(logging.INFO):
        # Start-up does not fail: the database may come back.
        async with running(app) as c:
            for _ in range(3):
                # Never a hang (how fast it is, bench/failover.py measures).
                r = await asyncio.wait_for(c.get(f"/{IMG}/a.jpg"), 60)
                assert r.status_code == 503
                assert r.headers["retry-after"] == "5"
                assert r.text == "503 Service Unavailable\n"
            health = await c.get("/-/health")
            assert health.status_code == 503
            assert health.headers["cache-control"] == "no-store"
    assert "database unavailable" in caplog.text
    assert "s3cr3t-pw" not in caplog.text


async def test_recovers_when_database_returns(tmp_path: Any) -> None:
    settings = settings_from_mapping({"STORAGE_DB": str(tmp_path / "later.sqlite")}, "<t>")
    async with running(ServeImage(settings)) as c:
        assert (await c.get(f"/{IMG}/a.jpg")).status_code == 503
        writer = make_layout(settings)
        await writer.connect()
        await writer.create_tables()
        await store(writer, f"{IMG}/a.jpg", b"back")
        await writer.close()
        # Served again once the breaker's 0.25 s are over.
        deadline = time.monotonic() + 60
        while (r := await c.get(f"/{IMG}/a.jpg")).status_code == 503:
            assert time.monotonic() < deadline, "never served again"
            await asyncio.sleep(0.01)
        assert (r.status_code, r.content) == (200, b"back")
        assert (await c.get("/-/health")).status_code == 200


async def test_health_ok(client: httpx.AsyncClient) -> None:
    r = await client.get("/-/health")
    assert (r.status_code, r.text) == (200, "ok\n")


async def test_non_image_paths_are_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/favicon.ico")
    assert r.status_code == 404


async def test_batches_are_sized_from_the_stored_chunks(
    writer: Layout, client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    """Regression: batches were sized from STORAGE_CHUNK_SIZE (1000 here), so rows of
    65535 bytes stored with another chunk size came 524 at a time (34 MB per query)."""
    data = payload(2 * 1024 * 1024, seed=5)
    await store(writer, f"{IMG}/wide.bin", data, chunk=65535)
    r = await client.get(f"/{IMG}/wide.bin")
    assert r.content == data
    # The first batch after the first chunk: 4 rows; then 512 KiB / 65535 = 8 rows.
    assert spy.limits[0] == 4
    assert set(spy.limits[1:]) == {8}


async def test_file_of_mtime_0_deleted_mid_stream_aborts(writer: Layout, app: ServeImage) -> None:
    """eZ's soft delete of an mtime-0 file leaves mtime 0 (-abs(0)): expired alone says so."""
    name = f"{IMG}/zero.bin"
    await store(writer, name, payload(1_000_000, 1), mtime=0)

    async def delete(_: int) -> None:
        await writer.driver.execute("UPDATE ezdbfile SET mtime = -ABS(mtime), expired = ? "
                             "WHERE name_hash = ?", True, md5(name))

    status, _, body, complete = await _get_raw(app, f"/{name}", delete)
    assert (status, complete) == (200, False)
    assert len(body) < 1_000_000
