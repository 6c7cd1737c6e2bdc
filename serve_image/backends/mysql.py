"""MySQL / MariaDB with aiomysql: the tables real eZ Publish clusters have."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import aiomysql
import pymysql

from serve_image.backends import sql
from serve_image.backends.base import Backend, Chunk, FileMeta
from serve_image.errors import DatabaseUnavailable

# eZ Publish 3.10-4.6 `kernel/sql/mysql/cluster_schema.sql`, with `offset`
# quoted (a reserved word since MariaDB 10.6) and datatype VARCHAR(255) as
# eZ 4.7 widened it. Pointing serve-image at an existing eZ cluster database
# finds exactly these tables; CREATE TABLE IF NOT EXISTS leaves them alone.
DDL = (
    """CREATE TABLE IF NOT EXISTS ezdbfile (
  datatype      VARCHAR(255)  NOT NULL DEFAULT 'application/octet-stream',
  name          TEXT          NOT NULL,
  name_trunk    TEXT          NOT NULL,
  name_hash     VARCHAR(34)   NOT NULL DEFAULT '',
  scope         VARCHAR(20)   NOT NULL DEFAULT '',
  size          BIGINT(20)    UNSIGNED NOT NULL,
  mtime         INT(11)       NOT NULL DEFAULT '0',
  expired       BOOL          NOT NULL DEFAULT '0',
  PRIMARY KEY (name_hash),
  INDEX ezdbfile_name (name(250)),
  INDEX ezdbfile_name_trunk (name_trunk(250)),
  INDEX ezdbfile_mtime (mtime),
  INDEX ezdbfile_expired_name (expired, name(250))
) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS ezdbfile_data (
  name_hash VARCHAR(34)      NOT NULL DEFAULT '',
  `offset`  INT(11) UNSIGNED NOT NULL,
  filedata  BLOB             NOT NULL,
  PRIMARY KEY (name_hash, `offset`),
  CONSTRAINT ezdbfile_fk1 FOREIGN KEY (name_hash) REFERENCES ezdbfile (name_hash) ON DELETE CASCADE
) ENGINE=InnoDB""",
)

META = sql.to_mysql(sql.META)
FIRST = sql.to_mysql(sql.FIRST)
CHUNKS = sql.to_mysql(sql.CHUNKS)
_DRIVER_ERRORS = (pymysql.err.MySQLError, OSError, TimeoutError, ConnectionError)


class MySQLBackend(Backend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool: aiomysql.Pool | None = None

    async def connect(self) -> None:
        s = self.settings
        target: dict[str, Any] = (
            {"unix_socket": s.socket} if s.socket else {"host": s.host, "port": s.port}
        )
        # minsize 0: start-up never fails because the database is down; the
        # endpoint answers 503 until it is back. autocommit: every read sees
        # the latest committed version, not a snapshot pinned by a pooled
        # connection's open transaction.
        self._pool = await aiomysql.create_pool(
            minsize=0, maxsize=s.pool_size, user=s.user, password=s.password, db=s.database,
            charset=s.charset, autocommit=True, connect_timeout=s.connect_timeout,
            pool_recycle=3600, **target,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()
            self._pool = None

    @asynccontextmanager
    async def _cursor(self, doing: str) -> AsyncIterator[aiomysql.Cursor]:
        self.check_breaker()
        if self._pool is None:
            raise DatabaseUnavailable(f"{self.settings.describe()}: not connected")
        try:
            conn = await asyncio.wait_for(self._pool.acquire(), self.settings.acquire_timeout)
        except TimeoutError:
            raise DatabaseUnavailable(f"{self.settings.describe()}: no free connection") from None
        except _DRIVER_ERRORS as e:
            raise self.unavailable(e, doing) from None
        try:
            async with conn.cursor() as cur:
                yield cur
        except _DRIVER_ERRORS as e:
            # A broken connection must not go back to the pool for reuse.
            conn.close()
            raise self.unavailable(e, doing) from None
        finally:
            self._pool.release(conn)

    async def _fetchone(self, doing: str, statement: str, args: tuple[Any, ...]) -> Any:
        async with self._cursor(doing) as cur:
            await cur.execute(statement, args)
            return await cur.fetchone()

    async def fetch_meta(self, name_hash: str) -> FileMeta | None:
        row = await self._fetchone("fetch_meta", META, (name_hash,))
        return None if row is None else FileMeta(name_hash, row[0], row[1], row[2], bool(row[3]))

    async def fetch_first(self, name_hash: str) -> tuple[FileMeta, bytes | None] | None:
        row = await self._fetchone("fetch_first", FIRST, (name_hash,))
        if row is None:
            return None
        return FileMeta(name_hash, row[0], row[1], row[2], bool(row[3])), row[4]

    async def fetch_chunks(self, meta: FileMeta, start: int, end: int, limit: int) -> list[Chunk]:
        args = sql.chunk_args(meta.mtime, meta.size, meta.name_hash, start, end, limit)
        async with self._cursor("fetch_chunks") as cur:
            await cur.execute(CHUNKS, args)
            rows = await cur.fetchall()
        return [Chunk(o, d) for o, d in rows]

    async def create_tables(self) -> None:
        async with self._cursor("create_tables") as cur:
            for stmt in DDL:
                await cur.execute(stmt)

    async def store(
        self, name: str, chunks: Iterable[bytes], *, size: int, mtime: int,
        datatype: str, scope: str,
    ) -> None:
        name_hash = hashlib.md5(name.encode("utf-8")).hexdigest()
        async with self._cursor("store") as cur:
            conn = cur.connection
            await conn.begin()
            try:
                await cur.execute(sql.to_mysql(sql.DELETE_FILE), (name_hash,))
                await cur.execute(
                    sql.to_mysql(sql.INSERT_FILE),
                    (datatype, name, name, name_hash, scope, size, mtime, False),
                )
                offset = 0
                for data in chunks:
                    await cur.execute(sql.to_mysql(sql.INSERT_CHUNK), (name_hash, offset, data))
                    offset += len(data)
                if offset != size:
                    raise ValueError(f"{name}: read {offset} bytes, expected {size}")
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise

    async def execute(self, statement: str, *args: object) -> None:
        async with self._cursor("execute") as cur:
            await cur.execute(sql.to_mysql(statement), args)
