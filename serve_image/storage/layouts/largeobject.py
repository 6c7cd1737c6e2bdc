"""PostgreSQL, eZ Publish 3.8's layout: one `ezdbfile` row per file, its bytes a large object.

    ezdbfile(id SERIAL, name VARCHAR(255) UNIQUE, name_hash VARCHAR(34) UNIQUE,
             datatype, scope, size BIGINT, mtime INT, lob_id OID NOT NULL)

A site picks it with `STORAGE_LAYOUT = "largeobject"`. Reads go through
`lo_get(oid, offset, length)` (PostgreSQL 9.4+), one STORAGE_CHUNK_SIZE
piece per row of a `generate_series`: asyncpg has no large-object API, and
server-side slices keep a range request from reading the whole object.
The table has no `expired` column: eZ 3.8 deleted for good, so a row is
live while its mtime is not negative. A row whose object is gone (unlinked
by hand) is one broken file, never a database error: every read joins
`pg_largeobject_metadata` first.
"""

from __future__ import annotations

from collections.abc import Sequence

from serve_image.settings import Settings
from serve_image.storage.drivers.base import Driver, Row
from serve_image.storage.errors import StatementFailed
from serve_image.storage.files import FileMeta
from serve_image.storage.names import name_hash
from serve_image.storage.pieces import Chunk, Pieces
from serve_image.storage.rows import PieceLayout, Table, insert_pieces, with_keys

DDL = {
    # datatype is VARCHAR(60) in eZ 3.8; 255 here, as eZ 4.7 widened it, so
    # long MIME types fit in tables serve-image creates.
    "ezdbfile": ("""CREATE TABLE ezdbfile (
  id        SERIAL       PRIMARY KEY,
  name      VARCHAR(255) NOT NULL UNIQUE,
  name_hash VARCHAR(34)  NOT NULL UNIQUE,
  datatype  VARCHAR(255) NOT NULL DEFAULT 'application/octet-stream',
  scope     VARCHAR(20)  NOT NULL DEFAULT '',
  size      BIGINT       NOT NULL,
  mtime     INTEGER      NOT NULL DEFAULT 0,
  lob_id    OID          NOT NULL
)""",),
}
_HAS_OBJECT = "EXISTS (SELECT 1 FROM pg_largeobject_metadata m WHERE m.oid = lob_id)"
# The row and the first piece in one round trip: a small image is one query.
# A deleted row's object is not read.
_FIRST_COLUMNS = (
    "SELECT name_hash, datatype, size, mtime, mtime < 0, "
    f"CASE WHEN mtime >= 0 AND {_HAS_OBJECT} THEN lo_get(lob_id, 0, ?) END FROM ezdbfile "
)
FIRST = _FIRST_COLUMNS + "WHERE name_hash = ?"
FIRST_MANY = _FIRST_COLUMNS + "WHERE name_hash IN (?*)"
# Pieces from byte `start`, each `piece` bytes, none past byte `end`, at most
# up to `last`. The join with this version's mtime and size makes the rows
# vanish once the file is replaced or deleted; the row and the object are
# read under one statement snapshot, so they always belong together.
CHUNKS = (
    "SELECT g.pos, lo_get(f.lob_id, g.pos, LEAST(?::bigint, ?::bigint - g.pos)::integer) "
    "FROM ezdbfile f JOIN pg_largeobject_metadata m ON m.oid = f.lob_id "
    "CROSS JOIN generate_series(?::bigint, ?::bigint, ?::bigint) AS g(pos) "
    "WHERE f.name_hash = ? AND f.mtime = ? AND f.size = ? ORDER BY g.pos"
)
# Each object's length: a descriptor opened for reading (INV_READ) lives as
# long as the statement's own transaction.
OBJECT_SIZES = (
    "SELECT name_hash, CASE WHEN NOT " + _HAS_OBJECT + " THEN -1 "
    "ELSE lo_lseek64(lo_open(lob_id, 262144), 0, 2) END FROM ezdbfile WHERE name_hash IN (?*)"
)
# The rows and their objects go together; an object unlinked by hand is not unlinked again.
PURGE = (
    "WITH gone AS (DELETE FROM ezdbfile WHERE name_hash IN (?*) AND mtime < 0 "
    "AND ABS(mtime) < ? RETURNING lob_id), "
    "unlinked AS (SELECT lo_unlink(lob_id) FROM gone "
    "WHERE lob_id IN (SELECT oid FROM pg_largeobject_metadata)) "
    "SELECT (SELECT COUNT(*) FROM gone), (SELECT COUNT(*) FROM unlinked)"
)
# eZ 3.8's column width: a longer name would fail inside the transaction.
MAX_NAME = 255


class LargeObjectLayout(PieceLayout):
    name = "largeobject"
    FIRST = FIRST
    FIRST_MANY = FIRST_MANY

    def __init__(self, settings: Settings, driver: Driver) -> None:
        super().__init__(settings, driver, Table("ezdbfile", expired=None), DDL)
        self.piece = settings.chunk_size

    # -- reads --------------------------------------------------------------------
    def first_args(self) -> tuple[object, ...]:
        return (self.piece,)  # the first piece's length

    async def fetch_chunks(
        self, meta: FileMeta, start: int, end: int, limit: int, aligned: bool = False
    ) -> list[Chunk]:
        """At most `limit` pieces of this version overlapping start..end (pieces.FetchPieces):
        every batch joins the row, so the walk needs no recheck."""
        piece = self.piece
        last = min(end, start + (max(1, limit) - 1) * piece)
        rows = await self.driver.fetch(
            CHUNKS, piece, end + 1, start, last, piece, meta.name_hash, meta.mtime, meta.size,
            retry=False,
        )
        return [Chunk(pos, data) for pos, data in rows]

    # -- writes -------------------------------------------------------------------
    async def store(
        self, name: str, pieces: Pieces, *, size: int, mtime: int, datatype: str,
        scope: str,
    ) -> None:
        if len(name) > MAX_NAME:
            raise StatementFailed(f"{name[:60]}...: longer than the {MAX_NAME} characters of "
                                  "ezdbfile.name in the largeobject layout")
        key = name_hash(name)
        async with self.driver.transaction() as tx:
            # Locks the row: two writers of one name take turns.
            old = await tx.fetch("SELECT lob_id FROM ezdbfile WHERE name_hash = ? FOR UPDATE", key)
            # Large objects are transactional: on any failure below, the new
            # object disappears with the rollback and the old one stays.
            ((oid,),) = await tx.fetch("SELECT lo_create(0)")
            await insert_pieces(tx, "SELECT lo_put(?, ?, ?)", oid, pieces, size=size, name=name)
            if not old:
                await tx.execute(
                    "INSERT INTO ezdbfile (name, name_hash, datatype, scope, size, mtime, lob_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", name, key, datatype, scope, size, mtime, oid,
                )
            else:
                await tx.execute(
                    "UPDATE ezdbfile SET name = ?, datatype = ?, scope = ?, size = ?, mtime = ?, "
                    "lob_id = ? WHERE name_hash = ?", name, datatype, scope, size, mtime, oid, key,
                )
                await tx.execute(f"SELECT lo_unlink(lob_id) FROM (SELECT ?::oid AS lob_id) o "
                                 f"WHERE {_HAS_OBJECT}", old[0][0])

    async def remove(self, rows: Sequence[Row], cutoff: int) -> int:
        hashes = [r[1] for r in rows]
        ((removed, _unlinked),) = await self.driver.fetch(
            with_keys(PURGE, len(hashes)), *hashes, cutoff
        )
        return int(removed)

    # -- verify ---------------------------------------------------------------------
    async def broken(self, files: Sequence[Row]) -> dict[str, str]:
        hashes = [f[1] for f in files]
        rows = await self.driver.fetch(with_keys(OBJECT_SIZES, len(hashes)), *hashes)
        sizes = {r[0]: int(r[1]) for r in rows}
        broken = {}
        for _name, h, size, _mtime in files:
            held = sizes.get(h, -1)
            if held < 0:
                broken[h] = "its large object is missing"
            elif held != int(size):
                broken[h] = f"its large object holds {held} bytes, the row says {size}"
        return broken
