"""Helpers for the DFS tests: eZ's own DDL, rows and files written as eZ writes them, and a
DFS layout that counts its trips to the mount."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from serve_image.app import ServeImage
from serve_image.settings import Settings, settings_from_mapping
from serve_image.storage import Layout, make_layout
from serve_image.storage.layouts.dfs import DfsLayout
from tests.conftest import DatabaseFactory
from tests.helpers import md5

T = TypeVar("T")
IMG = "var/site/storage/images"
MTIME = 1_700_000_000

# eZ Publish `kernel/sql/mysql/cluster_dfs_schema.sql` as eZ ships it: what an
# existing eZ DFS database holds, created here without serve-image's help.
EZ_MYSQL_DDL = [
    """CREATE TABLE ezdfsfile (
  `name` text NOT NULL,
  name_trunk text NOT NULL,
  name_hash varchar(34) NOT NULL DEFAULT '',
  datatype varchar(255) NOT NULL DEFAULT 'application/octet-stream',
  scope varchar(25) NOT NULL DEFAULT '',
  size bigint(20) unsigned NOT NULL DEFAULT '0',
  mtime int(11) NOT NULL DEFAULT '0',
  expired tinyint(1) NOT NULL DEFAULT '0',
  `status` tinyint(1) NOT NULL DEFAULT '0',
  PRIMARY KEY (name_hash),
  KEY ezdfsfile_name (`name`(250)),
  KEY ezdfsfile_name_trunk (name_trunk(250)),
  KEY ezdfsfile_mtime (mtime),
  KEY ezdfsfile_expired_name (expired,`name`(250))
) ENGINE=InnoDB""",
    """CREATE TABLE ezdfsfile_cache (
  `name` text NOT NULL,
  name_trunk text NOT NULL,
  name_hash varchar(34) NOT NULL DEFAULT '',
  datatype varchar(255) NOT NULL DEFAULT 'application/octet-stream',
  scope varchar(25) NOT NULL DEFAULT '',
  size bigint(20) unsigned NOT NULL DEFAULT '0',
  mtime int(11) NOT NULL DEFAULT '0',
  expired tinyint(1) NOT NULL DEFAULT '0',
  PRIMARY KEY (name_hash),
  KEY ezdfsfile_name (`name`(250)),
  KEY ezdfsfile_name_trunk (name_trunk(250)),
  KEY ezdfsfile_mtime (mtime),
  KEY ezdfsfile_expired_name (expired,`name`(250))
) ENGINE=InnoDB""",
]
# eZ's PostgreSQL DFS schema (kernel/sql/postgresql/cluster_dfs_schema.sql of
# eZ 4.x). It has no cache table.
EZ_PGSQL_DDL = [
    """CREATE TABLE ezdfsfile (
    datatype    varchar(60)     DEFAULT 'application/octet-stream' NOT NULL,
    name        text            NOT NULL,
    name_trunk  text            NOT NULL,
    name_hash   character(32)   DEFAULT '' NOT NULL PRIMARY KEY,
    scope       varchar(20)     DEFAULT '' NOT NULL,
    size        integer         DEFAULT 0 NOT NULL,
    mtime       integer         DEFAULT 0 NOT NULL,
    expired     integer         DEFAULT 0 NOT NULL
)""",
    "CREATE INDEX ezdfsfile_name  ON ezdfsfile ( name )",
    "CREATE INDEX ezdfsfile_mtime ON ezdfsfile ( mtime )",
]
EZ_DDL = {"mysql": EZ_MYSQL_DDL, "pgsql": EZ_PGSQL_DDL}


class CountingDfs(DfsLayout):
    """The real DFS layout, with a log of its trips to the mount (by function name)."""

    def __init__(self, settings: Settings, driver: Any) -> None:
        super().__init__(settings, driver)
        self.mount_calls: list[str] = []

    async def on_mount(self, fn: Callable[..., T], *args: Any, bound: float | None = None) -> T:
        name = getattr(fn, "__name__", type(fn).__name__)
        if name != "ping":  # start-up and health checks are not a request's reads
            self.mount_calls.append(name)
        return await super().on_mount(fn, *args, bound=bound)


async def dfs_settings(
    databases: DatabaseFactory, backend: str, mount: Path, *, ez_tables: bool = True,
    **extra: Any,
) -> Settings:
    """A DFS site on a new database of `backend`, its tables made by eZ's own DDL."""
    mount.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - test set-up, local disk
    values = await databases.constants(backend, STORAGE_LAYOUT="dfs",
                                       DFS_MOUNT_POINT=str(mount), **extra)
    settings = settings_from_mapping(values, f"<test dfs {backend}>", "dfs")
    if ez_tables:
        layout = make_layout(settings)
        await layout.connect()
        try:
            for statement in EZ_DDL[backend]:
                await layout.driver.execute(statement)
        finally:
            await layout.close()
    return settings


def counting(settings: Settings) -> CountingDfs:
    return CountingDfs(settings, make_layout(settings, readonly=True).driver)


async def ez_row(layout: Layout, name: str, size: int, *, mtime: int = MTIME,
                 datatype: str = "image/jpeg", scope: str = "image") -> None:
    """The row of a file, as eZ's DFS backend writes it (`_storeInner`, step 1)."""
    values = (datatype, name, name, md5(name), scope, size, mtime, 1 if mtime < 0 else 0)
    columns = "datatype, name, name_trunk, name_hash, scope, size, mtime, expired"
    if layout.settings.backend == "mysql":
        # eZ's mysqli backend: one INSERT ... ON DUPLICATE KEY UPDATE.
        await layout.driver.execute(
            f"INSERT INTO ezdfsfile ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON DUPLICATE KEY UPDATE datatype=VALUES(datatype), scope=VALUES(scope), "
            "size=VALUES(size), mtime=VALUES(mtime), expired=VALUES(expired)", *values)
        return
    # eZ's PostgreSQL backend (`_insertUpdate`): look for the row, then UPDATE or INSERT.
    found = await layout.driver.fetch("SELECT name FROM ezdfsfile WHERE name_hash = ?", md5(name))
    if found:
        await layout.driver.execute(
            "UPDATE ezdfsfile SET datatype=?, scope=?, size=?, mtime=?, expired=? "
            "WHERE name_hash=?", datatype, scope, size, mtime, values[-1], md5(name))
    else:
        await layout.driver.execute(
            f"INSERT INTO ezdfsfile ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", *values)


def ez_copy(mount: Path, name: str, data: bytes) -> Path:
    """The file, as eZ's copyToDFS puts it on the mount (eZFile::create, atomic)."""
    target = mount / name
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")
    temp.write_bytes(data)
    os.replace(temp, target)
    return target


async def ez_store(layout: Layout, mount: Path, name: str, data: bytes, **row: Any) -> None:
    """A file stored as eZ's DFS handler stores it: its row first, then its bytes."""
    await ez_row(layout, name, len(data), **row)
    ez_copy(mount, name, data)


async def ez_delete(layout: Layout, name: str) -> None:
    """eZ's soft delete (mysqli.php `_delete`)."""
    await layout.driver.execute(
        "UPDATE ezdfsfile SET mtime=-ABS(mtime), expired=1 WHERE name_hash=?", md5(name))


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[Layout]:
    layout = make_layout(settings)
    await layout.connect()
    try:
        yield layout
    finally:
        await layout.close()


async def raw_get(
    app: ServeImage, path: str, on_body: Callable[[int], Awaitable[None]] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[str, str], bytes, bool]:
    """A GET through the ASGI app, seeing a response cut off (the last element: complete?)."""
    start: dict[str, Any] = {}
    body = bytearray()
    done = {"complete": False, "asked": False}

    async def receive() -> dict[str, Any]:
        if not done["asked"]:
            done["asked"] = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        body.extend(message.get("body", b""))
        if not message.get("more_body", False):
            done["complete"] = True
        elif on_body is not None:
            await on_body(len(body))

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
             "headers": headers or [], "query_string": b""}
    await app(scope, receive, send)
    got = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], got, bytes(body), done["complete"]
