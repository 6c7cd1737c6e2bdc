"""The HTTP side alone: the ceiling of any uvicorn app sending serve-image's responses.

Files come from memory (read from the benchmark's document root on first
request, cut in eZ's 65535-byte pieces as serve-image sends chunk rows) with
the same eight headers a serve-image 200 has, and a 304 for a matching
If-None-Match. No database, no checks, no copies. Run under uvicorn with
the settings `serve-image serve` uses:

    SERVE_IMAGE_BENCH_ROOT=DIR uvicorn --factory bench.baselines.http_only:from_environment \\
        --no-access-log --no-server-header

Its figures over nginx's are the most a uvicorn worker reaches on this
machine; serve-image's over its own are what the database reads cost.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from serve_image.conditional import http_date, make_etag
from serve_image.headers import Clock
from serve_image.storage import name_hash

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PIECE = 65535  # eZ's DBChunkSize: serve-image sends one chunk row per message


class HttpOnly:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        # path -> (pieces of the body, headers but Expires, etag)
        self.files: dict[str, tuple[list[bytes], list[tuple[bytes, bytes]], bytes]] = {}
        self.clock = Clock(86400)  # serve-image's Expires, formatted once a second

    def _load(self, path: str) -> tuple[list[bytes], list[tuple[bytes, bytes]], bytes] | None:
        found = self.files.get(path)
        if found is not None:
            return found
        target = (self.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        body = target.read_bytes()
        mtime = int(target.stat().st_mtime)
        etag = make_etag(name_hash(path.lstrip("/")), mtime, len(body)).encode()
        headers = [
            (b"content-type", b"image/jpeg"), (b"x-content-type-options", b"nosniff"),
            (b"accept-ranges", b"bytes"), (b"cache-control", b"public, max-age=86400"),
            (b"etag", etag), (b"last-modified", http_date(mtime).encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        pieces = [body[i:i + PIECE] for i in range(0, len(body), PIECE)] or [b""]
        self.files[path] = (pieces, headers, etag)
        return self.files[path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        found = self._load(scope["path"])
        if found is None:
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        pieces, headers, etag = found
        expires = (b"expires", self.clock.expires())
        for key, value in scope["headers"]:
            if key == b"if-none-match" and value == etag:
                await send({"type": "http.response.start", "status": 304,
                            "headers": [headers[3], headers[4], expires]})
                await send({"type": "http.response.body", "body": b""})
                return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, expires]})
        if len(pieces) == 1:
            await send({"type": "http.response.body", "body": pieces[0]})
            return
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def from_environment() -> HttpOnly:
    return HttpOnly(Path(os.environ["SERVE_IMAGE_BENCH_ROOT"]))
