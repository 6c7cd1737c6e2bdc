"""The DFS layout on MariaDB and PostgreSQL: eZ's tables, rows and mount as eZ writes them.

A temporary directory stands in for the NFS mount. Rows and files are
written the way eZ's DFS handler writes them (tests/ezdfs.py), then served
through the real app; the layout counts its trips to the mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from serve_image.app import ServeImage
from serve_image.settings import Settings, SiteConfigError, settings_from_mapping
from serve_image.storage import (
    FileUnavailable,
    Layout,
    SizeMismatch,
    StoredFile,
    StreamAborted,
    make_layout,
)
from serve_image.storage.layouts.dfs import READ_BYTES, WHOLE_READ, DfsLayout
from serve_image.storage.mount import UnsafeName, segments
from tests.conftest import DatabaseFactory
from tests.ezdfs import (
    EZ_DDL,
    IMG,
    MTIME,
    CountingDfs,
    connected,
    counting,
    dfs_settings,
    ez_copy,
    ez_delete,
    ez_row,
    ez_store,
    raw_get,
)
from tests.helpers import md5, payload, running, until
from tests.live import call

_shared: dict[str, Settings] = {}


@pytest.fixture(params=["mysql", "pgsql"])
async def site(request: pytest.FixtureRequest, databases: DatabaseFactory,
               tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One DFS database and mount per backend, emptied before each test."""
    backend = str(request.param)
    if backend not in _shared:
        _shared[backend] = await dfs_settings(databases, backend,
                                              tmp_path_factory.mktemp(f"mount-{backend}"))
    s = _shared[backend]
    async with connected(s) as layout:
        await layout.driver.execute("DELETE FROM ezdfsfile")
    for child in Path(str(s.dfs_mount_point)).iterdir():  # noqa: ASYNC240 - set-up
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return s


@pytest.fixture
def mount(site: Settings) -> Path:
    return Path(str(site.dfs_mount_point))


@pytest.fixture
async def writer(site: Settings) -> AsyncIterator[Layout]:
    async with connected(site) as layout:
        yield layout


def served(settings: Settings, **changes: object) -> tuple[ServeImage, CountingDfs]:
    s = dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
    layout = counting(s)
    return ServeImage(s, layout=layout), layout


# -- the tables -------------------------------------------------------------------

async def _columns(layout: Layout, table: str) -> list[tuple[object, ...]]:
    if layout.settings.backend == "mysql":
        rows = await layout.driver.fetch(
            "SELECT column_name, column_type, is_nullable, column_default, column_key "
            "FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = ? "
            "ORDER BY ordinal_position", table)
        keys = await layout.driver.fetch(
            "SELECT index_name, column_name, sub_part FROM information_schema.statistics "
            "WHERE table_schema = DATABASE() AND table_name = ? ORDER BY index_name, seq_in_index",
            table)
    else:
        rows = await layout.driver.fetch(
            "SELECT column_name, data_type, character_maximum_length, is_nullable, "
            "column_default FROM information_schema.columns WHERE table_name = ? "
            "ORDER BY ordinal_position", table)
        keys = await layout.driver.fetch(
            "SELECT indexdef FROM pg_indexes WHERE tablename = ? ORDER BY indexname", table)
    return [tuple(r) for r in rows] + [tuple(k) for k in keys]


async def test_init_db_creates_the_tables_eZ_creates(
    site: Settings, databases: DatabaseFactory, tmp_path: Path
) -> None:
    # `site` was made by eZ's own DDL; a second database by serve-image's init-db.
    ours = await dfs_settings(databases, site.backend, tmp_path / "mount", ez_tables=False)
    async with connected(ours) as layout:
        await layout.create_tables()
        await layout.create_tables()  # again: nothing to do, nothing touched
        assert {"ezdfsfile", "ezdfsfile_cache"} <= await layout.driver.table_names()
        created = await _columns(layout, "ezdfsfile")
        cache = await _columns(layout, "ezdfsfile_cache")
    async with connected(site) as layout:
        assert created == await _columns(layout, "ezdfsfile")
        if site.backend == "mysql":
            assert cache == await _columns(layout, "ezdfsfile_cache")
    if site.backend == "mysql":
        assert ("size", "bigint(20) unsigned", "NO", "0", "") in created
    else:
        assert ("name_hash", "character", 32, "NO", "''::bpchar") in created
        assert ("size", "integer", None, "NO", "0") in created


async def test_init_db_leaves_ezs_tables_alone(site: Settings, writer: Layout,
                                               mount: Path) -> None:
    await ez_store(writer, mount, f"{IMG}/kept.jpg", b"kept")
    await writer.create_tables()
    assert await writer.stat(f"{IMG}/kept.jpg") is not None


# -- serving ----------------------------------------------------------------------

async def test_small_file_is_one_query_and_one_trip_to_the_mount(
    site: Settings, writer: Layout, mount: Path
) -> None:
    data = payload(10_000, 1)
    await ez_store(writer, mount, f"{IMG}/a/small.jpg", data)
    app, layout = served(site)
    async with running(app) as client:
        r = await client.get(f"/{IMG}/a/small.jpg")
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["content-length"] == "10000"
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["last-modified"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert r.headers["etag"].startswith('"')
    assert layout.mount_calls == ["read_whole"]


async def test_big_file_is_streamed_in_pieces(site: Settings, writer: Layout,
                                              mount: Path) -> None:
    data = payload(WHOLE_READ + READ_BYTES + 1234, 2)
    await ez_store(writer, mount, f"{IMG}/big.bin", data, datatype="application/octet-stream")
    app, layout = served(site)
    async with running(app) as client:
        r = await client.get(f"/{IMG}/big.bin")
    assert (r.status_code, r.content) == (200, data)
    assert layout.mount_calls == ["probe", "read_at", "read_at"]


async def test_ranges_multipart_and_head(site: Settings, writer: Layout, mount: Path) -> None:
    data = payload(5000, 3)
    await ez_store(writer, mount, f"{IMG}/r.jpg", data)
    app, layout = served(site)
    async with running(app) as client:
        r = await client.get(f"/{IMG}/r.jpg", headers={"Range": "bytes=100-199"})
        assert (r.status_code, r.content) == (206, data[100:200])
        assert r.headers["content-range"] == "bytes 100-199/5000"
        r = await client.get(f"/{IMG}/r.jpg", headers={"Range": "bytes=0-1,-2"})
        assert r.status_code == 206
        assert r.headers["content-type"].startswith("multipart/byteranges; boundary=")
        assert data[0:2] in r.content and data[-2:] in r.content
        r = await client.head(f"/{IMG}/r.jpg")
        assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "5000")
        r = await client.get(f"/{IMG}/r.jpg", headers={"Range": "bytes=9000-"})
        assert (r.status_code, r.headers["content-range"]) == (416, "bytes */5000")
    # The 416 was decided from the row: no trip to the mount for it.
    assert layout.mount_calls == ["probe", "read_at", "probe", "read_at", "read_at", "probe"]


async def test_304_and_412_come_from_the_row_alone(site: Settings, writer: Layout,
                                                   mount: Path) -> None:
    await ez_store(writer, mount, f"{IMG}/c.jpg", b"conditional")
    app, layout = served(site)
    async with running(app) as client:
        etag = (await client.get(f"/{IMG}/c.jpg")).headers["etag"]
        (mount / IMG / "c.jpg").unlink()  # the mount is not needed for these
        layout.mount_calls.clear()
        r = await client.get(f"/{IMG}/c.jpg", headers={"If-None-Match": etag})
        assert (r.status_code, r.headers["etag"]) == (304, etag)
        r = await client.get(f"/{IMG}/c.jpg",
                             headers={"If-Modified-Since": "Tue, 14 Nov 2023 22:13:20 GMT"})
        assert r.status_code == 304
        r = await client.get(f"/{IMG}/c.jpg", headers={"If-Match": '"other"'})
        assert r.status_code == 412
    assert layout.mount_calls == []


async def test_deleted_expired_and_rowless_files_are_404s(site: Settings, writer: Layout,
                                                          mount: Path) -> None:
    await ez_store(writer, mount, f"{IMG}/deleted.jpg", b"x")
    await ez_delete(writer, f"{IMG}/deleted.jpg")
    await ez_store(writer, mount, f"{IMG}/expired.jpg", b"x")
    await writer.driver.execute("UPDATE ezdfsfile SET expired = 1 WHERE name_hash = ?",
                                md5(f"{IMG}/expired.jpg"))
    ez_copy(mount, f"{IMG}/no-row.jpg", b"on the mount only")
    app, layout = served(site)
    async with running(app) as client:
        for name in ("deleted.jpg", "expired.jpg", "no-row.jpg"):
            r = await client.get(f"/{IMG}/{name}")
            assert (r.status_code, r.content) == (404, b"404 Not Found\n"), name
    assert layout.mount_calls == []  # the row decides


@pytest.mark.parametrize("case", ["missing", "shorter", "longer"])
async def test_a_write_in_progress_is_a_short_503(
    site: Settings, writer: Layout, mount: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"{IMG}/in progress.jpg"
    await ez_row(writer, name, 5000)  # eZ writes the row first
    if case != "missing":
        ez_copy(mount, name, payload(4000 if case == "shorter" else 6000))
    app, _ = served(site)
    async with running(app) as client:
        with caplog.at_level(logging.WARNING, "serve_image"):
            for headers in ({}, {"Range": "bytes=0-9"}):
                r = await client.get(f"/{IMG}/in%20progress.jpg", headers=headers)
                assert r.status_code == 503
                assert r.headers["retry-after"] == "1"
                assert r.headers["cache-control"] == "no-store"
                assert r.content == b"503 Service Unavailable\n"
            r = await client.head(f"/{IMG}/in%20progress.jpg")
            assert (r.status_code, r.headers["retry-after"]) == (503, "1")
    assert f"503 for /{IMG}/in progress.jpg" in caplog.text
    assert "Traceback" not in caplog.text
    # Once eZ has copied the file, it is served.
    ez_copy(mount, name, payload(5000))
    async with running(app) as client:
        assert (await client.get(f"/{IMG}/in%20progress.jpg")).content == payload(5000)


async def test_a_file_replaced_during_a_stream_cuts_it_off(
    site: Settings, writer: Layout, mount: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"{IMG}/replaced.bin"
    old = payload(3 * READ_BYTES, 1)
    await ez_store(writer, mount, name, old)
    app, _ = served(site)

    async def replace(sent: int) -> None:
        if sent <= READ_BYTES:  # after the first piece: eZ stores a new version
            await ez_store(writer, mount, name, payload(3 * READ_BYTES, 2), mtime=MTIME + 60)

    with caplog.at_level(logging.ERROR, "serve_image.endpoint"):
        await app.startup()
        try:
            status, headers, body, complete = await raw_get(app, f"/{name}", replace)
        finally:
            await app.shutdown()
    assert (status, headers["content-length"], complete) == (200, str(len(old)), False)
    assert body == old[:len(body)] and len(body) < len(old)
    assert "replaced on the mount during the response" in caplog.text


async def test_a_file_changed_in_place_is_never_mixed(site: Settings, writer: Layout,
                                                      mount: Path) -> None:
    name = f"{IMG}/inplace.bin"
    await ez_store(writer, mount, name, payload(2 * READ_BYTES, 1))
    layout = counting(site)
    await layout.connect()
    try:
        meta = await layout.meta(md5(name))
        assert meta is not None
        pieces = layout.read(meta, 0, meta.size - 1)
        assert await anext(pieces) == payload(2 * READ_BYTES, 1)[:READ_BYTES]
        # Not eZ's way: rewritten in place.
        with open(mount / name, "r+b") as f:  # noqa: ASYNC230
            f.write(b"\0" * 10)
        with pytest.raises(StreamAborted, match="replaced on the mount"):
            await anext(pieces)
    finally:
        await layout.close()


async def test_a_hung_mount_read_is_a_503_within_the_bound(
    site: Settings, writer: Layout, mount: Path
) -> None:
    """A fifo where the file should be: opening it blocks, as a hung NFS read does."""
    await ez_store(writer, mount, f"{IMG}/fine.jpg", b"fine")
    etag_app, _ = served(site)
    async with running(etag_app) as client:
        etag = (await client.get(f"/{IMG}/fine.jpg")).headers["etag"]
    names = [f"{IMG}/hung{i}.jpg" for i in range(2)]
    for name in names:
        await ez_row(writer, name, 10)
        os.mkfifo(mount / name)
    app, _ = served(site, dfs_timeout=1.0, dfs_threads=2)
    try:
        async with running(app) as client:
            hung = asyncio.ensure_future(client.get(f"/{names[0]}"))
            # While one thread is stuck, the other serves.
            r = await client.get(f"/{IMG}/fine.jpg")
            assert (r.status_code, r.content) == (200, b"fine")
            assert not hung.done()
            r = await hung
            assert r.status_code == 503
            assert r.headers["retry-after"] == str(site.retry_after)  # an outage: the site's
            # Both threads stuck now: the mount's answers are 503s, the health check
            # says so, and whatever the row decides alone is still answered.
            r = await client.get(f"/{names[1]}")
            assert r.status_code == 503
            assert (await client.get("/-/health")).status_code == 503
            r = await client.get(f"/{IMG}/fine.jpg", headers={"If-None-Match": etag})
            assert r.status_code == 304
    finally:
        for name in names:  # a writer lets the blocked opens go
            os.close(os.open(mount / name, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("resolution", ["openat2", "walk"])
async def test_symbolic_links_and_dot_dot_never_leave_the_mount(
    site: Settings, writer: Layout, mount: Path, tmp_path: Path, resolution: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both ways of opening a file below the mount point refuse every link: openat2 where
    the kernel has it, the walk of O_NOFOLLOW opens where it does not (older kernels, a
    seccomp filter that refuses the call)."""
    from serve_image.storage import mount as mount_module

    assert mount_module._openat2_works  # this machine's kernel (Linux 5.6+) has openat2
    if resolution == "walk":
        monkeypatch.setattr(mount_module, "_openat2_works", False)
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"secret!")
    await ez_row(writer, f"{IMG}/link.jpg", 7)
    (mount / IMG).mkdir(parents=True)
    (mount / IMG / "link.jpg").symlink_to(secret)
    await ez_row(writer, f"{IMG}/dir/x.txt", 7)
    (mount / IMG / "dir").symlink_to(secret.parent)
    app, _ = served(site)
    async with running(app) as client:
        for path in (f"/{IMG}/link.jpg", f"/{IMG}/dir/x.txt"):
            r = await client.get(path)
            assert r.status_code == 503, path
            assert b"secret" not in r.content
        # Sent as it is (an HTTP client would remove the dots): `..` segments are 404
        # (serve_image/paths.py) before any lookup, even of a name with a row.
        dotted = f"{IMG}/../../../../outside/secret.txt"
        await ez_row(writer, dotted, 7)
        status, _, body, _ = await call(app, f"/{dotted}".encode())
        assert (status, body) == (404, b"404 Not Found\n")
    with pytest.raises(UnsafeName):
        segments("var/../../etc/passwd")
    layout = make_layout(site)
    assert isinstance(layout, DfsLayout)
    row = StoredFile(md5("x"), "text/plain", 7, MTIME, False, "var/../outside/secret.txt", "")
    with pytest.raises(FileUnavailable, match="not a safe relative path"):
        await layout.check(row)
    await layout.close()


async def test_hot_cache_metrics_access_log_and_health(
    site: Settings, writer: Layout, mount: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await ez_store(writer, mount, f"{IMG}/hot.jpg", b"hot bytes")
    app, layout = served(site, cache_max_bytes=1024 * 1024, metrics_path="/-/metrics",
                         access_log="text")
    with caplog.at_level(logging.INFO, "serve_image.access"):
        async with running(app) as client:
            for _ in range(3):
                assert (await client.get(f"/{IMG}/hot.jpg")).content == b"hot bytes"
            assert (await client.get("/-/health")).status_code == 200
            metrics = (await client.get("/-/metrics")).text
            shutil.rmtree(mount / "var")
            os.rename(mount, f"{mount}.away")
            try:
                r = await client.get("/-/health")
            finally:
                os.rename(f"{mount}.away", mount)
    assert layout.mount_calls.count("read_whole") == 1  # then from memory
    assert r.status_code == 503
    assert 'status="200"' in metrics
    assert f"GET /{IMG}/hot.jpg" in caplog.text


# -- offload, in process (the real web servers: test_dfs_offload.py) ---------------

async def test_offload_headers(site: Settings, writer: Layout, mount: Path) -> None:
    name = f"{IMG}/été 100% sure?.jpg"
    await ez_store(writer, mount, name, b"offloaded bytes")
    path = "/" + IMG + "/%C3%A9t%C3%A9%20100%25%20sure%3F.jpg"
    app, layout = served(site, offload="x-accel-redirect:/__dfs/")
    async with running(app) as client:
        r = await client.get(path)
        assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "0")
        assert r.headers["x-accel-redirect"] == "/__dfs" + path
        assert r.headers["content-type"] == "image/jpeg"
        assert "etag" in r.headers and "cache-control" in r.headers
        # The web server answers ranges: serve-image only rules out unsatisfiable ones.
        r = await client.get(path, headers={"Range": "bytes=2-4"})
        assert (r.status_code, r.headers["x-accel-redirect"]) == (200, "/__dfs" + path)
        r = await client.get(path, headers={"Range": "bytes=99-"})
        assert r.status_code == 416
        # If-Match would be judged by the web server against the file: sent here.
        etag = r.headers.get("etag") or (await client.head(path)).headers["etag"]
        r = await client.get(path, headers={"If-Match": etag})
        assert (r.status_code, r.content) == (200, b"offloaded bytes")
        assert "x-accel-redirect" not in r.headers
        r = await client.head(path)
        assert (r.status_code, r.headers["content-length"]) == (200, "15")
        assert "x-accel-redirect" not in r.headers
    assert "read_at" not in layout.mount_calls[:2]  # checked, never read, when offloaded
    app, _ = served(site, offload="x-sendfile")
    async with running(app) as client:
        r = await client.get(path)
        assert dict(r.headers.raw)[b"x-sendfile"] == f"{mount}/{name}".encode()
        await ez_row(writer, f"{IMG}/pending.jpg", 10)
        r = await client.get(f"/{IMG}/pending.jpg")
        assert (r.status_code, r.headers["retry-after"]) == (503, "1")
        assert "x-sendfile" not in r.headers


# -- writes and the tools -------------------------------------------------------------

async def test_store_writes_the_file_then_its_row(site: Settings, writer: Layout,
                                                  mount: Path) -> None:
    name = f"{IMG}/new/stored.jpg"
    await writer.store(name, [b"abc", b"def"], size=6, mtime=MTIME, datatype="image/jpeg",
                       scope="image")
    assert (mount / name).read_bytes() == b"abcdef"
    assert int((mount / name).stat().st_mtime) == MTIME
    assert sorted(p.name for p in (mount / name).parent.iterdir()) == ["stored.jpg"]
    row = await writer.stat(name)
    assert row is not None and (row.size, row.mtime, row.live) == (6, MTIME, True)
    # Stored again (eZ's ON DUPLICATE KEY UPDATE), and a short source stores nothing.
    await writer.store(name, [b"xy"], size=2, mtime=MTIME + 1, datatype="image/png",
                       scope="image")
    with pytest.raises(SizeMismatch, match="read 1 bytes, expected 5"):
        await writer.store(name, [b"z"], size=5, mtime=MTIME + 2, datatype="image/png",
                           scope="image")
    assert (mount / name).read_bytes() == b"xy"
    assert sorted(p.name for p in (mount / name).parent.iterdir()) == ["stored.jpg"]
    row = await writer.stat(name)
    assert row is not None and (row.size, row.datatype) == (2, "image/png")


async def test_soft_delete_purge_and_verify(site: Settings, writer: Layout,
                                            mount: Path) -> None:
    await ez_store(writer, mount, f"{IMG}/keep.jpg", b"keep")
    await ez_store(writer, mount, f"{IMG}/old.jpg", b"old", mtime=1000)
    await ez_store(writer, mount, f"{IMG}/short.jpg", b"short")
    ez_copy(mount, f"{IMG}/short.jpg", b"shor")
    await ez_row(writer, f"{IMG}/absent.jpg", 3)
    ez_copy(mount, f"{IMG}/orphan.jpg", b"no row")
    ez_copy(mount, "var/site/cache/texttoimage/x.png", b"eZ's cache: ezdfsfile_cache")
    assert await writer.delete(f"{IMG}/old.jpg")
    row = await writer.stat(f"{IMG}/old.jpg")
    assert row is not None and (row.mtime, row.live) == (-1000, False)
    assert (mount / IMG / "old.jpg").exists()  # a soft delete leaves the file
    problems = {b.name: b.problem async for b in writer.verify()}
    assert problems == {
        f"{IMG}/absent.jpg": "no file on the mount",
        f"{IMG}/short.jpg": "4 bytes on the mount, the row says 5",
        f"{IMG}/orphan.jpg": "on the mount, no row in ezdfsfile",
    }
    assert await writer.purge(2000) == (1, 3)
    assert not (mount / IMG / "old.jpg").exists()
    assert await writer.stat(f"{IMG}/old.jpg") is None
    assert (mount / IMG / "keep.jpg").read_bytes() == b"keep"


# -- settings ---------------------------------------------------------------------

def _settings(tmp_path: Path, **values: object) -> Settings:
    site = tmp_path / "site.py"
    return settings_from_mapping({"STORAGE_DB": "c", **values}, str(site), "site")


def test_dfs_settings(tmp_path: Path) -> None:
    (tmp_path / "nfs").mkdir()
    s = _settings(tmp_path, STORAGE_BACKEND="dfsmysqli", STORAGE_LAYOUT="dfs",
                  DFS_MOUNT_POINT="nfs")
    assert (s.backend, s.layout, s.dfs_mount_point) == ("mysql", "dfs", str(tmp_path / "nfs"))
    assert (s.dfs_table, s.dfs_threads, s.dfs_timeout, s.offload) == ("ezdfsfile", 16, 5.0, None)
    s = _settings(tmp_path, STORAGE_BACKEND="pgsql", STORAGE_LAYOUT="dfs",
                  DFS_MOUNT_POINT=str(tmp_path / "nfs"), OFFLOAD="x-accel-redirect:/_dfs/in/")
    assert s.offload == "x-accel-redirect:/_dfs/in/"


@pytest.mark.parametrize(("values", "message"), [
    ({"STORAGE_BACKEND": "mysql", "STORAGE_LAYOUT": "dfs"},
     "DFS_MOUNT_POINT is missing: STORAGE_LAYOUT 'dfs' reads the files from eZ's mount"),
    ({"STORAGE_BACKEND": "mysql", "STORAGE_LAYOUT": "dfs", "DFS_MOUNT_POINT": "absent"},
     "DFS_MOUNT_POINT must be an existing directory, not "),
    ({"STORAGE_BACKEND": "sqlite", "STORAGE_LAYOUT": "dfs", "DFS_MOUNT_POINT": "."},
     "STORAGE_LAYOUT 'dfs' needs STORAGE_BACKEND 'mysql' or 'pgsql', not 'sqlite'"),
    ({"STORAGE_BACKEND": "dfsmysqli"},
     "STORAGE_BACKEND 'dfsmysqli' is eZ's DFS cluster: set STORAGE_LAYOUT = 'dfs'"),
    ({"STORAGE_BACKEND": "mysql", "OFFLOAD": "x-sendfile"},
     "OFFLOAD is for STORAGE_LAYOUT 'dfs', not 'chunks'"),
    ({"STORAGE_BACKEND": "mysql", "DFS_MOUNT_POINT": "."},
     "DFS_MOUNT_POINT is for STORAGE_LAYOUT 'dfs', not 'chunks'"),
    ({"STORAGE_BACKEND": "mysql", "STORAGE_LAYOUT": "dfs", "DFS_MOUNT_POINT": ".",
      "OFFLOAD": "x-accel-redirect:/../"}, "OFFLOAD must be None, "),
    ({"STORAGE_BACKEND": "mysql", "STORAGE_LAYOUT": "dfs", "DFS_MOUNT_POINT": ".",
      "DFS_TABLE": "ezdfsfile; DROP"}, "DFS_TABLE must be a table name"),
])
def test_dfs_settings_are_checked(tmp_path: Path, values: dict[str, object],
                                  message: str) -> None:
    with pytest.raises(SiteConfigError, match=f"^{tmp_path / 'site.py'}: "):
        _settings(tmp_path, **values)
    try:
        _settings(tmp_path, **values)
    except SiteConfigError as e:
        assert message in str(e)


def test_the_mysql_and_pgsql_ddl_are_ezs(tmp_path: Path) -> None:
    from serve_image.storage.layouts.dfs import ddl

    ours = ddl("mysql", "ezdfsfile")
    assert [" ".join(s.split()) for s in ours["ezdfsfile"] + ours["ezdfsfile_cache"]] == [
        " ".join(s.split()) for s in EZ_DDL["mysql"]]
    assert " ".join(ddl("pgsql", "ezdfsfile")["ezdfsfile"][0].split()) == " ".join(
        EZ_DDL["pgsql"][0].split())


async def test_the_layouts_of_one_mount_share_one_pool(site: Settings, tmp_path: Path) -> None:
    """A site that reads from replicas has two layouts over one mount: a hung NFS server
    must hold DFS_THREADS threads in all, not twice that."""
    site = dataclasses.replace(site, dfs_mount_point=str(tmp_path))  # no other test's layouts
    primary, replica = make_layout(site), make_layout(site)
    assert isinstance(primary, DfsLayout) and isinstance(replica, DfsLayout)
    assert primary.pool is replica.pool
    other = make_layout(dataclasses.replace(site, dfs_threads=site.dfs_threads + 1))
    assert isinstance(other, DfsLayout) and other.pool is not primary.pool
    await replica.close()
    assert not primary.pool.closed  # still in use
    await primary.close()
    assert primary.pool.closed
    await other.close()


async def test_a_result_that_comes_too_late_is_handed_to_its_clean_up() -> None:
    """A temporary file made after its store gave up waiting is removed, not left open."""
    from serve_image.storage.pool import BoundedPool, PoolTimeout

    pool = BoundedPool(1, 0.05, "test pool")
    release = threading.Event()
    cleaned: list[object] = []
    made = object()

    def slow() -> object:
        release.wait(10)
        return made

    try:
        with pytest.raises(PoolTimeout):
            await pool.run(slow, late=cleaned.append)
        release.set()
        deadline = time.monotonic() + 10
        while not cleaned and time.monotonic() < deadline:  # noqa: ASYNC110 - another thread's
            await asyncio.sleep(0.01)
        assert cleaned == [made]
        assert await pool.run(lambda: 42, late=cleaned.append) == 42  # in time: no clean-up
        assert cleaned == [made]
    finally:
        release.set()
        pool.close()


async def test_a_closed_layout_keeps_nothing_of_the_mount_open(
    site: Settings, writer: Layout, tmp_path: Path
) -> None:
    """Each pool thread keeps the mount point open for openat2; when the layout closes,
    its threads close it (a descriptor held would keep an NFS or FUSE mount busy)."""
    mount_dir = tmp_path / "own-mount"
    mount_dir.mkdir()
    mine = dataclasses.replace(site, dfs_mount_point=str(mount_dir))

    def held() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(mount_dir)):
                    out.append(fd)
        return out

    layout = make_layout(mine)
    await layout.connect()
    await layout.store(f"{IMG}/a.jpg", [b"data"], size=4, mtime=MTIME, datatype="image/jpeg",
                       scope="image")
    got = await layout.first(md5(f"{IMG}/a.jpg"))
    assert got is not None and got[1] == b"data"
    assert held()  # the pool thread's mount point, at least
    await layout.close()
    await until(lambda: not held(), "the pool's threads closing the mount point")
