"""SQLite, the embedded default: the standard library's sqlite3 on a thread pool.

Queries take microseconds, but a read can still wait on the disk, so they
never run on the event loop. Connections are pooled like a server's: each
operation takes one, runs in a pool thread and gives it back, and a
transaction keeps its connection until it commits.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from serve_image.storage.drivers.base import Driver, Row
from serve_image.storage.errors import DatabaseUnavailable, StatementFailed

T = TypeVar("T")
logger = logging.getLogger("serve_image.storage")

# After a failure, answer 503 at once for this long instead of making every
# request hit the broken file again; short enough that requests succeed
# again well within a second of the database returning.
BREAKER_SECONDS = 0.25


class SQLiteDriver(Driver):
    name = "sqlite"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._executor: ThreadPoolExecutor | None = None
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._slots: asyncio.Semaphore | None = None
        self._down_until = 0.0

    async def connect(self) -> None:
        size = self.settings.pool_size
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="sqlite")
        self._slots = asyncio.Semaphore(size)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()

    def _open(self) -> sqlite3.Connection:
        path = Path(self.settings.database).as_posix()
        # Read-only: the endpoint never writes, and a LiteFS replica must not
        # be written (a transaction replicated in is seen by the next query).
        mode = "ro" if self.readonly else "rwc"
        conn = sqlite3.connect(
            f"file:{path}?mode={mode}", uri=True, timeout=self.settings.acquire_timeout,
            isolation_level=None, check_same_thread=False,
        )
        conn.execute("PRAGMA foreign_keys = ON")
        self._all.append(conn)
        return conn

    @asynccontextmanager
    async def _connection(self, doing: str) -> AsyncIterator[sqlite3.Connection]:
        if self._down_until and time.monotonic() < self._down_until:
            raise DatabaseUnavailable(f"{self.settings.describe()}: down, retrying shortly")
        if self._executor is None or self._slots is None:
            raise DatabaseUnavailable(f"{self.settings.describe()}: not connected")
        try:
            async with asyncio.timeout(self.settings.acquire_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DatabaseUnavailable(f"{self.settings.describe()}: all connections busy") from None
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = await self._in_thread(doing, lambda: self._open())
            yield conn
        finally:
            if conn is not None:
                self._idle.append(conn)
            self._slots.release()

    async def _in_thread(self, doing: str, fn: Callable[[], T]) -> T:
        assert self._executor is not None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except (sqlite3.IntegrityError, sqlite3.DataError) as e:
            # The statement's fault, not the database's: no breaker, no 503.
            raise StatementFailed(f"{self.settings.describe()}: {doing}: {e}") from None
        except sqlite3.Error as e:
            self._down_until = time.monotonic() + BREAKER_SECONDS
            message = f"{self.settings.describe()}: {doing}: {type(e).__name__}: {e}"
            logger.warning("database unavailable: %s", message)
            raise DatabaseUnavailable(message) from None

    async def fetch(self, statement: str, *args: object, retry: bool = True) -> list[Row]:
        async with self._connection("query") as conn:
            return await self._in_thread("query", lambda: conn.execute(statement, args).fetchall())

    async def execute(self, statement: str, *args: object) -> int:
        async with self._connection("update") as conn:
            return await self._in_thread("update", lambda: conn.execute(statement, args).rowcount)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Transaction]:
        async with self._connection("write") as conn:
            # IMMEDIATE: the write lock is taken now, not at the first write,
            # so two writers wait for each other instead of one failing.
            tx = _Transaction(self, conn)
            await tx.execute("BEGIN IMMEDIATE")
            try:
                yield tx
            except BaseException:
                await tx.execute("ROLLBACK")
                raise
            await tx.execute("COMMIT")

    async def prepare(self) -> None:
        if self.settings.database != ":memory:":
            Path(self.settings.database).parent.mkdir(parents=True, exist_ok=True)
        # WAL: readers go on while a writer stores a file. The mode is kept in
        # the database file, so it is set once, here.
        await self.execute("PRAGMA journal_mode = WAL")

    async def table_names(self) -> set[str]:
        rows = await self.fetch("SELECT LOWER(name) FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in rows}


class _Transaction:
    # Each call returns plain values, never a cursor: a cursor freed on the
    # event loop's thread while a pool thread uses its connection is an
    # SQLITE_MISUSE.

    def __init__(self, driver: SQLiteDriver, conn: sqlite3.Connection) -> None:
        self.driver = driver
        self.conn = conn

    async def fetch(self, statement: str, *args: object) -> list[Row]:
        return await self.driver._in_thread(
            "write", lambda: self.conn.execute(statement, args).fetchall()
        )

    async def execute(self, statement: str, *args: object) -> int:
        return await self.driver._in_thread(
            "write", lambda: self.conn.execute(statement, args).rowcount
        )

    async def executemany(self, statement: str, rows: Iterable[Sequence[object]]) -> None:
        batch = list(rows)
        await self.driver._in_thread(
            "write", lambda: self.conn.executemany(statement, batch).close()
        )
