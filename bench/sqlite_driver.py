"""SQLite driver choice: the thread-pool backend against aiosqlite (`first` of 10 KiB files).

Run: .venv/bin/pip install aiosqlite && .venv/bin/python bench/sqlite_driver.py
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosqlite

from serve_image.settings import settings_from_mapping
from serve_image.storage import make_layout
from serve_image.storage.layouts.chunks import FIRST
from tests.helpers import payload, store

DB = Path(tempfile.gettempdir()) / "sqlite_driver_bench.sqlite"
QUERIES = 20_000


async def rate(fn: Callable[[str], Awaitable[object]], hashes: list[str]) -> float:
    sem = asyncio.Semaphore(32)  # as wrk -c32

    async def one(i: int) -> None:
        async with sem:
            await fn(hashes[i % len(hashes)])

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(QUERIES)))
    return QUERIES / (time.perf_counter() - t)


async def main() -> None:
    DB.unlink(missing_ok=True)
    s = settings_from_mapping({"STORAGE_DB": str(DB)}, "<bench>")
    w = make_layout(s)
    await w.connect()
    await w.create_tables()
    names = [f"var/s/storage/images/{i}.jpg" for i in range(1000)]
    for n in names:
        await store(w, n, payload(10240, 1))
    await w.close()
    hashes = [hashlib.md5(n.encode()).hexdigest() for n in names]

    r = make_layout(s, readonly=True)
    await r.connect()
    pool_rate = await rate(r.first, hashes)
    await r.close()

    conns = [await aiosqlite.connect(f"file:{DB}?mode=ro", uri=True) for _ in range(10)]
    free: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)

    async def aio(h: str) -> None:
        c = await free.get()
        try:
            async with c.execute(FIRST, (h,)) as cur:
                await cur.fetchone()
        finally:
            free.put_nowait(c)

    aio_rate = await rate(aio, hashes)
    for c in conns:
        await c.close()
    print(f"thread pool: {pool_rate:.0f} q/s; aiosqlite (10 connections): {aio_rate:.0f} q/s; "
          f"ratio {pool_rate / aio_rate:.2f}")


if __name__ == "__main__":
    for _ in range(2):
        asyncio.run(main())
