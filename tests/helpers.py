"""Test helpers: storing files with chosen chunks, a backend that counts its reads,
an app started with an in-process client, a table lock held from outside."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx

from serve_image.app import ServeImage
from serve_image.backends import Backend, Chunk, FileMeta
from serve_image.settings import Settings
from tests.servers import free_port as free_port  # re-exported for the tests

IMG = "var/site/storage/images"


def md5(name: str) -> str:
    return hashlib.md5(name.encode("utf-8")).hexdigest()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or []


async def store(
    backend: Backend, name: str, data: bytes, *, chunk: int | None = None,
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


# A statement that brings chunk bytes back: it selects `filedata` (not just
# its LENGTH) or reads a large object. The batched first-row query
# (serve_image/batching.py) is one: it joins ezdbfile_data.
_READS_BYTES = re.compile(r"(?<!LENGTH\()\b(?:\w+\.)?filedata\b|\blo_get\(", re.IGNORECASE)


def reads_chunk_bytes(statement: str) -> bool:
    return _READS_BYTES.search(statement) is not None


class SpyBackend(Backend):
    """A real backend, with a count of the reads that bring chunk bytes.

    `calls` names every read in order (`fetch_meta`, `fetch_first`,
    `fetch_chunks`, `query`); `statements` holds the SQL of each `query`.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.settings, readonly=inner.readonly)
        self.inner = inner
        self.calls: list[str] = []
        self.statements: list[str] = []
        self.limits: list[int] = []  # rows asked of each fetch_chunks

    def reset(self) -> None:
        """Forget the reads so far (a test's own set-up requests)."""
        self.calls.clear()
        self.statements.clear()
        self.limits.clear()

    @property
    def chunk_reads(self) -> int:
        """Reads that brought chunk bytes: one-file reads and shared (batched) queries alike."""
        own = sum(1 for c in self.calls if c in ("fetch_first", "fetch_chunks"))
        return own + sum(1 for s in self.statements if reads_chunk_bytes(s))

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> None:
        await self.inner.ping()  # start-up and health checks are not the request's reads

    async def fetch_meta(self, name_hash: str) -> FileMeta | None:
        self.calls.append("fetch_meta")
        return await self.inner.fetch_meta(name_hash)

    async def fetch_first(self, name_hash: str) -> tuple[FileMeta, bytes | None] | None:
        self.calls.append("fetch_first")
        return await self.inner.fetch_first(name_hash)

    async def fetch_chunks(self, meta: FileMeta, start: int, end: int, limit: int) -> list[Chunk]:
        self.calls.append("fetch_chunks")
        self.limits.append(limit)
        return await self.inner.fetch_chunks(meta, start, end, limit)

    async def create_tables(self) -> None:
        await self.inner.create_tables()

    async def store(self, name: str, chunks: Any, **kw: Any) -> None:
        await self.inner.store(name, chunks, **kw)

    async def execute(self, sql: str, *args: object) -> None:
        await self.inner.execute(sql, *args)

    async def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        self.calls.append("query")
        self.statements.append(sql)
        return await self.inner.query(sql, *args)

    async def update(self, sql: str, *args: object) -> int:
        return await self.inner.update(sql, *args)


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
