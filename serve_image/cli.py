"""The `serve-image` command line: the parser, and the one place errors become exit codes.

Each group of commands lives in `serve_image/commands/<group>.py` with a
`register(subparsers)` function, listed in COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from serve_image.litefs import replica_message, replica_primary
from serve_image.servers import LOG_FORMAT, ServerImportError
from serve_image.settings import Settings, SiteConfigError
from serve_image.storage import (
    DatabaseUnavailable,
    DriverMissing,
    Layout,
    StorageError,
    make_layout,
)

COMMAND_MODULES = [
    "serve_image.commands.serve",
    "serve_image.commands.files",
    "serve_image.commands.local",
    "serve_image.commands.invalidate",
    "serve_image.commands.apache",
    "serve_image.commands.ez",
]


class CommandError(Exception):
    """A failure to report on one line with a non-zero exit status."""


def add_site_argument(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--site", required=required, metavar="S",
        help="site name (sites/S.py, or $SERVE_IMAGE_SITES/S.py) or path to a site file",
    )


@contextlib.asynccontextmanager
async def storage_for(settings: Settings, *, readonly: bool = False) -> AsyncIterator[Layout]:
    """The site's storage, connected, closed afterwards.

    Not `readonly`: refused first on a LiteFS replica, where a write would
    fail with "readonly database" or, in WAL mode, "disk I/O error"; the
    error says where to run the command instead.
    """
    if not readonly:
        primary = replica_primary(settings)
        if primary is not None:
            raise CommandError(replica_message(settings, primary))
    layout = make_layout(settings, readonly=readonly)
    await layout.connect()
    try:
        yield layout
    finally:
        await layout.close()


async def run_with_storage(
    settings: Settings, work: Callable[[Layout], Any], *, readonly: bool = False
) -> Any:
    """Connect to the site's storage, run `work(layout)` (awaited if a coroutine), close it."""
    async with storage_for(settings, readonly=readonly) as layout:
        result = work(layout)
        if asyncio.iscoroutine(result):
            result = await result
        return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve-image",
        description="Serve files stored in an eZ Publish cluster database over HTTP.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return int(args.func(args))
    except (SiteConfigError, DriverMissing, ServerImportError, CommandError) as e:
        print(f"serve-image: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, SiteConfigError) else 1
    except DatabaseUnavailable as e:
        print(f"serve-image: error: database unavailable: {e}", file=sys.stderr)
        return 1
    except StorageError as e:
        print(f"serve-image: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `serve-image cat NAME | head`: the reader left; say nothing more and
        # keep Python from complaining while it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
