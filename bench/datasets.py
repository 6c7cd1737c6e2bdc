"""The data sets: the same files on disk and in each database, and the systems that serve them.

Each entry of DATA_SETS sets one up as an async context: it writes (or
reuses) the files, stores them in a fresh database per backend, starts its
systems and checks them, yields the Stage the scenarios run on, and stops
and drops everything on the way out. Data sets run one after the
other, so no system of one competes with another's.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, procfs, realistic, systems
from bench.data import CHUNK_SIZE, Databases, fill, make_files, site_constants
from bench.systems import System

BACKENDS = ("mysql", "pgsql", "sqlite")
# A TTL longer than one interleaved round: each system idles while the others
# run, and a shorter TTL would make every round start with a cold cache,
# which steady traffic does not see.
HOT_CACHE: dict[str, Any] = {"CACHE_MAX_BYTES": 64 * 1024 * 1024, "CACHE_TTL": 60}
# The realistic data set's: the same bound, and the longest TTL allowed, for
# the same reason (its rounds are longer). Its serve-image systems all serve
# metrics, cache or not, so the hot cache's hits can be read.
REALISTIC_CACHE: dict[str, Any] = {**HOT_CACHE, "CACHE_TTL": 600}
REALISTIC_SITE: dict[str, Any] = {"METRICS_PATH": systems.METRICS_PATH}


@dataclass
class Context:
    """What every data set gets from the runner."""

    tmp: Path  # removed at the end
    work: Path  # kept between runs (bench/work/)
    backends: list[str]
    wanted: Callable[[str], bool]  # whether a system of this name is to run
    realistic_files: int = realistic.FILE_COUNT  # fewer in the tests


@dataclass
class Stage:
    """A data set made ready: its running systems, and what the scenarios take from it."""

    systems: list[System]
    paths: dict[str, dict[str, Path]]  # system name -> request list name -> file for wrk
    files: dict[str, list[str]]  # named lists of file names (stage.files["large"])
    notes: dict[str, Any] = field(default_factory=dict)  # for the results: fill times, sizes


async def _servers(sites: dict[str, dict[str, Any]], notes: dict[str, Any]
                   ) -> dict[str, procfs.DatabaseServer | None]:
    """Each backend's server process, or None (and why, in notes) if it cannot be read here."""
    out: dict[str, procfs.DatabaseServer | None] = {}
    for backend, constants in sites.items():
        out[backend] = None
        if backend == "sqlite":
            continue  # in the worker's own process
        try:
            found = await procfs.database_server(constants)
        except procfs.NotHere as e:
            print(f"bench: no database CPU for {backend}: {e}", flush=True)
            notes.setdefault("database_servers", {})[backend] = str(e)
        else:
            out[backend] = found
            notes.setdefault("database_servers", {})[backend] = f"pid {found.pid}"
    return out


async def _fill_timed(backend: str, constants: dict[str, Any], root: Path,
                      names: Sequence[str], notes: dict[str, Any]) -> None:
    started = time.perf_counter()
    await fill(constants, root, names)
    notes.setdefault("fill_s", {})[backend] = round(time.perf_counter() - started, 1)


def _start(chosen: list[System], tmp: Path, first: str) -> None:
    for s in chosen:
        s.start(tmp)
    for s in chosen:
        if not s.db_only:
            load.wait_ready(s, "/" + first)


def _stop(chosen: list[System]) -> None:
    for s in chosen:
        s.stop()


# -- standard: 1,000 files of 10 KiB and 20 of 5 MiB ---------------------------


def _prime(system: System, small: list[str], large: list[str]) -> None:
    """GET every file once (warms every cache, checks every answer) and keep the ETags."""
    with closing(http.client.HTTPConnection("127.0.0.1", system.port, timeout=30)
                            ) as conn:
        _prime_on(conn, system, small, large)


def _prime_on(conn: http.client.HTTPConnection, system: System, small: list[str],
              large: list[str]) -> None:
    for name in small:
        status, headers, body = load.get(conn, "/" + name)
        if status != 200 or len(body) != 10 * 1024:
            raise RuntimeError(f"{system.name}: GET /{name} gave {status}, {len(body)} bytes")
        system.etags[name] = headers["etag"]
    status, _, _ = load.get(conn, "/" + small[0], {"If-None-Match": system.etags[small[0]]})
    if status != 304:
        raise RuntimeError(f"{system.name}: If-None-Match gave {status}, not 304")
    status, _, body = load.get(conn, "/" + large[0])
    if status != 200 or len(body) != 5 * 1024 * 1024:
        raise RuntimeError(f"{system.name}: GET /{large[0]} gave {status}, {len(body)} bytes")


# The DFS systems' layout (`dfs_sites`): the same files, their rows in
# ezdfsfile, their bytes on a mount of their own.
DFS_BACKENDS = ("mysql", "pgsql")
OFFLOAD = "x-accel-redirect:/__dfs/"


def dfs_systems(tmp: Path, mount: Path, sites: dict[str, dict[str, Any]],
                servers: dict[str, procfs.DatabaseServer | None]) -> list[System]:
    """Per backend, serve-image on a DFS site with 1 worker, and nginx in front of it with
    OFFLOAD (nginx sends the files); nginx serving the mount itself."""
    out = []
    for backend, constants in sites.items():
        site = systems.site_file(tmp / f"site_{backend}_dfs.py", constants)
        out.append(systems.serve_image(f"serve-image-{backend}-dfs-1w", site, 1,
                                       servers[backend]))
        offload = systems.site_file(tmp / f"site_{backend}_dfs_offload.py",
                                    {**constants, "OFFLOAD": OFFLOAD})
        out.append(systems.nginx_offload(f"serve-image-{backend}-dfs-offload", tmp, offload,
                                         servers[backend]))
    if sites:
        out.append(systems.nginx(tmp, mount, "nginx-mount"))
    return out


def standard_systems(tmp: Path, docroot: Path, sites: dict[str, dict[str, Any]],
                     servers: dict[str, procfs.DatabaseServer | None]) -> list[System]:
    """serve-image per backend with 1 and 2 workers (and MariaDB with aiomysql, with
    the hot cache, and under granian with and without it), nginx from disk, the
    naive port per backend, and the two halves of serve-image alone: its HTTP side
    (files from memory) and its database reads per backend."""
    out = []
    for backend, constants in sites.items():
        site = systems.site_file(tmp / f"site_{backend}.py", constants)
        for workers in (1, 2):
            out.append(systems.serve_image(f"serve-image-{backend}-{workers}w", site, workers,
                                           servers[backend]))
    if "mysql" in sites:
        # variant -> (site constants, `serve` flags) over serve-image-mysql-1w's.
        granian = ["--server", "granian"]
        variants: dict[str, tuple[dict[str, Any], list[str]]] = {
            "aiomysql": ({"STORAGE_DRIVER": "aiomysql"}, []), "cache": (HOT_CACHE, []),
            "granian": ({}, granian), "cache-granian": (HOT_CACHE, granian),
        }
        for variant, (extra, flags) in variants.items():
            site = systems.site_file(tmp / f"site_mysql_{variant}.py", {**sites["mysql"], **extra})
            out.append(systems.serve_image(f"serve-image-mysql-1w-{variant}", site, 1,
                                           servers["mysql"], flags=flags))
    out.append(systems.nginx(tmp, docroot))
    out += [systems.naive(b, tmp / f"site_{b}.py", servers[b]) for b in sites]
    out.append(systems.http_only(docroot))
    out += [systems.db_only(b, tmp / f"site_{b}.py", servers[b]) for b in sites]
    return out


@asynccontextmanager
async def standard(ctx: Context) -> AsyncIterator[Stage]:
    docroot = ctx.tmp / "root"
    mount = ctx.tmp / "mount"
    dbs = Databases(ctx.tmp)
    dfs_dbs = Databases(ctx.tmp)
    chosen: list[System] = []
    try:
        print(f"bench: writing files under {docroot}", flush=True)
        files = await asyncio.to_thread(make_files, docroot)
        sites = {b: await dbs.create(b) for b in ctx.backends}
        print(f"bench: filling {', '.join(ctx.backends)} databases ({dbs.name})", flush=True)
        names = files.small + files.large
        notes: dict[str, Any] = {"files": f"{len(files.small)} of 10 KiB, "
                                          f"{len(files.large)} of 5 MiB"}
        await asyncio.gather(*(_fill_timed(b, c, docroot, names, notes)
                               for b, c in sites.items()))
        servers = await _servers(sites, notes)
        candidates = standard_systems(ctx.tmp, docroot, sites, servers)
        dfs = [b for b in DFS_BACKENDS if b in ctx.backends]
        if any(ctx.wanted(f"serve-image-{b}-dfs-{kind}") for b in dfs
               for kind in ("1w", "offload")):
            mount.mkdir(mode=0o755)
            dfs_sites = {b: {**await dfs_dbs.create(b), "STORAGE_LAYOUT": "dfs",
                             "DFS_MOUNT_POINT": str(mount)} for b in dfs}
            # One after the other: both write the same files to the one mount.
            for b, c in dfs_sites.items():
                await _fill_timed(f"{b}-dfs", c, docroot, names, notes)
            candidates += dfs_systems(ctx.tmp, mount, dfs_sites, servers)
        chosen = [s for s in candidates if ctx.wanted(s.name)]
        _start(chosen, ctx.tmp, files.small[0])
        paths: dict[str, dict[str, Path]] = {}
        large = ctx.tmp / "paths_large.txt"
        large.write_text(f"/{files.large[0]}\t\n")
        for s in chosen:
            if s.db_only:
                continue
            await asyncio.to_thread(_prime, s, files.small, files.large)
            small = ctx.tmp / f"paths_{s.name}.txt"
            small.write_text("".join(f"/{n}\t{s.etags[n]}\n" for n in files.small))
            paths[s.name] = {"small": small, "large": large}
        yield Stage(chosen, paths, {"large": files.large}, notes)
    finally:
        _stop(chosen)
        await dbs.drop_all()
        await dfs_dbs.drop_all()


# -- realistic: bench/realistic.py ------------------------------------------------


def _check(system: System, files: realistic.RealisticFiles) -> None:
    """GET the most popular file of each size class and compare it with the disk."""
    firsts = {name.rsplit("-", 1)[1]: name for name in reversed(files.names)}
    with closing(http.client.HTTPConnection("127.0.0.1", system.port, timeout=30)
                            ) as conn:
        for name in firsts.values():
            status, _, body = load.get(conn, "/" + name)
            if status != 200 or body != (files.root / name).read_bytes():
                raise RuntimeError(f"{system.name}: GET /{name} gave {status}, {len(body)} "
                                   "bytes, not the file on disk")


async def _sqlite_copy(files: realistic.RealisticFiles, notes: dict[str, Any]) -> dict[str, Any]:
    """The SQLite database of the files, made once and kept beside them."""
    path = realistic.sqlite_path(files)
    if not path.is_file():
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        partial.unlink(missing_ok=True)
        await _fill_timed("sqlite", site_constants("sqlite", str(partial)), files.root,
                          files.names, notes)
        partial.rename(path)
    else:
        notes.setdefault("fill_s", {})["sqlite"] = f"reused {path}"
    return site_constants("sqlite", str(path))


def realistic_systems(tmp: Path, docroot: Path, sites: dict[str, dict[str, Any]],
                      servers: dict[str, procfs.DatabaseServer | None]) -> list[System]:
    """serve-image per backend with 1 and 2 workers, hot cache off and on, all serving
    metrics; nginx from disk; the naive port per backend."""
    out = []
    for backend, constants in sites.items():
        for cache in (False, True):
            extra = {**REALISTIC_SITE, **(REALISTIC_CACHE if cache else {})}
            site = systems.site_file(tmp / f"site_{backend}{'_cache' if cache else ''}.py",
                                     {**constants, **extra})
            for workers in (1, 2):
                name = f"serve-image-{backend}-{workers}w{'-cache' if cache else ''}"
                out.append(systems.serve_image(name, site, workers, servers[backend],
                                               metrics=True))
    out.append(systems.nginx(tmp, docroot))
    out += [systems.naive(b, tmp / f"site_{b}.py", servers[b]) for b in sites]
    return out


@asynccontextmanager
async def realistic_set(ctx: Context) -> AsyncIterator[Stage]:
    tmp = ctx.tmp / "realistic"
    tmp.mkdir()
    dbs = Databases(tmp)
    chosen: list[System] = []
    try:
        print(f"bench: realistic files under {ctx.work}", flush=True)
        files = await asyncio.to_thread(realistic.materialise, ctx.work, ctx.realistic_files)
        notes: dict[str, Any] = {
            "files": len(files.names), "bytes": sum(files.sizes),
            "mean_request_bytes": files.mean_request_bytes, "zipf_s": realistic.ZIPF_S,
            "chunk_size": CHUNK_SIZE,
        }
        sites = {b: await dbs.create(b) for b in ctx.backends if b != "sqlite"}
        print(f"bench: filling {', '.join(ctx.backends)} with {len(files.names)} files "
              f"({sum(files.sizes) / 1e6:.0f} MB)", flush=True)
        started = time.perf_counter()
        jobs = [_fill_timed(b, c, files.root, files.names, notes) for b, c in sites.items()]

        async def sqlite() -> None:
            sites["sqlite"] = await _sqlite_copy(files, notes)

        if "sqlite" in ctx.backends:
            jobs.append(sqlite())
        await asyncio.gather(*jobs)
        # The backends are filled at the same time: each one's time is its own share of this.
        notes["fill_wall_s"] = round(time.perf_counter() - started, 1)
        servers = await _servers(sites, notes)
        chosen = [s for s in realistic_systems(tmp, files.root, sites, servers)
                  if ctx.wanted(s.name)]
        _start(chosen, tmp, files.names[0])
        for s in chosen:
            await asyncio.to_thread(_check, s, files)
        yield Stage(chosen, {s.name: {"zipf": files.sequence} for s in chosen}, {}, notes)
    finally:
        _stop(chosen)
        await dbs.drop_all()


# In the order they run.
DATA_SETS: dict[str, Callable[[Context], AbstractAsyncContextManager[Stage]]] = {
    "standard": standard,
    "realistic": realistic_set,
}
