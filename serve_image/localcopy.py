"""Local copies on demand: after a complete 200, keep the file on the node's own disk.

With LOCAL_COPY_DIR set to the web server's document root, the endpoint
writes each file it has served whole to `LOCAL_COPY_DIR/<name>`, so the web
server serves it from disk next time (Apache's `missing` snippet only sends
requests for absent files to serve-image). How the disk is written safely,
and how the budget is counted: `localfs`.

The copy is made by one background task per process, after the response,
from a bounded queue: a request only pays for a `put_nowait`. A small file
whose bytes the endpoint read with its row is handed over as is; a larger one
is read again from the storage in pieces. Teeing the streamed bytes instead
would mean holding a whole large file in memory, or writing to disk inside
the response loop; and a re-read goes through `Layout.read`, which stops
once the row no longer has the served mtime and size, so a copy is never a
mix of two versions.

Once a copy is in place its row is read again, and the copy removed if the
row moved on meanwhile: a copy of a version that was replaced or deleted
while it was written (and perhaps purged before it appeared) is never left
behind. A PURGE removes the copy (`drop`). A copy that does not fit in
LOCAL_COPY_MAX_BYTES makes room by evicting the least recently served
copies (`localfs.make_room`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from contextlib import aclosing

from serve_image import localfs
from serve_image.localfs import CopyRefused
from serve_image.settings import Settings
from serve_image.storage import FileMeta, Layout, StorageError, StreamAborted, name_hash

logger = logging.getLogger("serve_image.localcopy")

# Copies waiting to be written; when full, a file is not copied this time
# (a later request for it offers it again). Bounds the memory held by
# waiting small files to QUEUE_SIZE chunks.
QUEUE_SIZE = 64
# How long shutdown waits for the copy being written before cancelling it.
CLOSE_SECONDS = 5.0
# A file copied or found up to date is not checked again on disk for this
# long (when requests still reach the endpoint, e.g. without Apache's
# `missing` snippet): the check costs a thread hop and a walk of the path.
# Bounded in entries; a copy removed by hand is made again after at most this.
KNOWN_SECONDS = 60.0
KNOWN_MAX = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class _Job:
    name: str
    meta: FileMeta
    data: bytes | None  # the whole file when the endpoint already had it


class LocalCopies:
    """One process's writer of local copies for one site."""

    def __init__(self, settings: Settings, layout: Layout, root: str) -> None:
        self.settings = settings
        self.layout = layout
        self.root = root
        self.limit = settings.local_copy_max_bytes
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue(QUEUE_SIZE)
        self._pending: set[str] = set()
        # name -> (mtime, size, until): files copied, found up to date, or
        # left out for the budget; not looked at again until `until`.
        self._known: dict[str, tuple[int, int, float]] = {}
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_site(cls, settings: Settings, layout: Layout) -> LocalCopies | None:
        """The site's writer, or None when LOCAL_COPY_DIR is not set."""
        if settings.local_copy_dir is None:
            return None
        return cls(settings, layout, settings.local_copy_dir)

    def offer(self, name: str, meta: FileMeta, data: bytes | None) -> None:
        """Called once a complete 200 is sent: queue a copy, never wait."""
        if name in self._pending:
            return
        known = self._known.get(name)
        if known is not None and known[:2] == (meta.mtime, meta.size):
            if time.monotonic() < known[2]:
                return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            self._queue.put_nowait(_Job(name, meta, data))
        except asyncio.QueueFull:
            logger.debug("local copy queue full; %s not copied this time", name)
            return
        self._pending.add(name)

    async def drain(self) -> None:
        """Wait until every queued copy is written or given up (tests, shutdown)."""
        await self._queue.join()

    async def close(self) -> None:
        """Finish the copy being written (at most CLOSE_SECONDS), drop the queued ones."""
        if self._task is None:
            return
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        self._pending.clear()
        self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._task, CLOSE_SECONDS)
        self._task = None

    async def _run(self) -> None:
        try:
            total = await asyncio.to_thread(localfs.recount, self.root)
            logger.info("local copies in %s: %d bytes of %d", self.root, total, self.limit)
        except OSError as e:
            logger.warning("local copies: cannot scan %s: %s", self.root, e)
        while True:
            job = await self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            try:
                await self._copy(job)
                if len(self._known) >= KNOWN_MAX:
                    self._known.clear()
                meta = job.meta
                self._known[job.name] = (meta.mtime, meta.size, time.monotonic() + KNOWN_SECONDS)
            except CopyRefused as e:
                logger.warning("local copy refused: %s", e)
            except (OSError, StorageError) as e:
                # A full disk, a permission, a file where a directory should
                # be, the database gone: the response went out already; only
                # the copy is lost, and a later request offers it again.
                logger.warning("local copy of %s failed: %s", job.name, e)
            except Exception:  # the task's boundary: it must outlive any one copy
                logger.exception("local copy of %s failed", job.name)
            finally:
                self._pending.discard(job.name)
                self._queue.task_done()

    async def drop(self, name: str) -> bool:
        """Remove the copy of `name`, whatever its version (a PURGE); True if there was one."""
        self._known.pop(name, None)
        removed = await asyncio.to_thread(localfs.remove, self.root, name)
        if removed:
            await asyncio.to_thread(localfs.release, self.root, removed)
        return removed > 0

    async def _copy(self, job: _Job) -> None:
        meta = job.meta
        # Served again: an up-to-date copy is marked as served now (eviction order).
        if await asyncio.to_thread(localfs.up_to_date, self.root, job.name, meta, touch=True):
            return
        room, evicted = await asyncio.to_thread(
            localfs.make_room, self.root, meta.size, self.limit
        )
        if evicted:
            logger.info("local copies: evicted %d least recently served to make room "
                        "(LOCAL_COPY_MAX_BYTES %d)", len(evicted), self.limit)
        if not room:
            logger.info("local copy of %s skipped: no room in LOCAL_COPY_MAX_BYTES (%d)",
                        job.name, self.limit)
            return
        reserved = meta.size
        try:
            temp = await asyncio.to_thread(localfs.TempCopy, self.root, job.name)
            try:
                if job.data is not None:
                    await asyncio.to_thread(temp.write, job.data)
                else:
                    await self._reread(temp, meta)
                replaced = await asyncio.to_thread(temp.commit, meta)
            except BaseException:
                await asyncio.to_thread(temp.abort)
                raise
            reserved = replaced  # the new copy stays counted; the old one is gone
            logger.debug("local copy written: %s (%d bytes)", job.name, meta.size)
        finally:
            if reserved:
                await asyncio.to_thread(localfs.release, self.root, reserved)
        await self._check_written(job.name, meta)

    async def _check_written(self, name: str, meta: FileMeta) -> None:
        """Remove a copy whose row moved on while it was written.

        The write and its PURGE may both have come between the read and the
        rename: read after the rename, the row shows the write, so a stale
        copy is removed here or by the PURGE, whichever comes last.
        """
        try:
            now = await self.layout.meta(name_hash(name))
        except StorageError as e:
            # The copy is of the version served; prune-local checks it later.
            logger.info("local copy of %s kept unchecked: %s", name, e)
            return
        if now is not None and now.holds(meta.size, meta.mtime):
            return
        found = localfs.LocalFile(name, meta.size, meta.mtime, False)
        if await asyncio.to_thread(localfs.remove_if_unchanged, self.root, found):
            await asyncio.to_thread(localfs.release, self.root, meta.size)
            logger.info("local copy of %s removed: the file changed while it was copied", name)

    async def _reread(self, temp: localfs.TempCopy, meta: FileMeta) -> None:
        # The endpoint's checked read: exactly this version of the file.
        try:
            async with aclosing(self.layout.read(meta, 0, meta.size - 1)) as pieces:
                async for piece in pieces:
                    await asyncio.to_thread(temp.write, piece)
        except StreamAborted as e:
            raise CopyRefused(f"{temp.name}: {e}") from None
