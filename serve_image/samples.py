"""Sample images for the demo, generated with the standard library alone."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from html import escape


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


# (path under the images directory, datatype, the file's bytes made on demand)
_DEMO: list[tuple[str, str, Callable[[], bytes]]] = [
    ("/gallery/sunrise/1-1-eng-GB/sunrise.png", "image/png", lambda: png(320, 200, 1)),
    ("/gallery/sunrise/1-1-eng-GB/sunrise_small.png", "image/png", lambda: png(80, 50, 1)),
    ("/gallery/ocean/2-1-eng-GB/ocean.png", "image/png", lambda: png(640, 400, 2)),
    ("/gallery/logo/3-1-eng-GB/logo.svg", "image/svg+xml", lambda: svg("serve-image")),
    ("-versioned/gallery/forest/4-2-eng-GB/forest.png", "image/png", lambda: png(200, 200, 3)),
]


def demo_names(var_dir: str = "var/demo") -> list[str]:
    """The names of the demo's files, without making them."""
    return [f"{var_dir}/storage/images{path}" for path, _, _ in _DEMO]


def demo_files(var_dir: str = "var/demo") -> list[tuple[str, str, bytes]]:
    """(name, datatype, bytes) of the demo's files; one is larger than a chunk."""
    return [(name, datatype, make()) for name, (_, datatype, make)
            in zip(demo_names(var_dir), _DEMO, strict=True)]


def gallery_page(var_dir: str = "var/demo") -> bytes:
    """The demo's front page: every demo image, each linked to its own URL."""
    items = "\n".join(
        f'<figure><a href="/{escape(name)}"><img src="/{escape(name)}" alt=""></a>'
        f"<figcaption>{escape(name.rpartition('/')[2])}</figcaption></figure>"
        for name in demo_names(var_dir)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>serve-image demo</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }}
img {{ max-width: 320px; border: 1px solid #ccc; }}
</style></head>
<body>
<h1>serve-image demo</h1>
<p>These images are read from the demo's SQLite database, as eZ Publish keeps them.</p>
{items}
<p id="status">loading</p>
<script>
addEventListener("load", () => {{
  const images = [...document.images];
  for (const img of images) img.dataset.naturalWidth = img.naturalWidth;
  const shown = images.filter((img) => img.naturalWidth > 0).length;
  document.getElementById("status").textContent = `${{shown}} of ${{images.length}} images shown`;
}});
</script>
</body></html>
""".encode()
