"""Local copies on demand (LOCAL_COPY_DIR) and `serve-image prune-local`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import resource
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from serve_image import localfs
from serve_image.app import ServeImage
from serve_image.cli import main
from serve_image.commands.local import prune
from serve_image.settings import Settings, SiteConfigError, load_site
from serve_image.storage import Layout
from tests.helpers import IMG, md5, payload, running, store
from tests.live import call

MTIME = 1_700_000_000
sqlite_only = pytest.mark.parametrize("backend_name", ["sqlite"])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "docroot"
    d.mkdir()
    return d


@asynccontextmanager
async def serving(
    settings: Settings, root: Path, max_bytes: int = 1024**3
) -> AsyncIterator[tuple[ServeImage, httpx.AsyncClient]]:
    s = dataclasses.replace(settings, local_copy_dir=str(root), local_copy_max_bytes=max_bytes)
    app = ServeImage(s)
    async with running(app, "http://testserver") as c:
        yield app, c


async def drain(app: ServeImage) -> None:
    assert app.endpoint.local_copies is not None
    await app.endpoint.local_copies.drain()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- writing copies --------------------------------------------------------------


async def test_multi_chunk_copy_is_byte_identical_with_the_rows_mtime(
    settings: Settings, writer: Layout, root: Path
) -> None:
    data = payload(2500, seed=1)  # three chunks of 1000: re-read from the database
    await store(writer, f"{IMG}/a.jpg", data, mtime=MTIME)
    async with serving(settings, root) as (app, client):
        r = await client.get(f"/{IMG}/a.jpg")
        await drain(app)
    assert r.status_code == 200
    target = root / IMG / "a.jpg"
    assert target.read_bytes() == data
    assert target.stat().st_mtime == MTIME
    assert files_under(root) == [localfs.LEDGER, f"{IMG}/a.jpg"]


@sqlite_only
async def test_single_chunk_copy_is_the_served_bytes(
    settings: Settings, writer: Layout, root: Path
) -> None:
    data = payload(700, seed=2)
    await store(writer, f"{IMG}/small.png", data, mtime=MTIME, datatype="image/png")
    async with serving(settings, root) as (app, client):
        r = await client.get(f"/{IMG}/small.png")
        await drain(app)
    assert r.content == data
    assert (root / IMG / "small.png").read_bytes() == data
    assert (root / IMG / "small.png").stat().st_mtime == MTIME


@sqlite_only
async def test_empty_file_is_copied(settings: Settings, writer: Layout, root: Path) -> None:
    await store(writer, f"{IMG}/empty.txt", b"", mtime=MTIME, datatype="text/plain")
    async with serving(settings, root) as (app, client):
        r = await client.get(f"/{IMG}/empty.txt")
        await drain(app)
    assert r.status_code == 200
    assert (root / IMG / "empty.txt").read_bytes() == b""


@sqlite_only
async def test_head_and_ranges_make_no_copy(
    settings: Settings, writer: Layout, root: Path
) -> None:
    await store(writer, f"{IMG}/a.jpg", payload(2500), mtime=MTIME)
    async with serving(settings, root) as (app, client):
        head = await client.head(f"/{IMG}/a.jpg")
        part = await client.get(f"/{IMG}/a.jpg", headers={"range": "bytes=0-99"})
        await drain(app)
    assert (head.status_code, part.status_code) == (200, 206)
    assert files_under(root) == []


@sqlite_only
async def test_reader_never_sees_a_partial_copy(
    settings: Settings, writer: Layout, root: Path
) -> None:
    data = payload(4 * 1024 * 1024, seed=3)  # 4,195 chunk rows, about 16 re-read batches
    await store(writer, f"{IMG}/big.bin", data, mtime=MTIME, datatype="application/octet-stream")
    target = root / IMG / "big.bin"
    seen: list[bool] = []  # one entry per time the target existed: was it whole?
    absent = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal absent
        while not done.is_set():
            try:
                got = target.read_bytes()
            except FileNotFoundError:
                absent += 1
                continue
            seen.append(got == data)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        async with serving(settings, root) as (app, client):
            r = await client.get(f"/{IMG}/big.bin")
            await drain(app)
            # The poller reads the finished copy too.
            read_before = len(seen)
            deadline = time.monotonic() + 60
            while len(seen) == read_before:
                assert time.monotonic() < deadline, "the poller never read the finished copy"
                await asyncio.sleep(0.001)
    finally:
        done.set()
        poller.join()
    assert r.content == data
    assert absent > 0  # the poller ran while the copy was being written
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} reads saw a partial file"
    assert os.listdir(target.parent) == ["big.bin"]  # no temporary file left


@sqlite_only
async def test_replaced_file_is_copied_again(
    settings: Settings, writer: Layout, root: Path
) -> None:
    await store(writer, f"{IMG}/a.jpg", payload(900, seed=1), mtime=MTIME)
    new = payload(1200, seed=2)
    async with serving(settings, root) as (app, client):
        await client.get(f"/{IMG}/a.jpg")
        await drain(app)
        await store(writer, f"{IMG}/a.jpg", new, mtime=MTIME + 60)
        await client.get(f"/{IMG}/a.jpg")
        await drain(app)
    target = root / IMG / "a.jpg"
    assert target.read_bytes() == new
    assert target.stat().st_mtime == MTIME + 60
    assert localfs.read_ledger(str(root)) == 1200  # the old copy's 900 bytes given back


@pytest.mark.parametrize(("size", "how"), [(700, "handed over"), (2500, "read again")])
async def test_copy_of_a_file_replaced_before_it_is_made_is_the_version_served_or_none(
    settings: Settings, writer: Layout, root: Path, caplog: pytest.LogCaptureFixture,
    size: int, how: str,
) -> None:
    """The file is replaced as its last byte goes out, before the copy is queued. A small
    file's bytes are handed to the copy as served, and that copy is taken away again once
    its row is found moved on; a larger one is read again, finds the row changed, and no
    copy is made: never the new bytes under the old version, nor an outdated copy."""
    name = f"{IMG}/a.jpg"
    old, new = payload(size, seed=1), payload(size + 1, seed=2)
    await store(writer, name, old, mtime=MTIME)

    async def replace_at_the_end(_: int, more: bool) -> None:
        if not more:
            await store(writer, name, new, mtime=MTIME + 60)

    with caplog.at_level(logging.WARNING, logger="serve_image.localcopy"):
        async with serving(settings, root) as (app, _):
            status, _, body, _ = await call(app, f"/{name}".encode(),
                                            on_body=replace_at_the_end)
            await drain(app)
    assert (status, body) == (200, old)
    assert files_under(root) == [localfs.LEDGER]
    assert localfs.read_ledger(str(root)) == 0  # the reservation given back
    if how == "handed over":
        assert caplog.messages == []
    else:
        assert caplog.messages == [
            f"local copy refused: {name}: file replaced, deleted or missing chunks"]


# -- the budget -------------------------------------------------------------------


def set_atime(path: Path, when: float) -> None:
    """What a web server's read of the copy does to it (under strictatime)."""
    os.utime(path, (when, path.stat().st_mtime))


@sqlite_only
async def test_budget_holds_by_evicting_the_least_recently_served(
    settings: Settings, writer: Layout, root: Path
) -> None:
    for n in range(3):
        await store(writer, f"{IMG}/{n}.jpg", payload(1000, seed=n), mtime=MTIME)
    async with serving(settings, root, max_bytes=2500) as (app, client):
        for n in range(2):
            assert (await client.get(f"/{IMG}/{n}.jpg")).status_code == 200
            await drain(app)
        # 0.jpg was copied first but served since (by the web server): 1.jpg goes.
        set_atime(root / IMG / "0.jpg", time.time())
        set_atime(root / IMG / "1.jpg", time.time() - 3600)
        assert (await client.get(f"/{IMG}/2.jpg")).status_code == 200
        await drain(app)
    assert files_under(root) == [localfs.EVICT_LOCK, localfs.LEDGER, f"{IMG}/0.jpg",
                                 f"{IMG}/2.jpg"]
    assert localfs.read_ledger(str(root)) == 2000


@sqlite_only
async def test_a_copy_starts_as_just_served_and_an_offer_marks_it_served_again(
    settings: Settings, writer: Layout, root: Path
) -> None:
    await store(writer, f"{IMG}/a.jpg", payload(100), mtime=MTIME)
    async with serving(settings, root) as (app, client):
        before = time.time()
        await client.get(f"/{IMG}/a.jpg")
        await drain(app)
        copy = root / IMG / "a.jpg"
        # The row's mtime, but the access time of the serve: not evicted first.
        assert copy.stat().st_mtime == MTIME and copy.stat().st_atime >= int(before)
        set_atime(copy, MTIME)
        assert app.local_copies is not None
        app.local_copies._known.clear()  # as once KNOWN_SECONDS have passed
        await client.get(f"/{IMG}/a.jpg")
        await drain(app)
    assert copy.stat().st_atime >= int(before)
    assert copy.stat().st_mtime == MTIME


@sqlite_only
async def test_budget_counts_and_evicts_copies_already_on_disk(
    settings: Settings, writer: Layout, root: Path
) -> None:
    old = root / "var/other/storage/images/old.jpg"  # another site's copy, same budget
    old.parent.mkdir(parents=True)
    old.write_bytes(payload(2000))
    (root / "var/other/notes.txt").write_bytes(payload(5000))  # not a copy: never touched
    await store(writer, f"{IMG}/new.jpg", payload(1000), mtime=MTIME)
    async with serving(settings, root, max_bytes=2500) as (app, client):
        await client.get(f"/{IMG}/new.jpg")
        await drain(app)
    assert (root / IMG / "new.jpg").exists()
    assert not old.exists()
    assert (root / "var/other/notes.txt").exists()
    assert localfs.read_ledger(str(root)) == 1000


@sqlite_only
async def test_a_file_larger_than_the_budget_is_not_copied_and_evicts_nothing(
    settings: Settings, writer: Layout, root: Path
) -> None:
    await store(writer, f"{IMG}/small.jpg", payload(500), mtime=MTIME)
    await store(writer, f"{IMG}/huge.jpg", payload(3000), mtime=MTIME)
    async with serving(settings, root, max_bytes=2500) as (app, client):
        for name in ("small.jpg", "huge.jpg"):
            assert (await client.get(f"/{IMG}/{name}")).status_code == 200
            await drain(app)
    assert files_under(root) == [localfs.LEDGER, f"{IMG}/small.jpg"]


def _fill(root: str, worker: int, files: int, size: int, limit: int) -> int:
    """One process making room and writing copies, as a worker's copy task does."""
    written = 0
    for n in range(files):
        ok, _evicted = localfs.make_room(root, size, limit)
        if ok:
            path = Path(root, "var/site/storage/images", f"w{worker}-{n}.jpg")
            path.write_bytes(b"x" * size)
            written += 1
    return written


def test_processes_evicting_at_once_keep_one_true_count(root: Path) -> None:
    # The ledger and the eviction lock are flock(2)ed: four processes filling
    # one budget at once end with the count the disk shows, within the budget.
    (root / "var/site/storage/images").mkdir(parents=True)
    size, limit = 1000, 20_000
    with concurrent.futures.ProcessPoolExecutor(
        4, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        written = list(pool.map(_fill, [str(root)] * 4, range(4), [40] * 4,
                                [size] * 4, [limit] * 4))
    on_disk = sum(p.stat().st_size for p in (root / "var").rglob("*.jpg"))
    assert sum(written) == 160  # each one found room, by evicting
    assert localfs.read_ledger(str(root)) == on_disk
    assert on_disk <= limit


# -- never outside the directory, never on the response ---------------------------


@sqlite_only
async def test_symlinked_directory_is_not_followed(
    settings: Settings, writer: Layout, root: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "var").symlink_to(outside)
    data = payload(700)
    await store(writer, f"{IMG}/a.jpg", data, mtime=MTIME)
    with caplog.at_level(logging.WARNING, logger="serve_image.localcopy"):
        async with serving(settings, root) as (app, client):
            r = await client.get(f"/{IMG}/a.jpg")
            await drain(app)
    assert (r.status_code, r.content) == (200, data)
    assert list(outside.iterdir()) == []
    assert caplog.messages == [
        f"local copy refused: {IMG}/a.jpg: 'var' is a symlink or not a directory"
    ]


@sqlite_only
async def test_symlink_at_the_target_is_replaced_not_written_through(
    settings: Settings, writer: Layout, root: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (root / IMG).mkdir(parents=True)
    (root / IMG / "a.jpg").symlink_to(victim)
    data = payload(700)
    await store(writer, f"{IMG}/a.jpg", data, mtime=MTIME)
    async with serving(settings, root) as (app, client):
        await client.get(f"/{IMG}/a.jpg")
        await drain(app)
    assert victim.read_bytes() == b"keep me"
    assert not (root / IMG / "a.jpg").is_symlink()
    assert (root / IMG / "a.jpg").read_bytes() == data


@sqlite_only
async def test_write_error_only_logs(
    settings: Settings, writer: Layout, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (root / "var").write_bytes(b"a file where a directory should be")
    data = payload(2500)
    await store(writer, f"{IMG}/a.jpg", data, mtime=MTIME)
    with caplog.at_level(logging.WARNING, logger="serve_image.localcopy"):
        async with serving(settings, root) as (app, client):
            r = await client.get(f"/{IMG}/a.jpg")
            await drain(app)
            again = await client.get(f"/{IMG}/a.jpg")
            await drain(app)
    assert (r.status_code, r.content) == (200, data)
    assert (again.status_code, again.content) == (200, data)
    assert caplog.messages == [
        f"local copy refused: {IMG}/a.jpg: 'var' is a symlink or not a directory"
    ] * 2
    assert localfs.read_ledger(str(root)) == 0  # the reservation was given back


@sqlite_only
async def test_failed_write_only_logs_and_leaves_no_temporary_file(
    settings: Settings, writer: Layout, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A real write error in the middle of a copy, as a full disk gives: the
    # file-size limit makes write(2) fail with EFBIG past 64 KiB (Python
    # ignores SIGXFSZ, so the process is not killed).
    data = payload(200_000)
    await store(writer, f"{IMG}/a.jpg", data, mtime=MTIME)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with caplog.at_level(logging.WARNING, logger="serve_image.localcopy"):
        async with serving(settings, root) as (app, client):
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
            try:
                r = await client.get(f"/{IMG}/a.jpg")
                await drain(app)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (r.status_code, r.content) == (200, data)
    assert caplog.messages == [
        f"local copy of {IMG}/a.jpg failed: [Errno 27] File too large"
    ]
    assert os.listdir(root / IMG) == []
    assert localfs.read_ledger(str(root)) == 0


# -- settings ----------------------------------------------------------------------


def test_local_copy_dir_is_relative_to_the_site_file(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    site = tmp_path / "s.py"
    site.write_text('STORAGE_DB = "x.sqlite"\nLOCAL_COPY_DIR = "www"\n')
    s = load_site(str(site))
    assert (s.local_copy_dir, s.local_copy_max_bytes) == (str(tmp_path / "www"), 1024**3)


def test_missing_local_copy_dir_names_file_and_constant(tmp_path: Path) -> None:
    site = tmp_path / "s.py"
    site.write_text('STORAGE_DB = "x.sqlite"\nLOCAL_COPY_DIR = "nope"\n')
    with pytest.raises(SiteConfigError) as e:
        load_site(str(site))
    assert str(e.value) == (
        f"{site}: LOCAL_COPY_DIR must be an existing directory, not '{tmp_path / 'nope'}'"
    )


def test_negative_budget_names_file_and_constant(tmp_path: Path) -> None:
    site = tmp_path / "s.py"
    site.write_text('STORAGE_DB = "x.sqlite"\nLOCAL_COPY_MAX_BYTES = -1\n')
    with pytest.raises(SiteConfigError) as e:
        load_site(str(site))
    assert str(e.value) == (
        f"{site}: LOCAL_COPY_MAX_BYTES must be a whole number from 0 to {2**62}, not -1"
    )


# -- prune-local ----------------------------------------------------------------------


def put_copy(root: Path, name: str, data: bytes, mtime: int = MTIME) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


async def test_prune_removes_stale_copies_and_keeps_good_ones(
    settings: Settings, writer: Layout, root: Path
) -> None:
    data = payload(1500)
    for name in ("good", "deleted", "expired", "newer"):
        await store(writer, f"{IMG}/{name}.jpg", data, mtime=MTIME)
        put_copy(root, f"{IMG}/{name}.jpg", data)
    put_copy(root, f"{IMG}/gone.jpg", data)  # never had a row
    await writer.driver.execute(
        "UPDATE ezdbfile SET mtime = -mtime, expired = TRUE "
        f"WHERE name_hash = '{md5(f'{IMG}/deleted.jpg')}'"
    )
    await writer.driver.execute(
        f"UPDATE ezdbfile SET expired = TRUE WHERE name_hash = '{md5(f'{IMG}/expired.jpg')}'"
    )
    await store(writer, f"{IMG}/newer.jpg", data, mtime=MTIME + 1)
    s = dataclasses.replace(settings, local_copy_dir=str(root))

    report = await prune(s, writer)

    assert sorted(report.removed) == [
        (f"{IMG}/deleted.jpg", "deleted or expired"),
        (f"{IMG}/expired.jpg", "deleted or expired"),
        (f"{IMG}/gone.jpg", "no row"),
        (f"{IMG}/newer.jpg", "another version"),
    ]
    assert (report.kept, report.kept_bytes) == (1, 1500)
    assert files_under(root) == [localfs.LEDGER, f"{IMG}/good.jpg"]
    assert localfs.read_ledger(str(root)) == 1500


@sqlite_only
async def test_prune_removes_a_copy_of_another_size(
    settings: Settings, writer: Layout, root: Path
) -> None:
    await store(writer, f"{IMG}/a.jpg", payload(1500), mtime=MTIME)
    put_copy(root, f"{IMG}/a.jpg", payload(1000))  # a truncated copy made by hand
    report = await prune(dataclasses.replace(settings, local_copy_dir=str(root)), writer)
    assert report.removed == [(f"{IMG}/a.jpg", "another version")]


@sqlite_only
async def test_prune_removes_only_old_temporary_files(
    settings: Settings, writer: Layout, root: Path
) -> None:
    old = put_copy(root, f"{IMG}/.a.jpg.1{localfs.TEMP_SUFFIX}", b"x",
                   mtime=int(time.time()) - localfs.STALE_TEMP_SECONDS - 10)
    fresh = put_copy(root, f"{IMG}/.b.jpg.2{localfs.TEMP_SUFFIX}", b"x", mtime=int(time.time()))
    report = await prune(dataclasses.replace(settings, local_copy_dir=str(root)), writer)
    assert report.removed == [(str(old.relative_to(root)), "left by a crash")]
    assert fresh.exists()


@sqlite_only
async def test_prune_touches_neither_symlinks_nor_other_sites(
    settings: Settings, writer: Layout, root: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"keep me")
    (root / IMG).mkdir(parents=True)
    (root / IMG / "link.jpg").symlink_to(victim)
    other = put_copy(root, "var/other/storage/images/x.jpg", b"not ours")
    s = dataclasses.replace(settings, local_copy_dir=str(root), var_dir="var/site")
    report = await prune(s, writer)
    assert report.removed == []
    assert (root / IMG / "link.jpg").is_symlink()
    assert victim.read_bytes() == b"keep me"
    assert other.exists()


def write_site(tmp_path: Path, settings: Settings, root: Path | None) -> Path:
    site = tmp_path / "copies.py"
    text = f"STORAGE_DB = {settings.database!r}\nSTORAGE_CHUNK_SIZE = 1000\n"
    if root is not None:
        text += f"LOCAL_COPY_DIR = {str(root)!r}\n"
    site.write_text(text)
    return site


@sqlite_only
async def test_prune_local_command(
    settings: Settings, writer: Layout, root: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await store(writer, f"{IMG}/good.jpg", b"good", mtime=MTIME)
    put_copy(root, f"{IMG}/good.jpg", b"good")
    put_copy(root, f"{IMG}/gone.jpg", b"gone")
    site = write_site(tmp_path, settings, root)
    assert await asyncio.to_thread(main, ["prune-local", "--site", str(site)]) == 0
    assert capsys.readouterr().out == (
        f"removed {IMG}/gone.jpg (no row)\n"
        f"removed 1 local copies, kept 1 (4 bytes) in {root}\n"
    )
    assert files_under(root) == [localfs.LEDGER, f"{IMG}/good.jpg"]


@sqlite_only
async def test_prune_local_dry_run_removes_nothing(
    settings: Settings, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put_copy(root, f"{IMG}/gone.jpg", b"gone")
    site = write_site(tmp_path, settings, root)
    assert await asyncio.to_thread(main, ["prune-local", "--site", str(site), "--dry-run"]) == 0
    assert capsys.readouterr().out == (
        f"would remove {IMG}/gone.jpg (no row)\n"
        f"would remove 1 local copies, kept 0 (0 bytes) in {root}\n"
    )
    assert (root / IMG / "gone.jpg").exists()


@sqlite_only
async def test_prune_local_without_local_copy_dir_is_an_error(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = write_site(tmp_path, settings, None)
    assert await asyncio.to_thread(main, ["prune-local", "--site", str(site)]) == 1
    assert capsys.readouterr().err == (
        f"serve-image: error: {site}: LOCAL_COPY_DIR is not set: no local copies\n"
    )
