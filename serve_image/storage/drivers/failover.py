"""Several database servers per site: ordered failover, one pool per server.

STORAGE_HOSTS lists the servers in order of preference. Every query goes to
the first server that is up. A server whose connect fails is put aside: no
request waits on it any more, its idle pooled connections are dropped, and a
background task tries it again every STORAGE_RETRY_INTERVAL seconds; when
it answers, requests go back to it. With every server put aside a request
gets its 503 at once, without any I/O, so nothing queues up.

Only a failed *connect* puts a server aside. A query that fails on an
established connection (the connection was killed, the server restarted)
drops that connection; an idempotent read then tries once more on a fresh
connection, and that connect decides whether the server is down. This keeps
one killed connection from taking a healthy server out of service.

The drivers (mysql.py, pgsql.py) supply a `HostPool` per server; all the
choosing, timing and bookkeeping lives here, once.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

from serve_image.settings import Settings, StorageHost
from serve_image.storage.drivers.base import DriverObserver, served_by
from serve_image.storage.errors import DatabaseUnavailable, StatementFailed

logger = logging.getLogger("serve_image.failover")

C = TypeVar("C")
T = TypeVar("T")


class QueryFailed(DatabaseUnavailable):
    """A query failed on an established connection (which was dropped)."""


class QueryTimedOut(DatabaseUnavailable):
    """A bounded read got no answer within STORAGE_QUERY_TIMEOUT (its connection was dropped).

    Not tried again: a second wait would double the time to the 503.
    """


class HostPool(abc.ABC, Generic[C]):
    """One driver pool to one server."""

    def __init__(self, address: StorageHost) -> None:
        self.address = address

    @abc.abstractmethod
    async def open(self) -> None:
        """Create the pool without connecting (start-up never fails on a down server)."""

    @abc.abstractmethod
    async def acquire(self, wait: float) -> C:
        """A connection; TimeoutError when none came within `wait` seconds."""

    @abc.abstractmethod
    async def release(self, conn: C, broken: bool) -> None:
        """Give a connection back; a broken one is closed, never reused."""

    @abc.abstractmethod
    def exhausted(self) -> bool:
        """Every connection is in use: a timeout means busy, not down."""

    @abc.abstractmethod
    def in_use(self) -> int:
        """Connections handed out (or being opened) and not given back."""

    @abc.abstractmethod
    async def ping(self, conn: C) -> None:
        """Run a trivial query on a connection."""

    @abc.abstractmethod
    async def drop_idle(self) -> None:
        """Close the idle connections: the server went away, they are dead."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection."""


class Host:
    """A server's pool and health."""

    __slots__ = ("down_since", "label", "pool", "prober")

    def __init__(self, pool: HostPool[C]) -> None:
        self.pool: HostPool[object] = pool  # type: ignore[assignment]
        self.label = pool.address.label
        self.down_since: float | None = None
        self.prober: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None


class Failover(Generic[C]):
    """The servers of a site, in order; hands out connections from the first one up."""

    def __init__(
        self, settings: Settings, pools: Sequence[HostPool[C]],
        driver_errors: tuple[type[BaseException], ...],
        statement_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.settings = settings
        self.hosts = [Host(p) for p in pools]
        self.driver_errors = driver_errors
        # Driver errors that are the statement's, not the connection's.
        self.statement_errors = statement_errors
        self._probe_errors: tuple[type[BaseException], ...] = (TimeoutError, *driver_errors)
        self.observer: DriverObserver | None = None
        self._closed = False

    # -- life cycle -------------------------------------------------------
    async def open(self) -> None:
        self._closed = False
        for h in self.hosts:
            h.down_since = None  # a reopened site tries every server again
            await h.pool.open()

    async def close(self) -> None:
        self._closed = True
        for h in self.hosts:
            if h.prober is not None:
                h.prober.cancel()
                await asyncio.gather(h.prober, return_exceptions=True)
                h.prober = None
        for h in self.hosts:
            await h.pool.close()
        logger.debug("%s: database pools closed", self.settings.describe())

    def status(self) -> list[tuple[str, bool]]:
        """(label, up) of every server, in order: for health checks and metrics."""
        return [(h.label, h.up) for h in self.hosts]

    # -- connections --------------------------------------------------------
    def _message(self, what: str) -> str:
        return self.settings.scrub(f"{self.settings.describe()}: {what}")

    async def _acquire(self, doing: str) -> tuple[Host, C]:
        tried = False
        for h in self.hosts:
            if not h.up:
                continue
            tried = True
            # With room in the pool the acquire may open a connection: then
            # STORAGE_CONNECT_TIMEOUT decides, not the wait for a free one.
            s = self.settings
            wait = (
                s.acquire_timeout if h.pool.exhausted()
                else max(s.acquire_timeout, s.connect_timeout)
            )
            try:
                if self.observer is None:
                    conn = await h.pool.acquire(wait)
                else:
                    self.observer.waiting(h.label, 1)
                    try:
                        conn = await h.pool.acquire(wait)
                    finally:
                        self.observer.waiting(h.label, -1)
            except TimeoutError:
                if h.pool.exhausted():
                    # Busy, not down: a bounded wait, then 503 (another
                    # server would be just as busy with our traffic).
                    raise DatabaseUnavailable(self._message("no free connection")) from None
                self._put_aside(h, "connect timed out", doing)
            except self.driver_errors as e:
                self._put_aside(h, f"{type(e).__name__}: {e}", doing)
            else:
                return h, conn  # type: ignore[return-value]
        if not tried:
            raise DatabaseUnavailable(self._message("every server is down, retrying"))
        raise DatabaseUnavailable(self._message(f"{doing}: no server could be reached"))

    @asynccontextmanager
    async def connection(self, doing: str, *, bounded: bool = False) -> AsyncIterator[C]:
        """A pooled connection to the first server up; QueryFailed if the body's query fails.

        `bounded`: the body must finish within STORAGE_QUERY_TIMEOUT (the
        endpoint's reads), else its connection is dropped and QueryFailed
        raised. Writes are not bounded: storing a large file may take long.
        """
        if self._closed:
            raise DatabaseUnavailable(self._message("not connected"))
        host, conn = await self._acquire(doing)
        served_by.set(host.label)
        observer = self.observer
        if observer is not None:
            observer.in_use(host.label, 1)
        started = time.perf_counter() if observer is not None else 0.0
        broken = False
        try:
            if bounded:
                # A server gone silent (no reset ever comes) or a lock held for
                # ever must not hold a request: the read is given up, its
                # connection dropped (the timeout is a TimeoutError, a driver
                # error of every backend), and the request gets its 503.
                async with asyncio.timeout(self.settings.query_timeout):
                    yield conn
            else:
                yield conn
        except self.driver_errors as e:
            if isinstance(e, self.statement_errors):
                # The server answered: the connection is sound, the statement was not.
                message = self._message(f"{host.label}: {doing}: {type(e).__name__}: {e}")
                logger.warning("statement refused: %s", message)
                raise StatementFailed(message) from None
            broken = True
            if bounded and isinstance(e, TimeoutError):
                message = self._message(
                    f"{host.label}: {doing}: no answer within {self.settings.query_timeout:g} s"
                )
                logger.warning("query timed out: %s", message)
                raise QueryTimedOut(message) from None
            message = self._message(f"{host.label}: {doing}: {type(e).__name__}: {e}")
            logger.warning("query failed: %s", message)
            raise QueryFailed(message) from None
        except asyncio.CancelledError:
            # Cancelled mid-query: the protocol state is unknown, never reuse it.
            broken = True
            raise
        finally:
            await host.pool.release(conn, broken)
            if observer is not None:
                observer.in_use(host.label, -1)
                observer.query(host.label, time.perf_counter() - started)

    async def read(self, doing: str, query: Callable[[C], Awaitable[T]]) -> T:
        """An idempotent read, tried once more on a fresh connection if the first one dies.

        Only for reads made before any byte of the response is sent.
        """
        try:
            async with self.connection(doing, bounded=True) as conn:
                return await query(conn)
        except QueryFailed:
            async with self.connection(doing, bounded=True) as conn:
                return await query(conn)

    # -- health -------------------------------------------------------------
    def _put_aside(self, h: Host, why: str, doing: str) -> None:
        if not h.up or self._closed:
            return
        h.down_since = time.monotonic()
        others = [o.label for o in self.hosts if o.up]
        logger.warning(
            "database unavailable: %s", self._message(
                f"{h.label} is down ({doing}: {why}); "
                + (f"using {others[0]}" if others else "no server left: answering 503")
                + f"; retrying it every {self.settings.retry_interval:g} s"
            ),
        )
        if self.observer is not None:
            self.observer.health(h.label, False)
        h.prober = asyncio.ensure_future(self._probe(h))

    async def _probe(self, h: Host) -> None:
        """Try a server put aside until it answers, then take it back."""
        interval = self.settings.retry_interval
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await h.pool.drop_idle()
        except self._probe_errors as e:
            logger.debug("%s: dropping idle connections: %r", h.label, e)
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(self.settings.connect_timeout + interval):
                    conn = await h.pool.acquire(self.settings.connect_timeout)
                    broken = True
                    try:
                        await h.pool.ping(conn)
                        broken = False
                    finally:
                        await h.pool.release(conn, broken)
            except self._probe_errors:
                continue
            down_for = time.monotonic() - (h.down_since or time.monotonic())
            h.down_since = None
            h.prober = None
            logger.warning("%s", self._message(f"{h.label} is back after {down_for:.1f} s"))
            if self.observer is not None:
                self.observer.health(h.label, True)
            return
