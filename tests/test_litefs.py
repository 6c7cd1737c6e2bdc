"""SQLite on LiteFS, simulated without FUSE: a read-only database file plus LiteFS's `.primary`.

On a replica LiteFS keeps `.primary` (the primary's hostname) beside the
database and applies the primary's transactions to the file underneath the
processes reading it. Here the file is made read-only (mode 0444) and the
primary's writes come from the test process. Root ignores file modes, so
when the suite runs as root the server process is started without the
capabilities that let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
for it too the file is then read-only, as on a LiteFS replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from serve_image.cli import main
from serve_image.settings import Settings, load_site
from serve_image.storage import DatabaseUnavailable, Layout, make_layout
from tests.helpers import IMG, free_port, md5, payload, store
from tests.live import start_serve, stop, wait_serving

MTIME = 1_700_000_000


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A LiteFS mount directory: the database, the site file beside it."""
    mount = tmp_path / "litefs"
    mount.mkdir()
    site = mount / "site.py"
    # One pooled connection: the one that answered before a change must see it.
    site.write_text('STORAGE_DB = "cluster.db"\nSTORAGE_CHUNK_SIZE = 1000\nSTORAGE_POOL_SIZE = 1\n')
    return site


@pytest.fixture
async def primary(node: Path) -> AsyncIterator[Layout]:
    """The primary's writer (another process, as far as a server subprocess is concerned)."""
    b = make_layout(load_site(str(node)))
    await b.connect()
    await b.create_tables()
    yield b
    await b.close()


def make_replica(site: Path, primary_name: str = "node-a.internal") -> Settings:
    settings = load_site(str(site))
    (site.parent / ".primary").write_text(primary_name + "\n")  # as LiteFS writes it
    db = Path(settings.database)
    if db.exists():
        db.chmod(0o444)
    return settings


def exists(path: str) -> bool:
    return Path(path).exists()


def add_local_copy_dir(site: Path) -> None:
    (site.parent / "www").mkdir()
    site.write_text(site.read_text() + 'LOCAL_COPY_DIR = "www"\n')


async def run_cli(*argv: str) -> int:
    # main() calls asyncio.run(): give it a thread of its own.
    return await asyncio.to_thread(main, list(argv))


async def test_init_db_on_a_replica_names_the_primary(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_replica(node)
    assert await run_cli("init-db", "--site", str(node)) == 1
    assert capsys.readouterr().err == (
        f"serve-image: error: {node}: {settings.database} is a read-only LiteFS replica; "
        "writes go to the primary, node-a.internal: run this command there\n"
    )
    assert not exists(settings.database)  # refused before opening anything


async def test_copy_into_a_replica_names_the_primary(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_replica(node)
    source = tmp_path / "source.py"
    source.write_text('STORAGE_DB = "absent.db"\n')
    assert await run_cli("copy", "--from", str(source), "--to", str(node)) == 1
    assert capsys.readouterr().err == (
        f"serve-image: error: {node}: {settings.database} is a read-only LiteFS replica; "
        "writes go to the primary, node-a.internal: run this command there\n"
    )
    # Refused before either storage is opened.
    assert not exists(settings.database)
    assert not exists(str(tmp_path / "absent.db"))


async def test_init_db_on_the_primary_creates_the_tables(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No `.primary`: this node is the primary (or LiteFS is not in use).
    assert await run_cli("init-db", "--site", str(node)) == 0
    assert capsys.readouterr().out == f"tables ready in sqlite:{node.parent / 'cluster.db'}\n"
    with contextlib.closing(sqlite3.connect(node.parent / "cluster.db")) as db:
        tables = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
        columns = {t: [c[1] for c in db.execute(f"PRAGMA table_info({t})")]
                   for (t,) in tables}
    assert columns == {
        "ezdbfile": ["datatype", "name", "name_trunk", "name_hash", "scope", "size", "mtime",
                     "expired"],
        "ezdbfile_data": ["name_hash", "offset", "filedata"],
    }


async def test_prune_local_runs_on_a_replica(
    node: Path, primary: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every node prunes its own disk, so prune-local only reads the database.
    add_local_copy_dir(node)
    make_replica(node)
    assert await run_cli("prune-local", "--site", str(node)) == 0
    assert capsys.readouterr().out == (
        f"removed 0 local copies, kept 0 (0 bytes) in {node.parent / 'www'}\n"
    )


async def test_the_endpoints_connection_cannot_write(node: Path, primary: Layout) -> None:
    """Read-only by itself: on a file this process may write, the endpoint's connection may not."""
    await store(primary, f"{IMG}/a.jpg", b"kept", mtime=MTIME)
    settings = load_site(str(node))
    assert os.access(settings.database, os.W_OK)  # the refusal below is serve-image's own
    reader = make_layout(settings, readonly=True)
    await reader.connect()
    try:
        meta = await reader.meta(md5(f"{IMG}/a.jpg"))
        with pytest.raises(DatabaseUnavailable, match="attempt to write a readonly database"):
            await reader.driver.execute("DELETE FROM ezdbfile")
    finally:
        await reader.close()
    assert meta is not None and meta.size == 4
    with contextlib.closing(sqlite3.connect(settings.database)) as db:
        assert db.execute("SELECT COUNT(*) FROM ezdbfile").fetchall() == [(1,)]


def without_root_powers() -> list[str]:
    """A command prefix that makes file modes bind a root process too (empty when not root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")  # util-linux
    assert setpriv is not None, "running as root, and no setpriv to drop CAP_DAC_OVERRIDE"
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


@pytest.fixture
def replica_server(node: Path, primary: Layout) -> Iterator[str]:
    """A real `serve-image serve` on the replica's database file, which it cannot write."""
    settings = make_replica(node)
    prefix = without_root_powers()
    # The simulation holds: with the server's privileges the file cannot be opened to write.
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", f"open({settings.database!r}, 'r+b')"],
        capture_output=True, text=True, check=False,
    )
    assert probe.returncode == 1 and "PermissionError" in probe.stderr, probe.stderr
    port = free_port()
    log = node.parent / "server.log"
    proc = start_serve(["serve", "--site", str(node), "--port", str(port),
                        "--log-level", "warning"], log, prefix=prefix)
    try:
        assert wait_serving(proc, port, log) == 200
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


async def test_running_endpoint_serves_a_file_written_after_start_up(
    replica_server: str, primary: Layout
) -> None:
    async with httpx.AsyncClient(base_url=replica_server) as client:
        before = await client.get(f"/{IMG}/new.jpg")
        data = payload(2500, seed=4)
        await store(primary, f"{IMG}/new.jpg", data, mtime=MTIME)
        after = await client.get(f"/{IMG}/new.jpg")
    assert before.status_code == 404
    assert (after.status_code, after.content) == (200, data)


async def test_running_endpoint_serves_the_new_version_of_a_replaced_file(
    replica_server: str, primary: Layout
) -> None:
    async with httpx.AsyncClient(base_url=replica_server) as client:
        await store(primary, f"{IMG}/a.jpg", payload(800, seed=1), mtime=MTIME)
        first = await client.get(f"/{IMG}/a.jpg")
        new = payload(1900, seed=2)
        await store(primary, f"{IMG}/a.jpg", new, mtime=MTIME + 60)
        second = await client.get(f"/{IMG}/a.jpg")
    assert (first.status_code, len(first.content)) == (200, 800)
    assert (second.status_code, second.content) == (200, new)
    assert second.headers["last-modified"] == "Tue, 14 Nov 2023 22:14:20 GMT"
