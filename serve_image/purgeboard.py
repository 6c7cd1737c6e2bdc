"""Purges seen by one worker, shown to every worker of the node.

A PURGE reaches one worker process, but each worker keeps its own hot cache.
So a purge bumps a counter in a small table shared by every process that
serves the site on this machine: a file mapped into memory, SLOTS counters
of 8 bytes, the slot chosen by the file's name hash. A cache entry records
its slot's counter from before its row was read, and is used only while the
counter is unchanged: checking costs one memory read, no system call. A
purge also drops the other files that share its slot (one in SLOTS): they
are read again, never served stale.

The file is `serve-image-<uid>-<site>.purges` in $XDG_RUNTIME_DIR (systemd's
per-user runtime directory), else /dev/shm, else the temporary directory;
`<site>` is a digest of the site file's path, so the workers of one site
share it, and another site or user does not. When it cannot be used (a file
of that name owned by someone else), the worker keeps a table of its own
and says so in the log: purges then reach only the worker that gets them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import stat
import tempfile

from serve_image.settings import Settings

logger = logging.getLogger("serve_image.purgeboard")

SLOTS = 16384
_SIZE = SLOTS * 8


def slot_of(name_hash: str) -> int:
    """The counter of a file: the same in every process (str's hash() is not)."""
    return int(name_hash[:8], 16) % SLOTS


def board_dir() -> str:
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    return tempfile.gettempdir()


def board_path(settings: Settings) -> str:
    site = hashlib.sha256(os.path.abspath(settings.source).encode()).hexdigest()[:16]
    return os.path.join(board_dir(), f"serve-image-{os.geteuid()}-{site}.purges")


def _open_shared(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        # Anyone else's file could be made to hide purges from us.
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise PermissionError(f"{path}: not a private regular file of this user")
        if st.st_size < _SIZE:
            os.ftruncate(fd, _SIZE)  # new: zeros, which every process reads alike
        return mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class PurgeBoard:
    """The node's purge counters, one per slot."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        memory: mmap.mmap | None = None
        if path is not None:
            try:
                memory = _open_shared(path)
            except OSError as e:
                logger.warning("purges reach this worker only: cannot share %s: %s", path, e)
                self.path = None
        self._memory = memory or mmap.mmap(-1, _SIZE)
        self._counters = memoryview(self._memory).cast("Q")

    @classmethod
    def for_site(cls, settings: Settings) -> PurgeBoard:
        return cls(board_path(settings))

    def stamp(self, name_hash: str) -> int:
        """The file's counter now; a cached entry stamped with it is valid while it stays."""
        return int(self._counters[slot_of(name_hash)])

    def bump(self, name_hash: str) -> None:
        """Mark a file purged in every process. Two bumps at once may count as one: the
        counter changes either way, which is all a reader looks at."""
        slot = slot_of(name_hash)
        self._counters[slot] = (self._counters[slot] + 1) % (1 << 64)

    def close(self) -> None:
        self._counters.release()
        with contextlib.suppress(BufferError):
            self._memory.close()
