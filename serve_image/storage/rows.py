"""What every eZ layout shares: one metadata row per file, and the management written once.

`ezdbfile` (the database cluster, both its chunk and large-object forms)
and `ezdfsfile` (DFS) hold the same row per file: name, name_hash (md5 of
the name, the key), datatype, scope, size, mtime and, but in eZ 3.8's
large-object table, expired. Reading rows, listing, eZ's soft delete, the
wildcard delete, the purge and the verify loop are written here once over
a `Table`; a layout adds where the bytes are.

Statements are in the drivers' neutral dialect (`?`, `"quoted"`). Every
value is a bound parameter, booleans included (`expired = ?`: PostgreSQL's
BOOLEAN does not compare with 1, an INTEGER column does not compare with
TRUE). LIKE patterns escape with `!` (names.escape_like).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from serve_image.settings import Settings
from serve_image.storage.drivers.base import Driver, Row, Transaction
from serve_image.storage.files import BrokenFile, FileMeta, StoredFile
from serve_image.storage.layout import First, Layout
from serve_image.storage.names import like_prefix, name_hash, wildcard_to_like, wildcard_to_regex
from serve_image.storage.pieces import Chunk, Pieces, checked_offsets, read_pieces

# Names looked up in one statement by the management commands.
PAGE = 500


@functools.lru_cache(maxsize=512)
def with_keys(template: str, count: int) -> str:
    """`template` with its `(?*)` turned into a list of `count` placeholders."""
    return template.replace("(?*)", f"({', '.join('?' * count)})")


def padded(keys: Sequence[str]) -> list[str]:
    """Keys to a power-of-two count, the last one repeated: with batches of at most 64
    (batching.py), a driver that prepares statements sees at most seven distinct ones."""
    size = 1
    while size < len(keys):
        size *= 2
    return [*keys, *[keys[-1]] * (size - len(keys))]


def pages(keys: Sequence[str], size: int = PAGE) -> Iterator[Sequence[str]]:
    for i in range(0, len(keys), size):
        yield keys[i:i + size]


async def insert_pieces(
    tx: Transaction, statement: str, key: object, pieces: Pieces, *, size: int,
    name: str, per_trip: int = 16,
) -> None:
    """Run `statement` with (key, offset, piece) for every piece, `per_trip` rows a round trip."""
    batch: list[tuple[object, int, bytes]] = []
    async for offset, data in checked_offsets(pieces, size, name):
        batch.append((key, offset, data))
        if len(batch) == per_trip:
            await tx.executemany(statement, batch)
            batch = []
    if batch:
        await tx.executemany(statement, batch)


@dataclass(frozen=True)
class Table:
    """A metadata table: its name and how it says that a row is deleted."""

    name: str
    # The expired column, with its bound values for false and true; None for
    # a table that has none (eZ 3.8 deleted for good): there a row is gone
    # when its mtime is negative.
    expired: tuple[object, object] | None = (False, True)

    @property
    def expired_column(self) -> str:
        return "mtime < 0" if self.expired is None else "expired"

    @property
    def live(self) -> tuple[str, tuple[object, ...]]:
        if self.expired is None:
            return "mtime >= 0", ()
        return "mtime >= 0 AND expired = ?", (self.expired[0],)

    @property
    def gone(self) -> tuple[str, tuple[object, ...]]:
        if self.expired is None:
            return "mtime < 0", ()
        return "(mtime < 0 OR expired = ?)", (self.expired[1],)

    @property
    def soft_delete(self) -> tuple[str, tuple[object, ...]]:
        """eZ's delete: `mtime = -ABS(mtime), expired = 1`."""
        if self.expired is None:
            # No expired column: a file of mtime 0 gets -1, so that it is gone too.
            return "mtime = -(CASE WHEN mtime > 0 THEN mtime ELSE 1 END)", ()
        return "mtime = -ABS(mtime), expired = ?", (self.expired[1],)


class RowLayout(Layout):
    """A layout with one `Table` row per file; subclasses say where the bytes are."""

    def __init__(
        self, settings: Settings, driver: Driver, table: Table, ddl: Mapping[str, Sequence[str]],
    ) -> None:
        super().__init__(settings, driver)
        self.table = table
        # table name -> its CREATE TABLE (and CREATE INDEX) statements, in order.
        self.ddl = ddl
        t, expired = table.name, table.expired_column
        live, self._live_args = table.live
        gone, self._gone_args = table.gone
        soft, self._soft_args = table.soft_delete
        self.meta_columns = f"name_hash, datatype, size, mtime, {expired}"
        self.file_columns = f"name, name_hash, datatype, scope, size, mtime, {expired}"
        self._meta = f"SELECT {self.meta_columns} FROM {t} WHERE name_hash = ?"
        self._meta_many = f"SELECT {self.meta_columns} FROM {t} WHERE name_hash IN (?*)"
        self._stat_many = f"SELECT {self.file_columns} FROM {t} WHERE name_hash IN (?*)"
        self._soft_delete = f"UPDATE {t} SET {soft} WHERE name_hash = ? AND {live}"
        self._soft_delete_many = f"UPDATE {t} SET {soft} WHERE name_hash IN (?*) AND {live}"
        # Soft-deleted rows whose (last known) mtime is before a cutoff: eZ
        # records no deletion time, so clusterpurge.php ages a row by its mtime.
        self._purge_candidates = (
            f"SELECT name, name_hash, size FROM {t} WHERE {gone} AND ABS(mtime) < ? "
            "AND name_hash > ? ORDER BY name_hash LIMIT ?"
        )
        # The condition is checked again: a file stored anew since it was
        # listed is live and stays.
        self.purge_rows = f"DELETE FROM {t} WHERE name_hash IN (?*) AND {gone} AND ABS(mtime) < ?"
        self._verify_page = (
            f"SELECT name, name_hash, size, mtime FROM {t} WHERE name_hash > ? AND {live} "
            "ORDER BY name_hash LIMIT ?"
        )
        self._list = {
            (scoped, live_only): self._list_statement(scoped, live_only, live)
            for scoped in (False, True) for live_only in (False, True)
        }

    def _list_statement(self, scoped: bool, live_only: bool, live: str) -> str:
        """One page of rows under a LIKE prefix, after the key (name, name_hash).

        Paging on (name, name_hash) is exact in any collation: MySQL's `_ci`
        collations make different names compare equal, the hash breaks the tie.
        """
        where = ["name LIKE ? ESCAPE '!'", "(name > ? OR (name = ? AND name_hash > ?))"]
        if scoped:
            where.append("scope = ?")
        if live_only:
            where.append(live)
        return (
            f"SELECT {self.file_columns} FROM {self.table.name} WHERE {' AND '.join(where)} "
            "ORDER BY name, name_hash LIMIT ?"
        )

    async def create_tables(self) -> None:
        await self.driver.prepare()
        existing = await self.driver.table_names()
        for table, statements in self.ddl.items():
            # Only the missing ones: an existing eZ table is never touched (and
            # CREATE TABLE IF NOT EXISTS makes MariaDB send a note that the
            # MySQL drivers raise as a warning).
            if table not in existing:
                for statement in statements:
                    await self.driver.execute(statement)

    # -- reads for serving ----------------------------------------------------------
    async def meta(self, name_hash: str) -> FileMeta | None:
        row = await self.driver.fetchrow(self._meta, name_hash)
        return None if row is None else FileMeta.from_row(row)

    async def meta_many(self, hashes: Sequence[str]) -> dict[str, FileMeta]:
        keys = padded(hashes)
        rows = await self.driver.fetch(with_keys(self._meta_many, len(keys)), *keys)
        return {r[0]: FileMeta.from_row(r) for r in rows}

    # -- management ---------------------------------------------------------------
    async def stat_many(self, hashes: Sequence[str]) -> dict[str, StoredFile]:
        found: dict[str, StoredFile] = {}
        for part in pages(hashes):
            for row in await self.driver.fetch(with_keys(self._stat_many, len(part)), *part):
                found[row[1]] = StoredFile.from_row(row)
        return found

    async def list_files(
        self, prefix: str = "", *, scope: str | None = None, include_deleted: bool = False,
    ) -> AsyncIterator[StoredFile]:
        async for f in self._matching(
            like_prefix(prefix), lambda name: name.startswith(prefix),
            scope=scope, include_deleted=include_deleted,
        ):
            yield f

    async def _matching(
        self, like: str, keep: Callable[[str], bool], *, scope: str | None,
        include_deleted: bool,
    ) -> AsyncIterator[StoredFile]:
        statement = self._list[(scope is not None, not include_deleted)]
        after = ("", "")
        while True:
            args: list[object] = [like, after[0], after[0], after[1]]
            if scope is not None:
                args.append(scope)
            if not include_deleted:
                args += self._live_args
            rows = await self.driver.fetch(statement, *args, PAGE)
            for row in rows:
                # LIKE ignores case in MySQL's `_ci` collations and in SQLite:
                # the exact test is made here.
                if keep(row[0]):
                    yield StoredFile.from_row(row)
            if len(rows) < PAGE:
                return
            after = (rows[-1][0], rows[-1][1])

    async def delete(self, name: str) -> bool:
        # Only live rows: the count of rows changed is then the same on every
        # database (MySQL counts rows changed, SQLite and PostgreSQL rows matched).
        changed = await self.driver.execute(
            self._soft_delete, *self._soft_args, name_hash(name), *self._live_args
        )
        return changed > 0

    async def delete_matching(self, pattern: str) -> list[str]:
        exact = wildcard_to_regex(pattern)
        names = [
            f.name async for f in self._matching(
                wildcard_to_like(pattern), lambda name: exact.fullmatch(name) is not None,
                scope=None, include_deleted=False,
            )
        ]
        for part in pages(names):
            await self.driver.execute(
                with_keys(self._soft_delete_many, len(part)), *self._soft_args,
                *[name_hash(n) for n in part], *self._live_args,
            )
        return names

    async def purge(
        self, cutoff: int, *, dry_run: bool = False,
        removed: Callable[[list[str]], object] | None = None,
    ) -> tuple[int, int]:
        files = size = 0
        after = ""
        while True:
            rows = await self.driver.fetch(
                self._purge_candidates, *self._gone_args, cutoff, after, PAGE
            )
            if not rows:
                return files, size
            after = rows[-1][1]
            if dry_run:
                files += len(rows)
                size += sum(int(r[2]) for r in rows)
                continue
            files += await self.remove(rows, cutoff)
            size += sum(int(r[2]) for r in rows)
            if removed is not None:
                removed([str(r[0]) for r in rows])

    async def remove(self, rows: Sequence[Row], cutoff: int) -> int:
        """Delete these soft-deleted rows (if still gone and old) and their bytes; how many.

        The chunk rows of the database layout go with their row (ON DELETE CASCADE).
        """
        hashes = [r[1] for r in rows]
        return await self.driver.execute(
            with_keys(self.purge_rows, len(hashes)), *hashes, *self._gone_args, cutoff
        )

    async def verify(self, page: int = 200) -> AsyncIterator[BrokenFile]:
        after = ""
        while True:
            files = await self.driver.fetch(self._verify_page, after, *self._live_args, page)
            if not files:
                return
            after = files[-1][1]
            broken = await self.broken(files)
            if broken:
                # Checked twice: a file replaced between the two reads of the
                # first check is not broken.
                again = await self.stat_many(list(broken))
                rows = [(f.name, f.name_hash, f.size, f.mtime) for f in again.values() if f.live]
                for h, problem in (await self.broken(rows)).items() if rows else ():
                    f = again[h]
                    yield BrokenFile(f.name, f.size, problem)

    @abc.abstractmethod
    async def broken(self, files: Sequence[Row]) -> dict[str, str]:
        """Of these live files (name, name_hash, size, mtime): name_hash -> problem."""


class PieceLayout(RowLayout):
    """A layout whose bytes are pieces in the database (chunk rows, slices of a large object).

    A small file is its row and first piece, read in one query (`FIRST`:
    the meta columns, then the first piece's bytes; `FIRST_MANY` with `IN
    (?*)`); a body is the checked walk of pieces.read_pieces over the
    layout's `fetch_chunks`.
    """

    bytes_in_first = True
    FIRST: ClassVar[str]
    FIRST_MANY: ClassVar[str]

    def first_args(self) -> tuple[object, ...]:
        """Parameters the FIRST statements take before the name hashes."""
        return ()

    async def first(self, name_hash: str) -> First | None:
        row = await self.driver.fetchrow(self.FIRST, *self.first_args(), name_hash)
        return None if row is None else (FileMeta.from_row(row), row[5])

    async def first_many(self, hashes: Sequence[str]) -> dict[str, First]:
        keys = padded(hashes)
        rows = await self.driver.fetch(with_keys(self.FIRST_MANY, len(keys)), *self.first_args(),
                                       *keys)
        return {r[0]: (FileMeta.from_row(r), r[5]) for r in rows}

    @abc.abstractmethod
    async def fetch_chunks(
        self, meta: FileMeta, start: int, end: int, limit: int, aligned: bool = False
    ) -> list[Chunk]:
        """At most `limit` pieces of this version overlapping start..end (pieces.FetchPieces)."""

    def read(self, meta: FileMeta, start: int, end: int) -> AsyncGenerator[bytes, None]:
        return read_pieces(self.fetch_chunks, meta, start, end)
