"""HTTP semantics over real databases (issue 3): conditional requests and ranges."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_h
from hypothesis import strategies as st

from serve_image.app import ServeImage
from serve_image.conditional import http_date
from serve_image.settings import Settings
from serve_image.storage import Layout, make_layout
from tests.helpers import IMG, SpyLayout, md5, payload, store

MTIME = 1_700_000_000
NAME = f"{IMG}/multi.bin"
URL = f"/{NAME}"
DATA = payload(10_000, seed=42)  # 10 chunks of 1000 bytes


@pytest.fixture
async def stored(writer: Layout) -> bytes:
    await store(writer, NAME, DATA, datatype="image/png", mtime=MTIME)
    return DATA


async def etag_of(client: httpx.AsyncClient) -> str:
    return (await client.head(URL)).headers["etag"]


def byteranges_body(boundary: str, parts: list[tuple[int, int]], data: bytes) -> bytes:
    """A multipart/byteranges body spelled out (RFC 9110 §14.6, RFC 2046 §5.1.1)."""
    body = b""
    for first, last in parts:
        body += (
            f"--{boundary}\r\nContent-Type: image/png\r\n"
            f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n"
        ).encode() + data[first:last + 1] + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


# -- ranges ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("999-1000", 999, 1000),  # a chunk's last byte to the next chunk's first
        ("999-3000", 999, 3000),  # across three chunks and more
        ("1000-1999", 1000, 1999),  # exactly one chunk
        ("0-0", 0, 0),
        ("9999-", 9999, 9999),
        ("-1", 9999, 9999),
        ("-1001", 8999, 9999),
        ("5000-99999", 5000, 9999),  # clamped
        ("0-", 0, 9999),
        ("1234-5678", 1234, 5678),
    ],
)
async def test_single_range(
    stored: bytes, client: httpx.AsyncClient, spec: str, first: int, last: int
) -> None:
    r = await client.get(URL, headers={"Range": f"bytes={spec}"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {first}-{last}/10000"
    assert r.headers["content-length"] == str(last - first + 1)
    assert r.headers["content-type"] == "image/png"
    assert r.content == stored[first : last + 1]


async def test_range_reads_only_overlapping_chunks(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout, settings: Settings
) -> None:
    """A range costs a key-range query for its own chunks, whatever the file's size."""
    r = await client.get(URL, headers={"Range": "bytes=2500-3500"})
    assert r.content == stored[2500:3501]
    assert spy.calls == ["meta", "fetch_chunks"]
    reader = make_layout(settings, readonly=True)
    await reader.connect()
    try:
        meta = await reader.meta(md5(NAME))
        assert meta is not None
        chunks = await reader.fetch_chunks(meta, 2500, 3500, 100)
    finally:
        await reader.close()
    assert [c.offset for c in chunks] == [2000, 3000]


async def test_multipart_byteranges(stored: bytes, client: httpx.AsyncClient) -> None:
    r = await client.get(URL, headers={"Range": "bytes=0-9,999-1000,9990-"})
    assert r.status_code == 206
    ctype = r.headers["content-type"]
    assert ctype.startswith("multipart/byteranges; boundary=")
    assert int(r.headers["content-length"]) == len(r.content)
    msg = email.message_from_bytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + r.content, policy=email.policy.HTTP
    )
    parts = list(msg.iter_parts())
    assert [p["Content-Range"] for p in parts] == [
        "bytes 0-9/10000",
        "bytes 999-1000/10000",
        "bytes 9990-9999/10000",
    ]
    assert all(p["Content-Type"] == "image/png" for p in parts)
    assert [p.get_payload(decode=True) for p in parts] == [
        stored[0:10],
        stored[999:1001],
        stored[9990:],
    ]


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("50-60,0-1", [(50, 60), (0, 1)]),
        ("9000-9999,0-999,1000-1999", [(9000, 9999), (0, 1999)]),
        # A later range that overlaps an earlier one joins it, in the earlier one's place.
        ("50-60,0-1,55-70", [(50, 70), (0, 1)]),
        ("-10,5-6,9985-9995", [(9985, 9999), (5, 6)]),
    ],
)
async def test_multipart_parts_come_in_the_order_asked(
    stored: bytes, client: httpx.AsyncClient, spec: str, parts: list[tuple[int, int]]
) -> None:
    # Regression: the differential run against Apache httpd found the parts
    # sorted; RFC 9110 §15.3.7.2 says they SHOULD come in the order asked.
    r = await client.get(URL, headers={"Range": f"bytes={spec}"})
    assert r.status_code == 206
    ctype = r.headers["content-type"]
    prefix = "multipart/byteranges; boundary="
    assert ctype.startswith(prefix)
    expected = byteranges_body(ctype[len(prefix):], parts, stored)
    assert r.content == expected
    assert r.headers["content-length"] == str(len(expected))
    assert "content-range" not in r.headers


async def test_overlapping_ranges_coalesce_to_one(stored: bytes, client: httpx.AsyncClient) -> None:
    r = await client.get(URL, headers={"Range": "bytes=0-99,50-199,200-299"})
    assert r.status_code == 206
    assert r.headers["content-range"] == "bytes 0-299/10000"
    assert r.content == stored[:300]


async def test_too_many_ranges_send_whole_file(stored: bytes, client: httpx.AsyncClient) -> None:
    spec = ",".join(f"{i * 100}-{i * 100 + 1}" for i in range(17))
    r = await client.get(URL, headers={"Range": f"bytes={spec}"})
    assert (r.status_code, r.content) == (200, stored)


@pytest.mark.parametrize("spec", ["bytes=10000-", "bytes=-0", "bytes=20000-30000"])
async def test_unsatisfiable_416(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout, spec: str
) -> None:
    r = await client.get(URL, headers={"Range": spec})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */10000"
    assert spy.chunk_reads == 0


@pytest.mark.parametrize("spec", ["items=0-1", "bytes=5-1", "bytes=abc", "bytes=1-2;3"])
async def test_malformed_range_is_ignored(
    stored: bytes, client: httpx.AsyncClient, spec: str
) -> None:
    r = await client.get(URL, headers={"Range": spec})
    assert (r.status_code, r.content) == (200, stored)


@pytest.mark.parametrize("spec", ["bytes=10-19", "bytes=0-1,50-60", "bytes=20000-", "bytes=5-1"])
@pytest.mark.parametrize(
    "if_range", [None, "etag", '"stale"', http_date(MTIME)],
    ids=["no-if-range", "if-range-etag", "if-range-stale", "if-range-date"],
)
async def test_head_ignores_range(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout, spec: str, if_range: str | None
) -> None:
    """RFC 9110 §14.2: Range is ignored on any method but GET, so If-Range does not matter."""
    # Regression: HEAD with Range answered 206 (found by the differential run against Apache httpd).
    headers = {"Range": spec}
    if if_range is not None:
        headers["If-Range"] = await etag_of(client) if if_range == "etag" else if_range
    r = await client.head(URL, headers=headers)
    assert r.status_code == 200
    assert r.headers["content-length"] == "10000"
    assert r.headers["content-type"] == "image/png"
    assert r.headers["accept-ranges"] == "bytes"
    assert "content-range" not in r.headers
    assert r.content == b""
    assert spy.chunk_reads == 0
    # The same Range on GET still gives its part.
    assert (await client.get(URL, headers={"Range": "bytes=10-19"})).status_code == 206


async def test_if_range_etag(stored: bytes, client: httpx.AsyncClient) -> None:
    etag = await etag_of(client)
    r = await client.get(URL, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert (r.status_code, r.content) == (206, stored[:10])
    r = await client.get(URL, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (r.status_code, r.content) == (200, stored)


async def test_if_range_date(stored: bytes, client: httpx.AsyncClient) -> None:
    r = await client.get(URL, headers={"Range": "bytes=0-9", "If-Range": http_date(MTIME)})
    assert r.status_code == 206
    r = await client.get(URL, headers={"Range": "bytes=0-9", "If-Range": http_date(MTIME - 5)})
    assert r.status_code == 200


# -- conditional requests ---------------------------------------------------


async def test_if_none_match_304_reads_no_chunk(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    etag = await etag_of(client)
    r = await client.get(URL, headers={"If-None-Match": etag})
    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["etag"] == etag
    assert r.headers["cache-control"] == "public, max-age=6000"
    assert "expires" in r.headers
    # §15.4.5: no representation metadata beyond those.
    assert "content-type" not in r.headers
    assert "last-modified" not in r.headers
    assert "content-length" not in r.headers
    assert spy.chunk_reads == 0


async def test_if_none_match_other_tag_200(stored: bytes, client: httpx.AsyncClient) -> None:
    r = await client.get(URL, headers={"If-None-Match": '"nope", W/"other"'})
    assert (r.status_code, r.content) == (200, stored)


@pytest.mark.parametrize(
    "field_lines",
    [
        ["{etag}, "],
        [", {etag}"],
        [' , , "other", , {etag}'],
        ["", "{etag}"],  # two field lines, the first empty: joined as ", <etag>"
        ['"other"', "", "{etag}"],
    ],
)
async def test_empty_list_elements_are_ignored(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout, field_lines: list[str]
) -> None:
    # Regression: an empty list element ended the parsing (RFC 9110 §5.6.1 says
    # a recipient MUST accept and ignore it): 200 instead of 304, 412 instead of 200.
    etag = await etag_of(client)
    values = [line.format(etag=etag) for line in field_lines]
    r = await client.get(URL, headers=[("If-None-Match", v) for v in values])
    assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", etag)
    assert spy.chunk_reads == 0
    r = await client.get(URL, headers=[("If-Match", v) for v in values])
    assert (r.status_code, r.headers["content-length"], r.content) == (200, "10000", stored)


@pytest.mark.parametrize("others", [64, 1000])
async def test_a_matching_tag_after_many_others_counts(
    stored: bytes, client: httpx.AsyncClient, others: int
) -> None:
    # Regression: only the first 64 tags were compared.
    etag = await etag_of(client)
    tags = ", ".join([*(f'"other-{i}"' for i in range(others)), etag])
    r = await client.get(URL, headers={"If-None-Match": tags})
    assert (r.status_code, r.content) == (304, b"")
    r = await client.get(URL, headers={"If-Match": tags})
    assert (r.status_code, r.headers["content-length"], r.content) == (200, "10000", stored)
    r = await client.head(URL, headers={"If-Match": tags.replace(etag, '"gone"')})
    assert r.status_code == 412


async def test_if_modified_since_304(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    r = await client.get(URL, headers={"If-Modified-Since": http_date(MTIME)})
    assert r.status_code == 304
    assert spy.chunk_reads == 0
    r = await client.get(URL, headers={"If-Modified-Since": http_date(MTIME - 1)})
    assert (r.status_code, r.content) == (200, stored)


async def test_if_modified_since_bad_date_ignored(stored: bytes, client: httpx.AsyncClient) -> None:
    r = await client.get(URL, headers={"If-Modified-Since": "yesterday"})
    assert (r.status_code, r.content) == (200, stored)


async def test_if_match_412_reads_no_chunk(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    r = await client.get(URL, headers={"If-Match": '"other"'})
    assert r.status_code == 412
    assert spy.chunk_reads == 0
    etag = await etag_of(client)
    assert (await client.get(URL, headers={"If-Match": etag})).content == stored


async def test_if_unmodified_since_412_reads_no_chunk(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    r = await client.get(URL, headers={"If-Unmodified-Since": http_date(MTIME - 1)})
    assert (r.status_code, r.text) == (412, "412 Precondition Failed\n")
    assert spy.chunk_reads == 0
    r = await client.get(URL, headers={"If-Unmodified-Since": http_date(MTIME)})
    assert (r.status_code, r.content) == (200, stored)


async def test_head_304_has_the_validators_and_reads_no_chunk(
    stored: bytes, client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    etag = await etag_of(client)
    spy.reset()
    r = await client.head(URL, headers={"If-None-Match": etag})
    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["etag"] == etag
    assert r.headers["cache-control"] == "public, max-age=6000"
    assert "expires" in r.headers
    assert "content-length" not in r.headers
    assert "content-type" not in r.headers
    assert spy.chunk_reads == 0


# -- many requests at once ---------------------------------------------------------
# Requests that arrive together share reads of the file rows: those of a 304,
# a 412 or a HEAD must still bring no chunk byte.

OTHERS = [f"{IMG}/other-{i}.bin" for i in range(5)]
AT_ONCE = 24


@pytest.fixture
async def several(stored: bytes, writer: Layout) -> list[str]:
    """URLs of six stored files, all dated MTIME: the multi-chunk one, five of one chunk."""
    for i, name in enumerate(OTHERS):
        await store(writer, name, payload(900, seed=i), datatype="image/png", mtime=MTIME)
    return [URL, *(f"/{n}" for n in OTHERS)]


async def at_once(
    client: httpx.AsyncClient, method: str, urls: list[str], headers: dict[str, str]
) -> list[httpx.Response]:
    return await asyncio.gather(*(
        client.request(method, urls[i % len(urls)], headers=headers) for i in range(AT_ONCE)
    ))


async def test_concurrent_gets_count_their_shared_chunk_reads(
    several: list[str], client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    """The spy sees the reads requests share: without them every test below is hollow."""
    rs = await at_once(client, "GET", several[1:], {})
    assert [r.status_code for r in rs] == [200] * AT_ONCE
    assert [r.content for r in rs] == [payload(900, seed=i % 5) for i in range(AT_ONCE)]
    assert len(spy.calls) < AT_ONCE  # reads were shared
    assert spy.chunk_reads == len(spy.calls)  # and each of them brought chunk bytes


async def test_concurrent_304s_read_no_chunk(
    several: list[str], client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    rs = await at_once(client, "GET", several, {"If-Modified-Since": http_date(MTIME)})
    assert [r.status_code for r in rs] == [304] * AT_ONCE
    assert {r.content for r in rs} == {b""}
    assert {r.headers["cache-control"] for r in rs} == {"public, max-age=6000"}
    assert all("content-length" not in r.headers for r in rs)
    assert len(spy.calls) < AT_ONCE
    assert spy.chunk_reads == 0


async def test_concurrent_head_304s_read_no_chunk(
    several: list[str], client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    etag = await etag_of(client)
    spy.reset()
    rs = await at_once(client, "HEAD", [URL], {"If-None-Match": etag})
    assert [(r.status_code, r.content, r.headers["etag"]) for r in rs] == [
        (304, b"", etag)] * AT_ONCE
    assert spy.chunk_reads == 0


async def test_concurrent_heads_read_no_chunk(
    several: list[str], client: httpx.AsyncClient, spy: SpyLayout
) -> None:
    rs = await at_once(client, "HEAD", several, {})
    assert [r.status_code for r in rs] == [200] * AT_ONCE
    assert {r.content for r in rs} == {b""}
    assert [r.headers["content-length"] for r in rs] == [
        "10000" if i % 6 == 0 else "900" for i in range(AT_ONCE)]
    assert len(spy.calls) < AT_ONCE
    assert spy.chunk_reads == 0


@pytest.mark.parametrize("condition", [
    {"If-Match": '"other"'},
    {"If-Unmodified-Since": http_date(MTIME - 1)},
])
async def test_concurrent_412s_read_no_chunk(
    several: list[str], client: httpx.AsyncClient, spy: SpyLayout, condition: dict[str, str]
) -> None:
    rs = await at_once(client, "GET", several, condition)
    assert [(r.status_code, r.text) for r in rs] == [(412, "412 Precondition Failed\n")] * AT_ONCE
    assert len(spy.calls) < AT_ONCE
    assert spy.chunk_reads == 0


# -- per-site switches -----------------------------------------------------------


@pytest.fixture
async def app_with(settings: Settings) -> AsyncIterator[object]:
    apps: list[ServeImage] = []

    async def make(**changes: object) -> httpx.AsyncClient:
        a = ServeImage(dataclasses.replace(settings, **changes))
        await a.startup()
        apps.append(a)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://t")

    yield make
    for a in apps:
        await a.shutdown()


async def test_http_cache_off(stored: bytes, app_with) -> None:  # type: ignore[no-untyped-def]
    client = await app_with(http_cache=False)
    r = await client.get(URL, headers={"If-None-Match": "*"})
    assert (r.status_code, r.content) == (200, stored)
    assert "etag" not in r.headers and "last-modified" not in r.headers


async def test_http_range_off(stored: bytes, app_with) -> None:  # type: ignore[no-untyped-def]
    client = await app_with(http_range=False)
    r = await client.get(URL, headers={"Range": "bytes=0-1"})
    assert (r.status_code, r.content) == (200, stored)
    assert "accept-ranges" not in r.headers


async def test_cache_control_setting(stored: bytes, app_with) -> None:  # type: ignore[no-untyped-def]
    client = await app_with(cache_control="private, no-cache")
    r = await client.get(URL)
    assert r.headers["cache-control"] == "private, no-cache"


async def test_download_non_images(writer: Layout, app_with) -> None:  # type: ignore[no-untyped-def]
    name = f'{IMG}/r\u00e9sum\u00e9 "final".pdf'
    await store(writer, name, b"%PDF-1.4", datatype="application/pdf")
    await store(writer, f"{IMG}/p.png", b"png", datatype="image/png")
    client = await app_with(download_non_images=True)
    from urllib.parse import quote

    r = await client.get("/" + quote(name))
    assert r.headers["content-disposition"] == (
        'attachment; filename="r_sum_ _final_.pdf"; '
        "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.pdf"
    )
    assert "content-disposition" not in (await client.get(f"/{IMG}/p.png")).headers


# -- properties over the stored file -------------------------------------------

_SPEC = st.one_of(
    st.tuples(st.integers(0, 12_000), st.integers(0, 12_000)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.integers(0, 12_000).map(lambda a: f"{a}-"),
    st.integers(0, 12_000).map(lambda n: f"-{n}"),
)


@settings_h(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=st.lists(_SPEC, min_size=1, max_size=4))
async def test_any_satisfiable_range_is_the_stored_bytes(
    stored: bytes, client: httpx.AsyncClient, specs: list[str]
) -> None:
    """Whatever the ranges, every byte sent is the stored byte at its Content-Range."""
    r = await client.get(URL, headers={"Range": "bytes=" + ",".join(specs)})
    assert r.status_code in (200, 206, 416)
    if r.status_code == 200:
        assert r.content == stored
    elif r.status_code == 416:
        assert r.headers["content-range"] == "bytes */10000"
    elif r.headers["content-type"].startswith("multipart/byteranges"):
        msg = email.message_from_bytes(
            f"Content-Type: {r.headers['content-type']}\r\n\r\n".encode() + r.content,
            policy=email.policy.HTTP,
        )
        for part in msg.iter_parts():
            first, last = map(int, part["Content-Range"][6:].split("/")[0].split("-"))
            assert part.get_payload(decode=True) == stored[first:last + 1]
    else:
        first, last = map(int, r.headers["content-range"][6:].split("/")[0].split("-"))
        assert r.content == stored[first:last + 1]
