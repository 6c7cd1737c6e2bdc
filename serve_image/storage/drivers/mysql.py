"""MySQL / MariaDB with asyncmy (the default) or aiomysql (STORAGE_DRIVER)."""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from serve_image.settings import Settings, StorageHost
from serve_image.storage.drivers.base import Row
from serve_image.storage.drivers.failover import HostPool
from serve_image.storage.drivers.pooled import Errors, PooledDriver
from serve_image.storage.errors import DriverMissing

_QUOTED = re.compile(r'"(\w+)"')
# Prepared statements kept per connection (asyncmy): the endpoint's reads are
# a handful, the batched ones in seven sizes (batching.py, rows.padded).
STATEMENT_CACHE = 64
# Network failures look the same under both drivers.
_NETWORK_ERRORS: Errors = (OSError, TimeoutError, ConnectionError)


def _driver_module(settings: Settings) -> tuple[Any, Errors, Errors]:
    """STORAGE_DRIVER's module (asyncmy or aiomysql: the same pool API), its errors,
    and those of them that are a statement's (a value too long, a duplicate key).

    Only the chosen driver is imported: aiomysql needs PyMySQL < 1.2
    (aio-libs/aiomysql#1080), which an asyncmy install must not require.
    """
    name = settings.driver
    try:
        module = importlib.import_module(name)
        errors = importlib.import_module("pymysql.err" if name == "aiomysql" else "asyncmy.errors")
    except ImportError:
        extra = "mysql" if name == "asyncmy" else "aiomysql"
        raise DriverMissing(
            f"{settings.source}: STORAGE_DRIVER {name!r} is not installed: "
            f"pip install 'serve-image[{extra}]'"
        ) from None
    return (
        module, (errors.MySQLError, *_NETWORK_ERRORS), (errors.DataError, errors.IntegrityError),
    )


class _HostPool(HostPool[Any]):
    """A pool to one server of STORAGE_HOSTS."""

    def __init__(self, settings: Settings, address: StorageHost, module: Any) -> None:
        super().__init__(address)
        self.settings = settings
        self.module = module
        # asyncmy runs a statement it has seen as a server-side prepared
        # statement (binary protocol): the server parses it once per
        # connection, and the bytes come back without escaping. The endpoint
        # sends a few statements only (bench/README.md has what it saves).
        self.options = {"stmt_cache_size": STATEMENT_CACHE} if module.__name__ == "asyncmy" else {}
        self._pool: Any = None

    async def open(self) -> None:
        s, a = self.settings, self.address
        target: dict[str, Any] = (
            {"unix_socket": a.socket} if a.socket else {"host": a.host, "port": a.port}
        )
        # minsize 0: start-up never fails because the database is down; the
        # endpoint answers 503 until it is back. autocommit: every read sees
        # the latest committed version, not a snapshot pinned by a pooled
        # connection's open transaction.
        self._pool = await self.module.create_pool(
            minsize=0, maxsize=s.pool_size, user=s.user, password=s.password, db=s.database,
            charset=s.charset, autocommit=True, connect_timeout=s.connect_timeout,
            pool_recycle=3600, **target, **self.options,
        )

    async def acquire(self, wait: float) -> Any:
        # The pool drops idle connections whose server hung up (EOF) here.
        return await asyncio.wait_for(self._pool.acquire(), wait)

    async def release(self, conn: Any, broken: bool) -> None:
        if broken:
            conn.close()  # a broken connection must not go back to the pool
        self._pool.release(conn)

    def exhausted(self) -> bool:
        p = self._pool
        return p is not None and p.freesize == 0 and p.size >= p.maxsize

    def in_use(self) -> int:
        return 0 if self._pool is None else int(self._pool.size - self._pool.freesize)

    async def ping(self, conn: Any) -> None:
        async with conn.cursor() as cur:
            await cur.execute("SELECT 1")

    async def drop_idle(self) -> None:
        if self._pool is not None:
            await self._pool.clear()

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()
            self._pool = None


class MySQLDriver(PooledDriver[Any]):
    name = "mysql"

    def __init__(self, settings: Settings, *, readonly: bool = False) -> None:
        self.module, self._errors, self._statement_errors = _driver_module(settings)
        super().__init__(settings, readonly=readonly)

    def errors(self) -> tuple[Errors, Errors]:
        return self._errors, self._statement_errors

    def host_pool(self, address: StorageHost) -> HostPool[Any]:
        return _HostPool(self.settings, address, self.module)

    def convert(self, statement: str) -> str:
        # Both drivers use %s placeholders and %-format the statement.
        return _QUOTED.sub(r"`\1`", statement.replace("%", "%%")).replace("?", "%s")

    async def run_fetch(self, conn: Any, statement: str, args: Sequence[object]) -> list[Row]:
        async with conn.cursor() as cur:
            await cur.execute(statement, args)
            return list(await cur.fetchall())

    async def run_execute(self, conn: Any, statement: str, args: Sequence[object]) -> int:
        async with conn.cursor() as cur:
            return int(await cur.execute(statement, args))

    async def run_executemany(
        self, conn: Any, statement: str, rows: Iterable[Sequence[object]]
    ) -> None:
        async with conn.cursor() as cur:
            # An INSERT ... VALUES is sent as multi-row INSERTs, not a round trip per row.
            await cur.executemany(statement, list(rows))

    @asynccontextmanager
    async def begin(self, conn: Any) -> AsyncIterator[None]:
        async with conn.cursor() as cur:
            # REPEATABLE READ's gap locks make two stores of new names (DELETE
            # of an absent key, then INSERT) deadlock each other under
            # `import --jobs`; READ COMMITTED takes no gap locks. Applies to
            # the next transaction only.
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        await conn.begin()
        try:
            yield
        except BaseException:
            await conn.rollback()
            raise
        await conn.commit()

    async def table_names(self) -> set[str]:
        rows = await self.fetch(
            "SELECT LOWER(table_name) FROM information_schema.tables "
            "WHERE table_schema = DATABASE()"
        )
        return {r[0] for r in rows}
