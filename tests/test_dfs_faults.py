"""A sick NFS mount, for real: ESTALE and EIO from the kernel, through a FUSE file system.

tests/faultyfs.py shows a directory through FUSE and fails chosen names the
way a failing NFS mount does (the kernel hands the errors to serve-image as
they come). Each failure is a 503 before the headers, or a response cut off
after them, and one log line: never a traceback, never a 500. A file stored
from such a mount (`import`, the Python API) is read off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_image.app import ServeImage
from serve_image.cluster import ClusterFiles
from serve_image.storage import make_layout
from serve_image.storage.layouts.dfs import WHOLE_READ
from tests.conftest import DatabaseFactory
from tests.ezdfs import IMG, connected, counting, dfs_settings, ez_row, raw_get
from tests.helpers import payload, running
from tests.system import program, unavailable

HERE = Path(__file__).resolve().parent
BIG = payload(WHOLE_READ + 1000, 3)


# The FUSE mount points live here, outside pytest's own temporary directories:
# a run killed before its clean-up leaves a dead mount, which pytest could not
# remove with its old directories; the next run unmounts it.
MOUNTS = "/tmp/si-fuse-"


def _unmount_dead(fusermount: str) -> None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        where = line.split()[1]
        if where.startswith(MOUNTS):
            try:
                os.stat(where)
            except OSError:  # ENOTCONN: its file system process is gone
                subprocess.run([fusermount, "-u", "-z", where], capture_output=True, timeout=30)
                shutil.rmtree(Path(where).parent, ignore_errors=True)


@pytest.fixture
def fuse_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(backing directory, FUSE mount point showing it, with its faults)."""
    if not os.path.exists("/dev/fuse"):
        unavailable("needs /dev/fuse: FUSE is not available to this machine")
    fusermount = program("fusermount3")
    _unmount_dead(fusermount)
    backing = tmp_path / "backing"
    backing.mkdir()
    mnt = Path(tempfile.mkdtemp(prefix=MOUNTS.rsplit("/", 1)[1], dir="/tmp")) / "mnt"
    mnt.mkdir()
    files = {f"{IMG}/ok.jpg": b"fine", f"{IMG}/photo.eio.jpg": b"unreadable",
             f"{IMG}/photo.estale.jpg": b"stale", f"{IMG}/old.estale.dir/p.jpg": b"stale dir",
             f"{IMG}/big.eio.bin": BIG}
    for name, data in files.items():
        (backing / name).parent.mkdir(parents=True, exist_ok=True)
        (backing / name).write_bytes(data)
    log = tmp_path / "fuse.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(HERE / "faultyfs.py"), str(backing),
                                 str(mnt)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the FUSE mount did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield backing, mnt
    finally:
        # Lazily: a pool thread of the app may still hold a file of it open.
        subprocess.run([fusermount, "-u", "-z", str(mnt)], capture_output=True, timeout=30)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(mnt.parent, ignore_errors=True)


@pytest.mark.parametrize("backend", ["mysql", "pgsql"])
async def test_estale_and_eio_are_503s_with_one_log_line(
    databases: DatabaseFactory, backend: str, fuse_mount: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _backing, mnt = fuse_mount
    settings = await dfs_settings(databases, backend, mnt)
    sizes = {"ok.jpg": 4, "photo.eio.jpg": 10, "photo.estale.jpg": 5,
             "old.estale.dir/p.jpg": 9, "big.eio.bin": len(BIG)}
    async with connected(settings) as layout:
        for name, size in sizes.items():
            await ez_row(layout, f"{IMG}/{name}", size)
    app = ServeImage(settings, layout=counting(settings))
    with caplog.at_level(logging.INFO, "serve_image"):
        async with running(app) as client:
            assert (await client.get(f"/{IMG}/ok.jpg")).content == b"fine"
            for name, error in (("photo.eio.jpg", "EIO: Input/output error"),
                                ("photo.estale.jpg", "ESTALE: Stale file handle"),
                                ("old.estale.dir/p.jpg", "ESTALE: Stale file handle")):
                caplog.clear()
                r = await client.get(f"/{IMG}/{name}")
                assert r.status_code == 503, name
                assert r.headers["retry-after"] == str(settings.retry_after)
                assert r.headers["cache-control"] == "no-store"
                lines = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
                assert len(lines) == 1, [rec.getMessage() for rec in lines]
                assert error in lines[0].getMessage() and lines[0].exc_info is None
            # A HEAD opens the file without reading it: only what cannot be opened fails.
            assert (await client.head(f"/{IMG}/photo.eio.jpg")).status_code == 200
            assert (await client.head(f"/{IMG}/photo.estale.jpg")).status_code == 503
            caplog.clear()
            # Failing after the headers went out: the response is cut off.
            status, headers, body, complete = await raw_get(app, f"/{IMG}/big.eio.bin")
    assert (status, headers["content-length"], complete) == (200, str(len(BIG)), False)
    assert body == b""
    lines = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert [rec.getMessage() for rec in lines] == [
        f"aborted {IMG}/big.eio.bin at byte 0 of {len(BIG)}: {IMG}/big.eio.bin: "
        "EIO: Input/output error"]
    assert "Traceback" not in caplog.text


async def test_a_file_stored_from_a_hung_mount_leaves_the_event_loop_free(
    databases: DatabaseFactory, fuse_mount: tuple[Path, Path],
) -> None:
    """Regression: store_file stat-ed a file and read its first bytes on the event loop,
    so a source on an NFS server that does not answer froze every task of the process."""
    backing, mnt = fuse_mount
    (backing / "photo.held.jpg").write_bytes(b"held bytes")
    name = f"{IMG}/photo.jpg"
    layout = make_layout(await databases.settings("sqlite"))
    await layout.connect()
    try:
        await layout.create_tables()
        async with ClusterFiles(layout) as cluster:
            task = asyncio.create_task(cluster.store_file(mnt / "photo.held.jpg", name))
            # This loop sees the read hang, and ends it (it could not if the read held it).
            deadline = time.monotonic() + 30
            while not (backing / "holding").exists():
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            (backing / "release").touch()
            stored = await asyncio.wait_for(task, 30)
            assert (stored.size, stored.datatype) == (10, "image/jpeg")
            assert await cluster.fetch_contents(name) == b"held bytes"
    finally:
        await layout.close()
