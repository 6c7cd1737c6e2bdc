"""`serve-image invalidate`: the purges a write sends, sent by hand."""

from __future__ import annotations

import argparse
import asyncio

from serve_image.cli import CommandError, add_site_argument
from serve_image.errors import RequestRefused
from serve_image.paths import request_name
from serve_image.purge import Purger, PurgeReport, purge_path
from serve_image.settings import load_site


def cmd_invalidate(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    purger = Purger.for_site(settings)
    if purger is None:
        raise CommandError(f"{settings.source}: PURGE_URLS is not set: no cache to tell")
    for name in args.names:
        try:
            # The endpoint's own rules: a name it would never serve is a typo.
            request_name(purge_path(name).encode("ascii"), settings.var_dir)
        except RequestRefused:
            raise CommandError(f"{name}: not a name this site serves "
                               "(var[/DIR]/storage/images[-versioned]/...)") from None

    async def send() -> PurgeReport:
        try:
            return await purger.send(args.names)
        finally:
            await purger.close()

    report = asyncio.run(send())
    print(report.summary())
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "invalidate", help="send PURGE for stored names to every cache of PURGE_URLS",
    )
    add_site_argument(p)
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="a stored name, e.g. var/site/storage/images/a/b.jpg")
    p.set_defaults(func=cmd_invalidate)
