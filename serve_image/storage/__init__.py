"""Where a site's files are kept: a table layout over a database driver.

Both are picked from a table at start-up, as encode/databases picks its
backends: STORAGE_BACKEND names the driver, STORAGE_LAYOUT the layout. The
rest of serve-image sees only the `Layout` interface.
"""

from __future__ import annotations

import importlib
from typing import Any

from serve_image.settings import Settings
from serve_image.storage.drivers.base import served_by
from serve_image.storage.errors import (
    DatabaseUnavailable,
    DriverMissing,
    FileUnavailable,
    SizeMismatch,
    StatementFailed,
    StorageError,
    StreamAborted,
)
from serve_image.storage.files import BrokenFile, FileMeta, StoredFile
from serve_image.storage.layout import First, Layout
from serve_image.storage.names import name_hash
from serve_image.storage.replicas import ReplicaLayout, replica_settings

DRIVERS = {
    "mysql": "serve_image.storage.drivers.mysql:MySQLDriver",
    "pgsql": "serve_image.storage.drivers.pgsql:PostgresDriver",
    "sqlite": "serve_image.storage.drivers.sqlite:SQLiteDriver",
}
LAYOUTS = {
    "chunks": "serve_image.storage.layouts.chunks:ChunkLayout",
    "largeobject": "serve_image.storage.layouts.largeobject:LargeObjectLayout",
    "dfs": "serve_image.storage.layouts.dfs:DfsLayout",
}

__all__ = [
    "DRIVERS", "LAYOUTS", "BrokenFile", "DatabaseUnavailable", "DriverMissing", "FileMeta",
    "FileUnavailable", "First", "Layout", "SizeMismatch", "StatementFailed", "StorageError",
    "StoredFile", "StreamAborted", "make_layout", "name_hash", "served_by",
]


def _load(target: str, settings: Settings) -> Any:
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DriverMissing(
            f"{settings.source}: STORAGE_BACKEND {settings.backend!r} needs a driver that is "
            f"not installed ({e.name}): pip install 'serve-image[{settings.backend}]'"
        ) from None
    return getattr(module, class_name)


def make_layout(settings: Settings, *, readonly: bool = False, replicas: bool = False) -> Layout:
    """The site's layout over its driver, not yet connected.

    `readonly`: the endpoint's (a SQLite file is opened read-only).
    `replicas`: the endpoint's too: with STORAGE_REPLICAS, reads go to the
    replicas first (storage/replicas.py). The command line never sets it,
    so its writes and its reads go to the primary.
    """
    layout = _make(settings, readonly)
    if replicas and settings.replicas:
        return ReplicaLayout(layout, _make(replica_settings(settings), readonly))
    return layout


def _make(settings: Settings, readonly: bool) -> Layout:
    # The MySQL driver raises DriverMissing itself: it imports the module
    # STORAGE_DRIVER names when it is made.
    driver = _load(DRIVERS[settings.backend], settings)(settings, readonly=readonly)
    layout: Layout = _load(LAYOUTS[settings.layout], settings)(settings, driver)
    return layout
