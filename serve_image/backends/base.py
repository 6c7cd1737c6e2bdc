"""The one small interface every database backend implements."""

from __future__ import annotations

import abc
import hashlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from serve_image.backends import sql
from serve_image.errors import DatabaseUnavailable, StatementFailed, StreamAborted
from serve_image.settings import Settings

logger = logging.getLogger("serve_image.backend")


@dataclass(frozen=True, slots=True)
class FileMeta:
    """One `ezdbfile` row: what identifies a version of a file."""

    name_hash: str
    datatype: str
    size: int
    mtime: int
    expired: bool

    @property
    def live(self) -> bool:
        # eZ deletes softly: mtime = -abs(mtime), expired = 1. Either means gone.
        return self.mtime >= 0 and not self.expired


@dataclass(frozen=True, slots=True)
class Chunk:
    """One `ezdbfile_data` row; its position is `offset`, never its index."""

    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A row as listed by management commands."""

    name: str
    name_hash: str
    datatype: str
    scope: str
    size: int
    mtime: int
    expired: bool

    @property
    def live(self) -> bool:
        return self.mtime >= 0 and not self.expired

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StoredFile:
        """From sql.FILE_COLUMNS."""
        return cls(row[0], row[1], row[2], row[3], int(row[4]), int(row[5]), bool(row[6]))


@dataclass(frozen=True, slots=True)
class BrokenFile:
    """A live file whose chunks do not add up to its size (`verify`)."""

    name: str
    size: int
    problem: str


def name_hash(name: str) -> str:
    """eZ's key of a file: md5 of its name, lower-case hex."""
    return hashlib.md5(name.encode("utf-8")).hexdigest()


def wildcard_to_like(pattern: str) -> str:
    """eZ's delete wildcard as a LIKE pattern: `*` any run (slashes too), `?` one character."""
    return sql.escape_like(pattern).replace("*", "%").replace("?", "_")


def wildcard_to_regex(pattern: str) -> re.Pattern[str]:
    """The same wildcard, matched exactly: LIKE ignores case in MySQL's and SQLite's defaults."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


# After a failed connect, answer 503 at once for this long instead of making
# every request wait for its own failed connect; short enough that requests
# succeed again well within a second of the database returning.
BREAKER_SECONDS = 0.25


class Backend(abc.ABC):
    """Reads (the endpoint) and writes (the command line) of the cluster tables.

    Every method raises DatabaseUnavailable, with a message that never holds
    the password, when the database cannot answer.
    """

    def __init__(self, settings: Settings, *, readonly: bool = False) -> None:
        self.settings = settings
        self.readonly = readonly
        self._down_until = 0.0

    # -- life cycle -------------------------------------------------------
    @abc.abstractmethod
    async def connect(self) -> None:
        """Create the pool; must not fail when the database is down."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the pool and every connection."""

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless a query gets through."""
        await self.fetch_meta("0" * 32)

    # -- reads ------------------------------------------------------------
    @abc.abstractmethod
    async def fetch_meta(self, name_hash: str) -> FileMeta | None:
        """The file's row, without reading any chunk."""

    @abc.abstractmethod
    async def fetch_first(self, name_hash: str) -> tuple[FileMeta, bytes | None] | None:
        """The row and its chunk at offset 0 in one round trip (a small file in one query)."""

    @abc.abstractmethod
    async def fetch_chunks(self, meta: FileMeta, start: int, end: int, limit: int) -> list[Chunk]:
        """At most `limit` chunks of this version of the file that overlap bytes start..end.

        Ordered by offset; the first one holds byte `start`. Returns no rows
        when the file's row no longer has this mtime and size (replaced or
        deleted), so a response never mixes two versions.
        """

    # -- writes -----------------------------------------------------------
    @abc.abstractmethod
    async def create_tables(self) -> None:
        """Create the cluster tables if absent; never drops anything."""

    @abc.abstractmethod
    async def store(
        self, name: str, chunks: Iterable[bytes], *, size: int, mtime: int,
        datatype: str, scope: str,
    ) -> None:
        """Store or replace a file in one transaction: readers see the old or the new."""

    @abc.abstractmethod
    async def execute(self, sql: str, *args: object) -> None:
        """Run one statement in its own transaction (tests and maintenance)."""

    # -- file management, written once over two primitives -------------------
    @abc.abstractmethod
    async def query(self, statement: str, *args: object) -> list[tuple[Any, ...]]:
        """The rows of one SELECT written in sql.py's dialect (`?`, `"offset"`)."""

    @abc.abstractmethod
    async def update(self, statement: str, *args: object) -> int:
        """Run one INSERT, UPDATE or DELETE in its own transaction; the rows it changed."""

    async def stat_file(self, name: str) -> StoredFile | None:
        """The file's row, deleted or not."""
        rows = await self.query(sql.STAT, name_hash(name))
        return StoredFile.from_row(rows[0]) if rows else None

    async def stat_many(self, hashes: Sequence[str]) -> dict[str, StoredFile]:
        """Rows by name hash, in one query per 500 (an import checks a batch at once)."""
        found: dict[str, StoredFile] = {}
        for i in range(0, len(hashes), 500):
            part = hashes[i:i + 500]
            for row in await self.query(sql.stat_many(len(part)), *part):
                found[row[1]] = StoredFile.from_row(row)
        return found

    async def list_files(
        self, prefix: str = "", *, scope: str | None = None, include_deleted: bool = False,
        page: int = 500,
    ) -> AsyncIterator[StoredFile]:
        """Rows whose name starts with `prefix`, by name, a page per query."""
        async for f in self._matching(
            sql.like_prefix(prefix), lambda name: name.startswith(prefix),
            scope=scope, include_deleted=include_deleted, page=page,
        ):
            yield f

    async def _matching(
        self, like: str, keep: Callable[[str], bool], *, scope: str | None,
        include_deleted: bool, page: int,
    ) -> AsyncIterator[StoredFile]:
        statement = sql.list_files(scope=scope is not None, live=not include_deleted)
        after = ("", "")
        while True:
            args: list[object] = [like, after[0], after[0], after[1]]
            if scope is not None:
                args.append(scope)
            if not include_deleted:
                args.append(False)
            rows = await self.query(statement, *args, page)
            for row in rows:
                # LIKE ignores case in MySQL's `_ci` collations and in SQLite:
                # the exact test is made here.
                if keep(row[0]):
                    yield StoredFile.from_row(row)
            if len(rows) < page:
                return
            after = (rows[-1][0], rows[-1][1])

    async def soft_delete(self, name: str) -> bool:
        """eZ's delete: `mtime = -abs(mtime), expired = 1`; False if no live file had the name."""
        return await self.update(sql.SOFT_DELETE_ONE, True, name_hash(name), False) > 0

    async def delete_by_wildcard(self, pattern: str) -> list[str]:
        """Soft-delete every live file whose name matches `pattern`; the names deleted."""
        exact = wildcard_to_regex(pattern)
        names = [
            f.name async for f in self._matching(
                wildcard_to_like(pattern), lambda name: exact.fullmatch(name) is not None,
                scope=None, include_deleted=False, page=500,
            )
        ]
        deleted: list[str] = []
        for i in range(0, len(names), 500):
            part = names[i:i + 500]
            await self.update(
                sql.soft_delete_many(len(part)), True, *[name_hash(n) for n in part], False
            )
            deleted += part
        return deleted

    async def purge(self, cutoff: int, *, dry_run: bool = False) -> tuple[int, int]:
        """Physically remove soft-deleted rows whose mtime is before `cutoff`: (files, bytes)."""
        files = size = 0
        after = ""
        while True:
            rows = await self.query(sql.PURGE_CANDIDATES, True, cutoff, after, 500)
            if not rows:
                return files, size
            after = rows[-1][1]
            if dry_run:
                files += len(rows)
                size += sum(int(r[2]) for r in rows)
                continue
            hashes = [r[1] for r in rows]
            files += await self.update(sql.purge_many(len(hashes)), *hashes, True, cutoff)
            size += sum(int(r[2]) for r in rows)

    async def verify(self, page: int = 200) -> AsyncIterator[BrokenFile]:
        """Live files whose chunks leave a gap, overlap, or do not add up to the size."""
        after = ""
        while True:
            files = await self.query(sql.VERIFY_FILES, after, False, page)
            if not files:
                return
            after = files[-1][1]
            broken = await self._check_layout(files)
            if broken:
                # Checked twice: a file replaced between the two queries of
                # the first check is not broken.
                again = await self.query(
                    sql.stat_many(len(broken)), *[h for h, _ in broken]
                )
                rows = [(r[0], r[1], r[4], r[5]) for r in again if int(r[5]) >= 0]
                for h, problem in await self._check_layout(rows) if rows else []:
                    row = next(r for r in rows if r[1] == h)
                    yield BrokenFile(row[0], int(row[2]), problem)

    async def _check_layout(self, files: Sequence[Sequence[Any]]) -> list[tuple[str, str]]:
        hashes = [f[1] for f in files]
        layout: dict[str, list[tuple[int, int]]] = {h: [] for h in hashes}
        for h, offset, length in await self.query(sql.chunk_layout(len(hashes)), *hashes):
            layout[h].append((int(offset), int(length)))
        broken = []
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
                broken.append((h, problem))
        return broken

    # -- failure handling shared by the drivers -----------------------------
    def check_breaker(self) -> None:
        if self._down_until and time.monotonic() < self._down_until:
            raise DatabaseUnavailable(f"{self.settings.describe()}: down, retrying shortly")

    def unavailable(self, exc: BaseException, doing: str) -> DatabaseUnavailable:
        """Log a driver error once and trip the breaker; never shows the password."""
        self._down_until = time.monotonic() + BREAKER_SECONDS
        message = f"{self.settings.describe()}: {doing}: {type(exc).__name__}: {exc}"
        if self.settings.password:
            message = message.replace(self.settings.password, "***")
        logger.warning("database unavailable: %s", message)
        return DatabaseUnavailable(message)

    def healthy(self) -> None:
        self._down_until = 0.0


# A body is read this many bytes at a time (whole chunk rows, at least one):
# few round trips for big files, bounded memory per reader.
BATCH_BYTES = 512 * 1024
# Rows in a file's first batch, before the stored chunks' length is known.
FIRST_BATCH_ROWS = 4


async def read_range(
    backend: Backend, meta: FileMeta, start: int, end: int
) -> AsyncGenerator[bytes, None]:
    """Bytes start..end of this version of a file, checked, in pieces of chunk rows.

    Raises StreamAborted when the file was replaced or deleted since `meta`
    was read, when its chunks leave a gap or run past its size, or when the
    database is lost: a reader never gets bytes of two versions or a wrong
    byte. The pool's connection is taken per batch of rows and given back
    before a piece is yielded.
    """
    pos, limit = start, FIRST_BATCH_ROWS
    while pos <= end:
        try:
            chunks = await backend.fetch_chunks(meta, pos, end, limit)
        except DatabaseUnavailable as e:
            raise StreamAborted(f"database lost: {e}") from None
        except StatementFailed as e:
            raise StreamAborted(f"read refused: {e}") from None
        if not chunks:
            raise StreamAborted("file replaced, deleted or missing chunks")
        longest = 0
        for chunk in chunks:
            length = len(chunk.data)
            longest = max(longest, length)
            if not chunk.offset <= pos < chunk.offset + length:
                raise StreamAborted(f"no chunk holds byte {pos}")
            if chunk.offset + length > meta.size:
                raise StreamAborted("chunks add up to more than the file's size")
            lo, hi = pos - chunk.offset, min(length, end + 1 - chunk.offset)
            piece = chunk.data if lo == 0 and hi == length else chunk.data[lo:hi]
            pos += len(piece)
            yield piece
            if pos > end:
                break
        # Batches are sized from the rows as stored, not from the site's
        # STORAGE_CHUNK_SIZE: a database written with other chunks (another
        # eZ DBChunkSize) must not make one query fetch thousands of rows.
        limit = max(1, BATCH_BYTES // max(1, longest))
