"""OFFLOAD: serve-image decides the answer, the web server in front sends the file's bytes.

For a layout whose files are files this node sees (`dfs`, on its mount).
Pure rules, no I/O:

- nginx, `OFFLOAD = "x-accel-redirect:/PREFIX/"`: a 200 carries
  `X-Accel-Redirect: /PREFIX/<name>` and no body; an `internal` location
  `/PREFIX/` aliased to the mount sends the file. nginx unescapes the URI
  and cuts it at `?` (ngx_http_parse_unsafe_uri), so the name goes
  percent-encoded.
- Apache with mod_xsendfile, `OFFLOAD = "x-sendfile"`: a 200 carries
  `X-Sendfile: <absolute path on the mount>`, as it is (UTF-8); `XSendFilePath`
  allows the mount. Debian's mod_xsendfile (0.12) takes the value as a path;
  1.0 url-decodes it unless `XSendFileUnescape Off`, which the snippet sets
  where the directive exists (a name may hold a `%`).

serve-image still answers 404, 503, 304, 412 and 416 itself, from the row
(and a check of the mount). The 200 it sends up has `Content-Length: 0`,
which is true of that hop: both servers replace the body and its length
with the file's, and answer Range on it themselves.

The web server also evaluates the client's conditional headers, against
the file on disk: nginx with its own ETag switched off answers 412 to any
If-Match, and both compare If-Unmodified-Since with a date that is not the
row's. So a request carrying either is answered by serve-image with the
bytes (they are rare for images); If-None-Match and If-Modified-Since
reach the web server only after serve-image found the file modified, and
the configuration it prints makes the server ignore them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

# Request headers the web server would evaluate against the file, not the row.
_NOT_OFFLOADED = (b"if-match", b"if-unmodified-since")


@dataclass(frozen=True, slots=True)
class Offload:
    """How a 200 hands the file to the web server."""

    header: bytes
    # X-Accel-Redirect: the internal location's URI prefix; None for X-Sendfile.
    prefix: str | None

    @classmethod
    def from_setting(cls, setting: str | None) -> Offload | None:
        """From OFFLOAD as settings.py validated it."""
        if setting is None:
            return None
        if setting == "x-sendfile":
            return cls(b"x-sendfile", None)
        return cls(b"x-accel-redirect", setting.partition(":")[2])

    def applies(self, method: str, request: Mapping[bytes, str]) -> bool:
        """Is this request's 200 sent by the web server?"""
        return method == "GET" and not any(h in request for h in _NOT_OFFLOADED)

    def field(self, name: str, path: str) -> tuple[bytes, bytes]:
        """The response header for the file `name`, at `path` on this node."""
        if self.prefix is None:
            return self.header, path.encode("utf-8")
        return self.header, (self.prefix + quote(name, safe="/")).encode("ascii")
