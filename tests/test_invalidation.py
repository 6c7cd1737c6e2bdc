"""Invalidation: the PURGE every write sends (PURGE_URLS), and a node's answer to one (PURGE_ALLOW).

Purges are sent to real HTTP servers on loopback ports (a recorder that
answers what it is told, or real serve-image nodes); a node is a real
ServeImage, called in-process with the client address of the test's choice,
or served by a real `serve-image serve`. Varnish: tests/test_varnish.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serve_image import localfs
from serve_image.app import ServeImage
from serve_image.cache import HotCache
from serve_image.cluster import ClusterFiles
from serve_image.purge import PER_URL, Purger, purge_path
from serve_image.purgeboard import PurgeBoard
from serve_image.settings import Settings, SiteConfigError, settings_from_mapping
from serve_image.storage import FileMeta, Layout, make_layout
from serve_image.watch import Journal, Watcher
from tests.filetree import cli_command, run_cli, site_file_for
from tests.helpers import IMG, free_port, md5, running, store
from tests.live import call, live_server, recorder

MTIME = 1_700_000_000
NAME = f"{IMG}/a.jpg"
sqlite_only = pytest.mark.parametrize("backend_name", ["sqlite"])


@pytest.fixture(autouse=True)
def private_boards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Purge boards in the test's own directory, not in /dev/shm.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))


def node_settings(settings: Settings, tmp_path: Path, **changes: object) -> Settings:
    """The node of a test: its own site file name (so its own purge board)."""
    return dataclasses.replace(settings, source=str(tmp_path / "node.py"), **changes)


# -- settings ---------------------------------------------------------------------


def _load(**constants: object) -> Settings:
    return settings_from_mapping({"STORAGE_DB": ":memory:", **constants}, "sites/x.py")


def test_purge_settings_are_off_by_default() -> None:
    s = _load()
    assert (s.purge_urls, s.purge_allow, s.purge_timeout, s.surrogate_key_header) == (
        (), (), 5.0, None)


def test_purge_urls_are_normalised() -> None:
    s = _load(PURGE_URLS=["http://Varnish:6081/", "https://cdn.example", "http://[::1]:8000",
                          "http://varnish:6081"])
    assert s.purge_urls == ("http://varnish:6081", "https://cdn.example:443", "http://[::1]:8000")


@pytest.mark.parametrize(("value", "message"), [
    ("http://varnish", 'sites/x.py: PURGE_URLS must be a list such as '
                       '["http://varnish:6081", "http://node2:8000"]'),
    (["varnish:6081"], 'sites/x.py: PURGE_URLS entries must look like "http://host:port", '
                       "not 'varnish:6081'"),
    (["http://v/purge"], "sites/x.py: PURGE_URLS entry 'http://v/purge' must have no path, "
                         "query or fragment: the path of each PURGE is the file's"),
])
def test_bad_purge_urls_name_file_and_constant(value: object, message: str) -> None:
    with pytest.raises(SiteConfigError) as e:
        _load(PURGE_URLS=value)
    assert str(e.value) == message


@pytest.mark.parametrize("url", [
    "http://u:hunter2@v",  # otherwise valid
    "ftp://u:hunter2@v",  # not http(s)
    "http://u:hunter2@v:port",  # no valid port
    "http://u:hunter2@v/purge",  # a path
    "http://u:hunter2@[v",  # not a URL at all
])
def test_a_purge_url_with_a_password_is_refused_without_showing_it(url: str) -> None:
    """Regression: each refusal quoted the entry, password and all."""
    with pytest.raises(SiteConfigError) as e:
        _load(PURGE_URLS=["http://varnish:6081", url])
    assert str(e.value) == "sites/x.py: PURGE_URLS entries must not hold a user or password"
    assert "hunter2" not in str(e.value)


def test_purge_allow_takes_networks_and_addresses() -> None:
    s = _load(PURGE_ALLOW=["10.0.0.0/8", "127.0.0.1", "::1"])
    assert [str(n) for n in s.purge_allow] == ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]


def test_purge_allow_with_host_bits_names_file_and_constant() -> None:
    with pytest.raises(SiteConfigError) as e:
        _load(PURGE_ALLOW=["10.0.0.1/8"])
    assert str(e.value) == ("sites/x.py: PURGE_ALLOW entry '10.0.0.1/8' is not an address or "
                            "network: 10.0.0.1/8 has host bits set")


@pytest.mark.parametrize(("value", "message"), [
    ("Cache-Control", "must not be 'Cache-Control': serve-image sends that header itself"),
    ("x key", "must be None or a header name such as \"xkey\", not 'x key'"),
])
def test_bad_surrogate_key_header(value: str, message: str) -> None:
    with pytest.raises(SiteConfigError) as e:
        _load(SURROGATE_KEY_HEADER=value)
    assert str(e.value) == f"sites/x.py: SURROGATE_KEY_HEADER {message}"


# -- the path a purge names -----------------------------------------------------------


def test_purge_path_is_the_percent_encoded_request_path() -> None:
    assert purge_path("var/s/storage/images/a b/café (1)+x.jpg") == (
        "/var/s/storage/images/a%20b/caf%C3%A9%20(1)+x.jpg")
    # A literal %, ? or # must not read as an escape, a query or a fragment.
    assert purge_path("var/s/storage/images/100%?#.jpg") == (
        "/var/s/storage/images/100%25%3F%23.jpg")


# -- a node's answer to PURGE ---------------------------------------------------------


@pytest.fixture
async def purge_node(
    settings: Settings, tmp_path: Path
) -> AsyncIterator[ServeImage]:
    """A node with a hot cache kept an hour, local copies, PURGE allowed from 10.0.0.0/8."""
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    app = ServeImage(node_settings(
        settings, tmp_path, cache_max_bytes=1 << 20, cache_ttl=3600.0,
        local_copy_dir=str(docroot), purge_allow=settings_from_mapping(
            {"STORAGE_DB": ":memory:", "PURGE_ALLOW": ["10.0.0.0/8"]}, "x").purge_allow,
    ))
    await app.startup()
    yield app
    await app.shutdown()


INSIDE = ("10.1.2.3", 40000)
OUTSIDE = ("192.0.2.7", 40000)


@sqlite_only
async def test_purge_from_outside_purge_allow_is_403(purge_node: ServeImage) -> None:
    status, _, body, _ = await call(purge_node, f"/{NAME}".encode(), "PURGE", client=OUTSIDE)
    assert (status, body) == (403, b"403 Forbidden\n")


@sqlite_only
async def test_x_forwarded_for_does_not_make_an_address_allowed(purge_node: ServeImage) -> None:
    spoofed = [(b"x-forwarded-for", b"10.1.2.3"), (b"forwarded", b"for=10.1.2.3"),
               (b"x-real-ip", b"10.1.2.3")]
    status, *_ = await call(purge_node, f"/{NAME}".encode(), "PURGE", spoofed,
                            client=("127.0.0.1", 5000))
    assert status == 403


@sqlite_only
async def test_purge_without_a_client_address_is_403(purge_node: ServeImage) -> None:
    status, *_ = await call(purge_node, f"/{NAME}".encode(), "PURGE", client=None)
    assert status == 403


@sqlite_only
async def test_purge_from_an_ipv4_mapped_allowed_address(purge_node: ServeImage) -> None:
    status, headers, body, _ = await call(purge_node, f"/{NAME}".encode(), "PURGE",
                                          client=("::ffff:10.9.9.9", 1))
    assert (status, body, headers[b"cache-control"]) == (200, b"200 Purged\n", b"no-store")


@sqlite_only
async def test_purge_of_a_bad_path_gets_the_endpoints_answer(purge_node: ServeImage) -> None:
    assert (await call(purge_node, b"/var/site/storage/images/%zz", "PURGE", client=INSIDE))[0] \
        == 400
    assert (await call(purge_node, b"/var/site/other/a.jpg", "PURGE", client=INSIDE))[0] == 404


@sqlite_only
async def test_other_methods_list_purge_in_allow_when_it_is_on(purge_node: ServeImage) -> None:
    status, headers, *_ = await call(purge_node, f"/{NAME}".encode(), "POST", client=INSIDE)
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD, PURGE")


@sqlite_only
async def test_without_purge_allow_purge_is_not_a_method(settings: Settings) -> None:
    # RFC 9110 §15.5.6: 405 names the methods the resource has; PURGE is not one.
    app = ServeImage(settings)
    async with running(app):
        status, headers, body, _ = await call(app, f"/{NAME}".encode(), "PURGE")
    assert (status, headers[b"allow"], body) == (405, b"GET, HEAD", b"405 Method Not Allowed\n")


@sqlite_only
async def test_purge_drops_the_file_from_the_hot_cache(
    purge_node: ServeImage, writer: Layout
) -> None:
    await store(writer, NAME, b"old", mtime=MTIME)
    assert (await call(purge_node, f"/{NAME}".encode()))[2] == b"old"
    await store(writer, NAME, b"new", mtime=MTIME + 1)
    # Cached for CACHE_TTL (an hour): without a purge the old bytes stay.
    assert (await call(purge_node, f"/{NAME}".encode()))[2] == b"old"
    assert (await call(purge_node, f"/{NAME}".encode(), "PURGE", client=INSIDE))[0] == 200
    assert (await call(purge_node, f"/{NAME}".encode()))[2] == b"new"


@sqlite_only
async def test_a_purge_reaches_every_worker_of_the_node(
    settings: Settings, writer: Layout, tmp_path: Path
) -> None:
    # Two workers of one node: two apps of the same site file, each its own cache.
    s = node_settings(settings, tmp_path, cache_max_bytes=1 << 20, cache_ttl=3600.0,
                      purge_allow=_load(PURGE_ALLOW=["10.0.0.0/8"]).purge_allow)
    one, two = ServeImage(s), ServeImage(s)
    await store(writer, NAME, b"old", mtime=MTIME)
    async with running(one), running(two):
        for worker in (one, two):
            assert (await call(worker, f"/{NAME}".encode()))[2] == b"old"
        await store(writer, NAME, b"new!", mtime=MTIME + 1)
        assert (await call(one, f"/{NAME}".encode(), "PURGE", client=INSIDE))[0] == 200
        assert (await call(two, f"/{NAME}".encode()))[2] == b"new!"
        headers = (await call(two, f"/{NAME}".encode(), "HEAD"))[1]
        assert headers[b"content-length"] == b"4"


def test_a_read_under_way_when_a_purge_comes_is_not_kept(tmp_path: Path) -> None:
    board = PurgeBoard(str(tmp_path / "board"))
    cache = HotCache(1 << 20, 3600.0, board=board)
    meta = FileMeta(md5(NAME), "image/jpeg", 3, MTIME, False)
    stamp = cache.stamp(meta.name_hash)  # the read starts
    PurgeBoard(str(tmp_path / "board")).bump(meta.name_hash)  # another worker's purge
    cache.put(meta, b"old", stamp)  # the read ends, with what may be the old version
    assert cache.get(meta.name_hash) is None
    cache.put(meta, b"new", cache.stamp(meta.name_hash))
    entry = cache.get(meta.name_hash)
    assert entry is not None and entry.body == b"new"
    board.close()


@sqlite_only
async def test_purge_removes_the_local_copy(
    purge_node: ServeImage, writer: Layout, tmp_path: Path
) -> None:
    await store(writer, NAME, b"x" * 700, mtime=MTIME)
    assert (await call(purge_node, f"/{NAME}".encode()))[0] == 200
    assert purge_node.local_copies is not None
    await purge_node.local_copies.drain()
    root = purge_node.local_copies.root
    copy = tmp_path / "docroot" / NAME
    assert copy.exists() and localfs.read_ledger(root) == 700
    assert (await call(purge_node, f"/{NAME}".encode(), "PURGE", client=INSIDE))[0] == 200
    assert not copy.exists()
    assert localfs.read_ledger(root) == 0


@sqlite_only
async def test_a_copy_of_a_version_replaced_while_it_was_queued_is_not_left(
    purge_node: ServeImage, writer: Layout, tmp_path: Path
) -> None:
    # The copy of the old bytes is written after the write and its PURGE: the
    # row, read again once the copy is in place, shows it is stale.
    await store(writer, NAME, b"old", mtime=MTIME)
    old = await writer.meta(md5(NAME))
    assert old is not None and purge_node.local_copies is not None
    await store(writer, NAME, b"new", mtime=MTIME + 1)
    assert (await call(purge_node, f"/{NAME}".encode(), "PURGE", client=INSIDE))[0] == 200
    purge_node.local_copies.offer(NAME, old, b"old")
    await purge_node.local_copies.drain()
    assert not (tmp_path / "docroot" / NAME).exists()
    assert localfs.read_ledger(purge_node.local_copies.root) == 0


@sqlite_only
async def test_surrogate_key_header_carries_the_name_hash(
    settings: Settings, writer: Layout
) -> None:
    await store(writer, NAME, b"abc", mtime=MTIME)
    app = ServeImage(dataclasses.replace(settings, surrogate_key_header="xkey"))
    async with running(app):
        status, headers, *_ = await call(app, f"/{NAME}".encode())
    assert (status, headers[b"xkey"]) == (200, md5(NAME).encode())


@sqlite_only
async def test_no_surrogate_key_header_by_default(settings: Settings, writer: Layout) -> None:
    await store(writer, NAME, b"abc", mtime=MTIME)
    app = ServeImage(settings)
    async with running(app):
        headers = (await call(app, f"/{NAME}".encode()))[1]
    assert b"xkey" not in headers and b"surrogate-key" not in headers


# -- sending purges ---------------------------------------------------------------------


async def test_purger_sends_each_name_to_every_url_with_its_key() -> None:
    names = [f"{IMG}/{n} é.jpg" for n in range(20)]
    async with recorder() as one, recorder() as two:
        purger = Purger([one.url, two.url], 5.0, key_header="xkey")
        try:
            report = await purger.send([*names, names[0]])  # a name twice is sent once
        finally:
            await purger.close()
        for rec in (one, two):
            assert sorted(rec.targets()) == sorted(purge_path(n) for n in names)
            assert {h["xkey"] for _, _, h in rec.requests} == {md5(n) for n in names}
    assert (report.ok, report.files, report.urls) == (True, 20, 2)
    assert report.summary() == "PURGE sent for 20 file(s) to 2 URL(s): all answered"


async def test_a_failing_url_is_retried_then_reported_and_the_rest_is_not_waited_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = [f"{IMG}/{n}.jpg" for n in range(50)]
    async with recorder(503) as down, recorder() as up:
        purger = Purger([down.url, up.url], 1.0)
        try:
            with caplog.at_level(logging.WARNING, logger="serve_image.purge"):
                report = await asyncio.wait_for(purger.send(names), 30)
        finally:
            await purger.close()
        tried = down.targets()
        assert len(up.targets()) == 50  # the other cache is told all the same
    # Retried with backoff, but only the first PER_URL files: once one has
    # failed for good, the others are counted, not sent.
    assert len(tried) > len(set(tried)) and len(set(tried)) <= PER_URL
    assert report.failures[down.url].files == 50 and up.url not in report.failures
    assert report.summary() == (
        f"PURGE sent for 50 file(s) to 2 URL(s): {down.url} failed for 50 "
        "(503 Status)")
    assert f"PURGE at {down.url} failed for 50 of 50 file(s): 503 Status" in caplog.text


async def test_a_refusal_is_not_retried() -> None:
    async with recorder(403) as refusing:
        purger = Purger([refusing.url], 5.0)
        try:
            report = await purger.send([NAME])
        finally:
            await purger.close()
        assert refusing.targets() == [purge_path(NAME)]
    assert report.failures[refusing.url].reason == "403 Status"


async def test_a_url_nobody_listens_on_fails_within_the_bound() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    purger = Purger([dead], 1.0)
    try:
        report = await asyncio.wait_for(purger.send([NAME]), 30)
    finally:
        await purger.close()
    assert report.failures[dead].files == 1
    assert report.failures[dead].reason.startswith("ConnectError")


async def test_a_url_that_never_answers_fails_within_the_bound() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    purger = Purger([url], 1.0)
    try:
        report = await asyncio.wait_for(purger.send([NAME]), 30)
    finally:
        await purger.close()
        server.close()
        for w in held:
            w.close()
        await server.wait_closed()
    assert report.failures[url].reason == "no answer in time"


# -- every write sends them ----------------------------------------------------------------


async def test_every_write_of_clusterfiles_purges_the_names_it_changed(
    settings: Settings, writer: Layout, tmp_path: Path
) -> None:
    async with recorder() as cache:
        s = dataclasses.replace(settings, purge_urls=(cache.url,))
        async with ClusterFiles.open(s) as cluster:
            await cluster.store_contents(f"{IMG}/a.jpg", b"a")
            source = tmp_path / "b b.jpg"
            source.write_bytes(b"b")
            await cluster.store_file(source, f"{IMG}/b b.jpg")
            await cluster.store_contents(f"{IMG}/w/1.jpg", b"1", mtime=MTIME)
            await cluster.store_contents(f"{IMG}/w/2.jpg", b"2", mtime=MTIME)
            assert await cluster.delete(f"{IMG}/a.jpg")
            assert not await cluster.delete(f"{IMG}/none.jpg")  # nothing changed: no purge
            assert sorted(await cluster.delete_by_wildcard(f"{IMG}/w/*")) == [
                f"{IMG}/w/1.jpg", f"{IMG}/w/2.jpg"]
            assert (await cluster.purge(1))[0] == 2
            report = await cluster.close()
        assert report is not None and report.ok
        sent = cache.targets()
    # Each write's names, once it has committed: a.jpg stored and deleted, the
    # w/ files stored, deleted by the wildcard and purged for good.
    assert sorted(sent) == sorted(purge_path(f"{IMG}/{n}") for n in (
        "a.jpg", "a.jpg", "b b.jpg", "w/1.jpg", "w/1.jpg", "w/1.jpg", "w/2.jpg", "w/2.jpg",
        "w/2.jpg"))
    assert "/var/site/storage/images/b%20b.jpg" in sent


@sqlite_only
async def test_the_watcher_purges_what_it_applies(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / IMG).mkdir(parents=True)
    (root / IMG / "w.jpg").write_bytes(b"watched")
    async with recorder() as cache:
        s = dataclasses.replace(settings, purge_urls=(cache.url,))
        layout = make_layout(s)
        await layout.connect()
        journal = Journal(tmp_path / "journal")
        try:
            async with ClusterFiles(layout) as cluster:
                watcher = Watcher(cluster, root, journal)
                await watcher.apply("store", f"{IMG}/w.jpg")
                await watcher.apply("delete", f"{IMG}/w.jpg")
        finally:
            journal.close()
            await layout.close()
        assert cache.targets() == [purge_path(f"{IMG}/w.jpg")] * 2


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def purging_site(settings: Settings, tmp_path: Path) -> Path:
    """A site file (the test's database) whose PURGE_URLS the test sets with _with_urls."""
    path = site_file_for(settings, tmp_path)
    path.write_text(path.read_text() + "PURGE_TIMEOUT = 1\n")
    return path


def _with_urls(site: Path, urls: list[str]) -> None:
    text = "".join(line + "\n" for line in site.read_text().splitlines()
                   if not line.startswith("PURGE_URLS"))
    site.write_text(text + f"PURGE_URLS = {urls!r}\n")


@sqlite_only
async def test_rm_succeeds_and_reports_a_cache_that_is_down(
    purging_site: Path, writer: Layout, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = purging_site
    await store(writer, NAME, b"abc", mtime=MTIME)
    dead = f"http://127.0.0.1:{free_port()}"
    async with recorder() as up:
        _with_urls(site, [up.url, dead])
        code = await asyncio.wait_for(run_cli("rm", "--site", site, NAME), 60)
        assert up.targets() == [purge_path(NAME)]
    out = capsys.readouterr().out
    assert code == 0
    row = await writer.stat(NAME)
    assert row is not None and not row.live  # the write stands
    assert out.splitlines()[0] == "1 file(s) deleted"
    assert out.splitlines()[1].startswith(
        f"PURGE sent for 1 file(s) to 2 URL(s): {dead} failed for 1 (ConnectError")
    assert f"PURGE at {dead} failed for 1 of 1 file(s): ConnectError" in caplog.text


@sqlite_only
async def test_import_purges_new_and_changed_files_only(
    purging_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    site = purging_site
    root = tmp_path / "root"
    for name, data in (("a.jpg", b"a"), ("b.jpg", b"b")):
        (root / IMG).mkdir(parents=True, exist_ok=True)
        (root / IMG / name).write_bytes(data)
    async with recorder() as cache:
        _with_urls(site, [cache.url])
        assert await run_cli("import", "--site", site, "--quiet", root) == 0
        assert sorted(cache.targets()) == [purge_path(f"{IMG}/a.jpg"), purge_path(f"{IMG}/b.jpg")]
        (root / IMG / "b.jpg").write_bytes(b"changed")
        assert await run_cli("import", "--site", site, "--quiet", root) == 0
        assert cache.targets()[2:] == [purge_path(f"{IMG}/b.jpg")]  # a.jpg is unchanged
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "PURGE sent for 1 file(s) to 1 URL(s): all answered"


@sqlite_only
async def test_invalidate_sends_purges_by_hand(
    purging_site: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    site = purging_site
    async with recorder() as cache:
        _with_urls(site, [cache.url])
        assert await run_cli("invalidate", "--site", site, NAME, f"{IMG}/b c.jpg") == 0
        assert cache.targets() == [purge_path(NAME), purge_path(f"{IMG}/b c.jpg")]
    assert capsys.readouterr().out == "PURGE sent for 2 file(s) to 1 URL(s): all answered\n"


@sqlite_only
async def test_invalidate_fails_when_a_cache_fails(
    purging_site: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    site = purging_site
    async with recorder(403) as cache:
        _with_urls(site, [cache.url])
        assert await run_cli("invalidate", "--site", site, NAME) == 1
    assert capsys.readouterr().out == (
        f"PURGE sent for 1 file(s) to 1 URL(s): {cache.url} failed for 1 (403 Status)\n")


@sqlite_only
async def test_invalidate_refuses_a_name_the_site_does_not_serve(
    purging_site: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    site = purging_site
    _with_urls(site, ["http://127.0.0.1:9"])
    assert await run_cli("invalidate", "--site", site, "/var/x/storage/images/a.jpg") == 1
    assert capsys.readouterr().err == (
        "serve-image: error: /var/x/storage/images/a.jpg: not a name this site serves "
        "(var[/DIR]/storage/images[-versioned]/...)\n")


@sqlite_only
async def test_invalidate_without_purge_urls_is_an_error(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    site = site_file_for(settings, tmp_path)
    assert await run_cli("invalidate", "--site", site, NAME) == 1
    assert capsys.readouterr().err == (
        f"serve-image: error: {site}: PURGE_URLS is not set: no cache to tell\n")


# -- the real server -------------------------------------------------------------------------


@sqlite_only
async def test_a_real_node_purged_over_http(
    settings: Settings, writer: Layout, tmp_path: Path
) -> None:
    node = ServeImage(node_settings(settings, tmp_path, cache_max_bytes=1 << 20,
                                    cache_ttl=3600.0,
                                    purge_allow=_load(PURGE_ALLOW=["127.0.0.1"]).purge_allow))
    await store(writer, NAME, b"old", mtime=MTIME)
    await node.startup()
    try:
        async with live_server(node) as port, httpx.AsyncClient() as http:
            url = f"http://127.0.0.1:{port}"
            assert (await http.get(f"{url}/{NAME}")).content == b"old"
            async with ClusterFiles.open(dataclasses.replace(settings, purge_urls=(url,))) as c:
                await c.store_contents(NAME, b"new", mtime=MTIME + 1)
            assert (await http.get(f"{url}/{NAME}")).content == b"new"
    finally:
        await node.shutdown()


@sqlite_only
def test_serve_takes_the_peer_address_not_x_forwarded_for(
    settings: Settings, tmp_path: Path
) -> None:
    # uvicorn, by default, takes X-Forwarded-For from 127.0.0.1 as the
    # client's address: `serve` must not, or anyone could claim 10.1.2.3.
    site = site_file_for(settings, tmp_path)
    site.write_text(site.read_text() + 'PURGE_ALLOW = ["10.0.0.0/8"]\n')
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(cli_command("serve", "--site", site, "--port", str(port)),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        r = httpx.request("PURGE", f"http://127.0.0.1:{port}/{NAME}",
                          headers={"x-forwarded-for": "10.1.2.3"})
        assert (r.status_code, r.text) == (403, "403 Forbidden\n")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
