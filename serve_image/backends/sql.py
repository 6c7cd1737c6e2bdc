"""SQL shared by the backends, written once with `?` placeholders and `"offset"`.

`offset` is a reserved word in MariaDB 10.6+ and in PostgreSQL: it is quoted
in every statement (the original eZ scripts used it bare and fail on a
current MariaDB). Each backend turns placeholders and quotes into its own.
"""

from __future__ import annotations

import re

META = "SELECT datatype, size, mtime, expired FROM ezdbfile WHERE name_hash = ?"

# The row and its first chunk in one round trip: a small file is one query.
FIRST = (
    'SELECT f.datatype, f.size, f.mtime, f.expired, d.filedata FROM ezdbfile f '
    'LEFT JOIN ezdbfile_data d ON d.name_hash = f.name_hash AND d."offset" = 0 '
    "WHERE f.name_hash = ?"
)

# Chunks of one version overlapping bytes start..end: a key range on the
# primary key (name_hash, offset). The sub-select finds the chunk holding
# `start` whatever the chunk lengths are. Joining the file row with its
# mtime and size makes the rows vanish if the file was replaced.
CHUNKS = (
    'SELECT d."offset", d.filedata FROM ezdbfile_data d '
    "JOIN ezdbfile f ON f.name_hash = d.name_hash AND f.mtime = ? AND f.size = ? "
    "AND f.expired = ? "
    'WHERE d.name_hash = ? AND d."offset" <= ? AND d."offset" >= '
    '(SELECT COALESCE(MAX("offset"), 0) FROM ezdbfile_data '
    'WHERE name_hash = ? AND "offset" <= ?) '
    'ORDER BY d."offset" LIMIT ?'
)

DELETE_FILE = "DELETE FROM ezdbfile WHERE name_hash = ?"
DELETE_DATA = "DELETE FROM ezdbfile_data WHERE name_hash = ?"
INSERT_FILE = (
    "INSERT INTO ezdbfile (datatype, name, name_trunk, name_hash, scope, size, mtime, expired) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_CHUNK = 'INSERT INTO ezdbfile_data (name_hash, "offset", filedata) VALUES (?, ?, ?)'


def chunk_args(mtime: int, size: int, name_hash: str, start: int, end: int, limit: int) -> tuple[
        int, int, bool, str, int, str, int, int]:
    # expired = False too: soft-deleting a file of mtime 0 leaves its mtime
    # at 0 (-abs(0)), so only `expired` tells that it is gone.
    return (mtime, size, False, name_hash, end, name_hash, start, limit)


def to_mysql(sql: str) -> str:
    return sql.replace('"offset"', "`offset`").replace("?", "%s")


def to_pgsql(sql: str) -> str:
    count = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


# -- file management (import, export, ls, rm, purge, verify) ----------------
# Every value is a bound parameter, booleans included (`expired = ?` with
# True/False: PostgreSQL's BOOLEAN does not compare with 1). LIKE patterns
# escape with `!`, not a backslash, because MySQL reads a backslash inside a
# string literal as an escape of its own and PostgreSQL does not.

FILE_COLUMNS = "name, name_hash, datatype, scope, size, mtime, expired"
STAT = f"SELECT {FILE_COLUMNS} FROM ezdbfile WHERE name_hash = ?"
LIVE = "mtime >= 0 AND expired = ?"
SOFT_DELETE = "UPDATE ezdbfile SET mtime = -ABS(mtime), expired = ? WHERE "


def list_files(*, scope: bool, live: bool) -> str:
    """One page of rows under a LIKE prefix, after the key (name, name_hash).

    Paging on (name, name_hash) is exact in any collation: MySQL's `_ci`
    collations make different names compare equal, the hash breaks the tie.
    """
    where = ["name LIKE ? ESCAPE '!'", "(name > ? OR (name = ? AND name_hash > ?))"]
    if scope:
        where.append("scope = ?")
    if live:
        where.append(LIVE)
    return (
        f"SELECT {FILE_COLUMNS} FROM ezdbfile WHERE {' AND '.join(where)} "
        "ORDER BY name, name_hash LIMIT ?"
    )


def placeholders(count: int) -> str:
    return ", ".join("?" * count)


def stat_many(count: int) -> str:
    return f"SELECT {FILE_COLUMNS} FROM ezdbfile WHERE name_hash IN ({placeholders(count)})"


def soft_delete_many(count: int) -> str:
    return f"{SOFT_DELETE}name_hash IN ({placeholders(count)}) AND {LIVE}"


# Only live rows: the count of rows changed is then the same on every backend
# (MySQL counts rows changed, SQLite and PostgreSQL rows matched).
SOFT_DELETE_ONE = f"{SOFT_DELETE}name_hash = ? AND {LIVE}"

# Soft-deleted rows whose (last known) modification time is before a cutoff:
# eZ records no deletion time, so clusterpurge.php ages a row by its mtime too.
PURGE_CANDIDATES = (
    "SELECT name, name_hash, size FROM ezdbfile "
    "WHERE (mtime < 0 OR expired = ?) AND ABS(mtime) < ? AND name_hash > ? "
    "ORDER BY name_hash LIMIT ?"
)


def purge_many(count: int) -> str:
    # The condition is checked again: a file stored anew since it was listed
    # is live and stays. Its chunks go with it (ON DELETE CASCADE).
    return (
        f"DELETE FROM ezdbfile WHERE name_hash IN ({placeholders(count)}) "
        "AND (mtime < 0 OR expired = ?) AND ABS(mtime) < ?"
    )


VERIFY_FILES = (
    f"SELECT name, name_hash, size, mtime FROM ezdbfile WHERE name_hash > ? AND {LIVE} "
    "ORDER BY name_hash LIMIT ?"
)


def chunk_layout(count: int) -> str:
    """Offset and length of every chunk of some files, without their bytes."""
    return (
        'SELECT name_hash, "offset", LENGTH(filedata) FROM ezdbfile_data '
        f'WHERE name_hash IN ({placeholders(count)}) ORDER BY name_hash, "offset"'
    )


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching names that start with `prefix` (escape character `!`)."""
    return escape_like(prefix) + "%"


def escape_like(text: str) -> str:
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")
