"""Site modules: loaded once, validated, errors naming the file and the constant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_image.cli import main
from serve_image.settings import SiteConfigError, load_site, settings_from_mapping


def write_site(tmp_path: Path, text: str, name: str = "site") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return path


def test_minimal_sqlite_site_defaults(tmp_path: Path) -> None:
    path = write_site(tmp_path, 'STORAGE_DB = "files.sqlite"\n')
    s = load_site(str(path))
    assert s.backend == "sqlite"
    assert s.database == str(tmp_path / "files.sqlite")  # relative to the site file
    assert s.chunk_size == 65535
    assert s.expiry_timeout == 6000
    assert s.cache_control == "public, max-age=6000"
    assert s.cache_control_versioned == "public, max-age=6000, immutable"
    assert s.name == "site"
    assert (s.header_timeout, s.max_connections) == (10.0, None)  # None: from the file limit


def test_mysql_site(tmp_path: Path) -> None:
    path = write_site(
        tmp_path,
        "\n".join(
            [
                'STORAGE_BACKEND = "mysqli"',
                'STORAGE_HOST = "db"',
                'STORAGE_USER = "fred"',
                'STORAGE_PASS = "secret"',
                'STORAGE_DB = "cluster"',
                'VAR_DIR = "var/intranet/"',
            ]
        ),
    )
    s = load_site(str(path))
    assert (s.backend, s.host, s.port, s.database, s.var_dir) == (
        "mysql",
        "db",
        3306,
        "cluster",
        "var/intranet",
    )
    assert "secret" not in repr(s)
    assert s.describe() == "mysql://fred@db:3306/cluster"


def test_site_by_name_from_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_site(tmp_path, 'STORAGE_DB = "x.sqlite"\n', "intranet")
    monkeypatch.setenv("SERVE_IMAGE_SITES", str(tmp_path))
    assert load_site("intranet").name == "intranet"


def test_site_by_name_from_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sites").mkdir()
    write_site(tmp_path / "sites", 'STORAGE_DB = "x.sqlite"\n', "shop")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SERVE_IMAGE_SITES", raising=False)
    assert load_site("shop").database == str(tmp_path / "sites" / "x.sqlite")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'STORAGE_BACKEND = "oracle"\nSTORAGE_DB = "x"',
            "STORAGE_BACKEND must be one of 'mysql', 'pgsql', 'sqlite', not 'oracle'",
        ),
        (
            'STORAGE_DB = "x"\nSTORAGE_CHUNK_SIZE = 0',
            "STORAGE_CHUNK_SIZE must be a whole number from 1 to 16777216, not 0",
        ),
        (
            'STORAGE_DB = "x"\nSTORAGE_CHUNK_SIZE = 20_000_000',
            "STORAGE_CHUNK_SIZE must be a whole number from 1 to 16777216, not 20000000",
        ),
        (
            'STORAGE_DB = "x"\nSTORAGE_CHUNK_SIZE = "65535"',
            "STORAGE_CHUNK_SIZE must be a whole number from 1 to 16777216",
        ),
        (
            'STORAGE_DB = "x"\nSTORAGE_PROT = 3306',
            "STORAGE_PROT is not a setting serve-image knows: did you mean STORAGE_PORT?",
        ),
        (
            'STORAGE_DB = "x"\nBASE = 1',
            "BASE is not a setting serve-image knows: (prefix it with _ if it is a helper",
        ),
        ('STORAGE_BACKEND = "mysql"', "STORAGE_DB is missing"),
        ('STORAGE_DB = ""', "STORAGE_DB must not be empty"),
        ('STORAGE_DB = "x"\nHTTP_CACHE = "yes"', "HTTP_CACHE must be True or False"),
        ('STORAGE_DB = "x"\nVAR_DIR = "/srv/var/x"', "VAR_DIR must look like 'var' or 'var/<dir>'"),
        (
            'STORAGE_DB = "x"\nSTORAGE_PORT = 70000',
            "STORAGE_PORT must be a whole number from 1 to 65535, not 70000",
        ),
        (
            'STORAGE_DB = "x"\nCACHE_CONTROL = "public\\r\\nX-Evil: 1"',
            "CACHE_CONTROL must not contain control characters",
        ),
        (
            'STORAGE_DB = "x"\nSTORAGE_CONNECT_TIMEOUT = 0',
            "STORAGE_CONNECT_TIMEOUT must be a number of seconds above 0",
        ),
        (
            'STORAGE_DB = "x"\nHEADER_TIMEOUT = 0',
            "HEADER_TIMEOUT must be a number of seconds above 0 and at most 600",
        ),
        (
            'STORAGE_DB = "x"\nMAX_CONNECTIONS = 0',
            "MAX_CONNECTIONS must be a whole number from 1 to 10000000, not 0",
        ),
        (
            'STORAGE_DB = "x"\nMAX_CONNECTIONS = 100.5',
            "MAX_CONNECTIONS must be a whole number from 1 to 10000000",
        ),
    ],
)
def test_errors_name_file_and_constant(tmp_path: Path, text: str, message: str) -> None:
    path = write_site(tmp_path, text)
    with pytest.raises(SiteConfigError) as e:
        load_site(str(path))
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_helpers_with_underscore_are_allowed(tmp_path: Path) -> None:
    path = write_site(tmp_path, '_BASE = "/srv"\nSTORAGE_DB = _BASE + "/x.sqlite"\n')
    assert load_site(str(path)).database == "/srv/x.sqlite"


def test_site_that_raises_names_file_and_line(tmp_path: Path) -> None:
    path = write_site(tmp_path, 'STORAGE_DB = "x"\nSTORAGE_PORT = int("abc")\n')
    with pytest.raises(SiteConfigError) as e:
        load_site(str(path))
    assert str(e.value).startswith(f"{path}, line 2: could not run the site module: ValueError")


def test_missing_site_file(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match='Could not find site "nope": no file'):
        load_site("nope")


@pytest.mark.parametrize(("values", "message"), [
    # The password itself, of the wrong type.
    ({"STORAGE_PASS": b"hunter2"}, "s.py: STORAGE_PASS must be a string"),
    ({"STORAGE_PASS": ["hunter2"]}, "s.py: STORAGE_PASS must be a string"),
    # The password under a misspelt name.
    ({"STORAGE_PASSWORD": "hunter2"},
     "s.py: STORAGE_PASSWORD is not a setting serve-image knows: did you mean STORAGE_PASS?"),
    # The password written into a host, as in a DSN. Regression: the
    # STORAGE_HOSTS error repeated the entry, password and all.
    ({"STORAGE_BACKEND": "mysql", "STORAGE_HOSTS": ["root:hunter2@db1:3306"]},
     "s.py: STORAGE_HOSTS entries must not hold a user or password: "
     "set STORAGE_USER and STORAGE_PASS"),
    ({"STORAGE_BACKEND": "mysql", "STORAGE_HOSTS": [{"host": "root:hunter2@db1"}]},
     "s.py: STORAGE_HOSTS entries must not hold a user or password: "
     "set STORAGE_USER and STORAGE_PASS"),
    ({"STORAGE_BACKEND": "pgsql", "STORAGE_HOSTS": [{"host": "db1", "pass": "hunter2"}]},
     "s.py: STORAGE_HOSTS entries may have host, port and socket, not ['pass']"),
    # Regression: STORAGE_HOST took any string, and describe() put it in every log line.
    ({"STORAGE_BACKEND": "pgsql", "STORAGE_HOST": "postgres:hunter2@db1"},
     "s.py: STORAGE_HOST must not hold a user or password: set STORAGE_USER and STORAGE_PASS"),
])
def test_invalid_password_bearing_settings_never_show_the_password(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(SiteConfigError) as e:
        settings_from_mapping({"STORAGE_DB": "x", **values}, "s.py")
    assert str(e.value) == message
    assert "hunter2" not in str(e.value)


def test_cli_reports_broken_site_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_site(tmp_path, 'STORAGE_DB = "x"\nSTORAGE_CHUNK_SIZE = 0\n')
    assert main(["serve", "--site", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"serve-image: error: {path}: STORAGE_CHUNK_SIZE must be a whole number "
        "from 1 to 16777216, not 0\n"
    )


@pytest.mark.parametrize(("constants", "absent", "message"), [
    ('STORAGE_BACKEND = "mysql"', "asyncmy",
     "STORAGE_DRIVER 'asyncmy' is not installed: pip install 'serve-image[mysql]'"),
    ('STORAGE_BACKEND = "mysql"\nSTORAGE_DRIVER = "aiomysql"', "aiomysql",
     "STORAGE_DRIVER 'aiomysql' is not installed: pip install 'serve-image[aiomysql]'"),
    ('STORAGE_BACKEND = "pgsql"', "asyncpg",
     "STORAGE_BACKEND 'pgsql' needs a driver that is not installed (asyncpg): "
     "pip install 'serve-image[pgsql]'"),
])
def test_cli_names_the_extra_a_missing_driver_needs(
    tmp_path: Path, constants: str, absent: str, message: str
) -> None:
    path = write_site(tmp_path, f'{constants}\nSTORAGE_DB = "x"\n')
    # A None in sys.modules makes importing that package fail, as when it is not installed.
    code = (f"import sys; sys.modules[{absent!r}] = None\n"
            "from serve_image.cli import main; sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "ls", "--site", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (1, f"serve-image: error: {path}: {message}\n")


def test_unquoted_password_is_not_echoed(tmp_path: Path) -> None:
    """Regression: `STORAGE_PASS = hunter2secret` printed the NameError's name, the password."""
    path = write_site(tmp_path, 'STORAGE_DB = "x"\n\nSTORAGE_PASS = hunter2secret\n')
    with pytest.raises(SiteConfigError) as e:
        load_site(str(path))
    assert "hunter2secret" not in str(e.value)
    assert str(e.value) == (
        f"{path}, line 3: could not run the site module: NameError: "
        "a name that is not defined (a string without its quotes?)"
    )


def test_line_number_for_a_relative_site_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the line was named only when the site was given by an absolute path."""
    write_site(tmp_path, 'STORAGE_DB = "x"\nSTORAGE_PORT = int("abc")\n', "rel")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SiteConfigError, match=r"^rel\.py, line 2: could not run"):
        load_site("rel.py")
