"""The system programs tests run, from the one list scripts/system-packages.

A test asks for a program with `program("apache2")`. When it is missing the
test skips, naming the Debian package and the command that installs it
(with CI=true it fails instead), and `skip_summary` gathers those skips into
the run's last lines.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import pytest

LIST = Path(__file__).resolve().parent.parent / "scripts" / "system-packages"
# Debian leaves the sbin directories off a normal user's PATH; apache2 is there.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
INSTALL = "apt-get install -y --no-install-recommends"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def packages() -> dict[str, str]:
    """What shows each package is installed (a program or a path) -> the package."""
    shown: dict[str, str] = {}
    for line in LIST.read_text().splitlines():
        package, *programs = line.split("#", 1)[0].split() or [""]
        for what in programs:
            shown[what] = package
    return shown


def find(what: str) -> str | None:
    """The path of a program (PATH, then the sbin directories) or of an absolute pattern."""
    if what.startswith("/"):
        found = sorted(glob.glob(what))
        return found[-1] if found else None
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN])
    return shutil.which(what, path=search)


def program(what: str) -> str:
    """The path of `what`, a program or file named in scripts/system-packages.

    Missing: the test skips (fails with CI=true) with a reason ending in the
    command that installs its package.
    """
    package = packages().get(what)
    if package is None:
        raise LookupError(f"{what} is not in {LIST}: add the package that provides it")
    path = find(what)
    if path is not None:
        return path
    unavailable(f"needs {what}: {INSTALL} {package}")


def unavailable(message: str) -> NoReturn:
    """Skip the test for want of a component; with CI=true, where all must be there, fail it."""
    if IN_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def skip_summary(skips: Iterable[tuple[str, str]]) -> list[str]:
    """The closing lines for a run's skips, given as (test file, reason).

    One line per reason with its count and files, then one command that
    installs every package the skipped tests named.
    """
    groups: dict[str, list[str]] = {}
    for file, reason in skips:
        groups.setdefault(reason, []).append(file)
    lines = [
        f"{len(files)} skipped in {', '.join(sorted(set(files)))}: {reason}"
        for reason, files in sorted(groups.items())
    ]
    wanted = sorted({r.rsplit(INSTALL, 1)[1].strip() for r in groups if INSTALL in r})
    if wanted:
        lines.append(f"to run them, install as root: {INSTALL} {' '.join(wanted)}")
        lines.append("(scripts/test does that itself when run as root, "
                     "unless SERVE_IMAGE_TEST_INSTALL=no)")
    return lines
