"""Database servers of a test's own, to stop and start: a MariaDB and a PostgreSQL cluster,
and a replica of each.

Each lives in a temporary directory, listens on its own loopback port and
Unix socket, and is killed (not shut down politely: a crash is what failover
must survive) and restarted by the failover and replica tests. A replica
follows its primary as in production: MariaDB's binary log replication
(GTID, crash-safe), PostgreSQL's streaming replication of a base backup.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.servers import free_port


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on port {port} within {seconds} s")


class Server:
    """A server process of our own on 127.0.0.1:port."""

    what = "server"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"si-{self.what}-", dir="/tmp"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], dict[str, object]]:
        raise NotImplementedError

    def start(self) -> None:
        args, kwargs = self.command()
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
            )
        _wait_port(self.port, self.proc, self.what)
        self.wait_ready()

    def wait_ready(self) -> None:
        pass

    def kill(self) -> None:
        """Crash the server: its clients see their connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, self.kill_signal)
            self.proc.wait(20)
        self.proc = None

    kill_signal = signal.SIGKILL

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""


class MariaDB(Server):
    what = "mariadb"

    def __init__(self, server_id: int = 1, binlog: bool = False) -> None:
        super().__init__()
        self.server_id = server_id
        # A primary writes the binary log its replicas read.
        self.binlog = binlog
        data = self.dir / "data"
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db",
             "--skip-name-resolve"],
            check=True, capture_output=True, timeout=120,
        )

    def command(self) -> tuple[list[str], dict[str, object]]:
        d = self.dir
        return [
            "/usr/sbin/mariadbd", "--no-defaults", f"--datadir={d / 'data'}", f"--port={self.port}",
            f"--socket={d / 'mysql.sock'}", f"--pid-file={d / 'mysql.pid'}",
            "--bind-address=127.0.0.1", "--user=root", "--skip-name-resolve",
            *([f"--log-bin={d / 'binlog'}", "--binlog-format=ROW"] if self.binlog
              else ["--skip-log-bin"]),
            f"--server-id={self.server_id}", f"--relay-log={d / 'relay'}",
            "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=2",
            "--max-connections=200",
        ], {}

    def sql(self, statement: str) -> list[tuple[object, ...]]:
        """Run one statement as root; its rows."""
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="",
                               connect_timeout=5, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                return list(cur.fetchall())
        finally:
            conn.close()

    def wait_ready(self) -> None:
        import pymysql

        deadline = time.monotonic() + 30
        while True:
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="",
                                connect_timeout=1).close()
                return
            except pymysql.err.MySQLError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class PostgreSQL(Server):
    """`auth`: how TCP clients authenticate ("trust", or "scram-sha-256" to check passwords).

    The Unix socket in `dir` always trusts: the tests' own administration goes there.
    """

    what = "postgresql"
    # Immediate shutdown: the postmaster kills its backends and exits at
    # once, as after a crash (a SIGKILLed postmaster would leave them running).
    kill_signal = signal.SIGQUIT

    def __init__(self, auth: str = "trust") -> None:
        super().__init__()
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb")
        self.bin = Path(bins[-1]).parent
        pw = pwd.getpwnam("postgres")
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        os.chown(self.dir, self.uid, self.gid)
        auth_args = ["--auth=trust"]
        if auth != "trust":
            # initdb wants the superuser to have a password once TCP clients need one.
            pwfile = self.dir / "superuser.pw"
            pwfile.write_text(secrets.token_hex(16) + "\n")
            os.chown(pwfile, self.uid, self.gid)
            auth_args = ["--auth-local=trust", f"--auth-host={auth}", f"--pwfile={pwfile}"]
        # postgres refuses to run as root: run it as the postgres user.
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
             *auth_args, "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120, user=self.uid, group=self.gid,
        )

    def command(self) -> tuple[list[str], dict[str, object]]:
        return [
            str(self.bin / "postgres"), "-D", str(self.dir / "data"), "-p", str(self.port),
            "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            "-c", "shared_buffers=16MB", "-c", "max_connections=100",
        ], {"user": self.uid, "group": self.gid}

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[str, ...]]:
        """Run one statement as postgres with psql; its rows, as text."""
        out = subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             "-d", database, "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
             "-c", statement],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            check=False,
        ).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("postgresql did not become ready")
            time.sleep(0.05)


class MariaDBReplica(MariaDB):
    """A second mariadbd replicating every database of `primary` (started with binlog=True)."""

    what = "mariadb-replica"

    def __init__(self, primary: MariaDB) -> None:
        super().__init__(server_id=primary.server_id + 1)
        self.primary = primary

    def follow(self) -> None:
        """Replicate from the start of the primary's binary log (once, after the first start).

        GTID positions are kept in an InnoDB table, so a replica killed and
        started again goes on where it was; it starts replicating by itself.
        """
        self.sql(
            f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={self.primary.port}, "
            "MASTER_USER='root', MASTER_PASSWORD='', MASTER_USE_GTID=slave_pos, "
            "MASTER_CONNECT_RETRY=1"
        )
        self.sql("START SLAVE")

    def pause(self) -> None:
        """Lag: stop applying the primary's changes."""
        self.sql("STOP SLAVE")

    def resume(self) -> None:
        self.sql("START SLAVE")

    def catch_up(self, seconds: float = 30) -> None:
        """Wait until every change the primary has made is applied here."""
        ((position,),) = self.primary.sql("SELECT @@gtid_binlog_pos")
        ((waited,),) = self.sql(f"SELECT MASTER_GTID_WAIT('{position}', {seconds})")
        if waited != 0:
            raise RuntimeError(f"replica did not reach {position} within {seconds} s: "
                               f"{self.sql('SHOW SLAVE STATUS')}")


class PostgreSQLReplica(PostgreSQL):
    """A hot standby streaming from `primary`, made by `pg_basebackup -R`."""

    what = "postgresql-replica"

    def __init__(self, primary: PostgreSQL) -> None:
        Server.__init__(self)
        self.primary = primary
        self.bin, self.uid, self.gid = primary.bin, primary.uid, primary.gid
        os.chown(self.dir, self.uid, self.gid)
        # -R writes standby.signal and primary_conninfo: it starts as a standby.
        subprocess.run(
            [str(self.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
             "-U", "postgres", "-D", str(self.dir / "data"), "-R", "-X", "stream",
             "--no-sync", "-c", "fast"],
            check=True, capture_output=True, timeout=120, user=self.uid, group=self.gid,
        )

    def pause(self) -> None:
        """Lag: stop replaying the WAL it receives."""
        self.sql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 30
        while self.sql("SELECT pg_get_wal_replay_pause_state()") != [("paused",)]:
            if time.monotonic() > deadline:
                raise RuntimeError("replay did not pause")
            time.sleep(0.02)

    def resume(self) -> None:
        self.sql("SELECT pg_wal_replay_resume()")

    def catch_up(self, seconds: float = 30) -> None:
        """Wait until the WAL the primary has written is replayed here."""
        ((lsn,),) = self.primary.sql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + seconds
        while self.sql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") != [("t",)]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica did not replay up to {lsn} within {seconds} s")
            time.sleep(0.02)
