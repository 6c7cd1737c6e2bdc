"""`serve-image ls`, `stat`, `cat`, `rm`, `purge`, `verify` and export filters, on every backend."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serve_image.settings import Settings
from serve_image.storage import Layout
from tests.filetree import cli_command, run_cli, site_file_for
from tests.helpers import md5, payload, store

IMG = "var/x/storage/images"


@pytest.fixture
def site(settings: Settings, tmp_path: Path) -> Path:
    return site_file_for(settings, tmp_path)


async def count(writer: Layout, statement: str, *args: object) -> int:
    (n,), = await writer.driver.fetch(statement, *args)
    return int(n)


async def test_ls_lists_live_names_under_a_prefix_taken_literally(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `%` and `_` are LIKE wildcards: the prefix must match them as characters.
    for name in [f"{IMG}/100%_a.jpg", f"{IMG}/100x_a.jpg", f"{IMG}/100%xa.jpg", f"{IMG}/b.jpg"]:
        await store(writer, name, b"x")
    await store(writer, f"{IMG}/100%_deleted.jpg", b"x", mtime=-5)
    assert await run_cli("ls", "--site", site, f"{IMG}/100%_") == 0
    assert capsys.readouterr().out == f"{IMG}/100%_a.jpg\n"


async def test_ls_prefix_is_case_sensitive(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # MySQL's _ci collations and SQLite's LIKE ignore case; names do not.
    await store(writer, f"{IMG}/A.jpg", b"x")
    await store(writer, f"{IMG}/a.jpg", b"x")
    assert await run_cli("ls", "--site", site, f"{IMG}/a") == 0
    assert capsys.readouterr().out == f"{IMG}/a.jpg\n"


async def test_ls_pages_through_more_rows_than_a_page(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = sorted(f"{IMG}/p/{i:04d}.jpg" for i in range(1000))  # two full pages
    for name in names:
        await store(writer, name, b"")
    assert await run_cli("ls", "--site", site, f"{IMG}/p/") == 0
    assert capsys.readouterr().out.splitlines() == names


async def test_ls_long_shows_deleted_files_when_asked(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/live.png", b"abc", datatype="image/png", mtime=1_700_000_000)
    await store(writer, f"{IMG}/gone.png", b"abcd", datatype="image/png", mtime=-1_700_000_000)
    assert await run_cli("ls", "--site", site, "-l", "--deleted", IMG) == 0
    assert capsys.readouterr().out == (
        f"           4  2023-11-14 22:13:20  image       image/png                 "
        f"{IMG}/gone.png  (deleted)\n"
        f"           3  2023-11-14 22:13:20  image       image/png                 "
        f"{IMG}/live.png\n"
    )


async def test_stat_prints_the_row(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/a b.jpg", b"12345", mtime=1_700_000_000)
    assert await run_cli("stat", "--site", site, f"{IMG}/a b.jpg") == 0
    assert capsys.readouterr().out == (
        f"name:      {IMG}/a b.jpg\n"
        f"name_hash: {md5(f'{IMG}/a b.jpg')}\n"
        "size:      5\n"
        "mtime:     1700000000 (2023-11-14 22:13:20 UTC)\n"
        "datatype:  image/jpeg\n"
        "scope:     image\n"
        "state:     live\n"
    )


async def test_stat_of_a_missing_file_fails(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("stat", "--site", site, f"{IMG}/nope.jpg") == 1
    assert capsys.readouterr().err == f"serve-image: error: {IMG}/nope.jpg: no such file\n"


async def test_cat_writes_every_chunk_in_order(
    writer: Layout, site: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    data = payload(3500, seed=4)
    await store(writer, f"{IMG}/c.bin", data)  # chunks of 1000: four rows
    assert await run_cli("cat", "--site", site, f"{IMG}/c.bin") == 0
    assert capsysbinary.readouterr().out == data


async def test_cat_of_a_deleted_file_fails(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/d.jpg", b"x", mtime=-1_700_000_000)
    assert await run_cli("cat", "--site", site, f"{IMG}/d.jpg") == 1
    assert capsys.readouterr().err == f"serve-image: error: {IMG}/d.jpg: no such file\n"


async def test_rm_soft_deletes_as_ez_does(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/r.jpg", b"abc", mtime=1_700_000_000)
    assert await run_cli("rm", "--site", site, f"{IMG}/r.jpg") == 0
    assert capsys.readouterr().out == "1 file(s) deleted\n"
    row = await writer.stat(f"{IMG}/r.jpg")
    assert row is not None and (row.mtime, row.expired, row.size) == (-1_700_000_000, True, 3)
    assert await count(writer, "SELECT COUNT(*) FROM ezdbfile_data WHERE name_hash = ?",
                       md5(f"{IMG}/r.jpg")) == 1  # the bytes stay until a purge


async def test_rm_of_a_deleted_file_fails(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/r.jpg", b"abc", mtime=-1_700_000_000)
    assert await run_cli("rm", "--site", site, f"{IMG}/r.jpg") == 1
    assert capsys.readouterr().err == f"serve-image: error: {IMG}/r.jpg: no such file\n"


async def test_rm_wildcard_matches_names_exactly(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [
        f"{IMG}/a/tmp1.jpg", f"{IMG}/b/c/tmp2.jpg",  # `*` spans slashes, as in eZ
        f"{IMG}/a/TMP3.jpg", f"{IMG}/a/keep.jpg", f"{IMG}/tmp4.jpg", "var/y/storage/images/a/tmp5",
    ]
    for name in names:
        await store(writer, name, b"x")
    assert await run_cli("rm", "--site", site, "-v", "--wildcard", f"{IMG}/*/tmp*") == 0
    assert capsys.readouterr().out == f"{IMG}/a/tmp1.jpg\n{IMG}/b/c/tmp2.jpg\n2 file(s) deleted\n"
    # Listed in the database's collation order: sorted here to compare.
    live = sorted([f.name async for f in writer.list_files("var/")])
    assert live == [f"{IMG}/a/TMP3.jpg", f"{IMG}/a/keep.jpg", f"{IMG}/tmp4.jpg",
                    "var/y/storage/images/a/tmp5"]


async def test_rm_wildcard_takes_like_characters_literally(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/a_b%c.jpg", b"x")
    await store(writer, f"{IMG}/aXbYc.jpg", b"x")
    assert await run_cli("rm", "--site", site, "-v", "--wildcard", f"{IMG}/a_b%c.*") == 0
    assert capsys.readouterr().out == f"{IMG}/a_b%c.jpg\n1 file(s) deleted\n"


async def test_rm_needs_a_name_or_a_wildcard(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("rm", "--site", site) == 1
    assert capsys.readouterr().err == (
        "serve-image: error: give either a NAME or --wildcard PATTERN\n")


async def test_purge_removes_old_deleted_files_and_their_chunks(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recent = int(time.time()) - 3600
    await store(writer, f"{IMG}/live.jpg", payload(2500), mtime=1_000_000_000)
    await store(writer, f"{IMG}/old.jpg", payload(2500), mtime=-1_000_000_000)
    await store(writer, f"{IMG}/recent.jpg", payload(2500), mtime=-recent)
    assert await run_cli("purge", "--site", site, "--older-than", "1", "--dry-run") == 0
    assert capsys.readouterr().out == "1 deleted file(s) would be purged (2.4 KiB)\n"
    assert await count(writer, "SELECT COUNT(*) FROM ezdbfile") == 3
    assert await run_cli("purge", "--site", site, "--older-than", "1") == 0
    assert capsys.readouterr().out == "1 deleted file(s) purged (2.4 KiB)\n"
    assert [f.name async for f in writer.list_files(IMG, include_deleted=True)] == [
        f"{IMG}/live.jpg", f"{IMG}/recent.jpg"]
    assert await count(writer, "SELECT COUNT(*) FROM ezdbfile_data WHERE name_hash = ?",
                       md5(f"{IMG}/old.jpg")) == 0


async def test_verify_passes_a_sound_database(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/ok.jpg", payload(3500))
    await store(writer, f"{IMG}/empty.jpg", b"")
    await store(writer, f"{IMG}/odd.jpg", payload(10), chunks=[b"12", b"3456789", b"0"])
    assert await run_cli("verify", "--site", site) == 0
    assert capsys.readouterr() == ("", "0 broken file(s)\n")


async def test_verify_reports_gaps_and_wrong_sizes(
    writer: Layout, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/gap.jpg", payload(3500))
    await store(writer, f"{IMG}/short.jpg", payload(3500))
    await store(writer, f"{IMG}/ok.jpg", payload(3500))
    await writer.driver.execute('DELETE FROM ezdbfile_data WHERE name_hash = ? AND "offset" = ?',
                         md5(f"{IMG}/gap.jpg"), 1000)
    await writer.driver.execute("UPDATE ezdbfile SET size = ? WHERE name_hash = ?", 4000,
                         md5(f"{IMG}/short.jpg"))
    assert await run_cli("verify", "--site", site) == 1
    out = capsys.readouterr()
    assert sorted(out.out.splitlines()) == [
        f"{IMG}/gap.jpg: chunk at 2000, expected one at 1000",
        f"{IMG}/short.jpg: chunks hold 3500 bytes, the row says 4000",
    ]
    assert out.err == "2 broken file(s)\n"


async def test_export_filters_by_scope_and_prefix(
    writer: Layout, site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/a.jpg", b"a")
    await store(writer, f"{IMG}/b/c.jpg", b"c")
    await writer.store("var/x/storage/original/application/f.pdf", [b"%PDF"], size=4,
                       mtime=1_700_000_000, datatype="application/pdf", scope="binaryfile")
    out = tmp_path / "out"
    assert await run_cli("export", "--site", site, out, "--quiet", "--prefix", f"{IMG}/b/") == 0
    assert await run_cli("export", "--site", site, out, "--quiet", "--scope", "binaryfile") == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        f"{IMG}/b/c.jpg", "var/x/storage/original/application/f.pdf"]


async def test_export_skips_identical_files(
    writer: Layout, site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, f"{IMG}/a.jpg", b"abc")
    await store(writer, f"{IMG}/b.jpg", b"def")
    out = tmp_path / "out"
    assert await run_cli("export", "--site", site, out, "--quiet") == 0
    (out / f"{IMG}/b.jpg").write_bytes(b"changed locally")
    capsys.readouterr()
    assert await run_cli("export", "--site", site, out, "--quiet") == 0
    assert capsys.readouterr().out.startswith("1 exported (3 B), 1 unchanged, 0 failed")
    assert (out / f"{IMG}/b.jpg").read_bytes() == b"def"


async def test_export_refuses_names_that_leave_dest(
    writer: Layout, site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await store(writer, "var/../../escaped.jpg", b"x")
    out = tmp_path / "deep" / "out"
    assert await run_cli("export", "--site", site, out, "--quiet") == 1
    assert capsys.readouterr().err == (
        "serve-image: 'var/../../escaped.jpg': not a safe relative path: not exported\n")
    assert not (tmp_path / "escaped.jpg").exists()


async def test_cat_into_a_closed_pipe_says_nothing(site: Path, writer: Layout) -> None:
    """Regression: `serve-image cat NAME | head -c 10` ended in a BrokenPipeError traceback."""
    import subprocess

    await store(writer, "var/site/storage/images/big.bin", bytes(1024 * 1024))
    proc = subprocess.Popen(  # noqa: ASYNC220 - waited for below
        cli_command("cat", "--site", site, "var/site/storage/images/big.bin"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.read(10) == bytes(10)
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(30) == 141
    finally:
        proc.stderr.close()
    assert err == b""


def test_watch_journal_that_cannot_be_opened(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serve_image.cli import main

    (tmp_path / "root" / "var").mkdir(parents=True)
    journal = tmp_path / "missing" / "x.journal"
    code = main(["import", "--site", str(site), str(tmp_path / "root"), "--watch",
                 "--journal", str(journal)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"serve-image: error: --journal {journal}: cannot open it: unable to open database file\n"
    )
