"""A few threads for blocking work on a shared mount, each call bounded in time.

An NFS server that stops answering hangs a read in the kernel, for minutes
on a hard mount. The event loop must never wait on one, and a hung mount
must not hang requests: every call runs in one of at most `threads` threads
and is awaited for at most `timeout` seconds, after which the caller gets
PoolTimeout. A call still queued when its time is up never starts; one
already running goes on in its thread until the kernel lets it go (nothing
can interrupt it), and its result is dropped. The threads are daemons: a
hung mount never keeps the process from exiting.

asyncio's default executor would do the first half, but its threads are
joined at exit and it is shared with everything else in the process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class PoolTimeout(Exception):
    """A call did not finish (or start) within the pool's bound."""


@dataclass(eq=False)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    # What to do with a result that comes after the caller's time was up
    # (close what was opened): run in the pool too.
    late: Callable[[Any], Any] | None = None


def _settle(call: _Call, pool: BoundedPool, result: Any, error: BaseException | None) -> None:
    future = call.future
    if future.done():  # the caller's time was up
        if error is None and call.late is not None:
            pool.submit(call.late, result)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BoundedPool:
    """At most `threads` threads; a call answers within `timeout` seconds or raises PoolTimeout."""

    def __init__(self, threads: int, timeout: float, name: str,
                 on_exit: Callable[[], None] | None = None) -> None:
        self.size = threads
        self.timeout = timeout
        self.name = name
        # Run by each thread as it ends (what it kept open for its calls).
        self.on_exit = on_exit
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.closed = False

    async def run(self, fn: Callable[..., T], *args: Any, bound: float | None = None,
                  late: Callable[[T], Any] | None = None) -> T:
        """`fn(*args)` in a thread of the pool, within `bound` seconds (default: the pool's).

        `late(result)` is run (in the pool) when `fn` returns after its time was up.
        """
        if self.closed:
            raise RuntimeError(f"{self.name}: pool closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put(_Call(fn, args, loop, future, late))
        self._grow()
        try:
            return await asyncio.wait_for(future, bound or self.timeout)
        except TimeoutError:
            raise PoolTimeout(
                f"no answer from {self.name} within {bound or self.timeout:g} s"
            ) from None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` when a thread is free, not waiting for it (clean-up work)."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # Nobody awaits it: its outcome is retrieved so that asyncio does not report it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._calls.put(_Call(fn, args, loop, future))
        self._grow()

    def _grow(self) -> None:
        # A thread is started only when none is idle: as concurrent.futures does.
        if self._idle.acquire(blocking=False):
            return
        with self._lock:
            if len(self._threads) < self.size:
                t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                if self.on_exit is not None:
                    self.on_exit()
                return
            if not call.future.done():  # not given up on before it started
                result: Any = None
                error: BaseException | None = None
                try:
                    result = call.fn(*call.args)
                except BaseException as e:  # handed to the caller, raised there
                    error = e
                try:
                    call.loop.call_soon_threadsafe(_settle, call, self, result, error)
                except RuntimeError:
                    pass  # the loop is closed: nobody is waiting any more
            self._idle.release()

    def close(self) -> None:
        """Let the threads end once the work queued is done; hung ones stay until they return."""
        self.closed = True
        for _ in self._threads:
            self._calls.put(None)
