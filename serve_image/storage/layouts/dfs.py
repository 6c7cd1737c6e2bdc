"""eZ Publish's DFS cluster (4.2 and later): `ezdfsfile` rows, the bytes as files on a mount.

    ezdfsfile (name, name_trunk, name_hash PRIMARY KEY, datatype, scope, size, mtime,
               expired, status)   -- and ezdfsfile_cache, the same for eZ's cache files
    <DFS_MOUNT_POINT>/<name>      -- the bytes, on an NFS mount every node shares

A site picks it with `STORAGE_LAYOUT = "dfs"` on MySQL/MariaDB or
PostgreSQL. The row decides everything but the bytes: a request is
answered from it alone when it can be (304, 412, 416, HEAD), and a row
with `mtime < 0` or `expired = 1` is a 404 whatever the mount holds.
(eZ's own gateway reads only the mtime.)

eZ writes the row first and copies the file after, so a row whose file is
missing or of another size is a write in progress: FileUnavailable, a 503
with a one-second Retry-After before the headers, never a 200 of the wrong
length. Every touch of the mount runs in a bounded pool of threads
(DFS_THREADS) and must answer within DFS_TIMEOUT: a hung NFS server gives
503s (or cuts off a response under way), never a hung request or a blocked
event loop. `mount.py` keeps every path inside the mount.

serve-image's own writes (`import`, `copy`) put the file on the mount
atomically first (temporary file, rename), then write the row as eZ does
(INSERT ... ON DUPLICATE KEY UPDATE on MySQL; ON CONFLICT on PostgreSQL,
where eZ selected first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from serve_image.settings import Settings
from serve_image.storage import mount
from serve_image.storage.drivers.base import Driver, Row
from serve_image.storage.errors import FileUnavailable, StatementFailed, StreamAborted
from serve_image.storage.files import BrokenFile, FileMeta, StoredFile
from serve_image.storage.layout import First
from serve_image.storage.mount import MountError, UnsafeName
from serve_image.storage.names import name_hash
from serve_image.storage.pieces import Pieces, checked_offsets
from serve_image.storage.pool import BoundedPool, PoolTimeout
from serve_image.storage.rows import PAGE, RowLayout, Table, padded, with_keys

T = TypeVar("T")
logger = logging.getLogger("serve_image.dfs")

# eZ Publish `kernel/sql/mysql/cluster_dfs_schema.sql`: the cache table is
# the same but for `status`. Key names are per table in MySQL, as eZ has them.
_MYSQL_COLUMNS = """  `name` text NOT NULL,
  name_trunk text NOT NULL,
  name_hash varchar(34) NOT NULL DEFAULT '',
  datatype varchar(255) NOT NULL DEFAULT 'application/octet-stream',
  scope varchar(25) NOT NULL DEFAULT '',
  size bigint(20) unsigned NOT NULL DEFAULT '0',
  mtime int(11) NOT NULL DEFAULT '0',
  expired tinyint(1) NOT NULL DEFAULT '0',
"""
_MYSQL_KEYS = """  PRIMARY KEY (name_hash),
  KEY ezdfsfile_name (`name`(250)),
  KEY ezdfsfile_name_trunk (name_trunk(250)),
  KEY ezdfsfile_mtime (mtime),
  KEY ezdfsfile_expired_name (expired,`name`(250))
) ENGINE=InnoDB"""
# eZ's PostgreSQL DFS schema (`kernel/sql/postgresql/cluster_dfs_schema.sql`,
# before it moved to the ezpostgresqlcluster extension): character(32) keys,
# integer sizes (no file over 2 GiB) and an integer `expired`. Index names
# are per schema in PostgreSQL: the cache table's carry its own name.
_PGSQL_TABLE = """CREATE TABLE {t} (
    datatype    varchar(60)     DEFAULT 'application/octet-stream' NOT NULL,
    name        text            NOT NULL,
    name_trunk  text            NOT NULL,
    name_hash   character(32)   DEFAULT '' NOT NULL PRIMARY KEY,
    scope       varchar(20)     DEFAULT '' NOT NULL,
    size        integer         DEFAULT 0 NOT NULL,
    mtime       integer         DEFAULT 0 NOT NULL,
    expired     integer         DEFAULT 0 NOT NULL
)"""


def ddl(backend: str, table: str) -> dict[str, tuple[str, ...]]:
    """eZ's DFS tables, `table` and `table`_cache, as eZ creates them on that database."""
    cache = f"{table}_cache"
    if backend == "mysql":
        return {
            table: (f"CREATE TABLE {table} (\n{_MYSQL_COLUMNS}"
                    f"  `status` tinyint(1) NOT NULL DEFAULT '0',\n{_MYSQL_KEYS}",),
            cache: (f"CREATE TABLE {cache} (\n{_MYSQL_COLUMNS}{_MYSQL_KEYS}",),
        }
    return {
        t: (_PGSQL_TABLE.format(t=t), f"CREATE INDEX {t}_name ON {t} ( name )",
            f"CREATE INDEX {t}_mtime ON {t} ( mtime )")
        for t in (table, cache)
    }


_COLUMNS = "datatype, name, name_trunk, name_hash, scope, size, mtime, expired"
# How eZ's DFS backends store a row (mysqli.php `_insertUpdate`): one
# statement, so two writers of one name never collide.
UPSERT = {
    "mysql": (f"INSERT INTO {{t}} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
              "ON DUPLICATE KEY UPDATE datatype = VALUES(datatype), scope = VALUES(scope), "
              "size = VALUES(size), mtime = VALUES(mtime), expired = VALUES(expired)"),
    "pgsql": (f"INSERT INTO {{t}} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
              "ON CONFLICT (name_hash) DO UPDATE SET datatype = EXCLUDED.datatype, "
              "scope = EXCLUDED.scope, size = EXCLUDED.size, mtime = EXCLUDED.mtime, "
              "expired = EXCLUDED.expired"),
}
# Files up to this size are read whole with their row (`first`): one trip to
# the mount for a small image.
WHOLE_READ = 256 * 1024
# Small files read in one trip to the mount's pool, for a batch of requests.
FILES_PER_TRIP = 32
# A body is read this many bytes a trip to the mount (bounded memory per reader).
READ_BYTES = 512 * 1024
# A store writes this many bytes a trip.
WRITE_BYTES = 1024 * 1024
# Writes (import, copy, purge) are not on a request's path: a slow mount gets
# at least this many seconds per step, yet a hung one still ends the command.
WRITE_TIMEOUT = 60.0


# One pool per mount (and bounds) in a process: the two layouts of a site
# that reads from replicas (storage/replicas.py) share it, so a hung NFS
# server holds at most DFS_THREADS threads. Counted, and closed with the last
# layout that uses it.
PoolKey = tuple[str, int, float]
_pools: dict[PoolKey, tuple[BoundedPool, int]] = {}


def _pool_for(settings: Settings) -> BoundedPool:
    root = settings.dfs_mount_point or ""
    key = (root, settings.dfs_threads, settings.dfs_timeout)
    pool, users = _pools.get(key, (None, 0))
    if pool is None or pool.closed:
        pool, users = BoundedPool(settings.dfs_threads, settings.dfs_timeout,
                                  f"the DFS mount {root}", on_exit=mount.forget_roots), 0
    _pools[key] = (pool, users + 1)
    return pool


def _release_pool(pool: BoundedPool) -> None:
    for key, (held, users) in list(_pools.items()):
        if held is pool:
            if users > 1:
                _pools[key] = (held, users - 1)
                return
            del _pools[key]
    pool.close()


@dataclasses.dataclass(frozen=True, slots=True)
class MountedFile(StoredFile):
    """A DFS row; `problem`: why its file could not be read with it (`first`), if it could not."""

    problem: MountError | None = None


def _unavailable(e: MountError) -> FileUnavailable:
    return FileUnavailable(str(e), in_progress=e.in_progress)


def is_cache_path(name: str) -> bool:
    """eZ keeps a name in ezdfsfile_cache, not ezdfsfile, when it is a cache file
    (`dfsmysqli.php` dbTable(): `/cache/` in it and not `/storage/`)."""
    return "/cache/" in name and "/storage/" not in name


class DfsLayout(RowLayout):
    name = "dfs"

    def __init__(self, settings: Settings, driver: Driver) -> None:
        table = settings.dfs_table
        super().__init__(settings, driver, Table(table, expired=(0, 1)), ddl(driver.name, table))
        if settings.dfs_mount_point is None:  # settings.py requires it for this layout
            raise ValueError("the dfs layout needs DFS_MOUNT_POINT")
        self.root = settings.dfs_mount_point
        self.pool = _pool_for(settings)
        self._row = f"SELECT {self.file_columns} FROM {table} WHERE name_hash = ?"
        self._rows = f"SELECT {self.file_columns} FROM {table} WHERE name_hash IN (?*)"
        self._upsert = UPSERT[driver.name].format(t=table)

    # -- life cycle ---------------------------------------------------------------
    async def connect(self) -> None:
        await super().connect()
        if self.pool.closed:
            self.pool = _pool_for(self.settings)

    async def close(self) -> None:
        await super().close()
        _release_pool(self.pool)

    async def ping(self) -> None:
        await self.driver.ping()
        try:
            await self.on_mount(mount.ping, self.root)
        except MountError as e:
            raise FileUnavailable(f"DFS mount {self.root}: {e}") from None

    async def on_mount(self, fn: Callable[..., T], *args: Any, bound: float | None = None,
                       late: Callable[[T], Any] | None = None) -> T:
        """`fn(*args)` in the mount's pool, within DFS_TIMEOUT: the one way to the mount.

        Raises MountError when it fails or takes too long (`late` then gets
        its result, if it comes).
        """
        try:
            return await self.pool.run(fn, *args, bound=bound, late=late)
        except PoolTimeout as e:
            raise MountError(str(e)) from None
        except OSError as e:  # from mount.ping; the others raise MountError themselves
            raise MountError(f"{e.strerror or e}") from None

    # -- reads --------------------------------------------------------------------
    async def meta(self, name_hash: str) -> MountedFile | None:
        row = await self.driver.fetchrow(self._row, name_hash)
        return None if row is None else MountedFile.from_row(row)

    async def meta_many(self, hashes: Sequence[str]) -> dict[str, FileMeta]:
        keys = padded(hashes)
        rows = await self.driver.fetch(with_keys(self._rows, len(keys)), *keys)
        return {r[1]: MountedFile.from_row(r) for r in rows}

    async def _with_bytes(self, f: MountedFile) -> First:
        """A live small file's row and all its bytes; its row alone, saying why, if they fail."""
        if not f.live or f.size > WHOLE_READ:
            return f, None
        try:
            return self._first_of(f, await self.on_mount(mount.read_whole, self.root, f.name,
                                                          f.size))
        except MountError as e:
            return self._first_of(f, e)

    @staticmethod
    def _first_of(f: MountedFile, data: bytes | MountError) -> First:
        if not isinstance(data, MountError):
            return f, data
        # Raised by `check` before any header goes out: each file of a batch
        # fails alone.
        return dataclasses.replace(f, problem=data), None

    async def first(self, name_hash: str) -> First | None:
        f = await self.meta(name_hash)
        return None if f is None else await self._with_bytes(f)

    async def first_many(self, hashes: Sequence[str]) -> dict[str, First]:
        found = [f for f in (await self.meta_many(hashes)).values()
                 if isinstance(f, MountedFile)]
        small = [f for f in found if f.live and f.size <= WHOLE_READ]
        # A few small files per trip to the pool: a trip costs the event loop
        # more than a read from the page cache, and groups still read in
        # parallel from a slow mount. A hung file fails its group alone.
        groups = [small[i:i + FILES_PER_TRIP] for i in range(0, len(small), FILES_PER_TRIP)]
        read = await asyncio.gather(*(self._read_group(g) for g in groups))
        got: dict[str, First] = {f.name_hash: (f, None) for f in found}
        for group, results in zip(groups, read, strict=True):
            for f, data in zip(group, results, strict=True):
                got[f.name_hash] = self._first_of(f, data)
        return got

    async def _read_group(self, group: list[MountedFile]) -> list[bytes | MountError]:
        try:
            return await self.on_mount(mount.read_many, self.root,
                                       [(f.name, f.size) for f in group])
        except MountError as e:
            return [e] * len(group)

    async def _name(self, meta: FileMeta) -> str:
        if isinstance(meta, StoredFile):
            return meta.name
        row = await self.meta(meta.name_hash)
        if row is None:
            raise FileUnavailable(f"{meta.name_hash}: its row is gone")
        return row.name

    async def check(self, meta: FileMeta) -> None:
        if isinstance(meta, MountedFile) and meta.problem is not None:
            raise _unavailable(meta.problem)
        try:
            await self.on_mount(mount.probe, self.root, await self._name(meta), meta.size)
        except MountError as e:
            raise _unavailable(e) from None

    def local_path(self, meta: FileMeta) -> str | None:
        if not isinstance(meta, StoredFile):
            return None
        try:
            return os.path.join(self.root, *mount.segments(meta.name))
        except UnsafeName:
            return None

    async def read(self, meta: FileMeta, start: int, end: int) -> AsyncGenerator[bytes, None]:
        try:
            name = await self._name(meta)
        except FileUnavailable as e:
            raise StreamAborted(str(e)) from None
        version: mount.Version | None = None
        pos = start
        while pos <= end:
            length = min(READ_BYTES, end + 1 - pos)
            try:
                data, seen = await self.on_mount(mount.read_at, self.root, name, meta.size,
                                                 pos, length)
            except MountError as e:
                raise StreamAborted(str(e)) from None
            # Each piece is read from a fresh open: a file renamed over (eZ's
            # replace) since the first piece cuts the response off.
            if version is not None and seen != version:
                raise StreamAborted(f"{name}: replaced on the mount during the response")
            version = seen
            pos += len(data)
            yield data

    # -- writes -------------------------------------------------------------------
    async def store(
        self, name: str, pieces: Pieces, *, size: int, mtime: int, datatype: str,
        scope: str,
    ) -> None:
        try:
            mount.segments(name)
        except UnsafeName as e:
            raise StatementFailed(str(e)) from None
        try:
            # Made after its time was up, it is removed again, not left open on the mount.
            temp = await self.on_mount(mount.TempFile, self.root, name, bound=WRITE_TIMEOUT,
                                       late=mount.TempFile.abort)
        except MountError as e:
            raise self._write_failed(e) from None
        try:
            held: list[bytes] = []
            count = 0
            async for _offset, data in checked_offsets(pieces, size, name):
                held.append(data)
                count += len(data)
                if count >= WRITE_BYTES:
                    await self.on_mount(temp.write, b"".join(held), bound=WRITE_TIMEOUT)
                    held, count = [], 0
            if held:
                await self.on_mount(temp.write, b"".join(held), bound=WRITE_TIMEOUT)
            await self.on_mount(temp.commit, size, mtime, bound=WRITE_TIMEOUT)
        except MountError as e:
            await self._abort(temp)
            raise self._write_failed(e) from None
        except Exception:
            await self._abort(temp)
            raise
        except BaseException:  # cancelled: clean up without waiting
            self.pool.submit(temp.abort)
            raise
        # The file is in place: now its row, as eZ writes it.
        await self.driver.execute(self._upsert, datatype, name, name, name_hash(name), scope, size,
                                  mtime, 1 if mtime < 0 else 0)

    async def _abort(self, temp: mount.TempFile) -> None:
        """Remove a write's temporary file before its failure is reported."""
        try:
            await self.on_mount(temp.abort, bound=WRITE_TIMEOUT)
        except MountError as e:
            logger.warning("%s: its temporary file stays on the mount: %s", temp.name, e)

    @staticmethod
    def _write_failed(e: MountError) -> Exception:
        # A file the mount refuses (a directory in its place, ...) is that
        # file's failure; anything else is the mount's, and ends the command.
        if e.in_progress or isinstance(e, UnsafeName):
            return StatementFailed(f"the mount refused it: {e}")
        return FileUnavailable(f"DFS mount {e}")

    async def remove(self, rows: Sequence[Row], cutoff: int) -> int:
        """Each row deleted if still gone and old, as eZ's clusterpurge does; then its file."""
        statement = with_keys(self.purge_rows, 1)
        purged = []
        for name, h, _size in rows:
            if await self.driver.execute(statement, h, *self._gone_args, cutoff):
                purged.append((name, h))
        # A name stored anew since its row was deleted keeps its (new) file.
        again = await self.stat_many([h for _name, h in purged]) if purged else {}
        for name, h in purged:
            if h in again:
                continue
            try:
                await self.on_mount(mount.remove, self.root, name, bound=WRITE_TIMEOUT)
            except MountError as e:
                logger.warning("purged the row of %s, but not its file: %s", name, e)
        return len(purged)

    # -- verify -------------------------------------------------------------------
    async def broken(self, files: Sequence[Row]) -> dict[str, str]:
        async def problem(name: str, size: int) -> str | None:
            try:
                st = await self.on_mount(mount.file_stat, self.root, name)
            except MountError as e:
                return str(e)
            if st is None:
                return "no file on the mount"
            if not stat.S_ISREG(st.st_mode):
                return "not a regular file on the mount (a symbolic link is never followed)"
            if st.st_size != int(size):
                return f"{st.st_size} bytes on the mount, the row says {size}"
            return None

        found = await asyncio.gather(*(problem(name, size) for name, _h, size, _m in files))
        return {f[1]: p for f, p in zip(files, found, strict=True) if p is not None}

    async def verify(self, page: int = 200) -> AsyncIterator[BrokenFile]:
        async for broken in super().verify(page):
            yield broken
        async for broken in self._files_without_rows():
            yield broken

    async def _files_without_rows(self) -> AsyncIterator[BrokenFile]:
        """Files on the mount that no row of the table names (eZ's cache files aside)."""
        pending = [""]
        while pending:
            directory = pending.pop()
            try:
                entries = await self.on_mount(mount.list_dir, self.root, directory,
                                              bound=WRITE_TIMEOUT)
            except MountError as e:
                yield BrokenFile(directory or ".", 0, f"cannot list it: {e}")
                continue
            files = []
            for entry in sorted(entries, key=lambda e: e.name, reverse=True):
                if entry.kind == "dir":
                    pending.append(entry.name)
                elif entry.name.endswith(mount.TEMP_SUFFIX):
                    if mount.is_stale_temp(entry):
                        yield BrokenFile(entry.name, entry.size,
                                         "a temporary file left by an interrupted write")
                elif is_cache_path(entry.name):
                    continue  # in ezdfsfile_cache: not served, not this table's
                elif entry.kind != "file":
                    yield BrokenFile(entry.name, entry.size,
                                     f"a {entry.kind} on the mount, never served")
                else:
                    files.append(entry)
            for i in range(0, len(files), PAGE):
                part = files[i:i + PAGE]
                rows = await self.stat_many([name_hash(f.name) for f in part])
                for f in part:
                    if name_hash(f.name) not in rows:
                        yield BrokenFile(f.name, f.size,
                                         f"on the mount, no row in {self.table.name}")
