"""`serve-image import` and `export` over real SQLite, MariaDB and PostgreSQL.

The acceptance tree (2,000 files with empty ones, odd names and a 20 MiB
file) runs on every backend; the kill -9 test uses a smaller tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from serve_image.cluster import ClusterFiles, SourceChanged, _FilePieces
from serve_image.progress import Progress
from serve_image.storage import DatabaseUnavailable, make_layout
from serve_image.transfer import Entry, Importer, run_bounded
from tests.conftest import DatabaseFactory, _server_constants
from tests.filetree import (
    BASE_MTIME,
    Site,
    cli_command,
    digest_tree,
    make_site,
    make_tree,
    run_cli,
    write,
)
from tests.helpers import md5
from tests.test_watch import outage as pg_outage
from tests.test_watch import recovery as pg_recovery

MiB = 1024 * 1024


@pytest.fixture
async def site(databases: DatabaseFactory, backend_name: str, tmp_path: Path) -> Site:
    """A database of the test's own with eZ's default chunk size (65535)."""
    return await make_site(await databases.constants(backend_name), tmp_path)


async def rows(site: Site, statement: str, *args: object) -> list[tuple[object, ...]]:
    backend = make_layout(site.settings)
    await backend.connect()
    try:
        return await backend.driver.fetch(statement, *args)
    finally:
        await backend.close()


async def broken_files(site: Site) -> list[str]:
    backend = make_layout(site.settings)
    await backend.connect()
    try:
        return [f"{f.name}: {f.problem}" async for f in backend.verify()]
    finally:
        await backend.close()


@pytest.mark.slow
async def test_import_then_export_gives_identical_bytes_and_mtimes(
    site: Site, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    sizes = make_tree(root, 2000, big=20 * MiB)
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 0
    assert await run_cli("export", "--site", site.path, tmp_path / "out", "--quiet") == 0
    assert digest_tree(tmp_path / "out") == digest_tree(root)
    assert len(sizes) == 2000 and max(sizes.values()) == 20 * MiB


async def test_import_stores_each_file_once_with_type_scope_and_mtime(
    site: Site, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    make_tree(root, 30)
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 0
    found = await rows(
        site, "SELECT scope, COUNT(*) FROM ezdbfile WHERE mtime >= ? GROUP BY scope ORDER BY scope",
        BASE_MTIME,
    )
    # 30 files over 6 directories: 5 in each; images, images-versioned and
    # var/*/storage/images are `image`, original/application `binaryfile`,
    # original/video `mediafile`.
    assert [(s, int(n)) for s, n in found] == [("binaryfile", 5), ("image", 20), ("mediafile", 5)]
    one = await rows(site, "SELECT datatype, size, mtime FROM ezdbfile WHERE name = ?",
                     "var/site/storage/images/a/b/with space.jpg")
    size = (root / "var/site/storage/images/a/b/with space.jpg").stat().st_size
    assert one == [("image/jpeg", size, BASE_MTIME)]


async def test_second_import_stores_nothing(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    make_tree(root, 40)
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 0
    capsys.readouterr()
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 0
    assert capsys.readouterr().out.startswith("0 stored (0 B), 40 unchanged, 0 failed in ")


async def test_changed_file_is_stored_again_and_force_restores_all(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    make_tree(root, 12)
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 0
    write(root / "var/site/storage/images/a/b/with space.jpg", b"new bytes", BASE_MTIME + 999)
    capsys.readouterr()
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 0
    assert capsys.readouterr().out.startswith("1 stored (9 B), 11 unchanged, 0 failed")
    assert await run_cli("import", "--site", site.path, root, "--quiet", "--force") == 0
    assert capsys.readouterr().out.startswith("12 stored")


async def test_dry_run_writes_nothing(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    make_tree(root, 20)
    assert await run_cli("import", "--site", site.path, root, "--quiet", "--dry-run") == 0
    assert capsys.readouterr().out.startswith("20 would be stored")
    (count,), = await rows(site, "SELECT COUNT(*) FROM ezdbfile")
    assert int(count) == 0


async def test_remove_deletes_local_copies_only_after_they_are_stored(
    site: Site, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    before = make_tree(root, 15)
    assert await run_cli("import", "--site", site.path, root, "--quiet", "--remove") == 0
    assert [p for p in (root / "var").rglob("*") if p.is_file()] == []
    stored = await rows(site, "SELECT name, size FROM ezdbfile")
    assert {str(n): int(s) for n, s in stored} == before


@pytest.mark.slow
async def test_import_killed_at_a_random_point_then_run_again_is_complete(
    site: Site, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    make_tree(root, 400)
    for i in range(6):  # make the run last long enough to be killed mid-way
        write(root / f"var/site/storage/original/video/big {i}.mp4",
              random.Random(i).randbytes(2 * MiB), BASE_MTIME - i)
    command = cli_command("import", "--site", site.path, root, "--quiet", "--jobs", "2")
    # The kill point is random; its seed is printed (shown with a failure) to replay it.
    seed = secrets.randbits(32)
    target = random.Random(seed).randrange(1, 300)
    print(f"kill point: once {target} files are stored (seed {seed})")
    proc = subprocess.Popen(  # noqa: ASYNC220 - killed below, waited for in finally
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            (n,), = await rows(site, "SELECT COUNT(*) FROM ezdbfile")
            if int(n) >= target or proc.poll() is not None:
                break
            await asyncio.sleep(0.005)
        assert proc.poll() is None, f"the import finished before {target} files were stored"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    await _run_again_and_compare(site, command, root, tmp_path, 406)


async def _run_again_and_compare(
    site: Site, command: list[str], root: Path, tmp_path: Path, files: int
) -> None:
    """The killed import run again: complete, every file once, none broken."""
    again = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert await run_cli("export", "--site", site.path, tmp_path / "out", "--quiet") == 0
    assert digest_tree(tmp_path / "out") == digest_tree(root)
    (count, distinct), = await rows(site, "SELECT COUNT(*), COUNT(DISTINCT name) FROM ezdbfile")
    assert (int(count), int(distinct)) == (files, files)
    assert await broken_files(site) == []


def read_position(pid: int, suffix: str) -> tuple[str, int] | None:
    """The file whose path ends with `suffix` that process `pid` has open, and its offset."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
            if path.endswith(suffix):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                return path, int(info.split("pos:", 1)[1].split()[0])
    except OSError:
        pass  # the process or the descriptor went away meanwhile: look again
    return None


@pytest.mark.slow
async def test_import_killed_inside_a_multi_chunk_file_stores_none_of_it(
    site: Site, tmp_path: Path
) -> None:
    """Killed while a file's chunks are being written: none of that file is left in the
    database (its transaction dies with the process); a second run stores it whole."""
    root = tmp_path / "root"
    make_tree(root, 20)
    size = 6 * MiB  # 96 chunks of 65535 bytes
    for i in range(3):
        write(root / f"var/site/storage/original/video/big {i}.mp4",
              random.Random(i).randbytes(size), BASE_MTIME - i)
    command = cli_command("import", "--site", site.path, root, "--quiet", "--jobs", "1")
    proc = subprocess.Popen(  # noqa: ASYNC220 - killed below, waited for in finally
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    inside: tuple[str, int] | None = None
    try:
        deadline = time.monotonic() + 120
        # The importer reads a file chunk by chunk as it inserts them: its read
        # offset past the third chunk and short of the last means the file's
        # first chunks are written and its transaction is still open.
        while time.monotonic() < deadline and proc.poll() is None:
            at = read_position(proc.pid, ".mp4")
            if at is not None and 3 * 65535 < at[1] < size - 65535:
                proc.send_signal(signal.SIGKILL)
                inside = at
                break
            await asyncio.sleep(0.001)
        assert inside is not None, "the import never was inside a large file to be killed"
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    name = inside[0].split(f"{root}/", 1)[1]
    print(f"killed at byte {inside[1]} of {name}")
    assert await rows(site, "SELECT COUNT(*) FROM ezdbfile WHERE name = ?", name) == [(0,)]
    assert await rows(site, "SELECT COUNT(*) FROM ezdbfile_data WHERE name_hash = ?",
                      md5(name)) == [(0,)]
    assert await broken_files(site) == []
    await _run_again_and_compare(site, command, root, tmp_path, 23)


@pytest.mark.parametrize("backend_name", ["sqlite"])
async def test_non_utf8_name_is_reported_and_the_run_goes_on(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    make_tree(root, 5)
    bad = os.fsencode(root / "var/site/storage/images/a/b") + b"/bad\xff.jpg"
    with open(bad, "wb") as f:  # noqa: ASYNC230 - test set-up
        f.write(b"x")
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 1
    out = capsys.readouterr()
    assert out.out.startswith("5 stored")
    assert ", 1 failed" in out.out
    assert out.err == (
        f"serve-image: {root}/var/site/storage/images/a/b/bad\\xff.jpg: "
        "name is not valid UTF-8: not stored\n"
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the right to read any file")
@pytest.mark.parametrize("backend_name", ["sqlite"])
async def test_unreadable_file_is_reported_and_the_run_goes_on(site: Site, tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, 4)
    secret = root / "var/site/storage/images/a/b/secret.jpg"
    write(secret, b"no", BASE_MTIME)
    secret.chmod(0)
    # root reads any file: the import runs without CAP_DAC_OVERRIDE and
    # CAP_DAC_READ_SEARCH, so a mode 000 file is unreadable to it too.
    drop = "-dac_override,-dac_read_search"
    done = await asyncio.to_thread(
        subprocess.run,
        ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--",
         *cli_command("import", "--site", site.path, root, "--quiet")],
        capture_output=True, text=True,
    )
    assert done.returncode == 1
    assert done.stderr == f"serve-image: {secret}: cannot read: Permission denied\n"
    assert done.stdout.startswith("4 stored")


class RecordingProgress(Progress):
    def __init__(self) -> None:
        super().__init__("import", enabled=False)
        self.messages: list[str] = []

    def problem(self, message: str) -> None:
        self.messages.append(message)


async def test_file_vanishing_before_it_is_read_is_reported(
    site: Site, tmp_path: Path
) -> None:
    path = tmp_path / "gone.jpg"
    write(path, b"data", BASE_MTIME)
    entry = Entry(str(path), "var/site/storage/images/gone.jpg", 4, BASE_MTIME)
    path.unlink()
    progress = RecordingProgress()
    backend = make_layout(site.settings)
    await backend.connect()
    try:
        importer = Importer(ClusterFiles(backend), progress)
        await importer.import_one(entry, None)
    finally:
        await backend.close()
    assert (importer.tally.failed, importer.tally.stored) == (1, 0)
    assert progress.messages == [f"serve-image: {path}: vanished before it could be read"]


async def test_file_shrinking_while_read_raises_source_changed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 5000)
    # Unbuffered: every read reaches the file.
    with open(path, "rb", buffering=0) as f:  # noqa: ASYNC230 - a local test file
        reader = _FilePieces(f, 5000, 1000, f.read(100))
        chunks = aiter(reader)
        assert len(await anext(chunks)) == 1000
        os.truncate(path, 1500)
        with pytest.raises(SourceChanged, match=r"^file shrank while being read$"):
            await anext(chunks)


async def _mysql_admin(sql: str, *args: object) -> list[tuple[object, ...]]:
    import aiomysql

    c = _server_constants("mysql")
    conn = await aiomysql.connect(host=c["STORAGE_HOST"], port=c["STORAGE_PORT"],
                                  user=c["STORAGE_USER"], password=c["STORAGE_PASS"],
                                  connect_timeout=5, autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql, args or None)
            return list(await cur.fetchall())
    finally:
        conn.close()


@asynccontextmanager
async def mysql_account(database: str) -> AsyncIterator[tuple[str, str]]:
    """A MariaDB account of the test's own on `database`: (user, password)."""
    user, password = f"si_{os.getpid()}_{secrets.token_hex(3)}", secrets.token_hex(8)
    await _mysql_admin(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
    try:
        await _mysql_admin(f"GRANT ALL ON `{database}`.* TO '{user}'@'%'")
        yield user, password
    finally:
        await _mysql_admin(f"DROP USER IF EXISTS '{user}'@'%'")


async def mysql_outage(user: str) -> None:
    """MariaDB refuses the account (ACCOUNT LOCK) and its sessions are killed."""
    await _mysql_admin(f"ALTER USER '{user}'@'%' ACCOUNT LOCK")
    for (pid,) in await _mysql_admin(
            "SELECT id FROM information_schema.processlist WHERE user = %s", user):
        with contextlib.suppress(Exception):  # it may have ended by itself meanwhile
            await _mysql_admin(f"KILL CONNECTION {int(str(pid))}")


@asynccontextmanager
async def outage_account(
    backend_name: str, constants: dict[str, object]
) -> AsyncIterator[tuple[dict[str, object], str, Callable[[], Awaitable[None]]]]:
    """Site constants, their password, and a coroutine that cuts the database off."""
    if backend_name == "mysql":
        async with mysql_account(str(constants["STORAGE_DB"])) as (user, password):
            yield ({**constants, "STORAGE_USER": user, "STORAGE_PASS": password}, password,
                   lambda: mysql_outage(user))
    else:
        database = str(constants["STORAGE_DB"])
        try:
            yield constants, "", lambda: pg_outage(database)
        finally:
            await pg_recovery(database)


@pytest.mark.parametrize("backend_name", ["mysql", "pgsql"])
async def test_database_lost_mid_import_ends_the_run_with_one_line(
    databases: DatabaseFactory, backend_name: str, tmp_path: Path
) -> None:
    # Regression (PostgreSQL): a pooled connection whose server had just
    # terminated it failed with asyncpg's InternalClientError, which ended the
    # run with a traceback instead of this one line.
    constants = await databases.constants(backend_name)
    async with outage_account(backend_name, constants) as (values, password, cut_off):
        site = await make_site(values, tmp_path)
        root = tmp_path / "root"
        make_tree(root, 1500)
        command = cli_command("import", "--site", site.path, root, "--quiet")
        proc = subprocess.Popen(  # noqa: ASYNC220 - waited for below
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(3000):
                (n,), = await rows(site, "SELECT COUNT(*) FROM ezdbfile")
                if int(n) >= 50 or proc.poll() is not None:
                    break
                await asyncio.sleep(0.005)
            await cut_off()
            out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1
    # Warnings logged on the way, then one error line; never a traceback.
    lines = err.splitlines()
    assert lines[-1].startswith("serve-image: error: database unavailable: ")
    assert all(line.startswith("WARNING: ") for line in lines[:-1]), err
    if password:
        assert password not in err
    assert out == ""


async def test_symbolic_links_are_never_stored(site: Site, tmp_path: Path) -> None:
    """Regression: a link in the tree stored (and so published) whatever it pointed at."""
    secret = tmp_path / "secret.py"
    secret.write_text('STORAGE_PASS = "hunter2"\n')
    root = tmp_path / "root"
    write(root / "var/site/storage/images/ok.jpg", b"fine", BASE_MTIME)
    (root / "var/site/storage/images/leak.jpg").symlink_to(secret)
    (root / "var/site/storage/images/linked-dir").symlink_to(tmp_path, target_is_directory=True)
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 1
    names = await rows(site, "SELECT name FROM ezdbfile ORDER BY name")
    assert names == [("var/site/storage/images/ok.jpg",)]


async def test_store_file_refuses_a_link(site: Site, tmp_path: Path) -> None:
    (tmp_path / "target.jpg").write_bytes(b"target")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "target.jpg")
    async with ClusterFiles.open(site.settings) as cluster:
        with pytest.raises(OSError):
            await cluster.store_file(tmp_path / "link.jpg", "var/site/storage/images/l.jpg")
        assert not await cluster.exists("var/site/storage/images/l.jpg")


@pytest.mark.parametrize("backend_name", ["mysql", "pgsql"])
async def test_a_file_the_database_refuses_is_reported_and_the_run_goes_on(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: a refused statement (a .docx MIME type, 71 characters, into eZ's
    VARCHAR(60) datatype) was taken for an outage: retried, then the run ended."""
    backend = make_layout(site.settings)
    await backend.connect()
    try:
        if site.settings.backend == "mysql":
            alter = "ALTER TABLE ezdbfile MODIFY datatype VARCHAR(60) NOT NULL"
        else:
            alter = "ALTER TABLE ezdbfile ALTER COLUMN datatype TYPE VARCHAR(60)"
        await backend.driver.execute(alter)
    finally:
        await backend.close()
    root = tmp_path / "root"
    write(root / "var/site/storage/original/application/cv.docx", b"PK\x03\x04 not really",
          BASE_MTIME)
    write(root / "var/site/storage/images/ok.jpg", b"\xff\xd8\xff fine", BASE_MTIME)
    assert await run_cli("import", "--site", site.path, root, "--quiet") == 1
    err = capsys.readouterr().err
    assert "cv.docx: not stored: the database refused it: " in err
    assert "database unavailable" not in err
    names = await rows(site, "SELECT name FROM ezdbfile ORDER BY name")
    assert names == [("var/site/storage/images/ok.jpg",)]


async def test_run_bounded_keeps_to_its_jobs_and_ends_with_the_first_lost_error() -> None:
    """The loop import and copy share: at most `jobs` at once; once the storage is lost,
    the runs under way finish, no new one starts, and the first error is raised."""
    running, most = 0, 0
    started: list[int] = []
    finished: list[int] = []
    lost_at: int | None = None

    async def one(i: int) -> None:
        nonlocal running, most, lost_at
        started.append(i)
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1
        if i in (4, 5):
            lost_at = len(started) if lost_at is None else lost_at
            raise DatabaseUnavailable(f"lost at {i}")
        finished.append(i)

    with pytest.raises(DatabaseUnavailable, match=r"^lost at 4$"):
        await run_bounded(range(20), one, jobs=3, lost=(DatabaseUnavailable,))
    assert most == 3
    assert lost_at is not None and len(started) == lost_at  # none started after the loss
    assert 5 in started  # under way when 4 failed: it ran to its end
    assert set(finished) == set(started) - {4, 5}
