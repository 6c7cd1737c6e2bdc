"""What the server drivers (MySQL, PostgreSQL) share: a pool per server, failover, statements
converted once."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar

from serve_image.settings import Settings, StorageHost
from serve_image.storage.drivers.base import Driver, DriverObserver, Row
from serve_image.storage.drivers.failover import Failover, HostPool

C = TypeVar("C")
Errors = tuple[type[BaseException], ...]


class PooledDriver(Driver, Generic[C]):
    """A database server reached over connections pooled per server of STORAGE_HOSTS."""

    def __init__(self, settings: Settings, *, readonly: bool = False) -> None:
        super().__init__(settings, readonly=readonly)
        errors, statement_errors = self.errors()
        self.failover: Failover[C] = Failover(
            settings, [self.host_pool(h) for h in settings.hosts], errors, statement_errors,
        )
        self._converted: dict[str, str] = {}

    # -- what each driver supplies ------------------------------------------
    @abc.abstractmethod
    def errors(self) -> tuple[Errors, Errors]:
        """The driver's errors, and those of them that are a statement's, not the connection's."""

    @abc.abstractmethod
    def host_pool(self, address: StorageHost) -> HostPool[C]:
        """A pool to one server."""

    @abc.abstractmethod
    def convert(self, statement: str) -> str:
        """A statement in the neutral dialect (`?`, `"offset"`) in this database's own."""

    @abc.abstractmethod
    async def run_fetch(self, conn: C, statement: str, args: Sequence[object]) -> list[Row]: ...

    @abc.abstractmethod
    async def run_execute(self, conn: C, statement: str, args: Sequence[object]) -> int: ...

    @abc.abstractmethod
    async def run_executemany(
        self, conn: C, statement: str, rows: Iterable[Sequence[object]]
    ) -> None: ...

    @abc.abstractmethod
    def begin(self, conn: C) -> AbstractAsyncContextManager[None]:
        """Commit on a clean exit, roll back on any exception."""

    # -- the Driver interface -----------------------------------------------
    def sql(self, statement: str) -> str:
        # Converted the first time only: statements are a few constants.
        converted = self._converted.get(statement)
        if converted is None:
            converted = self._converted[statement] = self.convert(statement)
        return converted

    async def connect(self) -> None:
        await self.failover.open()

    async def close(self) -> None:
        await self.failover.close()

    async def fetch(self, statement: str, *args: object, retry: bool = True) -> list[Row]:
        sql = self.sql(statement)
        if retry:
            # Idempotent: a killed connection is worth one more try on a fresh one.
            return await self.failover.read("query", lambda c: self.run_fetch(c, sql, args))
        async with self.failover.connection("query", bounded=True) as conn:
            return await self.run_fetch(conn, sql, args)

    async def execute(self, statement: str, *args: object) -> int:
        async with self.failover.connection("update") as conn:
            return await self.run_execute(conn, self.sql(statement), args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Transaction[C]]:
        async with self.failover.connection("write") as conn, self.begin(conn):
            yield _Transaction(self, conn)

    def status(self) -> list[tuple[str, bool]]:
        return self.failover.status()

    def observe(self, observer: DriverObserver) -> None:
        self.failover.observer = observer


class _Transaction(Generic[C]):
    def __init__(self, driver: PooledDriver[C], conn: C) -> None:
        self.driver = driver
        self.conn = conn

    async def fetch(self, statement: str, *args: object) -> list[Row]:
        return await self.driver.run_fetch(self.conn, self.driver.sql(statement), args)

    async def execute(self, statement: str, *args: object) -> int:
        return await self.driver.run_execute(self.conn, self.driver.sql(statement), args)

    async def executemany(self, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.driver.run_executemany(self.conn, self.driver.sql(statement), rows)
