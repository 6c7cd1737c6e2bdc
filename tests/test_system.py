"""scripts/system-packages, and what a run says about the tests it had to skip.

The end-to-end test runs `scripts/test` as a new user would, with the
install step off (SERVE_IMAGE_TEST_INSTALL=no) and systemd-analyze taken
off PATH, and reads the run's last lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import system
from tests.system import INSTALL, find, packages, skip_summary

REPO = Path(__file__).resolve().parent.parent


def test_every_program_a_test_asks_for_is_in_the_list() -> None:
    asked = {m.group(1) for f in (REPO / "tests").glob("*.py")
             for m in re.finditer(r'\bprogram\("([^"]+)"\)', f.read_text())}
    assert "apache2" in asked  # the search finds the calls
    assert asked <= set(packages())


def test_the_list_names_a_package_for_each_program() -> None:
    listed = packages()
    assert listed["apache2"] == "apache2"
    assert listed["systemd-analyze"] == listed["systemd-sysusers"] == "systemd"
    assert listed["/usr/lib/postgresql/*/bin/initdb"] == "postgresql"


def test_find_looks_on_path_then_in_sbin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_, sbin = tmp_path / "bin", tmp_path / "sbin"
    for d, name in ((bin_, "tool"), (sbin, "daemon")):
        d.mkdir()
        (d / name).write_text("#!/bin/sh\n")
        (d / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.setattr(system, "SBIN", (str(sbin),))
    assert find("tool") == str(bin_ / "tool")
    assert find("daemon") == str(sbin / "daemon")  # off PATH, as apache2 is for a user
    assert find("no-such-tool") is None
    assert find(str(bin_ / "to*")) == str(bin_ / "tool")


def test_skip_summary_groups_reasons_and_gathers_one_install_command() -> None:
    chromium, wrk = f"needs chromium: {INSTALL} chromium", f"needs wrk: {INSTALL} wrk"
    skips = [("tests/test_apache.py", chromium), ("tests/test_b.py", chromium),
             ("tests/test_apache.py", chromium), ("tests/test_load.py", wrk),
             ("tests/test_x.py", "mysql is not reachable (OSError: refused)")]
    assert skip_summary(skips) == [
        "1 skipped in tests/test_x.py: mysql is not reachable (OSError: refused)",
        f"3 skipped in tests/test_apache.py, tests/test_b.py: {chromium}",
        f"1 skipped in tests/test_load.py: {wrk}",
        f"to run them, install as root: {INSTALL} chromium wrk",
        "(scripts/test does that itself when run as root, unless SERVE_IMAGE_TEST_INSTALL=no)",
    ]
    assert skip_summary([("tests/test_import.py", "needs root and setpriv")]) == [
        "1 skipped in tests/test_import.py: needs root and setpriv"]
    assert skip_summary([]) == []


def _path_without(tmp_path: Path, name: str) -> str:
    """A PATH like this machine's, in which `name` is missing."""
    farm = tmp_path / "bin"
    farm.mkdir()
    for entry in os.scandir("/usr/bin"):
        if entry.name != name:
            (farm / entry.name).symlink_to(entry.path)
    return f"{farm}:/usr/local/sbin:/usr/sbin:/sbin"


def _env(path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    return {**env, "PATH": path, "SERVE_IMAGE_TEST_INSTALL": "no"}


def test_a_run_ends_with_what_was_skipped_and_how_to_install_it(tmp_path: Path) -> None:
    env = _env(_path_without(tmp_path, "systemd-analyze"))
    done = subprocess.run(
        [str(REPO / "scripts/test"), "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'inner'}", "tests/test_deploy.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "installing" not in done.stderr  # SERVE_IMAGE_TEST_INSTALL=no
    last = done.stdout.rstrip("\n").splitlines()[-4:]
    assert re.fullmatch(r"=+ skipped =+", last[0]), done.stdout[-3000:]
    assert last[1:] == [
        f"6 skipped in tests/test_deploy.py: needs systemd-analyze: {INSTALL} systemd",
        f"to run them, install as root: {INSTALL} systemd",
        "(scripts/test does that itself when run as root, unless SERVE_IMAGE_TEST_INSTALL=no)",
    ]


def test_with_ci_a_missing_program_fails_its_tests(tmp_path: Path) -> None:
    env = {**_env(_path_without(tmp_path, "systemd-analyze")), "CI": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'inner'}", "tests/test_deploy.py", "-k", "hardened"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stdout[-3000:]
    assert f"CI=true and needs systemd-analyze: {INSTALL} systemd" in done.stdout
    assert "1 failed" in done.stdout
