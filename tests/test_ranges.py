"""Range parsing (RFC 9110 §14): the pure function, every case, and properties."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_image.ranges import (
    MAX_RANGES,
    RangeNotSatisfiable,
    coalesce,
    content_range,
    multipart_parts,
    parse_range,
)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-499", 1000, [(0, 499)]),
        ("bytes=500-", 1000, [(500, 999)]),
        ("bytes=-200", 1000, [(800, 999)]),
        ("bytes=0-0", 1000, [(0, 0)]),  # eZ 4.7 sent the whole file
        ("bytes=7-7", 1000, [(7, 7)]),  # eZ 4.7 answered 416
        ("bytes=999-999", 1000, [(999, 999)]),
        ("bytes=0-", 1000, [(0, 999)]),  # eZ PR #506: never "0-/N"
        ("bytes=900-5000", 1000, [(900, 999)]),  # clamped, not 416 (Ibexa's bug)
        ("bytes=-5000", 1000, [(0, 999)]),
        ("BYTES=1-2", 1000, [(1, 2)]),  # range units are case-insensitive
        ("bytes= 1-2 , 4-5", 1000, [(1, 2), (4, 5)]),
        ("bytes=1-2,,4-5", 1000, [(1, 2), (4, 5)]),  # empty list elements are allowed
        ("bytes=0-1,1-2", 1000, [(0, 2)]),  # overlapping: merged
        ("bytes=0-1,2-3", 1000, [(0, 3)]),  # adjacent: merged
        ("bytes=10-20,0-5", 1000, [(10, 20), (0, 5)]),  # in the order asked
        ("bytes=50-60,0-1", 1000, [(50, 60), (0, 1)]),
        ("bytes=2-3,0-1", 1000, [(0, 3)]),  # adjacent whatever their order: one range
        # A merged range takes the place of the first-asked range in it.
        ("bytes=50-60,0-1,55-70", 1000, [(50, 70), (0, 1)]),
        ("bytes=0-1,50-60,2-3", 1000, [(0, 3), (50, 60)]),
        ("bytes=40-49,0-9,30-39,10-19", 1000, [(30, 49), (0, 19)]),
        ("bytes=-10,0-1,995-996", 1000, [(990, 999), (0, 1)]),
        ("bytes=5000-6000,0-1", 1000, [(0, 1)]),  # the unsatisfiable one is dropped
        ("bytes=-1", 1, [(0, 0)]),
    ],
)
def test_satisfiable(header: str, size: int, expected: list[tuple[int, int]]) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header",
    [
        "items=0-1",  # another unit
        "bytes",
        "bytes=",
        "bytes=abc",
        "bytes=1-a",
        "bytes=-",
        "bytes=5-1",  # last < first: invalid, so ignored
        "bytes=1-2;3-4",
        "bytes=0x1-2",
        "bytes=+1-2",
        "bytes=1 - 2",
        "bytes=\u0661-\u0662",  # Arabic-Indic digits are not DIGIT
    ],
)
def test_malformed_is_ignored(header: str) -> None:
    # Starlette answers these with 400; RFC 9110 §14.2 lets the server ignore them.
    assert parse_range(header, 1000) is None


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=-0,5000-"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as e:
        parse_range(header, 1000)
    assert e.value.size == 1000
    assert str(e.value) == "bytes */1000"


def test_zero_length_file_start_is_unsatisfiable() -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)


def test_zero_length_file_suffix_sends_whole_empty_file() -> None:
    assert parse_range("bytes=-10", 0) is None


def test_more_than_max_ranges_sends_whole_file() -> None:
    many = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES + 1))
    assert parse_range(f"bytes={many}", 10_000) is None
    exactly = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES))
    assert len(parse_range(f"bytes={exactly}", 10_000) or []) == MAX_RANGES


def test_thousands_of_ranges_are_ignored_cheaply() -> None:
    assert parse_range("bytes=" + ",".join(["0-0"] * 5000), 10) is None


def test_ranges_adding_up_to_more_than_the_file_send_whole_file() -> None:
    # Overlapping ranges that ask for each byte many times: no more work than a download.
    assert parse_range("bytes=0-99,0-99", 150) is None
    assert parse_range("bytes=0-49,0-49", 150) == [(0, 49)]


def test_coalesce_keeps_the_order_asked() -> None:
    # Regression: parts came back sorted (RFC 9110 §15.3.7.2: in the order asked).
    assert coalesce([(5, 6), (0, 1), (2, 3), (10, 12), (11, 20)]) == [(5, 6), (0, 3), (10, 20)]
    assert coalesce([(10, 20), (0, 1), (5, 15)]) == [(5, 20), (0, 1)]
    assert coalesce([(0, 1)]) == [(0, 1)]
    assert coalesce([]) == []


def test_content_range() -> None:
    assert content_range((0, 0), 1) == "bytes 0-0/1"


def test_multipart_length_matches_the_body() -> None:
    data = bytes(range(256)) * 4
    ranges = [(0, 9), (100, 100), (1000, 1023)]
    heads, tail, length = multipart_parts(ranges, len(data), "image/png", "BOUNDARY")
    body = b"".join(h + data[a : b + 1] + b"\r\n" for h, (a, b) in zip(heads, ranges, strict=True))
    body += tail
    assert len(body) == length
    assert heads[0] == (
        b"--BOUNDARY\r\nContent-Type: image/png\r\nContent-Range: bytes 0-9/1024\r\n\r\n"
    )
    assert tail == b"--BOUNDARY--\r\n"


@given(st.text(max_size=300), st.integers(min_value=0, max_value=10**12))
def test_never_raises_anything_but_unsatisfiable(header: str, size: int) -> None:
    try:
        result = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if result is not None:
        assert all(0 <= a <= b < size for a, b in result)
        assert result == coalesce(result)


@given(
    st.binary(min_size=1, max_size=3000),
    st.lists(
        st.one_of(
            st.tuples(st.integers(0, 4000), st.integers(0, 4000)).map(lambda t: f"{t[0]}-{t[1]}"),
            st.integers(0, 4000).map(lambda a: f"{a}-"),
            st.integers(0, 4000).map(lambda n: f"-{n}"),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_single_satisfiable_range_equals_slice(data: bytes, specs: list[str]) -> None:
    """For one spec, the bytes sent are exactly data[a:b+1] as RFC 9110 defines them."""
    spec = specs[0]
    try:
        result = parse_range(f"bytes={spec}", len(data))
    except RangeNotSatisfiable:
        return
    if result is None:
        return
    ((a, b),) = result
    first, _, last = spec.partition("-")
    if first:
        expected = data[int(first) : int(last) + 1 if last else None]
    else:
        expected = data[-int(last) :] if int(last) else b""
    assert data[a : b + 1] == expected


def _specs_for(size: int) -> st.SearchStrategy[tuple[int, list[str]]]:
    """Valid range-specs, mostly small against the file, some past its end."""
    short = max(1, size // 8)
    spec = st.one_of(
        st.tuples(st.integers(0, size + 5), st.integers(1, short)).map(
            lambda t: f"{t[0]}-{t[0] + t[1] - 1}"
        ),
        st.integers(max(0, size - short), size + 2).map(lambda a: f"{a}-"),
        st.integers(0, short).map(lambda n: f"-{n}"),
    )
    return st.tuples(st.just(size), st.lists(spec, min_size=1, max_size=MAX_RANGES))


def _asked(spec: str, size: int) -> tuple[int, int] | None:
    """One valid range-spec as RFC 9110 §14.1.2 defines it, written out plainly."""
    first, _, last = spec.partition("-")
    if not first:
        return (max(0, size - int(last)), size - 1) if int(last) else None
    if int(first) >= size:
        return None
    return (int(first), min(int(last), size - 1) if last else size - 1)


@given(st.integers(1, 3000).flatmap(_specs_for))
def test_parts_are_the_asked_bytes_merged_in_the_order_asked(case: tuple[int, list[str]]) -> None:
    """Every byte asked for is sent once; parts neither overlap nor touch; each
    part stands where the first range it holds was asked."""
    size, specs = case
    asked = [r for r in (_asked(spec, size) for spec in specs) if r is not None]
    try:
        result = parse_range("bytes=" + ",".join(specs), size)
    except RangeNotSatisfiable:
        assert asked == []
        return
    if result is None:
        assert sum(b - a + 1 for a, b in asked) > size  # the only reason left to ignore it
        return
    assert {i for a, b in result for i in range(a, b + 1)} == {
        i for a, b in asked for i in range(a, b + 1)
    }
    ordered = sorted(result)
    assert all(prev[1] + 1 < nxt[0] for prev, nxt in pairwise(ordered))
    first_asked = [
        next(i for i, (a, b) in enumerate(asked) if start <= a and b <= end)
        for start, end in result
    ]
    assert all(x < y for x, y in pairwise(first_asked))
