"""A real PostgreSQL server (tests/pg_server.py): the one-driver lock, crash and resume, the storage password.

.venv/bin/pytest tests/test_postgres.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
import yaml
from waiting import wait_until

from evomerge import storage_url
from evomerge.cli import main
from evomerge.errors import StudyError
from evomerge.study.lock import StudyLock
from evomerge.study.server_lock import pg_key
from evomerge.study.storage import get_storage

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _forget_passwords():
    storage_url.forget_all()  # each test starts as a fresh process would: no password in memory
    yield
    storage_url.forget_all()


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def lock_holders(postgres, url: str, study: str) -> list[str]:
    """application_name of the sessions holding the study's advisory lock."""
    key = pg_key(study) & 0xFFFFFFFFFFFFFFFF
    rows = postgres.query(
        database_of(url),
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = "
        "'advisory' AND l.granted AND l.classid::bigint = %s AND l.objid::bigint = %s",
        (key >> 32, key & 0xFFFFFFFF),
    )
    return [r[0] for r in rows]


def acquired(url: str, study: str, what: str, **kwargs) -> StudyLock:
    """The study's lock, once the server has freed it (it ends a dead or terminated session a moment later)."""
    got: list[StudyLock] = []

    def take() -> bool:
        try:
            got.append(StudyLock(url, study, **kwargs).acquire())
        except StudyError:
            return False
        return True

    wait_until(take, what)
    return got[0]


# -- the lock ----------------------------------------------------------------------------------------


def test_two_drivers_racing_for_a_study_twenty_times_leave_exactly_one_each_time(pg_url, tmp_path):
    rounds = 20
    sync = tmp_path / "sync"
    sync.mkdir()
    racers = {
        me: subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "lock_racer.py"), pg_url, "raced", str(rounds), me, str(sync)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for me in ("a", "b")
    }
    try:
        for proc in racers.values():
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in racers.values():
            if proc.poll() is None:
                proc.kill()
    pids = {me: proc.pid for me, proc in racers.items()}
    wins = {"a": 0, "b": 0}
    for k in range(rounds):
        results = {me: (sync / f"result-{k}-{me}").read_text() for me in ("a", "b")}
        winners = [me for me, text in results.items() if text.startswith("won ")]
        assert len(winners) == 1, f"round {k}: {results}"
        winner = winners[0]
        loser = "b" if winner == "a" else "a"
        wins[winner] += 1
        message = results[loser]
        assert f"is being run by pid {pids[winner]} on {socket.gethostname()}" in message, f"round {k}: {message}"
        assert "evomerge:***@" in message and "one driver per study" in message, message
    print(f"wins over {rounds} rounds: {wins}")


HOLDER = """
import sys, time
from evomerge.study.lock import StudyLock
from evomerge.storage_url import remember
lock = StudyLock(remember(sys.argv[1]), "held").acquire()
print("holding", flush=True)
time.sleep(120)
"""


def test_the_server_frees_a_killed_drivers_lock_and_a_driver_that_loses_its_lock_stops(pg_url, postgres):
    url = storage_url.remember(pg_url)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, pg_url], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(StudyError, match=f"is being run by pid {holder.pid} on {socket.gethostname()}"):
            StudyLock(url, "held").acquire()
        StudyLock(url, "other study").acquire().release()  # a lock per study
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    # SIGKILL: the session ends with the process, and the server drops its lock (a moment later)
    mine = acquired(url, "held", "the server to free the dead driver's lock", heartbeat_s=0.1)
    study = optuna.create_study(study_name="held", storage=get_storage(url))
    mine.claim(study)
    first = study.user_attrs["lock"]
    assert first["pid"] == os.getpid()
    wait_until(lambda: study.user_attrs["lock"]["heartbeat"] > first["heartbeat"], "the heartbeat thread to beat")

    # the server drops the lock's connection (a restart, a network cut): the heartbeat takes the lock again
    postgres.query(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
        (f"evomerge {os.getpid()} %",),
    )
    wait_until(lambda: lock_holders(postgres, url, "held"), "the heartbeat to take the lock again")
    mine.check()
    with pytest.raises(StudyError, match="is being run by"):
        StudyLock(url, "held").acquire()

    # ... unless another driver took it meanwhile: then this one stops at its next check
    mine._stop.set()
    mine._thread.join()  # beat by hand from here
    postgres.query(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
        (f"evomerge {os.getpid()} %",),
    )
    other = acquired(url, "held", "the server to free the terminated session's lock")
    with pytest.raises(StudyError, match="this driver lost its lock .* took the study over"):
        mine.beat()
    other.release()
    mine.release()


# -- searches on PostgreSQL ---------------------------------------------------------------------------


def search_config(tmp_path: Path, zoo: Path, name: str, n_trials: int) -> Path:
    data = {
        "name": name,
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
        "tasks": {
            "search": [{"name": "zoo_add_search", "subset": 4}, {"name": "zoo_reverse_search", "subset": 4}],
            "heldout": ["zoo_add", "zoo_reverse"],
        },
        "sampler": {"name": "cmaes", "options": {"popsize": 4}},
        "budget": {"n_trials": n_trials},
        "workers": {"count": 0},
        "refine": None,  # the counts below are the driver's own trials
        "portfolio": False,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_without_psycopg_a_postgresql_storage_says_what_to_install(tmp_path, tiny_zoo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: `import psycopg` raises ImportError
    config = search_config(tmp_path, tiny_zoo, "nodriver", 2)
    assert (
        main(["search", str(config), "--storage", "postgresql://evomerge:hunter2@db.example/evomerge", "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "evomerge: error: storage 'postgresql://evomerge:***@db.example/evomerge'"
    )
    assert "pip install 'evomerge[postgres]'" in err[0] and "hunter2" not in err[0]
    assert not (tmp_path / "runs" / "nodriver").exists()


# -- the password ------------------------------------------------------------------------------------


def files_holding(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s!r}" for s in secrets if s.encode() in data]
    return found


def test_a_storage_password_reaches_no_file_and_no_output(tmp_path, tiny_zoo, postgres, pg_url, monkeypatch, capfd):
    """search --storage URL-with-password, then status, export and report from the run directory: the password
    is in no file under runs/ or the export and in no output; later commands take it from the environment."""
    monkeypatch.chdir(tmp_path)
    password = postgres.password
    secrets = [password, quote(password, safe="")]
    config = search_config(tmp_path, tiny_zoo, "secret", 3)
    run = tmp_path / "runs" / "secret"
    shown = storage_url.redact(pg_url)
    assert main(["search", str(config), "--storage", pg_url, "--no-progress"]) == 0
    assert f"storage: {shown}" in (run / "config.yaml").read_text()

    storage_url.forget_all()  # a new process: only the run directory's redacted URL
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv(storage_url.PASSWORD_ENV, raising=False)
    capfd.readouterr()
    assert main(["status", str(run)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"evomerge: error: storage {shown!r} cannot be opened"), err
    assert storage_url.PASSWORD_ENV in err[0] and "--storage" in err[0]

    monkeypatch.setenv(storage_url.PASSWORD_ENV, password)
    assert main(["status", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    monkeypatch.delenv(storage_url.PASSWORD_ENV)
    monkeypatch.setenv("PGPASSWORD", password)  # libpq's own variable works as well
    assert main(["report", str(run), "--limit-subset", "4"]) == 0
    # resuming from the run's own config with the password given again
    assert main(["search", str(run / "config.yaml"), "--storage", pg_url, "--n-trials", "4", "--no-progress"]) == 0
    out = capfd.readouterr()

    recipe = (tmp_path / "exported" / "recipe.yaml").read_text()
    assert f"storage: {shown}" in recipe, "provenance names the storage, redacted"
    assert (run / "report" / "report.md").is_file()
    assert files_holding(tmp_path, secrets) == []
    assert not any(s in out.out or s in out.err for s in secrets)
    trials = optuna.load_study(study_name="secret", storage=get_storage(pg_url)).trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == 4
    assert not any(s in repr(t.user_attrs) + repr(t.system_attrs) for t in trials for s in secrets)
