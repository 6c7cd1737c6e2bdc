"""Guessed types are registered media types: puremagic's own names never reach the database."""

from __future__ import annotations

from pathlib import Path

import httpx
import puremagic
import pytest

from serve_image.cluster import ClusterFiles
from serve_image.filetypes import guess_datatype, is_registered
from serve_image.samples import png
from serve_image.storage import Layout
from tests.helpers import IMG

DIGITS = b"0123456789\n" * 20
BMP = b"BM" + bytes(60)
ICO = b"\x00\x00\x01\x00" + bytes(60)
AVI = b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(60)
GZIP = b"\x1f\x8b\x08" + bytes(60)

# (first bytes, name, what puremagic says, what is stored)
SNIFFED = [
    # The differential run: a .txt of ASCII digits was stored as text/ascii.
    (DIGITS, "notes.txt", "text/ascii", "text/plain"),
    (DIGITS, "notes", "text/ascii", "application/octet-stream"),  # no name to fall back on
    (BMP, "pic.bmp", "image/x-ms-bmp", "image/bmp"),
    (BMP, "pic", "image/x-ms-bmp", "application/octet-stream"),
    (ICO, "favicon.ico", "image/x-icon", "image/vnd.microsoft.icon"),
    (AVI, "clip.avi", "video/avi", "video/x-msvideo"),
    # The name's type is that of the unzipped bytes: not what is stored.
    (GZIP, "logo.svgz", "application/x-gzip", "application/octet-stream"),
    (GZIP, "site.tar.gz", "application/x-gzip", "application/octet-stream"),
    # A registered sniffed type still wins over the name.
    (png(4, 4, 1), "photo.jpg", "image/png", "image/png"),
]


@pytest.mark.parametrize(("head", "name", "sniffed", "stored"), SNIFFED)
def test_unregistered_sniffed_type_falls_back_to_the_name(
    head: bytes, name: str, sniffed: str, stored: str
) -> None:
    # What puremagic really says for these bytes: the case is the one meant.
    assert puremagic.from_string(head, mime=True, filename=name) == sniffed
    assert guess_datatype(head, name) == stored
    assert is_registered(stored)


@pytest.mark.parametrize(
    "media_type",
    ["image/png", "IMAGE/PNG", "text/plain; charset=utf-8", "application/pdf", "image/svg+xml"],
)
def test_registered(media_type: str) -> None:
    assert is_registered(media_type)


@pytest.mark.parametrize(
    "media_type",
    [
        "text/ascii",  # puremagic's names
        "image/x-ms-bmp",
        "video/avi",
        "audio/wave",
        "application/x-gzip",
        "chemical/x-pdb",  # in Debian's mime.types, but `chemical` is no registered top-level type
        "inode/directory",
        "misc",
        "",
        "image/",
    ],
)
def test_not_registered(media_type: str) -> None:
    assert not is_registered(media_type)


def test_name_with_an_unregistered_top_level_type_is_not_stored() -> None:
    # `.pdb` is chemical/x-pdb in Debian's mime.types; puremagic knows no such bytes.
    assert guess_datatype(b"HEADER    PROTEIN\n", "1abc.pdb") == "application/octet-stream"


@pytest.mark.parametrize(
    ("data", "name", "stored"),
    [
        (DIGITS, "notes.txt", "text/plain"),
        (DIGITS, "notes", "application/octet-stream"),
        (BMP, "pic.bmp", "image/bmp"),
    ],
)
async def test_imported_file_is_stored_and_served_with_a_registered_type(
    writer: Layout, client: httpx.AsyncClient, tmp_path: Path,
    data: bytes, name: str, stored: str,
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    await ClusterFiles(writer).store_file(path, f"{IMG}/{name}")
    row = await writer.stat(f"{IMG}/{name}")
    assert row is not None and row.datatype == stored
    r = await client.get(f"/{IMG}/{name}")
    assert r.status_code == 200
    assert r.headers["content-type"] == stored
    assert r.headers["content-length"] == str(len(data))
    assert r.content == data
