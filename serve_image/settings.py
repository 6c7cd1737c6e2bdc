"""Load a site module (`sites/NAME.py`) once, validate it, freeze it.

A site is a plain Python module whose upper-case constants are the database
settings, named as in eZ Publish's per-siteaccess `index_image-*.php` so that
its users recognise them. Every error names the file and the constant, as
uvicorn's importer names the module it could not import.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

BACKENDS = ("mysql", "pgsql", "sqlite")
# STORAGE_LAYOUT -> the STORAGE_BACKENDs it runs on (storage/layouts/ has one
# module each). "chunks": ezdbfile + ezdbfile_data (eZ 3.10-4.6);
# "largeobject": eZ 3.8's PostgreSQL ezdbfile.lob_id; "dfs": eZ 4.2+'s DFS
# cluster, ezdfsfile rows and the bytes on a shared mount (DFS_MOUNT_POINT).
LAYOUT_BACKENDS = {
    "chunks": ("mysql", "pgsql", "sqlite"),
    "largeobject": ("pgsql",),
    "dfs": ("mysql", "pgsql"),
}
LAYOUT_NAMES = tuple(LAYOUT_BACKENDS)
# STORAGE_DRIVER for mysql: asyncmy (Cython, the default: the faster of the
# two, bench/README.md) or aiomysql (pure Python, the same API, for a platform
# asyncmy has no wheel for).
MYSQL_DRIVERS = ("aiomysql", "asyncmy")
DEFAULT_PORTS = {"mysql": 3306, "pgsql": 5432}
# eZ's DBChunkSize is 65535, the largest value a MySQL BLOB holds; anything
# over 16 MiB would also overflow a MEDIUMBLOB and makes per-response memory
# unreasonable.
MAX_CHUNK_SIZE = 16 * 1024 * 1024
# Paths that eZ's RewriteRule sends to index_image.php:
#   ^/var/([^/]+/)?storage/images(-versioned)?/.*
VAR_DIR_RE = re.compile(r"^var(/[^/]+)?$")
# eZ's STORAGE_BACKEND / CLUSTER_STORAGE_BACKEND names of its DFS backends:
# the DFS layout on that database.
DFS_BACKENDS = {"dfsmysqli": "mysql", "dfspostgresql": "pgsql"}
# OFFLOAD: who sends a DFS file's bytes once serve-image has decided the answer.
OFFLOAD_RE = re.compile(r"^x-accel-redirect:(/(?:[A-Za-z0-9._~-]+/)+)$|^x-sendfile$")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# RFC 9110 §5.1: a field name is a token.
_FIELD_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Fields serve-image sends itself: a surrogate key must not replace one.
_OWN_FIELDS = frozenset((
    "accept-ranges", "cache-control", "content-disposition", "content-length",
    "content-range", "content-security-policy", "content-type", "date", "etag", "expires",
    "last-modified", "retry-after", "allow", "x-content-type-options",
))


class SiteConfigError(Exception):
    """A site module that cannot be loaded; the message names file and constant."""


class StorageHost(NamedTuple):
    """One database server of STORAGE_HOSTS: a host and port, or a Unix socket."""

    host: str
    port: int
    socket: str | None = None

    @property
    def label(self) -> str:
        """How logs and metrics name the host; never holds a password."""
        return self.socket or (f"[{self.host}]:{self.port}" if ":" in self.host else
                               f"{self.host}:{self.port}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated, immutable settings of one site."""

    source: str
    name: str
    backend: str
    host: str
    port: int
    socket: str | None
    # Every server to try, in order (STORAGE_HOSTS, or the one STORAGE_HOST).
    hosts: tuple[StorageHost, ...]
    # STORAGE_REPLICAS: the endpoint's reads go to the first one up (storage/replicas.py).
    replicas: tuple[StorageHost, ...]
    user: str
    password: str = dataclasses.field(repr=False)
    database: str
    chunk_size: int
    layout: str
    driver: str  # the Python driver: "aiomysql"/"asyncmy", "asyncpg" or "sqlite3"
    charset: str
    pool_size: int
    connect_timeout: float
    acquire_timeout: float
    query_timeout: float
    retry_interval: float
    access_log: str | None
    metrics_path: str | None
    expiry_timeout: int
    var_dir: str | None
    http_cache: bool
    http_range: bool
    cache_control: str
    cache_control_versioned: str
    retry_after: int
    download_non_images: bool
    local_copy_dir: str | None
    local_copy_max_bytes: int
    cache_max_bytes: int
    cache_ttl: float
    header_timeout: float
    max_connections: int | None
    # Invalidation (serve_image/purge.py sends, serve_image/invalidation.py answers).
    purge_urls: tuple[str, ...]
    purge_allow: tuple[IPNetwork, ...]
    purge_timeout: float
    surrogate_key_header: str | None
    # STORAGE_LAYOUT "dfs" (storage/layouts/dfs.py): the mount, its table, the
    # bounds on its reads, and OFFLOAD ("x-accel-redirect:/PREFIX/", "x-sendfile").
    dfs_mount_point: str | None
    dfs_table: str
    dfs_threads: int
    dfs_timeout: float
    offload: str | None

    def describe(self) -> str:
        """Where the site's data lives, for logs: never shows the password."""
        if self.backend == "sqlite":
            return f"sqlite:{self.database}"
        where = ",".join(h.label for h in self.hosts)
        mount = f" + {self.dfs_mount_point}" if self.dfs_mount_point else ""
        return f"{self.backend}://{self.user}@{where}/{self.database}{mount}"

    def scrub(self, text: str) -> str:
        """`text` with the password masked: every message about the database goes through it."""
        return text.replace(self.password, "***") if self.password else text


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


# A host written as `user:password@host`, or a URL as
# `http://user:password@host`, must be refused without repeating it: the
# error would show the password.
_CREDENTIALS = "must not hold a user or password"
_HOST_CREDENTIALS = f"{_CREDENTIALS}: set STORAGE_USER and STORAGE_PASS"


def _has_credentials(host: object) -> bool:
    return isinstance(host, str) and "@" in host


def _host(v: Any) -> str:
    if _has_credentials(v):
        raise ValueError(_HOST_CREDENTIALS)
    return _str(v)


def _opt_str(v: Any) -> str | None:
    if v is None or v == "":
        return None
    return _str(v)


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be a whole number from {lo} to {hi}")
        if not lo <= v <= hi:
            raise ValueError(f"must be a whole number from {lo} to {hi}, not {v}")
        return v

    return check


def _seconds_up_to(hi: int) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= hi:
            raise ValueError(f"must be a number of seconds above 0 and at most {hi}")
        return float(v)

    return check


_seconds = _seconds_up_to(600)


def _opt_int_range(lo: int, hi: int) -> Callable[[Any], int | None]:
    check = _int_range(lo, hi)
    return lambda v: None if v is None else check(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be True or False")
    return v


def _driver(v: Any) -> str | None:
    if v is not None and v not in MYSQL_DRIVERS:
        raise ValueError(f"must be one of {', '.join(map(repr, MYSQL_DRIVERS))}, not {v!r}")
    return None if v is None else str(v)


def _layout(v: Any) -> str:
    if v not in LAYOUT_NAMES:
        raise ValueError(f"must be one of {', '.join(map(repr, LAYOUT_NAMES))}, not {v!r}")
    return str(v)


def _backend(v: Any) -> str:
    # eZ 4.x names its MySQL handler mysqli; its DFS handlers dfsmysqli and
    # dfspostgresql are the same databases with the DFS layout (checked below).
    aliases = {"mysqli": "mysql", "postgresql": "pgsql", **DFS_BACKENDS}
    v = aliases.get(v, v) if isinstance(v, str) else v
    if v not in BACKENDS:
        raise ValueError(f"must be one of {', '.join(map(repr, BACKENDS))}, not {v!r}")
    return str(v)


def _var_dir(v: Any) -> str | None:
    if v is None:
        return None
    text = _str(v).strip("/")
    if not VAR_DIR_RE.match(text) or text.endswith(("/.", "/..")):
        raise ValueError(f"must look like 'var' or 'var/<dir>', not {text!r}")
    return text


def _identifier(v: Any) -> str:
    # It goes into every statement of the layout: a plain SQL name only.
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,58}", v):
        raise ValueError(f"must be a table name (letters, digits, _), not {v!r}")
    return v


def _offload(v: Any) -> str | None:
    if v is None:
        return None
    if (not isinstance(v, str) or not OFFLOAD_RE.match(v)
            or any(part in (".", "..") for part in v.split("/"))):
        raise ValueError(
            f'must be None, "x-accel-redirect:/PREFIX/" (nginx; PREFIX of letters, digits, '
            f'._~-) or "x-sendfile" (Apache mod_xsendfile), not {v!r}'
        )
    return v


def _header_value(v: Any) -> str:
    text = _str(v)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("must not contain control characters")
    return text


def _hosts(v: Any) -> list[dict[str, Any]]:
    """STORAGE_HOSTS, STORAGE_REPLICAS: "host", "host:port", "[v6]:port" or {"host", "port",
    "socket"}."""
    if isinstance(v, str) or not isinstance(v, list | tuple) or not v:
        raise ValueError('must be a non-empty list such as ["db1:3306", "db2:3306"]')
    out = []
    for item in v:
        host = item.get("host") if isinstance(item, dict) else item
        if _has_credentials(host):
            raise ValueError(f"entries {_HOST_CREDENTIALS}")
        if isinstance(item, str):
            m = _HOST_RE.match(item)
            if m is None:
                raise ValueError(f'entries must look like "host" or "host:port", not {item!r}')
            host = m.group(1) or m.group(2)
            port = int(m.group(3)) if m.group(3) else None
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"port must be from 1 to 65535 in {item!r}")
            out.append({"host": host, "port": port, "socket": None})
        elif isinstance(item, dict):
            unknown = set(item) - {"host", "port", "socket"}
            if unknown:
                raise ValueError(f"entries may have host, port and socket, not {sorted(unknown)}")
            host, port, sock = item.get("host", ""), item.get("port"), item.get("socket")
            if not isinstance(host, str) or not (host or sock):
                raise ValueError(f"entry {item!r} needs a host or a socket")
            if port is not None:
                port = _int_range(1, 65535)(port)
            out.append({"host": host or "127.0.0.1", "port": port, "socket": _opt_str(sock)})
        else:
            raise ValueError(f"entries must be strings or dicts, not {type(item).__name__}")
    return out


def _access_log(v: Any) -> str | None:
    if v is None or v is False:
        return None
    if v is True:
        return "text"
    if v not in ("text", "json"):
        raise ValueError(f'must be None, "text" or "json", not {v!r}')
    return str(v)


def _metrics_path(v: Any) -> str | None:
    if v is None:
        return None
    # Under /-/ so that no image path (always /var/...) can ever be it.
    if not isinstance(v, str) or not re.fullmatch(r"/-/[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", v):
        raise ValueError(f'must be None or a path under /-/ such as "/-/metrics", not {v!r}')
    if v == "/-/health":
        raise ValueError("must not be /-/health, the health check's path")
    return v


def _list_of_strings(v: Any, example: str) -> list[str]:
    if isinstance(v, str) or not isinstance(v, list | tuple):
        raise ValueError(f"must be a list such as {example}")
    for item in v:
        if not isinstance(item, str):
            raise ValueError(f"entries must be strings, not {type(item).__name__}")
    return list(v)


def _purge_urls(v: Any) -> tuple[str, ...]:
    """PURGE_URLS: `http[s]://host[:port]` each, normalised; a PURGE's path is the file's."""
    out = []
    for url in _list_of_strings(v, '["http://varnish:6081", "http://node2:8000"]'):
        # Before any message that quotes the entry.
        if _has_credentials(url):
            raise ValueError(f"entries {_CREDENTIALS}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"entry {url!r} is not a valid URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f'entries must look like "http://host:port", not {url!r}')
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(
                f"entry {url!r} must have no path, query or fragment: "
                "the path of each PURGE is the file's"
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        default = 443 if parts.scheme == "https" else 80
        normal = f"{parts.scheme}://{host}:{port or default}"
        if normal not in out:
            out.append(normal)
    return tuple(out)


def _purge_allow(v: Any) -> tuple[IPNetwork, ...]:
    """PURGE_ALLOW: networks in CIDR form ("10.0.0.0/8"); a bare address is its /32 or /128."""
    out = []
    for item in _list_of_strings(v, '["127.0.0.1/32", "10.1.0.0/16"]'):
        try:
            out.append(ipaddress.ip_network(item.strip()))
        except ValueError as e:
            raise ValueError(f"entry {item!r} is not an address or network: {e}") from None
    return tuple(out)


def _field_name(v: Any) -> str | None:
    if v is None:
        return None
    text = _str(v)
    if not _FIELD_NAME.match(text):
        raise ValueError(f'must be None or a header name such as "xkey", not {text!r}')
    if text.lower() in _OWN_FIELDS:
        raise ValueError(f"must not be {text!r}: serve-image sends that header itself")
    return text.lower()


_HOST_RE = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:/\[\]]+))(?::([0-9]{1,5}))?$")

# name -> (validator, default). A default of ... means required.
_CONSTANTS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "STORAGE_BACKEND": (_backend, "sqlite"),
    "STORAGE_HOST": (_host, "127.0.0.1"),
    "STORAGE_PORT": (_int_range(1, 65535), None),
    "STORAGE_SOCKET": (_opt_str, None),
    "STORAGE_HOSTS": (_hosts, None),
    "STORAGE_REPLICAS": (_hosts, None),
    "STORAGE_RETRY_INTERVAL": (_seconds, 0.25),
    "STORAGE_USER": (_str, ""),
    "STORAGE_PASS": (_str, ""),
    "STORAGE_DB": (_str, ...),
    "STORAGE_CHUNK_SIZE": (_int_range(1, MAX_CHUNK_SIZE), 65535),
    "STORAGE_LAYOUT": (_layout, "chunks"),
    "STORAGE_DRIVER": (_driver, None),
    "STORAGE_CHARSET": (_str, "utf8mb4"),
    "STORAGE_POOL_SIZE": (_int_range(1, 1000), 10),
    "STORAGE_CONNECT_TIMEOUT": (_seconds, 2.0),
    "STORAGE_ACQUIRE_TIMEOUT": (_seconds, 1.0),
    "STORAGE_QUERY_TIMEOUT": (_seconds, 10.0),
    "EXPIRY_TIMEOUT": (_int_range(0, 10 * 365 * 86400), 6000),
    "ACCESS_LOG": (_access_log, None),
    "METRICS_PATH": (_metrics_path, None),
    "VAR_DIR": (_var_dir, None),
    "HTTP_CACHE": (_bool, True),
    "HTTP_RANGE": (_bool, True),
    "CACHE_CONTROL": (_header_value, None),
    "CACHE_CONTROL_VERSIONED": (_header_value, None),
    "RETRY_AFTER": (_int_range(0, 86400), 5),
    "DOWNLOAD_NON_IMAGES": (_bool, False),
    "LOCAL_COPY_DIR": (_opt_str, None),
    # 1 GiB: a node's copies must not fill the disk its web server needs.
    "LOCAL_COPY_MAX_BYTES": (_int_range(0, 2**62), 1024**3),
    # The hot-object cache (serve_image/cache.py): 0 bytes = off. CACHE_TTL
    # is how stale a cached file may be served after it changed.
    "CACHE_MAX_BYTES": (_int_range(0, 2**40), 0),
    # Up to a day: with PURGE_ALLOW, a purge drops a file at once, and a long
    # TTL then only bounds what a write that sends no purge leaves stale.
    "CACHE_TTL": (_seconds_up_to(86400), 5.0),
    # Facing clients (docs/internet-facing.md): a connection whose request
    # headers are not complete in HEADER_TIMEOUT seconds is closed; each
    # worker keeps at most MAX_CONNECTIONS open (None: derived from the
    # open-file limit, serve_image/connections.py) and answers 503 over it.
    "HEADER_TIMEOUT": (_seconds, 10.0),
    "MAX_CONNECTIONS": (_opt_int_range(1, 10_000_000), None),
    # Invalidation: where writes send PURGE, who may send one here, how long
    # a purge may take, and the header carrying each file's cache key.
    "PURGE_URLS": (_purge_urls, ()),
    "PURGE_ALLOW": (_purge_allow, ()),
    "PURGE_TIMEOUT": (_seconds, 5.0),
    "SURROGATE_KEY_HEADER": (_field_name, None),
    # STORAGE_LAYOUT "dfs": eZ's MountPointPath; the metadata table; threads
    # that read the mount, and how long one read may take (a hung NFS server
    # must give a 503, not a hung request).
    "DFS_MOUNT_POINT": (_opt_str, None),
    "DFS_TABLE": (_identifier, "ezdfsfile"),
    "DFS_THREADS": (_int_range(1, 256), 16),
    "DFS_TIMEOUT": (_seconds, 5.0),
    "OFFLOAD": (_offload, None),
}
# Settings of the dfs layout alone: set for another, they are an error.
_DFS_ONLY = ("DFS_MOUNT_POINT", "DFS_TABLE", "DFS_THREADS", "DFS_TIMEOUT", "OFFLOAD")
KNOWN_CONSTANTS = tuple(_CONSTANTS)


def _error(source: str, name: str, message: str) -> SiteConfigError:
    return SiteConfigError(f"{source}: {name} {message}")


def settings_from_mapping(values: Mapping[str, Any], source: str, name: str = "") -> Settings:
    """Validate a site's constants; `source` names the file in every error."""
    for key in values:
        if key.isupper() and not key.startswith("_") and key not in _CONSTANTS:
            close = difflib.get_close_matches(key, KNOWN_CONSTANTS, n=1, cutoff=0.75)
            hint = (
                f"did you mean {close[0]}?"
                if close
                else "(prefix it with _ if it is a helper of your own)"
            )
            raise _error(source, key, f"is not a setting serve-image knows: {hint}")
    out: dict[str, Any] = {}
    for key, (check, default) in _CONSTANTS.items():
        if key in values:
            try:
                out[key] = check(values[key])
            except ValueError as e:
                raise _error(source, key, str(e)) from None
        elif default is ...:
            raise _error(source, key, "is missing")
        else:
            out[key] = default
    backend = out["STORAGE_BACKEND"]
    port = out["STORAGE_PORT"] or DEFAULT_PORTS.get(backend, 0)
    database = out["STORAGE_DB"]
    if not database:
        raise _error(source, "STORAGE_DB", "must not be empty")
    if backend == "sqlite" and database != ":memory:" and not os.path.isabs(database):
        # A relative sqlite path is relative to the site file, not to wherever
        # the server happens to be started from.
        base = Path(source).parent if source.endswith(".py") else Path.cwd()
        database = str((base / database).resolve())
    local_copy_dir = out["LOCAL_COPY_DIR"]
    if local_copy_dir is not None:
        # Relative to the site file, like STORAGE_DB. Never created here: a
        # typo must not start filling some other directory.
        base = Path(source).parent if source.endswith(".py") else Path.cwd()
        local_copy_dir = str((base / local_copy_dir).resolve())
        if not os.path.isdir(local_copy_dir):
            raise _error(
                source, "LOCAL_COPY_DIR", f"must be an existing directory, not {local_copy_dir!r}"
            )
    layout = out["STORAGE_LAYOUT"]
    if backend not in LAYOUT_BACKENDS[layout]:
        wanted = " or ".join(map(repr, LAYOUT_BACKENDS[layout]))
        raise _error(
            source, "STORAGE_LAYOUT", f"{layout!r} needs STORAGE_BACKEND {wanted}, not {backend!r}",
        )
    dfs_mount_point = _dfs_mount_point(values, out, source)
    if out["STORAGE_DRIVER"] is not None and backend != "mysql":
        raise _error(source, "STORAGE_DRIVER", f"is for STORAGE_BACKEND 'mysql', not {backend!r}")
    driver = out["STORAGE_DRIVER"] or {"mysql": "asyncmy", "pgsql": "asyncpg"}.get(
        backend, "sqlite3"
    )
    hosts = _storage_hosts(values, out, source, backend, port)
    replicas = _replicas(out, source, backend)
    max_age = f"max-age={out['EXPIRY_TIMEOUT']}"
    cache_control = out["CACHE_CONTROL"] or f"public, {max_age}"
    return Settings(
        source=source,
        name=name or Path(source).stem,
        backend=backend,
        host=hosts[0].host,
        port=hosts[0].port,
        socket=hosts[0].socket,
        hosts=hosts,
        replicas=replicas,
        user=out["STORAGE_USER"],
        password=out["STORAGE_PASS"],
        database=database,
        chunk_size=out["STORAGE_CHUNK_SIZE"],
        layout=out["STORAGE_LAYOUT"],
        driver=driver,
        charset=out["STORAGE_CHARSET"],
        pool_size=out["STORAGE_POOL_SIZE"],
        connect_timeout=out["STORAGE_CONNECT_TIMEOUT"],
        acquire_timeout=out["STORAGE_ACQUIRE_TIMEOUT"],
        query_timeout=out["STORAGE_QUERY_TIMEOUT"],
        retry_interval=out["STORAGE_RETRY_INTERVAL"],
        access_log=out["ACCESS_LOG"],
        metrics_path=out["METRICS_PATH"],
        expiry_timeout=out["EXPIRY_TIMEOUT"],
        var_dir=out["VAR_DIR"],
        http_cache=out["HTTP_CACHE"],
        http_range=out["HTTP_RANGE"],
        cache_control=cache_control,
        # Files under images-versioned never change under one name (eZ
        # writes a new version path instead), so they may be cached as
        # immutable (RFC 8246).
        cache_control_versioned=out["CACHE_CONTROL_VERSIONED"] or f"{cache_control}, immutable",
        retry_after=out["RETRY_AFTER"],
        download_non_images=out["DOWNLOAD_NON_IMAGES"],
        local_copy_dir=local_copy_dir,
        local_copy_max_bytes=out["LOCAL_COPY_MAX_BYTES"],
        cache_max_bytes=out["CACHE_MAX_BYTES"],
        cache_ttl=out["CACHE_TTL"],
        header_timeout=out["HEADER_TIMEOUT"],
        max_connections=out["MAX_CONNECTIONS"],
        purge_urls=out["PURGE_URLS"],
        purge_allow=out["PURGE_ALLOW"],
        purge_timeout=out["PURGE_TIMEOUT"],
        surrogate_key_header=out["SURROGATE_KEY_HEADER"],
        dfs_mount_point=dfs_mount_point,
        dfs_table=out["DFS_TABLE"],
        dfs_threads=out["DFS_THREADS"],
        dfs_timeout=out["DFS_TIMEOUT"],
        offload=out["OFFLOAD"],
    )


def _dfs_mount_point(values: Mapping[str, Any], out: Mapping[str, Any], source: str) -> str | None:
    """DFS_MOUNT_POINT made absolute and checked; the DFS-only settings checked for the layout."""
    layout = out["STORAGE_LAYOUT"]
    raw = values.get("STORAGE_BACKEND")
    if isinstance(raw, str) and raw in DFS_BACKENDS and layout != "dfs":
        raise _error(
            source, "STORAGE_BACKEND",
            f"{raw!r} is eZ's DFS cluster: set STORAGE_LAYOUT = 'dfs' and DFS_MOUNT_POINT, "
            f"or STORAGE_BACKEND = {DFS_BACKENDS[raw]!r} for another layout",
        )
    if layout != "dfs":
        for name in _DFS_ONLY:
            if name in values:
                raise _error(source, name, f"is for STORAGE_LAYOUT 'dfs', not {layout!r}")
        return None
    mount = out["DFS_MOUNT_POINT"]
    if mount is None:
        raise _error(source, "DFS_MOUNT_POINT",
                     "is missing: STORAGE_LAYOUT 'dfs' reads the files from eZ's mount "
                     "(its MountPointPath)")
    # Relative to the site file, like STORAGE_DB; never created here.
    base = Path(source).parent if source.endswith(".py") else Path.cwd()
    path = str((base / mount).resolve())
    if not os.path.isdir(path):
        raise _error(source, "DFS_MOUNT_POINT", f"must be an existing directory, not {path!r}")
    return path


def _storage_hosts(
    values: Mapping[str, Any], out: Mapping[str, Any], source: str, backend: str, port: int
) -> tuple[StorageHost, ...]:
    """The servers to try in order: STORAGE_HOSTS, or the single STORAGE_HOST/PORT/SOCKET."""
    listed = _server_list(out, source, "STORAGE_HOSTS", backend)
    if listed is None:
        return (StorageHost(out["STORAGE_HOST"], port, out["STORAGE_SOCKET"]),)
    for single in ("STORAGE_HOST", "STORAGE_PORT", "STORAGE_SOCKET"):
        if single in values:
            raise _error(
                source, "STORAGE_HOSTS",
                f"and {single} are both set: list every server in STORAGE_HOSTS alone",
            )
    return _addresses(listed, backend)


def _replicas(out: Mapping[str, Any], source: str, backend: str) -> tuple[StorageHost, ...]:
    """STORAGE_REPLICAS: the servers the endpoint reads from before the primary."""
    listed = _server_list(out, source, "STORAGE_REPLICAS", backend)
    return () if listed is None else _addresses(listed, backend)


def _server_list(
    out: Mapping[str, Any], source: str, name: str, backend: str
) -> list[dict[str, Any]] | None:
    """A list of servers (STORAGE_HOSTS, STORAGE_REPLICAS): a database server's setting."""
    listed: list[dict[str, Any]] | None = out[name]
    if listed is not None and backend == "sqlite":
        raise _error(source, name, "is for the mysql and pgsql backends, not sqlite")
    return listed


def _addresses(listed: list[dict[str, Any]], backend: str) -> tuple[StorageHost, ...]:
    return tuple(
        StorageHost(h["host"], h["port"] or DEFAULT_PORTS[backend], h["socket"]) for h in listed
    )


def resolve_site_path(site: str) -> Path:
    """`NAME` -> `$SERVE_IMAGE_SITES/NAME.py` (default `./sites`); a path is taken as is."""
    if site.endswith(".py") or os.sep in site or "/" in site:
        return Path(site)
    base = Path(os.environ.get("SERVE_IMAGE_SITES", "sites"))
    return base / f"{site}.py"


def load_site(site: str) -> Settings:
    """Import a site module by name or path and return its validated settings."""
    path = resolve_site_path(site)
    source = str(path)
    if not path.is_file():
        raise SiteConfigError(f'Could not find site "{site}": no file {source}')
    spec = importlib.util.spec_from_file_location(f"serve_image_site_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SiteConfigError(f'Could not load site "{site}" from {source}')
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the site file is user code: report, don't crash
        line = ""
        tb = e.__traceback__
        filename = os.path.abspath(path)  # what the code object records
        while tb is not None:
            if os.path.abspath(tb.tb_frame.f_code.co_filename) == filename:
                line = f", line {tb.tb_lineno}"
            tb = tb.tb_next
        # A NameError's text is the undefined name: an unquoted password
        # (`STORAGE_PASS = secret`) would be printed.
        detail = (
            "a name that is not defined (a string without its quotes?)"
            if isinstance(e, NameError) else str(e)
        )
        raise SiteConfigError(
            f"{source}{line}: could not run the site module: {type(e).__name__}: {detail}"
        ) from None
    finally:
        sys.modules.pop(spec.name, None)
    return settings_from_mapping(vars(module), source, path.stem)
