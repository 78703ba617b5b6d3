"""Resuming a study: stale RUNNING trials, changed configs, CMA-ES state, and a SIGKILLed search."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.candidate.space import space_of
from evomerge.config.schema import parse_config
from evomerge.errors import StudyError
from evomerge.study import study as st
from evomerge.study.lock import GRACE_S
from evomerge.study.samplers import distributions
from evomerge.study.storage import get_storage

REPO = Path(__file__).resolve().parent.parent
SPACE = {
    "methods": ["task_arithmetic"],
    "layers_per_group": 2,
    "parameters": {"weight": {"low": 0.0, "high": 1.0, "default": 0.5}, "lambda": {"value": 1.0}},
}


def make_config(tmp_path: Path, **changes):
    for name in ("base", "add", "reverse"):
        (tmp_path / "zoo" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "zoo" / name / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    data = {
        "name": "resume",
        "base_model": "zoo/base",
        "models": ["zoo/add", "zoo/reverse"],
        "method": "task_arithmetic",
        "search_space": SPACE,
        "tasks": {"search": [{"name": "zoo_add_search"}]},
        "sampler": {"name": "cmaes", "options": {"popsize": 4}},
        "storage": f"sqlite:///{tmp_path}/study.db",
        **changes,
    }
    return parse_config(data, base_dir=tmp_path)


def toy_value(params: dict) -> float:
    return -sum((v - 0.3) ** 2 for v in params.values())


def run_toy(study, cfg, n: int) -> None:
    """The driver's ask/tell bookkeeping with a cheap objective instead of a merge."""
    dists = distributions(space_of(cfg), cfg.models)
    for _ in range(n):
        trial = st.ask(study, dists)
        study.tell(trial, toy_value(trial.params))


def test_cmaes_state_survives_a_restart(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = make_config(tmp_path)
    study = st.open_study(cfg, space_of(cfg), log=None)
    assert [t.user_attrs["baseline"] for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))] == [
        "defaults",
        "only add",
        "only reverse",
    ]
    run_toy(study, cfg, 12)
    key = "cma:generation"
    gens = [t.system_attrs[key] for t in study.trials if key in t.system_attrs]
    assert max(gens) >= 2, "CMA-ES advanced some generations"
    # a new process: fresh sampler object, same storage
    resumed = st.open_study(cfg, space_of(cfg), log=None)
    assert len(resumed.trials) == 12
    run_toy(resumed, cfg, 1)
    assert resumed.trials[-1].system_attrs[key] >= max(gens), "the optimizer was restored, not restarted at 0"
    assert any(k.startswith("cma:optimizer") for t in resumed.trials for k in t.system_attrs), (
        "state lives in the storage"
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_running_trials_fail_and_are_enqueued_again(tmp_path):
    cfg = make_config(tmp_path)
    study = st.open_study(cfg, space_of(cfg), log=None)
    dists = distributions(space_of(cfg), cfg.models)
    run_toy(study, cfg, 3)  # consume the baselines
    mine = st.ask(study, dists)  # this live process: not stale
    orphan = st.ask(study, dists)
    orphan.set_user_attr("driver", {"host": socket.gethostname(), "pid": dead_pid(), "start": None})
    remote = st.ask(study, dists)  # another host: stale only when its heartbeat is old
    remote.set_user_attr("driver", {"host": "elsewhere", "pid": 1})
    remote.set_user_attr("heartbeat", time.time() - GRACE_S - 5)
    lively = st.ask(study, dists)
    lively.set_user_attr("driver", {"host": "elsewhere", "pid": 1})

    failed = st.fail_stale_trials(study, log=None)
    assert failed == [orphan.number, remote.number]
    frozen = study.trials
    assert frozen[orphan.number].state == optuna.trial.TrialState.FAIL
    assert "died" in frozen[orphan.number].user_attrs["fail_reason"]
    assert "heartbeat" in frozen[remote.number].user_attrs["fail_reason"]
    assert frozen[mine.number].state == frozen[lively.number].state == optuna.trial.TrialState.RUNNING
    # their params come back first, marked as retries
    retry = st.ask(study, dists)
    assert retry.params == frozen[orphan.number].params
    assert study.trials[retry.number].user_attrs["retry_of"] == orphan.number


def test_a_changed_config_is_refused_unless_forced(tmp_path):
    cfg = make_config(tmp_path)
    study = st.open_study(cfg, space_of(cfg), log=None)
    run_toy(study, cfg, 4)
    # budget, workers and storage may change; the search itself may not
    same = make_config(tmp_path, budget={"n_trials": 50}, workers={"count": 2})
    assert len(st.open_study(same, space_of(same), log=None).trials) == 4
    changed = make_config(tmp_path, seed=3, tasks={"search": [{"name": "zoo_add_search", "subset": 10}]})
    with pytest.raises(StudyError, match="seed") as err:
        st.open_study(changed, space_of(changed), log=None)
    assert "tasks.search" in str(err.value) and "--force" in str(err.value)
    fresh = st.open_study(changed, space_of(changed), force=True, log=None)
    assert [t.state for t in fresh.trials] == [optuna.trial.TrialState.WAITING] * 3  # baselines again


# -- a real search, killed with SIGKILL mid-trial, then resumed -------------------------------------


def search_config(tmp_path: Path, zoo: Path, n_trials: int) -> Path:
    data = {
        "name": "killed",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": SPACE,
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 20}, {"name": "zoo_reverse_search", "subset": 20}]},
        "sampler": {"name": "cmaes", "options": {"popsize": 4}},
        "budget": {"n_trials": n_trials},
        "workers": {"count": 1, "num_cpus": 1},
        "portfolio": False,  # the test counts the study's COMPLETE trials: the search's own only
    }
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def states(db: Path) -> dict[str, list[int]]:
    """Trial numbers by state, read with plain sqlite (read-only: never races the search creating its tables)."""
    import sqlite3

    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            rows = conn.execute("SELECT number, state FROM trials").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    out: dict[str, list[int]] = {}
    for number, state in rows:
        out.setdefault(state, []).append(number)
    return out


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume_finishes_the_budget(tmp_path, tiny_zoo):
    n_trials = 14
    config = search_config(tmp_path, tiny_zoo, n_trials)
    cmd = [sys.executable, "-m", "evomerge", "search", str(config), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    db = tmp_path / "runs" / "killed" / "study.db"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            now = states(db)
            if now.get("COMPLETE") and now.get("RUNNING"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the search ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = states(db)
    assert before.get("RUNNING") and len(before["COMPLETE"]) < n_trials

    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    after = states(db)
    assert len(after["COMPLETE"]) == n_trials
    assert "RUNNING" not in after and "WAITING" not in after
    assert set(before["COMPLETE"]) <= set(after["COMPLETE"]), "completed trials are kept, not redone"
    storage = get_storage(f"sqlite:///{db}")
    trials = optuna.load_study(study_name="killed", storage=storage).trials
    for number in before["RUNNING"]:
        assert trials[number].state == optuna.trial.TrialState.FAIL
        assert trials[number].user_attrs["fail_reason"].startswith("stale: driver process")
        retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1
        if trials[number].params:  # a trial killed inside `ask` has none yet; its retry takes the enqueued ones
            assert retries[0].params == trials[number].params
