"""Ctrl-C and SIGTERM never stop a command inside a database call (evomerge/interrupts.py).

Before: the SIGTERM handler raised wherever the main thread was; raised inside SQLAlchemy it left SQLite's write
lock held by a session nobody finished, and the search's clean-up then failed ("database is locked", "Error closing
cursor"), exit 1 instead of 143 (seen in tests/test_search_stop.py on a loaded machine).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from evomerge import interrupts
from evomerge.errors import Interrupted

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_signals_at_random_moments_never_interrupt_a_database_call(tmp_path):
    rounds = 40
    cmd = [sys.executable, str(REPO / "tests" / "interrupt_target.py"), str(tmp_path / "busy.db"), str(rounds)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(0)
    lines: list[dict] = []
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        for k in range(rounds):
            proc.send_signal(rng.choice([signal.SIGTERM, signal.SIGINT]))
            line = proc.stdout.readline()  # the process answers each signal with one line once it handled it
            assert line, f"signal {k}: the process died: {proc.stderr.read()[-3000:]}"
            lines.append(json.loads(line))
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    holding = ("optuna.storages", "sqlalchemy", "sqlite3")  # the modules a raise must never pass through
    in_db = [r["modules"] for r in lines if any(m.startswith(holding) for m in r["modules"])]
    assert not in_db, f"{len(in_db)} of {rounds} interruptions were raised inside storage code, e.g. {in_db[0]}"
    failed = [r["error"] for r in lines if not r["ok"]]
    assert not failed, f"the clean-up write failed after {len(failed)} interruptions: {failed[0]}"
    assert {r["signal"] for r in lines} <= {"SIGTERM", "SIGINT"}


def _frame(module: str, back=None) -> SimpleNamespace:
    return SimpleNamespace(f_globals={"__name__": module}, f_back=back)


def test_inside_storage_a_signal_waits_for_the_caller_and_a_second_one_forces_the_stop():
    driver = _frame("evomerge.run.driver", _frame("__main__"))
    inside = _frame("sqlalchemy.engine.base", _frame("optuna.storages._rdb", driver))
    assert interrupts.storage_caller(inside) is driver
    assert interrupts.storage_caller(driver) is None
    restore = interrupts.install()
    try:
        # the first signal inside a database call is only noted: it is raised in the caller, once back there
        assert interrupts._handler(signal.SIGTERM, inside) is None
        assert driver.f_trace is not None
        # a second one while it is pending stops at once
        with pytest.raises(Interrupted) as info:
            interrupts._handler(signal.SIGINT, inside)
        assert info.value.signal_name == "SIGINT" and driver.f_trace is None
        # outside storage code a signal raises as it always did
        with pytest.raises(Interrupted):
            interrupts._handler(signal.SIGTERM, driver)
    finally:
        restore()
