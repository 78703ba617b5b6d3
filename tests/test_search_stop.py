"""Why and how a search stops, and what it says: budget met, budget.timeout, Ctrl-C / SIGTERM (a scheduler's time
limit); new or resumed at start; progress lines without a bar; `status` after a stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from test_search_faults import zoo_config
from waiting import trial_count, wait_until

from evomerge.candidate.space import space_of
from evomerge.report.status import status_text
from evomerge.run.driver import run_search
from evomerge.run.pool import InlinePool
from evomerge.study.samplers import distributions
from evomerge.study.storage import load_study
from evomerge.study.trials import best_trial, complete_trials, objective_of


def _search(cfg, **kw):
    lines: list[str] = []
    result = run_search(cfg, progress=False, log=lines.append, pool_factory=InlinePool, **kw)
    return result, lines


def test_budget_met_timeout_and_resume_say_so(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, lines = _search(zoo_config(tiny_zoo, budget={"n_trials": 3}))
    where = f"in {result.storage}; run directory {tmp_path / 'runs' / 'faults'}"
    assert lines[0] == f"new study 'faults' (3 trials) {where}"
    assert [line.split(" ")[0] for line in lines[1:4]] == ["plan:"] * 3  # inputs, the worker, the machine
    assert lines[2].startswith("plan: the worker (in this process) on cpu") and lines[3].endswith(": fits")
    assert lines[4].startswith("plan: time per trial on ") and " trials per hour " in lines[5]  # and how long
    loading = lines.index("loading the models and tasks in this process (workers.count: 0)...")
    assert loading > 5 and all(line.startswith("budget: ") for line in lines[6:loading])  # what the budget buys
    assert result.stop == "budget" and lines[-1].startswith("budget met: 3/3 complete trials (0 failed this run)")
    assert lines[-1].endswith(f"next: evomerge export {Path('runs/faults')}")

    # a timeout stops asking before the budget: it says so and how to go on
    result, lines = _search(zoo_config(tiny_zoo, budget={"n_trials": 100_000, "timeout": 0.3}))
    assert lines[0] == f"resuming study 'faults': 3/100000 complete, {where}"
    done = result.n_complete
    assert result.stop == "timeout" and 3 < done < 100_000
    assert lines[-1].startswith(f"stopped by budget.timeout (0.3 s) at {done}/100000 complete trials")
    assert "the budget is not met: run the same command to continue" in lines[-1] and "budget met" not in "".join(lines)

    result, lines = _search(zoo_config(tiny_zoo, budget={"n_trials": done}))
    assert result.stop == "complete" and f"already has {done} complete trials" in lines[-1]


def test_without_a_bar_a_line_every_tenth_of_the_budget(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, lines = _search(zoo_config(tiny_zoo, budget={"n_trials": 20}))
    progress = [line for line in lines if " complete, best " in line]
    assert [line.split(":")[1].split()[0] for line in progress] == [f"{n}/20" for n in range(2, 21, 2)]
    assert progress[-1].startswith("faults: 20/20 complete, best 0.") and "trials/min" in progress[-1]


def test_status_marks_the_exported_trial_explains_its_columns_and_knows_nothing_runs(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = zoo_config(tiny_zoo, budget={"n_trials": 4})
    _search(cfg)
    study = load_study(cfg.name, cfg.storage_url)
    best = best_trial(study)
    text = status_text(cfg.run_dir, top=1)
    assert f"\n{best.number}* " in text and "* = the trial `evomerge export` takes" in text
    assert "objective = the weighted mean of the search tasks' scores" in text and "s = seconds" in text
    # the exported trial is listed even when it is not among the top rows: here validation picks the worst one
    worst = min(complete_trials(study), key=objective_of)
    study.set_user_attr("lock", None)
    from evomerge.validate import guard

    monkeypatch.setattr(guard, "exported_trial", lambda c, s: worst)
    text = status_text(cfg.run_dir, top=1)
    assert f"\n{worst.number}* " in text and "top 1 trials by search objective and the exported one:" in text
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    # a trial left RUNNING by a search that is gone (killed inside `ask`): status does not call it running
    orphan = study.ask(distributions(space_of(cfg), cfg.models))  # no driver recorded
    text = status_text(cfg.run_dir)
    assert f"nothing is running: no search holds the study; trial {orphan.number} was left RUNNING" in text
    assert "\nrunning (search" not in text
    # and the next search runs it again, saying which search left it
    _, lines = _search(zoo_config(tiny_zoo, budget={"n_trials": 5}))
    assert any("were left RUNNING by a dead process" in line for line in lines)
    reason = load_study(cfg.name, cfg.storage_url).trials[orphan.number].user_attrs["fail_reason"]
    assert (
        reason == "stale: the search that asked it stopped before the trial finished; this driver holds the study now"
    )


def test_sigterm_stops_a_ray_search_like_ctrl_c(tmp_path, tiny_zoo):
    """`timeout`, Slurm and Kubernetes send SIGTERM: one line, exit 143, the trials in flight requeued, no Ray stack
    dump; the same command resumes."""
    cfg = zoo_config(
        tiny_zoo,
        name="sig",
        budget={"n_trials": 100_000},
        workers={"count": 1, "num_cpus": 1},
        tasks={"search": [{"name": "zoo_add_search", "subset": 20}]},
    )
    config = tmp_path / "sig.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge", "search", str(config), "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    db = tmp_path / "runs" / "sig" / "study.db"
    url = f"sqlite:///{db}"
    try:  # read-only: the test never touches the schema the search is creating
        wait_until(lambda: trial_count(db, "sig", "COMPLETE") >= 3, "3 complete trials", proc=proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = out.decode(), err.decode()
    assert proc.returncode == 143, err
    assert "SIGTERM received" not in err and "logging.cc" not in err and "Traceback" not in err, err
    last = err.strip().splitlines()
    assert len(last) == 1, err
    trials = load_study("sig", url).trials
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert last[0].startswith(f"evomerge: interrupted (SIGTERM): search 'sig' stopped at {done}/100000 complete")
    assert last[0].endswith("run the same command to resume")
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING], "in-flight trials are requeued"
    stopped = [t for t in trials if t.user_attrs.get("fail_reason", "").startswith("interrupted")]
    for t in stopped:  # each runs again first, with its params
        retry = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.WAITING
    if stopped:
        assert f"(trials {', '.join(str(t.number) for t in stopped)} were running: they run again first)" in last[0]
    assert "nothing is running" not in status_text(tmp_path / "runs" / "sig") and "running:" not in status_text(
        tmp_path / "runs" / "sig"
    )
    assert "new study 'sig'" in out and "starting 1 worker (Ray" in out


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_in_process_requeues_and_names_the_resume(tmp_path, tiny_zoo, monkeypatch, signal_name):
    """The same path without Ray: an interrupt after the first tell stops the search with the resume line."""
    from evomerge.errors import Interrupted
    from evomerge.run import driver

    monkeypatch.chdir(tmp_path)
    real, calls = driver._tell, []

    def tell(*args):
        out = real(*args)
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted(signal_name) if signal_name == "SIGTERM" else KeyboardInterrupt()
        return out

    monkeypatch.setattr(driver, "_tell", tell)
    cfg = zoo_config(tiny_zoo, budget={"n_trials": 5})
    with pytest.raises(Interrupted) as info:
        _search(cfg)
    assert info.value.signal_name == signal_name and info.value.exit_code == (143 if signal_name == "SIGTERM" else 130)
    assert info.value.detail == "search 'faults' stopped at 2/5 complete; run the same command to resume"
    result, lines = _search(cfg)
    assert lines[0].startswith("resuming study 'faults': 2/5 complete") and result.n_complete == 5
