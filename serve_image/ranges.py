"""Byte ranges (RFC 9110 §14): pure functions, no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable

# More ranges than this and the Range header is ignored (RFC 9110 §14.2: a
# server MAY ignore Range); with coalescing and the total-size check below no
# request can cost more than a full download.
MAX_RANGES = 16
_SPEC = re.compile(r"^([0-9]*)-([0-9]*)$")
# More digits than this is past the end of any file; Python refuses int() of
# over 4300 digits (a ValueError, so a 500) and big ones cost time to convert.
_MAX_DIGITS = 18


def _number(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS

Range = tuple[int, int]  # first and last byte, inclusive, as in Content-Range


class RangeNotSatisfiable(Exception):
    """No range of the header overlaps the file: 416 with `bytes */size`."""

    def __init__(self, size: int) -> None:
        super().__init__(f"bytes */{size}")
        self.size = size


def parse_range(header: str, size: int) -> list[Range] | None:
    """The ranges to send for a Range header, coalesced, in the order asked for.

    None means "ignore the header and send the whole file with 200": the unit
    is not bytes, the header is malformed (RFC 9110 §14.2 says a server MAY
    ignore it; Starlette's 400 is wrong), or it asks for too much.
    Raises RangeNotSatisfiable when the header is valid but no range overlaps.
    """
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    # Bound the work before splitting a huge header.
    if specs.count(",") >= 4 * MAX_RANGES:
        return None
    wanted: list[Range] = []
    satisfiable_seen = False
    count = 0
    for raw in specs.split(","):
        spec = raw.strip(" \t")
        if not spec:
            continue  # RFC 9110 §5.6.1: empty list elements are allowed
        count += 1
        m = _SPEC.match(spec)
        if m is None or (not m.group(1) and not m.group(2)):
            return None
        first, last = m.group(1), m.group(2)
        if first:
            start = _number(first)
            end = _number(last) if last else size - 1
            if last and end < start:
                return None  # §14.1.1: invalid range-spec, so the header is ignored
            if start >= size:
                continue  # unsatisfiable on its own
            wanted.append((start, min(end, size - 1)))
        else:
            suffix = _number(last)
            if suffix == 0:
                continue  # `bytes=-0` asks for nothing
            if size == 0:
                satisfiable_seen = True
                continue
            wanted.append((max(0, size - suffix), size - 1))
    if count == 0 or count > MAX_RANGES:
        return None
    if not wanted:
        if satisfiable_seen:
            return None  # a zero-length file: send it whole
        raise RangeNotSatisfiable(size)
    if sum(end - start + 1 for start, end in wanted) > size:
        return None
    return coalesce(wanted)


def coalesce(ranges: Iterable[Range]) -> list[Range]:
    """Merge overlapping and adjacent ranges; keep the order they were asked in.

    RFC 9110 §15.3.7.2: a server MAY coalesce ranges that overlap, whatever
    their order, and SHOULD send the parts in the order of the Range header,
    except ranges coalesced into others. A merged range takes the place of
    the first-asked range in it: `5-6,0-1,2-3` gives `5-6`, then `0-3`.
    """
    merged: list[tuple[int, int, int]] = []  # first byte, last byte, place asked
    for place, (start, end) in sorted(enumerate(ranges), key=lambda item: item[1]):
        if merged and start <= merged[-1][1] + 1:
            first, last, earliest = merged[-1]
            merged[-1] = (first, max(last, end), min(earliest, place))
        else:
            merged.append((start, end, place))
    merged.sort(key=lambda m: m[2])
    return [(first, last) for first, last, _ in merged]


def content_range(r: Range, size: int) -> str:
    return f"bytes {r[0]}-{r[1]}/{size}"


def multipart_parts(
    ranges: list[Range], size: int, content_type: str, boundary: str
) -> tuple[list[bytes], bytes, int]:
    """The part headers, the closing delimiter and the exact body length.

    Part i is `heads[i]` + the bytes of `ranges[i]` + CRLF; the body ends with
    `tail` (RFC 9110 §14.6, RFC 2046 §5.1.1).
    """
    heads = [
        (
            f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: {content_range(r, size)}\r\n\r\n"
        ).encode("latin-1")
        for r in ranges
    ]
    tail = f"--{boundary}--\r\n".encode("latin-1")
    length = sum(len(h) for h in heads) + sum(e - s + 1 + 2 for s, e in ranges) + len(tail)
    return heads, tail, length
