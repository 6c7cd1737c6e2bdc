"""OFFLOAD through the real web servers: nginx (X-Accel-Redirect) and Apache with Debian's
mod_xsendfile (X-Sendfile), in front of real `serve-image serve` processes on a DFS site,
on MariaDB and on PostgreSQL.

serve-image decides every answer from the row (404, 503, 304, 412, 416); the web
server sends the bytes of a 200 from the mount and answers Range itself. The
configuration is what serve-image prints: `nginx_offload_location` and
`apache-snippet`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve_image import conditional
from serve_image.apache import nginx_location, nginx_offload_location
from serve_image.settings import Settings, load_site
from tests.conftest import DatabaseFactory
from tests.ezdfs import EZ_DDL, IMG, MTIME, connected, ez_delete, ez_row, ez_store
from tests.helpers import free_port, md5, payload
from tests.system import program
from tests.test_apache import MODULES, _stop, _wait_port

SMALL = payload(10_000, 1)
BIG = payload(600_000, 2)
ODD = f"{IMG}/odd/été 100% sure?.jpg"
ODD_PATH = f"/{IMG}/odd/%C3%A9t%C3%A9%20100%25%20sure%3F.jpg"
FILES = {f"{IMG}/small.jpg": SMALL, f"{IMG}/big.jpg": BIG, ODD: b"odd name"}


@dataclass
class Stack:
    root: Path
    urls: dict[str, str]  # "nginx", "apache" -> base URL
    settings: Settings


def _site(root: Path, name: str, constants: dict[str, object], offload: str) -> Path:
    path = root / f"{name}.py"
    values = {**constants, "STORAGE_LAYOUT": "dfs", "DFS_MOUNT_POINT": "mount",
              "VAR_DIR": "var/site", "OFFLOAD": offload}
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return path


def _serve(root: Path, site: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    port = free_port()
    with (root / f"{site.stem}.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve_image", "serve", "--site", str(site), "--port",
             str(port), "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    procs.append(proc)
    _wait_port(port, proc, root / f"{site.stem}.log", 30)
    return port


def _nginx(root: Path, settings: Settings, upstream: int,
           procs: list[subprocess.Popen[bytes]]) -> int:
    port = free_port()
    proxy = nginx_location(settings, f"http://127.0.0.1:{upstream}")
    conf = root / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {root}/nginx-access.log;
    client_body_temp_path {root}/nginx-body;
    proxy_temp_path {root}/nginx-proxy;
    types {{ image/jpeg jpg; }}
    server {{
        listen 127.0.0.1:{port};
{_indent(proxy, 8)}
{_indent(nginx_offload_location(settings), 8)}
    }}
}}
""")
    with (root / "nginx.out").open("wb") as out:
        proc = subprocess.Popen([program("nginx"), "-p", str(root), "-c", str(conf),
                                 "-e", f"{root}/nginx-error.log", "-g", "daemon off;"],
                                stdout=out, stderr=subprocess.STDOUT)
    procs.append(proc)
    _wait_port(port, proc, root / "nginx.out", 10)
    return port


def _apache(root: Path, site: Path, upstream: int, procs: list[subprocess.Popen[bytes]]) -> int:
    program("/usr/lib/apache2/modules/mod_xsendfile.so")
    port = free_port()
    with (root / "snippet.conf").open("wb") as f:
        subprocess.run([sys.executable, "-m", "serve_image", "apache-snippet", "--site",
                        str(site), "--upstream", f"http://127.0.0.1:{upstream}"],
                       check=True, stdout=f, timeout=30)
    modules = "\n".join(
        f"LoadModule {m}_module {MODULES}/mod_{m}.so"
        for m in ("mpm_event", "authz_core", "mime", "rewrite", "proxy", "proxy_http",
                  "xsendfile"))
    run_as = "User www-data\nGroup www-data\n" if os.geteuid() == 0 else ""
    (root / "docroot").mkdir(mode=0o755, exist_ok=True)
    (root / "httpd.conf").write_text(f"""ServerRoot {root}
ServerName 127.0.0.1
{modules}
Listen 127.0.0.1:{port}
PidFile {root}/httpd.pid
DefaultRuntimeDir {root}
ErrorLog {root}/apache-error.log
LogLevel warn
TypesConfig /etc/mime.types
{run_as}DocumentRoot {root}/docroot
<VirtualHost 127.0.0.1:{port}>
    Include {root}/snippet.conf
</VirtualHost>
""")
    with (root / "apache.out").open("wb") as out:
        proc = subprocess.Popen([program("apache2"), "-f", str(root / "httpd.conf"),
                                 "-DFOREGROUND"], stdout=out, stderr=subprocess.STDOUT)
    procs.append(proc)
    _wait_port(port, proc, root / "apache.out", 10)
    return port


def _indent(text: str, by: int) -> str:
    return "\n".join(" " * by + line if line else line for line in text.splitlines())


@pytest.fixture(scope="module", params=["mysql", "pgsql"])
async def stack(request: pytest.FixtureRequest,
                databases: DatabaseFactory) -> AsyncIterator[Stack]:
    program("nginx")
    program("apache2")
    # Not under pytest's tmp_path: the servers' workers (nobody, www-data) must
    # read the mount, and cannot enter /tmp/pytest-of-root (0700).
    root = Path(tempfile.mkdtemp(prefix="serve-image-offload-"))
    root.chmod(0o755)  # noqa: ASYNC240 - set-up
    procs: list[subprocess.Popen[bytes]] = []
    try:
        (root / "mount").mkdir(mode=0o755)
        constants = await databases.constants(str(request.param))
        accel = _site(root, "accel", constants, "x-accel-redirect:/__dfs/")
        sendfile = _site(root, "sendfile", constants, "x-sendfile")
        settings = load_site(str(accel))
        async with connected(settings) as layout:
            for statement in EZ_DDL[settings.backend]:
                await layout.driver.execute(statement)
            for name, data in FILES.items():
                await ez_store(layout, root / "mount", name, data)
            await ez_store(layout, root / "mount", f"{IMG}/deleted.jpg", b"gone")
            await ez_delete(layout, f"{IMG}/deleted.jpg")
            await ez_row(layout, f"{IMG}/pending.jpg", 100)  # its file not copied yet
            await ez_row(layout, f"{IMG}/link.jpg", 7)
        (root / "outside.txt").write_bytes(b"secret!")
        (root / "mount" / IMG / "link.jpg").symlink_to(root / "outside.txt")
        nginx = _nginx(root, settings, _serve(root, accel, procs), procs)
        apache = _apache(root, sendfile, _serve(root, sendfile, procs), procs)
        urls = {"nginx": f"http://127.0.0.1:{nginx}", "apache": f"http://127.0.0.1:{apache}"}
        yield Stack(root, urls, settings)
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["nginx", "apache"])
def url(request: pytest.FixtureRequest, stack: Stack) -> str:
    return stack.urls[str(request.param)]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def _validators(name: str, data: bytes) -> tuple[str, str]:
    return (conditional.make_etag(md5(name), MTIME, len(data)), conditional.http_date(MTIME))


def test_the_web_server_sends_the_bytes_with_serve_images_headers(
    url: str, http: httpx.Client
) -> None:
    for name, data in FILES.items():
        path = ODD_PATH if name == ODD else f"/{name}"
        r = http.get(url + path)
        assert (r.status_code, r.content) == (200, data), name
        etag, last_modified = _validators(name, data)
        assert r.headers["content-length"] == str(len(data))
        assert r.headers["content-type"] == "image/jpeg"
        assert r.headers["etag"] == etag
        assert r.headers["last-modified"] == last_modified
        assert r.headers["cache-control"] == "public, max-age=6000"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "expires" in r.headers
        assert "x-accel-redirect" not in r.headers and "x-sendfile" not in r.headers


def test_the_web_server_answers_ranges(url: str, http: httpx.Client) -> None:
    r = http.get(f"{url}/{IMG}/big.jpg", headers={"Range": "bytes=1000-1999"})
    assert (r.status_code, r.content) == (206, BIG[1000:2000])
    assert r.headers["content-range"] == f"bytes 1000-1999/{len(BIG)}"
    r = http.get(f"{url}/{IMG}/big.jpg", headers={"Range": "bytes=0-9,-10"})
    assert r.status_code == 206
    assert r.headers["content-type"].startswith("multipart/byteranges")
    assert BIG[:10] in r.content and BIG[-10:] in r.content
    etag, _ = _validators(f"{IMG}/big.jpg", BIG)
    r = http.get(f"{url}/{IMG}/big.jpg", headers={"Range": "bytes=5-9", "If-Range": etag})
    assert (r.status_code, r.content) == (206, BIG[5:10])
    r = http.get(f"{url}/{IMG}/big.jpg", headers={"Range": "bytes=5-9", "If-Range": '"old"'})
    assert (r.status_code, r.content) == (200, BIG)
    # Not satisfiable: serve-image's 416, from the row.
    r = http.get(f"{url}/{IMG}/big.jpg", headers={"Range": f"bytes={len(BIG)}-"})
    assert (r.status_code, r.headers["content-range"]) == (416, f"bytes */{len(BIG)}")


def test_conditionals_are_serve_images(url: str, http: httpx.Client) -> None:
    etag, last_modified = _validators(f"{IMG}/small.jpg", SMALL)
    r = http.get(f"{url}/{IMG}/small.jpg", headers={"If-None-Match": etag})
    assert (r.status_code, r.headers["etag"], r.content) == (304, etag, b"")
    r = http.get(f"{url}/{IMG}/small.jpg", headers={"If-Modified-Since": last_modified})
    assert r.status_code == 304
    # Changed for the client: the whole file, whatever the file's own dates say.
    r = http.get(f"{url}/{IMG}/small.jpg", headers={"If-None-Match": '"other"'})
    assert (r.status_code, r.content) == (200, SMALL)
    r = http.get(f"{url}/{IMG}/small.jpg",
                 headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
    assert (r.status_code, r.content) == (200, SMALL)
    r = http.get(f"{url}/{IMG}/small.jpg", headers={"If-Match": etag})
    assert (r.status_code, r.content) == (200, SMALL)
    r = http.get(f"{url}/{IMG}/small.jpg", headers={"If-Match": '"other"'})
    assert r.status_code == 412
    r = http.head(f"{url}/{IMG}/small.jpg")
    assert (r.status_code, r.headers["content-length"], r.content) == (200, "10000", b"")


def test_what_is_not_served_is_serve_images_answer(url: str, http: httpx.Client) -> None:
    for name in ("deleted.jpg", "absent.jpg"):
        r = http.get(f"{url}/{IMG}/{name}")
        assert (r.status_code, r.content) == (404, b"404 Not Found\n"), name
    for name in ("pending.jpg", "link.jpg"):
        r = http.get(f"{url}/{IMG}/{name}")
        assert r.status_code == 503, name
        assert r.content == b"503 Service Unavailable\n"
        assert r.headers["cache-control"] == "no-store"
    assert http.get(f"{url}/{IMG}/pending.jpg").headers["retry-after"] == "1"


def test_the_internal_location_is_not_reachable_from_outside(stack: Stack,
                                                             http: httpx.Client) -> None:
    r = http.get(f"{stack.urls['nginx']}/__dfs/{IMG}/small.jpg")
    assert r.status_code == 404
    assert SMALL not in r.content


# -- the configuration as documented ------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"


def _documented_site(offload: str) -> Settings:
    from dataclasses import replace

    from serve_image.settings import settings_from_mapping

    s = settings_from_mapping({"STORAGE_DB": "x", "VAR_DIR": "var/intranet"}, "intranet.py",
                              "intranet")
    return replace(s, layout="dfs", dfs_mount_point="/mnt/nfs/ezdfs", offload=offload)


def _documented_nginx() -> str:
    import re

    blocks = re.findall(r"```nginx\n(.*?)```", DEPLOY.read_text(), re.DOTALL)
    (block,) = [b for b in blocks if "internal;" in b]
    return str(block)


def test_the_documented_nginx_offload_is_what_serve_image_prints() -> None:
    site = _documented_site("x-accel-redirect:/__ezdfs/")
    assert _indent(nginx_offload_location(site), 4) in _documented_nginx()
    proxy = nginx_location(site, "http://127.0.0.1:8001")
    assert _indent(proxy, 4) in _documented_nginx()


def test_the_documented_nginx_offload_passes_nginx_t(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                    f"events {{}}\nhttp {{\n{_documented_nginx()}}}\n")
    done = subprocess.run([program("nginx"), "-t", "-p", str(tmp_path), "-c", str(conf),
                           "-e", str(tmp_path / "error.log")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_the_documented_apache_lines_are_what_serve_image_prints() -> None:
    from serve_image.apache import apache_snippet

    snippet = apache_snippet(_documented_site("x-sendfile"))
    start = snippet.index("<LocationMatch")
    block = snippet[start:snippet.index("</LocationMatch>") + len("</LocationMatch>")]
    shown = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
    assert _indent("\n".join(shown), 4) in DEPLOY.read_text()


def test_offload_for_the_wrong_server_is_refused() -> None:
    from serve_image.apache import SnippetError, apache_snippet

    with pytest.raises(SnippetError, match="Apache \\(mod_xsendfile\\) needs OFFLOAD = "):
        apache_snippet(_documented_site("x-accel-redirect:/__ezdfs/"))
    with pytest.raises(SnippetError, match="OFFLOAD is not 'x-accel-redirect:/PREFIX/'"):
        nginx_offload_location(_documented_site("x-sendfile"))
