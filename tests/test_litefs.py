"""SQLite on LiteFS, simulated without FUSE: a read-only database file plus LiteFS's `.primary`.

On a replica LiteFS keeps `.primary` (the primary's hostname) beside the
database and applies the primary's transactions to the file underneath the
processes reading it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from serve_image.cli import main
from serve_image.settings import Settings, load_site
from serve_image.storage import DatabaseUnavailable, Layout, make_layout
from tests.helpers import IMG, free_port, payload, store

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


async def test_init_db_on_the_primary_creates_the_tables(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No `.primary`: this node is the primary (or LiteFS is not in use).
    assert await run_cli("init-db", "--site", str(node)) == 0
    assert capsys.readouterr().out == f"tables ready in sqlite:{node.parent / 'cluster.db'}\n"


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
    reader = make_layout(make_replica(node), readonly=True)
    await reader.connect()
    try:
        with pytest.raises(DatabaseUnavailable, match="attempt to write a readonly database"):
            await reader.driver.execute("DELETE FROM ezdbfile")
    finally:
        await reader.close()


@pytest.fixture
def replica_server(node: Path, primary: Layout) -> Iterator[str]:
    """A real `serve-image serve` on the replica's read-only database file."""
    make_replica(node)
    port = free_port()
    log = node.parent / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve_image", "serve", "--site", str(node),
             "--port", str(port), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/-/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"server did not start: {log.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


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
