"""`serve-image site-from-ez`: a site module from an eZ Publish cluster configuration."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from serve_image.cli import CommandError
from serve_image.ezconfig import EzConfigError, write_site
from serve_image.settings import LAYOUT_NAMES


def cmd_site_from_ez(args: argparse.Namespace) -> int:
    sites_dir = Path(args.sites_dir or os.environ.get("SERVE_IMAGE_SITES", "sites"))
    try:
        target, conv = write_site(
            Path(args.file), args.name, sites_dir, force=args.force, layout=args.layout
        )
    except EzConfigError as e:
        raise CommandError(str(e)) from None
    # Names and reasons only: a skipped value could be a secret.
    for key, reason in conv.skipped:
        print(f"serve-image: not carried over: {key}: {reason}", file=sys.stderr)
    for note in conv.notes:
        print(f"serve-image: note: {note}", file=sys.stderr)
    print(f"wrote {target} ({len(conv.constants)} settings); check it with: "
          f"serve-image init-db --site {target}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "site-from-ez",
        help="write sites/NAME.py from eZ's file.ini.append.php or index_image-*.php",
        description="Write a site module from an eZ Publish cluster configuration: "
                    "settings/override/file.ini.append.php ([ClusteringSettings]), a "
                    "per-siteaccess index_image-*.php or eZ 4.7's config.cluster.php. "
                    "Settings that are not carried over are listed on stderr and in the file.",
    )
    p.add_argument("file", metavar="FILE", help="the eZ file to read")
    p.add_argument("--name", required=True, help="the site's name: writes SITES_DIR/NAME.py")
    p.add_argument("--sites-dir", metavar="DIR",
                   help="where to write (default $SERVE_IMAGE_SITES, else ./sites)")
    p.add_argument("--layout", choices=LAYOUT_NAMES,
                   help="STORAGE_LAYOUT to write (default: largeobject for eZ's pgsql cluster, "
                        "else chunks)")
    p.add_argument("--force", action="store_true", help="replace an existing site file")
    p.set_defaults(func=cmd_site_from_ez)
