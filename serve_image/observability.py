"""Access log and Prometheus metrics, both off by default.

`ACCESS_LOG = "text"` or `"json"` writes one line per request to the
`serve_image.access` logger; `METRICS_PATH = "/-/metrics"` serves the
Prometheus text format there. With both off, `observer_for` returns None
and the request path does not change at all: no wrapper, no clock read.

Several uvicorn workers are several processes: when PROMETHEUS_MULTIPROC_DIR
is set (`serve-image serve` sets it for `--workers` > 1), every worker writes
its samples there and a scrape, whichever worker answers it, adds them up
(prometheus-client's multiprocess mode). A worker's counts stay in the totals
after it exits; its gauges leave with it, killed or not.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from serve_image.connections import CONNECTIONS
from serve_image.settings import Settings
from serve_image.storage import served_by

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

Scope = Any
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_logger = logging.getLogger("serve_image.access")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds; image responses are mostly a few milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _printable(raw: bytes) -> str:
    """The request path for a log line: non-printable bytes escaped, so one line stays one."""
    text = raw.decode("latin-1")
    if text.isprintable() and " " not in text:
        return text
    return "".join(c if c.isprintable() and c != " " else f"\\x{ord(c):02x}" for c in text)


class Metrics:
    """The Prometheus metrics of one site; also the failover's observer."""

    def __init__(self, settings: Settings, max_connections: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "serve_image_requests", "HTTP responses by status", ["status"], registry=r
        )
        self.bytes_sent = Counter(
            "serve_image_response_bytes", "Body bytes sent", registry=r
        )
        self.latency = Histogram(
            "serve_image_request_duration_seconds", "Time from request to last byte",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queries = Histogram(
            "serve_image_db_query_duration_seconds",
            "Time a pooled connection was held for one query", ["host"],
            buckets=QUERY_BUCKETS, registry=r,
        )
        # live*: a dead worker's samples are dropped (mark_process_dead at exit).
        self.in_use_gauge = Gauge(
            "serve_image_db_connections_in_use", "Pooled connections running a query",
            ["host"], multiprocess_mode="livesum", registry=r,
        )
        self.waiting_gauge = Gauge(
            "serve_image_db_connections_waiting", "Requests waiting for a pooled connection",
            ["host"], multiprocess_mode="livesum", registry=r,
        )
        # The smallest over the workers: up only if every worker reaches it.
        self.host_up = Gauge(
            "serve_image_db_host_up", "1 when the database server is in use, 0 when put aside",
            ["host"], multiprocess_mode="livemin", registry=r,
        )
        for h in (*settings.hosts, *settings.replicas) if settings.backend != "sqlite" else ():
            self.host_up.labels(h.label).set(1)
        if settings.cache_max_bytes:
            lookups = Counter(
                "serve_image_cache_lookups", "Hot-cache lookups, by whether they found the file",
                ["result"], registry=r,
            )
            # Bound once: a lookup is on the request path.
            self.cache_hits, self.cache_misses = lookups.labels("hit"), lookups.labels("miss")
        # Summed over the workers: how many connections the node takes.
        self.connections_limit = Gauge(
            "serve_image_connections_limit", "MAX_CONNECTIONS: open connections allowed",
            multiprocess_mode="livesum", registry=r,
        )
        self.connections_limit.set(max_connections)
        # Made when the server first reports a connection: a server that
        # does not (granian) shows no count rather than a false 0.
        self._connections_open: Gauge | None = None
        self._bad_requests: Counter | None = None
        CONNECTIONS.observers.append(self)

    # -- ConnectionObserver ----------------------------------------------------
    def _server_reports(self) -> tuple[Gauge, Counter]:
        from prometheus_client import Counter, Gauge

        if self._connections_open is None or self._bad_requests is None:
            self._connections_open = Gauge(
                "serve_image_connections_open", "Open client connections",
                multiprocess_mode="livesum", registry=self.registry,
            )
            self._bad_requests = Counter(
                "serve_image_bad_requests", "Malformed requests the server answered 400",
                registry=self.registry,
            )
        return self._connections_open, self._bad_requests

    def connections_open(self, count: int) -> None:
        self._server_reports()[0].set(count)

    def bad_request(self) -> None:
        self._server_reports()[1].inc()

    # -- drivers.base.DriverObserver ----------------------------------------------
    def query(self, host: str, seconds: float) -> None:
        self.queries.labels(host).observe(seconds)

    def in_use(self, host: str, delta: int) -> None:
        self.in_use_gauge.labels(host).inc(delta)

    def waiting(self, host: str, delta: int) -> None:
        self.waiting_gauge.labels(host).inc(delta)

    def health(self, host: str, up: bool) -> None:
        self.host_up.labels(host).set(1 if up else 0)

    # -- CacheObserver -----------------------------------------------------------
    def cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    # -- the scrape ------------------------------------------------------------
    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            _forget_dead_workers(directory)
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(
            self.exposition(), headers={"cache-control": "no-store"},
            media_type=CONTENT_TYPE_LATEST,
        )

    def close(self) -> None:
        CONNECTIONS.observers.remove(self)
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _forget_dead_workers(directory: str) -> None:
    """Drop the live gauges of workers that are gone.

    A worker that shuts down marks itself dead (Metrics.close). One killed
    (SIGKILL, the OOM killer) never does: its connections in use and its
    view of the servers would count in every scrape until the whole server
    restarts. uvicorn starts a new worker, with a pid of its own, in its place.
    """
    from prometheus_client import multiprocess

    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        ident = path.rsplit("_", 1)[1].removesuffix(".db")
        if not ident.isdigit():
            continue  # not named by a pid: not ours to judge
        pid = int(ident)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, under another user


class Observer:
    """Wraps the HTTP handling: one access log line and the request metrics."""

    def __init__(self, settings: Settings, max_connections: int) -> None:
        self.settings = settings
        self.json = settings.access_log == "json"
        self.log = settings.access_log is not None
        # Also the storage's observer (app.py hands it over with Layout.observe).
        self.metrics = Metrics(settings, max_connections) if settings.metrics_path else None
        self.backend_name = settings.backend

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0
        sent = 0
        # False when the body was cut off (endpoint.py aborts a stream whose
        # file changed or whose database went away after the headers).
        complete = False
        token = served_by.set(None)

        async def observed_send(message: Any) -> None:
            nonlocal status, sent, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    complete = True
            await send(message)

        try:
            await app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - started
            # An exception escaping the app is a 500 from the server's point of view.
            final = status or 500
            if self.metrics is not None:
                self.metrics.requests.labels(str(final)).inc()
                self.metrics.bytes_sent.inc(sent)
                self.metrics.latency.observe(seconds)
            if self.log:
                self._log(scope, final, sent, seconds, complete)
            served_by.reset(token)

    def _log(self, scope: Scope, status: int, sent: int, seconds: float, complete: bool) -> None:
        raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        host = served_by.get()
        if self.json:
            line = json.dumps({
                "method": scope["method"], "path": raw.decode("latin-1"), "status": status,
                "bytes": sent, "duration_ms": round(seconds * 1000, 3),
                "backend": self.backend_name, "db_host": host, "complete": complete,
            }, ensure_ascii=True)
        else:
            line = (
                f'{scope["method"]} {_printable(raw)} {status} {sent} '
                f"{seconds * 1000:.3f}ms backend={self.backend_name} db_host={host or '-'}"
                + ("" if complete else " aborted")
            )
        access_logger.info("%s", line)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def observer_for(settings: Settings, max_connections: int) -> Observer | None:
    """The site's observer, or None when both the access log and metrics are off.

    `max_connections`: the worker's bound, resolved (connections.connection_limit).
    """
    if settings.access_log is None and settings.metrics_path is None:
        return None
    return Observer(settings, max_connections)


@contextmanager
def multiprocess_metrics(settings: Settings, workers: int) -> Iterator[None]:
    """Around `uvicorn.run`: give the workers a shared PROMETHEUS_MULTIPROC_DIR.

    Set before any worker imports prometheus-client (the mode is chosen at
    import), removed with its files afterwards. One given by the environment
    is used as it is and left alone.
    """
    if settings.metrics_path is None or workers < 2 or os.environ.get(MULTIPROC_ENV):
        yield
        return
    path = tempfile.mkdtemp(prefix="serve-image-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)
