"""Staying up while databases fail: failover, all servers down, killed connections,
disconnecting clients, an exhausted pool, graceful shutdown.

The failover tests run a MariaDB and a PostgreSQL server of their own
(tests/dbservers.py) in front of this machine's servers, and crash them under
load. The behaviours are asserted exactly; how fast they happen (failover
window, 503 latency, recovery time) depends on the machine and is measured
by bench/failover.py, never asserted here. Deadlines in these tests only
keep a hang from lasting until the suite's timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_image.app import ServeImage
from serve_image.settings import Settings, settings_from_mapping
from serve_image.storage import make_layout
from serve_image.storage.drivers.failover import Failover
from tests.conftest import DatabaseFactory
from tests.dbservers import MariaDB, PostgreSQL, Server
from tests.helpers import (
    DEADLINE,
    IMG,
    Locker,
    SpyLayout,
    free_port,
    md5,
    payload,
    running,
    store,
    until,
)
from tests.live import (
    SERVER_NAMES,
    RawClient,
    call,
    live_server,
    start_serve,
    stop,
    uvicorn_server,
    wait_serving,
)

pytestmark = pytest.mark.slow

SMALL = f"{IMG}/small.jpg"
WHICH = f"{IMG}/which.txt"
BIG = f"{IMG}/big.jpg"
SMALL_DATA = payload(3000, seed=1)
SMALL_HASH = md5(SMALL)
BIG_SIZE = 8 * 1024 * 1024
BIG_DATA = payload(BIG_SIZE, seed=2)
# Another version of it on each server of a two-host site (see _fill).
STREAM = f"{IMG}/stream.bin"
STREAM_SIZE = 2 * 1024 * 1024


def stream_data(which: bytes) -> bytes:
    return payload(STREAM_SIZE, seed=len(which) + 10)


# -- servers of our own ---------------------------------------------------------
@pytest.fixture(scope="module", params=["mysql", "pgsql"])
def own_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    server: Server = MariaDB() if request.param == "mysql" else PostgreSQL()
    server.start()
    yield server
    server.stop()


def _backend_of(server: Server) -> str:
    return "mysql" if isinstance(server, MariaDB) else "pgsql"


async def _create_db(backend: str, port: int, name: str) -> None:
    if backend == "mysql":
        import aiomysql

        conn = await aiomysql.connect(host="127.0.0.1", port=port, user="root", password="")
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        conn.close()
    else:
        import asyncpg

        pg = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                   database="postgres")
        await pg.execute(f'CREATE DATABASE "{name}"')
        await pg.close()


async def _fill(settings: Settings, which: bytes) -> None:
    b = make_layout(settings)
    await b.connect()
    try:
        await b.create_tables()
        await store(b, SMALL, SMALL_DATA)
        await store(b, WHICH, which, datatype="text/plain")
        await store(b, STREAM, stream_data(which), mtime=1_700_000_000 + len(which))
    finally:
        await b.close()


async def _two_host_site(
    databases: DatabaseFactory, own: Server, second: str | None = None
) -> Settings:
    """A site on [own server, this machine's server] (or [own, `second`]), same rows on both.

    `which.txt` holds the name of the server it was read from.
    """
    backend = _backend_of(own)
    main = await databases.constants(backend, STORAGE_CHUNK_SIZE=65535)
    name = main["STORAGE_DB"]
    await _create_db(backend, own.port, name)
    common = {k: v for k, v in main.items() if k not in ("STORAGE_HOST", "STORAGE_PORT")}
    own_only = settings_from_mapping({**common, "STORAGE_PORT": own.port}, "<own>")
    await _fill(own_only, b"own")
    main_addr = f"{main['STORAGE_HOST']}:{main['STORAGE_PORT']}"
    if second is None:
        await _fill(settings_from_mapping(main, "<main>"), b"main")
    return settings_from_mapping(
        {**common, "STORAGE_HOSTS": [f"127.0.0.1:{own.port}", second or main_addr],
         "STORAGE_RETRY_INTERVAL": 0.25, "STORAGE_CONNECT_TIMEOUT": 1},
        "<two hosts>",
    )


async def _start(settings: Settings) -> ServeImage:
    app = ServeImage(settings)
    await app.startup()
    return app


async def test_failover_under_load_then_back(
    databases: DatabaseFactory, own_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Crash the first server under load, with a download in flight: only requests begun
    before the server was put aside may fail (503), every 200 has the right bytes, the
    download is cut off rather than finished from the other server's version, and reads
    go back to the first server once it returns."""
    app = await _start(await _two_host_site(databases, own_server))
    results: list[tuple[float, float, int]] = []  # (start, end, status), wall-clock
    stop_load = asyncio.Event()
    wrong = 0
    workers: list[asyncio.Task[None]] = []

    async def load(c: httpx.AsyncClient) -> None:
        nonlocal wrong
        while not stop_load.is_set():
            t0 = time.time()
            r = await c.get(f"/{SMALL}")
            results.append((t0, time.time(), r.status_code))
            if r.status_code == 200 and r.content != SMALL_DATA:
                wrong += 1

    async def more_results(n: int) -> None:
        target = len(results) + n
        await until(lambda: len(results) >= target, f"{n} more requests")

    in_flight, go_on = asyncio.Event(), asyncio.Event()

    async def hold(_: int, more: bool) -> None:
        if more:
            in_flight.set()
            await go_on.wait()

    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get(f"/{WHICH}")).content == b"own"
            with caplog.at_level(logging.INFO):
                workers += [asyncio.create_task(load(c)) for _ in range(6)]
                await more_results(50)
                # The download has its first chunk out and the rest to read.
                download = asyncio.create_task(call(app, f"/{STREAM}".encode(), on_body=hold))
                await in_flight.wait()
                t_kill = time.time()
                await asyncio.to_thread(own_server.kill)
                go_on.set()
                status, _, body, messages = await asyncio.wait_for(download, DEADLINE)
                await until(lambda: _is(c, WHICH, b"main"), "reads going to the second server")
                await more_results(50)
                await asyncio.to_thread(own_server.start)
                await until(lambda: _is(c, WHICH, b"own"), "reads going back to the first server")
                await more_results(50)
            stop_load.set()
            await asyncio.gather(*workers)
    finally:
        stop_load.set()
        go_on.set()
        await asyncio.gather(*workers, return_exceptions=True)
        await app.shutdown()
    own_label = app.settings.hosts[0].label
    [put_aside] = [r.created for r in caplog.records
                   if r.getMessage().startswith("database unavailable: ") and
                   f"{own_label} is down" in r.getMessage()]
    failed = [r for r in results if r[2] != 200]
    assert wrong == 0
    assert {s for _, _, s in failed} <= {503}
    assert all(t_kill <= end and start <= put_aside for start, end, _ in failed)
    assert len(results) - len(failed) >= 150
    # Cut off after the first chunk: never completed with the other server's bytes.
    assert (status, bytes(body), messages[-1]["more_body"]) == (
        200, stream_data(b"own")[:65535], True)
    assert f"aborted {STREAM} at byte 65535 of {STREAM_SIZE}: " in caplog.text


async def _is(c: httpx.AsyncClient, path: str, content: bytes) -> bool:
    r = await c.get(f"/{path}")
    return r.status_code == 200 and r.content == content


class CountingListener:
    """A server that is down but still answers TCP: it counts each connection and closes it.

    A driver's connect fails on it as on a crashed server, and every connect
    attempt is counted, so "no I/O" is a count, not a timing.
    """

    def __init__(self) -> None:
        self.connects = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connects += 1
            writer.close()

        self.server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_all_servers_down_answers_503_without_trying_them(driver_backend: str) -> None:
    """Every server put aside: each request gets its 503 at once, with no connect attempt
    (the retries are the background prober's, every STORAGE_RETRY_INTERVAL)."""
    kind, driver = DRIVERS[driver_backend]
    first, second = CountingListener(), CountingListener()
    async with first as a, second as b:
        settings = settings_from_mapping(
            {"STORAGE_BACKEND": kind, "STORAGE_DB": "x", "STORAGE_HOSTS": [a, b],
             "STORAGE_RETRY_INTERVAL": 600, **driver}, "<down>")
        async with running(ServeImage(settings)) as c:
            # The start-up check tried each server once and put both aside.
            assert (first.connects, second.connects) == (1, 1)
            for _ in range(10):  # 10 bursts of 20 concurrent requests
                for r in await asyncio.gather(*(c.get(f"/{SMALL}") for _ in range(20))):
                    assert r.status_code == 503
                    assert r.headers["retry-after"] == "5"
                    assert r.text == "503 Service Unavailable\n"
            health = await c.get("/-/health")
            assert (health.status_code, health.text) == (503, "database unavailable\n")
            assert (first.connects, second.connects) == (1, 1)


async def test_all_servers_down_then_recovery(
    databases: DatabaseFactory, own_server: Server
) -> None:
    """Every server down: 503 with Retry-After; served again once one returns."""
    dead = f"127.0.0.1:{free_port()}"
    app = ServeImage(await _two_host_site(databases, own_server, second=dead))
    async with running(app) as c:
        assert (await c.get(f"/{SMALL}")).status_code == 200
        await asyncio.to_thread(own_server.kill)
        r = await c.get(f"/{SMALL}")  # finds both servers down
        assert (r.status_code, r.headers["retry-after"]) == (503, "5")
        assert (await c.get("/-/health")).status_code == 503
        await asyncio.to_thread(own_server.start)
        await until(lambda: _is(c, SMALL, SMALL_DATA), "served again")
        assert (await c.get("/-/health")).status_code == 200
        assert app.layout.driver.failover.status()[0][1] is True  # type: ignore[attr-defined]


async def test_single_host_settings_still_work(databases: DatabaseFactory, backend: str) -> None:
    """STORAGE_HOST/STORAGE_PORT alone: one server, the same failover bookkeeping."""
    settings = await databases.settings(backend)
    b = make_layout(settings)
    assert isinstance(getattr(b.driver, "failover", None), Failover)
    await b.connect()
    try:
        await b.create_tables()
        await store(b, SMALL, SMALL_DATA)
        got = await b.first(SMALL_HASH)
        assert got is not None and got[1] == SMALL_DATA
        assert b.driver.failover.status() == [(f"{settings.host}:{settings.port}", True)]  # type: ignore[attr-defined]
    finally:
        await b.close()


@pytest.fixture(params=["mysql", "pgsql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# The failure paths depend on each driver's error classes: the MySQL ones run
# on asyncmy (the default) and on STORAGE_DRIVER = "aiomysql" alike.
DRIVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "mysql": ("mysql", {}),
    "mysql-aiomysql": ("mysql", {"STORAGE_DRIVER": "aiomysql"}),
    "pgsql": ("pgsql", {}),
}


@pytest.fixture(params=list(DRIVERS))
def driver_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- killed connections, on this machine's servers ------------------------------
async def _big_site(databases: DatabaseFactory, backend: str, **extra: Any) -> Settings:
    """`backend` is a key of DRIVERS, or "sqlite"."""
    kind, driver = DRIVERS.get(backend, (backend, {}))
    settings = await databases.settings(kind, STORAGE_CHUNK_SIZE=65535, **driver, **extra)
    b = make_layout(settings)
    await b.connect()
    try:
        await b.create_tables()
        await store(b, BIG, BIG_DATA)
        await store(b, SMALL, SMALL_DATA)
    finally:
        await b.close()
    return settings


@pytest.fixture(scope="module")
async def big_sites(databases: DatabaseFactory) -> dict[str, Settings]:
    """One database per server with an 8 MiB file, for the tests that do not change it."""
    return {b: await _big_site(databases, b) for b in DRIVERS}


async def test_connection_killed_mid_stream_aborts_that_response(
    big_sites: dict[str, Settings], driver_backend: str
) -> None:
    settings = big_sites[driver_backend]
    app = await _start(settings)
    locker = Locker(settings.backend, settings)
    try:
        async with live_server(app) as port:
            client = await RawClient.get(port, f"/{BIG}")
            assert client.status == 200
            assert client.length == BIG_SIZE
            await client.read(65536)
            await locker.lock()
            # Drain what the server already read; its next batch waits on the lock.
            reader = asyncio.create_task(client.read_all())
            ids = await locker.wait_blocked()
            await locker.kill(ids[0])
            await locker.unlock()
            await asyncio.wait_for(reader, DEADLINE)
            client.close()
            # Cut off, never completed with other bytes.
            assert 0 < len(client.body) < BIG_SIZE
            assert bytes(client.body) == BIG_DATA[:len(client.body)]
            # Every other request is still served, whole.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                r = await c.get(f"/{BIG}")
                assert r.status_code == 200
                assert r.content == BIG_DATA
        # One killed connection does not put a healthy server aside.
        assert app.layout.driver.failover.status() == [  # type: ignore[attr-defined]
            (f"{settings.host}:{settings.port}", True)]
    finally:
        await locker.unlock()  # a failed test must not leave the table locked
        await app.shutdown()


async def test_query_timeout_after_the_headers_cuts_the_response_off(
    big_sites: dict[str, Settings], driver_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """STORAGE_QUERY_TIMEOUT mid-stream: the headers are out, so the response is cut off."""
    base = big_sites[driver_backend]
    settings = dataclasses.replace(base, query_timeout=0.5)
    app = await _start(settings)
    locker = Locker(settings.backend, settings)
    try:
        async with uvicorn_server(app) as port:
            client = await RawClient.get(port, f"/{BIG}")
            assert (client.status, client.length) == (200, BIG_SIZE)
            await client.read(65536)
            await locker.lock()
            with caplog.at_level(logging.WARNING):
                reader = asyncio.create_task(client.read_all())
                await locker.wait_blocked()  # the next batch waits on the lock, then times out
                await asyncio.wait_for(reader, DEADLINE)
            await locker.unlock()
            client.close()
            assert 0 < len(client.body) < BIG_SIZE
            assert bytes(client.body) == BIG_DATA[:len(client.body)]
            assert "query timed out" in caplog.text
            assert f"aborted {BIG} at byte {len(client.body)} of {BIG_SIZE}: database lost: " \
                in caplog.text
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                r = await c.get(f"/{BIG}")
                assert (r.status_code, r.content == BIG_DATA) == (200, True)
        # A slow query is not a server down.
        assert app.layout.driver.failover.status() == [  # type: ignore[attr-defined]
            (f"{settings.host}:{settings.port}", True)]
    finally:
        await locker.unlock()
        await app.shutdown()


async def test_connection_killed_before_first_byte_is_retried(
    big_sites: dict[str, Settings], driver_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = big_sites[driver_backend]
    app = ServeImage(settings)
    locker = Locker(settings.backend, settings)
    async with running(app) as c:
        try:
            await locker.lock()
            request = asyncio.create_task(c.get(f"/{SMALL}"))
            with caplog.at_level(logging.WARNING, "serve_image.failover"):
                ids = await locker.wait_blocked()
                await locker.kill(ids[0])
                await locker.unlock()
                r = await asyncio.wait_for(request, DEADLINE)
            assert r.status_code == 200
            assert r.content == SMALL_DATA
            assert [rec.message.startswith("query failed") for rec in caplog.records] == [True]
            # One killed connection does not put a healthy server aside.
            assert app.layout.driver.failover.status() == [  # type: ignore[attr-defined]
                (f"{settings.host}:{settings.port}", True)]
        finally:
            await locker.unlock()  # before the pools close


async def test_pool_exhausted_is_bounded_503(
    databases: DatabaseFactory, driver_backend: str
) -> None:
    settings = await _big_site(
        databases, driver_backend, STORAGE_POOL_SIZE=1, STORAGE_ACQUIRE_TIMEOUT=0.3
    )
    app = ServeImage(settings)
    locker = Locker(settings.backend, settings)
    async with running(app) as c:
        try:
            await locker.lock()
            holder = asyncio.create_task(c.get(f"/{SMALL}"))  # takes the one connection
            await locker.wait_blocked()
            t0 = time.monotonic()
            r = await asyncio.wait_for(c.get(f"/{SMALL}"), DEADLINE)
            waited = time.monotonic() - t0
            assert r.status_code == 503
            assert r.headers["retry-after"] == "5"
            assert waited > 0.25  # it waited for a connection (the acquire timeout), then 503
            # Busy is not down: the server is not put aside.
            assert app.layout.driver.failover.status()[0][1] is True  # type: ignore[attr-defined]
            await locker.unlock()
            held = await asyncio.wait_for(holder, DEADLINE)
            assert held.status_code == 200
            assert held.content == SMALL_DATA
        finally:
            await locker.unlock()  # before the pools close


async def test_read_that_never_answers_is_a_bounded_503(
    databases: DatabaseFactory, driver_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """STORAGE_QUERY_TIMEOUT: a read stuck on the server (here a lock) never holds the request."""
    settings = await _big_site(databases, driver_backend, STORAGE_QUERY_TIMEOUT=0.3)
    app = ServeImage(settings)
    locker = Locker(settings.backend, settings)
    async with running(app) as c:
        try:
            await locker.lock()
            t0 = time.monotonic()
            with caplog.at_level(logging.WARNING, "serve_image.failover"):
                r = await asyncio.wait_for(c.get(f"/{SMALL}"), DEADLINE)  # the lock is never let go
            waited = time.monotonic() - t0
            assert r.status_code == 503
            assert r.headers["retry-after"] == "5"
            assert waited > 0.25
            # The timeout once: a timed-out read is not tried again.
            assert [rec.message.split(":")[0] for rec in caplog.records] == ["query timed out"]
            # A stuck query is not a server down: it is not put aside.
            assert app.layout.driver.failover.status()[0][1] is True  # type: ignore[attr-defined]
            await locker.unlock()
            r = await c.get(f"/{SMALL}")
            assert (r.status_code, r.content) == (200, SMALL_DATA)
        finally:
            await locker.unlock()  # before the pools close


@pytest.mark.parametrize("server", SERVER_NAMES)
async def test_slow_clients_do_not_starve_quick_ones(
    big_sites: dict[str, Settings], backend: str, server: str
) -> None:
    """12 slow downloads on a pool of 2: a connection is held per query, never per client."""
    settings = settings_from_mapping(
        {"STORAGE_BACKEND": backend, "STORAGE_HOST": big_sites[backend].host,
         "STORAGE_PORT": big_sites[backend].port, "STORAGE_USER": big_sites[backend].user,
         "STORAGE_DB": big_sites[backend].database, "STORAGE_POOL_SIZE": 2,
         "STORAGE_ACQUIRE_TIMEOUT": 0.5},
        "<slow>",
    )
    app = await _start(settings)
    try:
        async with live_server(app, server) as port:
            slow = [await RawClient.get(port, f"/{BIG}", rcvbuf=4096) for _ in range(12)]
            readers = [asyncio.create_task(s.read_all(pause=0.05, step=4096)) for s in slow]
            statuses = []
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                for _ in range(5):
                    rs = await asyncio.gather(*(c.get(f"/{SMALL}") for _ in range(10)))
                    statuses += [r.status_code for r in rs]
                    assert all(r.content == SMALL_DATA for r in rs)
            assert all(not r.done() for r in readers)  # still downloading
            for r in readers:
                r.cancel()
            for s in slow:
                s.close()
        assert statuses == [200] * 50
    finally:
        await app.shutdown()


@pytest.mark.parametrize("server", SERVER_NAMES)
@pytest.mark.parametrize("backend_kind", ["sqlite", "mysql", "pgsql"])
async def test_client_disconnect_stops_reads_and_frees_connections(
    databases: DatabaseFactory, big_sites: dict[str, Settings], backend_kind: str, server: str
) -> None:
    """granian swallows a send to a gone client (granian #650): the app must
    learn of the disconnect from receive(), under either server."""
    if backend_kind == "sqlite":
        settings = await _big_site(databases, "sqlite")
    else:
        settings = big_sites[backend_kind]
    spy = SpyLayout(make_layout(settings, readonly=True))
    app = ServeImage(settings, layout=spy)
    finished = asyncio.Event()

    async def tracked(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        finally:
            finished.set()

    await app.startup()
    try:
        async with live_server(tracked, server) as port:
            client = await RawClient.get(port, f"/{BIG}", rcvbuf=4096)
            await client.read(100_000)
            client.close()
            # The response ends (the app returns) without reading the rest of the file.
            await asyncio.wait_for(finished.wait(), DEADLINE)
            batches = BIG_SIZE // (4 * 65535) + 1
            assert 0 < spy.chunk_reads < batches // 2
            failover = getattr(spy.inner.driver, "failover", None)
            if failover is not None:
                assert [h.pool.in_use() for h in failover.hosts] == [0]
    finally:
        await app.shutdown()


# How each server ends after a SIGTERM once its shutdown is complete:
# uvicorn re-raises the signal it caught, granian exits 0.
SIGTERM_EXIT = {"uvicorn": -signal.SIGTERM, "granian": 0}


@pytest.mark.parametrize("server", SERVER_NAMES)
async def test_sigterm_finishes_download_in_flight_and_closes_pools(
    big_sites: dict[str, Settings], tmp_path: Path, server: str
) -> None:
    s = big_sites["mysql"]
    site = tmp_path / "graceful.py"
    site.write_text(
        f'STORAGE_BACKEND = "mysql"\nSTORAGE_HOST = {s.host!r}\nSTORAGE_PORT = {s.port}\n'
        f'STORAGE_USER = {s.user!r}\nSTORAGE_DB = {s.database!r}\n'
    )
    port = free_port()
    log = tmp_path / "server.log"
    proc = start_serve(["serve", "--site", str(site), "--port", str(port), "--server", server],
                       log)
    try:
        assert await asyncio.to_thread(wait_serving, proc, port, log) == 200
        client = await RawClient.get(port, f"/{BIG}", rcvbuf=4096)
        await client.read(65536)
        proc.send_signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return True
            writer.close()
            return False

        # No new connections once shutting down, while the download goes on.
        await until(refused, "new connections refused")
        assert proc.poll() is None
        await asyncio.wait_for(client.read_all(), DEADLINE)
        client.close()
        assert bytes(client.body) == BIG_DATA
        code = await asyncio.to_thread(proc.wait, DEADLINE)
    finally:
        await asyncio.to_thread(stop, proc)
    text = log.read_text()
    assert code == SIGTERM_EXIT[server], text
    assert "database pools closed" in text


# -- settings -------------------------------------------------------------------------
def test_storage_hosts_are_parsed_in_order() -> None:
    s = settings_from_mapping({
        "STORAGE_BACKEND": "pgsql", "STORAGE_DB": "x",
        "STORAGE_HOSTS": ["db1", "db2:5433", "[::1]:5434", {"socket": "/run/postgresql"}],
    }, "sites/a.py")
    assert [(h.host, h.port, h.socket) for h in s.hosts] == [
        ("db1", 5432, None), ("db2", 5433, None), ("::1", 5434, None),
        ("127.0.0.1", 5432, "/run/postgresql"),
    ]
    assert s.describe() == "pgsql://@db1:5432,db2:5433,[::1]:5434,/run/postgresql/x"


@pytest.mark.parametrize(("extra", "message"), [
    ({"STORAGE_HOSTS": ["db1"], "STORAGE_HOST": "db0"},
     "sites/a.py: STORAGE_HOSTS and STORAGE_HOST are both set: "
     "list every server in STORAGE_HOSTS alone"),
    ({"STORAGE_HOSTS": ["db1"], "STORAGE_PORT": 3306},
     "sites/a.py: STORAGE_HOSTS and STORAGE_PORT are both set: "
     "list every server in STORAGE_HOSTS alone"),
    ({"STORAGE_HOSTS": "db1:3306"},
     'sites/a.py: STORAGE_HOSTS must be a non-empty list such as ["db1:3306", "db2:3306"]'),
    ({"STORAGE_HOSTS": []},
     'sites/a.py: STORAGE_HOSTS must be a non-empty list such as ["db1:3306", "db2:3306"]'),
    ({"STORAGE_HOSTS": ["db1:70000"]},
     "sites/a.py: STORAGE_HOSTS port must be from 1 to 65535 in 'db1:70000'"),
    ({"STORAGE_HOSTS": [{"host": "db1", "pass": "x"}]},
     "sites/a.py: STORAGE_HOSTS entries may have host, port and socket, not ['pass']"),
    ({"STORAGE_RETRY_INTERVAL": 0},
     "sites/a.py: STORAGE_RETRY_INTERVAL must be a number of seconds above 0 and at most 600"),
    ({"STORAGE_BACKEND": "sqlite", "STORAGE_HOSTS": ["db1"]},
     "sites/a.py: STORAGE_HOSTS is for the mysql and pgsql backends, not sqlite"),
])
def test_storage_hosts_errors_name_file_and_constants(extra: dict[str, Any], message: str) -> None:
    from serve_image.settings import SiteConfigError

    with pytest.raises(SiteConfigError) as e:
        settings_from_mapping({"STORAGE_BACKEND": "mysql", "STORAGE_DB": "x", **extra},
                              "sites/a.py")
    assert str(e.value) == message


@pytest.mark.parametrize("backend_name", ["mysql", "pgsql"])
async def test_connect_timeout_decides_a_new_connection(backend_name: str) -> None:
    """Regression: the whole acquire was bounded by STORAGE_ACQUIRE_TIMEOUT, so a
    STORAGE_CONNECT_TIMEOUT above it never applied to a server slow to greet."""
    accepted: list[asyncio.StreamWriter] = []

    async def never_greet(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(never_greet, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings = settings_from_mapping(
        {"STORAGE_BACKEND": backend_name, "STORAGE_HOST": "127.0.0.1", "STORAGE_PORT": port,
         "STORAGE_DB": "x", "STORAGE_CONNECT_TIMEOUT": 1.5, "STORAGE_ACQUIRE_TIMEOUT": 0.2},
        "<silent>",
    )
    app = ServeImage(settings)
    await app.layout.connect()  # no start-up ping: the request makes the first connect
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            t0 = time.monotonic()
            r = await asyncio.wait_for(c.get(f"/{SMALL}"), DEADLINE)
            waited = time.monotonic() - t0
        assert r.status_code == 503
        assert waited > 1.2  # STORAGE_CONNECT_TIMEOUT (1.5 s), not the acquire timeout (0.2 s)
    finally:
        await app.shutdown()
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()
