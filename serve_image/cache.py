"""The hot-object cache: small files kept in the worker's memory for a few seconds.

Off by default (CACHE_MAX_BYTES = 0). When on, a small file read whole in
its one query is kept with its row, so the next request for it — a 200, a
HEAD or a 304 — costs no database round trip. A row read without its bytes
(for a 304, a HEAD or a range) is kept too, without them: the next 304 or
HEAD for that file, whatever its size, is answered from memory. An entry is served for at
most CACHE_TTL seconds after it was read: that is the staleness bound. A
file replaced or deleted in the database may still be served, unchanged, for
up to CACHE_TTL seconds by each worker that cached it; after that it is read
again. The cache is per worker process and per site, bounded in bytes, and
drops the least recently used entries first.

With PURGE_ALLOW set, a PURGE for a file (serve_image/invalidation.py)
drops it at once from every worker's cache, through the node's purge board
(serve_image/purgeboard.py): an entry keeps the board's stamp for its file
from before its row was read, and is not used once the stamp has moved. A
read that was under way when the purge came is therefore not kept either.

With METRICS_PATH on, every lookup is counted as a hit or a miss
(observability.py); off, a lookup costs one attribute test more.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, Protocol

from serve_image.purgeboard import PurgeBoard
from serve_image.settings import Settings
from serve_image.storage import FileMeta

# What an entry costs beyond its bytes (the key, the row, the dict slot):
# counted so that many tiny files cannot grow the cache past its bound.
ENTRY_OVERHEAD = 256


class Entry(NamedTuple):
    meta: FileMeta
    body: bytes | None  # None: the row only
    expires: float  # time.monotonic() after which the entry is not used
    stamp: int  # the purge board's stamp for the file before it was read


class CacheObserver(Protocol):
    """What the metrics want to hear about (observability.py implements it)."""

    def cache_lookup(self, hit: bool) -> None: ...


class HotCache:
    """Least recently used small files, at most `max_bytes`, each for at most `ttl` seconds."""

    def __init__(
        self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic,
        board: PurgeBoard | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.board = board
        # Files above this size are not cached: one would push out many small ones.
        self.max_file_bytes = max(0, max_bytes // 16 - ENTRY_OVERHEAD)
        self.clock = clock
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.observer: CacheObserver | None = None

    @classmethod
    def for_site(cls, settings: Settings) -> HotCache | None:
        """The site's cache, or None when CACHE_MAX_BYTES is 0.

        With PURGE_ALLOW set, a PURGE reaches every worker's cache through the
        node's purge board.
        """
        if not settings.cache_max_bytes:
            return None
        board = PurgeBoard.for_site(settings) if settings.purge_allow else None
        return cls(settings.cache_max_bytes, settings.cache_ttl, board=board)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def get(self, name_hash: str, need_body: bool = False) -> Entry | None:
        """The fresh entry for a file, or None (an expired one is dropped).

        need_body: only an entry with the file's bytes will do (a whole GET);
        a row kept alone is then a miss.
        """
        entry = self._entries.get(name_hash)
        if entry is not None and (self.clock() >= entry.expires or (
            self.board is not None and self.board.stamp(name_hash) != entry.stamp
        )):
            self._drop(name_hash)
            entry = None
        if entry is not None and need_body and entry.body is None:
            entry = None
        if self.observer is not None:
            self.observer.cache_lookup(entry is not None)
        if entry is not None:
            self._entries.move_to_end(name_hash)
        return entry

    def stamp(self, name_hash: str) -> int:
        """Taken before a file's row is read, and given to `put` with what was read."""
        return 0 if self.board is None else self.board.stamp(name_hash)

    def put(self, meta: FileMeta, body: bytes, stamp: int = 0) -> None:
        """Keep a live file's row and its whole body; too big a file is not kept."""
        if len(body) == meta.size and len(body) <= self.max_file_bytes:
            self._keep(meta, body, stamp)

    def put_meta(self, meta: FileMeta, stamp: int = 0) -> None:
        """Keep a live file's row alone (enough for a 304 or a HEAD)."""
        self._keep(meta, None, stamp)

    def purge(self, name_hash: str) -> None:
        """Drop a file here and, through the board, in every worker of the node."""
        if self.board is not None:
            self.board.bump(name_hash)
        if name_hash in self._entries:
            self._drop(name_hash)

    def _keep(self, meta: FileMeta, body: bytes | None, stamp: int) -> None:
        if not meta.live or stamp != self.stamp(meta.name_hash):
            return  # purged while it was read: what was read may be the old version
        if meta.name_hash in self._entries:
            self._drop(meta.name_hash)
        self._entries[meta.name_hash] = Entry(meta, body, self.clock() + self.ttl, stamp)
        self.bytes += _cost(body)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, name_hash: str) -> None:
        self.bytes -= _cost(self._entries.pop(name_hash).body)


def _cost(body: bytes | None) -> int:
    return ENTRY_OVERHEAD + (0 if body is None else len(body))
