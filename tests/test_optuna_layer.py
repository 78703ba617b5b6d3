"""The Optuna layer (search/storage, samplers, record, trials, study): Optuna is imported there only, through its
public API only, and a trial this process holds no live handle on is written through the storage it opened."""

from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest

from evomerge.errors import StudyError
from evomerge.study import study as st
from evomerge.study.record import TrialRecord
from evomerge.study.storage import load_study, storage_of

REPO = Path(__file__).resolve().parent.parent
LAYER = {f"evomerge/study/{m}.py" for m in ("storage", "samplers", "record", "trials", "study")}
PRIVATE = {"_storage", "_study_id", "_trial_id", "_cached_frozen_trial", "_fixed_params"}


def _modules():
    for path in sorted((REPO / "evomerge").rglob("*.py")):
        yield str(path.relative_to(REPO)), ast.parse(path.read_text(), str(path))


def test_optuna_is_imported_only_in_the_optuna_layer():
    importers = set()
    for name, tree in _modules():
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "optuna" or n.startswith("optuna.") for n in names):
                importers.add(name)
    assert importers and importers <= LAYER, sorted(importers - LAYER)


def test_no_module_reads_optunas_private_attributes():
    found = [
        f"{name}:{node.lineno}: .{node.attr}"
        for name, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE
    ]
    assert found == []


def test_a_dead_drivers_trial_is_failed_and_requeued_through_the_storage_this_process_opened(tmp_path):
    from evomerge.study.storage import create_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create_study("s", url, None, ["maximize"])
    dists = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.enqueue_trial({"x": 0.25}, user_attrs={"baseline": "defaults"})
    st.ask(study, dists)
    reader = load_study("s", url)  # another process's view: a FrozenTrial, no live Trial
    frozen = reader.get_trials(states=(optuna.trial.TrialState.RUNNING,))[0]
    st.requeue(reader, frozen, "stale: test", TrialRecord(merge_s=1.5), worker_deaths=1)
    trials = load_study("s", url).trials
    failed, retry = trials[0], trials[1]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "stale: test" and failed.user_attrs["merge_s"] == 1.5
    assert retry.state == optuna.trial.TrialState.WAITING and retry.system_attrs["fixed_params"] == {"x": 0.25}
    assert retry.user_attrs == {"retry_of": 0, "baseline": "defaults", "worker_deaths": 1}


def test_a_study_opened_elsewhere_has_no_storage_handle_here():
    elsewhere = optuna.create_study()
    with pytest.raises(StudyError, match="not opened through evomerge.study.storage"):
        storage_of(elsewhere)
