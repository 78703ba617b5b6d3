"""One driver per study: a second `evomerge search` on a live study stops at once with a clear error.

Two drivers sharing one study would each ask trials against the same budget and each recover the
other's RUNNING trials as stale; instead the first driver holds the study and the second is refused:

- sqlite storage: an exclusive `flock` on `<db>.<study>.lock`; the kernel releases it when the driver
  exits, SIGKILL included, so a crashed driver never blocks a resume.
- every storage: a `lock` study user attr naming the driver (host, pid, process start time, heartbeat).
  On a shared RDB (PostgreSQL, MySQL) it is the lock itself: a holder is live while its pid runs (same
  host) or its heartbeat is younger than `GRACE_S` (another host). After claiming it, a driver waits
  `SETTLE_S` and reads it back, so of two drivers starting together only the last writer goes on.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import time
from pathlib import Path
from typing import Any

from evomerge.errors import StudyError
from evomerge.io.atomic import pid_alive, process_start

ATTR = "lock"
SETTLE_S = 1.0  # RDB storages without a file lock: time for a concurrent claim to land before reading back
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
    return bool(holder) and all(holder.get(k) == me[k] for k in ("host", "pid", "start"))


def describe(holder: dict[str, Any]) -> str:
    since = dt.datetime.fromtimestamp(float(holder.get("since", 0))).strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {since})"


class StudyLock:
    """Held by the one driver running a study: `acquire()` before opening it, `claim(study)` once open,
    `beat()` now and then, `release()` at the end (or let the process die)."""

    def __init__(self, storage_url: str, study_name: str):
        self.name, self.url = study_name, storage_url
        self.study = None
        self._fd: int | None = None
        self._file: Path | None = None
        if storage_url.startswith("sqlite:///"):
            db = Path(storage_url.removeprefix("sqlite:///"))
            self._file = db.with_name(f"{db.name}.{study_name}.lock")

    def _refuse(self, holder: dict[str, Any] | None) -> StudyError:
        who = describe(holder) if holder else "another process"
        return StudyError(
            f"study {self.name!r} in {self.url} is being run by {who}; one driver per study: wait for it to "
            f"finish, or stop it, then run the same command again to resume"
        )

    def acquire(self) -> StudyLock:
        """Take the file lock (sqlite). Raises StudyError naming the live driver if another holds it."""
        import fcntl

        if self._file is None:
            return self
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
        info = {**driver_id(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, repr(info).encode(), 0)  # who holds it, for the refusal message of the next driver
        return self

    @staticmethod
    def _read_file(fd: int) -> dict[str, Any] | None:
        import ast

        try:
            return ast.literal_eval(os.pread(fd, 4096, 0).decode() or "None")
        except (ValueError, SyntaxError, OSError):
            return None

    def check_free(self, study) -> None:
        """Raise StudyError if another live driver holds the study (e.g. before --force deletes it)."""
        holder = study.user_attrs.get(ATTR)
        if holder and not _is_me(holder) and holder_alive(holder):
            # with the file lock held, a live holder on this host is impossible unless the lock file was removed
            if self._fd is None or holder.get("host") != socket.gethostname():
                raise self._refuse(holder)

    def claim(self, study) -> None:
        """Name this driver in the study (refusing a live holder); on RDB storages this is the lock."""
        self.check_free(study)
        now = time.time()
        study.set_user_attr(ATTR, {**driver_id(), "since": now, "heartbeat": now})
        self.study = study
        if self._fd is None:
            time.sleep(SETTLE_S)
            self._check()

    def _check(self) -> None:
        holder = self.study._storage.get_study_user_attrs(self.study._study_id).get(ATTR)
        if not _is_me(holder):
            self.study = None
            raise self._refuse(holder)

    def beat(self) -> None:
        """Refresh the heartbeat; on RDB storages first make sure no other driver took the study over."""
        if self.study is None:
            return
        if self._fd is None:
            self._check()
        holder = self.study.user_attrs.get(ATTR) or {**driver_id(), "since": time.time()}
        self.study.set_user_attr(ATTR, {**holder, "heartbeat": time.time()})

    def release(self) -> None:
        if self.study is not None:
            try:
                if _is_me(self.study._storage.get_study_user_attrs(self.study._study_id).get(ATTR)):
                    self.study.set_user_attr(ATTR, None)
            except Exception:  # the study may have been deleted; the lock goes with it
                pass
            self.study = None
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["GRACE_S", "StudyLock", "driver_alive", "driver_id", "holder_alive"]
