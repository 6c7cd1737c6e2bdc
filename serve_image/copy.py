"""`serve-image copy`: every live file of one site into another, whatever their layouts.

For a site that changes layout, an eZ 4.x database cluster becoming a DFS
cluster for instance. Each file is read from the source and streamed into
the destination's store as it is read (ClusterFiles.store_pieces takes
async pieces), so memory stays bounded whatever the file's size. The
destination's store checks that exactly the row's size arrives, and writes
a file whole or not at all (one transaction, or a temporary file renamed
into place): a run killed at any point leaves no half-written file
visible, and the next run finishes the job, skipping every file whose
destination row already has the source's size and mtime.
"""

from __future__ import annotations

from serve_image.backoff import with_retry
from serve_image.cluster import ClusterFiles, FileBroken
from serve_image.progress import Progress
from serve_image.storage import (
    DatabaseUnavailable,
    FileUnavailable,
    SizeMismatch,
    StatementFailed,
    StoredFile,
)
from serve_image.transfer import BATCH, Tally, run_bounded


class SiteCopy:
    """One run of a copy from `source` into `target`; its Tally counts files copied as stored."""

    def __init__(self, source: ClusterFiles, target: ClusterFiles, progress: Progress, *,
                 jobs: int = 4) -> None:
        self.source, self.target = source, target
        self.progress = progress
        self.jobs = jobs
        self.tally = Tally()

    def report(self, name: str, reason: str) -> None:
        self.tally.failed += 1
        self.progress.problem(f"serve-image: {name}: {reason}")

    async def run(self) -> Tally:
        self.progress.start()
        batch: list[StoredFile] = []
        async for f in self.source.list():
            batch.append(f)
            if len(batch) == BATCH:
                await self.run_batch(batch)
                batch = []
        if batch:
            await self.run_batch(batch)
        return self.tally

    async def run_batch(self, batch: list[StoredFile]) -> None:
        there = await with_retry(lambda: self.target.layout.stat_many([f.name_hash for f in batch]))
        # Either side lost ends the run.
        await run_bounded(batch, lambda f: self.copy_one(f, there.get(f.name_hash)),
                          jobs=self.jobs, lost=(DatabaseUnavailable, FileUnavailable))

    async def copy_one(self, f: StoredFile, there: StoredFile | None) -> None:
        if there is not None and there.holds(f.size, f.mtime):
            self.tally.skipped += 1
            self.progress.advance(1, f.size)
            return
        try:
            found = await self.source.read(f.name)
        except FileUnavailable as e:
            # A DFS row whose file is missing or being written: the next run copies it.
            self.report(f.name, f"not copied: {e}")
            return
        if found is None:
            return  # deleted since it was listed
        meta, pieces = found
        try:
            # Through ClusterFiles: the destination's PURGE_URLS are told.
            await self.target.store_pieces(
                f.name, pieces, size=meta.size, mtime=meta.mtime,
                datatype=meta.datatype, scope=f.scope,
            )
        except FileBroken as e:
            self.report(f.name, f"not copied: changed while read: {e}")
            return
        except StatementFailed as e:
            self.report(f.name, f"not copied: the destination refused it: {e}")
            return
        except SizeMismatch as e:  # the source's bytes are not its row's size
            self.report(f.name, f"not copied: {e}")
            return
        self.tally.stored += 1
        self.tally.stored_bytes += meta.size
        self.progress.advance(1, meta.size)
