"""serve-image's database reads alone: the ceiling of the `large` scenario without HTTP.

    python -m bench.db_only SITE_FILE NAME SECONDS CONNECTIONS

Reads the stored file NAME whole, over and over, CONNECTIONS at a time for
SECONDS, through the same code as the endpoint (`Layout.meta`, then
`Layout.read` in its checked batches) in one process on uvloop as a worker
runs, and drops the bytes instead of sending them. It prints the line that
bench/random_paths.lua prints for wrk, so the runner reports it like any
system: its MB/s over nginx's is the most any worker reading through this
driver could reach on this machine, and serve-image's MB/s over it is what
HTTP costs on top.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from contextlib import aclosing

import uvloop

from serve_image.settings import load_site
from serve_image.storage import make_layout, name_hash


async def run(site: str, name: str, seconds: float, connections: int) -> dict[str, object]:
    settings = load_site(site)
    layout = make_layout(settings, readonly=True)
    await layout.connect()
    key = name_hash(name)
    latencies: list[float] = []
    total = 0
    errors = 0

    async def reader(stop: float) -> None:
        nonlocal total, errors
        while time.perf_counter() < stop:
            started = time.perf_counter()
            meta = await layout.meta(key)
            if meta is None:
                raise SystemExit(f"bench.db_only: {name} is not stored in {settings.describe()}")
            got = 0
            async with aclosing(layout.read(meta, 0, meta.size - 1)) as pieces:
                async for piece in pieces:
                    got += len(piece)
            if got != meta.size:
                errors += 1
            total += got
            latencies.append(time.perf_counter() - started)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(reader(start + seconds) for _ in range(connections)))
        elapsed = time.perf_counter() - start
    finally:
        await layout.close()
    # Percentiles need two samples; a round with fewer reports what it has.
    cuts = (statistics.quantiles(latencies, n=100) if len(latencies) > 1
            else (latencies or [0.0]) * 99)
    return {
        "requests": len(latencies), "bytes": total, "duration_us": int(elapsed * 1e6),
        "errors": {"connect": 0, "read": errors, "write": 0, "status": 0, "timeout": 0},
        "p50_us": int(cuts[49] * 1e6), "p99_us": int(cuts[98] * 1e6),
        "max_us": int(max(latencies, default=0) * 1e6),
    }


def main(argv: list[str]) -> int:
    site, name, seconds, connections = argv[0], argv[1], float(argv[2]), int(argv[3])
    result = uvloop.run(run(site, name, seconds, connections))
    print("WRK_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
