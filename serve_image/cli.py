"""The `serve-image` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from serve_image.backends import make_backend
from serve_image.backends.base import Backend
from serve_image.backends import BackendImportError
from serve_image.errors import DatabaseUnavailable
from serve_image.samples import demo_files
from serve_image.settings import Settings, SiteConfigError, load_site, resolve_site_path


class CommandError(Exception):
    """A failure to report on one line with a non-zero exit status."""


def _site_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--site", required=required, metavar="S",
        help="site name (sites/S.py, or $SERVE_IMAGE_SITES/S.py) or path to a site file",
    )


async def _with_backend(settings: Settings, work: Callable[[Backend], object]) -> None:
    backend = make_backend(settings)
    await backend.connect()
    try:
        result = work(backend)
        if asyncio.iscoroutine(result):
            await result
    finally:
        await backend.close()


def cmd_init_db(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    asyncio.run(_with_backend(settings, lambda b: b.create_tables()))
    print(f"tables ready in {settings.describe()}")
    return 0


def _serve(site_path: Path, host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn

    # Every worker loads the site itself: pass the file, not the object.
    os.environ["SERVE_IMAGE_SITE"] = str(site_path.resolve())
    uvicorn.run(
        "serve_image.app:from_environment", factory=True, host=host, port=port,
        workers=workers, log_level=log_level, timeout_graceful_shutdown=30,
        server_header=False,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_site(args.site)  # fail here, with the file and constant, not in a worker
    make_backend(settings)
    _serve(resolve_site_path(args.site), args.host, args.port, args.workers, args.log_level)
    return 0


async def _ensure_demo(settings: Settings) -> list[str]:
    backend = make_backend(settings)
    await backend.connect()
    try:
        await backend.create_tables()
        names = []
        var_dir = settings.var_dir or "var/demo"
        for name, datatype, data in demo_files(var_dir):
            names.append(name)
            if await backend.fetch_meta(_md5(name)) is not None:
                continue
            size = settings.chunk_size
            await backend.store(
                name, (data[i:i + size] for i in range(0, len(data), size)), size=len(data),
                mtime=int(time.time()), datatype=datatype, scope="image",
            )
        return names
    finally:
        await backend.close()


def _md5(name: str) -> str:
    import hashlib

    return hashlib.md5(name.encode("utf-8")).hexdigest()


def cmd_demo(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    names = asyncio.run(_ensure_demo(settings))
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"serve-image demo: {len(names)} files in {settings.describe()}; open:")
    for name in names:
        print(f"  http://{shown}:{args.port}/{name}")
    print("Ctrl-C stops it.", flush=True)
    _serve(resolve_site_path(args.site), args.host, args.port, 1, args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve-image",
        description="Serve files stored in an eZ Publish cluster database over HTTP.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-db", help="create the cluster tables (idempotent, never drops data)")
    _site_arg(p)
    p.set_defaults(func=cmd_init_db)

    def serve_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
        p.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
        p.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])

    p = sub.add_parser("serve", help="serve a site's files over HTTP (uvicorn)")
    _site_arg(p)
    serve_args(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="create the SQLite demo database if absent and serve it")
    p.add_argument("--site", default="demo", metavar="S", help="site to use (demo)")
    serve_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (SiteConfigError, BackendImportError, CommandError) as e:
        print(f"serve-image: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, SiteConfigError) else 1
    except DatabaseUnavailable as e:
        print(f"serve-image: error: database unavailable: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
