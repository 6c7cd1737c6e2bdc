"""PostgreSQL with asyncpg: the cluster tables with `bytea` chunks."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg

from serve_image.backends import sql
from serve_image.backends.base import Backend, Chunk, FileMeta, name_hash
from serve_image.failover import Failover, HostPool
from serve_image.settings import Settings, StorageHost

DDL = (
    """CREATE TABLE IF NOT EXISTS ezdbfile (
  datatype   VARCHAR(255) NOT NULL DEFAULT 'application/octet-stream',
  name       TEXT         NOT NULL,
  name_trunk TEXT         NOT NULL,
  name_hash  VARCHAR(34)  NOT NULL PRIMARY KEY,
  scope      VARCHAR(20)  NOT NULL DEFAULT '',
  size       BIGINT       NOT NULL,
  mtime      INTEGER      NOT NULL DEFAULT 0,
  expired    BOOLEAN      NOT NULL DEFAULT FALSE
)""",
    "CREATE INDEX IF NOT EXISTS ezdbfile_name ON ezdbfile (name)",
    "CREATE INDEX IF NOT EXISTS ezdbfile_name_trunk ON ezdbfile (name_trunk)",
    "CREATE INDEX IF NOT EXISTS ezdbfile_mtime ON ezdbfile (mtime)",
    "CREATE INDEX IF NOT EXISTS ezdbfile_expired_name ON ezdbfile (expired, name)",
    """CREATE TABLE IF NOT EXISTS ezdbfile_data (
  name_hash VARCHAR(34) NOT NULL REFERENCES ezdbfile (name_hash) ON DELETE CASCADE,
  "offset"  BIGINT      NOT NULL,
  filedata  BYTEA       NOT NULL,
  PRIMARY KEY (name_hash, "offset")
)""",
    # Images are compressed already: don't spend CPU trying again on TOAST.
    'ALTER TABLE ezdbfile_data ALTER COLUMN filedata SET STORAGE EXTERNAL',
)

META = sql.to_pgsql(sql.META)
FIRST = sql.to_pgsql(sql.FIRST)
CHUNKS = sql.to_pgsql(sql.CHUNKS)
logger = logging.getLogger("serve_image.backend")
# InternalClientError: an idle pooled connection whose server was terminated
# can be handed out before asyncpg notices it is gone ("cannot switch to
# state 15; another operation (2) is in progress"): a broken connection too.
_DRIVER_ERRORS = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
    TimeoutError,
)
# The server refused the statement (a value too long, a constraint): the
# connection is fine, and an import reports the file and goes on.
_STATEMENT_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


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


class PostgresBackend(Backend):
    ddl: tuple[str, ...] = DDL  # the tables of this layout, created by create_tables

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failover: Failover[asyncpg.Connection] = Failover(
            self.settings, [_HostPool(self.settings, h) for h in self.settings.hosts],
            _DRIVER_ERRORS, _STATEMENT_ERRORS,
        )

    async def connect(self) -> None:
        await self.failover.open()

    async def close(self) -> None:
        await self.failover.close()

    def _conn(
        self, doing: str, *, bounded: bool = False
    ) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self.failover.connection(doing, bounded=bounded)

    async def fetch_meta(self, name_hash: str) -> FileMeta | None:
        # Before any byte is sent: a killed connection is worth one more try.
        row = await self.failover.read("fetch_meta", lambda c: c.fetchrow(META, name_hash))
        return None if row is None else FileMeta(name_hash, row[0], row[1], row[2], row[3])

    async def fetch_first(self, name_hash: str) -> tuple[FileMeta, bytes | None] | None:
        row = await self.failover.read("fetch_first", lambda c: c.fetchrow(FIRST, name_hash))
        if row is None:
            return None
        return FileMeta(name_hash, row[0], row[1], row[2], row[3]), row[4]

    async def fetch_chunks(self, meta: FileMeta, start: int, end: int, limit: int) -> list[Chunk]:
        args = sql.chunk_args(meta.mtime, meta.size, meta.name_hash, start, end, limit)
        async with self._conn("fetch_chunks", bounded=True) as conn:
            rows = await conn.fetch(CHUNKS, *args)
        return [Chunk(o, d) for o, d in rows]

    async def create_tables(self) -> None:
        async with self._conn("create_tables") as conn:
            for stmt in self.ddl:
                await conn.execute(stmt)

    async def store(
        self, name: str, chunks: Iterable[bytes], *, size: int, mtime: int,
        datatype: str, scope: str,
    ) -> None:
        key = name_hash(name)
        async with self._conn("store") as conn, conn.transaction():
            await conn.execute(sql.to_pgsql(sql.DELETE_FILE), key)
            await conn.execute(
                sql.to_pgsql(sql.INSERT_FILE),
                datatype, name, name, key, scope, size, mtime, False,
            )
            offset = 0
            insert = sql.to_pgsql(sql.INSERT_CHUNK)
            for data in chunks:
                await conn.execute(insert, key, offset, data)
                offset += len(data)
            if offset != size:
                raise ValueError(f"{name}: read {offset} bytes, expected {size}")

    async def execute(self, statement: str, *args: object) -> None:
        async with self._conn("execute") as conn:
            await conn.execute(sql.to_pgsql(statement), *args)

    async def query(self, statement: str, *args: object) -> list[tuple[Any, ...]]:
        async def rows(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in await conn.fetch(sql.to_pgsql(statement), *args)]

        # A SELECT (batched small-file reads among them): idempotent, so a
        # killed connection is worth one more try on a fresh one.
        return await self.failover.read("query", rows)

    async def update(self, statement: str, *args: object) -> int:
        async with self._conn("update") as conn:
            status: str = await conn.execute(sql.to_pgsql(statement), *args)
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE 3", "DELETE 3"
