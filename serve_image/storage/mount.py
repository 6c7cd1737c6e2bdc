"""The files of a DFS mount: opened without ever leaving it, written atomically.

Every function here blocks (the mount is NFS): the DFS layout runs them in
its bounded pool (`pool.py`), never on the event loop.

No name and no symbolic link on the mount can make a read or a write land
outside it: a name is split into segments (an empty one, `.`, `..` or a
NUL refused), and a file is opened for reading with openat2(2) below the
mount point, the kernel refusing any symbolic link on the way and any step
out of it (RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH: one system call where a
walk takes two per directory). Where openat2 is missing (Linux before 5.6,
or a seccomp filter that refuses it), and for writes, the directories below
the mount point are opened one by one with O_NOFOLLOW, each relative to the
one before, the file itself with O_NOFOLLOW too. Symbolic links are
therefore never followed, not even those pointing inside the mount: eZ
never makes any. The mount point itself may be a link: the administrator
chose it.

A file is read from one descriptor, so a reader sees one version of it
whatever eZ renames over it meanwhile; `Version` says which one, so that
reads of one response can tell when the file was replaced between them.

A file is written as eZ writes it (eZFile::create with $atomic): to a
temporary file beside it, then renamed over it, so a reader sees the old
bytes or the new, never half of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# No O_NONBLOCK: opening a fifo blocks, as a read of a hung NFS server does;
# the pool's bound answers both. What was opened is checked with fstat.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
TEMP_SUFFIX = ".serve-image-tmp"
# A temporary file older than this was left by a write that was killed.
STALE_TEMP_SECONDS = 3600
# errno values that say a file is not (yet) where its row says.
_ABSENT = (errno.ENOENT, errno.ENOTDIR)


# openat2(2): its number is the same on every Linux architecture.
_SYS_OPENAT2 = 437
_RESOLVE = 0x02 | 0x04 | 0x08  # RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64))


# ctypes lets go of the GIL during the call: a hung open blocks its thread only.
_libc = ctypes.CDLL(None, use_errno=True)
_openat2_works = hasattr(_libc, "syscall")


def _openat2(dir_fd: int, name: str, flags: int) -> int:
    how = _OpenHow(flags, 0, _RESOLVE)
    fd = int(_libc.syscall(_SYS_OPENAT2, dir_fd, os.fsencode(name), ctypes.byref(how),
                           ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return fd


# Each pool thread keeps the mount point open for openat2: two system calls
# less per file. Reopened when the server says it went stale (a remount).
_roots = threading.local()


def _root_fd(root: str) -> int:
    fds: dict[str, int] = _roots.__dict__.setdefault("fds", {})
    fd = fds.get(root)
    if fd is None:
        fd = fds[root] = _open_root(root)
    return fd


def forget_roots() -> None:
    """Close the mount points this thread kept open (its pool is closing)."""
    for fd in _roots.__dict__.pop("fds", {}).values():
        os.close(fd)


def _forget_root(root: str) -> None:
    fd = _roots.__dict__.get("fds", {}).pop(root, None)
    if fd is not None:
        os.close(fd)


def _open_beneath(root: str, name: str, parts: list[str]) -> int:
    """A file of the mount opened for reading, never through a link."""
    global _openat2_works
    if _openat2_works:
        try:
            return _openat2(_root_fd(root), name, _FILE)
        except OSError as e:
            if e.errno == errno.ESTALE:
                _forget_root(root)
                return _openat2(_root_fd(root), name, _FILE)
            if e.errno == errno.EXDEV:  # RESOLVE_BENEATH: a link leaving the mount
                raise OSError(errno.ELOOP, "a symbolic link", name) from None
            if e.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            _openat2_works = False  # refused by the kernel or a filter: walk instead
    *dirs, base = parts
    dir_fd = _open_dirs(root, dirs)
    try:
        return os.open(base, _FILE, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


class MountError(Exception):
    """A file that cannot be read or written on the mount now; the message says why.

    `in_progress`: most likely a write under way (missing, another size), over
    in a moment; otherwise the mount itself is failing (ESTALE, EIO, ...).
    """

    def __init__(self, message: str, *, in_progress: bool = False) -> None:
        super().__init__(message)
        self.in_progress = in_progress


class UnsafeName(MountError):
    """A name that would leave the mount, or reach it through a symbolic link."""


@dataclass(frozen=True, slots=True)
class Version:
    """Which file was read: another inode, size or mtime is another version."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Version:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def segments(name: str) -> list[str]:
    """The path segments of a stored name; UnsafeName for one that could leave the mount."""
    parts = name.split("/")
    if any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise UnsafeName(f"{name!r} is not a safe relative path")
    return parts


def _failure(e: OSError, name: str) -> MountError:
    """An OSError of the mount as a MountError (one line, no traceback)."""
    if e.errno in _ABSENT:
        return MountError(f"{name}: not on the mount", in_progress=True)
    if e.errno == errno.ELOOP:
        return UnsafeName(f"{name}: a symbolic link on the mount: not followed")
    return MountError(f"{name}: {errno.errorcode.get(e.errno or 0, 'error')}: "
                      f"{e.strerror or e}")


def _open_root(root: str) -> int:
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_dirs(root: str, parts: list[str], *, create: bool = False) -> int:
    """The directory `parts` below the mount point, opened without following links."""
    fd = _open_root(root)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)  # the umask applies, as for eZ
            child = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened(root: str, name: str) -> Iterator[tuple[int, os.stat_result]]:
    """A regular file of the mount, open for reading, and its stat; MountError otherwise."""
    parts = segments(name)
    try:
        fd = _open_beneath(root, name, parts)
    except OSError as e:
        raise _failure(e, name) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MountError(f"{name}: not a regular file on the mount")
        yield fd, st
    except OSError as e:
        raise _failure(e, name) from None
    finally:
        os.close(fd)


def _check_size(name: str, st: os.stat_result, size: int) -> None:
    if st.st_size != size:
        raise MountError(f"{name}: {st.st_size} bytes on the mount, the row says {size}",
                         in_progress=True)


def _pread_exactly(fd: int, name: str, offset: int, length: int) -> bytes:
    parts = []
    got = 0
    while got < length:
        data = os.pread(fd, length - got, offset + got)
        if not data:
            raise MountError(f"{name}: shorter on the mount than its size", in_progress=True)
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def probe(root: str, name: str, size: int) -> None:
    """MountError unless `name` is a regular file of `size` bytes on the mount now."""
    with opened(root, name) as (_fd, st):
        _check_size(name, st, size)


def read_many(root: str, files: list[tuple[str, int]]) -> list[bytes | MountError]:
    """`read_whole` of several files in one trip to the pool: each its bytes or its error."""
    out: list[bytes | MountError] = []
    for name, size in files:
        try:
            out.append(read_whole(root, name, size))
        except MountError as e:
            out.append(e)
    return out


def read_whole(root: str, name: str, size: int) -> bytes:
    """All the bytes of a file whose row says `size`; MountError if it has another size."""
    with opened(root, name) as (fd, st):
        _check_size(name, st, size)
        try:
            return _pread_exactly(fd, name, 0, size) if size else b""
        except OSError as e:
            raise _failure(e, name) from None


def read_at(root: str, name: str, size: int, offset: int, length: int) -> tuple[bytes, Version]:
    """Bytes offset..offset+length of the file, and which version of it they come from."""
    with opened(root, name) as (fd, st):
        _check_size(name, st, size)
        try:
            data = _pread_exactly(fd, name, offset, length)
            # Written to in place while read (not by eZ, which renames): the
            # bytes may mix two versions.
            after = os.fstat(fd)
        except OSError as e:
            raise _failure(e, name) from None
        if Version.of(after) != Version.of(st):
            raise MountError(f"{name}: changed on the mount while read", in_progress=True)
        return data, Version.of(st)


def ping(root: str) -> None:
    """OSError unless the mount point answers (an open asks an NFS server for fresh attributes)."""
    fd = _open_root(root)
    try:
        os.fstat(fd)
    finally:
        os.close(fd)


def file_stat(root: str, name: str) -> os.stat_result | None:
    """What is at `name` (a link or a directory too); None when nothing is. Never follows a link."""
    *dirs, base = segments(name)
    try:
        dir_fd = _open_dirs(root, dirs)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise _failure(e, name) from None
    try:
        return os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise _failure(e, name) from None
    finally:
        os.close(dir_fd)


def remove(root: str, name: str) -> bool:
    """Unlink the file at `name` (a purged row's); False when there was none."""
    *dirs, base = segments(name)
    try:
        dir_fd = _open_dirs(root, dirs)
        try:
            os.unlink(base, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno in _ABSENT:
            return False
        raise _failure(e, name) from None
    return True


@dataclass(frozen=True, slots=True)
class Entry:
    """A directory entry of the mount, for `verify`."""

    name: str
    kind: str  # "dir", "file", "link" or "other"
    size: int
    mtime: float


def list_dir(root: str, name: str) -> list[Entry]:
    """The entries of directory `name` ("" for the mount point), links not followed."""
    parts = segments(name) if name else []
    try:
        fd = _open_dirs(root, parts)
    except OSError as e:
        raise _failure(e, name or ".") from None
    try:
        out = []
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # gone since listed
                kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                        else "link" if stat.S_ISLNK(st.st_mode) else "other")
                child = f"{name}/{entry.name}" if name else entry.name
                out.append(Entry(child, kind, st.st_size, st.st_mtime))
        return out
    except OSError as e:
        raise _failure(e, name or ".") from None
    finally:
        os.close(fd)


def is_stale_temp(entry: Entry, now: float | None = None) -> bool:
    """A temporary file of ours that a killed write left behind."""
    return (entry.name.endswith(TEMP_SUFFIX)
            and (now or time.time()) - entry.mtime > STALE_TEMP_SECONDS)


class TempFile:
    """A new version of a file, written beside it and renamed over it.

    Each step is one blocking call, run in the pool one after the other; a
    lock keeps a step that outlived its bound from racing the clean-up (the
    descriptor is never closed under a write still running).
    """

    def __init__(self, root: str, name: str) -> None:
        self.name = name
        *dirs, self.base = segments(name)
        self.lock = threading.Lock()
        self.temp = f".{self.base[:64]}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            self.dir_fd = _open_dirs(root, dirs, create=True)
        except OSError as e:
            raise _failure(e, name) from None
        try:
            self.fd = os.open(
                self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o666, dir_fd=self.dir_fd,
            )
        except OSError as e:
            os.close(self.dir_fd)
            raise _failure(e, name) from None

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.fd < 0:
                raise MountError(f"{self.name}: write abandoned")
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as e:
                raise _failure(e, self.name) from None

    def commit(self, size: int, mtime: int) -> None:
        """Check the size, make it durable, date it, rename it over the file."""
        with self.lock:
            try:
                written = os.fstat(self.fd).st_size
                if written != size:
                    raise MountError(f"{self.name}: wrote {written} bytes, expected {size}")
                os.fsync(self.fd)
                if mtime >= 0:
                    os.utime(self.fd, (mtime, mtime))
                os.close(self.fd)
                self.fd = -1
                # rename(2) replaces the target atomically; a directory there fails.
                os.rename(self.temp, self.base, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
                self.temp = ""
            except OSError as e:
                raise _failure(e, self.name) from None
            finally:
                self._release()

    def abort(self) -> None:
        """Remove the temporary file; nothing of the new version stays."""
        with self.lock:
            self._release()

    def _release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            if self.temp:
                with contextlib.suppress(OSError):
                    os.unlink(self.temp, dir_fd=self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = -1
