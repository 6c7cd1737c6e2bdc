"""The ASGI application: life cycle, dispatch, and the one place errors become responses."""

from __future__ import annotations

import logging
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from serve_image.backends import Backend, make_backend
from serve_image.connections import CONNECTIONS, connection_limit
from serve_image.endpoint import ImageEndpoint, Receive, Scope, Send
from serve_image.errors import DatabaseUnavailable, HTTPError
from serve_image.observability import observer_for
from serve_image.ranges import RangeNotSatisfiable
from serve_image.samples import gallery_page
from serve_image.settings import Settings, load_site

logger = logging.getLogger("serve_image")

HEALTH_PATH = "/-/health"


class ServeImage:
    """One site: its settings, its backend's pool, and the file endpoint."""

    def __init__(
        self, settings: Settings, backend: Backend | None = None, front_page: bytes | None = None
    ) -> None:
        self.settings = settings
        self.backend = backend or make_backend(settings, readonly=True)
        self.endpoint = ImageEndpoint(settings, self.backend)
        # Per worker; the server counts connections (serve_image/connections.py).
        self.max_connections = connection_limit(settings.max_connections)
        # None unless ACCESS_LOG or METRICS_PATH is set: then nothing wraps a request.
        self.observer = observer_for(settings, self.backend)
        routes = [Route(HEALTH_PATH, self.health, methods=["GET", "HEAD"])]
        if self.observer is not None and self.observer.metrics is not None:
            routes.append(Route(settings.metrics_path or "", self.observer.metrics.endpoint))
        if front_page is not None:
            page = HTMLResponse(front_page, headers={"cache-control": "no-store"})

            async def front(_request: Request) -> Response:
                return page

            routes.append(Route("/", front, methods=["GET", "HEAD"]))
        # Everything that is not a file goes through Starlette: the health
        # check now, admin routes later. No image path ever reaches it.
        self.other = Starlette(routes=routes)
        self.error_headers = {
            503: [(b"retry-after", str(settings.retry_after).encode()),
                  (b"cache-control", b"no-store")],
            405: [(b"allow", b"GET, HEAD")],
        }

    async def startup(self) -> None:
        await self.backend.connect()
        try:
            await self.backend.ping()
        except DatabaseUnavailable:
            logger.warning(
                "%s: database not reachable at start-up; answering 503 until it is",
                self.settings.describe(),
            )
        else:
            logger.info("serving %s from %s", self.settings.name, self.settings.describe())

    async def shutdown(self) -> None:
        if self.endpoint.local_copies is not None:
            await self.endpoint.local_copies.close()  # before the pool it reads from
        await self.backend.close()
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
        """A file from the database; anything else goes to the Starlette routes."""
        if CONNECTIONS.open > self.max_connections:
            # MAX_CONNECTIONS: a fast answer and the connection closed, so
            # that its file descriptor is free again at once.
            await self.send_error(send, 503, "Service Unavailable", [(b"connection", b"close")])
            return
        if scope["path"].startswith("/var/"):
            try:
                await self.endpoint(scope, receive, send)
            except HTTPError as e:
                await self.send_error(send, e.status, e.text)
            except RangeNotSatisfiable as e:
                await self.send_error(
                    send, 416, "Range Not Satisfiable",
                    [(b"content-range", f"bytes */{e.size}".encode())],
                )
            return
        await self.other(scope, receive, send)

    async def send_error(
        self, send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """A short plain-text answer: never the request's input, never a traceback."""
        body = f"{status} {text}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"),
            *self.error_headers.get(status, ()),
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
        """For load balancers: 200 when the database answers, else 503."""
        try:
            await self.backend.ping()
        except DatabaseUnavailable:
            return PlainTextResponse(
                "database unavailable\n", 503,
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


