"""Read many files' rows in one query when requests pile up.

A database round trip costs the worker far more CPU in the driver (sending
the query, parsing the result's column descriptions) than the rows it
brings: with asyncmy one small-file query cost 206 µs of CPU, while fetching
8 files in one query cost 44 µs per file and 64 files 26 µs per file
(measured on a benchmark machine, see README "Performance"). So while a
query is in flight, the requests that arrive wait for it to finish and then
share one query: an idle server answers each request with its own query as
before (no added latency), a busy one sends fewer, larger queries.

Two reads are batched: a file's row with its first chunk (`fetch_first`, a
whole small file) and its row alone (`fetch_meta`, for 304, HEAD and ranges).
The queries are written for the ezdbfile + ezdbfile_data layout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from serve_image.backends import Backend, FileMeta

T = TypeVar("T")
First = tuple[FileMeta, bytes | None]

# Most names in one query. Batch sizes are rounded up to a power of two (the
# last name repeated) so a driver that prepares statements sees at most
# seven distinct ones.
MAX_BATCH = 64
# Queries in flight at once: one on the server while the next batch gathers.
MAX_IN_FLIGHT = 2


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def first_many(count: int) -> str:
    """The rows and first chunks of `count` files, in sql.py's dialect."""
    return (
        "SELECT f.name_hash, f.datatype, f.size, f.mtime, f.expired, d.filedata FROM ezdbfile f "
        'LEFT JOIN ezdbfile_data d ON d.name_hash = f.name_hash AND d."offset" = 0 '
        f"WHERE f.name_hash IN ({_marks(count)})"
    )


def meta_many(count: int) -> str:
    """The rows of `count` files, in sql.py's dialect."""
    return (
        "SELECT name_hash, datatype, size, mtime, expired FROM ezdbfile "
        f"WHERE name_hash IN ({_marks(count)})"
    )


def _padded(keys: Sequence[str]) -> list[str]:
    size = 1
    while size < len(keys):
        size *= 2
    return [*keys, *[keys[-1]] * (size - len(keys))]


class Batcher(Generic[T]):
    """One read by name hash: alone when the database is idle, shared while it is busy."""

    def __init__(
        self,
        one: Callable[[str], Awaitable[T | None]],
        many: Callable[[list[str]], Awaitable[dict[str, T]]],
    ) -> None:
        self.one = one
        self.many = many
        self.in_flight = 0
        self._waiting: dict[str, list[asyncio.Future[T | None]]] = {}
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
        future: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(name_hash, []).append(future)
        self._flush()
        return await future

    def _flush(self) -> None:
        while self._waiting and self.in_flight < MAX_IN_FLIGHT:
            batch: dict[str, list[asyncio.Future[T | None]]] = {}
            for key in list(self._waiting)[:MAX_BATCH]:
                batch[key] = self._waiting.pop(key)
            self.in_flight += 1
            task = asyncio.ensure_future(self._read(batch))
            # The loop keeps only a weak reference to a task: keep it alive.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read(self, batch: dict[str, list[asyncio.Future[T | None]]]) -> None:
        futures = [f for waiters in batch.values() for f in waiters]
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
            for key, waiters in batch.items():
                for f in waiters:
                    if not f.done():
                        f.set_result(found.get(key))
        finally:
            self.in_flight -= 1
            self._flush()


def _meta(row: Sequence[Any]) -> FileMeta:
    return FileMeta(row[0], row[1], row[2], row[3], bool(row[4]))


class BatchedReads:
    """`fetch_first` and `fetch_meta` of a backend, batched while the database is busy."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.fetch_first: Batcher[First] = Batcher(backend.fetch_first, self._first_many)
        self.fetch_meta: Batcher[FileMeta] = Batcher(backend.fetch_meta, self._meta_many)

    async def _first_many(self, keys: list[str]) -> dict[str, First]:
        keys = _padded(keys)
        rows = await self.backend.query(first_many(len(keys)), *keys)
        return {r[0]: (_meta(r), r[5]) for r in rows}

    async def _meta_many(self, keys: list[str]) -> dict[str, FileMeta]:
        keys = _padded(keys)
        return {r[0]: _meta(r) for r in await self.backend.query(meta_many(len(keys)), *keys)}
