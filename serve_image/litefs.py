"""LiteFS: is this SQLite database a read-only replica, and who is the primary?

LiteFS (https://fly.io/docs/litefs/primary/) keeps a `.primary` file in its
mount directory on every replica, holding the primary's hostname and a
newline; the primary has no such file. A write on a replica fails inside
SQLite with SQLITE_READONLY or, in WAL mode, a bare "disk I/O error", so
the commands that write look for the file first and name the primary instead.
"""

from __future__ import annotations

from pathlib import Path

from serve_image.settings import Settings

PRIMARY_FILE = ".primary"


def replica_primary(settings: Settings) -> str | None:
    """The primary's name when the site's SQLite database is a LiteFS replica, else None."""
    if settings.backend != "sqlite" or settings.database == ":memory:":
        return None
    marker = Path(settings.database).parent / PRIMARY_FILE
    try:
        text = marker.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text.strip() or "(unnamed)"


def replica_message(settings: Settings, primary: str) -> str:
    return (
        f"{settings.source}: {settings.database} is a read-only LiteFS replica; "
        f"writes go to the primary, {primary}: run this command there"
    )
