"""Fixtures: real SQLite, MariaDB and PostgreSQL, each test session on databases of its own.

DSNs come from SERVE_IMAGE_TEST_MYSQL and SERVE_IMAGE_TEST_PGSQL (defaults:
this machine's servers). A missing server skips its tests, except with
CI=true, where it fails them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_image.app import ServeImage
from serve_image.settings import Settings, settings_from_mapping
from serve_image.storage import Layout, make_layout
from tests.helpers import SpyLayout
from tests.servers import create_database as _create_database
from tests.servers import drop_database as _drop_database
from tests.servers import server_constants as _server_constants
from tests.system import skip_summary, unavailable

BACKENDS = ["sqlite", "mysql", "pgsql"]
RUN_ID = f"si_test_{os.getpid()}_{secrets.token_hex(3)}"


def server_missing(what: str, error: BaseException) -> None:
    unavailable(f"{what} is not reachable ({type(error).__name__}: {error})")


def pytest_unconfigure(config: pytest.Config) -> None:
    """After pytest's own summary: each group of skipped tests, and what would run them."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skips = [
        (report.nodeid.split("::")[0], str(report.longrepr[2]).removeprefix("Skipped: "))
        for report in reporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple)
    ]
    lines = skip_summary(skips)
    if lines:
        reporter.write_sep("=", "skipped")
        for line in lines:
            reporter.write_line(line)


class DatabaseFactory:
    """Creates uniquely named databases on a server and drops them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.created: list[tuple[str, str]] = []
        self.count = 0

    async def constants(self, backend: str, **extra: Any) -> dict[str, Any]:
        self.count += 1
        name = f"{RUN_ID}_{self.count}"
        if backend == "sqlite":
            values: dict[str, Any] = {"STORAGE_BACKEND": "sqlite",
                                      "STORAGE_DB": str(self.tmp / f"{name}.sqlite")}
        else:
            try:
                await asyncio.wait_for(_create_database(backend, name), 10)
            except Exception as e:  # any failure to reach the server
                server_missing(backend, e)
            self.created.append((backend, name))
            values = {**_server_constants(backend), "STORAGE_DB": name}
        values.update(extra)
        return values

    async def settings(self, backend: str, **extra: Any) -> Settings:
        values = await self.constants(backend, **extra)
        return settings_from_mapping(values, f"<test {backend}>", "test")

    async def drop_all(self) -> None:
        for backend, name in self.created:
            await _drop_database(backend, name)


@pytest.fixture(scope="session")
async def databases(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(tmp_path_factory.mktemp("sqlite"))
    yield factory
    await factory.drop_all()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_shared: dict[str, Settings] = {}


@pytest.fixture
async def settings(databases: DatabaseFactory, backend_name: str) -> Settings:
    """One database per backend for the session, emptied before each test."""
    if backend_name not in _shared:
        _shared[backend_name] = await databases.settings(backend_name, STORAGE_CHUNK_SIZE=1000)
        b = make_layout(_shared[backend_name])
        await b.connect()
        await b.create_tables()
        await b.close()
    s = _shared[backend_name]
    b = make_layout(s)
    await b.connect()
    await b.driver.execute("DELETE FROM ezdbfile_data")
    await b.driver.execute("DELETE FROM ezdbfile")
    await b.close()
    return s


@pytest.fixture
async def writer(settings: Settings) -> AsyncIterator[Layout]:
    """A connected read-write backend for the test's own rows."""
    b = make_layout(settings)
    await b.connect()
    yield b
    await b.close()


@pytest.fixture
async def spy(settings: Settings) -> AsyncIterator[SpyLayout]:
    b = SpyLayout(make_layout(settings, readonly=True))
    yield b


@pytest.fixture
async def app(settings: Settings, spy: SpyLayout) -> AsyncIterator[ServeImage]:
    a = ServeImage(settings, layout=spy)
    await a.startup()
    yield a
    await a.shutdown()


@pytest.fixture
async def client(app: ServeImage) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
def repo_root() -> Iterator[Path]:
    yield Path(__file__).resolve().parent.parent
