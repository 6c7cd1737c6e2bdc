"""`serve-image init-db`, `serve` and `demo`."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from serve_image.cli import add_site_argument, run_with_storage
from serve_image.cluster import ClusterFiles
from serve_image.observability import multiprocess_metrics
from serve_image.samples import demo_files
from serve_image.settings import Settings, load_site, resolve_site_path
from serve_image.storage import make_layout


def cmd_init_db(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    asyncio.run(run_with_storage(settings, lambda layout: layout.create_tables()))
    print(f"tables ready in {settings.describe()}")
    return 0


def _serve(site_path: Path, host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn

    # Every worker loads the site itself: pass the file, not the object.
    os.environ["SERVE_IMAGE_SITE"] = str(site_path.resolve())
    uvicorn.run(
        "serve_image.app:from_environment", factory=True, host=host, port=port,
        workers=workers, log_level=log_level, timeout_graceful_shutdown=30,
        # ACCESS_LOG is the access log. uvicorn's own would format a line for
        # every request even when its level drops it (a measurable share of a
        # cached small file's time, bench/README.md).
        server_header=False, access_log=False,
        # The client address stays the connection's peer: PURGE_ALLOW is
        # checked against it, and X-Forwarded-For is any client's to send.
        proxy_headers=False,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_site(args.site)  # fail here, with the file and constant, not in a worker
    make_layout(settings)  # and here if its driver is missing
    with multiprocess_metrics(settings, args.workers):
        _serve(resolve_site_path(args.site), args.host, args.port, args.workers, args.log_level)
    return 0


async def _ensure_demo(settings: Settings) -> list[str]:
    async with ClusterFiles.open(settings) as cluster:
        await cluster.layout.create_tables()
        names = []
        for name, datatype, data in demo_files(settings.var_dir or "var/demo"):
            names.append(name)
            if await cluster.stat(name) is None:
                await cluster.store_contents(name, data, datatype=datatype, scope="image")
        return names


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


def _listen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init-db", help="create the cluster tables (idempotent, never drops data)")
    add_site_argument(p)
    p.set_defaults(func=cmd_init_db)

    p = sub.add_parser("serve", help="serve a site's files over HTTP (uvicorn)")
    add_site_argument(p)
    _listen_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="create the SQLite demo database if absent and serve it")
    p.add_argument("--site", default="demo", metavar="S", help="site to use (demo)")
    _listen_arguments(p)
    p.set_defaults(func=cmd_demo)
