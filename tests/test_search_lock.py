"""One driver per study: a second driver is refused at once, naming the first; a dead driver never blocks."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from waiting import trial_count, wait_until

from evomerge.errors import StudyError
from evomerge.study import lock as lk
from evomerge.study.storage import get_storage, load_study

REPO = Path(__file__).resolve().parent.parent


def new_study(tmp_path: Path, name: str = "locked"):
    url = f"sqlite:///{tmp_path}/study.db"
    return url, optuna.create_study(study_name=name, storage=get_storage(url))


def test_a_second_driver_on_a_sqlite_study_is_refused_until_the_first_releases(tmp_path):
    url, study = new_study(tmp_path)
    first = lk.StudyLock(url, "locked").acquire()
    first.claim(study)
    assert study.user_attrs["lock"]["pid"] == os.getpid()
    with pytest.raises(StudyError, match=f"is being run by pid {os.getpid()} on {socket.gethostname()}") as err:
        lk.StudyLock(url, "locked").acquire()  # flock: another open file, refused even in the same process
    assert "one driver per study" in str(err.value) and "resume" in str(err.value)
    lk.StudyLock(url, "other").acquire().release()  # other studies in the same file are not blocked
    first.release()
    assert study.user_attrs["lock"] is None
    with lk.StudyLock(url, "locked") as again:
        again.claim(study)  # a stale attr of a dead driver (here: released) never blocks


def test_other_databases_are_refused_rather_than_run_unlocked():
    """Only sqlite (flock), PostgreSQL (advisory lock) and MySQL (GET_LOCK) can hold a study; the password stays
    hidden."""
    with pytest.raises(StudyError, match="only sqlite, postgresql and mysql storages provide") as err:
        lk.StudyLock("mssql+pyodbc://sa:hunter2@db/evomerge", "x").acquire()
    assert "sa:***@db" in str(err.value) and "hunter2" not in str(err.value)


class Loaded(Exception):
    pass


def test_the_driver_heartbeats_from_taking_the_study_also_while_workers_load(tiny_zoo, tmp_path, monkeypatch):
    """A model load longer than the grace period must not let another host take the study: the lock's heartbeat
    thread beats while the pool is still being made. (Real inputs: the resource plan reads their headers first.)"""
    from test_search_faults import zoo_config

    from evomerge.run.driver import run_search

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lk, "HEARTBEAT_S", 0.1)
    cfg = zoo_config(tiny_zoo)
    seen = []

    def slow_pool(c):  # workers loading models: the driver's loop has not started until the lock beat 4 times
        reader = load_study(c.name, c.storage_url)

        def beats() -> bool:
            seen.append(reader.user_attrs["lock"]["heartbeat"])
            return len(set(seen)) >= 4

        wait_until(beats, "the lock's heartbeat to beat 4 times while the workers load")
        raise Loaded

    with pytest.raises(Loaded):
        run_search(cfg, progress=False, log=None, pool_factory=slow_pool)
    assert len(set(seen)) >= 4, seen
    assert load_study(cfg.name, cfg.storage_url).user_attrs["lock"] is None, "released at the end"


def search_config(tmp_path: Path, zoo: Path, n_trials: int) -> Path:
    data = {
        "name": "shared",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 4}, {"name": "zoo_reverse_search", "subset": 4}]},
        "sampler": {"name": "random"},
        "budget": {"n_trials": n_trials},
        "workers": {"count": 0},
        "portfolio": False,  # every COMPLETE trial is one of the budget's
    }
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def count(db: Path, state: str) -> int:
    return trial_count(db, "shared", state)


@pytest.mark.slow
def test_two_search_processes_on_one_study(tmp_path, tiny_zoo):
    """The second `evomerge search` (also with --force) exits 2 naming the first, which goes on undisturbed until
    Ctrl-C stops it cleanly. The first's budget is out of reach, so it is still searching however slowly the
    second starts (it checks its tasks and the resource plan before the lock) on a loaded machine."""
    cmd = [
        sys.executable,
        "-m",
        "evomerge",
        "search",
        str(search_config(tmp_path, tiny_zoo, 100_000)),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    db = tmp_path / "runs" / "shared" / "study.db"
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: count(db, "RUNNING") + count(db, "COMPLETE") > 0, "the first trial", proc=first)
        for extra in ([], ["--force"]):
            second = subprocess.run(cmd + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stderr[-2000:]
            line = second.stderr.strip().splitlines()[-1]
            assert line.startswith("evomerge: error: study 'shared'") and f"is being run by pid {first.pid} " in line, (
                line
            )
            assert "loading the models" not in second.stdout and "starting" not in second.stdout, "refused at once"
        assert first.poll() is None, "the second driver did not disturb the first"
        done = count(db, "COMPLETE")
        wait_until(lambda: count(db, "COMPLETE") > done, "a trial after the refusals", proc=first)
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, out[-2000:]
    assert count(db, "COMPLETE") > done and count(db, "RUNNING") == 0
    # the trial Ctrl-C stopped is the only failure, and it waits to run again first
    assert count(db, "FAIL") == count(db, "WAITING") <= 1, out[-2000:]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
