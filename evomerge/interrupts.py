"""Ctrl-C and SIGTERM stop a command cleanly, and never in the middle of a database call.

    restore = install()          # the CLI, in its main thread: SIGINT and SIGTERM raise `Interrupted`
    ...
    restore()

Python runs a signal handler between two bytecodes of the main thread, wherever it is. An exception raised there
inside Optuna, SQLAlchemy or the database driver (a `tell`, a user attr being written) leaves that connection
mid-transaction: SQLite's write lock stays held by a session nobody will finish, and the search's own clean-up
(enqueue the trials in flight again) then waits on itself and fails with "database is locked", or SQLAlchemy
logs "Error closing cursor" with a traceback. So the handler looks at where the main thread is. Outside that code
it raises `Interrupted`, as it always did. Inside, it notes the signal and traces the frame that called into it
(a local trace function on that frame alone): the exception is raised there, at the first line that runs once the
call has returned. A second signal while one is pending raises at once, so a database call that hangs can still be
interrupted.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from evomerge.errors import Interrupted

SIGNALS = ("SIGINT", "SIGTERM")
# Frames of these modules may hold a database connection mid-call (Optuna as a whole: its samplers and `tell` write
# to the storage between steps). An exception raised inside them can leave the connection mid-transaction.
STORAGE_MODULES = ("optuna", "sqlalchemy", "sqlite3", "psycopg", "alembic")

_pending: dict[str, Any] = {"signal": None, "frame": None}


def _protected(frame: FrameType) -> bool:
    return frame.f_globals.get("__name__", "").startswith(STORAGE_MODULES)


def storage_caller(frame: FrameType | None) -> FrameType | None:
    """The frame that called into storage code, where `frame` (the main thread's current one) is inside it;
    None when `frame` is outside it."""
    caller = None
    while frame is not None:
        if _protected(frame):
            caller = frame.f_back
        frame = frame.f_back
    while caller is not None and _protected(caller):  # the outermost storage frame's caller
        caller = caller.f_back
    return caller


def _handler(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    caller = storage_caller(frame)
    if _pending["signal"] is None and caller is not None:
        _pending.update(signal=name, frame=caller)
        caller.f_trace = _raise_when_back
        caller.f_trace_lines = True
        sys.settrace(_untraced)  # tracing on for this thread, so the caller's own trace function runs
        return
    _disarm()
    raise Interrupted(name)  # outside storage code, or a second signal


def _untraced(frame: FrameType, event: str, arg: Any) -> None:
    return None  # every other frame runs untraced


def _raise_when_back(frame: FrameType, event: str, arg: Any):
    """The trace function of the frame that called into storage code: raise at its next line."""
    if _pending["signal"] is None:
        return None
    if event == "line":
        name = _pending["signal"]
        _disarm()
        raise Interrupted(name)
    if event == "return" and frame.f_back is not None:  # the call was its last statement: raise in its caller
        target = frame.f_back
        while target is not None and _protected(target):
            target = target.f_back
        if target is not None:
            _pending["frame"] = target
            target.f_trace = _raise_when_back
            target.f_trace_lines = True
    return _raise_when_back


def _disarm() -> None:
    frame = _pending["frame"]
    if frame is not None:
        frame.f_trace = None
    _pending.update(signal=None, frame=None)
    sys.settrace(None)


def install() -> Callable[[], None]:
    """Install the handler for SIGINT and SIGTERM (main thread only); returns what restores the previous ones."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {name: signal.signal(getattr(signal, name), _handler) for name in SIGNALS}

    def restore() -> None:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
        if _pending["signal"] is not None:
            _disarm()

    return restore


__all__ = ["SIGNALS", "STORAGE_MODULES", "install", "storage_caller"]
