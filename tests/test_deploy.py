"""deploy/: the systemd template unit and its user, checked by systemd's own tools.

`systemd-analyze verify` reads the unit as systemd would; `security
--offline` scores its hardening; `systemd-sysusers --root` creates its user
in a scratch root. The unit's own command line, with its environment, runs
a real `serve-image serve` that answers and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve_image.apache import nginx_location
from serve_image.cli import main
from serve_image.settings import settings_from_mapping
from tests.helpers import free_port
from tests.system import program

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DOC = DEPLOY.parent / "docs" / "deploy.md"
UNIT = DEPLOY / "serve-image@.service"
SYSUSERS = DEPLOY / "serve-image.sysusers"
INSTALLED = "/opt/serve-image/bin/serve-image"  # ExecStart's program, as docs/deploy.md installs it
HERE = str(Path(sys.executable).parent / "serve-image")  # the same program in this .venv


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, continuation lines joined, in order."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def setting(key: str) -> str:
    values = [v for _s, k, v in directives(UNIT.read_text()) if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def _instance(tmp_path: Path, text: str, site: str = "demo") -> Path:
    """The unit as the instance serve-image@SITE.service, running this checkout's program."""
    path = tmp_path / f"serve-image@{site}.service"
    path.write_text(text.replace(INSTALLED, HERE))
    return path


def _verify(unit: Path) -> tuple[int, list[str]]:
    """verify's exit status and the lines it wrote about this unit (warnings included)."""
    done = subprocess.run([program("systemd-analyze"), "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in lines if unit.name in line]


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert _verify(_instance(tmp_path, UNIT.read_text())) == (0, [])


@pytest.mark.parametrize(("old", "new"), [
    ("Restart=on-failure", "Restrat=on-failure"),  # an unknown key: a warning, exit status 0
    ("ProtectSystem=strict", "ProtectSystem=stricter"),  # a value it cannot parse
    (INSTALLED, "/nonexistent/serve-image"),  # a program that is not there
    ("[Service]", "[Servce]"),  # no ExecStart= left
])
def test_a_broken_copy_does_not_pass(tmp_path: Path, old: str, new: str) -> None:
    text = UNIT.read_text()
    assert old in text
    status, lines = _verify(_instance(tmp_path, text.replace(old, new)))
    assert status != 0 or lines


def _exposure(unit: Path) -> float:
    done = subprocess.run([program("systemd-analyze"), "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert m is not None, done.stdout[-2000:] + done.stderr
    return float(m.group(1))


def test_the_unit_is_hardened(tmp_path: Path) -> None:
    # systemd's scale runs from 0 (locked down) to 10; 2 and under is "OK".
    assert _exposure(_instance(tmp_path, UNIT.read_text())) <= 2.0
    # The same unit without its hardening block scores far worse: the check can fail.
    bare = UNIT.read_text().split("# Hardening")[0]
    assert _exposure(_instance(tmp_path, bare, site="bare")) > 5.0


def test_sysusers_creates_the_user_the_unit_runs_as(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run([program("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)],
                   check=True, capture_output=True, timeout=60)
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc/passwd").read_text().splitlines()}
    assert users[setting("User")][6] == "/usr/sbin/nologin"
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert any(g.split(":")[0] == setting("Group") for g in groups)


def test_stop_is_graceful_and_failure_restarts() -> None:
    assert setting("KillSignal") == "SIGTERM"
    assert setting("KillMode") == "mixed"  # the main process tells its workers
    # More than the 30 s `serve` gives responses in flight (timeout_graceful_shutdown).
    assert int(setting("TimeoutStopSec")) > 30
    assert setting("Restart") == "on-failure"
    assert setting("LimitNOFILE") == "65536"


def _command(env_file: dict[str, str], site: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart as systemd runs it: Environment=, then the site's EnvironmentFile= over it."""
    env: dict[str, str] = {}
    for assignment in shlex.split(" ".join(v for _s, k, v in directives(UNIT.read_text())
                                           if k == "Environment")):
        key, _, value = assignment.partition("=")
        env[key] = value
    assert setting("EnvironmentFile") == "-/etc/serve-image/%i.env"
    env.update(env_file)
    argv = shlex.split(setting("ExecStart").replace("%i", site))
    assert argv[0] == INSTALLED
    expanded = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a) for a in argv[1:]]
    return [HERE, *expanded], env


def test_the_units_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "intranet.py").write_text('STORAGE_BACKEND = "sqlite"\nSTORAGE_DB = "cluster.db"\n')
    assert main(["init-db", "--site", str(sites / "intranet.py")]) == 0
    port = free_port()
    # What /etc/serve-image/intranet.env would hold.
    argv, env = _command({"SERVE_IMAGE_SITES": str(sites), "SERVE_IMAGE_PORT": str(port),
                          "SERVE_IMAGE_WORKERS": "2"}, "intranet")
    assert argv[1:] == ["serve", "--site", "intranet", "--host", "127.0.0.1", "--port", str(port),
                        "--workers", "2", "--log-level", "info"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env={"PATH": "/usr/bin:/bin", **env},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/-/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert (r.status_code, r.text) == (200, "ok\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(int(setting("TimeoutStopSec"))) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Started parent process" in text  # two workers under uvicorn's supervisor
    # Each worker finished its shutdown, which closes its database pools.
    assert text.count("Application shutdown complete") == 2, text


def test_a_broken_site_exits_with_the_status_the_unit_does_not_restart(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text('STORAGE_DB = "x.db"\nSTORAGE_PROT = 1\n')
    argv, env = _command({"SERVE_IMAGE_SITES": str(tmp_path),
                          "SERVE_IMAGE_PORT": str(free_port())}, "broken")
    done = subprocess.run(argv, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, timeout=60)
    assert str(done.returncode) == setting("RestartPreventExitStatus")
    assert "STORAGE_PROT is not a setting serve-image knows" in done.stderr


def _nginx_example() -> str:
    m = re.search(r"```nginx\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert m is not None
    return m.group(1)


def test_the_docs_nginx_example_passes_nginx_t(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"

    def check(example: str) -> subprocess.CompletedProcess[str]:
        conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                        f"events {{}}\nhttp {{\n{example}}}\n")
        return subprocess.run([program("nginx"), "-t", "-p", str(tmp_path), "-c", str(conf),
                               "-e", str(tmp_path / "error.log")],
                              capture_output=True, text=True, timeout=30)

    done = check(_nginx_example())
    assert done.returncode == 0, done.stderr
    broken = check(_nginx_example().replace("keepalive 16;", "keepalve 16;"))
    assert broken.returncode != 0
    assert 'unknown directive "keepalve"' in broken.stderr


@pytest.mark.parametrize(("site", "port"), [("intranet", 8001), ("extranet", 8002)])
def test_the_docs_nginx_locations_are_what_serve_image_generates(site: str, port: int) -> None:
    settings = settings_from_mapping({"STORAGE_DB": "x", "VAR_DIR": f"var/{site}"}, f"{site}.py")
    upstream = f"http://127.0.0.1:{port}"
    block = nginx_location(settings, upstream).replace(
        f"proxy_pass {upstream};", f"proxy_pass http://serve_image_{site};")
    indented = "\n".join("    " + line if line else line for line in block.splitlines())
    assert indented in DOC.read_text()
    assert f"upstream serve_image_{site} {{\n    server 127.0.0.1:{port};" in _nginx_example()
