"""`serve-image import`, `export`, `copy`, `ls`, `stat`, `cat`, `rm`, `purge` and `verify`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from serve_image.cli import CommandError, add_site_argument, run_with_storage, storage_for
from serve_image.cluster import ClusterFiles, FileBroken
from serve_image.copy import SiteCopy
from serve_image.progress import Progress, human_bytes
from serve_image.purge import PurgeReport
from serve_image.settings import Settings, load_site
from serve_image.storage import Layout, StoredFile
from serve_image.transfer import Importer, Tally, TransferError, export_tree
from serve_image.watch import Journal, Watcher


def _summary(verb: str, tally: Tally, seconds: float, dry_run: bool = False) -> str:
    rate = ""
    if seconds > 0 and tally.stored:
        rate = (f" ({tally.stored / seconds:.0f} files/s, "
                f"{human_bytes(tally.stored_bytes / seconds)}/s)")
    would = "would be " if dry_run else ""
    removed = f", {tally.removed} local copies removed" if tally.removed else ""
    return (
        f"{tally.stored} {would}{verb} ({human_bytes(tally.stored_bytes)}), "
        f"{tally.skipped} unchanged, {tally.failed} failed{removed} in {seconds:.1f} s{rate}"
    )


def _print_purges(report: PurgeReport | None) -> None:
    """The line saying which caches were told (each failure is logged as it happens)."""
    if report is not None and report.files:
        print(report.summary())


def _jobs(settings: Settings, jobs: int) -> int:
    # SQLite has one writer at a time: parallel stores would only queue on
    # its lock (and measured slower, bench/README.md).
    return 1 if settings.backend == "sqlite" else jobs


def cmd_import(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    root = Path(args.root)
    if not root.is_dir():
        raise CommandError(f"{root}: not a directory")
    if args.jobs < 1:
        raise CommandError("--jobs must be at least 1")
    if args.watch and (args.dry_run or args.remove):
        raise CommandError("--watch cannot be combined with --dry-run or --remove")
    if args.watch:
        return _watch(args, root)

    async def work(layout: Layout) -> tuple[Tally, PurgeReport | None]:
        progress = Progress("import", enabled=not args.quiet)
        cluster = ClusterFiles(layout)
        importer = Importer(
            cluster, progress, force=args.force, dry_run=args.dry_run,
            remove=args.remove, jobs=_jobs(settings, args.jobs),
        )
        try:
            tally = await importer.run(root, settings.var_dir)
        finally:
            progress.close()
            purged = await cluster.close()
        return tally, purged

    started = time.monotonic()
    try:
        tally, purged = asyncio.run(run_with_storage(settings, work, readonly=args.dry_run))
    except TransferError as e:
        raise CommandError(str(e)) from None
    print(_summary("stored", tally, time.monotonic() - started, args.dry_run))
    _print_purges(purged)
    return 1 if tally.failed else 0


def _watch(args: argparse.Namespace, root: Path) -> int:
    settings = load_site(args.site)
    journal_path = (
        Path(args.journal) if args.journal else root / f".serve-image-{settings.name}.journal"
    )
    if journal_path.resolve().is_relative_to((root / "var").resolve()):
        # The watcher would see its own journal's writes as changes.
        raise CommandError(f"--journal {journal_path}: must be outside {root / 'var'}")
    try:
        journal = Journal(journal_path)
    except (sqlite3.Error, OSError) as e:
        raise CommandError(f"--journal {journal_path}: cannot open it: {e}") from None

    async def work(layout: Layout) -> int:
        # Purges go out as changes are applied; failures are logged.
        async with ClusterFiles(layout) as cluster:
            watcher = Watcher(cluster, root, journal, var_dir=settings.var_dir,
                              jobs=_jobs(settings, args.jobs))
            await watcher.run()
        return 1 if watcher.failed else 0

    try:
        return int(asyncio.run(run_with_storage(settings, work, readonly=False)))
    finally:
        journal.close()


def cmd_export(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    dest = Path(args.dest)

    async def work(layout: Layout) -> Tally:
        progress = Progress("export", enabled=not args.quiet)
        try:
            return await export_tree(ClusterFiles(layout), dest, progress, prefix=args.prefix,
                                     scope=args.scope)
        finally:
            progress.close()

    started = time.monotonic()
    tally = asyncio.run(run_with_storage(settings, work, readonly=True))
    print(_summary("exported", tally, time.monotonic() - started))
    return 1 if tally.failed else 0


def cmd_copy(args: argparse.Namespace) -> int:
    source, target = load_site(args.source), load_site(args.target)
    if args.jobs < 1:
        raise CommandError("--jobs must be at least 1")
    if (source.describe(), source.layout) == (target.describe(), target.layout):
        raise CommandError(f"--from {args.source} and --to {args.target} are the same storage")

    async def work() -> tuple[Tally, PurgeReport | None]:
        async with contextlib.AsyncExitStack() as stack:
            # The destination first: refused on a LiteFS replica before the
            # source is opened. The source is only read: a LiteFS replica or a
            # read-only SQLite file will do.
            dst = ClusterFiles(await stack.enter_async_context(storage_for(target)))
            src = ClusterFiles(await stack.enter_async_context(storage_for(source, readonly=True)))
            progress = Progress("copy", enabled=not args.quiet)
            try:
                tally = await SiteCopy(src, dst, progress, jobs=_jobs(target, args.jobs)).run()
            finally:
                progress.close()
                purged = await dst.close()
            return tally, purged

    started = time.monotonic()
    tally, purged = asyncio.run(work())
    print(_summary("copied", tally, time.monotonic() - started))
    _print_purges(purged)
    return 1 if tally.failed else 0


def _when(mtime: int) -> str:
    return datetime.fromtimestamp(abs(mtime), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _long(f: StoredFile) -> str:
    state = "" if f.live else "  (deleted)"
    return f"{f.size:>12}  {_when(f.mtime)}  {f.scope:<10}  {f.datatype:<24}  {f.name}{state}"


def cmd_ls(args: argparse.Namespace) -> int:
    settings = load_site(args.site)

    async def work(layout: Layout) -> int:
        shown = 0
        async for f in ClusterFiles(layout).list(args.prefix, scope=args.scope,
                                                  include_deleted=args.deleted):
            print(_long(f) if args.long else f.name)
            shown += 1
        return shown

    asyncio.run(run_with_storage(settings, work, readonly=True))
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    f = asyncio.run(run_with_storage(settings, lambda b: ClusterFiles(b).stat(args.name),
                                     readonly=True))
    if f is None:
        raise CommandError(f"{args.name}: no such file")
    print(f"name:      {f.name}")
    print(f"name_hash: {f.name_hash}")
    print(f"size:      {f.size}")
    print(f"mtime:     {f.mtime} ({_when(f.mtime)} UTC)")
    print(f"datatype:  {f.datatype}")
    print(f"scope:     {f.scope}")
    print(f"state:     {'live' if f.live else 'deleted'}")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    settings = load_site(args.site)

    async def work(layout: Layout) -> bool:
        found = await ClusterFiles(layout).read(args.name)
        if found is None:
            return False
        out = sys.stdout.buffer
        try:
            async for data in found[1]:
                out.write(data)
        except FileBroken as e:
            raise CommandError(f"{args.name}: {e}") from None
        out.flush()
        return True

    if not asyncio.run(run_with_storage(settings, work, readonly=True)):
        raise CommandError(f"{args.name}: no such file")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.wildcard is None):
        raise CommandError("give either a NAME or --wildcard PATTERN")
    settings = load_site(args.site)

    async def work(layout: Layout) -> tuple[list[str], PurgeReport | None]:
        cluster = ClusterFiles(layout)
        try:
            if args.wildcard is not None:
                deleted = await cluster.delete_by_wildcard(args.wildcard)
            else:
                deleted = [args.name] if await cluster.delete(args.name) else []
        finally:
            purged = await cluster.close()
        return deleted, purged

    deleted, purged = asyncio.run(run_with_storage(settings, work, readonly=False))
    if args.name is not None and not deleted:
        raise CommandError(f"{args.name}: no such file")
    for name in deleted if args.verbose else ():
        print(name)
    print(f"{len(deleted)} file(s) deleted")
    _print_purges(purged)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    if args.older_than < 0:
        raise CommandError("--older-than must be 0 or more days")
    settings = load_site(args.site)

    async def work(layout: Layout) -> tuple[tuple[int, int], PurgeReport | None]:
        cluster = ClusterFiles(layout)
        try:
            counts = await cluster.purge(args.older_than, dry_run=args.dry_run)
        finally:
            purged = await cluster.close()
        return counts, purged

    (files, size), purged = asyncio.run(run_with_storage(settings, work, readonly=False))
    would = "would be " if args.dry_run else ""
    print(f"{files} deleted file(s) {would}purged ({human_bytes(size)})")
    _print_purges(purged)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    settings = load_site(args.site)

    async def work(layout: Layout) -> int:
        broken = 0
        async for f in ClusterFiles(layout).verify():
            broken += 1
            print(f"{f.name}: {f.problem}")
        return broken

    broken = asyncio.run(run_with_storage(settings, work, readonly=True))
    print(f"{broken} broken file(s)", file=sys.stderr)
    return 1 if broken else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("import", help="store every file under ROOT/var/*/storage/ (clusterize)")
    add_site_argument(p)
    p.add_argument("root", metavar="ROOT", help="the site's root: holds var/<dir>/storage/")
    p.add_argument("--force", action="store_true",
                   help="store files whose size and mtime match too")
    p.add_argument("--dry-run", action="store_true", help="say what would be stored, store nothing")
    p.add_argument("--remove", action="store_true",
                   help="delete each local file once its stored copy reads back identical")
    p.add_argument("--jobs", type=int, default=4, metavar="N", help="files stored at once (4)")
    p.add_argument("--watch", action="store_true",
                   help="then keep watching and push every change, through a durable journal")
    p.add_argument("--journal", metavar="FILE",
                   help="the watch journal (ROOT/.serve-image-SITE.journal)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress, only problems and the summary")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write every live file under DEST (unclusterize)")
    add_site_argument(p)
    p.add_argument("dest", metavar="DEST", help="directory to write into (created if absent)")
    p.add_argument("--scope", help="only files of this scope (image, binaryfile, mediafile, ...)")
    p.add_argument("--prefix", default="", metavar="P", help="only names starting with P")
    p.add_argument("--quiet", action="store_true",
                   help="no progress, only problems and the summary")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "copy", help="copy every live file of one site into another (any layouts; resumable)",
        description="Copy every live file of the site --from into the site --to, whatever "
                    "their layouts (for example an eZ 4.x database cluster into a DFS "
                    "cluster). A file whose row in --to has the same size and mtime is "
                    "skipped, so an interrupted run is finished by running it again.",
    )
    p.add_argument("--from", dest="source", required=True, metavar="SITE_A",
                   help="the site to read (name or path of a site file)")
    p.add_argument("--to", dest="target", required=True, metavar="SITE_B",
                   help="the site to write (its tables must exist: init-db)")
    p.add_argument("--jobs", type=int, default=4, metavar="N", help="files copied at once (4)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress, only problems and the summary")
    p.set_defaults(func=cmd_copy)

    p = sub.add_parser("ls", help="list stored files by name")
    add_site_argument(p)
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
    p.add_argument("--scope", help="only files of this scope")
    p.add_argument("--deleted", action="store_true", help="include soft-deleted files")
    p.add_argument("-l", "--long", action="store_true",
                   help="size, mtime (UTC), scope, type and name")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("stat", help="show a stored file's row")
    add_site_argument(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser("cat", help="write a stored file's bytes to standard output")
    add_site_argument(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("rm", help="soft-delete a file, or every file matching --wildcard")
    add_site_argument(p)
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--wildcard", metavar="PATTERN",
                   help="eZ's wildcard: * any run of characters (/ included), ? one character")
    p.add_argument("-v", "--verbose", action="store_true", help="print each name deleted")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("purge", help="physically remove soft-deleted files")
    add_site_argument(p)
    p.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                   help="only files whose mtime is more than DAYS days old")
    p.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("verify", help="report live files whose stored bytes do not match their "
                                      "row (and, on DFS, files on the mount with no row)")
    add_site_argument(p)
    p.set_defaults(func=cmd_verify)
