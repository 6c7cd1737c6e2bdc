"""Read many files' rows in one query when requests pile up.

A database round trip costs the worker far more CPU in the driver (sending
the query, parsing the result's column descriptions) than the rows it
brings, so a query for many files costs much less per file than one query
each (bench/README.md has the figures). So while a query is in flight, the
requests that arrive wait for it to finish and then share one query: an
idle server answers each request with its own query as before (no added
latency), a busy one sends fewer, larger queries.

Two reads are batched, for any layout: a file's row with its first bytes
(`first`, a whole small file) and its row alone (`meta`, for 304, HEAD and
ranges).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from serve_image.storage import FileMeta, First, Layout, served_by

T = TypeVar("T")

# Most names in one query.
MAX_BATCH = 64
# Queries in flight at once: one on the server while the next batch gathers.
MAX_IN_FLIGHT = 2


class Batcher(Generic[T]):
    """One read by name hash: alone when the database is idle, shared while it is busy."""

    def __init__(
        self,
        one: Callable[[str], Awaitable[T | None]],
        many: Callable[[Sequence[str]], Awaitable[dict[str, T]]],
    ) -> None:
        self.one = one
        self.many = many
        self.in_flight = 0
        # Each waiter gets the row and the server that answered the shared
        # query (its access log line names it: the query ran in another task).
        self._waiting: dict[str, list[asyncio.Future[tuple[T | None, str | None]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, name_hash: str) -> T | None:
        if self.in_flight == 0 and not self._waiting:
            # Idle: the one query of its own, exactly as without batching.
            self.in_flight += 1
            try:
                return await self.one(name_hash)
            finally:
                self.in_flight -= 1
                self._flush()
        # Each waiter has a future of its own: a request that goes away (its
        # client hung up) cancels only that, never the query the others share.
        future: asyncio.Future[tuple[T | None, str | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting.setdefault(name_hash, []).append(future)
        self._flush()
        found, host = await future
        served_by.set(host)
        return found

    def _flush(self) -> None:
        while self._waiting and self.in_flight < MAX_IN_FLIGHT:
            batch: dict[str, list[asyncio.Future[tuple[T | None, str | None]]]] = {}
            for key in list(self._waiting)[:MAX_BATCH]:
                batch[key] = self._waiting.pop(key)
            self.in_flight += 1
            task = asyncio.ensure_future(self._read(batch))
            # The loop keeps only a weak reference to a task: keep it alive.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read(
        self, batch: dict[str, list[asyncio.Future[tuple[T | None, str | None]]]]
    ) -> None:
        futures = [f for waiters in batch.values() for f in waiters]
        served_by.set(None)  # this task's context is a copy of whichever task flushed it
        try:
            found = await self.many(list(batch))
        except Exception as e:  # each waiter gets the error: a lost database is its 503
            for f in futures:
                if not f.done():
                    f.set_exception(e)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        else:
            host = served_by.get()
            for key, waiters in batch.items():
                for f in waiters:
                    if not f.done():
                        f.set_result((found.get(key), host))
        finally:
            self.in_flight -= 1
            self._flush()



class BatchedReads:
    """`first` and `meta` of a layout, batched while the database is busy."""

    def __init__(self, layout: Layout) -> None:
        self.first: Batcher[First] = Batcher(layout.first, layout.first_many)
        self.meta: Batcher[FileMeta] = Batcher(layout.meta, layout.meta_many)
