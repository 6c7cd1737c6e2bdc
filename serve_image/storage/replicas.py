"""STORAGE_REPLICAS: the endpoint reads from replicas, and asks the primary what they miss.

The endpoint's layout when a site lists replicas (`make_layout(...,
replicas=True)`; the command line never asks for it, so every write and
every management read goes to the primary). It holds two layouts of the
site's kind, each over a driver of its own: one over the replicas, one over
the primary servers (STORAGE_HOST or STORAGE_HOSTS). Each has the ordered
failover of `drivers/failover.py`: reads go to the first replica up, and
with every replica put aside a read fails at once, without I/O, and is
asked of the primary.

A replica lags behind its primary, and eZ shows an image on the page right
after storing it: a 404 from a replica that has not caught up would be kept
by browsers and proxies. So a replica's miss is asked of the primary before
any 404. A miss is:

- no row, or a deleted one (the file may have been stored again since);
- a row whose bytes are not all there yet: `Layout.has_bytes` says so of
  what `first` read (a chunk row without its first chunk), `Layout.check`
  of a version whose bytes are not in hand (a DFS file unlike its row);
- a body whose read stops (StreamAborted: a chunk missing, or the replica
  lost mid-stream): the rest of that version is read from the primary,
  from the byte where the replica stopped, so the response goes on whole.

The other way round, a lagging replica serves what it has: a file deleted
or replaced on the primary is served as it was until the replica catches
up (as the hot cache serves it for CACHE_TTL). Asking the primary about
every file found would make the replicas pointless.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing

from serve_image.settings import Settings
from serve_image.storage.drivers.base import DriverObserver
from serve_image.storage.errors import StorageError, StreamAborted
from serve_image.storage.files import BrokenFile, FileMeta, StoredFile
from serve_image.storage.layout import First, Layout
from serve_image.storage.pieces import Pieces

logger = logging.getLogger("serve_image.replicas")


def replica_settings(settings: Settings) -> Settings:
    """The site's settings with its replicas as the servers to try, in order."""
    first = settings.replicas[0]
    return dataclasses.replace(
        settings, hosts=settings.replicas, replicas=(),
        host=first.host, port=first.port, socket=first.socket,
    )


class ReplicaLayout(Layout):
    """Serving reads from the replicas, the primary behind them; everything else on the primary."""

    name = "replicas"

    def __init__(self, primary: Layout, replica: Layout) -> None:
        super().__init__(primary.settings, primary.driver)
        self.primary = primary
        self.replica = replica

    # -- life cycle -----------------------------------------------------------
    async def connect(self) -> None:
        await self.primary.connect()
        await self.replica.connect()
        logger.info("%s: reads from %s first", self.settings.describe(),
                    ", ".join(h.label for h in self.settings.replicas))

    async def close(self) -> None:
        await self.replica.close()
        await self.primary.close()

    async def ping(self) -> None:
        # Files can be served while either side answers.
        try:
            await self.replica.ping()
        except StorageError:
            await self.primary.ping()

    def observe(self, observer: DriverObserver) -> None:
        self.primary.observe(observer)
        self.replica.observe(observer)

    async def create_tables(self) -> None:
        await self.primary.create_tables()

    # -- reads for serving ------------------------------------------------------
    async def _ready(self, meta: FileMeta, got: First | None = None) -> bool:
        """Can the replica's row be served as it is, or is it a miss?"""
        if not meta.live:
            return False
        if got is not None and not self.replica.has_bytes(got):
            return False
        data = got[1] if got is not None else None
        if meta.size and (data is None or len(data) < meta.size):
            try:
                await self.replica.check(meta)
            except StorageError:
                return False
        return True

    async def meta(self, name_hash: str) -> FileMeta | None:
        try:
            meta = await self.replica.meta(name_hash)
        except StorageError:  # every replica down, or one refusing the read
            meta = None
        if meta is not None and await self._ready(meta):
            return meta
        return await self.primary.meta(name_hash)

    async def first(self, name_hash: str) -> First | None:
        try:
            got = await self.replica.first(name_hash)
        except StorageError:
            got = None
        if got is not None and await self._ready(got[0], got):
            return got
        return await self.primary.first(name_hash)

    async def meta_many(self, hashes: Sequence[str]) -> dict[str, FileMeta]:
        try:
            found = await self.replica.meta_many(hashes)
        except StorageError:
            found = {}
        ready = await self._all_ready({h: (m, None) for h, m in found.items()})
        kept = {h: found[h] for h in ready}
        missed = [h for h in hashes if h not in kept]
        if missed:
            kept.update(await self.primary.meta_many(missed))
        return kept

    async def first_many(self, hashes: Sequence[str]) -> dict[str, First]:
        try:
            found = await self.replica.first_many(hashes)
        except StorageError:
            found = {}
        ready = await self._all_ready({h: (got[0], got) for h, got in found.items()})
        kept = {h: found[h] for h in ready}
        missed = [h for h in hashes if h not in kept]
        if missed:
            kept.update(await self.primary.first_many(missed))
        return kept

    async def _all_ready(self, found: dict[str, tuple[FileMeta, First | None]]) -> list[str]:
        """The hashes of `found` whose rows can be served; the checks of a batch run together."""
        if not found:
            return []
        oks = await asyncio.gather(*(self._ready(m, got) for m, got in found.values()))
        return [h for h, ok in zip(found, oks, strict=True) if ok]

    def local_path(self, meta: FileMeta) -> str | None:
        # One shared mount (DFS) whichever database the row came from.
        return self.primary.local_path(meta)

    async def check(self, meta: FileMeta) -> None:
        try:
            await self.replica.check(meta)
        except StorageError:
            # The version may have come from the primary (the replica missed it).
            await self.primary.check(meta)

    async def read(self, meta: FileMeta, start: int, end: int) -> AsyncGenerator[bytes, None]:
        pos = start
        try:
            async with aclosing(self.replica.read(meta, start, end)) as pieces:
                async for piece in pieces:
                    pos += len(piece)
                    yield piece
            return
        except StreamAborted as e:
            # A chunk not replicated yet, a version the replica does not
            # have, or the replica lost: the same version from the primary,
            # from where the replica stopped (each read checks mtime and size).
            logger.debug("%s: bytes %d.. from the primary: %s", meta.name_hash, pos, e)
        async with aclosing(self.primary.read(meta, pos, end)) as pieces:
            async for piece in pieces:
                yield piece

    # -- writes and management: the primary's ---------------------------------------
    async def store(
        self, name: str, pieces: Pieces, *, size: int, mtime: int, datatype: str,
        scope: str,
    ) -> None:
        await self.primary.store(
            name, pieces, size=size, mtime=mtime, datatype=datatype, scope=scope,
        )

    async def delete(self, name: str) -> bool:
        return await self.primary.delete(name)

    async def delete_matching(self, pattern: str) -> list[str]:
        return await self.primary.delete_matching(pattern)

    async def purge(
        self, cutoff: int, *, dry_run: bool = False,
        removed: Callable[[list[str]], object] | None = None,
    ) -> tuple[int, int]:
        return await self.primary.purge(cutoff, dry_run=dry_run, removed=removed)

    async def stat_many(self, hashes: Sequence[str]) -> dict[str, StoredFile]:
        return await self.primary.stat_many(hashes)

    def list_files(
        self, prefix: str = "", *, scope: str | None = None, include_deleted: bool = False,
    ) -> AsyncIterator[StoredFile]:
        return self.primary.list_files(prefix, scope=scope, include_deleted=include_deleted)

    def verify(self) -> AsyncIterator[BrokenFile]:
        return self.primary.verify()
