"""A FUSE file system that fails as a sick NFS mount does: real ESTALE and EIO from the kernel.

    python tests/faultyfs.py BACKING MOUNTPOINT

It shows the directory BACKING, read-only, at MOUNTPOINT (libfuse 3 through
mfusepy), except that
- a name holding `.estale.` cannot be looked up or opened: ESTALE
  (the file handle an NFS client holds after the server lost the file);
- reading a file whose name holds `.eio.` fails: EIO (a failing disk or
  server); opening it and its attributes work, so a response can start
  and then break;
- reading a file whose name holds `.held.` hangs (a server that does not
  answer): it creates BACKING/holding, then waits until BACKING/release
  exists, and fails EIO if it still does not after HOLD_SECONDS.
Runs in the foreground until unmounted (fusermount3 -u MOUNTPOINT).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any

import mfusepy as fuse

HOLD_SECONDS = 15.0


class Faulty(fuse.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, backing: str) -> None:
        self.backing = backing

    def _path(self, path: str) -> str:
        if ".estale." in path:
            raise fuse.FuseOSError(errno.ESTALE)
        return os.path.join(self.backing, path.lstrip("/"))

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        try:
            st = os.lstat(self._path(path))
        except FileNotFoundError:
            raise fuse.FuseOSError(errno.ENOENT) from None
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_ino")
        times = {k: getattr(st, f"{k}_ns") for k in ("st_atime", "st_mtime", "st_ctime")}
        return {**{k: getattr(st, k) for k in keys}, **times}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if ".eio." in path:
            raise fuse.FuseOSError(errno.EIO)
        if ".held." in path:
            self._hold()
        return os.pread(fh, size, offset)

    def _hold(self) -> None:
        release = os.path.join(self.backing, "release")
        open(os.path.join(self.backing, "holding"), "wb").close()
        deadline = time.monotonic() + HOLD_SECONDS
        while not os.path.exists(release):
            if time.monotonic() > deadline:
                raise fuse.FuseOSError(errno.EIO)
            time.sleep(0.01)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    # Caches off: every lookup and read reaches this process, as with a server in trouble.
    fuse.FUSE(Faulty(backing), mountpoint, foreground=True, ro=True, allow_other=True,
              direct_io=True, attr_timeout=0, entry_timeout=0, negative_timeout=0)


if __name__ == "__main__":
    main()
