"""Waiting for a condition, never for a fixed time: the suite runs on loaded 2-core machines too.

    wait_until(lambda: trial_count(db, "sig", "COMPLETE") >= 3, "3 complete trials", proc=search)

Reads of a study database another process is creating go through a read-only SQLite connection (`trials`),
which can neither create Optuna's schema nor race the process creating it: before the schema and the study
exist, the count is 0.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

LIMIT_S = 300.0  # generous: a condition that needs seconds on an idle machine can need minutes on a loaded one


def wait_until(
    predicate: Callable[[], object], what: str, *, timeout: float = LIMIT_S, proc: subprocess.Popen | None = None
) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` after `timeout`, or at once when `proc` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            stream = proc.stderr or proc.stdout
            err = stream.read() if stream else ""
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}: {str(err)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def trial_count(db: Path, study: str, state: str) -> int:
    """How many trials of `study` are in `state`, read-only; 0 while the database, its schema or the study is not
    there yet."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            row = conn.execute(
                "SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = ? AND state = ?",
                (study, state),
            ).fetchone()
    except sqlite3.OperationalError:  # no such table yet (the schema is being created), or the file is new
        return 0
    return int(row[0])


__all__ = ["LIMIT_S", "trial_count", "wait_until"]
