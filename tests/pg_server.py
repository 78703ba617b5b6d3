"""A real PostgreSQL server for the test session: initdb + pg_ctl into a temporary folder, on 127.0.0.1.

The server binaries come from EVOMERGE_TEST_PG_BIN, the PATH, or Debian's /usr/lib/postgresql/<version>/bin
(`apt-get install postgresql-15`, which `.ci/run` does where they are missing). PostgreSQL refuses to run as
root, so a root test session runs them as the `postgres` user. Every connection needs a password (scram):
the role `evomerge` has a random one, so tests can look for it in files and output.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "postgres"
ROLE = "evomerge"


def find_bin() -> Path:
    """The folder holding initdb and pg_ctl, or a RuntimeError that says how to install them."""
    candidates = [os.environ.get("EVOMERGE_TEST_PG_BIN", "")]
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    by_version = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name.split(".")[0]))
    candidates += by_version[::-1] + sorted(glob.glob("/usr/pgsql-*/bin"))[::-1]
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them (`apt-get install -y postgresql-15`, "
        "as .ci/run does) or set EVOMERGE_TEST_PG_BIN to the folder that holds them"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A running server; `database()` makes a fresh database owned by the `evomerge` role and returns its URL."""

    def __init__(self, bin_dir: Path, root: Path, port: int, password: str, as_user: list[str]):
        self.bin_dir, self.root, self.port, self.password, self._as = bin_dir, root, port, password, as_user
        self.data = root / "data"
        self._count = 0

    def url(self, database: str, user: str = ROLE, password: str | None = None) -> str:
        password = self.password if password is None else password
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(self.url(database, SUPERUSER), autocommit=True)

    def database(self) -> str:
        self._count += 1
        name = f"test_{os.getpid()}_{self._count}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER {ROLE}')
        return name

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        with self.connect(database) as conn:
            return conn.execute(sql, params).fetchall()

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c shared_buffers=32MB -c max_connections=200"
        )
        out = self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        if out.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {out.stdout}{out.stderr}{log[-2000:]}")

    def stop(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def stop_orphans(bin_dir: Path, as_user: list[str]) -> None:
    """Stop the servers of test sessions that were killed before their teardown (their `owner` pid is gone)."""
    for root in Path(tempfile.gettempdir()).glob("evomerge-pg-*"):
        try:
            owner = int((root / "owner").read_text())
        except (OSError, ValueError):
            continue
        if not _alive(owner):
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
            shutil.rmtree(root, ignore_errors=True)


def start_server() -> PostgresServer:
    """initdb (scram passwords for every connection) and start a server on a free loopback port."""
    bin_dir = find_bin()
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))  # under /tmp: the postgres user can reach it
    (root / "owner").write_text(str(os.getpid()))
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("tests run as root and there is no `postgres` user to run the server as") from None
        os.chown(root, entry.pw_uid, entry.pw_gid)
        if not shutil.which("runuser"):
            raise RuntimeError("running the server as the `postgres` user needs `runuser` (util-linux)")
        as_user = ["runuser", "-u", "postgres", "--"]
    stop_orphans(bin_dir, as_user)
    superuser_password = secrets.token_hex(12)
    pwfile = root / "superuser.pw"
    pwfile.write_text(superuser_password + "\n")
    if as_user:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    init = subprocess.run(
        [
            *as_user,
            str(bin_dir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stdout}{init.stderr}")
    pwfile.unlink()
    # a password with characters a URL must escape, so tests see it in both forms (raw and %-encoded)
    server = PostgresServer(bin_dir, root, 0, f"pw@{secrets.token_hex(10)}", as_user)
    for attempt in range(3):  # another process may take the free port between the probe and the start
        server.port = free_port()
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                shutil.rmtree(root, ignore_errors=True)
                raise
    import psycopg

    with psycopg.connect(server.url("postgres", SUPERUSER, superuser_password), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{server.password}'")
        conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD '{server.password}'")  # one secret to look for in the tests
    return server


__all__ = ["PostgresServer", "find_bin", "start_server"]
