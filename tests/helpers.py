"""Test helpers: storing files with chosen chunks, a layout that counts its reads,
an app started with an in-process client, a table lock held from outside."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import httpx

from serve_image.app import ServeImage
from serve_image.settings import Settings
from serve_image.storage import BrokenFile, FileMeta, First, Layout, StoredFile
from serve_image.storage.pieces import Chunk, FetchPieces
from tests.servers import free_port as free_port  # re-exported for the tests

IMG = "var/site/storage/images"
# A hang guard, not a speed claim: how long a test waits for what must happen.
DEADLINE = 60.0

T = TypeVar("T")


def md5(name: str) -> str:
    return hashlib.md5(name.encode("utf-8")).hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or []


async def store(
    backend: Layout, name: str, data: bytes, *, chunk: int | None = None,
    chunks: Sequence[bytes] | None = None, datatype: str = "image/jpeg", mtime: int = 1_700_000_000,
) -> None:
    size = chunk or backend.settings.chunk_size
    parts = list(chunks) if chunks is not None else split(data, size)
    await backend.store(name, parts, size=len(data), mtime=mtime, datatype=datatype, scope="image")


@asynccontextmanager
async def running(app: ServeImage, base_url: str = "http://t") -> AsyncIterator[httpx.AsyncClient]:
    """The app started, an httpx client that calls it in-process, and its shutdown
    however the test ends."""
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client
    finally:
        await app.shutdown()



async def until(check: Callable[[], T | Awaitable[T]], what: str,
                seconds: float = DEADLINE) -> T:
    """Poll `check` (a function or a coroutine function) until it returns something
    true; that. Raises AssertionError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return cast(T, got)
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        await asyncio.sleep(0.01)


class SpyLayout(Layout):
    """A real layout, with a log of the reads the endpoint makes through it.

    Every read of file bytes is counted in `chunk_reads`: a file's first bytes
    with its row (`first`, also batched as `first_many`) and every batch of
    pieces of a streamed body (`fetch_chunks`).
    """

    def __init__(self, inner: Layout) -> None:
        super().__init__(inner.settings, inner.driver)
        self.inner = inner
        self.calls: list[str] = []
        self.limits: list[int] = []  # pieces asked of each fetch_chunks
        # The inner layout's own walk (`read`) fetches through this instance
        # attribute, so each batch it reads is counted.
        fetch: FetchPieces | None = getattr(inner, "fetch_chunks", None)
        if fetch is not None:
            async def counted(
                meta: FileMeta, start: int, end: int, limit: int, aligned: bool = False
            ) -> list[Chunk]:
                self.calls.append("fetch_chunks")
                self.limits.append(limit)
                return await fetch(meta, start, end, limit, aligned)

            inner.fetch_chunks = counted  # type: ignore[attr-defined]

    def reset(self) -> None:
        """Forget the reads so far (a test's own set-up requests)."""
        self.calls.clear()
        self.limits.clear()

    @property
    def chunk_reads(self) -> int:
        return sum(1 for c in self.calls if c in ("first", "first_many", "fetch_chunks"))

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self.inner.ping()  # start-up and health checks are not the request's reads

    async def create_tables(self) -> None:
        await self.inner.create_tables()

    async def meta(self, name_hash: str) -> FileMeta | None:
        self.calls.append("meta")
        return await self.inner.meta(name_hash)

    async def first(self, name_hash: str) -> First | None:
        self.calls.append("first")
        return await self.inner.first(name_hash)

    async def meta_many(self, hashes: Sequence[str]) -> dict[str, FileMeta]:
        self.calls.append("meta_many")
        return await self.inner.meta_many(hashes)

    async def first_many(self, hashes: Sequence[str]) -> dict[str, First]:
        self.calls.append("first_many")
        return await self.inner.first_many(hashes)

    async def check(self, meta: FileMeta) -> None:
        await self.inner.check(meta)

    def read(self, meta: FileMeta, start: int, end: int) -> AsyncGenerator[bytes, None]:
        return self.inner.read(meta, start, end)

    def local_path(self, meta: FileMeta) -> str | None:
        return self.inner.local_path(meta)

    async def store(self, name: str, pieces: Iterable[bytes], **kw: Any) -> None:
        await self.inner.store(name, pieces, **kw)

    async def delete(self, name: str) -> bool:
        return await self.inner.delete(name)

    async def delete_matching(self, pattern: str) -> list[str]:
        return await self.inner.delete_matching(pattern)

    async def purge(self, cutoff: int, **kw: Any) -> tuple[int, int]:
        return await self.inner.purge(cutoff, **kw)

    async def stat_many(self, hashes: Sequence[str]) -> dict[str, StoredFile]:
        return await self.inner.stat_many(hashes)

    def list_files(self, prefix: str = "", **kw: Any) -> AsyncIterator[StoredFile]:
        return self.inner.list_files(prefix, **kw)

    def verify(self) -> AsyncIterator[BrokenFile]:
        return self.inner.verify()


class Locker:
    """Holds a table lock from a connection of its own, finds and kills the blocked query."""

    def __init__(self, backend: str, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        self.conn: Any = None

    async def lock(self) -> None:
        assert self.conn is None, "locked already"
        s = self.settings
        if self.backend == "mysql":
            import aiomysql

            self.conn = await aiomysql.connect(
                host=s.host, port=s.port, user=s.user, password=s.password, db=s.database,
                autocommit=True,
            )
            async with self.conn.cursor() as cur:
                await cur.execute("LOCK TABLES ezdbfile_data WRITE")
        else:
            import asyncpg

            self.conn = await asyncpg.connect(
                host=s.host, port=s.port, user=s.user or None, database=s.database
            )
            await self.conn.execute("BEGIN")
            await self.conn.execute("LOCK TABLE ezdbfile_data IN ACCESS EXCLUSIVE MODE")

    async def blocked(self) -> list[int]:
        """Ids of the site's connections waiting for the lock."""
        if self.backend == "mysql":
            async with self.conn.cursor() as cur:
                await cur.execute(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = %s AND id <> CONNECTION_ID() AND state LIKE %s",
                    (self.settings.database, "%metadata lock%"),
                )
                return [r[0] for r in await cur.fetchall()]
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() "
            "AND wait_event_type = 'Lock'", self.settings.database,
        )
        return [r[0] for r in rows]

    async def wait_blocked(self, count: int = 1, seconds: float = 30) -> list[int]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ids = await self.blocked()
            if len(ids) >= count:
                return ids
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {count} queries blocked on the lock within {seconds:g} s")

    async def kill(self, ident: int) -> None:
        if self.backend == "mysql":
            async with self.conn.cursor() as cur:
                await cur.execute(f"KILL CONNECTION {int(ident)}")
        else:
            await self.conn.execute("SELECT pg_terminate_backend($1)", ident)

    async def unlock(self) -> None:
        """Let go of the lock and close the connection; nothing when not locked."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.backend == "mysql":
            async with conn.cursor() as cur:
                await cur.execute("UNLOCK TABLES")
            conn.close()
        else:
            await conn.execute("ROLLBACK")
            await conn.close()
