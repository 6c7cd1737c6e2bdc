"""Live sync (`import --watch`): push local changes to the cluster as they happen, in order.

Every change seen by the watcher (watchfiles, inotify on Linux) is first
written to a journal, a small SQLite file committed with fsync, and only then
applied to the database, oldest first; an entry leaves the journal once
applied. While the database is unreachable the journal grows and nothing is
lost; when it returns, or when the watcher is restarted, the journal is
replayed in order. Applying an entry twice does no harm: a store stores the
file as it is now (skipped when the stored row already has its size and
mtime), a delete of a deleted file changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from watchfiles import awatch

from serve_image.backoff import Backoff
from serve_image.cluster import ClusterFiles, SourceChanged
from serve_image.progress import Progress
from serve_image.storage import DatabaseUnavailable, StatementFailed
from serve_image.storage.files import stored_mtime
from serve_image.transfer import Entry, Importer, TransferError, shown, walk

logger = logging.getLogger("serve_image.watch")

# Only these paths are cluster files (as `import` walks them).
STORAGE_RE = re.compile(r"^var/(?:[^/]+/)?storage/.")
# Waits between tries while the database is unreachable: short at first, so a
# blip costs little, then capped, so recovery is noticed within seconds.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
# watchfiles groups the events of this many milliseconds into one batch.
DEBOUNCE_MS = 200


class Journal:
    """Pending changes, oldest first, durable on disk before they are acted on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        # FULL: a change is on disk once `append` returns (WAL alone could
        # lose the last transactions on power loss).
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS changes ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " op TEXT NOT NULL CHECK (op IN ('store', 'delete')),"
            " name TEXT NOT NULL,"
            " queued REAL NOT NULL)"
        )

    def append(self, changes: Iterable[tuple[str, str]]) -> int:
        """Add (op, name) changes in one transaction; how many."""
        now = time.time()
        rows = [(op, name, now) for op, name in changes]
        if rows:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("INSERT INTO changes (op, name, queued) VALUES (?, ?, ?)", rows)
        return len(rows)

    def pending(self, limit: int = 100, until: int | None = None) -> list[tuple[int, str, str]]:
        return self.db.execute(
            "SELECT seq, op, name FROM changes WHERE seq <= ? ORDER BY seq LIMIT ?",
            (until if until is not None else 2**62, limit),
        ).fetchall()

    def last(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    def done(self, seq: int) -> None:
        self.db.execute("DELETE FROM changes WHERE seq = ?", (seq,))

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM changes").fetchone()[0])

    def close(self) -> None:
        self.db.close()


class Watcher:
    """Watches ROOT/var, journals each change, replays the journal into the cluster."""

    def __init__(
        self, cluster: ClusterFiles, root: Path, journal: Journal, *, var_dir: str | None = None,
        jobs: int = 1,
    ) -> None:
        self.cluster = cluster
        # watchfiles reports absolute paths: a relative ROOT would match none.
        self.root = Path(root).resolve()
        self.journal = journal
        self.var_dir = var_dir
        self.jobs = jobs
        self.wake = asyncio.Event()
        self.failed = 0

    def wanted(self, name: str) -> bool:
        if not STORAGE_RE.match(name):
            return False
        return self.var_dir is None or name.startswith(f"{self.var_dir}/storage/")

    def changes_for(self, paths: Iterable[str]) -> list[tuple[str, str]]:
        """(op, name) for a batch of changed paths, by what each path is now.

        watchfiles hands over a batch as a set, without order; the state of
        the file system after the batch is what must reach the database.
        """
        out: list[tuple[str, str]] = []
        for path in sorted(set(paths)):
            try:
                name = Path(path).relative_to(self.root).as_posix()
            except ValueError:
                continue
            if not self.wanted(name):
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                self.failed += 1
                logger.error("%s: name is not valid UTF-8: not stored", shown(path))
                continue
            if os.path.isdir(path):
                # A directory moved in: its files, which raised no event of their own.
                out += [("store", e.name) for e in walk(path, name) if isinstance(e, Entry)]
            elif os.path.islink(path):
                # Never stored: a link could point anywhere on the machine.
                logger.warning("%s: a symbolic link: not stored", shown(path))
            elif os.path.lexists(path):
                out.append(("store", name))
            else:
                out.append(("delete", name))
        return out

    async def watch(self, stop: asyncio.Event) -> None:
        # watch_filter=None: watchfiles' default filter drops editor and
        # Python files (`*.swp`, `*~`, `*.pyc`, ...), which `import` stores.
        async for batch in awatch(
            self.root / "var", stop_event=stop, watch_filter=None, debounce=DEBOUNCE_MS,
            step=50, recursive=True, ignore_permission_denied=True,
        ):
            added = self.journal.append(self.changes_for(path for _, path in batch))
            if added:
                logger.info("journal: %d change(s) queued, %d pending", added, len(self.journal))
                self.wake.set()

    async def initial_import(self) -> None:
        """Store what changed while no watcher ran; waits out a database outage."""
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        while True:
            try:
                importer = Importer(self.cluster, Progress("import", enabled=False), jobs=self.jobs)
                tally = await importer.run(self.root, self.var_dir)
            except DatabaseUnavailable as e:
                logger.warning("initial import: database unavailable (%s); retrying in %.1f s",
                               e, backoff.delay)
                await backoff.wait()
                continue
            except TransferError as e:
                logger.info("initial import: %s", e)
                return
            self.failed += tally.failed
            logger.info("initial import: %d stored, %d unchanged, %d failed",
                        tally.stored, tally.skipped, tally.failed)
            return

    async def replay(self, until: int | None = None) -> None:
        """Apply journal entries in order; waits out database outages.

        With `until`, returns once the entries up to that one are applied;
        without, runs for ever.
        """
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        while True:
            entries = self.journal.pending(until=until)
            if not entries:
                if until is not None:
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                for seq, op, name in entries:
                    await self.apply(op, name)
                    self.journal.done(seq)
            except DatabaseUnavailable as e:
                logger.warning("database unavailable (%s): %d change(s) kept in the journal; "
                               "retrying in %.1f s", e, len(self.journal), backoff.delay)
                await backoff.wait()
                continue
            backoff.reset()

    async def apply(self, op: str, name: str) -> None:
        if op == "delete":
            if await self.cluster.delete(name):
                logger.info("deleted %s", name)
            else:
                # No file of that name: a directory removed or moved away.
                under = [f.name async for f in self.cluster.list(f"{name}/")]
                for n in under:
                    await self.cluster.delete(n)
                if under:
                    logger.info("deleted %d file(s) under %s/", len(under), name)
            return
        path = self.root / name
        try:
            st = path.lstat()
            row = await self.cluster.stat(name)
            if row is not None and row.holds(st.st_size, stored_mtime(st)):
                return
            await self.cluster.store_file(path, name)
            logger.info("stored %s", name)
        except FileNotFoundError:
            pass  # deleted since: the journal holds its delete after this entry
        except SourceChanged as e:
            # Being written: its next event stores it again.
            logger.info("%s: %s; waiting for its next change", name, e)
        except OSError as e:
            self.failed += 1
            logger.error("%s: cannot read: %s", name, e.strerror or e)
        except StatementFailed as e:
            # Refused for good (not an outage): report it and let the journal
            # go on, instead of retrying it for ever at the queue's head.
            self.failed += 1
            logger.error("%s: not stored: the database refused it: %s", name, e)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        (self.root / "var").mkdir(exist_ok=True)
        async with asyncio.TaskGroup() as tg:
            watching = tg.create_task(self.watch(stop))
            # Let the watcher set up its inotify watches before the initial
            # scan, so no change falls between the two.
            await asyncio.sleep(0.2)
            logger.info("watching %s; journal %s (%d pending)", self.root / "var",
                        self.journal.path, len(self.journal))
            if len(self.journal):
                # Changes an earlier run journaled come first, in their order;
                # the scan then stores whatever changed while none ran.
                logger.info("journal: replaying %d change(s) left by an earlier run",
                            len(self.journal))
                await self.replay(until=self.journal.last())
            await self.initial_import()
            replaying = tg.create_task(self.replay())
            self.wake.set()
            await watching
            replaying.cancel()
