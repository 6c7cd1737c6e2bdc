"""`serve-image demo`: its front page shows every demo image, in a real browser;
other sites keep their 404 at `/`."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from serve_image.app import ServeImage, demo_from_environment
from serve_image.samples import demo_files, demo_names, gallery_page
from serve_image.settings import load_site
from tests.conftest import server_missing
from tests.helpers import running
from tests.live import serve_process

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def demo_site(tmp_path: Path) -> Path:
    site = tmp_path / "demo.py"
    site.write_text('STORAGE_DB = "demo.sqlite"\nVAR_DIR = "var/demo"\n')
    return site


async def test_front_page_only_for_the_demo(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    site = demo_site(tmp_path)
    settings = load_site(str(site))
    async with running(ServeImage(settings)) as c:
        assert (await c.get("/")).status_code == 404
    monkeypatch.setenv("SERVE_IMAGE_SITE", str(site))
    async with running(demo_from_environment()) as c:
        r = await c.get("/")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.content == gallery_page("var/demo")
        assert re.findall(r'<img src="/([^"]+)"', r.text) == demo_names("var/demo")
        assert (await c.head("/")).status_code == 200
        assert (await c.post("/")).status_code == 405


def test_demo_names_are_the_demo_files() -> None:
    assert [name for name, _, _ in demo_files("var/x")] == demo_names("var/x")


def test_browser_shows_every_image_of_the_demo(tmp_path: Path) -> None:
    """The newcomer's first look: `serve-image demo`, then http://127.0.0.1:PORT/."""
    if not os.access(CHROMIUM, os.X_OK):
        server_missing("chromium", FileNotFoundError(f"{CHROMIUM} (apt-get install -y chromium)"))
    site = demo_site(tmp_path)
    with serve_process(site, "uvicorn", tmp_path / "log", command="demo") as port:
        url = f"http://127.0.0.1:{port}/"
        flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"]
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, timeout=60,
                             check=True).stdout.decode()
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "demo-gallery.png"
        shot.unlink(missing_ok=True)
        subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,900", url],
                       capture_output=True, timeout=60, check=True)
    widths = dict(re.findall(r'<img src="/([^"]+)" alt="" data-natural-width="(\d+)"', dom))
    expected = {"sunrise.png": 320, "sunrise_small.png": 80, "ocean.png": 640, "logo.svg": 320,
                "forest.png": 200}
    assert {name.rpartition("/")[2]: int(w) for name, w in widths.items()} == expected
    assert set(widths) == set(demo_names("var/demo"))
    assert '<p id="status">5 of 5 images shown</p>' in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
