"""`serve-image apache-snippet`: the Apache 2.4 configuration for a site."""

from __future__ import annotations

import argparse
import sys

from serve_image.apache import DEFAULT_UPSTREAM, MODES, SnippetError, UpstreamError, apache_snippet
from serve_image.cli import CommandError, add_site_argument
from serve_image.settings import load_site


def cmd_apache_snippet(args: argparse.Namespace) -> int:
    settings = load_site(args.site)
    try:
        text = apache_snippet(settings, args.upstream, args.mode)
    except (UpstreamError, SnippetError) as e:
        raise CommandError(str(e)) from None
    sys.stdout.write(text)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "apache-snippet",
        help="print the Apache 2.4 rules that proxy a site's stored files to serve-image",
        description="Print the Apache 2.4 configuration (mod_rewrite + mod_proxy_http) that "
                    "sends a site's /var/.../storage/images[-versioned]/ requests to serve-image. "
                    "Include it in the site's <VirtualHost>, before its own RewriteRules.",
    )
    add_site_argument(p)
    p.add_argument("--upstream", default=DEFAULT_UPSTREAM, metavar="URL",
                   help=f"where serve-image listens, http://host:port ({DEFAULT_UPSTREAM})")
    p.add_argument("--mode", choices=MODES, default="always",
                   help="always: every request goes to serve-image (eZ's rule); missing: only "
                        "when the file is not on this node's disk (always)")
    p.set_defaults(func=cmd_apache_snippet)
