"""The test servers (MariaDB, PostgreSQL): their DSNs, database creation, free ports.

Shared by tests/conftest.py and the bench/ scripts; imports neither pytest
nor httpx, so `scripts/bench` runs with the `bench` extra alone.
DSNs come from SERVE_IMAGE_TEST_MYSQL and SERVE_IMAGE_TEST_PGSQL (defaults:
this machine's servers).
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

MYSQL_DSN = os.environ.get("SERVE_IMAGE_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
PGSQL_DSN = os.environ.get("SERVE_IMAGE_TEST_PGSQL", "postgresql://postgres@127.0.0.1:5432")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_constants(backend: str) -> dict[str, Any]:
    url = urlsplit(MYSQL_DSN if backend == "mysql" else PGSQL_DSN)
    return {
        "STORAGE_BACKEND": backend,
        "STORAGE_HOST": url.hostname or "127.0.0.1",
        "STORAGE_PORT": url.port or (3306 if backend == "mysql" else 5432),
        "STORAGE_USER": url.username or "",
        "STORAGE_PASS": url.password or "",
    }


async def admin(backend: str, statement: str) -> None:
    """Run one statement on the server outside any test database (CREATE/DROP DATABASE)."""
    c = server_constants(backend)
    if backend == "mysql":
        import asyncmy

        conn = await asyncmy.connect(
            host=c["STORAGE_HOST"], port=c["STORAGE_PORT"], user=c["STORAGE_USER"],
            password=c["STORAGE_PASS"], connect_timeout=3,
        )
        try:
            async with conn.cursor() as cur:
                await cur.execute(statement)
        finally:
            conn.close()
    else:
        import asyncpg

        conn = await asyncpg.connect(
            host=c["STORAGE_HOST"], port=c["STORAGE_PORT"], user=c["STORAGE_USER"] or None,
            password=c["STORAGE_PASS"] or None, database="postgres", timeout=3,
        )
        try:
            await conn.execute(statement)
        finally:
            await conn.close()


async def create_database(backend: str, name: str) -> None:
    if backend == "mysql":
        await admin(backend, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    else:
        await admin(backend, f'CREATE DATABASE "{name}"')


async def drop_database(backend: str, name: str) -> None:
    if backend == "mysql":
        await admin(backend, f"DROP DATABASE IF EXISTS `{name}`")
    else:
        await admin(backend, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
