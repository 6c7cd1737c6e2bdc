"""The cluster file handler: what eZ Publish's eZDBFileHandler does, as an async API.

For applications that write into the cluster and for the command line
(`import`, `export`, `ls`, `rm`, ...)::

    async with ClusterFiles.open(load_site("intranet")) as cluster:
        await cluster.store_file("/srv/site/var/intranet/storage/images/a/b.jpg",
                                 "var/intranet/storage/images/a/b.jpg")
        data = await cluster.fetch_contents("var/intranet/storage/images/a/b.jpg")

Every write is one transaction: a reader sees the old file or the new one,
never half of one. Every method raises DatabaseUnavailable when the database
cannot answer.

With PURGE_URLS set, every name a write changed (stored, deleted, purged)
is sent to the caches as `PURGE /<name>` once the write has committed, in
the background (serve_image/purge.py): a cache that fails never slows,
fails or undoes a write. `close()` (or leaving `open()` or `async with`)
waits for the purges still on their way and returns their report.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from serve_image.filetypes import HEAD_BYTES, guess_datatype, scope_for
from serve_image.purge import PurgeQueue, PurgeReport
from serve_image.settings import Settings
from serve_image.storage import (
    BrokenFile,
    FileMeta,
    Layout,
    StoredFile,
    StreamAborted,
    make_layout,
    name_hash,
)
from serve_image.storage.files import same_version, stored_mtime
from serve_image.storage.pieces import Pieces

__all__ = [
    "BrokenFile", "ClusterFiles", "FileBroken", "SourceChanged", "Stored", "StoredFile",
]


def _open_source(
    path: str | bytes | os.PathLike[str],
) -> tuple[BinaryIO, os.stat_result, bytes]:
    """A regular file opened for reading, never through a symbolic link; its stat and
    its first HEAD_BYTES (to guess its type).

    Blocks: run in a thread, the file may be on a network file system. The
    file may have been swapped for a link since it was listed; a link could
    publish any file of the machine. O_NONBLOCK: a fifo must not block.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        head = f.read(min(HEAD_BYTES, st.st_size)) if st.st_size else b""
    except BaseException:
        f.close()
        raise
    return f, st, head


class SourceChanged(Exception):
    """A local file changed size or vanished while it was being stored; nothing was stored."""


class FileBroken(Exception):
    """A stored file was replaced or deleted while being read, or its chunks have a gap."""


@dataclass(frozen=True, slots=True)
class Stored:
    """What `store_file` and `store_contents` wrote."""

    name: str
    size: int
    mtime: int
    datatype: str
    scope: str
    sha256: str


class _FilePieces:
    """Exactly `size` bytes of an open file in pieces, hashed on the way.

    Read off the event loop: the file may be on a network file system. Read
    errors leave as SourceChanged, never as OSError: the MySQL and
    PostgreSQL drivers take an OSError inside a transaction for a broken
    database connection.
    """

    def __init__(self, f: BinaryIO, size: int, chunk_size: int, head: bytes) -> None:
        self.f, self.size, self.chunk_size, self.head = f, size, chunk_size, head
        self.digest = hashlib.sha256()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        left = self.size
        buf = self.head
        while left > 0:
            want = min(self.chunk_size, left)
            if len(buf) < want:
                try:
                    more = await asyncio.to_thread(self.f.read, want - len(buf))
                except OSError as e:
                    raise SourceChanged(f"read failed: {e.strerror or e}") from None
                if not more:
                    raise SourceChanged("file shrank while being read")
                buf += more
                continue
            data, buf = buf[:want], buf[want:]
            left -= want
            self.digest.update(data)
            yield data


class ClusterFiles:
    """eZ's cluster file handler over one site's storage."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.chunk_size = layout.settings.chunk_size
        # PURGE_URLS: the caches told about every name a write changes.
        self.purges = PurgeQueue.for_site(layout.settings)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: Settings, *, readonly: bool = False
    ) -> AsyncIterator[ClusterFiles]:
        """Connect to the site's storage, close it (and finish the purges) afterwards."""
        layout = make_layout(settings, readonly=readonly)
        await layout.connect()
        try:
            async with cls(layout) as cluster:
                yield cluster
        finally:
            await layout.close()

    async def __aenter__(self) -> ClusterFiles:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> PurgeReport | None:
        """Wait for the purges under way (each bounded by PURGE_TIMEOUT); their report.

        None when the site has no PURGE_URLS. The storage is the caller's to close.
        """
        if self.purges is None:
            return None
        return await self.purges.close()

    def _changed(self, names: list[str]) -> None:
        if self.purges is not None and names:
            self.purges.add(names)

    # -- writing ----------------------------------------------------------
    async def store_file(
        self, path: str | os.PathLike[str] | bytes, name: str, *, scope: str | None = None,
        datatype: str | None = None,
    ) -> Stored:
        """Store a local file under `name` with its mtime, replacing any file of that name.

        The type is guessed from the bytes, then the name; the scope from the
        path. Raises SourceChanged if the file changes size while read (then
        nothing is stored), OSError if it cannot be opened.
        """
        # Opened, stat'ed and read off the event loop (a network file system
        # can take its time); the pieces are read as the layout stores them.
        f, st, head = await asyncio.to_thread(_open_source, path)
        with f:
            reader = _FilePieces(f, st.st_size, self.chunk_size, head)
            datatype = datatype or guess_datatype(head, name)
            scope = scope or scope_for(name)
            mtime = stored_mtime(st)
            await self.store_pieces(
                name, reader, size=st.st_size, mtime=mtime, datatype=datatype, scope=scope,
            )
            after = await asyncio.to_thread(os.fstat, f.fileno())
        if not same_version(after, st.st_size, mtime):
            # Written to while read: what was stored may mix two versions.
            # The next run (or the watcher's next event) stores it again.
            raise SourceChanged("file changed while being read")
        return Stored(name, st.st_size, mtime, datatype, scope, reader.digest.hexdigest())

    async def store_contents(
        self, name: str, data: bytes, *, scope: str | None = None, datatype: str | None = None,
        mtime: int | None = None,
    ) -> Stored:
        """Store bytes under `name` (mtime: now unless given)."""
        datatype = datatype or guess_datatype(data[:HEAD_BYTES], name)
        scope = scope or scope_for(name)
        mtime = int(time.time()) if mtime is None else mtime
        step = self.chunk_size
        await self.store_pieces(
            name, (data[i:i + step] for i in range(0, len(data), step)), size=len(data),
            mtime=mtime, datatype=datatype, scope=scope,
        )
        return Stored(name, len(data), mtime, datatype, scope, hashlib.sha256(data).hexdigest())

    async def store_pieces(
        self, name: str, pieces: Pieces, *, size: int, mtime: int, datatype: str, scope: str,
    ) -> None:
        """Store exactly `size` bytes given in pieces under `name`, replacing any file of that name.

        Raises SizeMismatch (and stores nothing) when the pieces do not add up to `size`.
        """
        await self.layout.store(name, pieces, size=size, mtime=mtime, datatype=datatype,
                                scope=scope)
        self._changed([name])

    async def delete(self, name: str) -> bool:
        """eZ's soft delete; False when there was no live file of that name."""
        deleted = await self.layout.delete(name)
        if deleted:
            self._changed([name])
        return deleted

    async def delete_by_wildcard(self, pattern: str) -> list[str]:
        """Soft-delete live files matching `pattern`: `*` any run (`/` too), `?` one character."""
        names = await self.layout.delete_matching(pattern)
        self._changed(names)
        return names

    async def purge(self, older_than_days: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Remove soft-deleted files older than that for good: (files, bytes).

        Their caches are purged too: files deleted by eZ itself were never
        purged when they were deleted.
        """
        cutoff = int(time.time() - older_than_days * 86400)
        return await self.layout.purge(cutoff, dry_run=dry_run, removed=self._changed)

    # -- reading ----------------------------------------------------------
    async def stat(self, name: str) -> StoredFile | None:
        """The file's row, deleted or not (see `StoredFile.live`)."""
        return await self.layout.stat(name)

    async def exists(self, name: str) -> bool:
        """True when a live (not deleted, not expired) file has that name."""
        meta = await self.layout.meta(name_hash(name))
        return meta is not None and meta.live

    def list(
        self, prefix: str = "", *, scope: str | None = None, include_deleted: bool = False,
    ) -> AsyncIterator[StoredFile]:
        """Files whose name starts with `prefix`, by name."""
        return self.layout.list_files(prefix, scope=scope, include_deleted=include_deleted)

    def verify(self) -> AsyncIterator[BrokenFile]:
        """Live files whose stored bytes do not match their row."""
        return self.layout.verify()

    async def read(self, name: str) -> tuple[FileMeta, AsyncIterator[bytes]] | None:
        """A live file's row and its bytes, one version throughout (FileBroken otherwise)."""
        meta = await self.layout.meta(name_hash(name))
        if meta is None or not meta.live:
            return None
        await self.layout.check(meta)
        return meta, self._chunks(meta)

    async def _chunks(self, meta: FileMeta) -> AsyncIterator[bytes]:
        # The endpoint's checked read: one version, no gap, nothing past the size.
        try:
            async with aclosing(self.layout.read(meta, 0, meta.size - 1)) as pieces:
                async for piece in pieces:
                    yield piece
        except StreamAborted as e:
            raise FileBroken(f"{meta.name_hash}: {e}") from None

    async def fetch_contents(self, name: str) -> bytes | None:
        """A live file's bytes, or None."""
        found = await self.read(name)
        if found is None:
            return None
        return b"".join([c async for c in found[1]])

    async def fetch_file(self, name: str, path: str | os.PathLike[str]) -> FileMeta | None:
        """Write a live file to `path` with its mtime; None if there is none.

        Atomic: the bytes go to a temporary file in the same directory,
        renamed over `path` once complete, so `path` is never half written.
        """
        found = await self.read(name)
        if found is None:
            return None
        meta, chunks = found
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:40]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                async for data in chunks:
                    out.write(data)
            os.utime(tmp, (meta.mtime, meta.mtime))
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        return meta

    async def sha256(self, name: str) -> str | None:
        """The sha256 of a live file's stored bytes (`import --remove` checks it)."""
        found = await self.read(name)
        if found is None:
            return None
        digest = hashlib.sha256()
        async for data in found[1]:
            digest.update(data)
        return digest.hexdigest()
