"""Crash safety in the default suite, on SQLite (the default storage) and on a real PostgreSQL server: a search
SIGKILLed mid-trial resumes to exactly its budget, and of two drivers resuming at the same moment one takes the
study and the other exits 2 at once, naming it. (Longer versions: test_soak.py and the slow tests.)

    .venv/bin/pytest tests/test_crash_safety.py
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
import yaml

from evomerge.study.storage import get_storage

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
STUDY = "crashed"


def search_config(tmp_path: Path, zoo: Path, n_trials: int) -> Path:
    data = {
        "name": STUDY,
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 4}, {"name": "zoo_reverse_search", "subset": 4}]},
        "sampler": {"name": "cmaes", "options": {"popsize": 4}},
        "budget": {"n_trials": n_trials},
        "workers": {"count": 0},  # the driver evaluates: a SIGKILL hits it mid-trial (Ray workers: test_search_faults)
        "refine": None,  # every trial here is one the driver asked: the counts below are the budget's
        "portfolio": False,
    }
    path = tmp_path / "crashed.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sqlite_states(db: Path) -> dict[str, list[int]]:
    """Trial numbers by state, read-only (never races the search creating its tables)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            rows = conn.execute("SELECT number, state FROM trials").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    return group(rows)


def postgres_states(server, database: str) -> dict[str, list[int]]:
    import psycopg

    try:
        rows = server.query(database, "SELECT number, state FROM trials")
    except psycopg.errors.UndefinedTable:  # the first driver has not created Optuna's tables yet
        return {}
    return group(rows)


def group(rows) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for number, state in rows:
        out.setdefault(state, []).append(number)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path) -> tuple[str, Callable[[], dict[str, list[int]]], str, list[str]]:
    """(URL for --storage, trial numbers by state, how a refusal shows the URL, secrets no output may hold)."""
    if request.param == "sqlite":
        db = tmp_path / "study.db"
        return f"sqlite:///{db}", lambda: sqlite_states(db), f"sqlite:///{db}", []
    server = request.getfixturevalue("postgres")
    database = server.database()
    shown = f"postgresql://evomerge:***@127.0.0.1:{server.port}/{database}"
    secrets = [server.password, quote(server.password, safe="")]
    return server.url(database), lambda: postgres_states(server, database), shown, secrets


def test_a_search_killed_mid_trial_resumes_to_its_budget_and_of_two_resuming_drivers_one_exits_2(
    tmp_path, tiny_zoo, storage
):
    url, states, shown, secrets = storage
    n_trials = 8
    cmd = [
        sys.executable,
        "-m",
        "evomerge",
        "search",
        str(search_config(tmp_path, tiny_zoo, n_trials)),
        "--storage",
        url,
        "--no-progress",
    ]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            now = states()
            if now.get("COMPLETE") and now.get("RUNNING"):
                break
            time.sleep(0.05)
        assert first.poll() is None, f"the search ended before it could be killed: {first.stdout.read()[-2000:]}"
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    first_out = first.stdout.read()
    before = states()
    assert before.get("RUNNING") and len(before["COMPLETE"]) < n_trials

    # two drivers resume at the same moment: one takes the study, the other exits 2 at once naming it
    logs = [(tmp_path / f"resume{i}.out", tmp_path / f"resume{i}.err") for i in range(2)]
    pair = [
        subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=out.open("w"), stderr=err.open("w")) for out, err in logs
    ]
    ended: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 300
        while len(ended) < 2 and time.monotonic() < deadline:
            for i, p in enumerate(pair):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic()
            time.sleep(0.02)
    finally:
        for p in pair:
            if p.poll() is None:
                p.kill()
    outs = [(out.read_text(), err.read_text()) for out, err in logs]
    assert sorted(p.returncode for p in pair) == [0, 2], [o[1][-2000:] for o in outs]
    winner, loser = (0, 1) if pair[0].returncode == 0 else (1, 0)
    line = outs[loser][1].strip().splitlines()[-1]
    assert line.startswith(
        f"evomerge: error: study {STUDY!r} in {shown} is being run by pid {pair[winner].pid} on {socket.gethostname()}"
    ), line
    assert "Traceback" not in outs[loser][1]
    assert ended[loser] < ended[winner], "refused at once, not after the winner's trials"

    after = states()
    assert len(after["COMPLETE"]) == n_trials
    assert "RUNNING" not in after and "WAITING" not in after
    assert set(before["COMPLETE"]) <= set(after["COMPLETE"]), "completed trials are kept, not redone"
    trials = optuna.load_study(study_name=STUDY, storage=get_storage(url)).trials
    for number in before["RUNNING"]:
        assert trials[number].state == optuna.trial.TrialState.FAIL
        # killed after asking it (pid recorded) or inside `ask` (before the driver recorded itself)
        assert (
            trials[number]
            .user_attrs["fail_reason"]
            .startswith(("stale: driver process", "stale: the search that asked it"))
        )
        retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    for text in [first_out, *(o for out in outs for o in out)]:
        assert not any(secret in text for secret in secrets)
