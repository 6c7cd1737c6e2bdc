"""The benchmark harness: reading wrk's output, figures, ratios and costs; the realistic
data; CPU read from /proc; and small, bounded runs of its parts on real servers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import procfs, realistic
from bench.report import (
    Figures,
    Usage,
    WrkOutputError,
    WrkRun,
    markdown,
    parse_wrk,
    ratios,
    targets,
)
from tests.conftest import DatabaseFactory, server_missing

FIGURES = {"small": "req_s", "large": "mb_s", "realistic": "req_s"}

WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:8000
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.31ms    2.10ms  40.12ms   90.00%
  15000 requests in 3.00s, 150.00MB read
Requests/sec:   5000.00
WRK_JSON {"requests": 15000, "bytes": 157286400, "duration_us": 3000000, \
"errors": {"connect": 0, "read": 1, "write": 0, "status": 2, "timeout": 0}, \
"p50_us": 6100, "p99_us": 18500, "max_us": 40120}
"""


def test_parse_wrk_reads_the_lua_scripts_line() -> None:
    assert parse_wrk(WRK_OUTPUT) == WrkRun(
        requests=15000, bytes=157286400, duration_s=3.0, errors=3, p50_ms=6.1, p99_ms=18.5
    )


def test_parse_wrk_without_the_line_is_an_error() -> None:
    with pytest.raises(WrkOutputError):
        parse_wrk("unable to connect to 127.0.0.1:8000 Connection refused\n")


def test_figures_add_up_rounds_and_ratios_compare_like_with_like() -> None:
    def figures(requests: int, mib: int) -> dict[str, object]:
        f = Figures([WrkRun(requests, mib * 1024 * 1024, 2.0, 0, 1.0, 4.0)] * 2, [30.0, 40.0])
        return f.summary()

    si = figures(10_000, 100)
    assert (si["req_s"], si["mb_s"], si["p99_ms"], si["peak_rss_mib_per_worker"]) == (
        5000.0, 50.0, 4.0, 40.0
    )
    summaries = {
        "small": {"serve-image-mysql-1w": si, "nginx": figures(80_000, 800),
                  "naive-mysql": figures(1_000, 10), "naive-pgsql": figures(4_000, 40)},
        "large": {"serve-image-mysql-1w": si, "nginx": figures(100, 400)},
    }
    assert ratios(summaries, FIGURES) == {
        "small": {"serve-image-mysql-1w": {"figure": "req_s", "vs_nginx": 0.125,
                                            "vs_naive": 10.0}},
        "large": {"serve-image-mysql-1w": {"figure": "mb_s", "vs_nginx": 0.25,
                                            "vs_naive": None}},
    }


def test_the_ceilings_are_measured_against_nginx_and_judged_by_no_target() -> None:
    def figures(mib: int) -> dict[str, object]:
        return Figures([WrkRun(100, mib * 1024 * 1024, 2.0, 0, 1.0, 4.0)], []).summary()

    summaries = {"large": {"serve-image-pgsql-1w": figures(300), "db-only-pgsql": figures(500),
                           "http-only": figures(1000), "nginx": figures(2000)}}
    rat = ratios(summaries, FIGURES)
    assert rat["large"]["db-only-pgsql"] == {"figure": "mb_s", "vs_nginx": 0.25, "vs_naive": None}
    assert rat["large"]["http-only"] == {"figure": "mb_s", "vs_nginx": 0.5, "vs_naive": None}
    texts = [t.text for t in targets(summaries, rat)]
    assert "5 MiB MB/s, serve-image-pgsql-1w / nginx >= 0.4" in texts
    assert not [t for t in texts if "only" in t]


def test_db_only_reads_a_stored_file_whole(tmp_path: Path) -> None:
    import asyncio

    from bench import db_only
    from serve_image.settings import settings_from_mapping
    from serve_image.storage import make_layout

    db = tmp_path / "d.sqlite"
    site = tmp_path / "site.py"
    site.write_text(f"STORAGE_BACKEND = 'sqlite'\nSTORAGE_DB = {str(db)!r}\n")
    data = bytes(range(256)) * 1000  # 256,000 bytes in 4 chunks

    async def fill() -> None:
        b = make_layout(settings_from_mapping(
            {"STORAGE_BACKEND": "sqlite", "STORAGE_DB": str(db)}, "<t>", "t"))
        await b.connect()
        await b.create_tables()
        parts = [data[i:i + 65535] for i in range(0, len(data), 65535)]
        await b.store("var/x/storage/images/a.jpg", parts, size=len(data), mtime=1,
                      datatype="image/jpeg", scope="image")
        await b.close()

    asyncio.run(fill())
    out = asyncio.run(db_only.run(str(site), "var/x/storage/images/a.jpg", 0.3, 2))
    assert out["requests"] >= 2
    assert out["bytes"] == len(data) * out["requests"]
    assert out["errors"] == {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    with pytest.raises(SystemExit, match=r"none\.jpg is not stored"):
        asyncio.run(db_only.run(str(site), "var/x/storage/images/none.jpg", 0.1, 1))


async def test_http_only_sends_the_files_with_serve_images_headers(tmp_path: Path) -> None:
    import httpx

    from bench.baselines.http_only import PIECE, HttpOnly

    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "a.jpg").write_bytes(b"x" * 100)
    big = bytes(range(256)) * 1000
    (tmp_path / "var" / "big.jpg").write_bytes(big)
    (tmp_path.parent / "outside.jpg").write_bytes(b"secret")
    sent: list[int] = []
    app = HttpOnly(tmp_path)

    async def counting(scope, receive, send):  # type: ignore[no-untyped-def]
        async def wrapped(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.body":
                sent.append(len(message["body"]))
            await send(message)
        await app(scope, receive, wrapped)

    transport = httpx.ASGITransport(app=counting)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/var/a.jpg")
        assert (r.status_code, r.content) == (200, b"x" * 100)
        assert {"content-type", "x-content-type-options", "accept-ranges", "cache-control",
                "etag", "last-modified", "expires", "content-length"} <= set(r.headers)
        r304 = await c.get("/var/a.jpg", headers={"if-none-match": r.headers["etag"]})
        assert (r304.status_code, r304.headers["etag"]) == (304, r.headers["etag"])
        sent.clear()
        rbig = await c.get("/var/big.jpg")
        assert rbig.content == big
        assert max(sent) == PIECE and len(sent) == -(-len(big) // PIECE) + 1
        assert (await c.get("/var/none.jpg")).status_code == 404
    # httpx would normalise the path: the app is asked directly.
    assert app._load("/../outside.jpg") is None
    assert app._load("/var/../../outside.jpg") is None


# -- costs: CPU per MiB and per request, the hot cache's hit ratio -------------


MIB = 1024 * 1024


def test_costs_are_cpu_per_mib_and_per_request_over_all_rounds() -> None:
    runs = [WrkRun(1000, 10 * MIB, 1.0, 0, 1.0, 2.0)] * 2
    f = Figures(runs, [], [Usage(0.5, 0.25, 900, 1000), Usage(0.5, 0.25, 800, 1000)])
    s = f.summary()
    assert (s["worker_cpu_ms_per_mib"], s["db_cpu_ms_per_mib"]) == (50.0, 25.0)
    assert (s["worker_cpu_us_per_req"], s["db_cpu_us_per_req"]) == (500.0, 250.0)
    assert s["hit_ratio"] == 0.85


def test_a_cost_not_read_in_every_round_is_not_reported() -> None:
    runs = [WrkRun(1000, 10 * MIB, 1.0, 0, 1.0, 2.0)] * 2
    # The database server read in one round only; no cache to ask.
    s = Figures(runs, [], [Usage(0.5, 0.25), Usage(0.5, None)]).summary()
    assert s["worker_cpu_ms_per_mib"] == 50.0
    assert (s["db_cpu_ms_per_mib"], s["db_cpu_us_per_req"], s["hit_ratio"]) == (None, None, None)
    s = Figures(runs, [], []).summary()  # nothing read (older results)
    assert (s["worker_cpu_ms_per_mib"], s["hit_ratio"]) == (None, None)


def test_usage_difference_is_what_the_run_cost() -> None:
    after = Usage(12.5, 40.0, 1500, 2000) - Usage(10.0, 39.0, 500, 900)
    assert after == Usage(2.5, 1.0, 1000, 1100)
    assert Usage(3.0, None, None, None) - Usage(1.0, None, None, None) == Usage(2.0)


def test_markdown_shows_cpu_and_the_hit_ratio_only_where_there_is_one() -> None:
    run = WrkRun(1000, 10 * MIB, 1.0, 0, 1.0, 2.0)
    summaries = {
        "small": {"serve-image-mysql-1w": Figures([run], [40.0], [Usage(1.0, 0.5)]).summary(),
                  "nginx": Figures([run], [5.0], [Usage(0.1)]).summary()},
        "realistic": {
            "serve-image-mysql-1w-cache":
                Figures([run], [60.0], [Usage(1.0, 0.5, 80, 100)]).summary(),
            "nginx": Figures([WrkRun(2000, 20 * MIB, 1.0, 0, 0.5, 1.0)], [5.0],
                             [Usage(0.1)]).summary()},
    }
    rat = ratios(summaries, FIGURES)
    md = markdown({"started": "now", "command": "scripts/bench", "machine": "m",
                   "scenarios": {"small": "10 KiB", "realistic": "Zipf"},
                   "data": {"realistic": {"files": 10, "fill_s": {"mysql": 1.5}}},
                   "summaries": summaries, "ratios": rat,
                   "targets": []})
    small, real = md.split("## small: 10 KiB")[1], md.split("## realistic: Zipf")[1]
    assert "| DB CPU ms/MiB | worker CPU ms/MiB |" in small
    assert "hit ratio" not in small.split("## realistic")[0]
    assert "| hit ratio | / nginx | / naive |" in real
    assert "| serve-image-mysql-1w-cache | 1000.0 | 10.0 |" in real
    assert "| 50.0 | 100.0 | 500.0 | 1000.0 | 0.8 | 0.5 | - |" in real
    assert '- data set `realistic`: files 10; fill_s {"mysql": 1.5}' in md


def test_targets_judge_the_realistic_cache_and_big_files_against_naive() -> None:
    def figures(requests: int, mib: int) -> dict[str, object]:
        return Figures([WrkRun(requests, mib * MIB, 1.0, 0, 1.0, 2.0)], []).summary()

    summaries = {
        "realistic": {"serve-image-pgsql-2w-cache": figures(3000, 1),
                      "serve-image-pgsql-2w": figures(2000, 1), "nginx": figures(10_000, 1)},
        "large": {"serve-image-mysql-1w": figures(10, 130), "naive-mysql": figures(10, 100),
                  "nginx": figures(10, 1000)},
    }
    found = {t.text: t for t in targets(summaries, ratios(summaries, FIGURES))}
    cache = found["realistic req/s, serve-image-pgsql-2w-cache / nginx >= 0.25"]
    assert (cache.value, cache.met) == (0.3, True)
    assert not [t for t in found if "serve-image-pgsql-2w /" in t]  # no cache, no target
    big = found["5 MiB MB/s, MariaDB 1 worker / naive >= 1.3"]
    assert (big.value, big.met) == (1.3, True)
    assert found["5 MiB MB/s, PostgreSQL 1 worker / naive >= 1.3"].met is None


# -- the realistic data ----------------------------------------------------------


def test_size_classes_keep_their_shares_at_every_rank() -> None:
    classes = realistic.classes_by_rank(1000)
    counts = {c.alias: sum(1 for x in classes if x is c) for c in realistic.SIZE_CLASSES}
    assert counts == {"thumbnail": 600, "medium": 300, "large": 90, "original": 10}
    for rank in range(1, 1001):
        for c in realistic.SIZE_CLASSES:
            dealt = sum(1 for x in classes[:rank] if x is c)
            assert abs(dealt - rank * c.share) < 1, (rank, c.alias)


def test_the_plan_gives_each_file_a_size_in_its_class() -> None:
    plan = realistic.plan(200)
    assert plan == realistic.plan(200)  # from the seed alone
    assert len({n for n, _ in plan}) == 200
    for (name, size), c in zip(plan, realistic.classes_by_rank(200), strict=True):
        assert name.endswith(f"-{c.alias}.jpg")
        assert c.smallest <= size <= c.largest


def test_zipf_ranks_are_drawn_with_popularity_one_over_rank() -> None:
    ranks = realistic.zipf_ranks(100, 20_000)
    assert ranks == realistic.zipf_ranks(100, 20_000)
    assert min(ranks) == 0 and max(ranks) < 100
    counts = [ranks.count(k) for k in range(100)]
    # P(k) = 1 / ((k + 1) H(100)), H(100) = 5.187: rank 0 3,856 expected, rank 1 half of it.
    assert 3700 < counts[0] < 4000
    assert 1.8 < counts[0] / counts[1] < 2.2
    assert 8 < counts[0] / counts[9] < 12


def test_materialise_writes_the_files_once_and_reuses_them(tmp_path: Path) -> None:
    files = realistic.materialise(tmp_path, 40, 300)
    assert files.names == [n for n, _ in realistic.plan(40)]
    for name, size in zip(files.names, files.sizes, strict=True):
        assert (files.root / name).stat().st_size == size
    lines = files.sequence.read_text().splitlines()
    assert len(lines) == 300 and {line[1:] for line in lines} <= set(files.names)
    mean = sum(files.sizes[files.names.index(line[1:])] for line in lines) / 300
    assert files.mean_request_bytes == round(mean, 1)
    manifest = files.root.parent / "manifest.json"
    written = manifest.stat().st_mtime_ns
    (files.root / files.names[0]).write_bytes(b"changed")  # a reuse does not rewrite
    again = realistic.materialise(tmp_path, 40, 300)
    assert again == files
    assert manifest.stat().st_mtime_ns == written
    assert (files.root / files.names[0]).read_bytes() == b"changed"
    assert [p.name for p in tmp_path.iterdir()] == ["realistic-v1-40"]  # no partial copy left


# -- CPU from /proc ---------------------------------------------------------------


# A parent that runs a child to its end (its CPU then is in the parent's cutime,
# measured exactly by getrusage), then starts a second that burns and stays.
PARENT = """
import resource, subprocess, sys, time
burn = "sum(range(10_000_000))"
subprocess.run([sys.executable, "-c", burn], check=True)
gone = resource.getrusage(resource.RUSAGE_CHILDREN)
live = subprocess.Popen([sys.executable, "-c", burn + "; print('burnt', flush=True); "
                         "__import__('time').sleep(60)"])
print("reaped", gone.ru_utime + gone.ru_stime, live.pid, flush=True)
time.sleep(60)
"""


def test_tree_cpu_counts_children_alive_and_exited() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        _, reaped, live = proc.stdout.readline().split()
        assert proc.stdout.readline() == "burnt\n"
        assert procfs.children(proc.pid) == [int(live)]
        tick = 1 / procfs.TICKS
        assert float(reaped) > 0
        # The parent's own time comes on top; /proc counts whole ticks.
        total = procfs.tree_cpu_seconds(proc.pid)
        assert total >= float(reaped) + procfs.tree_cpu_seconds(int(live)) - 2 * tick
    finally:
        os.killpg(proc.pid, 9)
        proc.communicate()
    assert procfs.tree_cpu_seconds(proc.pid) == 0.0  # gone


def test_sqlite_and_remote_servers_have_no_process_here() -> None:
    with pytest.raises(procfs.NotHere, match="sqlite has no server process"):
        asyncio.run(procfs.database_server({"STORAGE_BACKEND": "sqlite", "STORAGE_DB": "x"}))
    with pytest.raises(procfs.NotHere, match=r"runs on db\.example, not here"):
        asyncio.run(procfs.database_server(
            {"STORAGE_BACKEND": "mysql", "STORAGE_HOST": "db.example", "STORAGE_DB": "x"}))


# A query that keeps the server busy for a fraction of a second.
BUSY = {"mysql": "SELECT BENCHMARK(1000000, MD5('serve-image'))",
        "pgsql": "SELECT count(*) FROM generate_series(1, 3000000)"}


@pytest.mark.parametrize("backend", ["mysql", "pgsql"])
async def test_database_server_cpu_grows_with_its_work(
    databases: DatabaseFactory, backend: str
) -> None:
    from serve_image.settings import settings_from_mapping
    from serve_image.storage import make_layout

    constants = await databases.constants(backend)
    server = await procfs.database_server(constants)
    assert procfs.command_name(server.pid) in procfs.SERVER_NAMES[backend]
    b = make_layout(settings_from_mapping(constants, "<t>", "t"))
    await b.connect()
    try:
        before = server.cpu_seconds()
        await b.driver.fetch(BUSY[backend])
        after = server.cpu_seconds()
    finally:
        await b.close()
    assert after > before


# -- the harness's parts, run small ------------------------------------------------


@pytest.fixture
def readable_tmp() -> Iterator[Path]:
    """A temporary directory nginx's unprivileged workers can read (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="si-test-bench-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def need(program: str) -> None:
    if not (shutil.which(program) or Path(f"/usr/sbin/{program}").exists()):
        server_missing(program, FileNotFoundError(program))


@pytest.mark.slow
async def test_realistic_runs_with_cpu_and_hit_ratio(readable_tmp: Path) -> None:
    """40 files on SQLite, served with the hot cache and by nginx: a second of the
    realistic load each, every request a success, every cost read."""
    from bench.datasets import DATA_SETS, Context
    from bench.runner import measure
    from bench.scenarios import SCENARIOS

    need("wrk")
    need("nginx")
    wanted = {"serve-image-sqlite-1w-cache", "nginx"}
    ctx = Context(readable_tmp / "run", readable_tmp / "work", ["sqlite"], wanted.__contains__,
                  realistic_files=40)
    ctx.tmp.mkdir()
    scenario = SCENARIOS["realistic"]
    async with DATA_SETS["realistic"](ctx) as stage:
        assert [s.name for s in stage.systems] == ["serve-image-sqlite-1w-cache", "nginx"]
        got = {s.name: await measure(s, scenario, stage, 1, 1) for s in stage.systems}
        assert stage.notes["files"] == 40
    for name, (run, rss, usage) in got.items():
        assert run.requests > 0 and run.errors == 0, name
        assert rss and usage.worker_cpu_s > 0, name
        assert usage.db_cpu_s is None, name  # SQLite: the worker's own
    _, _, cached = got["serve-image-sqlite-1w-cache"]
    assert cached.cache_lookups is not None and cached.cache_lookups > 0
    assert cached.cache_hits is not None and cached.cache_hits > 0
    assert got["nginx"][2].cache_lookups is None
    assert realistic.sqlite_path(realistic.materialise(ctx.work, 40)).is_file()  # kept


def test_wrk_walks_a_request_list_in_order_or_picks_at_random(readable_tmp: Path) -> None:
    """bench/random_paths.lua against a server that notes the paths: `seq` walks
    the list round and round; without it, picks are random."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from bench.load import LUA

    need("wrk")
    seen: list[str] = []

    class Noting(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Noting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    paths = readable_tmp / "list.txt"
    paths.write_text("/a\n/b\n/c\n/b\n")
    try:
        runs = {}
        for mode in (["seq"], []):
            seen.clear()
            out = subprocess.run(
                ["wrk", "-t1", "-c1", "-d1s", "-s", str(LUA),
                 f"http://127.0.0.1:{server.server_address[1]}", "--", str(paths), *mode],
                capture_output=True, text=True, timeout=30, check=True)
            runs[bool(mode)] = (parse_wrk(out.stdout), list(seen))
    finally:
        server.shutdown()
        server.server_close()
    run, walked = runs[True]
    assert run.requests >= 8 and run.errors == 0
    # In order, round and round (wrk may ask for a request it never sends, so the
    # walk need not start at the first line).
    cycle = ["/a", "/b", "/c", "/b"]
    assert any(walked == [cycle[(k + i) % 4] for i in range(len(walked))] for k in range(4))
    _, picked = runs[False]
    assert set(picked) == {"/a", "/b", "/c"}
    assert picked[:8] != ["/a", "/b", "/c", "/b"] * 2


def test_every_scenario_runs_on_a_data_set_and_realistic_is_in_the_default() -> None:
    from bench.datasets import DATA_SETS
    from bench.runner import parse_args
    from bench.scenarios import SCENARIOS

    assert {s.data for s in SCENARIOS.values()} <= set(DATA_SETS)
    assert {s.figure for s in SCENARIOS.values()} <= {"req_s", "mb_s"}
    assert parse_args([]).scenarios == list(SCENARIOS)
    args = parse_args(["--quick", "--scenarios", "realistic"])
    assert (args.duration, args.scenarios) == (1, ["realistic"])
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "nope"])


@pytest.mark.slow
def test_import_throughput_writes_json_and_markdown(tmp_path: Path) -> None:
    from bench import import_throughput

    out = tmp_path / "results"
    assert import_throughput.main(["--files", "3", "--big-mib", "1", "--rounds", "1",
                                   "--backends", "sqlite", "--out", str(out)]) == 0
    report = json.loads((out / "import.json").read_text())
    small, big = report["results"]["sqlite"]["small"], report["results"]["sqlite"]["big"]
    assert (small["files"], small["bytes"]) == (3, 3 * 10 * 1024)
    assert (big["files"], big["bytes"]) == (1, MIB)
    assert big["mb_s"] > 0
    # MariaDB not measured: its target has no figure.
    assert report["targets"] == [{"text": "one 1 MiB file into MariaDB, MB/s >= 25",
                                  "value": None, "limit": 25, "higher_is_better": True,
                                  "met": None}]
    md = (out / "import.md").read_text()
    assert "| backend | 3 files of 10 KiB | one 1 MiB file |" in md
    assert f"| sqlite | {small['files_per_s']} files/s" in md
    assert os.path.basename(str(out / "import.md")) == "import.md"
