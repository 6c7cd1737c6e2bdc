"""The HTTP servers `serve-image serve --server NAME` can run the app under.

One module per server in SERVERS, each with `run(options)`: the options are
given once here (`ServerOptions`) and each module translates them into its
server's own. What each server can and cannot do is in docs/internet-facing.md:

- uvicorn (the default): the header-read timeout and the connection count
  come from a protocol subclass (servers/uvicorn.py), so the app answers 503
  over MAX_CONNECTIONS and counts invalid requests;
- granian (`pip install 'serve-image[granian]'`): a Rust server; it times
  out headers and bounds connections itself (HTTP1 header_read_timeout,
  backpressure), holding clients over the bound in the listen backlog.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, cast

from serve_image.connections import connection_limit, raise_open_files_limit
from serve_image.settings import Settings

SERVERS = {
    "uvicorn": "serve_image.servers.uvicorn",
    "granian": "serve_image.servers.granian",
}
DEFAULT_SERVER = "uvicorn"

# Every worker builds the app itself from $SERVE_IMAGE_SITE (app.py).
APP_FACTORY = "serve_image.app:from_environment"
DEMO_FACTORY = "serve_image.app:demo_from_environment"

# How serve-image's log lines read, under every server and on the command line.
LOG_FORMAT = "%(levelname)s: %(name)s: %(message)s"


class ServerImportError(Exception):
    """The server's package is not installed; the message says which extra to install."""


@dataclass(frozen=True)
class ServerOptions:
    """What serve-image asks of any server; each server module translates it."""

    factory: str = APP_FACTORY
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    # Seconds a SIGTERM waits for responses in flight before closing them.
    graceful_timeout: int = 30
    # HEADER_TIMEOUT: seconds to receive a request's headers.
    header_timeout: float = 10.0
    # MAX_CONNECTIONS, resolved: open connections per worker (granian's
    # backpressure). Each worker's app resolves it too, from the open-file
    # limit it inherits: the same number (app.py).
    max_connections: int = 1024


class Server(Protocol):
    def run(self, options: ServerOptions) -> None: ...


def with_own_logging(config: dict[str, Any]) -> dict[str, Any]:
    """A server's logging dictConfig, with serve-image's loggers writing to stderr.

    On the root logger, so that worker processes (which do not run cli.main)
    write serve_image's lines, ACCESS_LOG's among them, at INFO whatever
    --log-level says of the server's own.
    """
    config["formatters"]["serve_image"] = {"format": LOG_FORMAT}
    config["handlers"]["serve_image"] = {
        "formatter": "serve_image", "class": "logging.StreamHandler", "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["serve_image"], "level": "INFO"}
    return config


def load(name: str) -> Server:
    """The module of server `name` (a key of SERVERS)."""
    try:
        return cast(Server, importlib.import_module(SERVERS[name]))
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != name:
            raise
        raise ServerImportError(
            f"--server {name} needs the {name} package: pip install 'serve-image[{name}]'"
        ) from None


def options_for(
    settings: Settings, *, factory: str = APP_FACTORY, host: str, port: int, workers: int,
    log_level: str,
) -> ServerOptions:
    """The options for a site and the command line's flags.

    Raises the open-file limit first: MAX_CONNECTIONS' default derives from it.
    """
    raise_open_files_limit()
    return ServerOptions(
        factory=factory, host=host, port=port, workers=workers, log_level=log_level,
        header_timeout=settings.header_timeout,
        max_connections=connection_limit(settings.max_connections),
    )
