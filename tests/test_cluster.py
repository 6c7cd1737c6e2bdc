"""The Python API (serve_image.cluster) on every backend, and type and scope guessing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_image.cluster import ClusterFiles
from serve_image.filetypes import guess_datatype, scope_for
from serve_image.samples import png, svg
from serve_image.storage import Layout, SizeMismatch, StorageError
from tests.helpers import payload

NAME = "var/x/storage/images/a/photo.jpg"


async def test_store_contents_then_fetch_contents(writer: Layout) -> None:
    cluster = ClusterFiles(writer)
    data = payload(4321, seed=7)
    stored = await cluster.store_contents(NAME, data, mtime=1_700_000_000)
    assert (stored.size, stored.mtime, stored.scope) == (4321, 1_700_000_000, "image")
    assert await cluster.fetch_contents(NAME) == data


async def test_store_file_takes_type_from_content_and_mtime_from_the_file(
    writer: Layout, tmp_path: Path
) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(png(8, 8, 1))  # a PNG named .jpg: the bytes win
    os.utime(path, (1_600_000_000, 1_600_000_000))
    stored = await ClusterFiles(writer).store_file(path, NAME)
    row = await writer.stat(NAME)
    assert row is not None
    assert (row.datatype, row.mtime, row.size, row.scope) == (
        "image/png", 1_600_000_000, path.stat().st_size, "image")
    assert stored.datatype == "image/png"


@pytest.mark.parametrize(("pieces", "message"), [
    ([b"ab"], "read 2 bytes, expected 3"),
    ([b"ab", b"cd"], "more than the 3 bytes expected"),
])
async def test_a_store_of_the_wrong_size_is_a_named_storage_error_and_stores_nothing(
    writer: Layout, pieces: list[bytes], message: str
) -> None:
    """Regression: a size mismatch was a bare ValueError, which `copy` caught with any other."""
    await ClusterFiles(writer).store_contents(NAME, b"old", mtime=1_700_000_000)
    with pytest.raises(SizeMismatch) as e:
        await writer.store(NAME, pieces, size=3, mtime=1_700_000_001, datatype="image/jpeg",
                           scope="image")
    assert isinstance(e.value, StorageError)
    assert str(e.value) == f"{NAME}: {message}"
    assert await ClusterFiles(writer).fetch_contents(NAME) == b"old"


async def test_fetch_file_writes_atomically_with_the_mtime(
    writer: Layout, tmp_path: Path
) -> None:
    cluster = ClusterFiles(writer)
    data = payload(2500, seed=3)
    await cluster.store_contents(NAME, data, mtime=1_650_000_000)
    target = tmp_path / "out" / "photo.jpg"
    target.parent.mkdir()
    target.write_bytes(b"old contents")
    meta = await cluster.fetch_file(NAME, target)
    assert meta is not None and meta.size == 2500
    assert target.read_bytes() == data
    assert int(target.stat().st_mtime) == 1_650_000_000
    assert os.listdir(target.parent) == ["photo.jpg"]  # no temporary file left


async def test_fetch_file_of_a_missing_file_writes_nothing(
    writer: Layout, tmp_path: Path
) -> None:
    assert await ClusterFiles(writer).fetch_file(NAME, tmp_path / "f") is None
    assert os.listdir(tmp_path) == []


async def test_delete_makes_a_file_gone_but_keeps_its_row(writer: Layout) -> None:
    cluster = ClusterFiles(writer)
    await cluster.store_contents(NAME, b"abc", mtime=1_700_000_000)
    assert await cluster.exists(NAME) is True
    assert await cluster.delete(NAME) is True
    assert await cluster.exists(NAME) is False
    assert await cluster.fetch_contents(NAME) is None
    row = await cluster.stat(NAME)
    assert row is not None and (row.live, row.mtime) == (False, -1_700_000_000)
    assert await cluster.delete(NAME) is False


async def test_delete_by_wildcard_and_list(writer: Layout) -> None:
    cluster = ClusterFiles(writer)
    for name in ["var/x/storage/images/a/1.jpg", "var/x/storage/images/a/2.png",
                 "var/x/storage/images/b/3.jpg"]:
        await cluster.store_contents(name, b"x")
    assert await cluster.delete_by_wildcard("var/x/storage/images/*.jpg") == [
        "var/x/storage/images/a/1.jpg", "var/x/storage/images/b/3.jpg"]
    assert [f.name async for f in cluster.list("var/x/")] == ["var/x/storage/images/a/2.png"]


async def test_purge_after_delete_removes_the_row(writer: Layout) -> None:
    cluster = ClusterFiles(writer)
    await cluster.store_contents(NAME, b"abc", mtime=1_000_000_000)
    await cluster.delete(NAME)
    assert await cluster.purge(30, dry_run=True) == (1, 3)
    assert await cluster.purge(30) == (1, 3)
    assert await cluster.stat(NAME) is None


@pytest.mark.parametrize(("head", "name", "expected"), [
    (png(4, 4, 1), "a.jpg", "image/png"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(64), "noext", "image/jpeg"),
    (b"GIF89a" + bytes(64), "a.bin", "image/gif"),
    (b"%PDF-1.4\n" + bytes(64), "doc", "application/pdf"),
    (b"\x00\x00\x00\x18ftypmp42" + bytes(64), "clip", "video/mp4"),
    (b"<?xml version='1.0'?>" + svg("x"), "logo.svg", "image/svg+xml"),
    (b"body { color: red }", "style.css", "text/css"),
    (b"", "empty.pdf", "application/pdf"),
    (b"\x01\x02\x03 nothing known", "blob", "application/octet-stream"),
])
def test_guess_datatype_prefers_content_then_extension(
    head: bytes, name: str, expected: str
) -> None:
    assert guess_datatype(head, name) == expected


@pytest.mark.parametrize(("name", "expected"), [
    ("var/site/storage/images/a/b.jpg", "image"),
    ("var/site/storage/images-versioned/a/1/b.jpg", "image"),
    ("var/storage/images/b.jpg", "image"),
    ("var/site/storage/original/application/x.pdf", "binaryfile"),
    ("var/site/storage/original/video/x.mp4", "mediafile"),
    ("var/site/storage/original/audio/x.mp3", "mediafile"),
    ("var/site/storage/packages/x.ezpkg", "binaryfile"),
])
def test_scope_follows_ez_storage_layout(name: str, expected: str) -> None:
    assert scope_for(name) == expected
