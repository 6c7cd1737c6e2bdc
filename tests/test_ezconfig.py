"""`serve-image site-from-ez`: eZ Publish cluster settings -> sites/NAME.py."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from serve_image.cli import main
from serve_image.ezconfig import parse_ini, php_literal
from serve_image.settings import load_site

FILE_INI = """<?php /* #?ini charset="utf-8"?

[ClusteringSettings]
# eZ's database cluster
FileHandler=ezdb
DBBackend=eZDBFileHandlerMysqlBackend
DBHost=db.example.org
DBPort=3307
DBSocket=
DBName=cluster
DBUser=fred
DBPassword=s3cret'pw
DBChunkSize=65535
DBConnectRetries=3
DBExecuteRetries=20
NonExistantStaleCacheHandling[]

[FileSettings]
VarDir=var/intranet
*/ ?>
"""

INDEX_IMAGE = """<?php
// index_image-intranet.php
define( 'STORAGE_BACKEND', 'mysql' );
define( 'STORAGE_HOST', 'db' );
define( 'STORAGE_PORT', 3306 );
define( 'STORAGE_SOCKET', false );
define( 'STORAGE_USER', 'fred' );
define( 'STORAGE_PASS', "top\\"secret" );
define( 'STORAGE_DB', 'cluster' );
define( 'STORAGE_CHUNK_SIZE', 65535 );
/* define( 'STORAGE_DB', 'old_cluster' ); */
define( 'EXPIRY_TIMEOUT', 6000 );
define( 'STORAGE_CHARSET', getenv( 'CHARSET' ) );
include_once( 'index_image.php' );
?>
"""

CONFIG_CLUSTER = """<?php
define( 'CLUSTER_STORAGE_BACKEND', 'mysqli' );
define( 'CLUSTER_STORAGE_HOST', 'localhost' );
define( 'CLUSTER_STORAGE_PORT', 3306 );
define( 'CLUSTER_STORAGE_USER', 'clusteruser' );
define( 'CLUSTER_STORAGE_PASS', 'clusterpassword' );
define( 'CLUSTER_STORAGE_DB', 'cluster' );
define( 'CLUSTER_STORAGE_CHARSET', 'utf8mb4' );
define( 'CLUSTER_ENABLE_HTTP_RANGE', false );
define( 'CLUSTER_ENABLE_HTTP_CACHE', true );
define( 'CLUSTER_HEADER_X_POWERED_BY', 'eZ Publish' );
define( 'CLUSTER_EXPIRY_TIMEOUT', 86400 );
"""

PGSQL_38 = """<?php
define( 'STORAGE_BACKEND', 'pgsql' );
define( 'STORAGE_HOST', 'pg' );
define( 'STORAGE_PORT', 5432 );
define( 'STORAGE_USER', 'ez' );
define( 'STORAGE_PASS', '' );
define( 'STORAGE_DB', 'ezcluster' );
define( 'STORAGE_CHUNK_SIZE', 65536 );
include_once( 'index_image_pgsql.php' );
"""


def _run(tmp_path: Path, name: str, text: str, *extra: str) -> int:
    source = tmp_path / name
    source.write_text(text)
    return main(["site-from-ez", str(source), "--name", "intranet",
                 "--sites-dir", str(tmp_path / "sites"), *extra])


def test_file_ini_becomes_a_site(tmp_path: Path) -> None:
    assert _run(tmp_path, "file.ini.append.php", FILE_INI) == 0
    written = (tmp_path / "sites" / "intranet.py").read_text()
    assert written == (
        '"""Site intranet: converted from file.ini.append.php by `serve-image site-from-ez`."""\n'
        "\n"
        "STORAGE_BACKEND = 'mysql'\n"
        "STORAGE_HOST = 'db.example.org'\n"
        "STORAGE_PORT = 3307\n"
        "STORAGE_USER = 'fred'\n"
        'STORAGE_PASS = "s3cret\'pw"\n'
        "STORAGE_DB = 'cluster'\n"
        "STORAGE_CHUNK_SIZE = 65535\n"
        "\n"
        "# Not carried over from file.ini.append.php:\n"
        "#   DBConnectRetries: serve-image does not retry a request's connect: the client gets a "
        "503 with Retry-After at once, and the pool reconnects by itself\n"
        "#   DBExecuteRetries: serve-image does not repeat failed queries\n"
        "#   NonExistantStaleCacheHandling[]: not a setting serve-image knows\n"
        "#   [FileSettings]: 1 setting(s) outside [ClusteringSettings], not cluster settings\n"
    )


def test_written_site_loads(tmp_path: Path) -> None:
    assert _run(tmp_path, "file.ini.append.php", FILE_INI) == 0
    s = load_site(str(tmp_path / "sites" / "intranet.py"))
    assert (s.backend, s.host, s.port, s.socket, s.user, s.password, s.database, s.chunk_size) == (
        "mysql", "db.example.org", 3307, None, "fred", "s3cret'pw", "cluster", 65535
    )


def test_skipped_settings_are_reported_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "file.ini.append.php", FILE_INI) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "serve-image: not carried over: DBConnectRetries: serve-image does not retry a request's "
        "connect: the client gets a 503 with Retry-After at once, and the pool reconnects by "
        "itself",
        "serve-image: not carried over: DBExecuteRetries: serve-image does not repeat failed "
        "queries",
        "serve-image: not carried over: NonExistantStaleCacheHandling[]: not a setting "
        "serve-image knows",
        "serve-image: not carried over: [FileSettings]: 1 setting(s) outside "
        "[ClusteringSettings], not cluster settings",
    ]
    assert "s3cret" not in out + err


def test_site_file_is_private(tmp_path: Path) -> None:
    assert _run(tmp_path, "file.ini.append.php", FILE_INI) == 0
    mode = (tmp_path / "sites" / "intranet.py").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_index_image_php_becomes_a_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "index_image-intranet.php", INDEX_IMAGE) == 0
    s = load_site(str(tmp_path / "sites" / "intranet.py"))
    assert (s.backend, s.host, s.port, s.socket, s.password, s.database, s.expiry_timeout) == (
        "mysql", "db", 3306, None, 'top"secret', "cluster", 6000
    )
    assert capsys.readouterr().err == (
        "serve-image: not carried over: STORAGE_CHARSET: not a plain value (a PHP expression): "
        "set it by hand\n"
    )


def test_config_cluster_php_of_ez_47(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "config.cluster.php", CONFIG_CLUSTER) == 0
    s = load_site(str(tmp_path / "sites" / "intranet.py"))
    assert (s.backend, s.user, s.charset, s.http_range, s.http_cache, s.expiry_timeout) == (
        "mysql", "clusteruser", "utf8mb4", False, True, 86400
    )
    assert capsys.readouterr().err == (
        "serve-image: not carried over: CLUSTER_HEADER_X_POWERED_BY: serve-image sends no "
        "X-Powered-By header\n"
    )


def test_pgsql_of_ez_38_gets_the_largeobject_layout(tmp_path: Path) -> None:
    assert _run(tmp_path, "index_image_pgsql.php", PGSQL_38) == 0
    s = load_site(str(tmp_path / "sites" / "intranet.py"))
    assert (s.backend, s.layout, s.chunk_size, s.database) == (
        "pgsql", "largeobject", 65536, "ezcluster"
    )


def test_layout_flag_overrides(tmp_path: Path) -> None:
    assert _run(tmp_path, "index_image_pgsql.php", PGSQL_38, "--layout", "chunks") == 0
    assert load_site(str(tmp_path / "sites" / "intranet.py")).layout == "chunks"


def test_existing_site_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "sites" / "intranet.py"
    target.parent.mkdir()
    target.write_text("STORAGE_DB = 'mine'\n")
    assert _run(tmp_path, "file.ini.append.php", FILE_INI) == 1
    assert capsys.readouterr().err == (
        f"serve-image: error: {target} exists: pass --force to replace it\n"
    )
    assert target.read_text() == "STORAGE_DB = 'mine'\n"


def test_force_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sites" / "intranet.py"
    target.parent.mkdir()
    target.write_text("STORAGE_DB = 'mine'\n")
    assert _run(tmp_path, "file.ini.append.php", FILE_INI, "--force") == 0
    assert load_site(str(target)).database == "cluster"


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("file.ini.append.php",
         "[ClusteringSettings]\nFileHandler=eZDFSFileHandler\nDBName=c\n",
         "FileHandler=eZDFSFileHandler but no [eZDFSClusteringSettings] section"),
        ("file.ini.append.php",
         "[ClusteringSettings]\nFileHandler=eZDFSFileHandler\n"
         "[eZDFSClusteringSettings]\nDBName=c\n",
         "no MountPointPath in [eZDFSClusteringSettings]"),
        ("file.ini.append.php",
         "[ClusteringSettings]\nDBBackend=eZDBFileHandlerOracleBackend\nDBName=c\n",
         "DBBackend=eZDBFileHandlerOracleBackend is not a backend serve-image supports "
         "(mysql, pgsql)"),
        ("file.ini.append.php", "[ClusteringSettings]\nDBPort=abc\nDBName=c\n",
         "DBPort must be a whole number, not 'abc'"),
        ("file.ini.append.php", "[ClusteringSettings]\nDBHost=db\n",
         "no database name (DBName / STORAGE_DB / CLUSTER_STORAGE_DB)"),
        ("config.cluster.php",
         "<?php define('CLUSTER_STORAGE_BACKEND', 'dfsmysqli'); define('CLUSTER_STORAGE_DB', 'c');",
         "a DFS cluster (dfsmysqli, dfspostgresql) with no CLUSTER_MOUNT_POINT_PATH"),
        ("config.cluster.php",
         "<?php define('CLUSTER_STORAGE_BACKEND', 'mysqli'); define('CLUSTER_STORAGE_DB', 'c');"
         "define('CLUSTER_MOUNT_POINT_PATH', '/mnt/nfs');",
         "CLUSTER_MOUNT_POINT_PATH is set but CLUSTER_STORAGE_BACKEND is not a DFS backend "
         "(dfsmysqli, dfspostgresql)"),
        ("site.ini.append.php", "[DatabaseSettings]\nServer=db\n",
         "neither an INI file with [ClusteringSettings] nor PHP defines"),
    ],
)
def test_unsupported_configurations_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, reason: str
) -> None:
    assert _run(tmp_path, name, text) == 1
    assert capsys.readouterr().err == f"serve-image: error: {tmp_path / name}: {reason}\n"
    assert not (tmp_path / "sites" / "intranet.py").exists()


def test_invalid_value_names_the_constant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, "file.ini.append.php",
                "[ClusteringSettings]\nDBName=c\nDBChunkSize=0\n") == 1
    target = tmp_path / "sites" / "intranet.py"
    assert capsys.readouterr().err == (
        f"serve-image: error: {tmp_path / 'file.ini.append.php'}: the converted settings are not "
        f"valid: {target}: STORAGE_CHUNK_SIZE must be a whole number from 1 to 16777216, not 0\n"
    )


def test_ini_parser_strips_the_php_wrapper() -> None:
    assert parse_ini(FILE_INI)["FileSettings"] == {"VarDir": "var/intranet"}


@pytest.mark.parametrize(
    ("text", "value"),
    [("'it\\'s'", "it's"), ('"a\\nb"', "a\nb"), ("42", 42), ("TRUE", True), ("null", None),
     ("'c:\\\\x'", "c:\\x")],
)
def test_php_literals(text: str, value: object) -> None:
    assert php_literal(text) == value


def test_php_expression_is_not_a_literal() -> None:
    with pytest.raises(ValueError):
        php_literal("getenv('X')")


# -- DFS clusters -------------------------------------------------------------

DFS_INI = """<?php /* #?ini charset="utf-8"?

[ClusteringSettings]
FileHandler=eZDFSFileHandler
DBBackend=eZDBFileHandlerMysqliBackend

[eZDFSClusteringSettings]
MountPointPath=var/nfs
DBBackend={backend}
DBHost=db.example.org
DBPort={port}
DBSocket=
DBName=ezdfs
DBUser=fred
DBPassword=s3cret
DBConnectRetries=3
DBExecuteRetries=20
MaxCopyRetries=5
MetaDataTableNameCache=ezdfsfile_cache
*/ ?>
"""


@pytest.mark.parametrize(("backend", "port", "expected"), [
    ("eZDFSFileHandlerMySQLiBackend", 3306, "mysql"),
    ("eZDFSFileHandlerPostgresqlBackend", 5432, "pgsql"),
])
def test_a_dfs_file_ini_becomes_a_dfs_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str, port: int, expected: str
) -> None:
    # eZ's layout: <root>/settings/override/file.ini.append.php, the mount relative to <root>.
    root = tmp_path / "ezpublish"
    (root / "settings" / "override").mkdir(parents=True)
    (root / "var" / "nfs").mkdir(parents=True)
    ini = root / "settings" / "override" / "file.ini.append.php"
    ini.write_text(DFS_INI.format(backend=backend, port=port))
    assert main(["site-from-ez", str(ini), "--name", "intranet",
                 "--sites-dir", str(tmp_path / "sites")]) == 0
    site = load_site(str(tmp_path / "sites" / "intranet.py"))
    assert (site.backend, site.layout, site.dfs_mount_point) == (
        expected, "dfs", str(root / "var" / "nfs"))
    assert (site.host, site.port, site.database, site.user, site.password) == (
        "db.example.org", port, "ezdfs", "fred", "s3cret")
    err = capsys.readouterr().err
    assert "not carried over: MaxCopyRetries: serve-image never copies a file to the mount" in err
    assert "not carried over: MetaDataTableNameCache: eZ's cache files" in err
    assert ("not carried over: [ClusteringSettings] DBBackend: eZDBFileHandler's, not used by "
            "eZDFSFileHandler") in err
    assert f"DFS_MOUNT_POINT: eZ's 'var/nfs' is relative to the eZ root, taken to be {root}" in err
    assert "s3cret" not in err


@pytest.mark.parametrize(("backend", "expected"), [("dfsmysqli", "mysql"),
                                                   ("dfspostgresql", "pgsql")])
def test_a_dfs_config_cluster_php_becomes_a_dfs_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str, expected: str
) -> None:
    mount = tmp_path / "mnt" / "nfs"
    mount.mkdir(parents=True)
    text = (f"<?php\ndefine( 'CLUSTER_STORAGE_BACKEND', '{backend}' );\n"
            "define( 'CLUSTER_STORAGE_HOST', 'db' );\n"
            "define( 'CLUSTER_STORAGE_USER', 'ez' );\n"
            "define( 'CLUSTER_STORAGE_PASS', 'pw' );\n"
            "define( 'CLUSTER_STORAGE_DB', 'ezdfs' );\n"
            f"define( 'CLUSTER_MOUNT_POINT_PATH', '{mount}' );\n"
            "define( 'CLUSTER_METADATA_TABLE_CACHE', 'ezdfsfile_cache' );\n"
            "define( 'CLUSTER_METADATA_CACHE_PATH', '/cache/' );\n"
            "define( 'CLUSTER_METADATA_STORAGE_PATH', '/storage/' );\n")
    assert _run(tmp_path, "config.cluster.php", text) == 0
    written = (tmp_path / "sites" / "intranet.py").read_text()
    assert written.splitlines()[2:5] == [
        f"STORAGE_BACKEND = {expected!r}", "STORAGE_LAYOUT = 'dfs'",
        f"DFS_MOUNT_POINT = {str(mount)!r}"]
    site = load_site(str(tmp_path / "sites" / "intranet.py"))
    assert (site.backend, site.layout, site.dfs_mount_point, site.database) == (
        expected, "dfs", str(mount), "ezdfs")
    err = capsys.readouterr().err
    for name in ("CLUSTER_METADATA_TABLE_CACHE", "CLUSTER_METADATA_CACHE_PATH",
                 "CLUSTER_METADATA_STORAGE_PATH"):
        assert f"not carried over: {name}: eZ's cache files" in err


def test_a_dfs_cluster_keeps_the_dfs_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = ("<?php define('CLUSTER_STORAGE_BACKEND', 'dfsmysqli'); "
            f"define('CLUSTER_STORAGE_DB', 'c'); define('CLUSTER_MOUNT_POINT_PATH', '{tmp_path}');")
    assert _run(tmp_path, "config.cluster.php", text, "--layout", "chunks") == 1
    assert capsys.readouterr().err.endswith(
        "a DFS cluster: --layout chunks does not apply (dfs)\n")
