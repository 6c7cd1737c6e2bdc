"""A file's bytes in pieces: checked when stored, and checked when read back.

Written once for every layout. A store gets exactly `size` bytes or stores
nothing; whatever fetches the stored pieces (chunk rows, slices of a large
object), a reader gets exactly bytes start..end of one version, or
StreamAborted.
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from dataclasses import dataclass

from serve_image.storage.errors import (
    DatabaseUnavailable,
    SizeMismatch,
    StatementFailed,
    StreamAborted,
)
from serve_image.storage.files import FileMeta

# What a layout stores: pieces from a local file read in a thread, from bytes
# in memory, or from another site's storage (`copy`).
Pieces = Iterable[bytes] | AsyncIterable[bytes]


async def checked_offsets(pieces: Pieces, size: int, name: str) -> AsyncIterator[tuple[int, bytes]]:
    """(offset, piece) of a file being stored; SizeMismatch unless they add up to `size`.

    Every layout's store runs over this inside its transaction (or before it
    renames a file into place), so a short or long file is never committed.
    """
    offset = 0
    async for data in _each(pieces):
        if offset + len(data) > size:
            raise SizeMismatch(f"{name}: more than the {size} bytes expected")
        yield offset, data
        offset += len(data)
    if offset != size:
        raise SizeMismatch(f"{name}: read {offset} bytes, expected {size}")


async def _each(pieces: Pieces) -> AsyncIterator[bytes]:
    if isinstance(pieces, AsyncIterable):
        async for data in pieces:
            yield data
    else:
        for data in pieces:
            yield data


@dataclass(frozen=True, slots=True)
class Chunk:
    """One stored piece; its position is `offset`, never its index."""

    offset: int
    data: bytes


# fetch(meta, start, end, limit, aligned): at most `limit` pieces of this
# version of the file that overlap bytes start..end, by offset, the first
# holding `start`; none when the row no longer has this version (replaced,
# deleted). `aligned`: `start` is where the previous batch's last piece ended.
FetchPieces = Callable[[FileMeta, int, int, int, bool], Awaitable[list[Chunk]]]

# A body is read this many bytes at a time (whole pieces, at least one): few
# round trips for big files, bounded memory per reader.
BATCH_BYTES = 512 * 1024
# Pieces in a file's first batch, before the stored pieces' length is known.
FIRST_BATCH_ROWS = 4


async def read_pieces(
    fetch: FetchPieces, meta: FileMeta, start: int, end: int
) -> AsyncGenerator[bytes, None]:
    """Bytes start..end of this version of a file, checked.

    Raises StreamAborted when the file was replaced or deleted since `meta`
    was read, when its pieces leave a gap or run past its size, or when the
    database is lost. A batch is fetched (and its connection given back)
    before any of its pieces is yielded.
    """
    pos, limit, aligned = start, FIRST_BATCH_ROWS, False
    while pos <= end:
        try:
            chunks = await fetch(meta, pos, end, limit, aligned)
        except DatabaseUnavailable as e:
            raise StreamAborted(f"database lost: {e}") from None
        except StatementFailed as e:
            raise StreamAborted(f"read refused: {e}") from None
        if not chunks:
            raise StreamAborted("file replaced, deleted or missing chunks")
        aligned = True
        longest = 0
        for chunk in chunks:
            length = len(chunk.data)
            longest = max(longest, length)
            if not chunk.offset <= pos < chunk.offset + length:
                raise StreamAborted(f"no chunk holds byte {pos}")
            if chunk.offset + length > meta.size:
                raise StreamAborted("chunks add up to more than the file's size")
            lo, hi = pos - chunk.offset, min(length, end + 1 - chunk.offset)
            piece = chunk.data if lo == 0 and hi == length else chunk.data[lo:hi]
            pos += len(piece)
            yield piece
            if pos > end:
                break
        # Batches are sized from the pieces as stored, not from the site's
        # STORAGE_CHUNK_SIZE: a database written with other chunks (another
        # eZ DBChunkSize) must not make one query fetch thousands of rows.
        limit = max(1, BATCH_BYTES // max(1, longest))
