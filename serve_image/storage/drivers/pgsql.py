"""PostgreSQL with asyncpg."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from itertools import count

import asyncpg

from serve_image.settings import Settings, StorageHost
from serve_image.storage.drivers.base import Row
from serve_image.storage.drivers.failover import HostPool
from serve_image.storage.drivers.pooled import Errors, PooledDriver

logger = logging.getLogger("serve_image.storage")

# InternalClientError: an idle pooled connection whose server was terminated
# can be handed out before asyncpg notices it is gone ("cannot switch to
# state 15; another operation (2) is in progress"): a broken connection too.
_DRIVER_ERRORS: Errors = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
    TimeoutError,
)
# The server refused the statement (a value too long, a constraint): the
# connection is fine, and an import reports the file and goes on.
_STATEMENT_ERRORS: Errors = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
_PLACEHOLDER = re.compile(r"\?")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on every release to the pool.

    By default asyncpg sends `SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` each time a connection goes back to the pool: a
    second round trip for every query. serve-image never sets session state
    (no SET, LISTEN, advisory locks or cursors outside a transaction), and
    asyncpg still rolls back a transaction left open before calling this.
    """


class _HostPool(HostPool[asyncpg.Connection]):
    """An asyncpg pool to one server of STORAGE_HOSTS.

    One pool per server rather than asyncpg's multi-host connect: a pool
    given several hosts keeps its connections on whichever server answered
    when each was opened, so after a failover it stays pinned to the standby
    (or, worse, to a dead primary's address) until the connections age out.
    Here every server has its own pool, health and metrics, and reads go
    back to the first server as soon as it answers.
    """

    def __init__(self, settings: Settings, address: StorageHost) -> None:
        super().__init__(address)
        self.settings = settings
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        s, a = self.settings, self.address
        # min_size 0: start-up never fails because the database is down.
        self._pool = await asyncpg.create_pool(
            host=a.socket or a.host, port=a.port, user=s.user or None,
            password=s.password or None, database=s.database, min_size=0,
            max_size=s.pool_size, timeout=s.connect_timeout,
            max_inactive_connection_lifetime=300.0, reset=_keep_session,
        )

    async def acquire(self, wait: float) -> asyncpg.Connection:
        assert self._pool is not None
        # asyncpg reconnects a pooled connection whose server hung up here.
        conn: asyncpg.Connection = await self._pool.acquire(timeout=wait)
        return conn

    async def release(self, conn: asyncpg.Connection, broken: bool) -> None:
        assert self._pool is not None
        if broken:
            try:
                conn.terminate()  # never reused; the pool opens a new one when needed
            except asyncpg.InterfaceError:
                pass  # the pool took it back already when the server closed it
        try:
            await self._pool.release(conn)  # does nothing for one released already
        except _DRIVER_ERRORS as e:
            # Resetting it failed: the server went away after the query
            # answered. asyncpg has terminated it; the result stands.
            logger.debug("%s: connection dropped on release: %r", self.address.label, e)

    def exhausted(self) -> bool:
        p = self._pool
        return p is not None and p.get_idle_size() == 0 and p.get_size() >= p.get_max_size()

    def in_use(self) -> int:
        return 0 if self._pool is None else self._pool.get_size() - self._pool.get_idle_size()

    async def ping(self, conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT 1")

    async def drop_idle(self) -> None:
        if self._pool is not None:
            await self._pool.expire_connections()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class PostgresDriver(PooledDriver[asyncpg.Connection]):
    name = "pgsql"

    def errors(self) -> tuple[Errors, Errors]:
        return _DRIVER_ERRORS, _STATEMENT_ERRORS

    def host_pool(self, address: StorageHost) -> HostPool[asyncpg.Connection]:
        return _HostPool(self.settings, address)

    def convert(self, statement: str) -> str:
        numbers = count(1)
        return _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", statement)

    async def run_fetch(
        self, conn: asyncpg.Connection, statement: str, args: Sequence[object]
    ) -> list[Row]:
        rows: list[Row] = await conn.fetch(statement, *args)
        return rows

    async def run_execute(
        self, conn: asyncpg.Connection, statement: str, args: Sequence[object]
    ) -> int:
        status: str = await conn.execute(statement, *args)
        # "UPDATE 3", "DELETE 3", "INSERT 0 3"; "CREATE TABLE" changes no row.
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def run_executemany(
        self, conn: asyncpg.Connection, statement: str, rows: Iterable[Sequence[object]]
    ) -> None:
        await conn.executemany(statement, rows)

    @asynccontextmanager
    async def begin(self, conn: asyncpg.Connection) -> AsyncIterator[None]:
        async with conn.transaction():
            yield

    async def table_names(self) -> set[str]:
        rows = await self.fetch(
            "SELECT LOWER(tablename) FROM pg_tables WHERE schemaname = current_schema()"
        )
        return {r[0] for r in rows}
