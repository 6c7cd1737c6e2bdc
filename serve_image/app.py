"""The ASGI application: life cycle, dispatch, and the one place errors become responses."""

from __future__ import annotations

import logging
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from serve_image.cache import HotCache
from serve_image.connections import CONNECTIONS, connection_limit
from serve_image.endpoint import ImageEndpoint, Receive, Scope, Send
from serve_image.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    URITooLong,
)
from serve_image.invalidation import Invalidation
from serve_image.localcopy import LocalCopies
from serve_image.observability import observer_for
from serve_image.paths import is_image_path
from serve_image.ranges import RangeNotSatisfiable
from serve_image.samples import gallery_page
from serve_image.settings import Settings, load_site
from serve_image.storage import (
    DatabaseUnavailable,
    FileUnavailable,
    Layout,
    StatementFailed,
    StorageError,
    make_layout,
)

logger = logging.getLogger("serve_image")

HEALTH_PATH = "/-/health"

# Why a file is not sent -> the status and reason phrase of the answer.
STATUSES: dict[type[Exception], tuple[int, str]] = {
    BadRequest: (400, "Bad Request"),
    Forbidden: (403, "Forbidden"),
    NotFound: (404, "Not Found"),
    MethodNotAllowed: (405, "Method Not Allowed"),
    PreconditionFailed: (412, "Precondition Failed"),
    URITooLong: (414, "URI Too Long"),
    RangeNotSatisfiable: (416, "Range Not Satisfiable"),
    # A refused statement on the request path is our bug, not an outage.
    StatementFailed: (500, "Internal Server Error"),
    DatabaseUnavailable: (503, "Service Unavailable"),
    # A DFS row whose file is being written, or a mount that does not answer.
    FileUnavailable: (503, "Service Unavailable"),
}
# What `http` answers with STATUSES (anything else is a bug, the server's 500).
REFUSALS = tuple(STATUSES)


# Seconds a client is asked to wait for a file being written (eZ copies a
# DFS file right after its row): short, unlike the site's RETRY_AFTER for
# outages.
IN_PROGRESS_RETRY_AFTER = 1


def status_of(error: Exception) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in STATUSES:
            return STATUSES[cls]
    raise TypeError(f"no status for {type(error).__name__}")  # a programmer's error


class ServeImage:
    """One site: its settings, its storage's pools, and the file endpoint."""

    def __init__(
        self, settings: Settings, layout: Layout | None = None, front_page: bytes | None = None
    ) -> None:
        self.settings = settings
        self.layout = layout or make_layout(settings, readonly=True, replicas=True)
        # LOCAL_COPY_DIR: files served whole are copied to disk after the response.
        self.local_copies = LocalCopies.for_site(settings, self.layout)
        # CACHE_MAX_BYTES: small files answered from memory for up to CACHE_TTL.
        self.cache = HotCache.for_site(settings)
        self.endpoint = ImageEndpoint(settings, self.layout, self.local_copies, self.cache)
        # PURGE_ALLOW: PURGE drops a file from every worker's hot cache (through
        # the node's purge board) and from the local copies.
        self.invalidation = (
            Invalidation(settings, self.cache, self.local_copies)
            if settings.purge_allow else None
        )
        # Per worker; the server counts connections (serve_image/connections.py).
        self.max_connections = connection_limit(settings.max_connections)
        # None unless ACCESS_LOG or METRICS_PATH is set: then nothing wraps a request.
        self.observer = observer_for(settings, self.max_connections)
        routes = [Route(HEALTH_PATH, self.health, methods=["GET", "HEAD"])]
        if self.observer is not None and self.observer.metrics is not None:
            self.layout.observe(self.observer.metrics)
            if self.cache is not None:
                self.cache.observer = self.observer.metrics
            routes.append(Route(settings.metrics_path or "", self.observer.metrics.endpoint))
        if front_page is not None:
            page = HTMLResponse(front_page, headers={"cache-control": "no-store"})

            async def front(_request: Request) -> Response:
                return page

            routes.append(Route("/", front, methods=["GET", "HEAD"]))
        # Everything that is not a file goes through Starlette: the health
        # check now, admin routes later. No image path ever reaches it.
        self.other = Starlette(routes=routes)
        unavailable = [(b"retry-after", str(settings.retry_after).encode()),
                       (b"cache-control", b"no-store")]
        # RFC 9110 §15.5.6: a 405 lists the methods the resource supports;
        # PURGE is one only when some address may use it.
        allow = b"GET, HEAD, PURGE" if self.invalidation is not None else b"GET, HEAD"
        self.error_headers = {503: unavailable, 405: [(b"allow", allow)]}

    async def startup(self) -> None:
        await self.layout.connect()
        try:
            await self.layout.ping()
        except StorageError:
            logger.warning(
                "%s: storage not reachable at start-up; answering 503 until it is",
                self.settings.describe(),
            )
        else:
            logger.info("serving %s from %s", self.settings.name, self.settings.describe())

    async def shutdown(self) -> None:
        if self.local_copies is not None:
            await self.local_copies.close()  # before the pool it reads from
        await self.layout.close()
        if self.cache is not None:
            self.cache.close()
        if self.observer is not None:
            self.observer.close()
        logger.info("%s: database pools closed", self.settings.describe())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.observer is not None:
                await self.observer(self.http, scope, receive, send)
            else:
                await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A stored file; anything else goes to the Starlette routes."""
        if CONNECTIONS.open > self.max_connections:
            # MAX_CONNECTIONS: a fast answer and the connection closed, so
            # that its file descriptor is free again at once. The health check
            # too: a load balancer then sends this node's clients elsewhere
            # until it is under the bound again (docs/internet-facing.md).
            await self.send_error(send, 503, "Service Unavailable", [(b"connection", b"close")])
            return
        if not is_image_path(scope["path"]):
            await self.other(scope, receive, send)
            return
        try:
            if scope["method"] == "PURGE" and self.invalidation is not None:
                await self.invalidation(scope, receive, send)
            else:
                await self.endpoint(scope, receive, send)
        except REFUSALS as e:
            extra = (
                [(b"content-range", f"bytes */{e.size}".encode())]
                if isinstance(e, RangeNotSatisfiable) else []
            )
            retry_after = None
            if isinstance(e, FileUnavailable):
                logger.warning("503 for %s: %s", scope["path"], e)
                if e.in_progress:
                    retry_after = IN_PROGRESS_RETRY_AFTER
            await self.send_error(send, *status_of(e), extra, retry_after=retry_after)

    async def send_error(
        self, send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None,
        *, retry_after: int | None = None,
    ) -> None:
        """A short plain-text answer: never the request's input, never a traceback.

        `retry_after`: a 503's Retry-After when not the site's RETRY_AFTER.
        """
        body = f"{status} {text}\n".encode()
        fixed = self.error_headers.get(status, [])
        if retry_after is not None:
            fixed = [(b"retry-after", str(retry_after).encode()),
                     *(h for h in fixed if h[0] != b"retry-after")]
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"),
            *fixed,
            *(extra or ()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:  # boundary: report to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def health(self, request: Request) -> Response:
        """For load balancers: 200 when files can be served, else 503."""
        try:
            await self.layout.ping()
        except StorageError as e:
            what = "database" if isinstance(e, DatabaseUnavailable) else "storage"
            return PlainTextResponse(
                f"{what} unavailable\n", 503,
                headers={"retry-after": str(self.settings.retry_after),
                         "cache-control": "no-store"},
            )
        return PlainTextResponse("ok\n", headers={"cache-control": "no-store"})


def create_app(site: str) -> ServeImage:
    """The app for a site module name or path (see settings.load_site)."""
    return ServeImage(load_site(site))


def _site_from_environment() -> str:
    site = os.environ.get("SERVE_IMAGE_SITE")
    if not site:
        raise SystemExit("serve-image: set SERVE_IMAGE_SITE to a site name or file")
    return site


def from_environment() -> ServeImage:
    """Factory for plain uvicorn, the site named by $SERVE_IMAGE_SITE.

    `SERVE_IMAGE_SITE=demo uvicorn --factory serve_image.app:from_environment`
    """
    return create_app(_site_from_environment())


def demo_from_environment() -> ServeImage:
    """`serve-image demo`'s factory: the site, with a gallery of the demo images at `/`."""
    settings = load_site(_site_from_environment())
    return ServeImage(settings, front_page=gallery_page(settings.var_dir or "var/demo"))
