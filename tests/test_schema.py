"""`init-db`: creates the cluster tables, is idempotent, never touches data."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_image.cli import main
from serve_image.settings import Settings
from serve_image.storage import Layout
from tests.helpers import IMG, md5, payload, store


async def test_create_tables_twice_keeps_data(writer: Layout) -> None:
    data = payload(2500)
    await store(writer, f"{IMG}/keep.jpg", data)
    await writer.create_tables()  # a second time: no error, no warning, nothing lost
    meta = await writer.meta(md5(f"{IMG}/keep.jpg"))
    assert meta is not None and meta.size == 2500
    chunks = await writer.fetch_chunks(meta, 0, 2499, 10)
    assert b"".join(c.data for c in chunks) == data


def _site_file(tmp_path: Path, settings: Settings) -> Path:
    lines = [f"STORAGE_BACKEND = {settings.backend!r}", f"STORAGE_DB = {settings.database!r}"]
    if settings.backend != "sqlite":
        lines += [f"STORAGE_HOST = {settings.host!r}", f"STORAGE_PORT = {settings.port!r}",
                  f"STORAGE_USER = {settings.user!r}", f"STORAGE_PASS = {settings.password!r}"]
    path = tmp_path / "site.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_init_db_command_is_idempotent(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site_file(tmp_path, settings)
    assert main(["init-db", "--site", str(site)]) == 0
    assert main(["init-db", "--site", str(site)]) == 0
    out = capsys.readouterr()
    assert out.out == f"tables ready in {settings.describe()}\n" * 2
    assert out.err == ""
