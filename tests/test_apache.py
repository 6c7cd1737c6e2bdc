"""Debian's apache2, with the generated snippet Included, in front of a real `serve-image serve`.

One Apache serves two virtual hosts on loopback ports: one with the snippet
of `--mode always`, one with `--mode missing`. A headless Chromium loads a
page from it whose images come from the database.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve_image.apache import apache_snippet, nginx_location
from serve_image.cli import main
from serve_image.settings import load_site, settings_from_mapping
from serve_image.storage import make_layout
from tests.helpers import free_port, payload, split
from tests.system import program

MODULES = "/usr/lib/apache2/modules"
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
IMG = "var/site/storage/images"
CHUNK = 1000
BIG = payload(5500, seed=7)  # six chunks
MTIME = 1_700_000_000


def _images() -> dict[str, tuple[str, bytes, int]]:
    """name -> (datatype, bytes, width) of real images, one per format a browser decodes."""
    from PIL import Image, ImageDraw

    out: dict[str, tuple[str, bytes, int]] = {}
    for fmt, mime, width in (("JPEG", "image/jpeg", 64), ("PNG", "image/png", 48),
                             ("GIF", "image/gif", 32), ("WEBP", "image/webp", 40)):
        im = Image.new("RGB", (width, 30), (40, 90, 160))
        ImageDraw.Draw(im).ellipse((2, 2, width - 3, 27), fill=(240, 180, 20))
        buf = io.BytesIO()
        im.save(buf, fmt)
        out[f"{IMG}/browser/pic.{fmt.lower()}"] = (mime, buf.getvalue(), width)
    svg = (b'<svg xmlns="http://www.w3.org/2000/svg" width="120" height="30">'
           b'<rect width="120" height="30" fill="#2b6cb0"/></svg>')
    out[f"{IMG}/browser/pic.svg"] = ("image/svg+xml", svg, 120)
    return out


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>serve-image behind Apache</title></head>
<body>
{imgs}
<pre id="result">pending</pre>
<script>
window.addEventListener("load", () => {{
  const widths = {{}};
  for (const img of document.images) widths[img.getAttribute("src")] = img.naturalWidth;
  document.getElementById("result").textContent = JSON.stringify(widths);
}});
</script>
</body></html>
"""


@dataclass
class Stack:
    root: Path
    always: str  # base URLs of the two virtual hosts
    missing: str
    apache_port_always: int
    upstream_port: int
    images: dict[str, tuple[str, bytes, int]]


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nothing listening on {port} after {seconds}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _snippet(site: Path, upstream: str, mode: str, out: Path) -> None:
    # Through the real command line, as a user would make it.
    with out.open("wb") as f:
        subprocess.run(
            [sys.executable, "-m", "serve_image", "apache-snippet", "--site", str(site),
             "--upstream", upstream, "--mode", mode],
            check=True, stdout=f, timeout=30,
        )


def _httpd_conf(root: Path, ports: tuple[int, int]) -> str:
    run_as = "User www-data\nGroup www-data\n" if os.geteuid() == 0 else ""
    modules = "\n".join(
        f"LoadModule {m}_module {MODULES}/mod_{m}.so"
        for m in ("mpm_event", "authz_core", "mime", "rewrite", "proxy", "proxy_http")
    )
    vhosts = "".join(
        f"<VirtualHost 127.0.0.1:{port}>\n"
        f"    Include {root}/snippet-{mode}.conf\n"
        "    # The site's own rules come after the snippet: like eZ's `.* /index.php`\n"
        "    # for what is not a file, here a 410.\n"
        '    RewriteCond "%{DOCUMENT_ROOT}%{REQUEST_URI}" !-f\n'
        "    RewriteRule ^/var/ - [G]\n"
        "</VirtualHost>\n"
        for port, mode in zip(ports, ("always", "missing"), strict=True)
    )
    return f"""ServerRoot {root}
ServerName 127.0.0.1
{modules}
Listen 127.0.0.1:{ports[0]}
Listen 127.0.0.1:{ports[1]}
PidFile {root}/httpd.pid
DefaultRuntimeDir {root}
ErrorLog {root}/error.log
LogLevel warn
LogFormat "%h \\"%r\\" %>s %B" short
CustomLog {root}/access.log short
TypesConfig /etc/mime.types
{run_as}DocumentRoot {root}/docroot
<Directory {root}/docroot>
    Require all granted
</Directory>
{vhosts}"""


def _write_site(root: Path) -> Path:
    root.chmod(0o755)
    (root / "docroot").mkdir(mode=0o755)
    site = root / "apachetest.py"
    site.write_text(
        f"STORAGE_BACKEND = 'sqlite'\nSTORAGE_DB = {str(root / 'cluster.sqlite')!r}\n"
        f"STORAGE_CHUNK_SIZE = {CHUNK}\nVAR_DIR = 'var/site'\n"
    )
    return site


async def _fill(site: Path, images: dict[str, tuple[str, bytes, int]]) -> None:
    backend = make_layout(load_site(str(site)))
    await backend.connect()
    await backend.create_tables()
    files = {f"{IMG}/big/photo.jpg": ("image/jpeg", BIG),
             f"{IMG}/disk/pic.jpg": ("image/jpeg", b"from the database"),
             f"{IMG}/names/été 100%.jpg": ("image/jpeg", b"accented name")}
    files.update({name: (mime, data) for name, (mime, data, _w) in images.items()})
    for name, (mime, data) in files.items():
        await backend.store(name, split(data, CHUNK), size=len(data), mtime=MTIME,
                            datatype=mime, scope="image")
    await backend.close()


def _start(root: Path, site: Path, images: dict[str, tuple[str, bytes, int]],
           procs: list[subprocess.Popen[bytes]]) -> Stack:
    upstream_port = free_port()
    log = root / "serve-image.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "serve_image", "serve", "--site", str(site),
             "--port", str(upstream_port), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    procs.append(serve)
    upstream = f"http://127.0.0.1:{upstream_port}"
    for mode in ("always", "missing"):
        _snippet(site, upstream, mode, root / f"snippet-{mode}.conf")

    # A file this node has on its disk, with bytes unlike the database's.
    disk = root / "docroot" / "var/site/storage/images/disk"
    disk.mkdir(parents=True)
    for d in (disk, *disk.parents):
        if d == root:
            break
        d.chmod(0o755)
    (disk / "pic.jpg").write_bytes(b"from the disk")
    (disk / "pic.jpg").chmod(0o644)
    imgs = "\n".join(f'<img src="/{name}" alt="{name.rsplit(".", 1)[1]}">' for name in images)
    (root / "docroot" / "gallery.html").write_text(PAGE.format(imgs=imgs))
    (root / "docroot" / "gallery.html").chmod(0o644)

    ports = (free_port(), free_port())
    (root / "httpd.conf").write_text(_httpd_conf(root, ports))
    with (root / "apache.out").open("wb") as out:
        apache = subprocess.Popen(
            [program("apache2"), "-f", str(root / "httpd.conf"), "-DFOREGROUND"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    procs.append(apache)
    _wait_port(upstream_port, serve, log, 20)
    _wait_port(ports[0], apache, root / "apache.out", 10)
    _wait_port(ports[1], apache, root / "apache.out", 10)
    return Stack(root, f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}",
                 ports[0], upstream_port, images)


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    program("apache2")
    # Not under pytest's tmp_path: Apache's children run as www-data, which
    # cannot enter /tmp/pytest-of-root (0700).
    root = Path(tempfile.mkdtemp(prefix="serve-image-apache-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        site = _write_site(root)
        images = _images()
        await _fill(site, images)
        yield _start(root, site, images, procs)
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def test_get_through_apache_is_exact(stack: Stack, http: httpx.Client) -> None:
    r = http.get(f"{stack.always}/{IMG}/big/photo.jpg")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["content-length"] == str(len(BIG))
    assert r.content == BIG


def test_head_through_apache(stack: Stack, http: httpx.Client) -> None:
    r = http.head(f"{stack.always}/{IMG}/big/photo.jpg")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(BIG))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.content == b""


def test_range_through_apache(stack: Stack, http: httpx.Client) -> None:
    r = http.get(f"{stack.always}/{IMG}/big/photo.jpg", headers={"Range": "bytes=990-2010"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 990-2010/{len(BIG)}"
    assert r.content == BIG[990:2011]


def test_if_none_match_through_apache_is_304(stack: Stack, http: httpx.Client) -> None:
    etag = http.head(f"{stack.always}/{IMG}/big/photo.jpg").headers["etag"]
    r = http.get(f"{stack.always}/{IMG}/big/photo.jpg", headers={"If-None-Match": etag})
    assert r.status_code == 304
    assert r.headers["etag"] == etag
    assert r.content == b""


def test_missing_file_is_serve_images_404(stack: Stack, http: httpx.Client) -> None:
    r = http.get(f"{stack.always}/{IMG}/no/such.jpg")
    assert r.status_code == 404
    # serve-image's plain-text body, not Apache's HTML page, nor the site's 410.
    assert r.content == b"404 Not Found\n"


def test_percent_encoded_name_arrives_unchanged(stack: Stack, http: httpx.Client) -> None:
    r = http.get(f"{stack.always}/{IMG}/names/%C3%A9t%C3%A9%20100%25.jpg")
    assert (r.status_code, r.content) == (200, b"accented name")


def test_other_var_dirs_fall_through_to_the_site(stack: Stack, http: httpx.Client) -> None:
    # VAR_DIR is var/site: another var dir reaches the site's own rule (410).
    r = http.get(f"{stack.always}/var/other/storage/images/big/photo.jpg")
    assert r.status_code == 410


def test_absolute_form_target_is_no_open_proxy(stack: Stack) -> None:
    # A request naming another host in its target (RFC 9112 §3.2.2) must go
    # to the configured upstream, never to the host it names.
    with socket.socket() as canary:
        canary.bind(("127.0.0.1", 0))
        canary.listen(1)
        canary.settimeout(0.3)
        other = canary.getsockname()[1]
        with socket.create_connection(("127.0.0.1", stack.apache_port_always), timeout=10) as c:
            c.sendall(
                f"GET http://127.0.0.1:{other}/{IMG}/big/photo.jpg HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{other}\r\nConnection: close\r\n\r\n".encode()
            )
            response = b""
            while chunk := c.recv(65536):
                response += chunk
        with pytest.raises(TimeoutError):
            canary.accept()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == BIG


def test_missing_mode_serves_the_disk_copy_without_serve_image(
    stack: Stack, http: httpx.Client
) -> None:
    r = http.get(f"{stack.missing}/{IMG}/disk/pic.jpg")
    assert (r.status_code, r.content) == (200, b"from the disk")
    # The always host sends the same path to the database.
    assert http.get(f"{stack.always}/{IMG}/disk/pic.jpg").content == b"from the database"


def test_missing_mode_proxies_files_not_on_disk(stack: Stack, http: httpx.Client) -> None:
    r = http.get(f"{stack.missing}/{IMG}/big/photo.jpg", headers={"Range": "bytes=0-0"})
    assert (r.status_code, r.content) == (206, BIG[:1])


def test_browser_decodes_every_image(stack: Stack) -> None:
    chromium = program("chromium")
    url = f"{stack.always}/gallery.html"
    profile = stack.root / "chromium-profile"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, timeout=60,
                         check=True).stdout.decode()
    m = re.search(r'<pre id="result">(.*?)</pre>', dom, re.DOTALL)
    assert m is not None, dom[-2000:]
    widths = json.loads(m.group(1).replace("&amp;", "&"))
    assert widths == {f"/{name}": w for name, (_m, _d, w) in stack.images.items()}
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "apache-gallery.png"
    shot.unlink(missing_ok=True)
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=800,300", url],
                   capture_output=True, timeout=60, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the generated configuration ------------------------------------------------

SHIPPED = ("demo", "example_mysql", "example_pgsql")


@pytest.mark.parametrize("site", SHIPPED)
@pytest.mark.parametrize("mode", ["always", "missing"])
def test_committed_snippets_are_current(
    site: str, mode: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["apache-snippet", "--site", site, "--mode", mode]) == 0
    name = f"{site}.conf" if mode == "always" else f"{site}-missing.conf"
    assert capsys.readouterr().out == (REPO / "apache-snippets" / name).read_text(), (
        f"regenerate: serve-image apache-snippet --site {site} --mode {mode} "
        f"> apache-snippets/{name}"
    )


def test_readme_shows_the_current_nginx_block() -> None:
    demo = settings_from_mapping({"STORAGE_DB": "x", "VAR_DIR": "var/demo"}, "demo.py", "demo")
    readme = (REPO / "apache-snippets" / "README.md").read_text()
    assert nginx_location(demo) in readme
    assert nginx_location(demo, mode="missing") in readme


def test_snippet_uses_the_site_var_dir() -> None:
    s = settings_from_mapping({"STORAGE_DB": "x", "VAR_DIR": "var/intranet"}, "i.py", "intranet")
    assert ('RewriteRule "^/var/intranet/storage/images(-versioned)?/" '
            '"http://10.0.0.5:9000%1" [P,NE,L,E=no-gzip:1]') in apache_snippet(
        s, "http://10.0.0.5:9000/")


def test_snippet_without_var_dir_is_ezs_rule() -> None:
    s = settings_from_mapping({"STORAGE_DB": "x"}, "any.py", "any")
    assert 'RewriteRule "^/var/([^/]+/)?storage/images(-versioned)?/" ' in apache_snippet(s)


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("https://127.0.0.1:8000", "--upstream must start with http:// (serve-image speaks "
                                   "plain HTTP), not 'https://127.0.0.1:8000'"),
        ("http://127.0.0.1:8000/x", "--upstream must be http://host:port with no path, query "
                                    "or fragment, not 'http://127.0.0.1:8000/x'"),
        ("http://a b:80", "--upstream host 'a b' is not a host name or IP address"),
        ("http://u:p@h:80", "--upstream must not hold a user name or password"),
        ("http://h:99999", "--upstream 'http://h:99999' is not a valid URL: "
                           "Port out of range 0-65535"),
        ("http://%{HTTP_HOST}:80", "--upstream host '%{HTTP_HOST}' is not a host name or IP "
                                "address"),
    ],
)
def test_bad_upstream_is_refused(
    upstream: str, message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["apache-snippet", "--site", "demo", "--upstream", upstream]) == 1
    assert capsys.readouterr().err == f"serve-image: error: {message}\n"


def _config_test(
    tmp_path: Path, modules: tuple[str, ...], include: Path
) -> subprocess.CompletedProcess[str]:
    apache = program("apache2")
    loads = "\n".join(f"LoadModule {m}_module {MODULES}/mod_{m}.so" for m in modules)
    conf = tmp_path / "httpd.conf"
    conf.write_text(
        f"ServerRoot {tmp_path}\nServerName 127.0.0.1\n{loads}\nListen 127.0.0.1:{free_port()}\n"
        f"PidFile {tmp_path}/httpd.pid\nErrorLog {tmp_path}/error.log\n"
        f"<VirtualHost *>\n    Include {include}\n</VirtualHost>\n"
    )
    return subprocess.run([apache, "-t", "-f", str(conf)], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("name", [f"{s}{m}.conf" for s in SHIPPED for m in ("", "-missing")])
def test_committed_snippets_pass_apaches_config_test(tmp_path: Path, name: str) -> None:
    done = _config_test(tmp_path, ("mpm_event", "rewrite", "proxy", "proxy_http"),
                        REPO / "apache-snippets" / name)
    assert (done.returncode, done.stderr.strip()) == (0, "Syntax OK")


def test_snippet_names_a_missing_module(tmp_path: Path) -> None:
    done = _config_test(tmp_path, ("mpm_event", "rewrite", "proxy"),
                        REPO / "apache-snippets" / "demo.conf")
    assert done.returncode == 1
    assert "serve-image snippet for demo: mod_proxy_http is not loaded (a2enmod proxy_http)" \
        in done.stderr
