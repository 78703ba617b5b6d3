"""A study's lock on a database server, held by a connection of its own for as long as the driver lives.

- PostgreSQL: a session advisory lock, `pg_try_advisory_lock(key)`, the key a hash of the study name (advisory
  locks are per database, like the study). The connection's `application_name` names the holder
  (`evomerge <pid> <since> <host>`), so a refused driver reads who holds it from `pg_locks` and
  `pg_stat_activity` in the same instant, even before the holder has written anything into the study.
- MySQL / MariaDB: `GET_LOCK(name, 0)`; the holder is named by the study's `lock` attribute only.

Taking the lock is one atomic statement on the server: of any number of drivers starting together exactly one
gets it. The server releases it when the connection ends: the driver exits, is SIGKILLed, or its host goes
away (the session's TCP keepalives find a dead peer in about 90 s). The session opts out of the server's idle
timeouts, and the heartbeat (`alive`) keeps MySQL's `wait_timeout` from closing it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

from evomerge.errors import StudyError, first_line
from evomerge.storage_url import dialect, engine_url, password_hint, redact

APP_PREFIX = "evomerge"
# Server-side settings of the lock's session: notice a vanished client within ~90 s, never time the session out.
PG_SESSION = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "6",
    "idle_in_transaction_session_timeout": "0",
    "idle_session_timeout": "0",
    "statement_timeout": "0",
}


def pg_key(study_name: str) -> int:
    """The study's advisory lock key: a signed 64-bit hash of its name."""
    digest = hashlib.sha256(f"evomerge study {study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def app_name(since: float) -> str:
    """`evomerge <pid> <since> <host>`, within PostgreSQL's 63 characters (a long host name is cut)."""
    return f"{APP_PREFIX} {os.getpid()} {int(since)} {socket.gethostname()}"[:63]


def parse_app_name(text: str | None) -> dict[str, Any] | None:
    parts = (text or "").split(" ", 3)
    if len(parts) != 4 or parts[0] != APP_PREFIX or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return {"pid": int(parts[1]), "since": float(parts[2]), "host": parts[3]}


class ServerLock:
    """Base: a dedicated AUTOCOMMIT connection (no transaction left open for hours) holding one named lock."""

    def __init__(self, url: str, study_name: str, since: float | None = None):
        self.url, self.name = url, study_name
        self.since = time.time() if since is None else since
        self._engine: Any = None  # a SQLAlchemy Engine once connected
        self._conn: Any = None  # its Connection

    def _connect(self):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        try:
            url = engine_url(self.url)
            self._engine = create_engine(
                url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args=self._connect_args(url)
            )
            self._conn = self._engine.connect()
            self._setup()
        except StudyError:
            raise
        except Exception as err:  # sqlalchemy raises many kinds for a bad URL or an unreachable server
            self.close()
            raise StudyError(
                f"storage {redact(self.url)!r} cannot be opened ({type(err).__name__}: {redact(first_line(err))})"
                f"{password_hint(self.url) or '; fix `storage` or --storage'}"
            ) from None

    def _scalar(self, sql: str, **params: Any) -> Any:
        from sqlalchemy import text

        return self._conn.execute(text(sql), params).scalar()

    def _connect_args(self, url: str) -> dict[str, Any]:
        return {}

    def _setup(self) -> None:
        pass

    def try_acquire(self) -> bool:
        """Take the lock without waiting: True if this connection holds it now."""
        raise NotImplementedError

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock ({pid, host, since}), where the server can tell."""
        return None

    def alive(self) -> bool:
        """Whether the lock's connection (and so the lock) still stands; a round trip that also keeps it from idling
        out."""
        try:
            self._scalar("SELECT 1")
            return True
        except Exception:  # a closed connection, a restarted server, a network failure: the lock is gone
            return False

    def release(self) -> None:
        """Unlock, then close: the unlock is synchronous, where a closing session's locks go a moment later."""
        try:
            self._unlock()
        except Exception:  # a broken connection: the server drops its locks with it
            pass
        self.close()

    def _unlock(self) -> None:
        pass

    def close(self) -> None:
        conn, engine, self._conn, self._engine = self._conn, self._engine, None, None
        try:
            if conn is not None:
                conn.close()
            if engine is not None:
                engine.dispose()
        except Exception:  # already broken: nothing left to release
            pass


class PostgresLock(ServerLock):
    def _connect_args(self, url: str) -> dict[str, Any]:
        if url.split("://", 1)[0] not in ("postgresql+psycopg", "postgresql+psycopg2"):
            return {}  # another driver: its own defaults
        # libpq's keepalives: the heartbeat notices a dead server or network in ~90 s instead of hanging for minutes
        from evomerge.study.storage import CONNECT_TIMEOUT_S

        keepalives = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 6}
        return {**keepalives, "connect_timeout": CONNECT_TIMEOUT_S}

    def _setup(self) -> None:
        from sqlalchemy import text

        self._conn.execute(text("SELECT set_config('application_name', :v, false)"), {"v": app_name(self.since)})
        for key, value in PG_SESSION.items():
            try:
                self._conn.execute(text("SELECT set_config(:k, :v, false)"), {"k": key, "v": value})
            except Exception:  # an older server without this setting: the lock works without it
                pass

    def try_acquire(self) -> bool:
        if self._conn is None:
            self._connect()
        return bool(self._scalar("SELECT pg_try_advisory_lock(:k)", k=pg_key(self.name)))

    def _unlock(self) -> None:
        if self._conn is not None:
            self._scalar("SELECT pg_advisory_unlock(:k)", k=pg_key(self.name))

    def holder(self) -> dict[str, Any] | None:
        key = pg_key(self.name) & 0xFFFFFFFFFFFFFFFF  # pg_locks splits the key into two unsigned 32-bit halves
        name = self._scalar(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid::bigint = :hi AND l.objid::bigint = :lo LIMIT 1",
            hi=key >> 32,
            lo=key & 0xFFFFFFFF,
        )
        return parse_app_name(name)


class MySQLLock(ServerLock):
    def _lock_name(self) -> str:
        return "evomerge:" + hashlib.sha256(self.name.encode()).hexdigest()[:40]  # GET_LOCK names: 64 characters

    def try_acquire(self) -> bool:
        if self._conn is None:
            self._connect()
        return self._scalar("SELECT GET_LOCK(:n, 0)", n=self._lock_name()) == 1

    def _unlock(self) -> None:
        if self._conn is not None:
            self._scalar("SELECT RELEASE_LOCK(:n)", n=self._lock_name())

    def holder(self) -> dict[str, Any] | None:
        """The holding connection and its client host (MySQL has no per-session name another session can read)."""
        from sqlalchemy import text

        row = self._conn.execute(
            text("SELECT ID, HOST FROM information_schema.PROCESSLIST WHERE ID = IS_USED_LOCK(:n)"),
            {"n": self._lock_name()},
        ).first()
        return {"connection": row[0], "host": str(row[1]).rsplit(":", 1)[0]} if row else None


def server_lock(url: str, study_name: str, since: float | None = None) -> ServerLock:
    """The lock for a database URL; a StudyError for databases evomerge cannot lock."""
    kind = dialect(url)
    if kind == "postgresql":
        return PostgresLock(url, study_name, since)
    if kind in ("mysql", "mariadb"):
        return MySQLLock(url, study_name, since)
    raise StudyError(
        f"storage {redact(url)!r}: evomerge keeps one driver per study with a lock that only sqlite, postgresql and "
        f"mysql storages provide; use one of them"
    )


__all__ = ["MySQLLock", "PostgresLock", "ServerLock", "app_name", "parse_app_name", "pg_key", "server_lock"]
