"""The hot-object cache: what it keeps, its byte bound, its staleness bound, and
that a cached answer (200 or 304) reads no database."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from serve_image.app import ServeImage
from serve_image.cache import ENTRY_OVERHEAD, HotCache
from serve_image.settings import Settings, SiteConfigError, settings_from_mapping
from serve_image.storage import FileMeta, Layout, make_layout
from tests.helpers import IMG, SpyLayout, md5, payload, store


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def meta(name: str, size: int, mtime: int = 1_700_000_000) -> FileMeta:
    return FileMeta(md5(name), "image/jpeg", size, mtime, False)


# -- HotCache on its own -------------------------------------------------------


def test_get_returns_what_put_kept() -> None:
    cache = HotCache(16 * 4096, 5)
    m = meta("a", 3)
    cache.put(m, b"abc")
    entry = cache.get(m.name_hash)
    assert entry is not None
    assert (entry.meta, entry.body) == (m, b"abc")


def test_bytes_stay_within_the_bound_dropping_least_recently_used() -> None:
    body = b"x" * 100
    cost = len(body) + ENTRY_OVERHEAD
    cache = HotCache(16 * cost, 5)  # room for 16 such files, the largest it keeps
    rows = [meta(f"f{i}", 100) for i in range(17)]
    for m in rows[:16]:
        cache.put(m, body)
    assert cache.get(rows[0].name_hash) is not None  # now the most recently used
    cache.put(rows[16], body)
    assert cache.bytes == 16 * cost
    assert cache.get(rows[1].name_hash) is None
    assert all(cache.get(m.name_hash) is not None for m in rows[:1] + rows[2:])


def test_entry_is_not_served_once_ttl_has_passed() -> None:
    clock = FakeClock()
    cache = HotCache(16 * 4096, 5, clock)
    m = meta("a", 3)
    cache.put(m, b"abc")
    clock.now += 4.999
    assert cache.get(m.name_hash) is not None
    clock.now += 0.001
    assert cache.get(m.name_hash) is None
    assert (len(cache), cache.bytes) == (0, 0)


@pytest.mark.parametrize(
    ("row", "body"),
    [
        (meta("big", 5000), b"x" * 5000),  # above max_bytes / 16
        (meta("part", 10), b"x" * 5),  # only the first chunk of a larger file
        (FileMeta(md5("gone"), "image/jpeg", 3, -1_700_000_000, True), b"abc"),  # deleted
    ],
    ids=["too-big", "partial", "deleted"],
)
def test_keeps_only_whole_live_small_files(row: FileMeta, body: bytes) -> None:
    cache = HotCache(16 * 4096, 5)
    cache.put(row, body)
    assert len(cache) == 0


def test_row_alone_is_kept_for_any_size_and_costs_no_body_bytes() -> None:
    cache = HotCache(16 * 4096, 5)
    big = meta("big", 50 * 1024 * 1024)
    cache.put_meta(big)
    entry = cache.get(big.name_hash)
    assert entry is not None
    assert (entry.meta, entry.body, cache.bytes) == (big, None, ENTRY_OVERHEAD)


def test_off_by_default_and_settings_are_checked() -> None:
    s = settings_from_mapping({"STORAGE_DB": "x.sqlite"}, "sites/x.py")
    assert (s.cache_max_bytes, s.cache_ttl) == (0, 5.0)
    with pytest.raises(SiteConfigError) as e:
        settings_from_mapping({"STORAGE_DB": "x.sqlite", "CACHE_TTL": 0}, "sites/x.py")
    assert str(e.value) == (
        "sites/x.py: CACHE_TTL must be a number of seconds above 0 and at most 86400"
    )


# -- through the endpoint, on every backend ------------------------------------

Client = tuple[httpx.AsyncClient, SpyLayout, FakeClock]


@pytest.fixture
async def cached(settings: Settings) -> AsyncIterator[Callable[[], Client]]:
    """A client of an app with the hot cache on (64 KiB, TTL 5 s, a fake clock)."""
    s = dataclasses.replace(settings, cache_max_bytes=64 * 1024, cache_ttl=5.0)
    spy = SpyLayout(make_layout(s, readonly=True))
    app = ServeImage(s, layout=spy)
    await app.startup()
    assert app.endpoint.cache is not None
    clock = FakeClock()
    app.endpoint.cache.clock = clock
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    yield lambda: (client, spy, clock)
    await client.aclose()
    await app.shutdown()


async def test_second_get_is_answered_from_memory(
    cached: Callable[[], Client], writer: Layout
) -> None:
    client, spy, _ = cached()
    data = payload(900, seed=1)
    await store(writer, f"{IMG}/a.jpg", data)
    first = await client.get(f"/{IMG}/a.jpg")
    calls = len(spy.calls)
    second = await client.get(f"/{IMG}/a.jpg")
    assert second.status_code == 200
    assert second.content == data
    assert second.headers["etag"] == first.headers["etag"]
    assert second.headers["content-length"] == "900"
    assert len(spy.calls) == calls


async def test_cached_304_reads_no_database(
    cached: Callable[[], Client], writer: Layout
) -> None:
    client, spy, _ = cached()
    await store(writer, f"{IMG}/a.jpg", payload(900, seed=1))
    etag = (await client.get(f"/{IMG}/a.jpg")).headers["etag"]
    calls = len(spy.calls)
    r = await client.get(f"/{IMG}/a.jpg", headers={"if-none-match": etag})
    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["etag"] == etag
    assert spy.calls[calls:] == []


async def test_replaced_file_is_served_stale_at_most_ttl(
    cached: Callable[[], Client], writer: Layout
) -> None:
    client, _, clock = cached()
    old, new = payload(900, seed=1), payload(800, seed=2)
    await store(writer, f"{IMG}/a.jpg", old, mtime=1_700_000_000)
    assert (await client.get(f"/{IMG}/a.jpg")).content == old
    await store(writer, f"{IMG}/a.jpg", new, mtime=1_700_000_100)
    clock.now += 4.9
    assert (await client.get(f"/{IMG}/a.jpg")).content == old
    clock.now += 0.1
    assert (await client.get(f"/{IMG}/a.jpg")).content == new


async def test_file_of_several_chunks_is_not_cached(
    cached: Callable[[], Client], writer: Layout
) -> None:
    client, spy, _ = cached()
    data = payload(2500, seed=3)  # three chunks of the test sites' 1000 bytes
    await store(writer, f"{IMG}/b.jpg", data)
    await client.get(f"/{IMG}/b.jpg")
    calls = len(spy.calls)
    r = await client.get(f"/{IMG}/b.jpg")
    assert r.content == data
    assert spy.calls[calls] == "first"


async def test_row_read_for_a_304_answers_the_next_304_from_memory(
    cached: Callable[[], Client], writer: Layout
) -> None:
    client, spy, _ = cached()
    await store(writer, f"{IMG}/c.jpg", payload(2500, seed=4))  # several chunks: any size
    etag = (await client.head(f"/{IMG}/c.jpg")).headers["etag"]
    first = await client.get(f"/{IMG}/c.jpg", headers={"if-none-match": etag})
    calls = len(spy.calls)
    second = await client.get(f"/{IMG}/c.jpg", headers={"if-none-match": etag})
    assert (first.status_code, second.status_code) == (304, 304)
    assert spy.calls[calls:] == []


async def test_get_after_a_row_only_entry_reads_the_bytes(
    cached: Callable[[], Client], writer: Layout
) -> None:
    client, spy, _ = cached()
    data = payload(900, seed=5)
    await store(writer, f"{IMG}/d.jpg", data)
    await client.head(f"/{IMG}/d.jpg")
    calls = len(spy.calls)
    r = await client.get(f"/{IMG}/d.jpg")
    assert r.content == data
    assert spy.calls[calls:] == ["first"]
    assert (await client.get(f"/{IMG}/d.jpg")).content == data
    assert spy.calls[calls:] == ["first"]
