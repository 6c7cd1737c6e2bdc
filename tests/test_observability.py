"""Access log lines and Prometheus metrics: off by default, exact when on."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_image.app import ServeImage
from serve_image.settings import Settings, settings_from_mapping
from serve_image.storage import Layout
from tests.helpers import IMG, Locker, free_port, payload, running, store, until
from tests.live import SERVER_NAMES, call, start_serve, stop, wait_serving

DATA = payload(2500, seed=3)
A = f"/{IMG}/a.jpg"


@pytest.fixture
async def observed(settings: Settings, writer: Layout, request: pytest.FixtureRequest
                   ) -> AsyncIterator[tuple[ServeImage, httpx.AsyncClient]]:
    await store(writer, A[1:], DATA)
    changes = getattr(request, "param", {})
    app = ServeImage(dataclasses.replace(settings, **changes))
    async with running(app) as c:
        yield app, c


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "serve_image.access"]


async def test_off_by_default_nothing_wraps_a_request(
    observed: tuple[ServeImage, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    app, c = observed
    assert app.observer is None
    failover = getattr(app.layout.driver, "failover", None)  # SQLite has none
    assert failover is None or failover.observer is None
    with caplog.at_level(logging.DEBUG):
        assert (await c.get(A)).status_code == 200
    assert access_lines(caplog) == []
    assert (await c.get("/-/metrics")).status_code == 404


@pytest.mark.parametrize("observed", [{"access_log": "json"}], indirect=True)
async def test_json_access_log_one_line_per_request(
    observed: tuple[ServeImage, httpx.AsyncClient], caplog: pytest.LogCaptureFixture,
    settings: Settings,
) -> None:
    _, c = observed
    with caplog.at_level(logging.INFO, "serve_image.access"):
        await c.get(A)
        await c.get(A, headers={"range": "bytes=0-9"})
        await c.get(f"/{IMG}/missing.jpg")
        await c.head(A)
    lines = [json.loads(line) for line in access_lines(caplog)]
    assert [(x["method"], x["path"], x["status"], x["bytes"]) for x in lines] == [
        ("GET", A, 200, len(DATA)), ("GET", A, 206, 10),
        ("GET", f"/{IMG}/missing.jpg", 404, len(b"404 Not Found\n")), ("HEAD", A, 200, 0),
    ]
    host = None if settings.backend == "sqlite" else f"{settings.host}:{settings.port}"
    assert {x["db_host"] for x in lines} == {host}
    assert {x["backend"] for x in lines} == {settings.backend}
    assert all(x["complete"] is True and x["duration_ms"] >= 0 for x in lines)


@pytest.mark.parametrize("observed", [{"access_log": "json"}], indirect=True)
async def test_access_log_duration_is_milliseconds_to_the_last_byte(
    observed: tuple[ServeImage, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that takes its last bytes 0.2 s late: the line says at least 200 ms, and
    no more than the test saw from outside."""
    app, _ = observed
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": A, "raw_path": A.encode(),
             "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if asked:
            await asyncio.Event().wait()  # never disconnects
        asked = True
        return {"type": "http.request", "body": b"", "more_body": False}

    body = bytearray()

    async def send(message: dict[str, Any]) -> None:
        body.extend(message.get("body", b""))
        if message["type"] == "http.response.body" and not message.get("more_body"):
            await asyncio.sleep(0.2)

    with caplog.at_level(logging.INFO, "serve_image.access"):
        started = time.perf_counter()
        await app(scope, receive, send)
        outside_ms = (time.perf_counter() - started) * 1000
    [entry] = [json.loads(line) for line in access_lines(caplog)]
    assert bytes(body) == DATA
    assert (entry["status"], entry["bytes"], entry["complete"]) == (200, len(DATA), True)
    assert 200 <= entry["duration_ms"] <= outside_ms



@pytest.mark.parametrize("observed", [{"access_log": "json"}], indirect=True)
async def test_batched_requests_name_the_server_that_answered(
    observed: tuple[ServeImage, httpx.AsyncClient], caplog: pytest.LogCaptureFixture,
    settings: Settings, writer: Layout,
) -> None:
    """Regression: a request whose row came from a shared query (batching.py, run in a task
    of its own) was logged with `db_host` null."""
    _, c = observed
    tiny = f"{IMG}/tiny.jpg"  # one chunk: the shared query is the request's only one
    await store(writer, tiny, b"t" * 500)
    with caplog.at_level(logging.INFO, "serve_image.access"):
        answers = await asyncio.gather(*(c.get(f"/{tiny}") for _ in range(20)))
    assert {(r.status_code, r.content) for r in answers} == {(200, b"t" * 500)}
    lines = [json.loads(line) for line in access_lines(caplog)]
    host = None if settings.backend == "sqlite" else f"{settings.host}:{settings.port}"
    assert [x["db_host"] for x in lines] == [host] * 20


@pytest.mark.parametrize("observed", [{"access_log": "text"}], indirect=True)
async def test_text_access_log_stays_one_line_whatever_the_path(
    observed: tuple[ServeImage, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = observed
    raw = b"/var/site/storage/images/\x1b[31m\r\nforged 200 line"
    with caplog.at_level(logging.INFO, "serve_image.access"):
        await call(app, raw)
    [line] = access_lines(caplog)
    assert line.startswith("GET /var/site/storage/images/\\x1b[31m\\x0d\\x0aforged\\x20200")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert " 400 16 " in line  # "400 Bad Request\n"


@pytest.mark.parametrize("observed", [{"access_log": "json"}], indirect=True)
async def test_access_log_marks_a_cut_off_response(
    observed: tuple[ServeImage, httpx.AsyncClient], caplog: pytest.LogCaptureFixture,
    writer: Layout,
) -> None:
    app, _ = observed
    big = payload(5000, seed=4)
    await store(writer, f"{IMG}/broken.jpg", big)
    await writer.driver.execute('DELETE FROM ezdbfile_data WHERE "offset" > 0')
    with caplog.at_level(logging.INFO, "serve_image.access"):
        status, _, body, messages = await call(app, f"/{IMG}/broken.jpg".encode())
    assert (status, len(body)) == (200, 1000)
    assert messages[-1]["more_body"] is True  # never finished: the server cuts the connection
    [entry] = [json.loads(line) for line in access_lines(caplog)]
    assert (entry["status"], entry["bytes"], entry["complete"]) == (200, 1000, False)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize("observed", [{"metrics_path": "/-/metrics"}], indirect=True)
async def test_metrics_count_requests_bytes_latency_and_queries(
    observed: tuple[ServeImage, httpx.AsyncClient], settings: Settings
) -> None:
    _, c = observed
    for headers in ({}, {}, {"range": "bytes=0-99"}):
        await c.get(A, headers=headers)
    await c.get(f"/{IMG}/missing.jpg")
    r = await c.get("/-/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    m = samples(r.text)
    assert m[("serve_image_requests_total", (("status", "200"),))] == 2
    assert m[("serve_image_requests_total", (("status", "206"),))] == 1
    assert m[("serve_image_requests_total", (("status", "404"),))] == 1
    assert m[("serve_image_response_bytes_total", ())] == 2 * len(DATA) + 100 + 14
    assert m[("serve_image_request_duration_seconds_count", ())] == 4
    if settings.backend != "sqlite":
        host = (("host", f"{settings.host}:{settings.port}"),)
        # start-up ping; each GET of 2500 bytes in 1000-byte chunks: the row
        # with its first chunk, then the rest; the range: row, then chunk; the 404: 1.
        assert m[("serve_image_db_query_duration_seconds_count", host)] == 8
        assert m[("serve_image_db_connections_in_use", host)] == 0
        assert m[("serve_image_db_connections_waiting", host)] == 0
        assert m[("serve_image_db_host_up", host)] == 1
    assert not [k for k in m if k[0].startswith("serve_image_cache")]  # no hot cache


@pytest.mark.parametrize(
    "observed", [{"metrics_path": "/-/metrics", "cache_max_bytes": 1 << 20}], indirect=True
)
async def test_metrics_count_hot_cache_hits_and_misses(
    observed: tuple[ServeImage, httpx.AsyncClient], writer: Layout
) -> None:
    _, c = observed
    small = f"/{IMG}/small.jpg"
    await store(writer, small[1:], b"x" * 100)
    assert (await c.get(small)).status_code == 200  # miss: read, then kept with its bytes
    assert (await c.get(small)).content == b"x" * 100  # hit
    # A is 2,500 bytes in three chunks: only its row is kept.
    assert (await c.get(A, headers={"if-none-match": '"other"'})).status_code == 200  # miss
    assert (await c.get(A)).content == DATA  # miss: a whole GET needs the bytes
    assert (await c.get(A, headers={"range": "bytes=0-9"})).status_code == 206  # hit: the row
    m = samples((await c.get("/-/metrics")).text)
    assert m[("serve_image_cache_lookups_total", (("result", "hit"),))] == 2
    assert m[("serve_image_cache_lookups_total", (("result", "miss"),))] == 3


@pytest.mark.parametrize("backend_name", ["mysql", "pgsql"])
async def test_metrics_show_a_server_put_aside(settings: Settings, writer: Layout) -> None:
    await store(writer, A[1:], DATA)
    dead = f"127.0.0.1:{free_port()}"
    live = f"{settings.host}:{settings.port}"
    two = settings_from_mapping(
        {"STORAGE_BACKEND": settings.backend, "STORAGE_USER": settings.user,
         "STORAGE_DB": settings.database, "STORAGE_HOSTS": [dead, live],
         "METRICS_PATH": "/-/metrics", "STORAGE_RETRY_INTERVAL": 60},
        "<two>",
    )
    async with running(ServeImage(two)) as c:
        r = await c.get(A)
        assert (r.status_code, r.content) == (200, DATA)
        m = samples((await c.get("/-/metrics")).text)
    assert m[("serve_image_db_host_up", (("host", dead),))] == 0
    assert m[("serve_image_db_host_up", (("host", live),))] == 1


@pytest.mark.parametrize("server", SERVER_NAMES)
async def test_metrics_and_access_log_over_several_workers(tmp_path: Path, server: str) -> None:
    """Two worker processes; every scrape, whichever worker answers, shows all,
    and each worker writes its ACCESS_LOG lines."""
    from serve_image.storage import make_layout

    db = tmp_path / "w.sqlite"
    site = tmp_path / "workers.py"
    site.write_text(
        f'STORAGE_DB = {str(db)!r}\nMETRICS_PATH = "/-/metrics"\nACCESS_LOG = "json"\n'
        "MAX_CONNECTIONS = 300\n"
    )
    b = make_layout(settings_from_mapping({"STORAGE_DB": str(db)}, "<w>"))
    await b.connect()
    await b.create_tables()
    await store(b, A[1:], DATA)
    await b.close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - the server for the whole test
            [sys.executable, "-m", "serve_image", "serve", "--site", str(site),
             "--port", str(port), "--workers", "2", "--server", server],
            stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
        )
    try:
        base = f"http://127.0.0.1:{port}"
        health = 0  # the health checks answered 200: counted too
        for _ in range(300):
            try:
                async with httpx.AsyncClient() as c:
                    health += (await c.get(f"{base}/-/health")).status_code == 200
                break
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        for _ in range(20):  # a new connection each time: both workers answer some
            async with httpx.AsyncClient() as c:
                assert (await c.get(f"{base}{A}")).status_code == 200
        totals = []
        for _ in range(4):
            async with httpx.AsyncClient() as c:
                m = samples((await c.get(f"{base}/-/metrics")).text)
            totals.append(m[("serve_image_requests_total", (("status", "200"),))])
        # Two workers, each allowed MAX_CONNECTIONS: the node takes twice that.
        assert m[("serve_image_connections_limit", ())] == 600
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)
    # 20 files and the health checks' 200s, and the scrapes before each one.
    assert totals == [20 + health + i for i in range(4)]
    log = (tmp_path / "log").read_text()
    entries = [json.loads(line.partition("serve_image.access: ")[2])
               for line in log.splitlines() if "serve_image.access: " in line]
    assert [e["path"] for e in entries if e["path"] == A] == [A] * 20
    assert {e["status"] for e in entries} == {200}
    # ACCESS_LOG is the access log: the server's own stays off, even at --log-level info.
    assert "database pools closed" in log
    assert "HTTP/1.1\" 200" not in log


def by_pid(directory: Path, kind: str, name: str, labels: dict[str, str]) -> dict[int, float]:
    """One sample as each worker wrote it in the multiprocess directory: pid -> value.

    `kind`: the files' prefix, "counter" or "gauge_livesum".
    """
    from prometheus_client.multiprocess import MultiProcessCollector

    out = {}
    for path in directory.glob(f"{kind}_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        values = [s.value for m in MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
                  for s in m.samples if s.name == name and s.labels == labels]
        out[pid] = sum(values)
    return out


def live_workers(directory: Path) -> set[int]:
    """Workers whose gauges are in the directory (each writes its host_up at start-up)."""
    return {int(p.stem.rsplit("_", 1)[1]) for p in directory.glob("gauge_livemin_*.db")}


@pytest.mark.parametrize("backend_name", ["mysql", "pgsql"])
async def test_metrics_add_up_over_several_workers_and_forget_a_killed_one(
    settings: Settings, writer: Layout, tmp_path: Path
) -> None:
    """Two uvicorn workers on [a server down, this machine's]: every scrape, whichever
    worker answers it, adds up both; a worker killed mid-query leaves its counts in the
    totals and takes its gauges with it."""
    await store(writer, A[1:], DATA)
    dead = f"127.0.0.1:{free_port()}"
    live = f"{settings.host}:{settings.port}"
    site = tmp_path / "workers.py"
    constants = {
        "STORAGE_BACKEND": settings.backend, "STORAGE_USER": settings.user,
        "STORAGE_PASS": settings.password, "STORAGE_DB": settings.database,
        "STORAGE_HOSTS": [dead, live], "STORAGE_CHUNK_SIZE": 1000,
        "METRICS_PATH": "/-/metrics",
        # The dead server stays put aside, and a read blocked on a lock stays blocked.
        "STORAGE_RETRY_INTERVAL": 600, "STORAGE_QUERY_TIMEOUT": 600,
    }
    site.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    metrics_dir = tmp_path / "metrics"  # the test's own: serve-image uses it as it is
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "log"
    proc = start_serve(["serve", "--site", str(site), "--port", str(port), "--workers", "2"],
                       log, env=env)
    ok = 0  # 200s answered so far; each is counted by the worker that answered it
    requests_200 = ("serve_image_requests_total", {"status": "200"})

    def answered() -> dict[int, float]:
        return {p: n for p, n in by_pid(metrics_dir, "counter", *requests_200).items() if n}

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        nonlocal ok
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{base}/-/metrics")
        assert r.status_code == 200
        ok += 1
        return samples(r.text)

    async def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """A scrape once every earlier 200 is counted (a worker counts after the last byte)."""
        for _ in range(200):
            expected = ok
            m = await scrape()
            if m[("serve_image_requests_total", (("status", "200"),))] == expected:
                return m
            await asyncio.sleep(0.05)
        raise AssertionError(f"the 200s never added up to {ok}: {m}")

    locker = Locker(settings.backend, settings)
    try:
        assert await asyncio.to_thread(wait_serving, proc, port, log) == 200
        ok += 1
        workers = await until(lambda: len(live_workers(metrics_dir)) == 2 and
                              live_workers(metrics_dir), "two workers started")
        # A new connection for each request, until both workers have answered some.
        for _ in range(500):
            async with httpx.AsyncClient() as c:
                r = await c.get(f"{base}{A}")
            assert (r.status_code, r.content) == (200, DATA)
            ok += 1
            if len(answered()) == 2:
                break
        assert set(answered()) == workers  # two processes answered

        m = await settled()
        # Per worker, the same 200s (the last scrape's own once its worker counts it).
        await until(lambda: sum(answered().values()) == ok, f"the workers' 200s adding up to {ok}")
        host = {h: (("host", h),) for h in (dead, live)}
        # Each worker put the dead server aside at start-up; both use the live one.
        assert m[("serve_image_db_host_up", host[dead])] == 0
        assert m[("serve_image_db_host_up", host[live])] == 1
        assert m[("serve_image_db_connections_in_use", host[live])] == 0
        assert m[("serve_image_db_connections_waiting", host[live])] == 0

        # A read held by a lock: its worker holds a connection until it is killed.
        await locker.lock()

        async def stuck_get() -> None:
            async with httpx.AsyncClient(timeout=600) as c:
                await c.get(f"{base}{A}")

        stuck = asyncio.create_task(stuck_get())
        await locker.wait_blocked()
        m = await scrape()
        assert m[("serve_image_db_connections_in_use", host[live])] == 1
        in_use = by_pid(metrics_dir, "gauge_livesum",
                        "serve_image_db_connections_in_use", {"host": live})
        [victim] = [pid for pid, n in in_use.items() if n == 1]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(httpx.TransportError):
            await stuck
        await locker.unlock()

        # uvicorn starts a worker in its place (the supervisor checks every 0.5 s).
        workers = await until(
            lambda: (w := live_workers(metrics_dir) - {victim}) and len(w) == 2 and w,
            "a new worker in the killed one's place")
        m = await scrape()
        assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db"))
        assert live_workers(metrics_dir) == workers
        assert m[("serve_image_db_connections_in_use", host[live])] == 0
        assert m[("serve_image_db_host_up", host[dead])] == 0
        assert m[("serve_image_db_host_up", host[live])] == 1
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{base}{A}")
        assert (r.status_code, r.content) == (200, DATA)
        ok += 1
        # The killed worker's 200s still count; the request it died on never got one.
        m = await settled()
        assert answered()[victim] > 0
    finally:
        await locker.unlock()
        code = await asyncio.to_thread(stop, proc)
    output = log.read_text()
    assert code == 0, output
    assert f"Child process [{victim}] died" in output
    # ACCESS_LOG is the access log: uvicorn's own stays off, even at --log-level info.
    assert "Application startup complete" in output
    assert f"GET {A}" not in output
    assert "GET /-/metrics" not in output



@pytest.mark.parametrize(("extra", "message"), [
    ({"ACCESS_LOG": "xml"}, "sites/a.py: ACCESS_LOG must be None, \"text\" or \"json\", not 'xml'"),
    ({"METRICS_PATH": "/var/site/storage/images/m"},
     "sites/a.py: METRICS_PATH must be None or a path under /-/ such as \"/-/metrics\", "
     "not '/var/site/storage/images/m'"),
    ({"METRICS_PATH": "/-/health"},
     "sites/a.py: METRICS_PATH must not be /-/health, the health check's path"),
])
def test_observability_settings_errors(extra: dict[str, object], message: str) -> None:
    from serve_image.settings import SiteConfigError

    with pytest.raises(SiteConfigError) as e:
        settings_from_mapping({"STORAGE_DB": ":memory:", **extra}, "sites/a.py")
    assert str(e.value) == message
