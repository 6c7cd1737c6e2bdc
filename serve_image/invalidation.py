"""A node's answer to `PURGE /<name>`: drop the file from its hot cache and its local copy.

Only from an address in PURGE_ALLOW (CIDR networks): the peer address of
the connection, the ASGI scope's `client`. X-Forwarded-For and Forwarded
are never looked at, since any client can send them; `serve-image serve`
runs uvicorn without its proxy-headers rewriting of that address. A
connection without an address (a Unix socket) is refused.

A purge drops the file from every worker's hot cache through the node's
purge board (serve_image/purgeboard.py) and removes its local copy, whether
or not a file of that name exists: the answer is 200 either way, so that a
purge is idempotent and says nothing about what is stored.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

from serve_image.cache import HotCache
from serve_image.endpoint import Receive, Scope, Send
from serve_image.errors import Forbidden
from serve_image.localcopy import LocalCopies
from serve_image.paths import request_name
from serve_image.settings import IPNetwork, Settings
from serve_image.storage import name_hash

logger = logging.getLogger("serve_image.invalidation")

_BODY = b"200 Purged\n"


def allowed(client: Sequence[object] | None, networks: Sequence[IPNetwork]) -> bool:
    """Is the connection's peer address in one of `networks`?"""
    if not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket shows an IPv4 peer as ::ffff:a.b.c.d.
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class Invalidation:
    """PURGE for one site's files."""

    def __init__(
        self, settings: Settings, cache: HotCache | None, local_copies: LocalCopies | None,
    ) -> None:
        self.settings = settings
        self.networks = settings.purge_allow
        self.cache = cache
        self.local_copies = local_copies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if not allowed(client, self.networks):
            raise Forbidden()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        # The endpoint's rules: a path it would refuse is refused alike (400, 404, 414).
        name = request_name(raw_path, self.settings.var_dir).name
        if self.cache is not None:
            self.cache.purge(name_hash(name))
        copy = False
        if self.local_copies is not None:
            copy = await self.local_copies.drop(name)
        logger.debug("PURGE %s from %s%s", name, client[0] if client else "?",
                    ": local copy removed" if copy else "")
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(_BODY)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
        ]})
        await send({"type": "http.response.body", "body": _BODY})
