"""eZ Publish 3.10-4.6's database cluster: `ezdbfile` rows, bytes in `ezdbfile_data` chunks.

    ezdbfile       (datatype, name, name_trunk, name_hash PRIMARY KEY, scope, size, mtime, expired)
    ezdbfile_data  (name_hash, "offset", filedata; PRIMARY KEY (name_hash, "offset"),
                    FOREIGN KEY (name_hash) REFERENCES ezdbfile ON DELETE CASCADE)

On every database serve-image supports. `offset` is quoted in every
statement: it is a reserved word in MariaDB 10.6+ and PostgreSQL, and the
original eZ scripts, which used it bare, fail on a current MariaDB.
"""

from __future__ import annotations

from collections.abc import Sequence

from serve_image.settings import Settings
from serve_image.storage.drivers.base import Driver, Row
from serve_image.storage.files import FileMeta
from serve_image.storage.names import name_hash
from serve_image.storage.pieces import Chunk, Pieces
from serve_image.storage.rows import PieceLayout, Table, insert_pieces, pages, with_keys

# eZ Publish 3.10-4.6 `kernel/sql/mysql/cluster_schema.sql`, with `offset`
# quoted and datatype VARCHAR(255) as eZ 4.7 widened it. Pointing serve-image
# at an existing eZ cluster database finds exactly these tables, and leaves them be.
_MYSQL: dict[str, tuple[str, ...]] = {
    "ezdbfile": ("""CREATE TABLE ezdbfile (
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
) ENGINE=InnoDB""",),
    "ezdbfile_data": ("""CREATE TABLE ezdbfile_data (
  name_hash VARCHAR(34)      NOT NULL DEFAULT '',
  `offset`  INT(11) UNSIGNED NOT NULL,
  filedata  BLOB             NOT NULL,
  PRIMARY KEY (name_hash, `offset`),
  CONSTRAINT ezdbfile_fk1 FOREIGN KEY (name_hash) REFERENCES ezdbfile (name_hash) ON DELETE CASCADE
) ENGINE=InnoDB""",),
}
_PGSQL: dict[str, tuple[str, ...]] = {
    "ezdbfile": (
        """CREATE TABLE ezdbfile (
  datatype   VARCHAR(255) NOT NULL DEFAULT 'application/octet-stream',
  name       TEXT         NOT NULL,
  name_trunk TEXT         NOT NULL,
  name_hash  VARCHAR(34)  NOT NULL PRIMARY KEY,
  scope      VARCHAR(20)  NOT NULL DEFAULT '',
  size       BIGINT       NOT NULL,
  mtime      INTEGER      NOT NULL DEFAULT 0,
  expired    BOOLEAN      NOT NULL DEFAULT FALSE
)""",
        "CREATE INDEX ezdbfile_name ON ezdbfile (name)",
        "CREATE INDEX ezdbfile_name_trunk ON ezdbfile (name_trunk)",
        "CREATE INDEX ezdbfile_mtime ON ezdbfile (mtime)",
        "CREATE INDEX ezdbfile_expired_name ON ezdbfile (expired, name)",
    ),
    "ezdbfile_data": (
        """CREATE TABLE ezdbfile_data (
  name_hash VARCHAR(34) NOT NULL REFERENCES ezdbfile (name_hash) ON DELETE CASCADE,
  "offset"  BIGINT      NOT NULL,
  filedata  BYTEA       NOT NULL,
  PRIMARY KEY (name_hash, "offset")
)""",
        # Images are compressed already: don't spend CPU trying again on TOAST.
        "ALTER TABLE ezdbfile_data ALTER COLUMN filedata SET STORAGE EXTERNAL",
    ),
}
_SQLITE: dict[str, tuple[str, ...]] = {
    "ezdbfile": (
        """CREATE TABLE ezdbfile (
  datatype   TEXT    NOT NULL DEFAULT 'application/octet-stream',
  name       TEXT    NOT NULL,
  name_trunk TEXT    NOT NULL,
  name_hash  TEXT    NOT NULL PRIMARY KEY,
  scope      TEXT    NOT NULL DEFAULT '',
  size       INTEGER NOT NULL,
  mtime      INTEGER NOT NULL DEFAULT 0,
  expired    INTEGER NOT NULL DEFAULT 0
)""",
        "CREATE INDEX ezdbfile_name ON ezdbfile (name)",
        "CREATE INDEX ezdbfile_name_trunk ON ezdbfile (name_trunk)",
        "CREATE INDEX ezdbfile_mtime ON ezdbfile (mtime)",
        "CREATE INDEX ezdbfile_expired_name ON ezdbfile (expired, name)",
    ),
    "ezdbfile_data": ("""CREATE TABLE ezdbfile_data (
  name_hash TEXT    NOT NULL REFERENCES ezdbfile (name_hash) ON DELETE CASCADE,
  "offset"  INTEGER NOT NULL,
  filedata  BLOB    NOT NULL,
  PRIMARY KEY (name_hash, "offset")
)""",),
}
DDL = {"mysql": _MYSQL, "pgsql": _PGSQL, "sqlite": _SQLITE}

_FIRST_COLUMNS = (
    "SELECT f.name_hash, f.datatype, f.size, f.mtime, f.expired, d.filedata FROM ezdbfile f "
    'LEFT JOIN ezdbfile_data d ON d.name_hash = f.name_hash AND d."offset" = 0 '
)
# The row and its first chunk in one round trip: a small file is one query.
FIRST = _FIRST_COLUMNS + "WHERE f.name_hash = ?"
FIRST_MANY = _FIRST_COLUMNS + "WHERE f.name_hash IN (?*)"

# A read's first batch: the chunks of one version overlapping bytes
# start..end, a key range on the primary key (name_hash, offset). The
# sub-select finds the chunk holding `start` whatever the chunk lengths are.
# Joining the file row with its mtime and size makes the rows vanish if the
# file was replaced; expired too, because soft-deleting a file of mtime 0
# leaves its mtime at 0.
CHUNKS = (
    'SELECT d."offset", d.filedata FROM ezdbfile_data d '
    "JOIN ezdbfile f ON f.name_hash = d.name_hash AND f.mtime = ? AND f.size = ? "
    "AND f.expired = ? "
    'WHERE d.name_hash = ? AND d."offset" <= ? AND d."offset" >= '
    '(SELECT COALESCE(MAX("offset"), 0) FROM ezdbfile_data '
    'WHERE name_hash = ? AND "offset" <= ?) '
    'ORDER BY d."offset" LIMIT ?'
)
# The batches after it start where the last one ended: no sub-select, the
# same join.
CHUNKS_AFTER = (
    'SELECT d."offset", d.filedata FROM ezdbfile_data d '
    "JOIN ezdbfile f ON f.name_hash = d.name_hash AND f.mtime = ? AND f.size = ? "
    "AND f.expired = ? "
    'WHERE d.name_hash = ? AND d."offset" >= ? AND d."offset" <= ? ORDER BY d."offset" LIMIT ?'
)
# Offset and length of every chunk of some files, without their bytes (verify).
CHUNK_LAYOUT = (
    'SELECT name_hash, "offset", LENGTH(filedata) FROM ezdbfile_data '
    'WHERE name_hash IN (?*) ORDER BY name_hash, "offset"'
)
DELETE_FILE = "DELETE FROM ezdbfile WHERE name_hash = ?"
DELETE_DATA = "DELETE FROM ezdbfile_data WHERE name_hash = ?"
INSERT_FILE = (
    "INSERT INTO ezdbfile (datatype, name, name_trunk, name_hash, scope, size, mtime, expired) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_CHUNK = 'INSERT INTO ezdbfile_data (name_hash, "offset", filedata) VALUES (?, ?, ?)'


class ChunkLayout(PieceLayout):
    name = "chunks"
    FIRST = FIRST
    FIRST_MANY = FIRST_MANY

    def __init__(self, settings: Settings, driver: Driver) -> None:
        super().__init__(settings, driver, Table("ezdbfile"), DDL[driver.name])

    # -- reads --------------------------------------------------------------------
    async def fetch_chunks(
        self, meta: FileMeta, start: int, end: int, limit: int, aligned: bool = False
    ) -> list[Chunk]:
        """At most `limit` chunks of this version overlapping start..end (pieces.FetchPieces)."""
        h = meta.name_hash
        if aligned:
            rows = await self.driver.fetch(
                CHUNKS_AFTER, meta.mtime, meta.size, False, h, start, end, limit, retry=False
            )
        else:
            rows = await self.driver.fetch(
                CHUNKS, meta.mtime, meta.size, False, h, end, h, start, limit, retry=False
            )
        return [Chunk(o, d) for o, d in rows]

    # -- writes -------------------------------------------------------------------
    async def store(
        self, name: str, pieces: Pieces, *, size: int, mtime: int, datatype: str,
        scope: str,
    ) -> None:
        key = name_hash(name)
        async with self.driver.transaction() as tx:
            await tx.execute(DELETE_DATA, key)
            await tx.execute(DELETE_FILE, key)
            await tx.execute(INSERT_FILE, datatype, name, name, key, scope, size, mtime, False)
            # A MiB of 64 KiB chunks per multi-row insert.
            await insert_pieces(tx, INSERT_CHUNK, key, pieces, size=size, name=name)

    # -- verify ---------------------------------------------------------------------
    async def broken(self, files: Sequence[Row]) -> dict[str, str]:
        hashes = [f[1] for f in files]
        layout: dict[str, list[tuple[int, int]]] = {h: [] for h in hashes}
        for part in pages(hashes):
            for h, offset, length in await self.driver.fetch(
                with_keys(CHUNK_LAYOUT, len(part)), *part
            ):
                layout[h].append((int(offset), int(length)))
        broken = {}
        for _name, h, size, _mtime in files:
            expected = 0
            problem = ""
            for offset, length in layout[h]:
                if offset != expected:
                    problem = f"chunk at {offset}, expected one at {expected}"
                    break
                expected += length
            if not problem and expected != int(size):
                problem = f"chunks hold {expected} bytes, the row says {size}"
            if problem:
                broken[h] = problem
        return broken
