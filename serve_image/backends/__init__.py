"""Backends, picked from a table by STORAGE_BACKEND (as encode/databases does)."""

from __future__ import annotations

import importlib

from serve_image.backends.base import Backend, Chunk, FileMeta, StoredFile
from serve_image.settings import Settings

SUPPORTED_BACKENDS = {
    "mysql": "serve_image.backends.mysql:MySQLBackend",
    "pgsql": "serve_image.backends.pgsql:PostgresBackend",
    "sqlite": "serve_image.backends.sqlite:SQLiteBackend",
}
# Table layouts other than ezdbfile + ezdbfile_data, by (STORAGE_BACKEND, STORAGE_LAYOUT).
SUPPORTED_LAYOUTS = {
    ("pgsql", "largeobject"): "serve_image.backends.pgsql_lob:PostgresLargeObjectBackend",
}

__all__ = ["SUPPORTED_BACKENDS", "Backend", "Chunk", "FileMeta", "StoredFile", "make_backend"]


class BackendImportError(Exception):
    """The driver a site needs is not installed."""


def make_backend(settings: Settings, *, readonly: bool = False) -> Backend:
    """The backend object for a site (not yet connected)."""
    target = SUPPORTED_LAYOUTS.get((settings.backend, settings.layout))
    module_name, _, class_name = (target or SUPPORTED_BACKENDS[settings.backend]).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        extra = settings.backend
        raise BackendImportError(
            f"{settings.source}: STORAGE_BACKEND {settings.backend!r} needs a driver that is "
            f"not installed ({e.name}): pip install 'serve-image[{extra}]'"
        ) from None
    cls: type[Backend] = getattr(module, class_name)
    return cls(settings, readonly=readonly)
