"""How files are found by name: eZ's name hash, and its delete wildcards as SQL and as regex."""

from __future__ import annotations

import hashlib
import re


def name_hash(name: str) -> str:
    """eZ's key of a file: md5 of its name, lower-case hex."""
    return hashlib.md5(name.encode("utf-8")).hexdigest()


def escape_like(text: str) -> str:
    """Text matched literally by LIKE ... ESCAPE '!'.

    `!`, not a backslash: MySQL reads a backslash inside a string literal as
    an escape of its own and PostgreSQL does not.
    """
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching names that start with `prefix`."""
    return escape_like(prefix) + "%"


def wildcard_to_like(pattern: str) -> str:
    """eZ's delete wildcard as a LIKE pattern: `*` any run (slashes too), `?` one character."""
    return escape_like(pattern).replace("*", "%").replace("?", "_")


def wildcard_to_regex(pattern: str) -> re.Pattern[str]:
    """The same wildcard, matched exactly: LIKE ignores case in MySQL's and SQLite's defaults."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)
