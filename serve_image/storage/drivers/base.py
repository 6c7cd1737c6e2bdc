"""The one small interface every database driver implements.

A driver knows how to reach one database (connections, pool, failover), its
SQL dialect and its errors. It knows nothing of eZ's tables: the layouts
(`storage/layouts/`) write their statements once, in a neutral dialect —
`?` placeholders and `"quoted"` identifiers (`offset` is a reserved word in
MariaDB 10.6+ and PostgreSQL) — and each driver converts a statement to its
own dialect once, the first time it runs it.

Every method raises DatabaseUnavailable when the database cannot answer and
StatementFailed when it refuses the statement; messages never hold the
password.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import Any, ClassVar, Protocol

from serve_image.settings import Settings

Row = Sequence[Any]

# Which server answered the request's last query, set by a driver that has
# several (failover.py), for the access log (observability.py reads it after
# the response: same task, same context; batching.py hands it on).
served_by: ContextVar[str | None] = ContextVar("served_by", default=None)


class DriverObserver(Protocol):
    """What the metrics want to hear about a driver's servers (observability.Metrics)."""

    def query(self, host: str, seconds: float) -> None: ...
    def in_use(self, host: str, delta: int) -> None: ...
    def waiting(self, host: str, delta: int) -> None: ...
    def health(self, host: str, up: bool) -> None: ...




class Transaction(Protocol):
    """Statements run inside one transaction: committed together or not at all."""

    async def fetch(self, statement: str, *args: object) -> list[Row]: ...
    async def execute(self, statement: str, *args: object) -> int: ...
    async def executemany(self, statement: str, rows: Iterable[Sequence[object]]) -> None: ...


class Driver(abc.ABC):
    """One site's database: reads bounded by STORAGE_QUERY_TIMEOUT, writes in transactions."""

    name: ClassVar[str]

    def __init__(self, settings: Settings, *, readonly: bool = False) -> None:
        self.settings = settings
        self.readonly = readonly

    @abc.abstractmethod
    async def connect(self) -> None:
        """Create the pool; must not fail when the database is down (requests get 503s)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the pool and every connection."""

    @abc.abstractmethod
    async def fetch(self, statement: str, *args: object, retry: bool = True) -> list[Row]:
        """The rows of one read, within STORAGE_QUERY_TIMEOUT.

        `retry`: the read is idempotent and may run again once on a fresh
        connection when its connection was killed under it.
        """

    async def fetchrow(self, statement: str, *args: object) -> Row | None:
        """The first row of one read, or None."""
        rows = await self.fetch(statement, *args)
        return rows[0] if rows else None

    @abc.abstractmethod
    async def execute(self, statement: str, *args: object) -> int:
        """Run one statement in a transaction of its own; the rows it changed."""

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A transaction for a write of several statements (not bounded in time)."""

    @abc.abstractmethod
    async def table_names(self) -> set[str]:
        """The tables of the database, lower case: a layout creates only the missing ones."""

    async def prepare(self) -> None:  # noqa: B027 - a server database needs nothing
        """Make the database ready for its first tables (init-db), before any DDL."""

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless a query gets through."""
        await self.fetch("SELECT 1")

    def status(self) -> list[tuple[str, bool]]:
        """(server, up) of each server, in order of preference."""
        return []

    def observe(self, observer: DriverObserver) -> None:  # noqa: B027 - a driver without servers
        """Report queries, pool use and server health to `observer` from now on."""
