"""Worker faults: a Ray worker killed mid-trial, params that keep killing workers, NaN/Inf scores, half-made studies."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import optuna
import pytest

from evomerge.candidate.space import space_of
from evomerge.config.schema import parse_config
from evomerge.run.driver import MAX_WORKER_DEATHS, SearchResult, _InFlight, _tell, run_search
from evomerge.run.pool import JobResult
from evomerge.study import study as st
from evomerge.study.samplers import distributions
from evomerge.study.storage import get_storage, load_study
from evomerge.study.trials import best_trial

TASKS = [{"name": "zoo_add_search", "subset": 4}, {"name": "zoo_reverse_search", "subset": 4}]
SPACE = {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0, "default": 0.5}}}


def zoo_config(zoo: Path, **changes):
    data = {
        "name": "faults",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": SPACE,
        "tasks": {"search": TASKS},
        "sampler": {"name": "random"},
        "budget": {"n_trials": 3},
        "workers": {"count": 0},
        "refine": None,  # these tests count candidates: no refinement rounds or
        "portfolio": False,  # default merges of other methods among them,
        "early_stop": None,  # and every candidate is scored whole (Scorer.score)
        **changes,
    }
    return parse_config(data)


def fake_zoo(tmp_path: Path) -> Path:
    import json

    for name in ("base", "add", "reverse"):
        (tmp_path / "zoo" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "zoo" / name / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    return tmp_path / "zoo"


def died(running: bool = True) -> JobResult:
    return JobResult(worker="h:1", error="worker died: h:1: ActorDiedError", worker_died=True, was_running=running)


def test_params_that_keep_killing_workers_are_retried_twice_then_fail(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = zoo_config(fake_zoo(tmp_path))
    study = st.open_study(cfg, space_of(cfg), log=None)
    dists = distributions(space_of(cfg), cfg.models)
    result = SearchResult("faults", tmp_path, cfg.storage_url, 0, 0, None, None)
    for _ in range(3):  # the baselines
        study.tell(st.ask(study, dists), 0.5)
    first = st.ask(study, dists)
    chain = [first.number]
    trial = first
    for attempt in range(1, MAX_WORKER_DEATHS + 2):
        assert _tell(study, cfg, _InFlight(trial, time.perf_counter()), died(), result) is None
        frozen = study.trials[trial.number]
        assert frozen.state == optuna.trial.TrialState.FAIL
        if attempt <= MAX_WORKER_DEATHS:
            trial = st.ask(study, dists)  # the retry comes first, same params, the deaths counted
            assert trial.params == first.params and trial.number not in chain
            attrs = study.trials[trial.number].user_attrs
            assert (attrs["retry_of"], attrs["worker_deaths"]) == (chain[-1], attempt)
            chain.append(trial.number)
    assert "died 3 times on these params; not retried again" in study.trials[chain[-1]].user_attrs["fail_reason"]
    nxt = st.ask(study, dists)
    assert "retry_of" not in nxt.user_attrs and nxt.params != first.params, "no fourth attempt"

    # a trial queued behind the one that killed the worker is retried without being charged
    assert _tell(study, cfg, _InFlight(nxt, time.perf_counter()), died(running=False), result) is None
    retry = st.ask(study, dists)
    assert retry.params == nxt.params and "worker_deaths" not in study.trials[retry.number].user_attrs


def test_a_non_finite_objective_fails_even_if_the_worker_says_ok(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = zoo_config(fake_zoo(tmp_path))
    study = st.open_study(cfg, space_of(cfg), log=None)
    trial = st.ask(study, distributions(space_of(cfg), cfg.models))
    result = SearchResult("faults", tmp_path, cfg.storage_url, 0, 0, None, None)
    res = JobResult(scores={"zoo_add_search": {"acc": 1.0}}, objective=math.inf)
    assert _tell(study, cfg, _InFlight(trial, time.perf_counter()), res, result) is None
    frozen = study.trials[trial.number]
    assert (
        frozen.state == optuna.trial.TrialState.FAIL and "non-finite objective inf" in frozen.user_attrs["fail_reason"]
    )
    assert best_trial(study) is None


def test_nan_scores_fail_the_trial_and_never_become_best(tmp_path, tiny_zoo, monkeypatch):
    from evomerge.run.pool import InlinePool
    from evomerge.scoring import Scorer

    monkeypatch.chdir(tmp_path)
    real = Scorer.score
    calls = []

    def score(self, model, tokenizer):  # the second candidate scores NaN on one task
        out = real(self, model, tokenizer)
        calls.append(1)
        if len(calls) == 2:
            out["zoo_add_search"] = {k: float("nan") for k in out["zoo_add_search"]}
        return out

    monkeypatch.setattr(Scorer, "score", score)
    cfg = zoo_config(tiny_zoo)
    result = run_search(cfg, progress=False, log=None, pool_factory=InlinePool)
    assert result.n_complete == 3 and result.n_failed == 1
    trials = load_study("faults", cfg.storage_url).trials
    bad = trials[1]
    assert bad.state == optuna.trial.TrialState.FAIL
    assert "zoo_add_search" in bad.user_attrs["fail_reason"] and "nan" in bad.user_attrs["fail_reason"]
    assert "retry_of" not in trials[-1].user_attrs, "a NaN candidate is not retried"
    assert result.best_trial != 1 and math.isfinite(result.best_value)


def test_a_half_created_study_is_finished_not_refused(tmp_path, monkeypatch):
    """A driver killed while creating the study (before its config hash and baselines were all written)."""
    monkeypatch.chdir(tmp_path)
    cfg = zoo_config(fake_zoo(tmp_path))
    optuna.create_study(  # an empty study: no config hash, no baselines yet
        study_name=cfg.name, storage=get_storage(cfg.storage_url)
    )
    resumed = st.open_study(cfg, space_of(cfg), log=None)
    assert resumed.user_attrs["config_hash"] == cfg.study_hash()
    labels = [t.user_attrs["baseline"] for t in resumed.trials]
    assert labels == ["defaults", "only add", "only reverse"]
    # killed after the hash and the first baseline: the other two are added, none twice
    other = parse_config({**cfg.model_dump(mode="json", exclude_none=True), "name": "other"})
    half = optuna.create_study(study_name="other", storage=get_storage(cfg.storage_url))
    for key in ("config", "task_names", "config_hash"):
        half.set_user_attr(key, resumed.user_attrs[key] if key != "config" else other.study_fields())
    half.set_user_attr("config_hash", other.study_hash())
    half.enqueue_trial(resumed.trials[0].params, user_attrs={"baseline": "defaults"})
    again = st.open_study(other, space_of(other), log=None).trials
    assert [t.user_attrs["baseline"] for t in again] == ["defaults", "only add", "only reverse"]
    assert {t.state.name for t in again} == {"WAITING"}


def test_a_trial_requeued_before_a_kill_is_not_requeued_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = zoo_config(fake_zoo(tmp_path))
    study = st.open_study(cfg, space_of(cfg), log=None)
    trial = st.ask(study, distributions(space_of(cfg), cfg.models))
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})  # killed right after this
    trial.set_user_attr("driver", {"host": "elsewhere", "pid": 1})
    assert st.fail_stale_trials(study, log=None, exclusive=True) == [trial.number]
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == trial.number]
    assert len(retries) == 1 and study.trials[trial.number].state == optuna.trial.TrialState.FAIL


# -- a real Ray worker killed mid-trial ---------------------------------------------------------------


class KillingPool:
    """A WorkerPool whose actor is SIGKILLed when the driver waits for the `at`-th time."""

    def __init__(self, pool, at: int):
        self.pool, self.at, self.waits, self.killed = pool, at, 0, []

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def wait(self, timeout=None):
        self.waits += 1
        if self.waits == self.at:
            pid = self.pool.pids[0]
            self.killed.append(pid)
            os.kill(pid, signal.SIGKILL)  # the driver waits only with trials in flight: the actor is running one
        return self.pool.wait(timeout)


def test_a_ray_worker_killed_mid_trial_is_replaced_and_its_trial_retried(tmp_path, tiny_zoo, monkeypatch):
    """In the default suite (issue 12): three trials, one Ray actor SIGKILLed while it runs the second."""
    from evomerge.run.pool import WorkerPool

    monkeypatch.chdir(tmp_path)
    cfg = zoo_config(tiny_zoo, workers={"count": 1, "num_cpus": 1}, budget={"n_trials": 3})
    holder = {}

    def factory(c):
        holder["pool"] = KillingPool(WorkerPool(c), at=2)
        return holder["pool"]

    result = run_search(cfg, progress=False, log=None, pool_factory=factory)
    pool = holder["pool"]
    assert result.n_complete == 3 and pool.killed
    trials = load_study("faults", cfg.storage_url).trials
    dead = [t for t in trials if t.state.name == "FAIL"]
    assert dead and all(t.user_attrs["fail_reason"].startswith("worker died") for t in dead)
    assert all(f":{pool.killed[0]}" in t.user_attrs["fail_reason"] for t in dead), "the reason names the dead worker"
    charged = [t for t in trials if t.user_attrs.get("worker_deaths") == 1]
    assert len(charged) == 1, [
        (
            t.number,
            t.state.name,
            t.user_attrs.get("retry_of"),
            t.user_attrs.get("worker_deaths"),
            t.user_attrs.get("fail_reason"),
        )
        for t in trials
    ]
    for t in dead:  # each one retried once, with the same params, and completed
        retries = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(retries) == 1 and retries[0].params == t.params and retries[0].state.name == "COMPLETE"
    workers = {t.user_attrs["worker"] for t in trials if t.state.name == "COMPLETE"}
    assert len(workers) == 2, "a fresh actor took over after the kill"
    assert "RUNNING" not in {t.state.name for t in trials} and "WAITING" not in {t.state.name for t in trials}


def test_a_baseline_killed_inside_ask_is_retried_with_its_own_params(tmp_path, monkeypatch):
    """Killed after the WAITING baseline became RUNNING but before its params were written: not lost."""
    monkeypatch.chdir(tmp_path)
    cfg = zoo_config(fake_zoo(tmp_path))
    study = st.open_study(cfg, space_of(cfg), log=None)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0]
    study._storage.set_trial_state_values(waiting._trial_id, optuna.trial.TrialState.RUNNING)  # what ask does first
    assert st.fail_stale_trials(study, log=None, exclusive=True) == [waiting.number]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == waiting.number][0]
    assert (
        retry.system_attrs["fixed_params"] == waiting.system_attrs["fixed_params"]
        and retry.user_attrs["baseline"] == "defaults"
    )
    asked = [st.ask(study, distributions(space_of(cfg), cfg.models)) for _ in range(3)]  # after the other baselines
    assert (
        asked[-1].params == waiting.system_attrs["fixed_params"] and asked[-1].user_attrs["retry_of"] == waiting.number
    )


# -- typed failures: the candidate's own fail its trial; a bug in evomerge stops the search ---------------------


def test_an_exception_in_the_users_task_code_fails_that_trial_and_the_search_goes_on(tmp_path, tiny_zoo, monkeypatch):
    from test_evaluator import raising_task

    from evomerge.run.pool import InlinePool

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "tasks"
    name = raising_task(folder, "calls == 9")  # 8 documents per candidate: the second candidate's first one raises
    cfg = zoo_config(tiny_zoo, tasks={"search": [{"name": name}], "include_paths": [str(folder)]})
    result = run_search(cfg, progress=False, log=None, pool_factory=InlinePool)
    assert result.n_complete == 3 and result.n_failed == 1
    trials = load_study("faults", cfg.storage_url).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    reason = trials[1].user_attrs["fail_reason"]
    assert reason.startswith("TaskCodeError: ") and "boom_utils.py" in reason and "on call 9" in reason
    assert not any("retry_of" in t.user_attrs for t in trials), "a failed candidate is not retried"


def test_a_bug_in_evomerge_stops_the_search_and_loses_no_completed_trial(tmp_path, tiny_zoo, monkeypatch):
    from evomerge.run.pool import InlinePool
    from evomerge.scoring import Scorer

    monkeypatch.chdir(tmp_path)
    real, calls = Scorer.objective, []

    def objective(self, scores):  # the second candidate hits a bug in evomerge's own code
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("an injected bug")
        return real(self, scores)

    monkeypatch.setattr(Scorer, "objective", objective)
    cfg = zoo_config(tiny_zoo)
    with pytest.raises(ZeroDivisionError, match="an injected bug"):
        run_search(cfg, progress=False, log=None, pool_factory=InlinePool)
    trials = load_study("faults", cfg.storage_url).trials
    assert trials[0].state.name == "COMPLETE"
    assert trials[1].state.name == "FAIL" and trials[1].user_attrs["fail_reason"].startswith("interrupted")
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state.name == "WAITING", "the interrupted trial runs again on resume"


def test_a_bug_exits_1_with_its_traceback_not_2_as_a_user_error(tmp_path, tiny_zoo):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "search.yaml"
    data = zoo_config(tiny_zoo).model_dump(mode="json", exclude_none=True)
    data.update(refine=None, early_stop=None)  # every candidate through Scorer.objective, as zoo_config has it
    config.write_text(yaml.safe_dump(data))
    script = (
        "import sys\n"
        "from evomerge.scoring.scorer import Scorer\n"
        "def objective(self, scores): return 1 / 0\n"  # every candidate: a bug, not the candidate's failure
        "Scorer.objective = objective\n"
        "from evomerge.cli import main\n"
        f"sys.exit(main(['search', {str(config)!r}, '--no-progress']))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    assert "Traceback" in out.stderr and "ZeroDivisionError" in out.stderr and "evomerge: error" not in out.stderr


@pytest.mark.slow
def test_a_bug_in_a_ray_worker_stops_the_search_with_its_traceback(tmp_path, tiny_zoo, monkeypatch):
    """The same injected bug inside a Ray actor (through sitecustomize, which every worker process runs)."""
    import ray

    from evomerge.run.pool import WorkerPool

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('EVOMERGE_TEST_INJECT_BUG'):\n"
        "    from evomerge.scoring.scorer import Scorer\n"
        "    def objective(self, scores):\n"
        "        raise ZeroDivisionError('an injected bug in a worker')\n"
        "    Scorer.objective = objective\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("EVOMERGE_TEST_INJECT_BUG", "1")
    cfg = zoo_config(tiny_zoo, workers={"count": 1, "num_cpus": 1})
    try:
        with pytest.raises(ZeroDivisionError, match="an injected bug in a worker"):
            run_search(cfg, progress=False, log=None, pool_factory=WorkerPool)
    finally:
        ray.shutdown()
    trials = load_study("faults", cfg.storage_url).trials
    assert "COMPLETE" not in {t.state.name for t in trials} and "RUNNING" not in {t.state.name for t in trials}
    assert all(t.user_attrs["fail_reason"].startswith("interrupted") for t in trials if t.state.name == "FAIL")
