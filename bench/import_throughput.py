"""Import throughput: `serve-image import` of 10 KiB files and of one 20 MiB file, per backend.

    .venv/bin/python -m bench.import_throughput [--files 2000] [--big-mib 20] [--jobs 4]
        [--rounds 2] [--backends sqlite,mysql,mysql-aiomysql,pgsql] [--out bench/results]

Each backend gets a fresh database (MariaDB and PostgreSQL from
SERVE_IMAGE_TEST_MYSQL / SERVE_IMAGE_TEST_PGSQL, as the tests), dropped
afterwards. The time is the whole `serve-image import` process (start-up and
tree walk included), best of --rounds runs, each into emptied tables. MB is
10^6 bytes. Results: OUT/import.json and OUT/import.md, with the target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Target, target_dicts
from tests.servers import create_database, drop_database, server_constants

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent
TARGET_MB_S = 25  # MariaDB, one 20 MiB file


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


def empty_tables(site: Path) -> None:
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


def measure(site: Path, root: Path, jobs: int, rounds: int) -> dict[str, Any]:
    """Best of `rounds` imports of the tree under `root`: files, bytes, seconds, rates."""
    best = float("inf")
    files = 0
    for _ in range(rounds):
        empty_tables(site)
        started = time.perf_counter()
        done = serve_image("import", "--site", site, root, "--quiet", "--jobs", str(jobs))
        best = min(best, time.perf_counter() - started)
        files = int(done.stdout.split(" ", 1)[0])
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"files": files, "bytes": size, "seconds": round(best, 3),
            "files_per_s": round(files / best, 1), "mb_s": round(size / best / 1e6, 2)}


def run_backend(label: str, tmp: Path, small: Path, big: Path, jobs: int, rounds: int
                ) -> dict[str, Any]:
    """Both imports into a fresh database of one backend (`mysql-aiomysql`: with that driver)."""
    backend, _, driver = label.partition("-")
    name = f"si_bench_{os.getpid()}_{secrets.token_hex(3)}"
    workdir = tmp / label
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
        return {"small": measure(site, small, jobs, rounds),
                "big": measure(site, big, jobs, rounds)}
    finally:
        if backend != "sqlite":
            asyncio.run(drop_database(backend, name))


def targets(results: dict[str, dict[str, Any]], big_mib: int) -> list[Target]:
    """The target, with its figure (None when MariaDB was not measured)."""
    mysql = results.get("mysql", {}).get("big", {}).get("mb_s")
    return [Target(f"one {big_mib} MiB file into MariaDB, MB/s >= {TARGET_MB_S}",
                   mysql, TARGET_MB_S)]


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# serve-image import throughput, {report['started']}", "",
             f"Command: `{report['command']}`", "", report["machine"], "",
             f"`serve-image import --jobs {s['jobs']}`, best of {s['rounds']} runs each into "
             "emptied tables, the whole process timed; MB = 10^6 bytes.", "",
             f"| backend | {s['files']} files of 10 KiB | one {s['big_mib']} MiB file |",
             "| --- | ---: | ---: |"]
    for label, r in report["results"].items():
        sm, big = r["small"], r["big"]
        lines.append(f"| {label} | {sm['files_per_s']} files/s, {sm['mb_s']} MB/s "
                     f"({sm['seconds']} s) | {big['mb_s']} MB/s ({big['seconds']} s) |")
    lines += ["", "| target | measured | met |", "| --- | ---: | :---: |"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['text']} | {'-' if t['value'] is None else t['value']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.import_throughput",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000, help="10 KiB files (2000)")
    parser.add_argument("--big-mib", type=int, default=20, help="the big file's MiB (20)")
    parser.add_argument("--jobs", type=int, default=4, help="import --jobs (4)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per import, best kept (2)")
    parser.add_argument("--backends", default="sqlite,mysql,pgsql",
                        help="sqlite, mysql, pgsql; mysql-aiomysql is mysql with "
                             "STORAGE_DRIVER = 'aiomysql'")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="bench/results")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    machine = (f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python "
               f"{platform.python_version()}; load average at start "
               + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        small, big = tmp / "small", tmp / "big"
        make_tree(small, args.files, 10 * 1024)
        make_tree(big, 1, args.big_mib * MiB)
        for label in args.backends.split(","):
            print(f"bench.import_throughput: {label}", flush=True)
            results[label] = run_backend(label, tmp, small, big, args.jobs, args.rounds)
    given = shlex.join(argv if argv is not None else sys.argv[1:])
    report = {
        "started": started,
        "command": f"python -m bench.import_throughput {given}".strip(),
        "machine": machine,
        "settings": {"files": args.files, "big_mib": args.big_mib, "jobs": args.jobs,
                     "rounds": args.rounds},
        "results": results,
        "targets": target_dicts(targets(results, args.big_mib)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "import.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / "import.md").write_text(md)
    print(md)
    print(f"bench.import_throughput: wrote {args.out}/import.json, import.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
