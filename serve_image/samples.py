"""Sample images for the demo, generated with the standard library alone."""

from __future__ import annotations

import struct
import zlib


def png(width: int, height: int, seed: int) -> bytes:
    """An RGB PNG with a gradient pattern (RFC 2083)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(((x * 255 // width + seed * 40) % 256, (y * 255 // height) % 256,
                           ((x ^ y) + seed * 70) % 256))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(rows), 9)) + chunk(b"IEND", b""))


def svg(label: str) -> bytes:
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="320" height="120" viewBox="0 0 320 120">'
        '<rect width="320" height="120" rx="12" fill="#2b6cb0"/>'
        f'<text x="160" y="70" font-family="sans-serif" font-size="28" fill="white" '
        f'text-anchor="middle">{label}</text></svg>'
    ).encode()


def demo_files(var_dir: str = "var/demo") -> list[tuple[str, str, bytes]]:
    """(name, datatype, bytes) of the demo's files; one is larger than a chunk."""
    base = f"{var_dir}/storage/images"
    return [
        (f"{base}/gallery/sunrise/1-1-eng-GB/sunrise.png", "image/png", png(320, 200, 1)),
        (f"{base}/gallery/sunrise/1-1-eng-GB/sunrise_small.png", "image/png", png(80, 50, 1)),
        (f"{base}/gallery/ocean/2-1-eng-GB/ocean.png", "image/png", png(640, 400, 2)),
        (f"{base}/gallery/logo/3-1-eng-GB/logo.svg", "image/svg+xml", svg("serve-image")),
        (f"{base}-versioned/gallery/forest/4-2-eng-GB/forest.png", "image/png", png(200, 200, 3)),
    ]
