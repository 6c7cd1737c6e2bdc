"""Import throughput: `serve-image import` of 10 KiB files and of one 20 MiB file, per backend.

    .venv/bin/python -m bench.import_throughput [--files 2000] [--jobs 4] [--rounds 2]
                                                [--backends sqlite,mysql,mysql-aiomysql,pgsql]

Each backend gets a fresh database (MariaDB and PostgreSQL from
SERVE_IMAGE_TEST_MYSQL / SERVE_IMAGE_TEST_PGSQL, as the tests), dropped
afterwards. The time is the whole `serve-image import` process (start-up and
tree walk included), best of --rounds runs, each into emptied tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.servers import create_database, drop_database, server_constants

MiB = 1024 * 1024


def make_tree(root: Path, files: int, size: int) -> None:
    rng = random.Random(1)
    for i in range(files):
        path = root / f"var/bench/storage/images/{i % 50:02d}/{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))


def site_file(constants: dict[str, Any], directory: Path) -> Path:
    path = directory / "site.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    return path


def serve_image(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serve_image", *map(str, argv)],
                          capture_output=True, text=True, check=True)


def empty_tables(site: Path, backend: str) -> None:
    code = (
        "import asyncio, sys\n"
        "from serve_image.storage import make_layout\n"
        "from serve_image.settings import load_site\n"
        "async def main():\n"
        "    b = make_layout(load_site(sys.argv[1])); await b.connect()\n"
        "    await b.driver.execute('DELETE FROM ezdbfile_data')\n"
        "    await b.driver.execute('DELETE FROM ezdbfile')\n"
        "    await b.close()\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", code, str(site)], check=True)


def measure(site: Path, backend: str, root: Path, jobs: int, rounds: int) -> tuple[float, int, int]:
    best = float("inf")
    files = size = 0
    for _ in range(rounds):
        empty_tables(site, backend)
        started = time.perf_counter()
        done = serve_image("import", "--site", site, root, "--quiet", "--jobs", str(jobs))
        best = min(best, time.perf_counter() - started)
        files = int(done.stdout.split(" ", 1)[0])
    for p in root.rglob("*"):
        if p.is_file():
            size += p.stat().st_size
    return best, files, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", default="sqlite,mysql,pgsql",
                        help="sqlite, mysql, pgsql; mysql-aiomysql is mysql with "
                             "STORAGE_DRIVER = 'aiomysql'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small", Path(tmp) / "big"
        make_tree(small, args.files, 10 * 1024)
        make_tree(big, 1, 20 * MiB)
        print("| backend | 10 KiB files | 20 MiB file |")
        print("| --- | --- | --- |")
        for label in args.backends.split(","):
            backend, _, driver = label.partition("-")
            name = f"si_bench_{os.getpid()}_{secrets.token_hex(3)}"
            workdir = Path(tmp) / label
            workdir.mkdir()
            if backend == "sqlite":
                constants: dict[str, Any] = {"STORAGE_BACKEND": "sqlite",
                                             "STORAGE_DB": str(workdir / "bench.sqlite")}
            else:
                asyncio.run(create_database(backend, name))
                constants = {**server_constants(backend), "STORAGE_DB": name}
                if driver:
                    constants["STORAGE_DRIVER"] = driver
            try:
                site = site_file(constants, workdir)
                serve_image("init-db", "--site", site)
                t1, n1, s1 = measure(site, backend, small, args.jobs, args.rounds)
                t2, _, s2 = measure(site, backend, big, args.jobs, args.rounds)
                print(f"| {label} | {n1 / t1:.0f} files/s, {s1 / t1 / 1e6:.1f} MB/s "
                      f"({n1} in {t1:.2f} s) | {s2 / t2 / 1e6:.1f} MB/s ({t2:.2f} s) |", flush=True)
            finally:
                if backend != "sqlite":
                    asyncio.run(drop_database(backend, name))


if __name__ == "__main__":
    main()
