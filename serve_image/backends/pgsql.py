"""PostgreSQL with asyncpg: the cluster tables with `bytea` chunks."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from serve_image.backends import sql
from serve_image.backends.base import Backend, Chunk, FileMeta
from serve_image.errors import DatabaseUnavailable

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
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresBackend(Backend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> None:
        s = self.settings
        # min_size 0: start-up never fails because the database is down.
        self._pool = await asyncpg.create_pool(
            host=s.socket or s.host, port=s.port, user=s.user or None,
            password=s.password or None, database=s.database, min_size=0,
            max_size=s.pool_size, timeout=s.connect_timeout,
            max_inactive_connection_lifetime=300.0,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def _conn(self, doing: str) -> AsyncIterator[asyncpg.Connection]:
        self.check_breaker()
        if self._pool is None:
            raise DatabaseUnavailable(f"{self.settings.describe()}: not connected")
        try:
            async with self._pool.acquire(timeout=self.settings.acquire_timeout) as conn:
                yield conn
        except TimeoutError:
            raise DatabaseUnavailable(f"{self.settings.describe()}: no free connection") from None
        except _DRIVER_ERRORS as e:
            raise self.unavailable(e, doing) from None

    async def fetch_meta(self, name_hash: str) -> FileMeta | None:
        async with self._conn("fetch_meta") as conn:
            row = await conn.fetchrow(META, name_hash)
        return None if row is None else FileMeta(name_hash, row[0], row[1], row[2], row[3])

    async def fetch_first(self, name_hash: str) -> tuple[FileMeta, bytes | None] | None:
        async with self._conn("fetch_first") as conn:
            row = await conn.fetchrow(FIRST, name_hash)
        if row is None:
            return None
        return FileMeta(name_hash, row[0], row[1], row[2], row[3]), row[4]

    async def fetch_chunks(self, meta: FileMeta, start: int, end: int, limit: int) -> list[Chunk]:
        args = sql.chunk_args(meta.mtime, meta.size, meta.name_hash, start, end, limit)
        async with self._conn("fetch_chunks") as conn:
            rows = await conn.fetch(CHUNKS, *args)
        return [Chunk(o, d) for o, d in rows]

    async def create_tables(self) -> None:
        async with self._conn("create_tables") as conn:
            for stmt in DDL:
                await conn.execute(stmt)

    async def store(
        self, name: str, chunks: Iterable[bytes], *, size: int, mtime: int,
        datatype: str, scope: str,
    ) -> None:
        name_hash = hashlib.md5(name.encode("utf-8")).hexdigest()
        async with self._conn("store") as conn, conn.transaction():
            await conn.execute(sql.to_pgsql(sql.DELETE_FILE), name_hash)
            await conn.execute(
                sql.to_pgsql(sql.INSERT_FILE),
                datatype, name, name, name_hash, scope, size, mtime, False,
            )
            offset = 0
            insert = sql.to_pgsql(sql.INSERT_CHUNK)
            for data in chunks:
                await conn.execute(insert, name_hash, offset, data)
                offset += len(data)
            if offset != size:
                raise ValueError(f"{name}: read {offset} bytes, expected {size}")

    async def execute(self, statement: str, *args: object) -> None:
        async with self._conn("execute") as conn:
            await conn.execute(sql.to_pgsql(statement), *args)
