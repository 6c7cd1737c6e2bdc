"""The one small interface every database backend implements."""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from serve_image.errors import DatabaseUnavailable
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
