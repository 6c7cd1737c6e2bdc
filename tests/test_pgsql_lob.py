"""eZ Publish 3.8's PostgreSQL layout (`ezdbfile.lob_id`, bytes in a large object), for real."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_image.app import ServeImage
from serve_image.cli import main
from serve_image.settings import Settings, SiteConfigError, settings_from_mapping
from serve_image.storage import Layout, SizeMismatch, make_layout
from serve_image.storage.layouts.largeobject import LargeObjectLayout
from tests.conftest import DatabaseFactory
from tests.helpers import IMG, SpyLayout, md5, payload, running, split

pytestmark = pytest.mark.pgsql

PIECE = 1000
BIG = f"{IMG}/big/photo.jpg"
BIG_DATA = payload(300_500, seed=38)  # more pieces than one batch of the endpoint reads


@pytest.fixture(scope="module")
async def lob_settings(databases: DatabaseFactory) -> Settings:
    s = await databases.settings("pgsql", STORAGE_LAYOUT="largeobject", STORAGE_CHUNK_SIZE=PIECE)
    b = make_layout(s)
    await b.connect()
    await b.create_tables()
    await b.store(BIG, split(BIG_DATA, PIECE), size=len(BIG_DATA), mtime=1_700_000_000,
                  datatype="image/jpeg", scope="image")
    await b.close()
    return s


@pytest.fixture
async def lob(lob_settings: Settings) -> AsyncIterator[Layout]:
    b = make_layout(lob_settings)
    await b.connect()
    yield b
    await b.close()


@pytest.fixture
async def lob_app(lob_settings: Settings) -> AsyncIterator[ServeImage]:
    app = ServeImage(lob_settings)
    await app.startup()
    yield app
    await app.shutdown()


@pytest.fixture
async def lob_client(lob_app: ServeImage) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=lob_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def _get_raw(app: ServeImage, path: str) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers, body and whether the body was completed (httpx refuses a cut one)."""
    start: dict[str, Any] = {}
    body = bytearray()
    done = False

    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if requested:
            await asyncio.Event().wait()  # the client never disconnects
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal done
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            body.extend(message.get("body", b""))
            done = not message.get("more_body", False)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
             "headers": [], "query_string": b""}
    await app(scope, receive, send)
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, done


async def _rows(backend: Layout, sql: str) -> list[tuple[object, ...]]:
    return await backend.driver.fetch(sql)


def test_layout_picks_its_own_backend(lob_settings: Settings) -> None:
    assert type(make_layout(lob_settings)) is LargeObjectLayout


def test_largeobject_needs_pgsql() -> None:
    with pytest.raises(SiteConfigError) as e:
        settings_from_mapping(
            {"STORAGE_BACKEND": "mysql", "STORAGE_DB": "c", "STORAGE_LAYOUT": "largeobject"},
            "sites/old.py",
        )
    assert str(e.value) == (
        "sites/old.py: STORAGE_LAYOUT 'largeobject' needs STORAGE_BACKEND 'pgsql', not 'mysql'"
    )


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(SiteConfigError) as e:
        settings_from_mapping(
            {"STORAGE_BACKEND": "pgsql", "STORAGE_DB": "c", "STORAGE_LAYOUT": "lob"},
            "sites/old.py",
        )
    assert str(e.value) == (
        "sites/old.py: STORAGE_LAYOUT must be one of 'chunks', 'largeobject', 'dfs', not 'lob'"
    )


async def test_create_tables_makes_the_38_table(lob: Layout) -> None:
    rows = await _rows(
        lob,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'ezdbfile' ORDER BY ordinal_position",
    )
    assert rows == [
        ("id", "integer"), ("name", "character varying"), ("name_hash", "character varying"),
        ("datatype", "character varying"), ("scope", "character varying"), ("size", "bigint"),
        ("mtime", "integer"), ("lob_id", "oid"),
    ]


async def test_get_returns_exact_bytes(lob_client: httpx.AsyncClient) -> None:
    r = await lob_client.get(f"/{BIG}")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(BIG_DATA))
    assert r.headers["content-type"] == "image/jpeg"
    assert r.content == BIG_DATA


async def test_range_across_piece_boundaries(lob_client: httpx.AsyncClient) -> None:
    r = await lob_client.get(f"/{BIG}", headers={"Range": "bytes=990-3010"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 990-3010/{len(BIG_DATA)}"
    assert r.content == BIG_DATA[990:3011]


async def test_suffix_range_is_the_last_bytes(lob_client: httpx.AsyncClient) -> None:
    r = await lob_client.get(f"/{BIG}", headers={"Range": "bytes=-1500"})
    assert r.status_code == 206
    assert r.content == BIG_DATA[-1500:]


async def test_head_has_headers_and_no_body_and_reads_no_piece(lob_settings: Settings) -> None:
    spy = SpyLayout(make_layout(lob_settings, readonly=True))
    async with running(ServeImage(lob_settings, layout=spy)) as client:
        r = await client.head(f"/{BIG}")
        heads = await asyncio.gather(*(client.head(f"/{BIG}") for _ in range(8)))
        get = await client.get(f"/{BIG}", headers={"Range": "bytes=0-9"})
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(BIG_DATA))
    assert r.headers["content-type"] == "image/jpeg"
    assert r.content == b""
    assert [(h.status_code, h.content) for h in heads] == [(200, b"")] * 8
    assert (get.status_code, get.content) == (206, BIG_DATA[:10])
    # The nine HEADs read rows only (the eight at once share queries: batching.py);
    # the range read its row, then its piece, which the spy sees.
    assert spy.calls[0] == "meta"
    assert set(spy.calls[1:-2]) <= {"meta", "meta_many"}
    assert spy.calls[-2:] == ["meta", "fetch_chunks"]
    assert spy.chunk_reads == 1


async def test_missing_file_is_404(lob_client: httpx.AsyncClient) -> None:
    r = await lob_client.get(f"/{IMG}/nothing/here.jpg")
    assert r.status_code == 404


async def test_deleted_file_is_404(lob: Layout, lob_client: httpx.AsyncClient) -> None:
    name = f"{IMG}/gone/old.png"
    await lob.store(name, [b"x" * 10], size=10, mtime=1_600_000_000, datatype="image/png",
                    scope="image")
    assert (await lob_client.get(f"/{name}")).status_code == 200
    assert await lob.delete(name) is True
    assert (await lob_client.get(f"/{name}")).status_code == 404


async def test_small_file_in_one_piece(lob: Layout, lob_client: httpx.AsyncClient) -> None:
    name = f"{IMG}/small/icon.gif"
    data = payload(PIECE, seed=2)
    await lob.store(name, [data], size=len(data), mtime=1_650_000_000, datatype="image/gif",
                    scope="image")
    r = await lob_client.get(f"/{name}")
    assert (r.status_code, r.content) == (200, data)


async def test_empty_file(lob: Layout, lob_client: httpx.AsyncClient) -> None:
    name = f"{IMG}/empty/nothing.txt"
    await lob.store(name, [], size=0, mtime=1_650_000_000, datatype="text/plain", scope="image")
    r = await lob_client.get(f"/{name}")
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "0")


async def test_fetch_chunks_is_empty_once_the_row_changed(lob: Layout) -> None:
    name = f"{IMG}/changing/pic.jpg"
    data = payload(2500, seed=5)
    await lob.store(name, split(data, PIECE), size=len(data), mtime=1_700_000_001,
                    datatype="image/jpeg", scope="image")
    meta = await lob.meta(md5(name))
    assert meta is not None
    first = await lob.fetch_chunks(meta, 0, len(data) - 1, 10)
    assert [(c.offset, len(c.data)) for c in first] == [(0, 1000), (1000, 1000), (2000, 500)]
    await lob.store(name, [data], size=len(data), mtime=1_700_000_002, datatype="image/jpeg",
                    scope="image")
    assert await lob.fetch_chunks(meta, 0, len(data) - 1, 10) == []


async def test_replacing_unlinks_the_old_object(
    lob: Layout, lob_client: httpx.AsyncClient
) -> None:
    name = f"{IMG}/replaced/pic.png"
    await lob.store(name, [b"old"], size=3, mtime=1_700_000_000, datatype="image/png",
                    scope="image")
    (old,) = (await _rows(lob, f"SELECT lob_id FROM ezdbfile WHERE name_hash = '{md5(name)}'"))[0]
    await lob.store(name, [b"new!"], size=4, mtime=1_700_000_005, datatype="image/png",
                    scope="image")
    left = await _rows(lob, f"SELECT count(*) FROM pg_largeobject_metadata WHERE oid = {old}")
    assert left == [(0,)]
    assert (await lob_client.get(f"/{name}")).content == b"new!"


async def test_failed_store_keeps_the_old_version(
    lob: Layout, lob_client: httpx.AsyncClient
) -> None:
    name = f"{IMG}/kept/pic.png"
    await lob.store(name, [b"first"], size=5, mtime=1_700_000_000, datatype="image/png",
                    scope="image")
    before = await _rows(lob, "SELECT count(*) FROM pg_largeobject_metadata")
    with pytest.raises(SizeMismatch, match="read 3 bytes, expected 9"):
        await lob.store(name, [b"abc"], size=9, mtime=1_700_000_009, datatype="image/png",
                        scope="image")
    assert await _rows(lob, "SELECT count(*) FROM pg_largeobject_metadata") == before
    assert (await lob_client.get(f"/{name}")).content == b"first"


def _site_file(s: Settings, path: Path) -> Path:
    path.write_text(
        f"STORAGE_BACKEND = 'pgsql'\nSTORAGE_LAYOUT = 'largeobject'\nSTORAGE_HOST = {s.host!r}\n"
        f"STORAGE_PORT = {s.port}\nSTORAGE_USER = {s.user!r}\nSTORAGE_PASS = {s.password!r}\n"
        f"STORAGE_DB = {s.database!r}\nSTORAGE_CHUNK_SIZE = {PIECE}\n"
    )
    return path


async def test_import_command_writes_large_objects(
    lob_settings: Settings, lob_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    data = payload(4321, seed=9)
    source = tmp_path / "root" / IMG / "imported" / "pic.jpg"
    source.parent.mkdir(parents=True)
    source.write_bytes(data)
    site = _site_file(lob_settings, tmp_path / "old38.py")
    code = await asyncio.to_thread(main, ["import", "--site", str(site), "--quiet",
                                          str(tmp_path / "root")])
    assert code == 0
    r = await lob_client.get(f"/{IMG}/imported/pic.jpg")
    assert (r.status_code, r.content) == (200, data)


async def test_management_commands_work_on_large_objects(
    lob_settings: Settings, lob: Layout, lob_client: httpx.AsyncClient, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ls, rm --wildcard, purge and verify: the same commands as on the chunk layout."""
    base = f"{IMG}/managed"
    names = [f"{base}/{i}.jpg" for i in range(3)]
    for i, name in enumerate(names):
        await lob.store(name, [payload(1500, seed=i)], size=1500, mtime=1_700_000_000,
                        datatype="image/jpeg", scope="image")
    site = str(_site_file(lob_settings, tmp_path / "old38.py"))
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["ls", "--site", site, f"{base}/"]) == 0
    assert capsys.readouterr().out.splitlines() == names

    ((oid,),) = await _rows(lob, f"SELECT lob_id FROM ezdbfile WHERE name_hash = '{md5(names[1])}'")
    assert await asyncio.to_thread(main, ["rm", "--site", site, "--wildcard", f"{base}/1.*"]) == 0
    assert capsys.readouterr().out == "1 file(s) deleted\n"
    assert (await lob_client.get(f"/{names[1]}")).status_code == 404
    assert (await lob_client.get(f"/{names[0]}")).status_code == 200

    assert await asyncio.to_thread(main, ["purge", "--site", site, "--older-than", "0"]) == 0
    # Other tests of this module leave deleted files of their own: at least ours went.
    purged = re.fullmatch(r"([0-9]+) deleted file\(s\) purged \(.*\)\n", capsys.readouterr().out)
    assert purged is not None and int(purged.group(1)) >= 1
    assert await lob.stat(names[1]) is None
    assert await _rows(lob, f"SELECT oid FROM pg_largeobject_metadata WHERE oid = {oid}") == []

    await lob.driver.fetch(
        "SELECT lo_unlink(lob_id) FROM ezdbfile WHERE name_hash = ?", md5(names[2])
    )
    assert await asyncio.to_thread(main, ["verify", "--site", site]) == 1
    assert f"{names[2]}: its large object is missing" in capsys.readouterr().out.splitlines()


async def test_concurrent_requests_are_exact(lob: Layout, lob_client: httpx.AsyncClient) -> None:
    # Requests that pile up share queries on the chunks layout (batching.py),
    # whose SQL this layout's tables cannot answer.
    names = [f"{IMG}/many/{i}.png" for i in range(12)]
    for i, name in enumerate(names):
        await lob.store(name, [payload(300, seed=i)], size=300, mtime=1_700_000_000,
                        datatype="image/png", scope="image")
    got = await asyncio.gather(*(lob_client.get(f"/{n}") for n in names))
    assert [(r.status_code, r.content) for r in got] == [
        (200, payload(300, seed=i)) for i in range(12)
    ]


async def test_missing_large_object_cuts_the_body_not_the_site(
    lob: Layout, lob_app: ServeImage, lob_client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"{IMG}/broken/pic.jpg"
    await lob.store(name, [b"y" * 2500], size=2500, mtime=1_700_000_000, datatype="image/jpeg",
                    scope="image")
    await lob.driver.fetch("SELECT lo_unlink(lob_id) FROM ezdbfile WHERE name_hash = ?", md5(name))
    status, headers, body, complete = await _get_raw(lob_app, f"/{name}")
    assert (status, headers["content-length"], body, complete) == (200, "2500", b"", False)
    assert f"aborted {name} at byte 0 of 2500" in caplog.text
    # One broken file is no reason to answer 503 for the others.
    assert (await lob_client.get(f"/{BIG}")).status_code == 200
