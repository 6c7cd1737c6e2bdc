"""Hostile input: paths, headers and names built to break out, blow up or leak.

Every test runs over SQLite, MariaDB and PostgreSQL (the `app`/`client`
fixtures). The ASGI app is called directly where httpx would refuse to send
the bytes (NUL, invalid UTF-8, CR/LF), and through a real uvicorn server
where the HTTP parser itself is part of the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from serve_image.app import ServeImage
from serve_image.settings import Settings, settings_from_mapping
from serve_image.storage import Layout, make_layout
from tests.conftest import DatabaseFactory
from tests.dbservers import PostgreSQL
from tests.helpers import IMG, SpyLayout, free_port, payload, running, store
from tests.live import SERVER_NAMES, call, live_server, start_serve, stop, wait_serving
from tests.servers import admin

DATA = payload(5000, seed=7)
SECRET = b"outside-the-prefix"
MARKER = "zq<script>alert(9)</script>"


@pytest.fixture
async def stored(writer: Layout) -> Layout:
    await store(writer, f"{IMG}/a.jpg", DATA)
    # Rows a path must never reach: outside the image prefix, and in another var dir.
    await store(writer, "var/site/settings/secret.txt", SECRET, datatype="text/plain")
    await store(writer, "settings/secret.txt", SECRET, datatype="text/plain")
    await store(writer, "var/other/storage/images/a.jpg", SECRET)
    return writer


HOSTILE_PATHS = [
    # (raw path, status)
    (b"/var/site/storage/images/../../settings/secret.txt", 404),
    (b"/var/site/storage/images/%2e%2e/%2e%2e/settings/secret.txt", 404),
    (b"/var/site/storage/images/%2e./%2E%2e/settings/secret.txt", 404),
    (b"/var/site/storage/images/.%2e/.%2e/settings/secret.txt", 404),
    (b"/var/site/storage/images/%2e%2e%2f%2e%2e%2fsettings/secret.txt", 404),
    (b"/var/site/storage/images/..%2F..%2F..%2F..%2Fsettings/secret.txt", 404),
    (b"/var/site/storage/images/./a.jpg", 404),
    (b"/var/site/storage/images//a.jpg", 404),
    (b"/var/site//storage/images/a.jpg", 404),
    (b"//var/site/storage/images/a.jpg", 404),
    (b"/var/site/storage/images/a.jpg/", 404),
    (b"/var/site/storage/images\\..\\..\\settings\\secret.txt", 404),
    (b"/var/site/storage/images/%5c..%5c..%5csettings%5csecret.txt", 404),
    (b"/var/site/storage/images/a.jpg%00.png", 400),
    (b"/var/site/storage/images/a%0d%0aSet-Cookie:%20x=1", 400),
    (b"/var/site/storage/images/a%7f.jpg", 400),
    (b"/var/site/storage/images/%zz.jpg", 400),
    (b"/var/site/storage/images/a%2", 400),
    (b"/var/site/storage/images/%e2%28%a1.jpg", 400),
    (b"/var/site/storage/images/%c0%ae%c0%ae/secret.txt", 400),  # overlong "." in UTF-8
    (b"/var/site/storage/images/\xff\xfe.jpg", 400),
    (b"/var/site/storage/images/" + b"a" * 65536, 414),
    (b"/var/site/storage/images/" + b"%41" * 20000, 414),
    (b"/var/%2e%2e/settings/secret.txt", 404),
    (b"/var/site/settings/secret.txt", 404),
    (b"/settings/secret.txt", 404),
    (b"/var/site/storage/images-versioned/../../settings/secret.txt", 404),
]


@pytest.mark.parametrize(("raw", "status"), HOSTILE_PATHS, ids=range(len(HOSTILE_PATHS)))
async def test_hostile_path_is_a_clear_4xx_without_reaching_another_row(
    app: ServeImage, stored: Layout, raw: bytes, status: int
) -> None:
    got, headers, body, _ = await call(app, raw)
    assert got == status
    assert SECRET not in body
    assert headers[b"content-type"].startswith(b"text/plain")


async def test_var_dir_confines_the_site(settings: Settings, stored: Layout) -> None:
    app = ServeImage(dataclasses.replace(settings, var_dir="var/site"))
    await app.startup()
    try:
        assert (await call(app, b"/var/other/storage/images/a.jpg"))[0] == 404
        assert (await call(app, b"/var/site/../other/storage/images/a.jpg"))[0] == 404
        assert (await call(app, b"/var/storage/images/a.jpg"))[0] == 404
        status, _, body, _ = await call(app, f"/{IMG}/a.jpg".encode())
        assert (status, body) == (200, DATA)
    finally:
        await app.shutdown()


async def test_rejected_paths_never_query_the_database(
    app: ServeImage, spy: SpyLayout, stored: Layout
) -> None:
    # The 400s, 414s and the 404s outside the prefix: decided from the path alone.
    spy.reset()
    for raw, status in HOSTILE_PATHS:
        if status in (400, 414) or b"storage/images" not in raw:
            await call(app, raw)
    assert spy.calls == []


# The server's parser refuses these before the app sees them: its answer, per server
# (granian answers an empty 400, and 414 to a request line too long).
PARSER_400 = {"uvicorn": (400, b"Invalid HTTP request received."), "granian": (400, b"")}
PARSER_LONG_LINE = {"uvicorn": PARSER_400["uvicorn"], "granian": (414, b"")}
NOT_FOUND = (404, b"404 Not Found\n")
WHOLE = (200, DATA)
RAW_REQUESTS = [
    # (request, (status, body), or the parser's answer per server)
    (b"GET /var/site/storage/images/a\x00.jpg HTTP/1.1\r\nHost: t\r\n\r\n", PARSER_400),
    (b"GET /var/site/storage/images/\xff.jpg HTTP/1.1\r\nHost: t\r\n\r\n", PARSER_400),
    (b"GET /var/site/storage/images/%2e%2e/%2e%2e/settings/secret.txt HTTP/1.1\r\n"
     b"Host: t\r\n\r\n", NOT_FOUND),
    (b"GET /var/site/storage/images/..\\..\\settings\\secret.txt HTTP/1.1\r\nHost: t\r\n\r\n",
     NOT_FOUND),
    # A 64 KiB request line: the parser's answer (the app would answer 414, see HOSTILE_PATHS).
    (b"GET /var/site/storage/images/" + b"a" * 65536 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
     PARSER_LONG_LINE),
    # Headers the file does not depend on: ignored, the whole file.
    (b"GET /var/site/storage/images/a.jpg HTTP/1.1\r\nHost: " + b"h" * 60000 + b"\r\n\r\n",
     WHOLE),
    # More ranges than a request may ask for: the whole file (ranges.py).
    (b"GET /var/site/storage/images/a.jpg HTTP/1.1\r\nHost: t\r\nRange: bytes="
     + b"1-1," * 8000 + b"\r\n\r\n", WHOLE),
    (b"GET /var/site/storage/images/a.jpg HTTP/1.1\r\nHost: t\r\nAccept: \x01\x02\r\n\r\n",
     PARSER_400),
    # The absolute form: its path is what counts, and it climbs out of the prefix.
    (b"GET http://evil.example/var/site/storage/images/../../settings/secret.txt HTTP/1.1\r\n"
     b"Host: t\r\n\r\n", NOT_FOUND),
]


@pytest.mark.parametrize("server", SERVER_NAMES)
@pytest.mark.parametrize(("request_bytes", "answer"), RAW_REQUESTS, ids=range(len(RAW_REQUESTS)))
async def test_raw_hostile_requests_through_the_server(
    app: ServeImage, stored: Layout, request_bytes: bytes,
    answer: tuple[int, bytes] | dict[str, tuple[int, bytes]], server: str,
) -> None:
    async with live_server(app, server) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        [length] = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")]
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        writer.close()
    status = int(head.split(b" ", 2)[1])
    assert (status, body) == (answer[server] if isinstance(answer, dict) else answer)
    assert b"Traceback" not in head


# -- headers -------------------------------------------------------------------------
HOSTILE_HEADERS = [
    # (headers, status)
    ([(b"range", b"bytes=" + b"0-0," * 5000)], 200),
    ([(b"range", b"bytes=" + b"9" * 5000 + b"-")], 416),
    ([(b"range", b"bytes=0-" + b"9" * 5000)], 206),
    ([(b"range", b"bytes=-" + b"9" * 5000)], 206),
    ([(b"range", b"bytes=" + b"x" * 65536)], 200),
    ([(b"range", b"\xff\xfe bytes=0-1")], 200),
    ([(b"range", b"bytes=1-0")], 200),
    ([(b"range", b"bytes=0-1"), (b"range", b"bytes=2-3")], 200),  # one list, malformed
    ([(b"range", b"bytes=0-1"), (b"if-range", b"\x00" * 1000)], 200),
    ([(b"if-none-match", b'"' * 100000)], 200),
    ([(b"if-none-match", b"W/" * 50000)], 200),
    ([(b"if-match", b", ".join([b'"x"'] * 10000))], 412),
    ([(b"if-modified-since", b"Sun, 06 Nov 0000 08:49:37 GMT")], 200),
    ([(b"if-modified-since", b"Sun, 06 Nov 99999 08:49:37 GMT")], 200),
    ([(b"if-modified-since", b"Sun, 99 Nov 1994 99:49:37 GMT")], 200),
    ([(b"if-modified-since", b"x" * 100000)], 200),
    ([(b"if-unmodified-since", b"Thu, 01 Jan 1970 00:00:00 GMT")], 412),
    ([(b"if-unmodified-since", b"Fri, 31 Dec 9999 23:59:59 GMT")], 200),
    ([(b"host", b"h" * 100000), (b"accept", b"\x00\xff" * 1000)], 200),
]


@pytest.mark.parametrize(("headers", "status"), HOSTILE_HEADERS, ids=range(len(HOSTILE_HEADERS)))
async def test_hostile_headers_get_the_right_status_with_bounded_reads(
    app: ServeImage, spy: SpyLayout, stored: Layout,
    headers: list[tuple[bytes, bytes]], status: int,
) -> None:
    spy.reset()
    got, _, body, _ = await call(app, f"/{IMG}/a.jpg".encode(), headers=headers)
    assert got == status
    if status == 200:
        assert body == DATA
    # No header makes a request read more than the whole file once.
    assert spy.chunk_reads <= 1 + len(DATA) // 1000
    assert len(spy.calls) <= 2 + len(DATA) // 1000


# -- SQL -----------------------------------------------------------------------------
SQL_NAMES = [
    "o'brien.jpg", 'say "cheese".jpg', "back\\slash.jpg", "100%.jpg", "a_b.jpg",
    "x'; DROP TABLE ezdbfile; --.jpg", "SELECT * FROM ezdbfile.jpg", "`tick`.jpg",
    "$1 ? %s :name.jpg", "null\\0.jpg", "' OR '1'='1.jpg", "日本語 ünï.jpg",
]


async def test_names_with_sql_metacharacters_are_stored_and_served(
    writer: Layout, client: httpx.AsyncClient
) -> None:
    for i, name in enumerate(SQL_NAMES):
        await store(writer, f"{IMG}/{name}", payload(300 + i, seed=i))
    for i, name in enumerate(SQL_NAMES):
        r = await client.get("/" + urllib.parse.quote(f"{IMG}/{name}"))
        assert r.status_code == 200, name
        assert r.content == payload(300 + i, seed=i)
    # `_` and `%` are plain characters, never wildcards.
    assert (await client.get(f"/{IMG}/axb.jpg")).status_code == 404
    assert (await client.get(f"/{IMG}/100x.jpg")).status_code == 404
    # The tables are still there.
    assert (await client.get("/" + urllib.parse.quote(f"{IMG}/a_b.jpg"))).status_code == 200


# -- what errors and logs show ---------------------------------------------------------
@pytest.mark.parametrize(("method", "raw"), [
    ("GET", f"/{IMG}/{MARKER}.jpg"),
    ("GET", f"/{IMG}/%zz{MARKER}"),
    ("GET", f"/nothing/{MARKER}"),
    ("POST", f"/{IMG}/{MARKER}"),
    ("GET", f"/{IMG}/{MARKER}" + "a" * 20000),
])
async def test_error_responses_never_echo_input(
    app: ServeImage, stored: Layout, method: str, raw: str
) -> None:
    status, headers, body, _ = await call(app, raw.encode(), method=method)
    assert 400 <= status < 500
    shown = body + b"".join(headers.values())
    assert b"script" not in shown
    assert b"zq" not in shown
    assert b"Traceback" not in shown


# -- passwords -------------------------------------------------------------------------
# Real password-protected accounts: on this machine's MariaDB, and on a
# PostgreSQL server of the module's own that checks passwords (scram-sha-256;
# this machine's server trusts loopback clients, so no password would be checked).
TOKEN = secrets.token_hex(4)
PASSWORD = f"Pw-{TOKEN}-Distinctive!"
WRONG = f"Wrong-{TOKEN}-Secret!"


@dataclasses.dataclass(frozen=True)
class Account:
    constants: dict[str, Any]  # a site on the account, with the right password
    auth_error: str  # what the server says to a wrong password

    def settings(self, password: str, **extra: Any) -> Settings:
        return settings_from_mapping(
            {**self.constants, "STORAGE_PASS": password, **extra}, "sites/pw.py", "pw")


async def _fill(settings: Settings) -> None:
    b = make_layout(settings)
    await b.connect()
    try:
        await b.create_tables()
        await store(b, f"{IMG}/a.jpg", DATA)
    finally:
        await b.close()


@pytest.fixture(scope="module")
async def mysql_account(databases: DatabaseFactory) -> AsyncIterator[Account]:
    root = await databases.constants("mysql")
    await _fill(settings_from_mapping(root, "<root>"))
    user = f"si_pw_{os.getpid()}_{TOKEN}"
    await admin("mysql", f"CREATE USER '{user}'@'%' IDENTIFIED BY '{PASSWORD}'")
    try:
        await admin("mysql", f"GRANT SELECT ON `{root['STORAGE_DB']}`.* TO '{user}'@'%'")
        yield Account({**root, "STORAGE_USER": user}, f"Access denied for user '{user}'@")
    finally:
        await admin("mysql", f"DROP USER IF EXISTS '{user}'@'%'")


@pytest.fixture(scope="module")
async def pgsql_account() -> AsyncIterator[Account]:
    import asyncpg

    server = PostgreSQL(auth="scram-sha-256")
    try:
        await asyncio.to_thread(server.start)
        user = f"si_pw_{os.getpid()}_{TOKEN}"
        # The Unix socket trusts: the administration goes there.
        pg = await asyncpg.connect(host=str(server.dir), port=server.port, user="postgres",
                                   database="postgres")
        try:
            await pg.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{PASSWORD}'")
            await pg.execute(f"CREATE DATABASE {user} OWNER {user}")
        finally:
            await pg.close()
        constants = {"STORAGE_BACKEND": "pgsql", "STORAGE_HOST": "127.0.0.1",
                     "STORAGE_PORT": server.port, "STORAGE_USER": user, "STORAGE_DB": user}
        account = Account(constants, f'password authentication failed for user "{user}"')
        await _fill(account.settings(PASSWORD))  # over TCP: the password is checked
        yield account
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture(params=["mysql", "pgsql"])
def account(request: pytest.FixtureRequest) -> Account:
    return request.getfixturevalue(f"{request.param}_account")  # type: ignore[no-any-return]


def never_shown(text: str) -> None:
    assert PASSWORD not in text
    assert WRONG not in text


async def test_right_password_serves_and_is_never_shown(
    account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    settings = account.settings(PASSWORD, ACCESS_LOG="json")
    with caplog.at_level(logging.DEBUG):
        async with running(ServeImage(settings)) as c:
            r = await c.get(f"/{IMG}/a.jpg")
            health = await c.get("/-/health")
    assert (r.status_code, r.content, health.status_code) == (200, DATA, 200)
    never_shown(caplog.text + "".join(str(rec.args) for rec in caplog.records))
    never_shown(repr(settings) + settings.describe())


async def test_wrong_password_is_an_authentication_error_never_shown(
    account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    settings = account.settings(WRONG, ACCESS_LOG="json", STORAGE_CONNECT_TIMEOUT=5)
    with caplog.at_level(logging.DEBUG):
        async with running(ServeImage(settings)) as c:
            responses = [await c.get(f"/{IMG}/a.jpg"), await c.get("/-/health"),
                         await c.get(f"/{IMG}/a.jpg", headers={"range": "bytes=0-1"})]
    assert [(r.status_code, r.text) for r in responses] == [
        (503, "503 Service Unavailable\n"), (503, "database unavailable\n"),
        (503, "503 Service Unavailable\n")]
    # The server refused the password: not a server down, not a timeout.
    assert account.auth_error in caplog.text
    for r in responses:
        never_shown(r.text + str(r.headers))
    never_shown(caplog.text + "".join(str(rec.args) for rec in caplog.records))
    never_shown(repr(settings) + settings.describe())


@pytest.mark.parametrize("password", [PASSWORD, WRONG], ids=["right", "wrong"])
async def test_serve_output_never_shows_the_password(
    account: Account, password: str, tmp_path: Path
) -> None:
    """`serve-image serve` at its most verbose: uvicorn's, the drivers' and our own lines."""
    site = tmp_path / "pw.py"
    constants = {**account.constants, "STORAGE_PASS": password, "ACCESS_LOG": "json"}
    site.write_text("".join(f"{k} = {v!r}\n" for k, v in constants.items()))
    port = free_port()
    log = tmp_path / "server.log"
    proc = start_serve(["serve", "--site", str(site), "--port", str(port),
                        "--log-level", "debug"], log)
    try:
        health = await asyncio.to_thread(wait_serving, proc, port, log)
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{port}/{IMG}/a.jpg")
    finally:
        await asyncio.to_thread(stop, proc)
    output = log.read_text()
    assert "Application startup complete" in output
    if password == PASSWORD:
        assert (health, r.status_code, r.content) == (200, 200, DATA)
        assert account.auth_error not in output
    else:
        assert (health, r.status_code) == (503, 503)
        assert account.auth_error in output
    never_shown(output)


@pytest.mark.parametrize("backend_name", ["mysql", "pgsql"])
async def test_unreachable_servers_never_show_the_password(
    backend_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    values: dict[str, Any] = {
        "STORAGE_BACKEND": backend_name, "STORAGE_DB": "si_nowhere", "STORAGE_PASS": PASSWORD,
        "STORAGE_USER": "si_nobody", "STORAGE_CONNECT_TIMEOUT": 1, "ACCESS_LOG": "json",
        "STORAGE_HOSTS": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"],
    }
    settings = settings_from_mapping(values, "sites/unreachable.py")
    with caplog.at_level(logging.DEBUG):
        async with running(ServeImage(settings)) as c:
            responses = [await c.get(f"/{IMG}/a.jpg"), await c.get("/-/health")]
    assert [r.status_code for r in responses] == [503, 503]
    # Refused connections, not an authentication: no password was ever checked.
    assert caplog.text.count("Connect call failed") == 2
    assert "no server left: answering 503" in caplog.text
    for r in responses:
        never_shown(r.text + str(r.headers))
    never_shown(caplog.text + "".join(str(rec.args) for rec in caplog.records))


# -- property-based ----------------------------------------------------------------------
_SEGMENTS = st.sampled_from([
    "a.jpg", "..", ".", "", "%2e%2e", "%2e.", "%2f", "%5c", "\\", "%00", "%zz", "%", "%e2%28",
    "%c0%ae", "storage", "images", "var", "site", "%41", "\x00", "\x7f", "é", "%ff", "?", "#",
    ";", "'", '"', "%25", "a" * 300,
])
_PATHS = st.tuples(
    st.sampled_from(["/var/site/storage/images/", "/var/storage/images-versioned/", "/var/",
                     "/", "", "/-/", "//var/site/storage/images/"]),
    st.lists(st.one_of(_SEGMENTS, st.text(max_size=12)), max_size=8),
).map(lambda t: (t[0] + "/".join(t[1])).encode("utf-8", "surrogatepass"))
_VALUES = st.one_of(
    st.binary(max_size=200),
    st.from_regex(r"bytes=[0-9,\- ]{0,40}", fullmatch=True).map(str.encode),
    st.sampled_from([b'"x"', b"*", b'W/"a", "b"', b"Sun, 06 Nov 1994 08:49:37 GMT",
                     b"Sunday, 06-Nov-94 08:49:37 GMT", b"Sun Nov  6 08:49:37 1994",
                     b"bytes=0-0,-1", b"bytes=-0", b"bytes=99999999999999999999-"]),
)
_HEADERS = st.lists(st.tuples(st.sampled_from([
    b"range", b"if-range", b"if-match", b"if-none-match", b"if-modified-since",
    b"if-unmodified-since", b"host", b"accept", b"accept-encoding",
]), _VALUES), max_size=5)


@hsettings(max_examples=120, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_PATHS, headers=_HEADERS, method=st.sampled_from(["GET", "HEAD", "POST", "PUT"]))
async def test_generated_requests_get_well_formed_answers(
    app: ServeImage, stored: Layout, raw: bytes, headers: list[tuple[bytes, bytes]],
    method: str,
) -> None:
    status, out, body, messages = await call(app, raw, method, headers)
    assert messages[0]["type"] == "http.response.start"
    assert all(m["type"] == "http.response.body" for m in messages[1:])
    assert 200 <= status < 500  # the database is up: no 5xx at all
    for k, v in messages[0]["headers"]:
        assert isinstance(k, bytes) and isinstance(v, bytes)
        assert b"\r" not in k + v and b"\n" not in k + v
    assert messages[-1].get("more_body", False) is False  # complete
    if (method == "HEAD" and status < 300) or status in (204, 304):
        # (A HEAD error's short text is dropped by the server, RFC 9110 §9.3.2.)
        assert body == b""
    elif b"content-length" in out:
        assert len(body) == int(out[b"content-length"])
    assert SECRET not in body

