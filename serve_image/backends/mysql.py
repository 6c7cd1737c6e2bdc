"""MySQL / MariaDB with asyncmy or aiomysql: the tables real eZ Publish clusters have."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import aiomysql
import pymysql

from serve_image.backends import BackendImportError, sql
from serve_image.backends.base import Backend, Chunk, FileMeta, name_hash
from serve_image.failover import Failover, HostPool
from serve_image.settings import Settings, StorageHost

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
# The server refused the statement (1406 data too long, a duplicate key): the
# connection is fine, and an import reports the file and goes on.
_STATEMENT_ERRORS = (pymysql.err.DataError, pymysql.err.IntegrityError)


Errors = tuple[type[BaseException], ...]


def _driver(settings: Settings) -> tuple[Any, Errors, Errors]:
    """STORAGE_DRIVER's module (aiomysql, or asyncmy with the same pool API), its errors,
    and those of them that are a statement's, not the connection's."""
    if settings.driver != "asyncmy":
        return aiomysql, _DRIVER_ERRORS, _STATEMENT_ERRORS
    try:
        import asyncmy
        import asyncmy.errors
    except ImportError:
        raise BackendImportError(
            f"{settings.source}: STORAGE_DRIVER 'asyncmy' is not installed: "
            "pip install 'serve-image[mysql]', or set STORAGE_DRIVER = 'aiomysql'"
        ) from None
    return (
        asyncmy, (*_DRIVER_ERRORS, asyncmy.errors.MySQLError),
        (*_STATEMENT_ERRORS, asyncmy.errors.DataError, asyncmy.errors.IntegrityError),
    )


class _HostPool(HostPool[aiomysql.Connection]):
    """An aiomysql pool to one server of STORAGE_HOSTS."""

    def __init__(self, settings: Settings, address: StorageHost) -> None:
        super().__init__(address)
        self.settings = settings
        self._pool: aiomysql.Pool | None = None

    async def open(self) -> None:
        s, a = self.settings, self.address
        target: dict[str, Any] = (
            {"unix_socket": a.socket} if a.socket else {"host": a.host, "port": a.port}
        )
        # minsize 0: start-up never fails because the database is down; the
        # endpoint answers 503 until it is back. autocommit: every read sees
        # the latest committed version, not a snapshot pinned by a pooled
        # connection's open transaction.
        self._pool = await _driver(s)[0].create_pool(
            minsize=0, maxsize=s.pool_size, user=s.user, password=s.password, db=s.database,
            charset=s.charset, autocommit=True, connect_timeout=s.connect_timeout,
            pool_recycle=3600, **target,
        )

    async def acquire(self, wait: float) -> aiomysql.Connection:
        assert self._pool is not None
        # aiomysql drops idle connections whose server hung up (EOF) here.
        return await asyncio.wait_for(self._pool.acquire(), wait)

    async def release(self, conn: aiomysql.Connection, broken: bool) -> None:
        assert self._pool is not None
        if broken:
            conn.close()  # a broken connection must not go back to the pool
        self._pool.release(conn)

    def exhausted(self) -> bool:
        p = self._pool
        return p is not None and p.freesize == 0 and p.size >= p.maxsize

    def in_use(self) -> int:
        return 0 if self._pool is None else self._pool.size - self._pool.freesize

    async def ping(self, conn: aiomysql.Connection) -> None:
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


class MySQLBackend(Backend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failover: Failover[aiomysql.Connection] = Failover(
            self.settings, [_HostPool(self.settings, h) for h in self.settings.hosts],
            *_driver(self.settings)[1:],
        )

    async def connect(self) -> None:
        await self.failover.open()

    async def close(self) -> None:
        await self.failover.close()

    @asynccontextmanager
    async def _cursor(self, doing: str, *, bounded: bool = False) -> AsyncIterator[aiomysql.Cursor]:
        async with self.failover.connection(doing, bounded=bounded) as conn, conn.cursor() as cur:
            yield cur

    async def _fetchone(self, doing: str, statement: str, args: tuple[Any, ...]) -> Any:
        async def query(conn: aiomysql.Connection) -> Any:
            async with conn.cursor() as cur:
                await cur.execute(statement, args)
                return await cur.fetchone()

        # Before any byte is sent: a killed connection is worth one more try.
        return await self.failover.read(doing, query)

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
        async with self._cursor("fetch_chunks", bounded=True) as cur:
            await cur.execute(CHUNKS, args)
            rows = await cur.fetchall()
        return [Chunk(o, d) for o, d in rows]

    async def create_tables(self) -> None:
        async with self._cursor("create_tables") as cur:
            # Only the missing ones: CREATE TABLE IF NOT EXISTS on an existing
            # table makes MariaDB send a note that aiomysql raises as a warning
            # on every `init-db` against an existing eZ cluster.
            await cur.execute(
                "SELECT LOWER(table_name) FROM information_schema.tables "
                "WHERE table_schema = DATABASE()"
            )
            existing = {row[0] for row in await cur.fetchall()}
            for table, stmt in zip(("ezdbfile", "ezdbfile_data"), DDL, strict=True):
                if table not in existing:
                    await cur.execute(stmt)

    async def store(
        self, name: str, chunks: Iterable[bytes], *, size: int, mtime: int,
        datatype: str, scope: str,
    ) -> None:
        key = name_hash(name)
        async with self._cursor("store") as cur:
            conn = cur.connection
            # REPEATABLE READ's gap locks make two stores of new names (DELETE
            # of an absent key, then INSERT) deadlock each other under
            # `import --jobs`; READ COMMITTED takes no gap locks. Applies to
            # the next transaction only.
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                await cur.execute(sql.to_mysql(sql.DELETE_FILE), (key,))
                await cur.execute(
                    sql.to_mysql(sql.INSERT_FILE),
                    (datatype, name, name, key, scope, size, mtime, False),
                )
                offset = 0
                for data in chunks:
                    await cur.execute(sql.to_mysql(sql.INSERT_CHUNK), (key, offset, data))
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

    async def query(self, statement: str, *args: object) -> list[tuple[Any, ...]]:
        async def rows(conn: aiomysql.Connection) -> list[tuple[Any, ...]]:
            async with conn.cursor() as cur:
                await cur.execute(sql.to_mysql(statement), args)
                return list(await cur.fetchall())

        # A SELECT (batched small-file reads among them): idempotent, so a
        # killed connection is worth one more try on a fresh one.
        return await self.failover.read("query", rows)

    async def update(self, statement: str, *args: object) -> int:
        async with self._cursor("update") as cur:
            return int(await cur.execute(sql.to_mysql(statement), args))
