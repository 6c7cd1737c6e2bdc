"""What a stored file is: its row as read for serving and for management, and the rules on it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self


def is_live(mtime: int, expired: object) -> bool:
    """eZ deletes softly (`mtime = -abs(mtime), expired = 1`): either means gone."""
    return mtime >= 0 and not expired


def stored_mtime(st: os.stat_result) -> int:
    """The mtime a local file is stored with.

    eZ's mtime is a signed INT and a negative one means deleted: a file dated
    before 1970 is stored as 0. Sub-second parts are dropped, as eZ does.
    """
    return max(0, int(st.st_mtime))


def same_version(st: os.stat_result, size: int, mtime: int) -> bool:
    """Does a local file hold the stored version (size, mtime) of a row?"""
    return st.st_size == size and stored_mtime(st) == mtime


@dataclass(frozen=True, slots=True)
class FileMeta:
    """A file's row as the endpoint reads it: what identifies one version of the file."""

    name_hash: str
    datatype: str
    size: int
    mtime: int
    expired: bool

    @property
    def live(self) -> bool:
        return is_live(self.mtime, self.expired)

    def holds(self, size: int, mtime: int) -> bool:
        """Is this row a live copy of that version? (An import, a watcher or a copy skips
        the file then; a local copy of it stays.)"""
        return self.live and (self.size, self.mtime) == (size, mtime)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> FileMeta:
        """From the columns name_hash, datatype, size, mtime, expired (rows.META_COLUMNS)."""
        return cls(row[0], row[1], int(row[2]), int(row[3]), bool(row[4]))


@dataclass(frozen=True, slots=True)
class StoredFile(FileMeta):
    """A file's row as the management commands list it: also its name and eZ scope."""

    name: str
    scope: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Self:
        """From the columns name, name_hash, datatype, scope, size, mtime, expired."""
        return cls(row[1], row[2], int(row[4]), int(row[5]), bool(row[6]), row[0], row[3])


@dataclass(frozen=True, slots=True)
class BrokenFile:
    """A live file whose stored bytes do not add up to its row (`verify`)."""

    name: str
    size: int
    problem: str
