"""STORAGE_DRIVER = "aiomysql": the same reads, writes and failures as with asyncmy.

asyncmy is the default driver, so every other MySQL test runs on it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serve_image.app import ServeImage
from serve_image.settings import Settings, SiteConfigError, settings_from_mapping
from serve_image.storage import Layout, make_layout
from tests.conftest import DatabaseFactory
from tests.helpers import IMG, free_port, payload, running, store

pytestmark = pytest.mark.mysql


@pytest.fixture
async def aiomysql_site(databases: DatabaseFactory) -> AsyncIterator[tuple[Settings, Layout]]:
    settings = await databases.settings("mysql", STORAGE_DRIVER="aiomysql", STORAGE_CHUNK_SIZE=1000)
    writer = make_layout(settings)
    await writer.connect()
    await writer.create_tables()
    yield settings, writer
    await writer.close()


@pytest.fixture
async def client(aiomysql_site: tuple[Settings, Layout]) -> AsyncIterator[httpx.AsyncClient]:
    async with running(ServeImage(aiomysql_site[0])) as c:
        yield c


async def test_files_of_one_and_of_many_chunks_are_served_whole(
    aiomysql_site: tuple[Settings, Layout], client: httpx.AsyncClient
) -> None:
    writer = aiomysql_site[1]
    small, large = payload(700, seed=1), payload(5500, seed=2)
    await store(writer, f"{IMG}/small.jpg", small)
    await store(writer, f"{IMG}/large.jpg", large)
    r1 = await client.get(f"/{IMG}/small.jpg")
    r2 = await client.get(f"/{IMG}/large.jpg")
    assert (r1.status_code, r1.content) == (200, small)
    assert (r2.status_code, r2.content, r2.headers["content-length"]) == (200, large, "5500")


async def test_a_range_reads_only_its_bytes(
    aiomysql_site: tuple[Settings, Layout], client: httpx.AsyncClient
) -> None:
    data = payload(5500, seed=3)
    await store(aiomysql_site[1], f"{IMG}/r.jpg", data)
    r = await client.get(f"/{IMG}/r.jpg", headers={"range": "bytes=1500-2600"})
    assert r.status_code == 206
    assert r.headers["content-range"] == "bytes 1500-2600/5500"
    assert r.content == data[1500:2601]


async def test_missing_file_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"/{IMG}/none.jpg")).status_code == 404


async def test_unreachable_server_is_a_fast_503() -> None:
    settings = settings_from_mapping(
        {"STORAGE_BACKEND": "mysql", "STORAGE_DRIVER": "aiomysql", "STORAGE_PORT": free_port(),
         "STORAGE_DB": "x", "STORAGE_CONNECT_TIMEOUT": 1},
        "<test>", "test",
    )
    async with running(ServeImage(settings)) as c:
        r = await c.get(f"/{IMG}/a.jpg")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"STORAGE_BACKEND": "pgsql", "STORAGE_DRIVER": "asyncmy"},
         "sites/x.py: STORAGE_DRIVER is for STORAGE_BACKEND 'mysql', not 'pgsql'"),
        ({"STORAGE_BACKEND": "mysql", "STORAGE_DRIVER": "mysqlclient"},
         "sites/x.py: STORAGE_DRIVER must be one of 'aiomysql', 'asyncmy', not 'mysqlclient'"),
    ],
)
def test_driver_setting_is_checked(values: dict[str, object], message: str) -> None:
    with pytest.raises(SiteConfigError) as e:
        settings_from_mapping({**values, "STORAGE_DB": "x"}, "sites/x.py")
    assert str(e.value) == message


def test_driver_defaults_to_asyncmy() -> None:
    s = settings_from_mapping({"STORAGE_BACKEND": "mysql", "STORAGE_DB": "x"}, "sites/x.py")
    assert s.driver == "asyncmy"


@pytest.mark.parametrize("driver", [None, "aiomysql", "asyncmy"])
async def test_connections_come_from_the_chosen_driver(
    databases: DatabaseFactory, driver: str | None
) -> None:
    extra = {} if driver is None else {"STORAGE_DRIVER": driver}
    backend = make_layout(await databases.settings("mysql", **extra))
    await backend.connect()
    try:
        async with backend.driver.failover.connection("test") as conn:  # type: ignore[attr-defined]
            module = type(conn).__module__.split(".")[0]
    finally:
        await backend.close()
    assert module == (driver or "asyncmy")


async def test_the_default_driver_needs_neither_aiomysql_nor_pymysql(
    databases: DatabaseFactory, tmp_path: Path
) -> None:
    """asyncmy's install must not need PyMySQL < 1.2: aiomysql's modules are never imported."""
    site = tmp_path / "plain.py"
    constants = await databases.constants("mysql")
    site.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    code = (
        "import asyncio, sys\n"
        "from serve_image.settings import load_site\n"
        "from serve_image.storage import make_layout\n"
        "async def main():\n"
        "    layout = make_layout(load_site(sys.argv[1]))\n"
        "    await layout.connect()\n"
        "    await layout.create_tables()\n"
        "    await layout.ping()\n"
        "    await layout.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiomysql', 'pymysql')))\n"
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code, str(site)], capture_output=True, text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "[]\n", "")
