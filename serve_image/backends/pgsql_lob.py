"""PostgreSQL, eZ Publish 3.8's layout: one `ezdbfile` row per file, its bytes a large object.

    ezdbfile(id SERIAL, name VARCHAR(255) UNIQUE, name_hash VARCHAR(34) UNIQUE,
             datatype, scope, size BIGINT, mtime INT, lob_id OID NOT NULL)

A site picks it with `STORAGE_LAYOUT = "largeobject"`. Reads go through
`lo_get(oid, offset, length)` (PostgreSQL 9.4+), one STORAGE_CHUNK_SIZE
piece per row of a `generate_series`: asyncpg has no large-object API, and
server-side slices keep a range request from reading the whole object.
The layout has no `expired` column: eZ 3.8 deleted for good, so a row is
live while its mtime is not negative.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from serve_image.backends.base import Chunk, FileMeta, StoredFile, name_hash
from serve_image.backends.pgsql import PostgresBackend
from serve_image.errors import StatementFailed
from serve_image.settings import SiteConfigError

DDL = (
    # datatype is VARCHAR(60) in eZ 3.8; 255 here, as eZ 4.7 widened it, so
    # long MIME types fit in tables serve-image creates.
    """CREATE TABLE IF NOT EXISTS ezdbfile (
  id        SERIAL       PRIMARY KEY,
  name      VARCHAR(255) NOT NULL UNIQUE,
  name_hash VARCHAR(34)  NOT NULL UNIQUE,
  datatype  VARCHAR(255) NOT NULL DEFAULT 'application/octet-stream',
  scope     VARCHAR(20)  NOT NULL DEFAULT '',
  size      BIGINT       NOT NULL,
  mtime     INTEGER      NOT NULL DEFAULT 0,
  lob_id    OID          NOT NULL
)""",
)

META = "SELECT datatype, size, mtime FROM ezdbfile WHERE name_hash = $1"
# The row and the first piece in one round trip: a small image is one query.
# A deleted row's object is not read.
FIRST = (
    "SELECT datatype, size, mtime, CASE WHEN mtime >= 0 THEN lo_get(lob_id, 0, $2) END "
    "FROM ezdbfile WHERE name_hash = $1"
)
# Pieces $4, $4+$5, ... up to $7 of the object, each $5 bytes and none past
# byte $6 - 1. The join with this version's mtime and size makes the rows
# vanish once the file is replaced or deleted; the row and the object are
# read under one statement snapshot, so they always belong together.
CHUNKS = (
    "SELECT g.pos, lo_get(f.lob_id, g.pos, LEAST($5::bigint, $6::bigint - g.pos)::integer) "
    "FROM ezdbfile f CROSS JOIN generate_series($4::bigint, $7::bigint, $5::bigint) AS g(pos) "
    "WHERE f.name_hash = $1 AND f.mtime = $2 AND f.size = $3 ORDER BY g.pos"
)
STAT_COLUMNS = "name, name_hash, datatype, scope, size, mtime"
# eZ 3.8's column widths: a longer value would fail inside the transaction.
MAX_NAME = 255


class PostgresLargeObjectBackend(PostgresBackend):
    """eZ 3.8's `ezdbfile.lob_id` layout, behind the same interface as the chunk tables."""

    ddl = DDL  # eZ 3.8's table; create_tables is the parent's

    async def fetch_meta(self, name_hash: str) -> FileMeta | None:
        async with self._conn("fetch_meta", bounded=True) as conn:
            row = await conn.fetchrow(META, name_hash)
        return None if row is None else FileMeta(name_hash, row[0], row[1], row[2], False)

    async def fetch_first(self, name_hash: str) -> tuple[FileMeta, bytes | None] | None:
        async with self._conn("fetch_first", bounded=True) as conn:
            try:
                row = await conn.fetchrow(FIRST, name_hash, self.settings.chunk_size)
            except asyncpg.UndefinedObjectError:
                # The row's large object is gone (unlinked by hand): one file is
                # broken, not the database. No 503, no tripped breaker: the
                # headers go out and fetch_chunks' empty answer cuts the body.
                meta = await conn.fetchrow(META, name_hash)
                row = None if meta is None else (*meta, None)
        if row is None:
            return None
        return FileMeta(name_hash, row[0], row[1], row[2], False), row[3]

    async def fetch_chunks(self, meta: FileMeta, start: int, end: int, limit: int) -> list[Chunk]:
        piece = self.settings.chunk_size
        last = min(end, start + (max(1, limit) - 1) * piece)
        async with self._conn("fetch_chunks", bounded=True) as conn:
            try:
                rows = await conn.fetch(
                    CHUNKS, meta.name_hash, meta.mtime, meta.size, start, piece, end + 1, last
                )
            except asyncpg.UndefinedObjectError:
                return []  # the large object is gone: as missing chunks, the response is cut
        return [Chunk(pos, data) for pos, data in rows]

    async def store(
        self, name: str, chunks: Iterable[bytes], *, size: int, mtime: int,
        datatype: str, scope: str,
    ) -> None:
        if len(name) > MAX_NAME:
            raise StatementFailed(f"{name[:60]}...: longer than the {MAX_NAME} characters of "
                                  "ezdbfile.name in the largeobject layout")
        key = name_hash(name)
        async with self._conn("store") as conn, conn.transaction():
            # Locks the row: two writers of one name take turns.
            old = await conn.fetchval(
                "SELECT lob_id FROM ezdbfile WHERE name_hash = $1 FOR UPDATE", key
            )
            # Large objects are transactional: on any failure below, the new
            # object disappears with the rollback and the old one stays.
            oid = await conn.fetchval("SELECT lo_create(0)")
            offset = 0
            for data in chunks:
                await conn.execute("SELECT lo_put($1, $2, $3)", oid, offset, data)
                offset += len(data)
            if offset != size:
                raise ValueError(f"{name}: read {offset} bytes, expected {size}")
            try:
                if old is None:
                    await conn.execute(
                        "INSERT INTO ezdbfile (name, name_hash, datatype, scope, size, mtime, "
                        "lob_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        name, key, datatype, scope, size, mtime, oid,
                    )
                else:
                    await conn.execute(
                        "UPDATE ezdbfile SET name = $1, datatype = $3, scope = $4, size = $5, "
                        "mtime = $6, lob_id = $7 WHERE name_hash = $2",
                        name, key, datatype, scope, size, mtime, oid,
                    )
                    await conn.execute("SELECT lo_unlink($1)", old)
            except asyncpg.StringDataRightTruncationError as e:
                # An existing eZ 3.8 table has datatype VARCHAR(60).
                raise StatementFailed(f"{name}: {e}") from None

    # -- file management: the columns this layout has ------------------------
    async def stat_file(self, name: str) -> StoredFile | None:
        found = await self.stat_many([name_hash(name)])
        return next(iter(found.values()), None)

    async def stat_many(self, hashes: Sequence[str]) -> dict[str, StoredFile]:
        async with self._conn("stat_many") as conn:
            rows = await conn.fetch(
                f"SELECT {STAT_COLUMNS} FROM ezdbfile WHERE name_hash = ANY($1::varchar[])",
                list(hashes),
            )
        return {r[1]: StoredFile(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), False)
                for r in rows}

    async def soft_delete(self, name: str) -> bool:
        key = name_hash(name)
        async with self._conn("soft_delete") as conn:
            status: str = await conn.execute(
                "UPDATE ezdbfile SET mtime = -ABS(mtime) WHERE name_hash = $1 AND mtime > 0",
                key,
            )
        return status != "UPDATE 0"

    def _unsupported(self, what: str) -> SiteConfigError:
        return SiteConfigError(
            f"{self.settings.source}: STORAGE_LAYOUT 'largeobject' does not support {what}; "
            "it serves, stores and stats files"
        )

    def list_files(self, *args: Any, **kwargs: Any) -> Any:
        raise self._unsupported("listing files")

    async def delete_by_wildcard(self, pattern: str) -> list[str]:
        raise self._unsupported("deleting by wildcard")

    async def purge(self, cutoff: int, *, dry_run: bool = False) -> tuple[int, int]:
        raise self._unsupported("purging")

    def verify(self, *args: Any, **kwargs: Any) -> Any:
        raise self._unsupported("verifying")
