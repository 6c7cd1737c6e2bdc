"""Small-file reads that share one query while the database is busy (serve_image/batching.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serve_image.app import ServeImage
from serve_image.backends import Backend, make_backend
from serve_image.batching import BatchedReads
from serve_image.errors import DatabaseUnavailable
from serve_image.settings import Settings, settings_from_mapping
from tests.helpers import IMG, SpyBackend, md5, payload, running, store


async def test_concurrent_reads_share_queries_and_get_their_own_rows(
    settings: Settings, writer: Backend
) -> None:
    names = [f"{IMG}/{i}.jpg" for i in range(30)]
    for i, name in enumerate(names):
        await store(writer, name, payload(500 + i, seed=i))
    spy = SpyBackend(make_backend(settings, readonly=True))
    await spy.connect()
    try:
        reads = BatchedReads(spy)
        wanted = [md5(n) for n in names] + [md5("missing"), md5(names[3])]
        got = await asyncio.gather(*(reads.fetch_first(h) for h in wanted))
        # The first read found the database idle; the others shared two queries.
        assert spy.calls == ["fetch_first", "query", "query"]
        expected = [await spy.inner.fetch_first(h) for h in wanted]
        assert got == expected
        assert got[30] is None
        assert got[31] is not None and got[31][1] == payload(503, seed=3)
    finally:
        await spy.close()


async def test_concurrent_row_reads_share_queries_too(
    settings: Settings, writer: Backend
) -> None:
    names = [f"{IMG}/{i}.jpg" for i in range(10)]
    for i, name in enumerate(names):
        await store(writer, name, payload(2500, seed=i))
    spy = SpyBackend(make_backend(settings, readonly=True))
    await spy.connect()
    try:
        reads = BatchedReads(spy)
        wanted = [md5(n) for n in names] + [md5("missing")]
        got = await asyncio.gather(*(reads.fetch_meta(h) for h in wanted))
        assert spy.calls == ["fetch_meta", "query", "query"]
        assert got == [await spy.inner.fetch_meta(h) for h in wanted]
        assert [m.size if m else None for m in got] == [2500] * 10 + [None]
    finally:
        await spy.close()


async def test_reads_on_an_idle_database_each_have_their_own_query(
    settings: Settings, writer: Backend
) -> None:
    await store(writer, f"{IMG}/a.jpg", payload(100))
    spy = SpyBackend(make_backend(settings, readonly=True))
    await spy.connect()
    try:
        reads = BatchedReads(spy)
        for _ in range(2):
            assert await reads.fetch_first(md5(f"{IMG}/a.jpg")) is not None
        assert spy.calls == ["fetch_first", "fetch_first"]
    finally:
        await spy.close()


async def test_a_waiter_that_goes_away_leaves_the_shared_query_to_the_others(
    settings: Settings, writer: Backend
) -> None:
    names = [f"{IMG}/{i}.jpg" for i in range(4)]
    for i, name in enumerate(names):
        await store(writer, name, payload(200, seed=i))
    backend = make_backend(settings, readonly=True)
    await backend.connect()
    try:
        reads = BatchedReads(backend)
        tasks = [asyncio.ensure_future(reads.fetch_first(md5(n))) for n in names]
        await asyncio.sleep(0)  # every read has started: the first alone, the rest waiting
        tasks[2].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        bodies = [r[1] if isinstance(r, tuple) else None for r in results]
        assert bodies == [payload(200, seed=0), payload(200, seed=1), None, payload(200, seed=3)]
    finally:
        await backend.close()


@pytest.mark.parametrize("backend_name", ["sqlite"])
async def test_every_waiter_gets_the_database_error(tmp_path: Path, backend_name: str) -> None:
    missing = tmp_path / "no" / "such.sqlite"
    settings = settings_from_mapping({"STORAGE_DB": str(missing)}, "<test>", "test")
    backend = make_backend(settings, readonly=True)
    await backend.connect()
    try:
        reads = BatchedReads(backend)
        results = await asyncio.gather(
            *(reads.fetch_first(md5(str(i))) for i in range(5)), return_exceptions=True
        )
        assert [type(r) for r in results] == [DatabaseUnavailable] * 5
        assert reads.fetch_first.in_flight == 0
    finally:
        await backend.close()


async def test_concurrent_gets_through_the_endpoint_get_the_right_bytes(
    settings: Settings, writer: Backend
) -> None:
    files = {f"{IMG}/{i}.jpg": payload(300 + i, seed=100 + i) for i in range(20)}
    for name, data in files.items():
        await store(writer, name, data)
    async with running(ServeImage(settings)) as client:
        paths = [*files, f"{IMG}/missing.jpg"]
        responses = await asyncio.gather(*(client.get(f"/{p}") for p in paths))
    assert [r.status_code for r in responses] == [200] * 20 + [404]
    assert [r.content for r in responses[:20]] == list(files.values())
