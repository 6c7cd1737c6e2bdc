"""`serve-image init-db`, `serve` and `demo`."""

from __future__ import annotations

import argparse
import asyncio
import os

from serve_image import servers
from serve_image.cli import add_site_argument, run_with_storage
from serve_image.cluster import ClusterFiles
from serve_image.observability import multiprocess_metrics
from serve_image.samples import demo_files
from serve_image.servers import APP_FACTORY, DEMO_FACTORY
from serve_image.settings import Settings, load_site, resolve_site_path
from serve_image.storage import make_layout


def cmd_init_db(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    asyncio.run(run_with_storage(settings, lambda layout: layout.create_tables()))
    print(f"tables ready in {settings.describe()}")
    return 0


def _serve(
    args: argparse.Namespace, settings: Settings, workers: int, factory: str = APP_FACTORY
) -> None:
    server = servers.load(args.server)  # fail here if its package is missing
    options = servers.options_for(
        settings, factory=factory, host=args.host, port=args.port, workers=workers,
        log_level=args.log_level,
    )
    # Every worker loads the site itself: pass the file, not the object.
    os.environ["SERVE_IMAGE_SITE"] = str(resolve_site_path(args.site).resolve())
    with multiprocess_metrics(settings, workers):
        server.run(options)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load_site(args.site)  # fail here, with the file and constant, not in a worker
    make_layout(settings)  # and here if its driver is missing
    _serve(args, settings, args.workers)
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
    print(f"  http://{shown}:{args.port}/ shows them all. Ctrl-C stops it.", flush=True)
    _serve(args, settings, 1, DEMO_FACTORY)
    return 0


def _listen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--server", default=servers.DEFAULT_SERVER, choices=list(servers.SERVERS),
                   help=f"HTTP server to run the app under ({servers.DEFAULT_SERVER}; "
                        "granian needs the [granian] extra)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init-db", help="create the cluster tables (idempotent, never drops data)")
    add_site_argument(p)
    p.set_defaults(func=cmd_init_db)

    p = sub.add_parser("serve", help="serve a site's files over HTTP")
    add_site_argument(p)
    _listen_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="create the SQLite demo database if absent and serve it")
    p.add_argument("--site", default="demo", metavar="S", help="site to use (demo)")
    _listen_arguments(p)
    p.set_defaults(func=cmd_demo)
