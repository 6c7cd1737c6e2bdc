"""Request path -> stored file name: a pure function, no I/O.

The rules, in order (documented in docs/http.md):
1. Only the path is used; the query string never is (eZ bug #015459).
2. The raw path is percent-decoded once; a `%` not followed by two hex digits
   is a 400 (eZ bug #14153 was a name used without decoding).
3. The decoded bytes must be UTF-8 (400), without control characters or NUL
   (400), and at most MAX_NAME_BYTES long (414).
4. Empty, `.` and `..` segments are 404: no eZ name has them, and refusing
   them means no spelling of a path can reach a row outside the prefix.
5. The name must be `var[/<dir>]/storage/images[-versioned]/<rest>` (eZ's
   RewriteRule), with `<dir>` equal to the site's VAR_DIR when one is set;
   anything else is 404 without touching the database.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from serve_image.errors import BadRequest, NotFound, URITooLong

MAX_NAME_BYTES = 4096
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
_PREFIX = re.compile(r"^(var(?:/[^/]+)?)/storage/images(-versioned)?/.")


class FileName(NamedTuple):
    name: str
    var_dir: str
    versioned: bool


def request_name(raw_path: bytes, var_dir: str | None = None) -> FileName:
    """Turn the raw request path into the name its row is stored under."""
    if len(raw_path) > 3 * MAX_NAME_BYTES:
        raise URITooLong("path too long")
    path = raw_path.split(b"?", 1)[0]
    if _BAD_PERCENT.search(path):
        raise BadRequest("invalid percent-encoding")
    decoded = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), path)
    if len(decoded) > MAX_NAME_BYTES:
        raise URITooLong("path too long")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("path is not UTF-8") from None
    if _CONTROL.search(text):
        raise BadRequest("control character in path")
    if not text.startswith("/"):
        raise NotFound()
    name = text[1:]
    if any(seg in ("", ".", "..") for seg in name.split("/")):
        raise NotFound()
    match = _PREFIX.match(name)
    if match is None or (var_dir is not None and match.group(1) != var_dir):
        raise NotFound()
    return FileName(name, match.group(1), match.group(2) is not None)


def is_image_path(path: str) -> bool:
    """Cheap first test on the decoded ASGI path: does this request go to the files?"""
    return path.startswith("/var/")
