"""The benchmark's data: the same files on MariaDB, PostgreSQL, SQLite and on disk."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_image.settings import settings_from_mapping
from serve_image.storage import make_layout
from tests.servers import create_database, drop_database, server_constants

SMALL_COUNT, SMALL_SIZE = 1000, 10 * 1024
LARGE_COUNT, LARGE_SIZE = 20, 5 * 1024 * 1024
CHUNK_SIZE = 65535  # eZ's DBChunkSize
MTIME = 1_700_000_000
VAR = "var/bench/storage/images"
# A site's cluster database has been vacuumed and analysed long ago; one just
# filled has not, and PostgreSQL's autovacuum would then run (and set hint
# bits) during the first rounds, against whichever system is measured then.
SETTLE = {
    "pgsql": "VACUUM ANALYZE {tables}",
    "mysql": "ANALYZE TABLE {tables}",
    "sqlite": "ANALYZE",
}


@dataclass(frozen=True)
class BenchFiles:
    small: list[str]  # names, e.g. var/bench/storage/images/small/0001.jpg
    large: list[str]


def make_files(root: Path, small_count: int = SMALL_COUNT) -> BenchFiles:
    """Write the files under `root` (nginx's document root) and return their names."""
    rnd = random.Random(6)
    small = [f"{VAR}/small/{i:04d}.jpg" for i in range(small_count)]
    large = [f"{VAR}/large/{i:02d}.jpg" for i in range(LARGE_COUNT)]
    for names, size in ((small, SMALL_SIZE), (large, LARGE_SIZE)):
        for name in names:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rnd.randbytes(size))
            os.utime(path, (MTIME, MTIME))
    return BenchFiles(small, large)


def site_constants(backend: str, database: str) -> dict[str, Any]:
    """Site constants for a database on this machine's server (or a SQLite file)."""
    if backend == "sqlite":
        return {"STORAGE_BACKEND": "sqlite", "STORAGE_DB": database}
    return {**server_constants(backend), "STORAGE_DB": database}


class Databases:
    """Uniquely named benchmark databases, filled once and dropped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.name = f"si_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.created: list[str] = []

    async def create(self, backend: str) -> dict[str, Any]:
        if backend == "sqlite":
            return site_constants(backend, str(self.tmp / f"{self.name}.sqlite"))
        await create_database(backend, self.name)
        self.created.append(backend)
        return site_constants(backend, self.name)

    async def drop_all(self) -> None:
        for backend in self.created:
            await drop_database(backend, self.name)
        self.created.clear()


async def fill(constants: dict[str, Any], root: Path, names: Sequence[str]) -> None:
    """Store the files `names` under `root`, cut in eZ's 65535-byte chunks, through
    serve-image's own writer, and settle the tables."""
    settings = settings_from_mapping(
        {**constants, "STORAGE_CHUNK_SIZE": CHUNK_SIZE, "STORAGE_POOL_SIZE": 4}, "<bench>", "bench"
    )
    layout = make_layout(settings)
    await layout.connect()
    # SQLite has one writer at a time: concurrent stores would wait on its lock.
    slots = asyncio.Semaphore(1 if settings.backend == "sqlite" else 4)

    async def store(name: str) -> None:
        async with slots:
            data = (root / name).read_bytes()
            parts = [data[i:i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
            await layout.store(name, parts, size=len(data), mtime=MTIME,
                                datatype="image/jpeg", scope="image")

    try:
        await layout.create_tables()
        await asyncio.gather(*(store(n) for n in names))
        tables = ", ".join(getattr(layout, "ddl", {}))  # the layout's tables (rows.RowLayout)
        await layout.driver.execute(SETTLE[settings.backend].format(tables=tables))
    finally:
        await layout.close()
