"""End to end on the tiny zoo: search (Ray, 1 worker), resume to a larger budget, export, re-evaluate."""

from __future__ import annotations

import logging
import math
import warnings

import optuna
import pytest

from evomerge.candidate.space import space_of
from evomerge.config.schema import apply_overrides, parse_config
from evomerge.export.export import export_trial
from evomerge.merge.recipe import Recipe
from evomerge.report.status import status_text
from evomerge.run.driver import run_search
from evomerge.scoring import TaskSpec, evaluate_model_dir
from evomerge.study import study as st
from evomerge.study.storage import load_study
from evomerge.study.trials import best_trial, complete_trials, pareto_front

TASKS = [{"name": "zoo_add_search", "subset": 20}, {"name": "zoo_reverse_search", "subset": 20}]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (the search joins a running Ray instead of starting its own)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


class KeptPool:
    """One Ray worker pool for both runs of a test (its setup is the slow part); the driver cannot close it."""

    def __init__(self, pool):
        self.pool = pool

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def close(self) -> None:
        pass


def test_search_resume_export_rescore(tmp_path, tiny_zoo, monkeypatch, ray_local, request):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        {
            "name": "e2e",
            "base_model": str(tiny_zoo / "base"),
            "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
            "method": "task_arithmetic",
            "search_space": {
                "methods": ["task_arithmetic"],
                "layers_per_group": 2,
                "parameters": {
                    "weight": {"low": 0.0, "high": 1.0, "default": 0.5},
                    "lambda": {"low": 0.5, "high": 1.5, "default": 1.0, "per_layer": False},
                },
            },
            "tasks": {"search": TASKS},
            "sampler": {"name": "cmaes", "options": {"popsize": 4}},
            "budget": {"n_trials": 4},
            "refine": {"at": [0.5], "steps": 4, "every": 2},  # a short round: two refinement points, through Ray
        }
    )
    # a candidate whose weights overflow (lambda far outside the bounds) after the three baselines
    space = space_of(cfg)
    study = st.open_study(cfg, space, log=None)
    bad = {**space.defaults(cfg.models), "lambda": 1e300}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.enqueue_trial(bad, user_attrs={"note": "overflows"})

    from evomerge.run.pool import WorkerPool

    pool = WorkerPool(cfg)
    request.addfinalizer(pool.close)
    first = run_search(cfg, progress=False, log=None, pool_factory=lambda _cfg: KeptPool(pool))
    assert first.n_complete == 4 and first.n_failed == 1
    trials = study.get_trials()
    assert [t.user_attrs.get("baseline") for t in trials[:3]] == ["defaults", "only add", "only reverse"]
    failed = trials[3]
    assert failed.state == optuna.trial.TrialState.FAIL and "NaN or Inf" in failed.user_attrs["fail_reason"]
    done = {t.number: t for t in complete_trials(study)}
    for t in done.values():
        assert set(t.user_attrs) >= {"scores", "objective", "merge_s", "eval_s", "total_s", "recipe", "worker"}
        assert 0.0 <= t.value <= 1.0 and t.user_attrs["merge_s"] > 0 and t.user_attrs["eval_s"] > 0

    # resume: the same study, three more COMPLETE trials, nothing redone
    second = run_search(
        apply_overrides(cfg, n_trials=7), progress=False, log=None, pool_factory=lambda _cfg: KeptPool(pool)
    )
    assert second.n_complete == 7 and second.n_failed == 0
    again = {t.number: t for t in complete_trials(study)}
    assert set(done) < set(again)
    assert all(again[n].value == done[n].value and again[n].params == done[n].params for n in done)
    points = [tuple(sorted(t.params.items())) for t in again.values() if not t.user_attrs.get("portfolio")]
    assert len(set(points)) == len(points), "no point was evaluated twice"
    assert "RUNNING" not in {t.state.name for t in study.get_trials()}

    # export the best trial; the checkpoint scores exactly what the trial recorded
    best = best_trial(study)
    res = export_trial(cfg.run_dir, log=None)
    assert res.trial == best.number and res.model_dir == cfg.run_dir / "best" / "model"
    recipe = Recipe.load(cfg.run_dir / "best" / "recipe.yaml")
    prov = recipe.evomerge
    assert (prov.study, prov.trial, prov.seed) == ("e2e", best.number, cfg.seed)
    assert len(prov.inputs) == 3 and all(len(h) == 64 for h in prov.inputs.values())
    assert prov.scores == {t["name"]: best.user_attrs["scores"][t["name"]]["acc"] for t in TASKS}
    card = (res.model_dir / "README.md").read_text()
    assert f"trial {best.number}" in card and f"{best.user_attrs['objective']:.4f}" in card
    rescored = evaluate_model_dir(res.model_dir, [TaskSpec(**t) for t in TASKS], seed=cfg.seed)
    assert rescored == best.user_attrs["scores"]

    text = status_text(cfg.run_dir)
    assert "budget: 7/7 complete" in text and "NaN or Inf" in text and "per trial (median of 7)" in text
    assert not math.isnan(second.wall_s)


def inline_config(zoo, **changes):
    data = {
        "name": "inline",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
        "tasks": {"search": TASKS},
        "budget": {"n_trials": 5},
        **changes,
    }
    return parse_config(data)


def test_multi_objective_search_pareto_front_and_export_choice(tmp_path, tiny_zoo, monkeypatch):
    from evomerge.errors import StudyError
    from evomerge.run.pool import InlinePool

    monkeypatch.chdir(tmp_path)
    cfg = inline_config(tiny_zoo, sampler={"name": "nsga2", "options": {"population_size": 4}})
    result = run_search(cfg, progress=False, log=None, pool_factory=InlinePool)
    assert result.n_complete == 5
    study = load_study("inline", cfg.storage_url)
    assert len(study.directions) == 2
    for t in complete_trials(study):
        assert t.values == [t.user_attrs["scores"][task["name"]]["acc"] for task in TASKS]
        assert t.user_attrs["objective"] == pytest.approx(sum(t.values) / 2)
    front = pareto_front(study)
    assert front and all(t.state == optuna.trial.TrialState.COMPLETE for t in front)
    assert "Pareto front" in status_text(cfg.run_dir)
    chosen = export_trial(cfg.run_dir, out=tmp_path / "pick", trial=front[-1].number, log=None)
    assert Recipe.load(chosen.recipe).evomerge.trial == front[-1].number
    default = export_trial(cfg.run_dir, log=None)
    assert default.trial == best_trial(study).number  # the best mean
    with pytest.raises(StudyError, match="no trial 99"):
        export_trial(cfg.run_dir, trial=99, log=None)


def test_a_search_whose_candidates_all_fail_stops_with_the_reason(tmp_path, tiny_zoo, monkeypatch):
    from evomerge.errors import StudyError
    from evomerge.run.pool import InlinePool

    monkeypatch.chdir(tmp_path)
    space = {
        "methods": ["task_arithmetic"],
        "parameters": {"weight": {"value": 1.0}, "lambda": {"low": 1e300, "high": 2e300}},
    }
    cfg = inline_config(tiny_zoo, search_space=space)
    with pytest.raises(StudyError, match="the last 5 trials failed .*NaN or Inf"):
        run_search(cfg, progress=False, log=None, pool_factory=InlinePool)
    trials = [t for t in load_study("inline", cfg.storage_url).trials if not t.user_attrs.get("portfolio")]
    assert {t.state.name for t in trials} <= {"FAIL", "WAITING"}  # other methods' default merges are fine
    assert all("CandidateError" in t.user_attrs["fail_reason"] for t in trials if t.state.name == "FAIL")
