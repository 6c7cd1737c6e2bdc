"""Debian's Varnish, with the VCLs of deploy/varnish/, in front of a real serve-image node.

The node runs in the test (uvicorn on a loopback port) with a hot cache kept
an hour (CACHE_TTL = 3600), local copies and PURGE allowed from the
loopback; Varnish is started by the test with the shipped VCL, its backend
pointed at the node. The write commands run as a user runs them, with
PURGE_URLS naming Varnish and the node: after each, the next GET through
Varnish and the next GET straight at the node give the new answer.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve_image.app import ServeImage
from serve_image.settings import load_site
from tests.filetree import run_cli, write
from tests.helpers import IMG, free_port
from tests.live import live_server
from tests.system import program

VCL_DIR = Path(__file__).resolve().parent.parent / "deploy" / "varnish"
MTIME = 1_700_000_000
NAME = f"{IMG}/a.jpg"


def start_varnishd(vcl: Path, backend_port: int, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """varnishd in the foreground with `vcl`, its backend the node; and its URL."""
    varnishd = program("varnishd")
    text = vcl.read_text()
    assert '.port = "8000";' in text
    work.mkdir()
    (work / "test.vcl").write_text(text.replace('.port = "8000";', f'.port = "{backend_port}";'))
    port = free_port()
    with (work / "varnishd.log").open("wb") as log:
        proc = subprocess.Popen(
            [varnishd, "-F", "-j", "none", "-n", str(work / "state"),
             "-a", f"127.0.0.1:{port}", "-f", str(work / "test.vcl"), "-s", "malloc,32m"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@asynccontextmanager
async def varnish(vcl: Path, backend_port: int, work: Path) -> AsyncIterator[str]:
    """Varnish in front of the node for the block; yields its URL."""
    proc, url = start_varnishd(vcl, backend_port, work)
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):  # compiling the VCL takes a moment
                assert proc.poll() is None, "varnishd exited: see varnishd.log"
                try:
                    await http.get(f"{url}/-/health", timeout=1)
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("varnishd did not answer in 30 s")
        yield url
    finally:
        stop(proc)


@dataclass
class Stack:
    site: Path  # the writer's site file: PURGE_URLS names Varnish and the node
    root: Path  # the tree `import` reads
    docroot: Path  # the node's LOCAL_COPY_DIR
    node: ServeImage
    node_url: str
    varnish_url: str
    http: httpx.AsyncClient

    async def through_varnish(self, path: str) -> httpx.Response:
        return await self.http.get(f"{self.varnish_url}{path}")

    async def at_node(self, path: str) -> httpx.Response:
        return await self.http.get(f"{self.node_url}{path}")

    async def copies_written(self) -> None:
        assert self.node.local_copies is not None
        await self.node.local_copies.drain()


def hit(r: httpx.Response) -> bool:
    """Varnish answered from its cache: X-Varnish holds this request's id and the object's."""
    return len(r.headers["x-varnish"].split()) == 2


@asynccontextmanager
async def stack(tmp_path: Path, vcl: str, **extra: str) -> AsyncIterator[Stack]:
    docroot, root = tmp_path / "docroot", tmp_path / "root"
    docroot.mkdir()
    root.mkdir()
    common = 'STORAGE_DB = "cluster.sqlite"\nPURGE_TIMEOUT = 2\n' + "".join(
        f"{k} = {v!r}\n" for k, v in extra.items())
    node_site = tmp_path / "node.py"
    node_site.write_text(
        common + f"CACHE_MAX_BYTES = 1 << 20\nCACHE_TTL = 3600\nLOCAL_COPY_DIR = {str(docroot)!r}\n"
        'PURGE_ALLOW = ["127.0.0.1/32", "::1"]\n'
    )
    assert await run_cli("init-db", "--site", node_site) == 0
    node = ServeImage(load_site(str(node_site)))
    await node.startup()
    try:
        async with live_server(node) as port, \
                varnish(VCL_DIR / vcl, port, tmp_path / "varnish") as varnish_url, \
                httpx.AsyncClient() as http:
            node_url = f"http://127.0.0.1:{port}"
            site = tmp_path / "writer.py"
            site.write_text(common + f"PURGE_URLS = {[varnish_url, node_url]!r}\n")
            yield Stack(site, root, docroot, node, node_url, varnish_url, http)
    finally:
        await node.shutdown()


async def test_an_import_that_replaces_a_file_is_seen_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with stack(tmp_path, "serve-image.vcl") as s:
        write(s.root / NAME, b"version one", MTIME)
        assert await run_cli("import", "--site", s.site, "--quiet", s.root) == 0
        for _ in range(2):
            r = await s.through_varnish(f"/{NAME}")
        assert (r.status_code, r.content, hit(r)) == (200, b"version one", True)
        assert (await s.at_node(f"/{NAME}")).content == b"version one"  # now in its hot cache
        await s.copies_written()
        assert (s.docroot / NAME).read_bytes() == b"version one"

        write(s.root / NAME, b"version two, longer", MTIME + 10)
        capsys.readouterr()
        assert await run_cli("import", "--site", s.site, "--quiet", s.root) == 0
        assert capsys.readouterr().out.splitlines()[-1] == (
            "PURGE sent for 1 file(s) to 2 URL(s): all answered")
        r = await s.through_varnish(f"/{NAME}")
        assert (r.status_code, r.content, hit(r)) == (200, b"version two, longer", False)
        r = await s.at_node(f"/{NAME}")
        assert (r.status_code, r.content) == (200, b"version two, longer")
        await s.copies_written()
        assert (s.docroot / NAME).read_bytes() == b"version two, longer"


async def test_rm_is_seen_at_once_even_with_a_cache_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with stack(tmp_path, "serve-image.vcl") as s:
        write(s.root / NAME, b"soon gone", MTIME)
        assert await run_cli("import", "--site", s.site, "--quiet", s.root) == 0
        for _ in range(2):
            r = await s.through_varnish(f"/{NAME}")
        assert (r.status_code, hit(r)) == (200, True)
        assert (await s.at_node(f"/{NAME}")).status_code == 200
        await s.copies_written()
        assert (s.docroot / NAME).exists()

        # A third cache that nobody answers for: the rm stands, the others are told.
        dead = f"http://127.0.0.1:{free_port()}"
        s.site.write_text(re.sub(r"PURGE_URLS = \[(.*)\]", rf"PURGE_URLS = [\1, {dead!r}]",
                                 s.site.read_text()))
        capsys.readouterr()
        code = await asyncio.wait_for(run_cli("rm", "--site", s.site, NAME), 60)
        out = capsys.readouterr().out.splitlines()
        assert code == 0
        assert out[0] == "1 file(s) deleted"
        assert out[1].startswith(f"PURGE sent for 1 file(s) to 3 URL(s): {dead} failed for 1 (")
        assert (await s.through_varnish(f"/{NAME}")).status_code == 404
        assert (await s.at_node(f"/{NAME}")).status_code == 404
        assert not (s.docroot / NAME).exists()


async def test_xkey_purges_every_spelling_of_a_path(tmp_path: Path) -> None:
    program("/usr/lib/*/varnish/vmods/libvmod_xkey.so")
    name = f"{IMG}/café.jpg"
    upper, lower = f"/{IMG}/caf%C3%A9.jpg", f"/{IMG}/caf%c3%a9.jpg"  # one file, two URLs
    async with stack(tmp_path, "serve-image-xkey.vcl", SURROGATE_KEY_HEADER="xkey") as s:
        write(s.root / name, b"first", MTIME)
        assert await run_cli("import", "--site", s.site, "--quiet", s.root) == 0
        for path in (upper, lower):
            for _ in range(2):
                r = await s.through_varnish(path)
            assert (r.content, hit(r)) == (b"first", True)
            assert "xkey" not in r.headers  # for Varnish, not for browsers

        write(s.root / name, b"second", MTIME + 10)
        assert await run_cli("import", "--site", s.site, "--quiet", s.root) == 0
        # The PURGE names the path in upper-case hex; the key reaches the other too.
        for path in (upper, lower):
            r = await s.through_varnish(path)
            assert (r.content, hit(r)) == (b"second", False)
