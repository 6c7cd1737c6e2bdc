"""SQLite, the embedded default: the standard library's sqlite3 in a thread pool.

Each worker thread keeps its own connection. Queries take microseconds, but
a read can still wait on the disk, so they never run on the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from serve_image.backends import sql
from serve_image.backends.base import Backend, Chunk, FileMeta, name_hash
from serve_image.errors import DatabaseUnavailable, StatementFailed

T = TypeVar("T")

DDL = (
    """CREATE TABLE IF NOT EXISTS ezdbfile (
  datatype   TEXT    NOT NULL DEFAULT 'application/octet-stream',
  name       TEXT    NOT NULL,
  name_trunk TEXT    NOT NULL,
  name_hash  TEXT    NOT NULL PRIMARY KEY,
  scope      TEXT    NOT NULL DEFAULT '',
  size       INTEGER NOT NULL,
  mtime      INTEGER NOT NULL DEFAULT 0,
  expired    INTEGER NOT NULL DEFAULT 0
)""",
    "CREATE INDEX IF NOT EXISTS ezdbfile_name ON ezdbfile (name)",
    "CREATE INDEX IF NOT EXISTS ezdbfile_name_trunk ON ezdbfile (name_trunk)",
    "CREATE INDEX IF NOT EXISTS ezdbfile_mtime ON ezdbfile (mtime)",
    "CREATE INDEX IF NOT EXISTS ezdbfile_expired_name ON ezdbfile (expired, name)",
    """CREATE TABLE IF NOT EXISTS ezdbfile_data (
  name_hash TEXT    NOT NULL REFERENCES ezdbfile (name_hash) ON DELETE CASCADE,
  "offset"  INTEGER NOT NULL,
  filedata  BLOB    NOT NULL,
  PRIMARY KEY (name_hash, "offset")
)""",
)


class SQLiteBackend(Backend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None

    async def connect(self) -> None:
        size = self.settings.pool_size
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="sqlite")
        self._slots = asyncio.Semaphore(size)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            path = self.settings.database
            if self.readonly:
                # Read-only: the endpoint never writes, and a LiteFS replica
                # must not be written (a new transaction replicated in is seen
                # by the next query).
                target = f"file:{Path(path).as_posix()}?mode=ro"
            else:
                target = f"file:{Path(path).as_posix()}?mode=rwc"
            conn = sqlite3.connect(
                target, uri=True, timeout=self.settings.acquire_timeout,
                isolation_level=None, check_same_thread=False,
            )
            conn.execute("PRAGMA foreign_keys = ON")
            with self._lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    async def _run(self, doing: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        self.check_breaker()
        if self._executor is None or self._slots is None:
            raise DatabaseUnavailable(f"{self.settings.describe()}: not connected")
        try:
            async with asyncio.timeout(self.settings.acquire_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DatabaseUnavailable(f"{self.settings.describe()}: all connections busy") from None
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, lambda: fn(self._conn()))
        except (sqlite3.IntegrityError, sqlite3.DataError) as e:
            # The statement's fault, not the database's: no breaker, no 503.
            raise StatementFailed(f"{self.settings.describe()}: {doing}: {e}") from None
        except sqlite3.Error as e:
            raise self.unavailable(e, doing) from None
        finally:
            self._slots.release()
        return result

    async def fetch_meta(self, name_hash: str) -> FileMeta | None:
        def q(c: sqlite3.Connection) -> Any:
            return c.execute(sql.META, (name_hash,)).fetchone()

        row = await self._run("fetch_meta", q)
        return None if row is None else FileMeta(name_hash, row[0], row[1], row[2], bool(row[3]))

    async def fetch_first(self, name_hash: str) -> tuple[FileMeta, bytes | None] | None:
        def q(c: sqlite3.Connection) -> Any:
            return c.execute(sql.FIRST, (name_hash,)).fetchone()

        row = await self._run("fetch_first", q)
        if row is None:
            return None
        return FileMeta(name_hash, row[0], row[1], row[2], bool(row[3])), row[4]

    async def fetch_chunks(self, meta: FileMeta, start: int, end: int, limit: int) -> list[Chunk]:
        args = sql.chunk_args(meta.mtime, meta.size, meta.name_hash, start, end, limit)

        def q(c: sqlite3.Connection) -> Any:
            return c.execute(sql.CHUNKS, args).fetchall()

        return [Chunk(o, d) for o, d in await self._run("fetch_chunks", q)]

    async def create_tables(self) -> None:
        def q(c: sqlite3.Connection) -> None:
            # WAL: readers go on while a writer stores a file.
            c.execute("PRAGMA journal_mode = WAL")
            for stmt in DDL:
                c.execute(stmt)

        Path(self.settings.database).parent.mkdir(parents=True, exist_ok=True)
        await self._run("create_tables", q)

    async def store(
        self, name: str, chunks: Iterable[bytes], *, size: int, mtime: int,
        datatype: str, scope: str,
    ) -> None:
        key = name_hash(name)

        def q(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(sql.DELETE_DATA, (key,))
                c.execute(sql.DELETE_FILE, (key,))
                c.execute(sql.INSERT_FILE, (datatype, name, name, key, scope, size, mtime, 0))
                offset = 0
                for data in chunks:
                    c.execute(sql.INSERT_CHUNK, (key, offset, data))
                    offset += len(data)
                if offset != size:
                    raise ValueError(f"{name}: read {offset} bytes, expected {size}")
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

        await self._run("store", q)

    async def execute(self, statement: str, *args: object) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute(statement, args)

        await self._run("execute", q)

    async def query(self, statement: str, *args: object) -> list[tuple[Any, ...]]:
        def q(c: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return c.execute(statement, args).fetchall()

        return await self._run("query", q)

    async def update(self, statement: str, *args: object) -> int:
        def q(c: sqlite3.Connection) -> int:
            return c.execute(statement, args).rowcount

        return await self._run("update", q)
