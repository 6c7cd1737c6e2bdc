"""Validators and conditional requests (RFC 9110 §8.8, §13): pure functions."""

from __future__ import annotations

import calendar
import re
import time
from email.utils import formatdate
from enum import Enum

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MON = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
# RFC 9110 §5.6.7: IMF-fixdate, and the obsolete rfc850-date and asctime-date
# that a recipient MUST accept.
_IMF = re.compile(rf"^{_DAY}, ([0-9]{{2}}) {_MON} ([0-9]{{4}}) {_TIME} GMT$")
_RFC850 = re.compile(rf"^{_LONG_DAY}, ([0-9]{{2}})-{_MON}-([0-9]{{2}}) {_TIME} GMT$")
_ASCTIME = re.compile(rf"^{_DAY} {_MON} ([ 0-9][0-9]) {_TIME} ([0-9]{{4}})$")
# One element of an entity-tag list and the comma after it (or the end). The
# tag may be missing: RFC 9110 §5.6.1 says a recipient MUST accept empty list
# elements and ignore them (`, "a"`, and what joining an empty field line to
# another gives). An opaque-tag may itself hold commas, so this is no split.
_ELEMENT = re.compile(r'[ \t]*(?:(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*)?(?:,|\Z)')


def http_date(ts: float) -> str:
    """IMF-fixdate for a unix time."""
    return formatdate(ts, usegmt=True)


def parse_http_date(value: str) -> int | None:
    """Unix time of an HTTP-date, or None when it is not one (the header is then ignored)."""
    value = value.strip()
    if len(value) > 64:
        return None
    if m := _IMF.match(value):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.match(value):
        day, mon, yy, hh, mm, ss = m.groups()
        # §5.6.7: a two-digit year more than 50 years in the future is in the past.
        this_year = time.gmtime().tm_year
        year_i = this_year // 100 * 100 + int(yy)
        if year_i > this_year + 50:
            year_i -= 100
        year = str(year_i)
    elif m := _ASCTIME.match(value):
        mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    fields = (int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss))
    if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
        return None
    try:
        return calendar.timegm((*fields, 0, 0, 0))
    except (ValueError, OverflowError):
        return None


def make_etag(name_hash: str, mtime: int, size: int) -> str:
    """A strong validator: changes whenever the stored version (mtime, size) does."""
    return f'"{mtime:x}-{size:x}-{name_hash[:8]}"'


def parse_etags(value: str) -> list[tuple[bool, str]] | None:
    """`If-Match`/`If-None-Match` list as (weak, opaque-tag); None for `*`.

    Every tag is kept, however many: a match far down the list still counts,
    and the work is one pass over a value whose size the server bounds.
    """
    value = value.strip()
    if value == "*":
        return None
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        # Each match takes at least one character (a comma or a tag): linear.
        m = _ELEMENT.match(value, pos)
        if m is None:
            break  # malformed from here on: keep what was valid before it
        if m.group(2) is not None:
            tags.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return tags


def _matches(header: str, etag: str, weak: bool) -> bool:
    if header == etag:
        return True  # the one tag the client was given, sent back: a match either way
    tags = parse_etags(header)
    if tags is None:
        return True  # `*`: any current representation (the file exists here)
    # §8.8.3.2: strong comparison needs both tags strong; weak ignores W/.
    return any(tag == etag and (weak or not is_weak) for is_weak, tag in tags)


class Outcome(Enum):
    PROCEED = 200
    NOT_MODIFIED = 304
    PRECONDITION_FAILED = 412


def evaluate(
    method: str,
    etag: str | None,
    last_modified: int | None,
    if_match: str | None = None,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
    if_unmodified_since: str | None = None,
) -> Outcome:
    """RFC 9110 §13.2.2: the preconditions in their defined order.

    `etag`/`last_modified` are None when the site turns validators off; the
    file is known to exist (a missing file was a 404 before this).
    """
    safe = method in ("GET", "HEAD")
    if if_match is not None:
        # Step 1: strong comparison; without an ETag only `*` can match.
        if not (_matches(if_match, etag, weak=False) if etag else if_match.strip() == "*"):
            return Outcome.PRECONDITION_FAILED
    elif if_unmodified_since is not None and last_modified is not None:
        # Step 2; an invalid date is ignored (§13.1.4).
        date = parse_http_date(if_unmodified_since)
        if date is not None and last_modified > date:
            return Outcome.PRECONDITION_FAILED
    if if_none_match is not None:
        # Step 3: weak comparison (§13.1.2).
        if _matches(if_none_match, etag, weak=True) if etag else if_none_match.strip() == "*":
            return Outcome.NOT_MODIFIED if safe else Outcome.PRECONDITION_FAILED
    elif safe and if_modified_since is not None and last_modified is not None:
        # Step 4: only for GET/HEAD and only without If-None-Match.
        date = parse_http_date(if_modified_since)
        if date is not None and last_modified <= date:
            return Outcome.NOT_MODIFIED
    return Outcome.PROCEED


def if_range_matches(if_range: str, etag: str | None, last_modified: int | None) -> bool:
    """RFC 9110 §13.1.5: serve the range only if the validator still matches.

    An entity-tag needs a strong match; a date must equal Last-Modified
    exactly. Anything else (weak tag, bad date, validators off) means "send
    the whole file".
    """
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        return etag is not None and value == etag
    date = parse_http_date(value)
    return date is not None and last_modified is not None and date == last_modified
