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
        int, int, str, int, str, int, int]:
    return (mtime, size, name_hash, end, name_hash, start, limit)


def to_mysql(sql: str) -> str:
    return sql.replace('"offset"', "`offset`").replace("?", "%s")


def to_pgsql(sql: str) -> str:
    count = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)
