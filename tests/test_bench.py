"""The benchmark runner's pure parts: reading wrk's output, figures and ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import Figures, WrkOutputError, WrkRun, parse_wrk, ratios, targets

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
    assert ratios(summaries) == {
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
    rat = ratios(summaries)
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
