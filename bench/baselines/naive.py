"""The baseline: the straightforward Starlette port a user would write first.

Per request: one query for the file's row, then every chunk row of the file
with one `fetchall`, returned through StreamingResponse. It holds a whole
file in memory while sending it, as eZ's PHP script did. It reads the same
site files as serve-image (for the connection settings only) and works on
the three backends:

    SERVE_IMAGE_SITE=site.py uvicorn --factory bench.baselines.naive:from_environment
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from serve_image.settings import Settings, load_site

META = "SELECT datatype, size, mtime FROM ezdbfile WHERE name_hash = ? AND mtime >= 0"
DATA = 'SELECT filedata FROM ezdbfile_data WHERE name_hash = ? ORDER BY "offset"'


class Database:
    """One pool per backend, and `fetchall` of one query."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.pool: Any = None

    async def connect(self) -> None:
        s = self.s
        if s.backend == "mysql":
            import aiomysql

            self.pool = await aiomysql.create_pool(
                host=s.host, port=s.port, user=s.user, password=s.password, db=s.database,
                autocommit=True, maxsize=s.pool_size,
            )
        elif s.backend == "pgsql":
            import asyncpg

            self.pool = await asyncpg.create_pool(
                host=s.host, port=s.port, user=s.user or None, password=s.password or None,
                database=s.database, max_size=s.pool_size,
            )

    async def close(self) -> None:
        if self.s.backend == "mysql":
            self.pool.close()
            await self.pool.wait_closed()
        elif self.s.backend == "pgsql":
            await self.pool.close()

    async def fetchall(self, query: str, *args: Any) -> list[Any]:
        if self.s.backend == "mysql":
            query = query.replace('"offset"', "`offset`").replace("?", "%s")
            async with self.pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(query, args)
                return list(await cur.fetchall())
        if self.s.backend == "pgsql":
            n = iter(range(1, 100))
            query = "".join(f"${next(n)}" if c == "?" else c for c in query)
            async with self.pool.acquire() as conn:
                return list(await conn.fetch(query, *args))
        return await asyncio.to_thread(self._sqlite, query, args)

    def _sqlite(self, query: str, args: tuple[Any, ...]) -> list[Any]:
        with contextlib.closing(sqlite3.connect(self.s.database)) as conn:
            return conn.execute(query, args).fetchall()


def make_app(settings: Settings) -> Starlette:
    db = Database(settings)

    async def image(request: Request) -> Response:
        name = request.url.path.lstrip("/")
        name_hash = hashlib.md5(name.encode()).hexdigest()
        rows = await db.fetchall(META, name_hash)
        if not rows:
            return Response("Not found", status_code=404)
        datatype, size, mtime = rows[0]
        etag = f'"{mtime:x}-{size:x}"'
        headers = {
            "ETag": etag,
            "Last-Modified": formatdate(mtime, usegmt=True),
            "Content-Length": str(size),
        }
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        chunks = await db.fetchall(DATA, name_hash)

        async def body() -> AsyncIterator[bytes]:
            for (data,) in chunks:
                yield bytes(data)

        return StreamingResponse(body(), media_type=datatype, headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await db.connect()
        yield
        await db.close()

    return Starlette(routes=[Route("/{path:path}", image)], lifespan=lifespan)


def from_environment() -> Starlette:
    return make_app(load_site(os.environ["SERVE_IMAGE_SITE"]))
