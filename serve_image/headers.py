"""Response headers that depend only on a file's type and the site: built once."""

from __future__ import annotations

import functools
import re
import time
from urllib.parse import quote

from serve_image.conditional import http_date

# RFC 9110 §8.3.1: type "/" subtype *( OWS ";" OWS parameter ); a datatype
# that is not of this form (eZ rows say 'misc' at times) is not sent. Only
# ASCII in quoted values: a header is sent as bytes, and a non-ASCII one
# made a 500.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(
    rf"^{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|\"[\x20\x21\x23-\x5b\x5d-\x7e]*\"))*$"
)
FALLBACK_TYPE = "application/octet-stream"
# Types a browser would run in the site's origin if it navigated to them: a
# stored SVG can carry <script>. The CSP sandbox stops that.
_ACTIVE_TYPES = frozenset({
    "image/svg+xml", "text/html", "application/xhtml+xml", "text/xml", "application/xml",
    "text/javascript", "application/javascript", "application/x-javascript",
    "application/ecmascript", "text/ecmascript",
})
SANDBOX_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"

Header = tuple[bytes, bytes]


@functools.lru_cache(maxsize=1024)
def content_type(datatype: str | None) -> str:
    """The row's datatype if it is a well-formed media type, else octet-stream."""
    if datatype and len(datatype) <= 255 and _MEDIA_TYPE.match(datatype.strip()):
        return datatype.strip()
    return FALLBACK_TYPE


def _essence(media_type: str) -> str:
    return media_type.split(";", 1)[0].strip().lower()


@functools.lru_cache(maxsize=1024)
def type_headers(datatype: str | None, download_non_images: bool) -> tuple[Header, ...]:
    """Content-Type and the headers that follow from it, encoded once per type."""
    ctype = content_type(datatype)
    out: list[Header] = [(b"content-type", ctype.encode("latin-1"))]
    if _essence(ctype) in _ACTIVE_TYPES:
        out.append((b"content-security-policy", SANDBOX_CSP.encode()))
    return tuple(out)


def content_disposition(name: str) -> bytes:
    """RFC 6266 attachment with an ASCII fallback and the UTF-8 `filename*`."""
    base = name.rsplit("/", 1)[-1]
    ascii_name = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in base)
    value = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(base, safe='')}"
    return value.encode("latin-1")


def is_download(datatype: str | None) -> bool:
    """Non-image types are sent as attachments when the site asks for it."""
    return not _essence(content_type(datatype)).startswith("image/")


class Clock:
    """`Expires` for now + timeout, formatted at most once a second (as uvicorn's Date)."""

    def __init__(self, timeout: int) -> None:
        self.timeout = timeout
        self._second = -1
        self._value = b""

    def expires(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = http_date(now + self.timeout).encode("latin-1")
        return self._value
