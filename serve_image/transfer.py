"""Moving trees of files: `import` (eZ's clusterize.php) and `export` (its `-u`).

An import stores every file under ROOT/var/*/storage/ (and ROOT/var/storage/)
under its path relative to ROOT, one transaction per file, so a run killed at
any point leaves every file stored whole or not at all, and running it again
finishes the job: a file whose stored row has its size and mtime is skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from serve_image.backoff import with_retry
from serve_image.cluster import ClusterFiles, FileBroken, SourceChanged
from serve_image.progress import Progress
from serve_image.storage import (
    DatabaseUnavailable,
    FileUnavailable,
    StatementFailed,
    StoredFile,
    name_hash,
)
from serve_image.storage.files import same_version, stored_mtime

# Files looked up in the database with one query (import, copy), and walked
# per thread hop (import).
BATCH = 256
# A file written to while it is read is tried this often before it is reported.
CHANGED_TRIES = 3


T = TypeVar("T")


class TransferError(Exception):
    """A run that cannot start (no storage directory under ROOT, ...)."""


@dataclass
class Tally:
    """What a run did; `failed` counts every file reported on the way."""

    stored: int = 0
    stored_bytes: int = 0
    skipped: int = 0
    failed: int = 0
    removed: int = 0


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    name: str
    size: int
    mtime: int


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    reason: str


def shown(path: str) -> str:
    """A path for a message, undecodable bytes as `\\xNN` escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    # os.scandir gives undecodable bytes as lone surrogates (PEP 383).
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storage_dirs(root: Path, var_dir: str | None) -> list[tuple[str, str]]:
    """(directory, name prefix) of every storage directory under ROOT.

    eZ keeps a site's files in `var/<site>/storage/` (or `var/storage/`); a
    site with VAR_DIR imports that one only.
    """
    if var_dir is not None:
        candidates = [f"{var_dir}/storage"]
    else:
        try:
            subdirs = sorted(os.listdir(root / "var"))
        except OSError:
            subdirs = []
        candidates = ["var/storage"] + [f"var/{d}/storage" for d in subdirs if _utf8(d)]
    return [(str(root / c), c) for c in candidates if (root / c).is_dir()]


def walk(top: str, prefix: str) -> Iterator[Entry | Problem]:
    """Regular files under `top`, by name, with their cluster names; problems on the way."""
    stack = [(top, prefix)]
    while stack:
        directory, base = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda item: item.name)
        except OSError as err:
            yield Problem(directory, f"cannot list the directory: {err.strerror or err}")
            continue
        subdirs = []
        for entry in entries:
            if not _utf8(entry.name):
                yield Problem(entry.path, "name is not valid UTF-8: not stored")
                continue
            name = f"{base}/{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append((entry.path, name))
                    continue
                if entry.is_symlink():
                    # A link could point anywhere on the machine (a site file
                    # with its password): storing it would publish its target.
                    yield Problem(entry.path, "a symbolic link: not stored")
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue  # sockets, fifos: not files to store
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                yield Problem(entry.path, "vanished before it could be read")
                continue
            except OSError as err:
                yield Problem(entry.path, f"cannot stat: {err.strerror or err}")
                continue
            yield Entry(entry.path, name, st.st_size, stored_mtime(st))
        stack.extend(reversed(subdirs))


def count(dirs: list[tuple[str, str]]) -> tuple[int, int]:
    files = size = 0
    for d, prefix in dirs:
        for item in walk(d, prefix):
            if isinstance(item, Entry):
                files += 1
                size += item.size
    return files, size


async def run_bounded(
    items: Iterable[T], one: Callable[[T], Awaitable[None]], *, jobs: int,
    lost: tuple[type[Exception], ...],
) -> None:
    """`one(item)` for every item, at most `jobs` at once.

    When one raises an error of `lost` (the storage gone for good), the runs
    under way finish (each commits or rolls back; none is cancelled
    mid-query), no new one starts, and the first such error is raised.
    """
    slots = asyncio.Semaphore(jobs)
    errors: list[Exception] = []

    async def run(item: T) -> None:
        async with slots:
            if errors:
                return
            try:
                await one(item)
            except lost as e:
                errors.append(e)

    await asyncio.gather(*(run(item) for item in items))
    if errors:
        raise errors[0]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            digest.update(data)
    return digest.hexdigest()


class Importer:
    """One import run over a tree."""

    def __init__(
        self, cluster: ClusterFiles, progress: Progress, *, force: bool = False,
        dry_run: bool = False, remove: bool = False, jobs: int = 1,
    ) -> None:
        self.cluster = cluster
        self.progress = progress
        self.force, self.dry_run, self.remove = force, dry_run, remove
        self.jobs = jobs
        self.tally = Tally()

    def report(self, path: str, reason: str) -> None:
        self.tally.failed += 1
        self.progress.problem(f"serve-image: {shown(path)}: {reason}")

    async def run(self, root: Path, var_dir: str | None) -> Tally:
        dirs = storage_dirs(root, var_dir)
        if not dirs:
            where = f"{var_dir}/storage" if var_dir else "var/*/storage or var/storage"
            raise TransferError(f"{root}: no {where} directory to import")
        self.progress.start(*await asyncio.to_thread(count, dirs))
        items = itertools.chain.from_iterable(walk(d, p) for d, p in dirs)
        while batch := await asyncio.to_thread(lambda: list(itertools.islice(items, BATCH))):
            await self.run_batch(batch)
        return self.tally

    async def run_batch(self, batch: list[Entry | Problem]) -> None:
        entries: list[Entry] = []
        for item in batch:
            if isinstance(item, Problem):
                self.report(item.path, item.reason)
            else:
                entries.append(item)
        hashes = [name_hash(e.name) for e in entries]
        rows = await with_retry(lambda: self.cluster.layout.stat_many(hashes))
        # The database gone for good ends the run.
        await run_bounded(
            [(e, rows.get(h)) for e, h in zip(entries, hashes, strict=True)],
            lambda pair: self.import_one(*pair), jobs=self.jobs, lost=(DatabaseUnavailable,),
        )

    async def import_one(self, entry: Entry, row: StoredFile | None) -> None:
        if row is not None and row.holds(entry.size, entry.mtime) and not self.force:
            self.tally.skipped += 1
            if self.remove and not self.dry_run:
                await self.remove_if_stored(entry.path, entry.name, entry.size, entry.mtime, None)
            self.progress.advance(1, entry.size)
            return
        if self.dry_run:
            self.tally.stored += 1
            self.tally.stored_bytes += entry.size
            self.progress.advance(1, entry.size)
            return
        for attempt in range(CHANGED_TRIES):
            try:
                stored = await with_retry(lambda: self.cluster.store_file(entry.path, entry.name))
                break
            except SourceChanged as e:
                if attempt == CHANGED_TRIES - 1:
                    self.report(entry.path, f"{e} ({CHANGED_TRIES} tries): not stored")
                    self.progress.advance(1, entry.size)
                    return
            except FileNotFoundError:
                self.report(entry.path, "vanished before it could be read")
                self.progress.advance(1, entry.size)
                return
            except StatementFailed as e:
                # e.g. a MIME type longer than eZ's VARCHAR(60) datatype column.
                self.report(entry.path, f"not stored: the database refused it: {e}")
                self.progress.advance(1, entry.size)
                return
            except OSError as e:
                self.report(entry.path, f"cannot read: {e.strerror or e}")
                self.progress.advance(1, entry.size)
                return
        self.tally.stored += 1
        self.tally.stored_bytes += stored.size
        if self.remove:
            await self.remove_if_stored(entry.path, entry.name, stored.size, stored.mtime,
                                        stored.sha256)
        self.progress.advance(1, entry.size)

    async def remove_if_stored(
        self, path: str, name: str, size: int, mtime: int, sha256: str | None,
    ) -> None:
        """Delete the local copy only once the stored bytes are read back identical."""
        try:
            local = sha256 or await asyncio.to_thread(file_sha256, path)
        except OSError as e:
            self.report(path, f"not removed: cannot read it: {e.strerror or e}")
            return
        try:
            stored = await with_retry(lambda: self.cluster.sha256(name))
        except (FileBroken, FileUnavailable) as e:
            self.report(path, f"not removed: stored copy unreadable: {e}")
            return
        if stored != local:
            self.report(path, "not removed: the stored copy differs")
            return
        try:
            if not same_version(os.stat(path), size, mtime):
                self.report(path, "not removed: it changed after it was stored")
                return
            os.unlink(path)
        except OSError as e:
            self.report(path, f"not removed: {e.strerror or e}")
            return
        self.tally.removed += 1


def export_target(dest: Path, name: str) -> Path | None:
    """Where a stored name goes under DEST; None for a name that would leave DEST."""
    parts = name.split("/")
    if "\x00" in name or any(p in ("", ".", "..") for p in parts):
        return None
    return dest.joinpath(*parts)


async def export_tree(
    cluster: ClusterFiles, dest: Path, progress: Progress, *, prefix: str = "",
    scope: str | None = None,
) -> Tally:
    """Write every live file under DEST with its mtime, skipping identical ones."""
    tally = Tally()
    progress.start()
    async for f in cluster.list(prefix, scope=scope):
        target = export_target(dest, f.name)
        if target is None:
            tally.failed += 1
            progress.problem(f"serve-image: {f.name!r}: not a safe relative path: not exported")
            continue
        try:
            if same_version(target.stat(), f.size, f.mtime):
                tally.skipped += 1
                progress.advance(1, f.size)
                continue
        except FileNotFoundError:
            pass
        except OSError as e:
            tally.failed += 1
            progress.problem(f"serve-image: {target}: {e.strerror or e}")
            continue
        try:
            meta = await with_retry(lambda: cluster.fetch_file(f.name, target))  # noqa: B023
        except (FileBroken, FileUnavailable) as e:
            tally.failed += 1
            progress.problem(f"serve-image: {f.name}: {e}")
            continue
        except OSError as e:
            tally.failed += 1
            progress.problem(f"serve-image: {target}: cannot write: {e.strerror or e}")
            continue
        if meta is None:
            continue  # deleted since it was listed
        tally.stored += 1
        tally.stored_bytes += meta.size
        progress.advance(1, meta.size)
    return tally
