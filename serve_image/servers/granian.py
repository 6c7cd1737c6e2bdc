"""granian, a Rust HTTP server (`pip install 'serve-image[granian]'`), with uvloop.

Its own options cover serve-image's: HTTP1Settings.header_read_timeout is
HEADER_TIMEOUT, and `backpressure` (connections per worker: a worker stops
accepting at the bound) is MAX_CONNECTIONS. What that means for clients is in
docs/internet-facing.md: over the bound they wait in the listen backlog
instead of getting a 503. granian answers malformed requests 400 itself and
neither logs nor reports them.

Only HTTP/1.1 is served, as under uvicorn: in granian's "auto" mode, which
waits for a first byte to tell HTTP/1 from HTTP/2, a connection that sends
nothing is never timed out.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from granian.constants import HTTPModes, Interfaces, Loops
from granian.http import HTTP1Settings
from granian.log import LOGGING_CONFIG, LogLevels
from granian.server import Server

from serve_image.servers import ServerOptions, with_own_logging


def log_config() -> dict[str, Any]:
    """granian's logging, with serve-image's loggers (ACCESS_LOG among them) at INFO.

    granian replaces whole sections of its configuration with the ones given:
    so its own are given too.
    """
    return with_own_logging(copy.deepcopy(LOGGING_CONFIG))


def server_arguments(options: ServerOptions) -> dict[str, Any]:
    """granian's Server arguments for `options`, but the target and interface."""
    return {
        "address": options.host,
        "port": options.port,
        "http": HTTPModes.http1,
        "websockets": False,
        "backpressure": options.max_connections,
        "http1_settings": HTTP1Settings(
            header_read_timeout=max(1, math.ceil(options.header_timeout * 1000)),
        ),
        "log_level": LogLevels(options.log_level),
        "log_dictconfig": log_config(),
        # ACCESS_LOG is the access log.
        "log_access": False,
    }


def run(options: ServerOptions) -> None:
    Server(
        options.factory,
        interface=Interfaces.ASGI,
        factory=True,
        workers=options.workers,
        loop=Loops.uvloop,
        workers_kill_timeout=options.graceful_timeout,
        **server_arguments(options),
    ).serve()
