"""`serve-image copy`: every live file from one site into another, across layouts.

The copies run as a user runs them, as subprocesses; the interrupted one is
killed with SIGKILL while it works, then run again.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from serve_image.cluster import ClusterFiles
from serve_image.purge import purge_path
from serve_image.settings import Settings, load_site
from serve_image.storage import make_layout
from serve_image.storage.mount import TEMP_SUFFIX
from tests.conftest import DatabaseFactory
from tests.ezdfs import IMG, connected
from tests.filetree import cli_command, run_cli
from tests.helpers import payload
from tests.live import recorder

MTIME = 1_650_000_000


async def site_file(databases: DatabaseFactory, backend: str, path: Path,
                    **extra: Any) -> Settings:
    constants = await databases.constants(backend, **extra)
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))  # noqa: ASYNC240
    settings = load_site(str(path))
    layout = make_layout(settings)
    await layout.connect()
    try:
        await layout.create_tables()
    finally:
        await layout.close()
    return settings


async def fill(settings: Settings, files: dict[str, bytes]) -> None:
    async with ClusterFiles.open(settings) as cluster:
        for i, (name, data) in enumerate(files.items()):
            await cluster.store_contents(name, data, mtime=MTIME + i, scope="image")


async def contents(settings: Settings) -> dict[str, tuple[bytes | None, int, str]]:
    out: dict[str, tuple[bytes | None, int, str]] = {}
    async with ClusterFiles.open(settings, readonly=True) as cluster:
        async for f in cluster.list():
            out[f.name] = (await cluster.fetch_contents(f.name), f.mtime, f.datatype)
    return out


def copy(a: Path, b: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command("copy", "--from", a, "--to", b, *extra),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend", ["mysql", "pgsql"])
async def test_a_database_cluster_into_a_dfs_cluster_and_back(
    databases: DatabaseFactory, tmp_path: Path, backend: str
) -> None:
    (tmp_path / "mount").mkdir()
    chunks = await site_file(databases, backend, tmp_path / "chunks.py", STORAGE_CHUNK_SIZE=1000)
    dfs = await site_file(databases, backend, tmp_path / "dfs.py", STORAGE_LAYOUT="dfs",
                          DFS_MOUNT_POINT="mount")
    files = {f"{IMG}/f{i}/é {i}.jpg": payload(i * 997, i) for i in range(12)}
    await fill(chunks, files)
    async with connected(chunks) as layout:
        await layout.delete(f"{IMG}/f3/é 3.jpg")  # deleted files are not copied
    expected = {n: (d, MTIME + i) for i, (n, d) in enumerate(files.items()) if "f3/" not in n}

    done = copy(tmp_path / "chunks.py", tmp_path / "dfs.py", "--jobs", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("11 copied")
    got = await contents(dfs)
    assert {n: (d, m) for n, (d, m, _t) in got.items()} == expected
    assert {t for _d, _m, t in got.values()} == {"image/jpeg"}
    for name, (data, _m) in expected.items():
        assert (tmp_path / "mount" / name).read_bytes() == data

    done = copy(tmp_path / "chunks.py", tmp_path / "dfs.py")
    assert done.stdout.startswith("0 copied (0 B), 11 unchanged, 0 failed"), done.stdout

    # And back, into a SQLite database cluster.
    back = await site_file(databases, "sqlite", tmp_path / "back.py")
    done = copy(tmp_path / "dfs.py", tmp_path / "back.py")
    assert done.returncode == 0, done.stderr
    assert {n: (d, m) for n, (d, m, _t) in (await contents(back)).items()} == expected


async def test_a_copy_purges_what_it_wrote_at_the_destinations_caches(
    databases: DatabaseFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: copy stored through the layout itself, so no PURGE was ever sent."""
    files = {f"{IMG}/p{i}.jpg": payload(100 + i, i) for i in range(3)}
    async with recorder() as theirs, recorder() as ours:
        a = await site_file(databases, "sqlite", tmp_path / "a.py", PURGE_URLS=[theirs.url])
        await site_file(databases, "sqlite", tmp_path / "b.py", PURGE_URLS=[ours.url])
        await fill(a, files)
        filled = len(theirs.targets())  # the source's own writes
        assert await run_cli("copy", "--from", tmp_path / "a.py", "--to", tmp_path / "b.py",
                             "--quiet") == 0
        assert sorted(ours.targets()) == sorted(purge_path(n) for n in files)
        assert len(theirs.targets()) == filled  # the source is only read
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == "PURGE sent for 3 file(s) to 1 URL(s): all answered"
        # Nothing copied, nothing purged.
        assert await run_cli("copy", "--from", tmp_path / "a.py", "--to", tmp_path / "b.py",
                             "--quiet") == 0
        assert len(ours.targets()) == 3
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 1 and out[0].startswith("0 copied (0 B), 3 unchanged, 0 failed")


def test_the_same_storage_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("STORAGE_DB = 'x.sqlite'\n")
    (tmp_path / "b.py").write_text("STORAGE_DB = 'x.sqlite'\n")
    done = copy(tmp_path / "a.py", tmp_path / "b.py")
    assert done.returncode == 1
    assert done.stderr == (f"serve-image: error: --from {tmp_path / 'a.py'} and --to "
                           f"{tmp_path / 'b.py'} are the same storage\n")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mysql", "pgsql"])
async def test_an_interrupted_copy_leaves_nothing_half_written_and_finishes_next_time(
    databases: DatabaseFactory, tmp_path: Path, backend: str
) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    chunks = await site_file(databases, backend, tmp_path / "chunks.py")
    dfs = await site_file(databases, backend, tmp_path / "dfs.py", STORAGE_LAYOUT="dfs",
                          DFS_MOUNT_POINT="mount")
    files = {f"{IMG}/big/{i:02d}.bin": payload(400_000 + i, i) for i in range(48)}
    await fill(chunks, files)

    with open(tmp_path / "copy.log", "wb") as log:  # noqa: ASYNC230 - a log for the subprocess
        proc = subprocess.Popen(  # noqa: ASYNC220 - killed below, never awaited
            cli_command("copy", "--from", tmp_path / "chunks.py", "--to", tmp_path / "dfs.py",
                        "--jobs", "2", "--quiet"),
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            async with connected(dfs) as layout:
                rows = [f async for f in layout.list_files()]
            if len(rows) >= 3 or proc.poll() is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the copy ended before it could be interrupted"
    async with connected(dfs) as layout:
        done_before = {f.name: f.size async for f in layout.list_files()}
    assert 3 <= len(done_before) < len(files)
    # Every file at its own name on the mount is whole (a killed write leaves
    # at most a hidden temporary file), and every row has its whole file.
    for path in mount.rglob("*"):
        if path.is_file() and not path.name.endswith(TEMP_SUFFIX):
            name = path.relative_to(mount).as_posix()
            assert path.read_bytes() == files[name], name
    assert set(done_before) <= {p.relative_to(mount).as_posix() for p in mount.rglob("*.bin")}

    done = copy(tmp_path / "chunks.py", tmp_path / "dfs.py", "--quiet")
    assert done.returncode == 0, done.stderr
    assert f"{len(done_before)} unchanged, 0 failed" in done.stdout
    got = await contents(dfs)
    assert {n: d for n, (d, _m, _t) in got.items()} == files
