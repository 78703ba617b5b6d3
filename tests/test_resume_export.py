"""A study stopped and resumed exports what an uninterrupted one exports: the same config run to its budget in one
go, and stopped by Ctrl-C after k trials then resumed from its study.db by `evomerge search` in a new process,
export a byte-identical recipe YAML and identical checkpoint tensors.

A resumed sampler is a fresh one (its random state is not in the study), so a sampled trial asked after a resume is
another point than the one an uninterrupted run asks. The budget is laid out so that every trial after the stop is
one the study decides alone: 3 baselines and 3 sampled trials (k = 6, both runs alike), then a refinement round
from the best of them whose 2 points end the budget (N = 8). The stop comes where a Ctrl-C lands in a real run:
as the round starts, the first 6 trials recorded and nothing of the round."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from evomerge.config.schema import load_config
from evomerge.errors import Interrupted
from evomerge.export.export import export_trial
from evomerge.run.driver import run_search
from evomerge.run.pool import InlinePool
from evomerge.study.record import TrialRecord
from evomerge.study.storage import load_study
from evomerge.study.trials import complete_trials

N_TRIALS, STOP_AT = 8, 6  # refine.at 0.75 of 8: the round starts at trial 6; its 2 points are trials 7 and 8
REPO = Path(__file__).resolve().parent.parent


def write_config(folder: Path, zoo: Path) -> None:
    data = {
        "name": "resumed",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
        "tasks": {"search": [{"name": "zoo_add_search", "subset": 10}, {"name": "zoo_reverse_search", "subset": 10}]},
        "sampler": {"name": "cmaes", "options": {"popsize": 4}},
        "budget": {"n_trials": N_TRIALS},
        "workers": {"count": 0},
        "portfolio": False,
        "refine": {"at": [0.75], "arms": ["tensor"], "steps": 4, "every": 2},
        "early_stop": None,
    }
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(data))


class CtrlCAtTheRound(InlinePool):
    """The in-process pool, stopped by a Ctrl-C as the first refinement round starts."""

    def refine(self, point, job, progress=None):
        raise Interrupted("SIGINT", "stopped as the refinement round starts")


def trials_of(folder: Path) -> list[tuple[dict, float | None, int | None]]:
    study = load_study("resumed", load_config(folder / "config.yaml").storage_url)
    return [(t.params, t.value, TrialRecord.from_trial(t).refine_round) for t in complete_trials(study)]


def exported(folder: Path) -> tuple[str, dict]:
    out = export_trial(load_config(folder / "config.yaml").run_dir, log=None)
    weights: dict = {}
    for shard in sorted(out.model_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    return (folder / "runs" / "resumed" / "best" / "recipe.yaml").read_text(), weights


def test_a_resumed_study_exports_what_an_uninterrupted_one_exports(tmp_path, tiny_zoo, monkeypatch):
    """Both runs in one folder (the recipe and its model card name the run's paths), one after the other."""
    folder = tmp_path / "run"
    write_config(folder, tiny_zoo)
    monkeypatch.chdir(folder)
    assert run_search(load_config("config.yaml"), progress=False, log=None, pool_factory=InlinePool).n_complete == 8
    one_go = trials_of(folder)
    assert [r for _, _, r in one_go] == [None] * STOP_AT + [0, 0]  # the round's 2 points end the budget
    recipe, weights = exported(folder)
    shutil.rmtree(folder / "runs")

    with pytest.raises(Interrupted):
        run_search(load_config("config.yaml"), progress=False, log=None, pool_factory=CtrlCAtTheRound)
    assert trials_of(folder) == one_go[:STOP_AT]
    cli = [sys.executable, "-m", "evomerge", "search", "config.yaml", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cli, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert trials_of(folder) == one_go

    again_recipe, again_weights = exported(folder)
    assert again_recipe == recipe
    assert again_weights.keys() == weights.keys() and len(weights) > 0
    assert all(again_weights[name].equal(weights[name]) for name in weights)
