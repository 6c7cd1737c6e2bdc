"""uvicorn, with a header-read timeout, a connection count and a quiet log of bad requests.

uvicorn has no header-read timeout (its keep-alive timeout stops as soon as
a request's first byte arrives, so a client that sends a request line and
never ends its headers holds its connection for ever), and it logs every
malformed request. Both are added through its documented extension points:
`http=` takes the HTTP protocol class (here httptools', which
uvicorn[standard] installs, subclassed by `Protocol`), and `log_config=` a
logging dictConfig (here with `InvalidRequestLog` on uvicorn's error logger).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve_image.connections import CONNECTIONS
from serve_image.servers import ServerOptions, with_own_logging

# What uvicorn logs, once per malformed request, before answering it 400.
INVALID_REQUEST = "Invalid HTTP request received"
# Seconds between two log lines about invalid requests.
INVALID_REQUEST_LOG_INTERVAL = 60.0


class Protocol(HttpToolsProtocol):
    """httptools' protocol, which closes a connection whose headers are late,
    and reports its connections to serve_image.connections."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        # When the headers awaited now are late; None while a request is
        # being answered. A request only moves this: the one timer of the
        # connection looks at it when it fires, and is set again only then,
        # rather than made and cancelled for every request.
        self.header_deadline: float | None = None
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        CONNECTIONS.opened()
        # From the connection's start: a client that sends nothing at all is
        # closed too (uvicorn's keep-alive timer only starts after a response).
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.header_deadline = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        CONNECTIONS.closed()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self.header_deadline = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # A pipelined request already has its headers; otherwise the next
        # request's are awaited from now on.
        waiting = not self.pipeline
        super().on_response_complete()
        if waiting and not self.transport.is_closing():
            self._await_headers()

    def _await_headers(self) -> None:
        self.header_deadline = self.loop.time() + self.header_timeout
        if self.header_timer is None:
            self.header_timer = self.loop.call_at(self.header_deadline, self._check_headers)

    def _check_headers(self) -> None:
        self.header_timer = None
        deadline = self.header_deadline
        if deadline is None:
            return  # a request is being answered; its end sets a new deadline
        if self.loop.time() < deadline:
            self.header_timer = self.loop.call_at(deadline, self._check_headers)
            return
        # Closed without a 408 (RFC 9110 §15.5.9 allows either): the client
        # may still be sending, and a response it does not read could be lost
        # to a reset anyway.
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class InvalidRequestLog(logging.Filter):
    """Counts uvicorn's "Invalid HTTP request received" lines and lets one through per interval.

    The first one after a quiet interval is logged as uvicorn wrote it; the
    next ones are only counted (serve_image_bad_requests_total) until the
    interval is over, when one line gives their number.
    """

    def __init__(self, interval: float = INVALID_REQUEST_LOG_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self.held = 0
        self.timer: asyncio.TimerHandle | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(INVALID_REQUEST):
            return True
        CONNECTIONS.bad_request()
        if self.timer is not None:
            self.held += 1
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return True  # not from the event loop: nothing to hold it with
        self.timer = loop.call_later(self.interval, self._flush, loop, record.name)
        return True

    def _flush(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.timer = None
        if not self.held:
            return
        held, self.held = self.held, 0
        logging.getLogger(name).warning(
            "%s: %d more in the last %g s, each answered 400", INVALID_REQUEST, held, self.interval,
        )
        self.timer = loop.call_later(self.interval, self._flush, loop, name)


def log_config() -> dict[str, Any]:
    """uvicorn's logging, with serve-image's loggers in every worker and bad requests held."""
    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"invalid_requests": {"()": InvalidRequestLog}}
    config["loggers"]["uvicorn.error"]["filters"] = ["invalid_requests"]
    return with_own_logging(config)


def config(options: ServerOptions) -> dict[str, Any]:
    """uvicorn.Config's arguments for `options`, but the app."""
    return {
        "host": options.host,
        "port": options.port,
        "workers": options.workers,
        "log_level": options.log_level,
        "log_config": log_config(),
        "http": functools.partial(Protocol, header_timeout=options.header_timeout),
        "ws": "none",
        "timeout_graceful_shutdown": options.graceful_timeout,
        # ACCESS_LOG is the access log. uvicorn's own would format a line for
        # every request even when its level drops it (a measurable share of a
        # cached small file's time, bench/README.md).
        "access_log": False,
        "server_header": False,
        # The client address stays the connection's peer: PURGE_ALLOW is
        # checked against it, and X-Forwarded-For is any client's to send.
        "proxy_headers": False,
    }


def run(options: ServerOptions) -> None:
    # MAX_CONNECTIONS is enforced by the app (app.py), from the count
    # Protocol keeps: uvicorn's limit_concurrency would answer 503 without
    # Retry-After and log a line for each.
    uvicorn.run(options.factory, factory=True, **config(options))
