"""`import --watch`: changes reach the database in order, across an outage and a restart.

The watcher runs as a real subprocess. The outage is real: PostgreSQL is
told to refuse connections to the test's database and its sessions are
terminated (the server keeps the data), then connections are allowed again.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg
import pytest

from serve_image.storage import Layout, make_layout
from tests.conftest import DatabaseFactory, _server_constants
from tests.filetree import Site, cli_command, make_site, write

IMG = "var/site/storage/images"
# Changes must land within this; the test fails rather than hangs.
DEADLINE = 15.0


@contextmanager
def watcher(site: Site, root: Path, journal: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = cli_command("import", "--site", site.path, root, "--watch", "--journal", journal)
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


@asynccontextmanager
async def connected(site: Site) -> AsyncIterator[Layout]:
    backend = make_layout(site.settings)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


async def until(check: Callable[[], Awaitable[bool]], what: str, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    text = log.read_text()  # noqa: ASYNC240 - the failure message
    pytest.fail(f"not within {DEADLINE} s: {what}\nwatcher log:\n{text}")


async def stored(site: Site, name: str) -> bytes | None:
    from serve_image.cluster import ClusterFiles

    async with connected(site) as backend:
        return await ClusterFiles(backend).fetch_contents(name)


def journal_entries(journal: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(journal)
    try:
        return [(op, name) for op, name in db.execute("SELECT op, name FROM changes ORDER BY seq")]
    finally:
        db.close()


def pending(journal: Path) -> int:
    return len(journal_entries(journal))


async def _journaled(journal: Path, entry: tuple[str, str]) -> bool:
    return entry in journal_entries(journal)


@pytest.mark.parametrize("backend_name", ["sqlite"])
async def test_created_changed_and_deleted_files_are_reflected(
    databases: DatabaseFactory, backend_name: str, tmp_path: Path
) -> None:
    site = await make_site(await databases.constants(backend_name), tmp_path)
    root, log = tmp_path / "root", tmp_path / "watch.log"
    write(root / IMG / "before.jpg", b"there before", 1_700_000_000)
    with watcher(site, root, tmp_path / "journal", log):
        await until(lambda: _is(site, f"{IMG}/before.jpg", b"there before"),
                    "the initial import", log)
        write(root / IMG / "new dir/new.jpg", b"created", 1_700_000_001)
        await until(lambda: _is(site, f"{IMG}/new dir/new.jpg", b"created"), "a creation", log)
        write(root / IMG / "new dir/new.jpg", b"changed!", 1_700_000_002)
        await until(lambda: _is(site, f"{IMG}/new dir/new.jpg", b"changed!"), "a change", log)
        (root / IMG / "before.jpg").unlink()
        await until(lambda: _is(site, f"{IMG}/before.jpg", None), "a deletion", log)


async def _is(site: Site, name: str, data: bytes | None) -> bool:
    return await stored(site, name) == data


async def _admin(sql: str, *args: object) -> None:
    c = _server_constants("pgsql")
    conn = await asyncpg.connect(
        host=c["STORAGE_HOST"], port=c["STORAGE_PORT"], user=c["STORAGE_USER"],
        password=c["STORAGE_PASS"] or None, database="postgres", timeout=5,
    )
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def outage(database: str) -> None:
    """PostgreSQL refuses the database and drops its sessions; the data stays."""
    await _admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    await _admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname = $1 AND pid <> pg_backend_pid()", database)


async def recovery(database: str) -> None:
    await _admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["pgsql"])
async def test_changes_during_an_outage_and_a_restart_land_in_order(
    databases: DatabaseFactory, backend_name: str, tmp_path: Path
) -> None:
    site = await make_site(await databases.constants(backend_name), tmp_path)
    database = site.settings.database
    root, journal, log = tmp_path / "root", tmp_path / "journal", tmp_path / "watch.log"
    write(root / IMG / "again.jpg", b"first life", 1_700_000_000)
    write(root / IMG / "doomed.jpg", b"doomed", 1_700_000_000)
    try:
        with watcher(site, root, journal, log) as first:
            await until(lambda: _is(site, f"{IMG}/doomed.jpg", b"doomed"), "the initial import",
                        log)
            await outage(database)
            write(root / IMG / "a.jpg", b"version 1", 1_700_000_001)
            await until(lambda: _journaled(journal, ("store", f"{IMG}/a.jpg")), "a journal entry",
                        log)
            write(root / IMG / "a.jpg", b"version 2", 1_700_000_002)
            (root / IMG / "doomed.jpg").unlink()
            (root / IMG / "again.jpg").unlink()
            await until(lambda: _journaled(journal, ("delete", f"{IMG}/again.jpg")),
                        "the journal growing", log)
            write(root / IMG / "again.jpg", b"second life", 1_700_000_003)
            await until(lambda: _journaled(journal, ("store", f"{IMG}/again.jpg")),
                        "the journal growing", log)
            first.send_signal(signal.SIGKILL)  # the watcher dies too, mid-outage
        with watcher(site, root, journal, log):
            ready = "INFO: serve_image.watch: watching"
            await until(lambda: _async(log.read_text().count(ready) == 2),
                        "the restarted watcher", log)
            write(root / IMG / "late.jpg", b"after the restart", 1_700_000_004)
            await until(lambda: _journaled(journal, ("store", f"{IMG}/late.jpg")),
                        "the restarted watcher's journal", log)
            entries = journal_entries(journal)
            # The three changes made together may form one batch or several.
            assert entries[0] == ("store", f"{IMG}/a.jpg")
            assert sorted(entries[1:-2]) == [
                ("delete", f"{IMG}/again.jpg"), ("delete", f"{IMG}/doomed.jpg"),
                ("store", f"{IMG}/a.jpg")]
            assert entries[-2:] == [("store", f"{IMG}/again.jpg"), ("store", f"{IMG}/late.jpg")]
            assert await _is_unreachable(site)
            await recovery(database)
            await until(lambda: _async(pending(journal) == 0), "the journal draining", log)
            # `again.jpg` was deleted, then created anew: only in that order is it live now.
            assert await stored(site, f"{IMG}/again.jpg") == b"second life"
            assert await stored(site, f"{IMG}/a.jpg") == b"version 2"
            assert await stored(site, f"{IMG}/doomed.jpg") is None
            assert await stored(site, f"{IMG}/late.jpg") == b"after the restart"
    finally:
        await recovery(database)


async def _async(value: bool) -> bool:
    return value


async def _is_unreachable(site: Site) -> bool:
    from serve_image.storage import DatabaseUnavailable

    try:
        await stored(site, f"{IMG}/a.jpg")
    except DatabaseUnavailable:
        return True
    return False


def test_relative_root_and_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: with a relative ROOT every change (reported by absolute path) was dropped."""
    from serve_image.watch import Journal, Watcher

    monkeypatch.chdir(tmp_path)
    image = tmp_path / "root" / IMG / "new.jpg"
    write(image, b"new", 1_700_000_000)
    (tmp_path / "root" / IMG / "link.jpg").symlink_to(image)
    journal = Journal(tmp_path / "journal")
    try:
        watcher = Watcher(None, Path("root"), journal)  # type: ignore[arg-type]
        changes = watcher.changes_for(
            [str(image), str(tmp_path / "root" / IMG / "link.jpg"),
             str(tmp_path / "root" / IMG / "gone.jpg")]
        )
    finally:
        journal.close()
    assert changes == [("delete", f"{IMG}/gone.jpg"), ("store", f"{IMG}/new.jpg")]
