"""The disk side of local copies: safe paths, atomic writes, the shared byte count.

Every function here blocks: the writer runs them in a thread.

No name and no symlink planted in the tree can make a write land outside
LOCAL_COPY_DIR: every operation is relative to a directory descriptor, and
the directories below the root are opened one by one with O_NOFOLLOW. A copy
appears whole or not at all: it is written to a temporary file in its own
directory, checked (size, and bytes read back), given the row's mtime, then
renamed over the target (rename(2) is atomic within one file system and
replaces a symlink rather than writing through it).

The byte count for LOCAL_COPY_MAX_BYTES covers the regular files under
`LOCAL_COPY_DIR/var/**/storage/images[-versioned]/`, the only places a copy
is written, whichever site wrote it. It lives in a ledger file,
`LOCAL_COPY_DIR/.serve-image-usage`, under an flock(2), so every worker
process of every site sharing the directory reserves from one total. A scan
sets it (each process before its first copy, and prune-local); in between,
writes add to it and replacements subtract.

When a copy does not fit, the least recently served copies are evicted
first (`make_room`), one process at a time (an flock(2) on
`LOCAL_COPY_DIR/.serve-image-evict`), down to EVICT_TO of the budget so
that the next copies fit without another scan. "Served" is read from the
files' access time: a copy starts with the time it was written (it was just
served), the endpoint sets it again when it serves a file whose copy is up
to date (`touch`, at most once a minute per file and worker), and the web
server's reads of the copy set it as the mount's atime policy allows
(Linux's default `relatime`: once a day; `strictatime`: every read;
`noatime`: never, so copies go oldest written first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Iterator
from urllib.parse import quote

from serve_image.errors import RequestRefused
from serve_image.paths import request_name
from serve_image.storage.files import FileMeta, same_version, stored_mtime

# Temporary files older than this were left by a crash; prune-local removes them.
STALE_TEMP_SECONDS = 3600
LEDGER = ".serve-image-usage"
EVICT_LOCK = ".serve-image-evict"
# An eviction frees room down to this share of LOCAL_COPY_MAX_BYTES.
EVICT_TO = 0.9
# Scans one eviction may take when other processes keep taking the room made.
EVICT_ROUNDS = 3
TEMP_SUFFIX = ".serve-image-tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CopyRefused(Exception):
    """A copy that must not or cannot be written; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class LocalFile:
    """A file found under the copy tree: its stored name and what the disk says."""

    name: str
    size: int
    mtime: int
    temporary: bool
    atime: float = 0.0  # when it was last served, as far as the disk knows


def _segments(name: str) -> list[str]:
    parts = name.split("/")
    # request_name() already refuses these; checked again because this is the
    # line between a request and the disk.
    if any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise CopyRefused(f"unsafe name {name!r}")
    return parts


def _open_root(root: str) -> int:
    # The root itself may be a symlink: the administrator chose it.
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_parent(root_fd: int, name: str, *, create: bool) -> tuple[int, str]:
    """The directory holding `name`, opened without following any symlink; and its base name."""
    *dirs, base = _segments(name)
    fd = os.dup(root_fd)
    try:
        for part in dirs:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CopyRefused(f"{name}: {part!r} is a symlink or not a directory") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, base


def _regular(dir_fd: int, base: str) -> os.stat_result | None:
    try:
        st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _is_copy_of(st: os.stat_result | None, meta: FileMeta) -> bool:
    return st is not None and same_version(st, meta.size, meta.mtime)


def adjust_ledger(root_fd: int, delta: int = 0, *, limit: int | None = None,
                  set_to: int | None = None) -> bool:
    """Add `delta` to the shared byte count (refused past `limit`), or set it."""
    fd = os.open(LEDGER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=root_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        if set_to is not None:
            total = set_to
        else:
            try:
                total = max(0, int(os.pread(fd, 32, 0) or b"0") + delta)
            except ValueError:  # damaged ledger: start again from this write
                total = max(0, delta)
            if limit is not None and delta > 0 and total > limit:
                return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(total).encode(), 0)
        return True
    finally:
        os.close(fd)


def read_ledger(root: str) -> int:
    """The shared byte count, 0 when there is none yet."""
    try:
        with open(os.path.join(root, LEDGER), "rb") as f:
            return int(f.read() or b"0")
    except FileNotFoundError:
        return 0


def scan(root: str, var_dir: str | None = None) -> Iterator[LocalFile]:
    """Regular files under `root/var` at names the endpoint serves; symlinks are never followed.

    With `var_dir`, only that site's files (`prune-local` touches no other
    site's copies); without, all of them (the budget is shared).
    """
    top = os.path.join(root, "var")
    if not os.path.isdir(top) or os.path.islink(top):
        return
    for dirpath, _dirs, files, dir_fd in os.fwalk(top):
        for base in files:
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            name = os.path.relpath(os.path.join(dirpath, base), root).replace(os.sep, "/")
            temporary = base.endswith(TEMP_SUFFIX)
            try:
                # The same rules as a request: a name the endpoint would not
                # serve (or another site's) is not one of our copies.
                request_name(quote("/" + name).encode(), var_dir)
            except RequestRefused:
                continue
            yield LocalFile(name, st.st_size, stored_mtime(st), temporary, st.st_atime)


class TempCopy:
    """A temporary file beside the target, committed by rename or removed."""

    def __init__(self, root: str, name: str) -> None:
        self.name = name
        root_fd = _open_root(root)
        try:
            self.dir_fd, self.base = _open_parent(root_fd, name, create=True)
        finally:
            os.close(root_fd)
        self.temp = f".{self.base[:64]}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        self.digest = hashlib.blake2b()
        try:
            self.fd = os.open(
                self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644, dir_fd=self.dir_fd,
            )
        except BaseException:
            os.close(self.dir_fd)
            raise

    def current(self) -> os.stat_result | None:
        return _regular(self.dir_fd, self.base)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.digest.update(data)

    def commit(self, meta: FileMeta) -> int:
        """Check, date and rename into place; the size of the copy it replaced (0 if none)."""
        if os.fstat(self.fd).st_size != meta.size:
            raise CopyRefused(f"{self.name}: wrote {os.fstat(self.fd).st_size} bytes, "
                              f"expected {meta.size}")
        os.fsync(self.fd)
        back = hashlib.blake2b()
        read_fd = os.open(self.temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=self.dir_fd)
        try:
            while block := os.read(read_fd, 1024 * 1024):
                back.update(block)
        finally:
            os.close(read_fd)
        if back.digest() != self.digest.digest():
            raise CopyRefused(f"{self.name}: bytes read back differ from the bytes written")
        # The row's mtime; the access time is now: the file was just served,
        # and eviction goes by it.
        os.utime(self.fd, (time.time(), meta.mtime))
        os.close(self.fd)
        self.fd = -1
        old = self.current()
        # rename(2) replaces the target atomically, and replaces a symlink
        # itself rather than the file it points to.
        os.rename(self.temp, self.base, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.close(self.dir_fd)
        self.dir_fd = -1
        return old.st_size if old is not None else 0

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.temp, dir_fd=self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = -1


def up_to_date(root: str, name: str, meta: FileMeta, *, touch: bool = False) -> bool:
    """Is `name` under root already a copy of this version (size and mtime)?

    With `touch`, a copy that is up to date is marked served now (its access
    time), for eviction.
    """
    root_fd = _open_root(root)
    try:
        try:
            dir_fd, base = _open_parent(root_fd, name, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            if not _is_copy_of(_regular(dir_fd, base), meta):
                return False
            if touch:
                os.utime(base, (time.time(), meta.mtime), dir_fd=dir_fd, follow_symlinks=False)
            return True
        finally:
            os.close(dir_fd)
    finally:
        os.close(root_fd)


def remove(root: str, name: str) -> int:
    """Remove the copy at `name`, whatever its version (a PURGE); the bytes it held (0: none).

    The ledger is not changed: the caller releases the bytes.
    """
    root_fd = _open_root(root)
    try:
        try:
            dir_fd, base = _open_parent(root_fd, name, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        try:
            st = _regular(dir_fd, base)
            if st is None:
                return 0
            try:
                os.unlink(base, dir_fd=dir_fd)
            except FileNotFoundError:
                return 0  # another worker removed it first, and released its bytes
            return st.st_size
        finally:
            os.close(dir_fd)
    finally:
        os.close(root_fd)


@contextlib.contextmanager
def _locked(root_fd: int, lock_name: str) -> Iterator[None]:
    fd = os.open(lock_name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=root_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        yield
    finally:
        os.close(fd)


def make_room(root: str, size: int, limit: int) -> tuple[bool, list[str]]:
    """Reserve `size` bytes, evicting the least recently served copies if they do not fit.

    Returns whether the bytes were reserved, and the names evicted. One
    process evicts at a time; the others wait, then find the room made.
    """
    if size > limit:
        return False, []
    root_fd = _open_root(root)
    try:
        if adjust_ledger(root_fd, size, limit=limit):
            return True, []
        with _locked(root_fd, EVICT_LOCK):
            evicted: list[str] = []
            for _ in range(EVICT_ROUNDS):
                # Another process may have made room (or taken it) meanwhile.
                if adjust_ledger(root_fd, size, limit=limit):
                    return True, evicted
                gone = _evict(root, root_fd, int(limit * EVICT_TO) - size)
                if not gone:
                    # Nothing left to evict, and still no room: the count
                    # drifted (copies removed by hand); start it from the disk.
                    adjust_ledger(root_fd, set_to=sum(f.size for f in scan(root)))
                evicted += gone
            return adjust_ledger(root_fd, size, limit=limit), evicted
    finally:
        os.close(root_fd)


def _evict(root: str, root_fd: int, goal: int) -> list[str]:
    """Remove the copies served longest ago until the count is at most `goal`; their names."""
    total = read_ledger(root)
    evicted: list[str] = []
    for found in sorted((f for f in scan(root) if not f.temporary), key=lambda f: f.atime):
        if total <= goal:
            break
        # A copy rewritten since the scan is not the one that was served long ago.
        if remove_if_unchanged(root, found):
            adjust_ledger(root_fd, -found.size)
            total -= found.size
            evicted.append(found.name)
    return evicted


def release(root: str, size: int) -> None:
    """Give back bytes of the shared count (a failed copy, a replaced one)."""
    root_fd = _open_root(root)
    try:
        adjust_ledger(root_fd, -size)
    finally:
        os.close(root_fd)


def recount(root: str) -> int:
    """Set the ledger from a scan of every copy; returns the total."""
    root_fd = _open_root(root)
    try:
        total = sum(f.size for f in scan(root))
        adjust_ledger(root_fd, set_to=total)
        return total
    finally:
        os.close(root_fd)


def remove_if_unchanged(root: str, found: LocalFile) -> bool:
    """Remove a copy unless it changed since it was scanned (a fresh copy is kept)."""
    root_fd = _open_root(root)
    try:
        try:
            dir_fd, base = _open_parent(root_fd, found.name, create=False)
        except (FileNotFoundError, CopyRefused):
            return False
        try:
            st = _regular(dir_fd, base)
            if st is None or not same_version(st, found.size, found.mtime):
                return False
            os.unlink(base, dir_fd=dir_fd)
            return True
        finally:
            os.close(dir_fd)
    finally:
        os.close(root_fd)


def stale_temp(found: LocalFile, now: float | None = None) -> bool:
    """A temporary file left behind by a crash."""
    return found.temporary and (now or time.time()) - found.mtime > STALE_TEMP_SECONDS
