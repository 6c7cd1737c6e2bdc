"""What a file is: its MIME type (from its bytes, then its name) and its eZ scope (by path)."""

from __future__ import annotations

import mimetypes
import re

import puremagic

DEFAULT_TYPE = "application/octet-stream"
# How much of a file the content sniffing reads: enough for every signature
# puremagic knows at a file's start, little enough to cost nothing.
HEAD_BYTES = 8192
# Types the bytes give for whole families of formats (an SVG is XML, an
# OpenDocument file is a ZIP): a name that says more wins over these.
_GENERIC = frozenset({
    "application/xml", "text/xml", "text/plain", "application/zip", "application/json",
    DEFAULT_TYPE,
})
# eZ keeps a binary file or a media file under storage/original/<MIME group>/
# (eZBinaryFile::storedFileInfo); eZMedia's files are video and audio.
_SCOPE_RE = re.compile(r"(?:^|/)storage/(images(?:-versioned)?|original/(video|audio))?(?:/|$)")


def guess_datatype(head: bytes, name: str) -> str:
    """The MIME type from the file's first bytes, else its extension, else octet-stream."""
    by_name = mimetypes.guess_type(name, strict=False)[0]
    by_content = ""
    if head:
        try:
            by_content = puremagic.from_string(head, mime=True, filename=name)
        except (puremagic.PureError, ValueError):
            by_content = ""
    if by_content and "/" in by_content:
        if by_content in _GENERIC and by_name:
            return by_name
        return by_content
    return by_name or DEFAULT_TYPE


def scope_for(name: str) -> str:
    """eZ's scope for a file by where it lives, as clusterize.php stores them.

    `storage/images*` -> `image`; `storage/original/video|audio/` ->
    `mediafile`; anything else under `storage/original` (and elsewhere) ->
    `binaryfile`.
    """
    m = _SCOPE_RE.search(name)
    if m and m.group(1) and m.group(1).startswith("images"):
        return "image"
    if m and m.group(2):
        return "mediafile"
    return "binaryfile"
