"""An existing eZ Publish 3.10-4.6 cluster database on MariaDB, served as it is.

The tables are created from eZ's own DDL (`kernel/sql/mysql/cluster_schema.sql`
of 4.x, datatype VARCHAR(60)) and the rows written with plain SQL the way
eZ's `eZDBFileHandlerMysqlBackend` wrote them: a latin1 connection, string
literals escaped like mysql_real_escape_string, `MD5(name)` computed by the
server, chunks of DBChunkSize bytes, deletes as `mtime = -ABS(mtime), expired = 1`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serve_image.app import ServeImage
from serve_image.settings import Settings, settings_from_mapping
from tests.conftest import DatabaseFactory
from tests.helpers import payload, running

pytestmark = pytest.mark.mysql

# eZ's DDL, with one change: `offset` is back-quoted. eZ wrote it bare, and
# MariaDB 10.6+ (this suite runs on 10.11) refuses that: OFFSET became a
# reserved word (MariaDB's "Reserved Words" list).
EZ_DDL = (
    """CREATE TABLE ezdbfile (
  datatype      VARCHAR(60)   NOT NULL DEFAULT 'application/octet-stream',
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
) ENGINE=InnoDB""",
    """CREATE TABLE ezdbfile_data (
  name_hash VARCHAR(34)   NOT NULL DEFAULT '',
  `offset`  INT(11) UNSIGNED NOT NULL,
  filedata  BLOB          NOT NULL,
  PRIMARY KEY (name_hash, `offset`),
  CONSTRAINT ezdbfile_fk1 FOREIGN KEY (name_hash) REFERENCES ezdbfile (name_hash) ON DELETE CASCADE
) ENGINE=InnoDB""",
)

DB_CHUNK_SIZE = 65535  # eZ's DBChunkSize
IMG = "var/intranet/storage/images"
PHOTO = f"{IMG}/news/harbour/12-3-eng-GB/harbour.jpg"
PHOTO_DATA = payload(150_000, seed=46)  # three chunks: 65535, 65535, 18930
GONE = f"{IMG}/news/old/7-1-eng-GB/old.png"
MISC = f"{IMG}/files/report/9-1-eng-GB/report.bin"
MTIME = 1_262_304_000


_ESCAPES = {0: b"\\0", 10: b"\\n", 13: b"\\r", 26: b"\\Z", 39: b"\\'", 34: b'\\"', 92: b"\\\\"}


def _literal(data: bytes) -> bytes:
    """A quoted literal as mysql_real_escape_string made it: raw bytes, six escaped."""
    return b"'" + b"".join(_ESCAPES.get(c, bytes((c,))) for c in data) + b"'"


def _sql(*parts: str | bytes) -> bytes:
    # PHP sent the statement as bytes; PyMySQL would re-encode a str as cp1252.
    return b"".join(p if isinstance(p, bytes) else p.encode("ascii") for p in parts)


async def _ez_connection(values: dict[str, Any]) -> Any:
    import aiomysql

    return await aiomysql.connect(
        host=values["STORAGE_HOST"], port=values["STORAGE_PORT"], user=values["STORAGE_USER"],
        password=values["STORAGE_PASS"], db=values["STORAGE_DB"], charset="latin1",
        autocommit=True,
    )


async def _ez_store(cur: Any, name: str, datatype: str, data: bytes, mtime: int) -> None:
    """eZDBFileHandlerMysqlBackend::_storeInner, as SQL text."""
    quoted = _literal(name.encode("ascii"))
    await cur.execute(_sql(
        "INSERT INTO ezdbfile (datatype, name, name_trunk, name_hash, scope, size, mtime, expired) "
        "VALUES (", _literal(datatype.encode()), ", ", quoted, ", ", quoted, ", MD5(", quoted,
        f"), 'image', {len(data)}, {mtime}, 0) ON DUPLICATE KEY UPDATE datatype=VALUES(datatype), "
        "scope=VALUES(scope), size=VALUES(size), mtime=VALUES(mtime), expired=VALUES(expired)",
    ))
    for offset in range(0, len(data), DB_CHUNK_SIZE):
        chunk = data[offset:offset + DB_CHUNK_SIZE]
        await cur.execute(_sql(
            "INSERT INTO ezdbfile_data (name_hash, `offset`, filedata) VALUES (MD5(", quoted,
            f"), {offset}, ", _literal(chunk),
            ") ON DUPLICATE KEY UPDATE filedata=VALUES(filedata)",
        ))


@pytest.fixture(scope="module")
async def ez_site(databases: DatabaseFactory) -> AsyncIterator[tuple[Settings, Any]]:
    values = await databases.constants("mysql", STORAGE_CHUNK_SIZE=DB_CHUNK_SIZE,
                                       VAR_DIR="var/intranet")
    conn = await _ez_connection(values)
    async with conn.cursor() as cur:
        for stmt in EZ_DDL:
            await cur.execute(stmt)
        await _ez_store(cur, PHOTO, "image/jpeg", PHOTO_DATA, MTIME)
        await _ez_store(cur, GONE, "image/png", b"\x89PNG old", MTIME)
        await cur.execute(_sql(
            "UPDATE ezdbfile SET mtime=-ABS(mtime), expired=1 WHERE name_hash=MD5(",
            _literal(GONE.encode()), ")",
        ))
        await _ez_store(cur, MISC, "misc", b"\x00\x01binary\r\n\x1a'\\", MTIME)
    yield settings_from_mapping(values, "sites/intranet.py", "intranet"), conn
    conn.close()


@pytest.fixture
async def ez_client(ez_site: tuple[Settings, Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with running(ServeImage(ez_site[0]), "http://testserver") as c:
        yield c


async def _rows_of(cur: Any, name: str) -> tuple[Any, ...]:
    """A file's row (name aside) and its chunks' offsets, lengths and digests."""
    await cur.execute(
        "SELECT datatype, name_trunk = name, name_hash = MD5(name), scope, size, mtime, expired "
        "FROM ezdbfile WHERE name = %s", (name,),
    )
    row = await cur.fetchone()
    await cur.execute(
        "SELECT d.`offset`, LENGTH(d.filedata), MD5(d.filedata) FROM ezdbfile_data d "
        "JOIN ezdbfile f ON f.name_hash = d.name_hash WHERE f.name = %s ORDER BY d.`offset`",
        (name,),
    )
    return row, await cur.fetchall()


@pytest.mark.parametrize(("name", "datatype", "data"), [
    (PHOTO, "image/jpeg", PHOTO_DATA),
    (MISC, "misc", b"\x00\x01binary\r\n\x1a'\\"),
])
async def test_serve_image_writes_the_rows_ez_writes(
    ez_site: tuple[Settings, Any], name: str, datatype: str, data: bytes
) -> None:
    """The same file stored by serve-image under another name: the same row, the same chunks."""
    from serve_image.cluster import ClusterFiles

    copy = name.replace(f"{IMG}/", f"{IMG}/copies/")
    async with ClusterFiles.open(ez_site[0]) as cluster:
        await cluster.store_contents(copy, data, datatype=datatype, mtime=MTIME)
    async with ez_site[1].cursor() as cur:
        ez = await _rows_of(cur, name)
        ours = await _rows_of(cur, copy)
    assert ez[0] == (datatype, 1, 1, "image", len(data), MTIME, 0)
    assert ours == ez


async def test_management_reads_the_rows_ez_wrote(ez_site: tuple[Settings, Any]) -> None:
    from serve_image.storage import StoredFile, make_layout, name_hash

    b = make_layout(ez_site[0], readonly=True)
    await b.connect()
    try:
        listed = [f async for f in b.list_files(f"{IMG}/news/", include_deleted=True)]
        live = [f.name async for f in b.list_files(IMG)]
        broken = [f async for f in b.verify()]
    finally:
        await b.close()
    assert listed == [
        StoredFile(name=PHOTO, name_hash=name_hash(PHOTO), datatype="image/jpeg",
                   scope="image", size=150_000, mtime=MTIME, expired=False),
        StoredFile(name=GONE, name_hash=name_hash(GONE), datatype="image/png", scope="image",
                   size=8, mtime=-MTIME, expired=True),
    ]
    assert GONE not in live and PHOTO in live and MISC in live
    assert broken == []


async def test_chunked_file_is_served_exactly(ez_client: httpx.AsyncClient) -> None:
    r = await ez_client.get(f"/{PHOTO}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["content-length"] == "150000"
    assert r.content == PHOTO_DATA


async def test_range_across_ez_chunks(ez_client: httpx.AsyncClient) -> None:
    r = await ez_client.get(f"/{PHOTO}", headers={"Range": "bytes=65530-131075"})
    assert r.status_code == 206
    assert r.content == PHOTO_DATA[65530:131076]


async def test_soft_deleted_row_is_404(ez_client: httpx.AsyncClient) -> None:
    r = await ez_client.get(f"/{GONE}")
    assert r.status_code == 404


async def test_misc_datatype_is_octet_stream(ez_client: httpx.AsyncClient) -> None:
    r = await ez_client.get(f"/{MISC}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == b"\x00\x01binary\r\n\x1a'\\"


# Regression: CREATE TABLE IF NOT EXISTS on an existing table made MariaDB send
# a note that aiomysql raised as a warning (an error under this suite's
# filterwarnings); create_tables now creates only the missing tables.
async def test_create_tables_leaves_ez_tables_alone(ez_site: tuple[Settings, Any]) -> None:
    from serve_image.storage import make_layout

    b = make_layout(ez_site[0])
    await b.connect()
    await b.create_tables()
    await b.close()
    async with ez_site[1].cursor() as cur:
        await cur.execute(
            "SELECT CHARACTER_MAXIMUM_LENGTH FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ezdbfile' "
            "AND COLUMN_NAME = 'datatype'"
        )
        assert await cur.fetchone() == (60,)
