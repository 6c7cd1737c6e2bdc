"""Helpers for the import/export tests: site files, generated trees, tree digests, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_image import cli
from serve_image.settings import Settings, settings_from_mapping
from serve_image.storage import make_layout

BASE_MTIME = 1_600_000_000
# Names a careless import would break on: spaces, both quotes, non-ASCII,
# LIKE's own wildcards, a shell glob character.
ODD_NAMES = [
    "with space.jpg", "it's.png", 'say "cheese".gif', "café crème.jpg", "日本語.png",
    "100%_done.txt", "ümlaut ß.pdf", "brackets [1].jpg",
]


@dataclass(frozen=True)
class Site:
    path: Path
    settings: Settings


async def make_site(constants: Mapping[str, Any], directory: Path) -> Site:
    """A site file with these constants and its tables created."""
    path = directory / "site.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    settings = settings_from_mapping(constants, str(path), "site")
    backend = make_layout(settings)
    await backend.connect()
    try:
        await backend.create_tables()
    finally:
        await backend.close()
    return Site(path, settings)


def write(path: Path, data: bytes, mtime: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def make_tree(root: Path, files: int, *, big: int = 0, seed: int = 1) -> dict[str, int]:
    """`files` files under root/var/*/storage/ (one of them `big` bytes if big); name -> size.

    Every tenth file is empty; the odd names above come first; sizes up to
    4 KiB, mtimes all different.
    """
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    dirs = [
        "var/site/storage/images/a/b", "var/site/storage/images-versioned/c",
        "var/site/storage/original/application", "var/site/storage/original/video",
        "var/other/storage/images/é dir", "var/storage/images/x",
    ]
    for i in range(files):
        base = ODD_NAMES[i] if i < len(ODD_NAMES) else f"file {i:05d}.jpg"
        name = f"{dirs[i % len(dirs)]}/{base}"
        size = 0 if i % 10 == 9 else rng.randrange(1, 4096)
        if big and i == files - 1:
            size = big
        write(root / name, rng.randbytes(size), BASE_MTIME + i)
        sizes[name] = size
    return sizes


def digest_tree(root: Path) -> dict[str, tuple[str, int]]:
    """name -> (sha256, integer mtime) of every file under root/var."""
    out: dict[str, tuple[str, int]] = {}
    for path in sorted((root / "var").rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[path.relative_to(root).as_posix()] = (digest, int(path.stat().st_mtime))
    return out


async def run_cli(*argv: str | Path) -> int:
    """`serve-image ARGV` in this process (its asyncio.run in a thread of its own)."""
    return await asyncio.to_thread(cli.main, [str(a) for a in argv])


def cli_command(*argv: str | Path) -> list[str]:
    """`serve-image ARGV` as a subprocess command line."""
    return [sys.executable, "-m", "serve_image", *[str(a) for a in argv]]


def site_file_for(settings: Settings, directory: Path) -> Path:
    """A site file naming the same database as `settings` (the shared test databases)."""
    constants = {
        "STORAGE_BACKEND": settings.backend, "STORAGE_HOST": settings.host,
        "STORAGE_PORT": settings.port, "STORAGE_USER": settings.user,
        "STORAGE_PASS": settings.password, "STORAGE_DB": settings.database,
        "STORAGE_CHUNK_SIZE": settings.chunk_size,
    }
    if settings.backend == "sqlite":
        del constants["STORAGE_HOST"], constants["STORAGE_PORT"]
    path = directory / "site.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    return path
