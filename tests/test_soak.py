"""Crash-and-resume soak: the driver SIGKILLed at random moments, resumed with the same command, 10 times.

.venv/bin/pytest tests/test_soak.py -m slow          (longer soaks: scripts/soak.py --kills 30)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", REPO / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ten_sigkills_lose_and_duplicate_nothing(tmp_path, tiny_zoo):
    soak = load_soak()
    report = soak.run_soak(tmp_path, tiny_zoo, kills=10, budget=120, seed=1, early_share=0.5, late_max_s=1.5, log=None)
    summary = report.text()
    assert report.kills == 10 and report.early == report.late == 5, summary
    assert report.final_rc == 0 and not report.crashes, summary
    assert report.complete == 120, summary
    assert report.lost == [] and report.duplicated == [] and report.stuck == [], summary
    assert report.integrity == "ok", summary
    # a mid-trial kill leaves a RUNNING trial that the next life fails and retries (one landing between two
    # fast trials leaves none, so not every kill does)
    assert report.failed >= 1, "mid-trial kills left trials that were failed and retried"


def test_the_checker_finds_lost_duplicated_and_stuck_trials(tmp_path):
    """The soak's checker on a hand-made study: it must see what it is meant to catch."""
    import optuna

    soak = load_soak()
    db = tmp_path / "study.db"
    study = optuna.create_study(study_name="soak", storage=f"sqlite:///{db}")
    study.enqueue_trial({"x": 0.5}, user_attrs={"baseline": "defaults"})
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    first = study.ask(dist)  # the baseline: COMPLETE once ...
    study.tell(first, 1.0)
    again = study.ask(dist)  # ... and once more through a retry chain: a duplicate
    again.set_user_attr("retry_of", first.number)
    study.tell(again, 1.0)
    gone = study.ask(dist)  # seen COMPLETE after a kill, then no more (impossible unless something is broken)
    study.tell(gone, 0.1)
    orphan = study.ask(dist)  # requeued but never retried: lost
    orphan.set_user_attr("fail_reason", "stale: driver process 1 died")
    study.tell(orphan, state=optuna.trial.TrialState.FAIL)
    study.ask(dist)  # left RUNNING: stuck
    drifted = study.ask(dist)  # a retry that ran other params than the trial it retries
    drifted.set_user_attr("retry_of", gone.number)
    study.tell(drifted, 0.2)
    observed = {gone.number: ({"x": 0.9}, {0: 0.1})}  # other params than it has now

    report = soak.SoakReport(budget=4)
    soak.check(db, observed, report)
    assert report.complete == 4 and report.integrity == "ok"
    assert report.duplicated == [
        "baseline 'defaults': COMPLETE as [0, 1]",
        f"trial {gone.number}: COMPLETE as [{gone.number}, {drifted.number}]",
    ]
    assert any(f"trial {gone.number} was COMPLETE" in x for x in report.lost)
    assert any(f"trial {orphan.number}" in x and "never retried" in x for x in report.lost)
    assert any(f"trial {drifted.number} retried trial {gone.number} with other params" in x for x in report.lost)
    assert report.stuck == [f"trial {orphan.number + 1} RUNNING"]
    assert not report.ok
