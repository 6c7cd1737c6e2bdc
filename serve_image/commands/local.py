"""`serve-image prune-local`: remove local copies the database no longer backs."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

from serve_image import localfs
from serve_image.cli import CommandError, add_site_argument, run_with_storage
from serve_image.settings import Settings, load_site
from serve_image.storage import FileMeta, Layout, name_hash


@dataclasses.dataclass
class PruneReport:
    removed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)
    kept: int = 0
    kept_bytes: int = 0


def _stale_reason(found: localfs.LocalFile, meta: FileMeta | None) -> str | None:
    if meta is None:
        return "no row"
    if not meta.live:
        return "deleted or expired"
    if meta.mtime != found.mtime or meta.size != found.size:
        return "another version"
    return None


async def prune(settings: Settings, layout: Layout, *, dry_run: bool = False) -> PruneReport:
    """Remove this site's copies whose row is gone, deleted, expired or of another mtime/size."""
    root = settings.local_copy_dir
    if root is None:
        raise CommandError(f"{settings.source}: LOCAL_COPY_DIR is not set: no local copies")
    found = await asyncio.to_thread(lambda: list(localfs.scan(root, settings.var_dir)))
    report = PruneReport()
    for item in found:
        if item.temporary:
            reason = "left by a crash" if localfs.stale_temp(item) else None
        else:
            meta = await layout.meta(name_hash(item.name))
            reason = _stale_reason(item, meta)
        if reason is None:
            report.kept += 1
            report.kept_bytes += item.size
            continue
        # A copy rewritten since the scan (same name, new mtime) is not removed.
        if dry_run or await asyncio.to_thread(localfs.remove_if_unchanged, root, item):
            report.removed.append((item.name, reason))
    if not dry_run:
        # The shared budget starts again from what is really on disk.
        await asyncio.to_thread(localfs.recount, root)
    return report


def cmd_prune_local(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    # Read-only: every node prunes its own disk, LiteFS replicas included.
    report: PruneReport = asyncio.run(
        run_with_storage(settings, lambda b: prune(settings, b, dry_run=args.dry_run),
                         readonly=True)
    )
    verb = "would remove" if args.dry_run else "removed"
    for name, reason in report.removed:
        print(f"{verb} {name} ({reason})")
    print(f"{verb} {len(report.removed)} local copies, kept {report.kept} "
          f"({report.kept_bytes} bytes) in {settings.local_copy_dir}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "prune-local",
        help="remove local copies (LOCAL_COPY_DIR) whose row is gone, deleted, expired or newer",
    )
    add_site_argument(p)
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="list what would be removed, remove nothing")
    p.set_defaults(func=cmd_prune_local)
