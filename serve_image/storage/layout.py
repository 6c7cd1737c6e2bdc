"""The one small interface every table layout implements.

A layout is how eZ keeps files in a database: a metadata row per file, and
the bytes in chunk rows (`chunks`), in large objects (`largeobject`) or on a
shared mount (`dfs`). It runs its statements through a driver (`drivers/`)
and is the only thing the endpoint, batching, the hot cache, local copies,
the command line and the Python API talk to: none of them asks which layout
or which database it has.

Adding a layout: a module in `storage/layouts/`, a class implementing this
interface, an entry in `storage.LAYOUTS`, and the databases it runs on in
`settings.LAYOUT_BACKENDS` (a site asking for another is refused when its
file is validated). Most of it is written once in `rows.RowLayout`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import ClassVar

from serve_image.settings import Settings
from serve_image.storage.drivers.base import Driver, DriverObserver
from serve_image.storage.files import BrokenFile, FileMeta, StoredFile
from serve_image.storage.names import name_hash
from serve_image.storage.pieces import Pieces

# A file's row and its first bytes: the whole file when it is small.
First = tuple[FileMeta, bytes | None]


class Layout(abc.ABC):
    """The files of one site, read by the endpoint and written by the command line."""

    name: ClassVar[str]
    # `first` brings the file's first bytes with its row whenever they are
    # stored (a chunk, a piece of a large object): see `has_bytes`.
    bytes_in_first: ClassVar[bool] = False

    def __init__(self, settings: Settings, driver: Driver) -> None:
        self.settings = settings
        self.driver = driver

    # -- life cycle -----------------------------------------------------------
    async def connect(self) -> None:
        """Open the pools; never fails because the database is down."""
        await self.driver.connect()

    async def close(self) -> None:
        await self.driver.close()

    async def ping(self) -> None:
        """Raise a StorageError unless files can be served now (the health check)."""
        await self.driver.ping()

    def observe(self, observer: DriverObserver) -> None:
        """Report queries, pool use and server health to the metrics."""
        self.driver.observe(observer)

    @abc.abstractmethod
    async def create_tables(self) -> None:
        """Create the layout's tables where absent; never drops or alters anything."""

    # -- reads for serving ------------------------------------------------------
    @abc.abstractmethod
    async def meta(self, name_hash: str) -> FileMeta | None:
        """The file's row, without reading any of its bytes (304, 412, HEAD, ranges)."""

    @abc.abstractmethod
    async def first(self, name_hash: str) -> First | None:
        """The row and the file's first bytes in one round trip: a small file in one query."""

    @abc.abstractmethod
    async def meta_many(self, hashes: Sequence[str]) -> dict[str, FileMeta]:
        """`meta` of many files in one query (batching.py)."""

    @abc.abstractmethod
    async def first_many(self, hashes: Sequence[str]) -> dict[str, First]:
        """`first` of many files in one query (batching.py)."""

    def has_bytes(self, got: First) -> bool:
        """Are the bytes of a row read by `first` stored, as far as `first` can tell?

        False for a row whose bytes are not stored yet, as a replica that
        lags may show it (storage/replicas.py then asks the primary). Only a
        layout whose `first` reads the first bytes with the row whenever
        they are stored can tell (`bytes_in_first`); for the others `check`
        decides.
        """
        meta, data = got
        return not self.bytes_in_first or meta.size == 0 or data is not None

    async def check(self, meta: FileMeta) -> None:  # noqa: B027 - the rows' own check suffices
        """Before the headers go out: raise FileUnavailable if this version cannot be read now."""

    def local_path(self, meta: FileMeta) -> str | None:
        """The file's bytes as a file on a file system this node sees (OFFLOAD hands it
        to the web server); None when they are in the database."""
        return None

    @abc.abstractmethod
    def read(self, meta: FileMeta, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes start..end (inclusive) of exactly this version, in pieces.

        Raises StreamAborted when the file was replaced or deleted since `meta`
        was read, when its stored bytes do not match its row, or when the
        storage is lost: a reader never gets bytes of two versions or a wrong
        byte. No pooled connection is held while a piece is being sent.
        """

    # -- writes -----------------------------------------------------------------
    @abc.abstractmethod
    async def store(
        self, name: str, pieces: Pieces, *, size: int, mtime: int, datatype: str,
        scope: str,
    ) -> None:
        """Store or replace a file; readers see the old version or the new, never a mix.

        `pieces` must add up to `size` bytes; otherwise nothing is stored.
        """

    @abc.abstractmethod
    async def delete(self, name: str) -> bool:
        """eZ's soft delete; False when no live file had the name."""

    @abc.abstractmethod
    async def delete_matching(self, pattern: str) -> list[str]:
        """Soft-delete every live file matching eZ's wildcard (`*`, `?`); the names deleted."""

    @abc.abstractmethod
    async def purge(
        self, cutoff: int, *, dry_run: bool = False,
        removed: Callable[[list[str]], object] | None = None,
    ) -> tuple[int, int]:
        """Remove for good soft-deleted files whose mtime is before `cutoff`: (files, bytes).

        `removed` is called with the names of each page of rows removed (so
        that their caches can be purged).
        """

    # -- management reads ---------------------------------------------------------
    @abc.abstractmethod
    async def stat_many(self, hashes: Sequence[str]) -> dict[str, StoredFile]:
        """Rows by name hash, deleted or not."""

    async def stat(self, name: str) -> StoredFile | None:
        """The file's row, deleted or not."""
        return (await self.stat_many([name_hash(name)])).get(name_hash(name))

    @abc.abstractmethod
    def list_files(
        self, prefix: str = "", *, scope: str | None = None, include_deleted: bool = False,
    ) -> AsyncIterator[StoredFile]:
        """Rows whose name starts with `prefix`, by name."""

    @abc.abstractmethod
    def verify(self) -> AsyncIterator[BrokenFile]:
        """Live files whose stored bytes do not match their row."""
