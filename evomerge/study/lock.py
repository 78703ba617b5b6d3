"""One driver per study: a second `evomerge search` on a live study stops at once with a clear error.

Two drivers sharing one study would each ask trials against the same budget and each recover the
other's RUNNING trials as stale; instead the first driver holds the study and the second is refused:

- sqlite storage: an exclusive `flock` on `<db>.<study>.lock`; the kernel releases it when the driver
  exits, SIGKILL included, so a crashed driver never blocks a resume.
- PostgreSQL and MySQL storages: a lock on the database server (`study.server_lock`: an advisory lock,
  `GET_LOCK`) held by a connection of the driver's own for as long as it lives; the server releases it when
  the driver's process (or host) dies. Taking it is one atomic statement, so of drivers starting together
  exactly one goes on. Other databases are refused: they offer no such lock.
- every storage: a `lock` study user attr names the holder (host, pid, process start time, since, heartbeat)
  for refusals and `evomerge status`. A heartbeat thread refreshes it every HEARTBEAT_S from the moment
  the driver takes the study (also while its workers load models) and checks the server lock still stands.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import StudyError
from evomerge.io.atomic import pid_alive, process_start
from evomerge.storage_url import redact
from evomerge.study.record import StudyRecord, write_study

if TYPE_CHECKING:
    from evomerge.study.record import Study
    from evomerge.study.server_lock import ServerLock

HEARTBEAT_S = 60.0  # how often a driver stamps its lock and its in-flight trials
GRACE_S = 600.0  # a driver on another host (or its RUNNING trial) silent for this long is dead


def driver_id() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def driver_alive(driver: dict[str, Any]) -> bool:
    """Whether a driver's process (on this host) still runs: same pid and same start time."""
    return pid_alive(int(driver["pid"]), driver.get("start"))


def holder_alive(holder: dict[str, Any], now: float | None = None) -> bool:
    """A lock holder is live while its process runs (this host) or it beat within GRACE_S (another host)."""
    if holder.get("host") == socket.gethostname():
        return driver_alive(holder)
    now = time.time() if now is None else now
    return now - float(holder.get("heartbeat", 0.0)) < GRACE_S


def _is_me(holder: dict[str, Any] | None) -> bool:
    me = driver_id()
    return holder is not None and bool(holder) and all(holder.get(k) == me[k] for k in ("host", "pid", "start"))


def describe(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = f" (since {dt.datetime.fromtimestamp(float(since)):%Y-%m-%d %H:%M:%S})" if since else ""
    if holder.get("pid") is None:
        return f"connection {holder.get('connection', '?')} from {holder.get('host', '?')}{when}"
    return f"pid {holder.get('pid')} on {holder.get('host')}{when}"


class StudyLock:
    """Held by the one driver running a study: `acquire()` before opening it, `claim(study)` once open (starts the
    heartbeat), `check()` now and then (raises if the lock was lost), `release()` at the end (or let the process
    die)."""

    def __init__(self, storage_url: str, study_name: str, heartbeat_s: float | None = None):
        self.name, self.url = study_name, storage_url
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.study: Study | None = None
        self.lost: StudyError | None = None  # set by the heartbeat thread; raised by check()
        self._since = time.time()
        self._holder: dict[str, Any] = {}
        self._fd: int | None = None
        self._file: Path | None = None
        self._server: ServerLock | None = None  # on RDB storages
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if storage_url.startswith("sqlite:///"):
            db = Path(storage_url.removeprefix("sqlite:///"))
            self._file = db.with_name(f"{db.name}.{study_name}.lock")

    def _refuse(self, holder: dict[str, Any] | None) -> StudyError:
        who = describe(holder) if holder else "another process"
        return StudyError(
            f"study {self.name!r} in {redact(self.url)} is being run by {who}; one driver per study: wait for it "
            f"to finish, or stop it, then run the same command again to resume"
        )

    # -- taking the study ---------------------------------------------------------------------------

    def acquire(self) -> StudyLock:
        """Take the file lock (sqlite) or the server lock (PostgreSQL, MySQL). Raises StudyError naming the live
        driver if another holds it."""
        if self._file is not None:
            self._acquire_file()
            return self
        from evomerge.study.server_lock import server_lock

        server = server_lock(self.url, self.name, self._since)
        try:
            got = server.try_acquire()
            holder = None if got else server.holder()
        except BaseException:
            server.close()
            raise
        if not got:
            server.close()
            raise self._refuse(holder)
        self._server = server
        return self

    def _acquire_file(self) -> None:
        import fcntl

        assert self._file is not None, "a file lock is a SQLite study's"
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StudyError(
                f"storage {self.url!r} cannot be opened ({type(err).__name__}: {err.strerror}: {err.filename}); "
                f"fix `storage` or --storage"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_file(fd)
            os.close(fd)
            raise self._refuse(holder) from None
        self._fd = fd
        info = {**driver_id(), "since": self._since}
        os.ftruncate(fd, 0)
        os.pwrite(fd, repr(info).encode(), 0)  # who holds it, for the refusal message of the next driver

    @staticmethod
    def _read_file(fd: int) -> dict[str, Any] | None:
        import ast

        try:
            return ast.literal_eval(os.pread(fd, 4096, 0).decode() or "None")
        except (ValueError, SyntaxError, OSError):
            return None

    def check_free(self, study: Study) -> None:
        """Raise StudyError if another live driver holds the study (e.g. before --force deletes it).

        A server lock is authoritative: holding it, nothing in the study can name another live driver. A file
        lock is only as good as the filesystem: a live holder on another host (a network filesystem) refuses."""
        if self._server is not None:
            return
        holder = StudyRecord.from_study(study).lock
        if holder and not _is_me(holder) and holder_alive(holder):
            # with the file lock held, a live holder on this host is impossible unless the lock file was removed
            if self._fd is None or holder.get("host") != socket.gethostname():
                raise self._refuse(holder)

    def claim(self, study: Study) -> None:
        """Name this driver in the study and start the heartbeat."""
        self.check_free(study)
        self._holder = {**driver_id(), "since": self._since, "heartbeat": time.time()}
        write_study(study, lock=self._holder)
        self.study = study
        if self.heartbeat_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._heartbeat_loop, name="evomerge-study-lock", daemon=True)
            self._thread.start()

    # -- holding it ---------------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except StudyError as err:  # lost to another driver: the search loop stops at its next check()
                self.lost = err
                return
            except Exception:  # the database is out of reach for now: try again at the next beat
                continue

    def beat(self) -> None:
        """Make sure the server lock still stands (taking it again after a dropped connection if no other driver
        did meanwhile), then refresh the heartbeat in the study."""
        if self.study is None:
            return
        if self._server is not None and not self._server.alive():
            self._retake()
        self._holder = {**self._holder, "heartbeat": time.time()}
        write_study(self.study, lock=self._holder)

    def _retake(self) -> None:
        from evomerge.study.server_lock import server_lock

        fresh = server_lock(self.url, self.name, self._since)
        try:
            got = fresh.try_acquire()
            holder = self._read_attr() if got else fresh.holder()
        except StudyError:  # the server is out of reach: the next beat tries again
            fresh.close()
            return
        if got and (holder is None or _is_me(holder)):
            if self._server is not None:
                self._server.close()
            self._server = fresh
            return
        fresh.close()
        raise StudyError(
            f"study {self.name!r} in {redact(self.url)}: this driver lost its lock (its connection to the server "
            f"closed) and {describe(holder) if holder else 'another driver'} took the study over; this driver stops"
        )

    def _read_attr(self) -> dict[str, Any] | None:
        return StudyRecord.from_study(self.study).lock

    def check(self) -> None:
        """Raise the heartbeat's StudyError if the lock was lost (the search loop calls this between trials)."""
        if self.lost is not None:
            raise self.lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.study is not None:
            try:
                if _is_me(self._read_attr()):
                    write_study(self.study, lock=None)
            except Exception:  # the study may have been deleted; the lock goes with it
                pass
            self.study = None
        if self._server is not None:
            self._server.release()
            self._server = None
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["GRACE_S", "HEARTBEAT_S", "StudyLock", "describe", "driver_alive", "driver_id", "holder_alive"]
