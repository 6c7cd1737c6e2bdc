"""The hot path: one request for a stored file -> headers from its row -> chunks.

A plain ASGI callable: the request needs no routing, no middleware and no
Request object, only the raw path and five request headers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import aclosing
from typing import Any

from serve_image import conditional, ranges
from serve_image.batching import BatchedReads
from serve_image.cache import HotCache
from serve_image.errors import MethodNotAllowed, NotFound, PreconditionFailed
from serve_image.headers import Clock, content_disposition, content_type, is_download, type_headers
from serve_image.localcopy import LocalCopies
from serve_image.offload import Offload
from serve_image.paths import FileName, request_name
from serve_image.settings import Settings
from serve_image.storage import FileMeta, Layout, StreamAborted, name_hash

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Header = tuple[bytes, bytes]
Headers = list[Header]

logger = logging.getLogger("serve_image.endpoint")

# Paths and file versions whose resolved name and headers are remembered.
MEMO_SIZE = 4096
_WANTED = frozenset(
    (b"range", b"if-range", b"if-match", b"if-none-match", b"if-modified-since",
     b"if-unmodified-since")
)
_CONDITIONS = (b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since")
# RFC 9110 §15.4.5: a 304 carries the fields a 200 would have sent among
# Cache-Control, Content-Location, Date, ETag, Expires and Vary; Date comes
# from the server, Expires is added per request.
_NOT_MODIFIED_FIELDS = frozenset((b"cache-control", b"etag"))


class ImageEndpoint:
    """GET and HEAD of `/var/<dir>/storage/images[-versioned]/...` from the database."""

    def __init__(
        self, settings: Settings, layout: Layout, local_copies: LocalCopies | None = None,
        cache: HotCache | None = None,
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.clock = Clock(settings.expiry_timeout)
        self.download_non_images = settings.download_non_images
        # The per-site part of every 200, encoded once.
        fixed: Headers = [(b"x-content-type-options", b"nosniff")]
        if settings.http_range:
            fixed.append((b"accept-ranges", b"bytes"))
        self.fixed = fixed
        self.cache_control = settings.cache_control.encode("latin-1")
        self.cache_control_versioned = settings.cache_control_versioned.encode("latin-1")
        # LOCAL_COPY_DIR: files served whole are copied to disk after the response.
        self.local_copies = local_copies
        # CACHE_MAX_BYTES: small files answered from memory for up to CACHE_TTL.
        self.cache = cache
        # SURROGATE_KEY_HEADER: each file's cache key (its name hash) for a
        # proxy that purges by key (Varnish's xkey vmod, a CDN's surrogate keys).
        self.key_header = (
            settings.surrogate_key_header.encode("latin-1")
            if settings.surrogate_key_header else None
        )
        # Concurrent reads of rows share queries while the database is busy.
        self.reads = BatchedReads(layout)
        # OFFLOAD: a 200's bytes are sent by the web server in front (offload.py).
        self.offload = Offload.from_setting(settings.offload)

        # What follows from the path alone, and the headers that follow from a
        # file's version alone, are worked out once and remembered (as
        # Whitenoise builds a file's headers when it first sees it); bounded,
        # so requests for ever new paths cannot grow them.
        self._resolve = functools.lru_cache(maxsize=MEMO_SIZE)(self._resolve_path)
        self._file_headers = functools.lru_cache(maxsize=MEMO_SIZE)(self._build_headers)

    def _resolve_path(self, raw_path: bytes) -> tuple[FileName, str]:
        file = request_name(raw_path, self.settings.var_dir)
        return file, name_hash(file.name)

    def _build_headers(
        self, meta: FileMeta, versioned: bool, name: str
    ) -> tuple[str | None, tuple[Header, ...], tuple[Header, ...]]:
        """The ETag; every header of a 200 but Expires and Content-Length; those of a 304
        but Expires."""
        s = self.settings
        etag = None
        if s.http_cache:
            etag = conditional.make_etag(meta.name_hash, meta.mtime, meta.size)
        headers: Headers = list(type_headers(meta.datatype, False))
        headers += self.fixed
        cache_control = self.cache_control_versioned if versioned else self.cache_control
        headers.append((b"cache-control", cache_control))
        if etag is not None:
            headers.append((b"etag", etag.encode("latin-1")))
            headers.append((b"last-modified", conditional.http_date(meta.mtime).encode("latin-1")))
        if self.download_non_images and is_download(meta.datatype):
            headers.append((b"content-disposition", content_disposition(name)))
        if self.key_header is not None:
            headers.append((self.key_header, meta.name_hash.encode("latin-1")))
        not_modified = tuple(h for h in headers if h[0] in _NOT_MODIFIED_FIELDS)
        return etag, tuple(headers), not_modified

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        file, name_hash = self._resolve(raw_path)
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed()
        req: dict[bytes, str] = {}
        for key, value in scope["headers"]:
            if key in _WANTED:
                # Repeated fields are one comma-separated list (RFC 9110 §5.3);
                # a repeated date or Range then fails to parse and is ignored.
                text = value.decode("latin-1")
                req[key] = f"{req[key]}, {text}" if key in req else text
        s = self.settings
        conditional_request = s.http_cache and any(k in req for k in _CONDITIONS)
        # RFC 9110 §14.2: GET is the only method with range handling, and a
        # server MUST ignore Range on any other: HEAD answers as a GET without
        # Range would (200, the whole Content-Length), whatever If-Range says.
        range_header = req.get(b"range") if s.http_range and method == "GET" else None

        first: bytes | None = None
        meta: FileMeta | None
        offload = self.offload if self.offload and self.offload.applies(method, req) else None
        whole_get = (method == "GET" and not conditional_request and range_header is None
                     and offload is None)
        hot = self.cache.get(name_hash, need_body=whole_get) if self.cache is not None else None
        if hot is not None:
            meta, first = hot.meta, hot.body
        else:
            # Taken before the read: a purge that comes during it keeps it out of the cache.
            stamp = self.cache.stamp(name_hash) if self.cache is not None else 0
            if whole_get:
                got = await self.reads.first(name_hash)
                meta = got[0] if got else None
                first = got[1] if got else None
                if self.cache is not None and meta is not None and first is not None:
                    self.cache.put(meta, first, stamp)
            else:
                # 304, 412, 416 and HEAD are decided from the row alone.
                meta = await self.reads.meta(name_hash)
                if self.cache is not None and meta is not None:
                    self.cache.put_meta(meta, stamp)
        if meta is None or not meta.live:
            raise NotFound()

        etag, file_headers, not_modified = self._file_headers(meta, file.versioned, file.name)
        last_modified = meta.mtime if s.http_cache else None
        expires = (b"expires", self.clock.expires())

        if conditional_request:
            outcome = conditional.evaluate(
                method, etag, last_modified,
                if_match=req.get(b"if-match"),
                if_none_match=req.get(b"if-none-match"),
                if_modified_since=req.get(b"if-modified-since"),
                if_unmodified_since=req.get(b"if-unmodified-since"),
            )
            if outcome is conditional.Outcome.PRECONDITION_FAILED:
                raise PreconditionFailed()
            if outcome is conditional.Outcome.NOT_MODIFIED:
                await send({"type": "http.response.start", "status": 304,
                            "headers": [*not_modified, expires]})
                await send({"type": "http.response.body", "body": b""})
                return
        headers: Headers = [*file_headers, expires]

        wanted = None
        if range_header is not None:
            if_range = req.get(b"if-range")
            if if_range is None or conditional.if_range_matches(if_range, etag, last_modified):
                # Raises RangeNotSatisfiable (416), mapped to a response in app.py.
                wanted = ranges.parse_range(range_header, meta.size)
        if offload is not None and (path := self.layout.local_path(meta)) is not None:
            # The web server sends the file and answers the Range itself;
            # this hop's body is empty (offload.py). Checked first: a 503
            # for a write in progress is ours to send.
            await self.layout.check(meta)
            headers += [(b"content-length", b"0"), offload.field(file.name, path)]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if meta.size and (first is None or len(first) < meta.size):
            # Not all the bytes are in hand: before any header goes out, the
            # layout makes sure this version can be read now (FileUnavailable
            # is a 503 then, never a 200 cut short).
            await self.layout.check(meta)

        if wanted is None:
            await self._send_whole(method, meta, first, headers, receive, send, file.name)
        elif len(wanted) == 1:
            await self._send_range(meta, wanted[0], headers, receive, send, file.name)
        else:
            await self._send_multipart(meta, wanted, headers, receive, send, file.name)

    async def _send_whole(
        self, method: str, meta: FileMeta, first: bytes | None, headers: Headers,
        receive: Receive, send: Send, name: str,
    ) -> None:
        headers.append((b"content-length", str(meta.size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if method == "HEAD" or meta.size == 0:
            await send({"type": "http.response.body", "body": b""})
            if method == "GET" and self.local_copies is not None:
                self.local_copies.offer(name, meta, b"")
            return
        if first is not None and len(first) >= meta.size:
            # The common case: a small image, read with its row in one query.
            if len(first) > meta.size:
                logger.error("aborted %s: first chunk longer than the file's size", name)
                return
            await send({"type": "http.response.body", "body": first})
            if self.local_copies is not None:
                self.local_copies.offer(name, meta, first)
            return
        pos = 0
        if first:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            pos = len(first)
        if await self._stream(meta, pos, meta.size - 1, receive, send, name):
            await send({"type": "http.response.body", "body": b""})
            if self.local_copies is not None:
                self.local_copies.offer(name, meta, None)

    async def _send_range(
        self, meta: FileMeta, r: ranges.Range, headers: Headers,
        receive: Receive, send: Send, name: str,
    ) -> None:
        headers.append((b"content-range", ranges.content_range(r, meta.size).encode()))
        headers.append((b"content-length", str(r[1] - r[0] + 1).encode()))
        await send({"type": "http.response.start", "status": 206, "headers": headers})
        if await self._stream(meta, r[0], r[1], receive, send, name):
            await send({"type": "http.response.body", "body": b""})

    async def _send_multipart(
        self, meta: FileMeta, wanted: list[ranges.Range], headers: Headers,
        receive: Receive, send: Send, name: str,
    ) -> None:
        boundary = secrets.token_hex(12)
        ctype = content_type(meta.datatype)
        heads, tail, length = ranges.multipart_parts(wanted, meta.size, ctype, boundary)
        # The type moves into the parts (RFC 9110 §14.6).
        headers = [h for h in headers if h[0] != b"content-type"]
        headers.append((b"content-type", f"multipart/byteranges; boundary={boundary}".encode()))
        headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": 206, "headers": headers})
        for head, r in zip(heads, wanted, strict=True):
            await send({"type": "http.response.body", "body": head, "more_body": True})
            if not await self._stream(meta, r[0], r[1], receive, send, name):
                return
            await send({"type": "http.response.body", "body": b"\r\n", "more_body": True})
        await send({"type": "http.response.body", "body": tail})

    async def _stream(
        self, meta: FileMeta, start: int, end: int, receive: Receive, send: Send, name: str
    ) -> bool:
        """Send bytes start..end as `more_body` parts; False when the response was cut off.

        The pool's connection is taken per batch of chunk rows and given back
        before the bytes are sent, so a slow client holds no connection.
        """
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
        pos = start
        try:
            async with aclosing(self.layout.read(meta, start, end)) as pieces:
                async for piece in pieces:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    pos += len(piece)
                    if gone.is_set():
                        return False  # no reads for nobody
            return True
        except StreamAborted as e:
            # Headers are out: the only honest answer left is to cut the
            # connection, so the client sees a broken transfer, not wrong bytes.
            logger.error("aborted %s at byte %d of %d: %s", name, pos, meta.size, e)
            return False
        finally:
            watcher.cancel()


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return
