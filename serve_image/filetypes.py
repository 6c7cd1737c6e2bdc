"""What a file is: its MIME type (from its bytes, then its name) and its eZ scope (by path)."""

from __future__ import annotations

import functools
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
# The registered top-level media types (IANA's registry of them, RFC 9694):
# RFC 2046 §3, `model` (RFC 2077), `font` (RFC 8081), `haptics` (RFC 9695);
# `example` (RFC 4735) is for documentation only. Each new one needs a
# standards-track RFC (RFC 6838 §4.2.7), so the list is short and seldom grows.
_TOP_LEVEL_TYPES = frozenset({
    "application", "audio", "font", "haptics", "image", "message", "model", "multipart",
    "text", "video",
})
# eZ keeps a binary file or a media file under storage/original/<MIME group>/
# (eZBinaryFile::storedFileInfo); eZMedia's files are video and audio.
_SCOPE_RE = re.compile(r"(?:^|/)storage/(images(?:-versioned)?|original/(video|audio))?(?:/|$)")


def guess_datatype(head: bytes, name: str) -> str:
    """The MIME type from the file's first bytes, else its name, else octet-stream.

    Only a registered type is returned (see `is_registered`): puremagic has
    names of its own (`text/ascii` for a text of ASCII digits), and a stored
    type is sent as Content-Type to every client.
    """
    by_name, encoding = mimetypes.guess_type(name, strict=False)
    if encoding is not None:
        by_name = None  # `x.svg.gz`: the name's type is that of the bytes once unzipped
    by_content = ""
    if head:
        try:
            by_content = puremagic.from_string(head, mime=True, filename=name)
        except (puremagic.PureError, ValueError):
            by_content = ""
    if by_name and not is_registered(by_name):
        by_name = None
    if by_content and is_registered(by_content):
        if by_content in _GENERIC and by_name:
            return by_name
        return by_content
    return by_name or DEFAULT_TYPE


def is_registered(media_type: str) -> bool:
    """Whether a type is one we may store: known to `mimetypes`, under a registered top-level type.

    Python's `mimetypes` knows the types of its own table (kept with CPython)
    and of the system's mime.types (on Debian, the media-types package, kept
    from the IANA registry); the top-level type must be one IANA registers,
    which rules out such names as `chemical/x-pdb`. Case does not matter
    (RFC 6838 §4.2).
    """
    essence = media_type.split(";", 1)[0].strip().lower()
    return essence.split("/", 1)[0] in _TOP_LEVEL_TYPES and essence in _known_types()


@functools.cache
def _known_types() -> frozenset[str]:
    if not mimetypes.inited:
        mimetypes.init()
    known = (*mimetypes.types_map.values(), *mimetypes.common_types.values())
    return frozenset(t.lower() for t in known)


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
