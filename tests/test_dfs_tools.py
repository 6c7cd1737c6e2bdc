"""The command line on a DFS site, MariaDB and PostgreSQL: init-db, import (and --watch),
export, ls, stat, cat, rm, purge and verify, each run as a user runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from serve_image.cluster import ClusterFiles
from serve_image.storage.mount import TEMP_SUFFIX
from tests.conftest import DatabaseFactory
from tests.ezdfs import IMG, connected, ez_copy, ez_row
from tests.filetree import Site, cli_command, digest_tree, make_tree, write
from tests.helpers import md5
from tests.test_watch import until, watcher


@pytest.fixture(params=["mysql", "pgsql"])
async def site(request: pytest.FixtureRequest, databases: DatabaseFactory,
               tmp_path: Path) -> Site:
    """A DFS site file; its tables made by `serve-image init-db`."""
    (tmp_path / "mount").mkdir()
    constants = await databases.constants(str(request.param), STORAGE_LAYOUT="dfs",
                                          DFS_MOUNT_POINT="mount")
    path = tmp_path / "site.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    done = run("init-db", "--site", path)
    assert done.returncode == 0, done.stderr
    from serve_image.settings import load_site

    return Site(path, load_site(str(path)))


def run(*argv: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cli_command(*argv), capture_output=True, timeout=120)


def temp_files(mount: Path) -> list[Path]:
    return [p for p in mount.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


async def test_import_export_and_the_file_commands(site: Site, tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    root = tmp_path / "root"
    sizes = make_tree(root, 24, big=700_000)
    done = run("import", "--site", site.path, root, "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("24 stored")
    # Each file is on the mount, whole, with its mtime; then its row.
    assert digest_tree(mount) == digest_tree(root)
    assert temp_files(mount) == []
    async with connected(site.settings) as layout:
        rows = await layout.stat_many([md5(n) for n in sizes])
        assert {r.name: r.size for r in rows.values()} == sizes
    # Again: nothing to do.
    done = run("import", "--site", site.path, root, "--quiet")
    assert done.stdout.decode().startswith("0 stored (0 B), 24 unchanged")

    out = tmp_path / "out"
    done = run("export", "--site", site.path, out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert digest_tree(out) == digest_tree(root)

    name = f"{IMG}/a/b/with space.jpg"
    done = run("ls", "--site", site.path, f"{IMG}/a/")
    assert name in done.stdout.decode().splitlines()
    done = run("stat", "--site", site.path, name)
    assert f"size:      {sizes[name]}" in done.stdout.decode()
    done = run("cat", "--site", site.path, name)
    assert done.stdout == (root / name).read_bytes()

    # rm is eZ's soft delete: the row says deleted, the file stays until purged.
    done = run("rm", "--site", site.path, name)
    assert (done.returncode, done.stdout) == (0, b"1 file(s) deleted\n")
    async with connected(site.settings) as layout:
        row = await layout.stat(name)
        assert row is not None and row.mtime < 0 and not row.live
    assert (mount / name).exists()
    assert run("cat", "--site", site.path, name).returncode == 1
    done = run("purge", "--site", site.path, "--older-than", "0")
    assert done.stdout.decode().startswith("1 deleted file(s) purged")
    assert not (mount / name).exists()
    async with connected(site.settings) as layout:
        assert await layout.stat(name) is None


async def test_verify_reports_what_the_mount_and_the_rows_disagree_on(
    site: Site, tmp_path: Path
) -> None:
    mount = tmp_path / "mount"
    async with connected(site.settings) as layout:
        await ClusterFiles(layout).store_contents(f"{IMG}/fine.jpg", b"fine")
        await ClusterFiles(layout).store_contents(f"{IMG}/short.jpg", b"short")
    assert run("verify", "--site", site.path).returncode == 0
    async with connected(site.settings) as layout:
        await ez_row(layout, f"{IMG}/absent.jpg", 10)
    ez_copy(mount, f"{IMG}/short.jpg", b"sho")
    ez_copy(mount, f"{IMG}/stray.jpg", b"no row")
    done = run("verify", "--site", site.path)
    assert done.returncode == 1
    assert sorted(done.stdout.decode().splitlines()) == [
        f"{IMG}/absent.jpg: no file on the mount",
        f"{IMG}/short.jpg: 3 bytes on the mount, the row says 5",
        f"{IMG}/stray.jpg: on the mount, no row in ezdfsfile",
    ]
    assert done.stderr.decode().endswith("3 broken file(s)\n")


async def test_a_missing_file_fails_its_export_alone(site: Site, tmp_path: Path) -> None:
    async with connected(site.settings) as layout:
        await ClusterFiles(layout).store_contents(f"{IMG}/here.jpg", b"here")
        await ez_row(layout, f"{IMG}/being written.jpg", 10)
    done = run("export", "--site", site.path, tmp_path / "out", "--quiet")
    assert done.returncode == 1
    assert (tmp_path / "out" / IMG / "here.jpg").read_bytes() == b"here"
    assert f"{IMG}/being written.jpg: var/site" in done.stderr.decode()
    assert "not on the mount" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


async def test_import_watch_keeps_the_mount_and_rows_in_step(site: Site, tmp_path: Path) -> None:
    mount, root, log = tmp_path / "mount", tmp_path / "root", tmp_path / "watch.log"
    write(root / IMG / "before.jpg", b"there before", 1_700_000_000)

    async def holds(name: str, data: bytes | None) -> bool:
        async with connected(site.settings) as layout:
            got = await ClusterFiles(layout).fetch_contents(name)
        return got == data and (data is None or (mount / name).read_bytes() == data)

    with watcher(site, root, tmp_path / "journal", log):
        await until(lambda: holds(f"{IMG}/before.jpg", b"there before"), "the initial import", log)
        write(root / IMG / "new dir/new.jpg", b"created", 1_700_000_001)
        await until(lambda: holds(f"{IMG}/new dir/new.jpg", b"created"), "a creation", log)
        write(root / IMG / "new dir/new.jpg", b"changed!", 1_700_000_002)
        await until(lambda: holds(f"{IMG}/new dir/new.jpg", b"changed!"), "a change", log)
        (root / IMG / "before.jpg").unlink()
        await until(lambda: holds(f"{IMG}/before.jpg", None), "a deletion", log)
    assert temp_files(mount) == []
