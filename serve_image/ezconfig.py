"""Read an eZ Publish cluster configuration and write the equivalent site module.

Two sources, parsed without running PHP:
- `settings/override/file.ini.append.php`, section `[ClusteringSettings]`
  (DBBackend, DBHost, DBPort, DBSocket, DBName, DBUser, DBPassword, DBChunkSize, ...),
  or for a DFS cluster (`FileHandler=eZDFSFileHandler`) `[eZDFSClusteringSettings]`
  (MountPointPath, DBBackend, DBHost, ...);
- a per-siteaccess `index_image-*.php` (`define('STORAGE_HOST', ...)`) or eZ
  4.7's `config.cluster.php` (`define('CLUSTER_STORAGE_HOST', ...)`, with
  `CLUSTER_STORAGE_BACKEND` 'dfsmysqli' or 'dfspostgresql' and
  `CLUSTER_MOUNT_POINT_PATH` for a DFS cluster).

eZ's MountPointPath is absolute or relative to the eZ root; a relative one
is written out absolute (the eZ root being the directory above `settings/`
for file.ini, the directory of config.cluster.php), since a site file's
relative paths are relative to the site file.

Every setting found is either carried over, or reported with the reason it
is not: nothing is dropped silently. Pure functions apart from reading the
file and writing the site.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_image.settings import DFS_BACKENDS, SiteConfigError, settings_from_mapping


class EzConfigError(Exception):
    """The eZ file cannot be turned into a site; the message says why."""


@dataclass
class Conversion:
    """The site's constants, and what was not carried over (setting, reason)."""

    constants: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- file.ini.append.php ------------------------------------------------------

_INI_TARGETS = {
    "DBHost": "STORAGE_HOST",
    "DBPort": "STORAGE_PORT",
    "DBSocket": "STORAGE_SOCKET",
    "DBName": "STORAGE_DB",
    "DBUser": "STORAGE_USER",
    "DBPassword": "STORAGE_PASS",
    "DBChunkSize": "STORAGE_CHUNK_SIZE",
}
_INI_NOT_NEEDED = {
    "DBConnectRetries": "serve-image does not retry a request's connect: the client gets a "
                        "503 with Retry-After at once, and the pool reconnects by itself",
    "DBExecuteRetries": "serve-image does not repeat failed queries",
}
_INT_SETTINGS = {"STORAGE_PORT", "STORAGE_CHUNK_SIZE", "EXPIRY_TIMEOUT"}


def parse_ini(text: str) -> dict[str, dict[str, str]]:
    """eZ's INI dialect: `[Section]`, `Key=Value`, `#` comments, a PHP comment around it all.

    Array entries (`Key[]=v`) keep the last value under `Key[]`; the cluster
    settings have none.
    """
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        # The PHP wrapper that keeps the file from being served as text.
        line = re.sub(r"^<\?php\s*/\*\s*(#\?ini[^?]*\?>?)?", "", line).strip()
        if not line or line.startswith(("#", "*/", "?>")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(), {})
            continue
        # `Key[]` alone empties an array in eZ: kept, with an empty value,
        # so that no line is dropped unseen. Lines before any section go to "".
        key, _, value = line.partition("=")
        if current is None:
            current = sections.setdefault("", {})
        current[key.strip()] = value.strip()
    return sections


_DFS_NOT_NEEDED = {
    **_INI_NOT_NEEDED,
    "MaxCopyRetries": "serve-image never copies a file to the mount when serving it",
    "MetaDataTableNameCache": "eZ's cache files (ezdfsfile_cache) are not served; serve-image "
                              "reads DFS_TABLE",
}


def _ini_backend(value: str) -> str:
    """DBBackend: `mysql`/`pgsql` (3.x) or a class name such as eZDBFileHandlerMysqliBackend
    or eZDFSFileHandlerPostgresqlBackend."""
    lowered = value.lower()
    if "mysql" in lowered:
        return "mysql"
    if "pgsql" in lowered or "postgres" in lowered:
        return "pgsql"
    raise EzConfigError(f"DBBackend={value} is not a backend serve-image supports (mysql, pgsql)")


def from_ini(text: str) -> Conversion:
    sections = parse_ini(text)
    cluster = sections.get("ClusteringSettings")
    if cluster is None:
        raise EzConfigError("no [ClusteringSettings] section")
    out = Conversion()
    handler = cluster.get("FileHandler", "")
    if handler.lower() in ("ezdfsfilehandler", "ezdfs"):
        return _from_dfs_ini(sections, handler)
    if handler and handler.lower() not in ("ezdb", "ezdbfilehandler"):
        raise EzConfigError(f"FileHandler={handler} is not eZ's database cluster (ezdb)")
    out.constants["STORAGE_BACKEND"] = _ini_backend(cluster.get("DBBackend", "mysql"))
    for key, value in cluster.items():
        if key in ("FileHandler", "DBBackend"):
            continue
        target = _INI_TARGETS.get(key)
        if target is not None:
            _carry(out, key, target, value)
        elif key in _INI_NOT_NEEDED:
            out.skipped.append((key, _INI_NOT_NEEDED[key]))
        else:
            out.skipped.append((key, "not a setting serve-image knows"))
    for name, section in sections.items():
        if name != "ClusteringSettings":
            where = f"[{name}]" if name else "(before any section)"
            out.skipped.append((where, f"{len(section)} setting(s) outside "
                                "[ClusteringSettings], not cluster settings"))
    return out


def _from_dfs_ini(sections: dict[str, dict[str, str]], handler: str) -> Conversion:
    """FileHandler=eZDFSFileHandler: [eZDFSClusteringSettings] names the database and the mount."""
    dfs = sections.get("eZDFSClusteringSettings")
    if dfs is None:
        raise EzConfigError(f"FileHandler={handler} but no [eZDFSClusteringSettings] section")
    out = Conversion()
    out.constants["STORAGE_LAYOUT"] = "dfs"
    # eZ's default DBBackend for DFS is its MySQL(i) backend.
    out.constants["STORAGE_BACKEND"] = _ini_backend(dfs.get("DBBackend", "mysqli"))
    for key, value in dfs.items():
        if key == "DBBackend":
            continue
        if key == "MountPointPath":
            if value:
                out.constants["DFS_MOUNT_POINT"] = value
            continue
        target = _INI_TARGETS.get(key)
        if target is not None and target != "STORAGE_CHUNK_SIZE":
            _carry(out, key, target, value)
        elif key in _DFS_NOT_NEEDED:
            out.skipped.append((key, _DFS_NOT_NEEDED[key]))
        else:
            out.skipped.append((key, "not a setting serve-image knows"))
    if "DFS_MOUNT_POINT" not in out.constants:
        raise EzConfigError("no MountPointPath in [eZDFSClusteringSettings]")
    for key in sections["ClusteringSettings"]:
        if key != "FileHandler":
            out.skipped.append((f"[ClusteringSettings] {key}",
                                "eZDBFileHandler's, not used by eZDFSFileHandler"))
    for name, section in sections.items():
        if name not in ("ClusteringSettings", "eZDFSClusteringSettings"):
            where = f"[{name}]" if name else "(before any section)"
            out.skipped.append((where, f"{len(section)} setting(s) outside the cluster "
                                "sections, not cluster settings"))
    return out


def _carry(out: Conversion, source_name: str, target: str, value: Any) -> None:
    """Convert one value to the site constant's type, or report why it is skipped."""
    if isinstance(value, str) and target in _INT_SETTINGS:
        if value == "":
            out.skipped.append((source_name, "empty: serve-image's default applies"))
            return
        if not re.fullmatch(r"[0-9]+", value):
            raise EzConfigError(f"{source_name} must be a whole number, not {value!r}")
        value = int(value)
    if target == "STORAGE_SOCKET" and value in ("", "disabled", False, None):
        return  # eZ's way of saying "no socket"
    out.constants[target] = value


# -- index_image-*.php / config.cluster.php -------------------------------------

_DEFINE = re.compile(
    r"""define\s*\(\s*(['"])(?P<name>[A-Za-z_][A-Za-z0-9_]*)\1\s*,\s*(?P<value>.*?)\s*\)\s*;""",
    re.DOTALL,
)
# STORAGE_* (3.x-4.6 index_image-*.php) and CLUSTER_* (4.7 config.cluster.php).
_PHP_TARGETS = {
    "STORAGE_BACKEND": "STORAGE_BACKEND",
    "STORAGE_HOST": "STORAGE_HOST",
    "STORAGE_PORT": "STORAGE_PORT",
    "STORAGE_SOCKET": "STORAGE_SOCKET",
    "STORAGE_USER": "STORAGE_USER",
    "STORAGE_PASS": "STORAGE_PASS",
    "STORAGE_DB": "STORAGE_DB",
    "STORAGE_CHUNK_SIZE": "STORAGE_CHUNK_SIZE",
    "STORAGE_CHARSET": "STORAGE_CHARSET",
    "EXPIRY_TIMEOUT": "EXPIRY_TIMEOUT",
    "CLUSTER_STORAGE_BACKEND": "STORAGE_BACKEND",
    "CLUSTER_STORAGE_HOST": "STORAGE_HOST",
    "CLUSTER_STORAGE_PORT": "STORAGE_PORT",
    "CLUSTER_STORAGE_SOCKET": "STORAGE_SOCKET",
    "CLUSTER_STORAGE_USER": "STORAGE_USER",
    "CLUSTER_STORAGE_PASS": "STORAGE_PASS",
    "CLUSTER_STORAGE_DB": "STORAGE_DB",
    "CLUSTER_STORAGE_CHARSET": "STORAGE_CHARSET",
    "CLUSTER_CHUNK_SIZE": "STORAGE_CHUNK_SIZE",
    "CLUSTER_EXPIRY_TIMEOUT": "EXPIRY_TIMEOUT",
    "CLUSTER_ENABLE_HTTP_RANGE": "HTTP_RANGE",
    "CLUSTER_ENABLE_HTTP_CACHE": "HTTP_CACHE",
}
_PHP_NOT_NEEDED = {
    "CLUSTER_HEADER_X_POWERED_BY": "serve-image sends no X-Powered-By header",
    "CLUSTER_ENABLE_DEBUG": "serve-image logs through Python's logging instead",
    "CLUSTER_PERSISTENT_CONNECTION": "serve-image always keeps a connection pool",
    "STORAGE_PERSISTENT_CONNECTION": "serve-image always keeps a connection pool",
    "CLUSTER_METADATA_TABLE_CACHE": "eZ's cache files (ezdfsfile_cache) are not served; "
                                    "serve-image reads DFS_TABLE",
    "CLUSTER_METADATA_CACHE_PATH": "eZ's cache files are not served",
    "CLUSTER_METADATA_STORAGE_PATH": "eZ's cache files are not served",
}
_PHP_BACKENDS = {"mysql": "mysql", "mysqli": "mysql", "pgsql": "pgsql", "postgresql": "pgsql"}


def php_literal(text: str) -> str | int | float | bool | None:
    """A PHP scalar literal; ValueError for anything that is an expression."""
    text = text.strip()
    m = re.fullmatch(r"'((?:[^'\\]|\\.)*)'", text, re.DOTALL)
    if m:
        # Single quotes: only \' and \\ are escapes.
        return re.sub(r"\\([\\'])", r"\1", m.group(1))
    m = re.fullmatch(r'"((?:[^"\\$]|\\.)*)"', text, re.DOTALL)
    if m:
        escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "$": "$"}
        return re.sub(r"\\(.)", lambda e: escapes.get(e.group(1), e.group(0)), m.group(1))
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"-?[0-9]+\.[0-9]+", text):
        return float(text)
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    raise ValueError(text)


def from_php(text: str) -> Conversion:
    # PHP comments could hold old define()s: drop them before matching.
    code = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    code = re.sub(r"(?m)^\s*(//|#).*$", "", code)
    out = Conversion()
    found = False
    for m in _DEFINE.finditer(code):
        found = True
        name, raw = m.group("name"), m.group("value")
        try:
            value = php_literal(raw)
        except ValueError:
            out.skipped.append((name, "not a plain value (a PHP expression): set it by hand"))
            continue
        target = _PHP_TARGETS.get(name)
        if target == "STORAGE_BACKEND":
            out.constants[target] = _php_backend(name, value)
            if isinstance(value, str) and value.lower() in DFS_BACKENDS:
                out.constants["STORAGE_LAYOUT"] = "dfs"
        elif target is not None:
            _carry(out, name, target, value)
        elif name == "CLUSTER_MOUNT_POINT_PATH":
            if not isinstance(value, str):
                raise EzConfigError(f"{name} must be a path, not {value!r}")
            if value:
                out.constants["DFS_MOUNT_POINT"] = value
        elif name in _PHP_NOT_NEEDED:
            out.skipped.append((name, _PHP_NOT_NEEDED[name]))
        else:
            out.skipped.append((name, "not a setting serve-image knows"))
    if not found:
        raise EzConfigError("no define('STORAGE_...') or define('CLUSTER_STORAGE_...') found")
    dfs = out.constants.get("STORAGE_LAYOUT") == "dfs"
    if dfs and "DFS_MOUNT_POINT" not in out.constants:
        raise EzConfigError("a DFS cluster (dfsmysqli, dfspostgresql) with no "
                            "CLUSTER_MOUNT_POINT_PATH")
    if not dfs and "DFS_MOUNT_POINT" in out.constants:
        raise EzConfigError("CLUSTER_MOUNT_POINT_PATH is set but CLUSTER_STORAGE_BACKEND is "
                            "not a DFS backend (dfsmysqli, dfspostgresql)")
    return out


def _php_backend(name: str, value: Any) -> str:
    lowered = str(value).lower()
    backend = _PHP_BACKENDS.get(lowered) or DFS_BACKENDS.get(lowered)
    if backend is None:
        raise EzConfigError(f"{name}={value!r} is not a backend serve-image supports "
                            "(mysql, mysqli, pgsql, dfsmysqli, dfspostgresql)")
    return backend


# -- the site module ----------------------------------------------------------

_ORDER = (
    "STORAGE_BACKEND", "STORAGE_LAYOUT", "DFS_MOUNT_POINT", "STORAGE_HOST", "STORAGE_PORT",
    "STORAGE_SOCKET",
    "STORAGE_USER", "STORAGE_PASS", "STORAGE_DB", "STORAGE_CHUNK_SIZE", "STORAGE_CHARSET",
    "EXPIRY_TIMEOUT", "HTTP_CACHE", "HTTP_RANGE",
)


def convert(path: Path, text: str, layout: str | None = None) -> Conversion:
    """The conversion of one eZ file, recognised by its content."""
    if re.search(r"^\s*\[ClusteringSettings\]", text, re.MULTILINE):
        out = from_ini(text)
    elif "define" in text:
        out = from_php(text)
    else:
        raise EzConfigError("neither an INI file with [ClusteringSettings] nor PHP defines")
    if "STORAGE_DB" not in out.constants:
        raise EzConfigError("no database name (DBName / STORAGE_DB / CLUSTER_STORAGE_DB)")
    if out.constants.get("STORAGE_CHARSET") == "utf8":
        # MySQL's utf8 is 3-byte utf8mb3; utf8mb4 reads the same names and more.
        out.notes.append("STORAGE_CHARSET 'utf8' kept as written; 'utf8mb4' reads the same data")
    backend = out.constants.get("STORAGE_BACKEND", "mysql")
    out.constants.setdefault("STORAGE_BACKEND", backend)
    if out.constants.get("STORAGE_LAYOUT") == "dfs":
        if layout not in (None, "dfs"):
            raise EzConfigError(f"a DFS cluster: --layout {layout} does not apply (dfs)")
        mount = out.constants["DFS_MOUNT_POINT"]
        if not os.path.isabs(mount):
            root = ez_root(path)
            out.constants["DFS_MOUNT_POINT"] = str(root / mount)
            out.notes.append(f"DFS_MOUNT_POINT: eZ's {mount!r} is relative to the eZ root, "
                             f"taken to be {root}")
        return out
    if layout is None and backend == "pgsql":
        # eZ's PostgreSQL cluster backend is 3.8's: the bytes are large objects.
        layout = "largeobject"
        out.notes.append(
            "STORAGE_LAYOUT 'largeobject': eZ's pgsql cluster (3.8-3.9) keeps the bytes in large "
            "objects; use --layout chunks if the database has ezdbfile_data"
        )
    if layout is not None and layout != "chunks":
        out.constants["STORAGE_LAYOUT"] = layout
    return out


def ez_root(source: Path) -> Path:
    """The eZ Publish root a settings file belongs to: the directory above its `settings/`
    (file.ini.append.php), else the file's own directory (config.cluster.php)."""
    source = source.resolve()
    for parent in source.parents:
        if parent.name == "settings":
            return parent.parent
    return source.parent


def render_site(conv: Conversion, source: Path, name: str) -> str:
    """The text of sites/NAME.py: constants in a fixed order, skipped settings as comments."""
    lines = [
        f'"""Site {name}: converted from {source.name} by `serve-image site-from-ez`."""',
        "",
    ]
    for key in sorted(conv.constants, key=lambda k: (_ORDER.index(k) if k in _ORDER else 99, k)):
        lines.append(f"{key} = {conv.constants[key]!r}")
    if conv.skipped:
        lines += ["", f"# Not carried over from {source.name}:"]
        lines += [f"#   {key}: {reason}" for key, reason in conv.skipped]
    return "\n".join(lines) + "\n"


def write_site(source: Path, name: str, sites_dir: Path, *, force: bool = False,
               layout: str | None = None) -> tuple[Path, Conversion]:
    """Convert `source` and write `sites_dir/NAME.py`, validated before it is written."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise EzConfigError(f"--name must be a Python identifier such as intranet, not {name!r}")
    try:
        text = source.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EzConfigError(f"cannot read {source}: {e.strerror}") from None
    try:
        conv = convert(source, text, layout)
    except EzConfigError as e:
        raise EzConfigError(f"{source}: {e}") from None
    target = sites_dir / f"{name}.py"
    try:
        # Same checks as loading the site: a file that would not load is never written.
        settings_from_mapping(conv.constants, str(target), name)
    except SiteConfigError as e:
        raise EzConfigError(f"{source}: the converted settings are not valid: {e}") from None
    if target.exists() and not force:
        raise EzConfigError(f"{target} exists: pass --force to replace it")
    body = render_site(conv, source, name).encode("utf-8")
    sites_dir.mkdir(parents=True, exist_ok=True)
    # 0600: the file holds the database password. Written beside the target
    # and renamed, so a reader never sees half a file.
    tmp = target.with_name(f".{name}.py.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        if force:
            os.replace(tmp, target)
        else:
            # link() fails if the target appeared meanwhile: never overwrite without --force.
            os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, conv
