"""Per-example scores, the smooth objective and staged evaluation (scoring/staged.py)."""

from __future__ import annotations

import pytest

from evomerge.candidate.evaluator import Evaluator, alone
from evomerge.config.schema import parse_config
from evomerge.scoring.staged import example_units, paired_gap, run_staged, stage_order, units_objective
from evomerge.scoring.tasks import TaskSpec
from evomerge.study.storage import load_study
from evomerge.study.trials import best_trial, complete_trials, is_whole

SEARCH = [TaskSpec(name="zoo_add_greedy_search", subset=40), TaskSpec(name="zoo_reverse_search", weight=2.0, subset=40)]


@pytest.fixture(scope="module")
def evaluator(tiny_zoo):
    return Evaluator([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base", {"search": SEARCH})


def test_per_example_scores_add_up_to_lm_evals_aggregates(tiny_zoo, evaluator):
    evaluator.load_model(tiny_zoo / "add")
    scorer = evaluator.scorer("search")
    whole = scorer.score(evaluator.model, evaluator.tokenizer)
    scores, values, probs = scorer.score_examples(evaluator.model, evaluator.tokenizer)
    for leaf, per in values.items():
        assert sorted(per) == scorer.indices(leaf) and set(per.values()) <= {0.0, 1.0}
        assert sum(per.values()) / len(per) == pytest.approx(whole[leaf]["acc"]) == pytest.approx(scores[leaf]["acc"])
        assert all(0.0 < p <= 1.0 for p in probs[leaf].values()) and len(probs[leaf]) == len(per)
    staged = run_staged(scorer, evaluator.model, evaluator.tokenizer, stage_order(scorer, 0))
    assert not staged.stopped and staged.n_examples == staged.n_total == 80
    assert staged.objective == pytest.approx(scorer.objective(whole))  # the same objective, built per example


def test_smooth_mixes_the_answer_probability_into_each_example():
    units = example_units({"t": {1: 1.0, 2: 0.0}}, {"t": {1: 0.9, 2: 0.4}}, smooth=0.25)
    assert units == {"t": {1: pytest.approx(0.75 + 0.225), 2: pytest.approx(0.1)}}
    assert example_units({"t": {1: 1.0}}, {}, smooth=0.5) == {"t": {1: 1.0}}  # no probability: the metric alone


def test_a_clearly_worse_candidate_stops_early_and_a_better_one_is_scored_whole(tiny_zoo, evaluator):
    scorer = evaluator.scorer("search")
    order = stage_order(scorer, 0)
    # incumbents as a trial scored on every example would leave them: right everywhere, or wrong everywhere
    perfect = {leaf: {i: 1.0 for i in o} for leaf, o in order.items()}
    hopeless = {leaf: {i: 0.0 for i in o} for leaf, o in order.items()}
    model, tokenizer = _load(evaluator, tiny_zoo / "base")
    stopped = run_staged(
        scorer, model, tokenizer, order, stages=[0.25, 0.5], incumbent=perfect, incumbent_objective=1.0
    )
    assert stopped.stopped and stopped.n_examples == 20  # a quarter of each task's 40, then the check
    gap, se = paired_gap(scorer, stopped.units, perfect, {leaf: len(o) for leaf, o in order.items()})
    assert gap + 2 * se < 0 and stopped.objective == pytest.approx(1.0 + gap)
    whole = run_staged(scorer, model, tokenizer, order)
    kept = run_staged(scorer, model, tokenizer, order, stages=[0.25, 0.5], incumbent=hopeless, incumbent_objective=0.0)
    assert not kept.stopped and kept.n_examples == 80 and kept.objective == pytest.approx(whole.objective)
    assert units_objective(scorer, kept.units) == pytest.approx(whole.objective)
    # the standard error shrinks to 0 once every example is scored (finite-population correction)
    assert paired_gap(scorer, whole.units, hopeless, {leaf: len(o) for leaf, o in order.items()})[1] == 0.0


def _load(evaluator, model):
    evaluator.load(alone(model, evaluator.inputs))
    return evaluator.model, evaluator.tokenizer


def test_a_search_with_early_stopping_never_exports_a_stopped_trial(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.run.driver import run_search
    from evomerge.validate.guard import exported_trial, finalists, validate_top

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        {
            "name": "staged",
            "base_model": str(tiny_zoo / "base"),
            "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
            "method": "task_arithmetic",
            "search_space": {"methods": ["task_arithmetic"], "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
            "tasks": {"search": [t.model_dump() for t in SEARCH], "smooth": 0.2},
            "sampler": {"name": "random", "seed": 1},
            "budget": {"n_trials": 14},
            "workers": {"count": 0},
            "refine": None,
            "early_stop": {"stages": [0.25, 0.5], "z": 0.01},  # stop whatever looks worse: the plumbing is tested here
            "validation": {"top_k": 3, "tasks": [{"name": "zoo_add_greedy_val", "subset": 20}]},
        }
    )
    result = run_search(cfg, progress=False, log=None)
    study = load_study(cfg.name, cfg.storage_url)
    own = [t for t in complete_trials(study) if not t.user_attrs.get("portfolio")]
    stopped = [t for t in own if t.user_attrs.get("stopped_early")]
    whole = [t for t in own if not t.user_attrs.get("stopped_early")]
    assert result.n_complete == 14 and stopped and whole
    assert all(t.user_attrs["examples_scored"] < 80 for t in stopped)
    assert all(t.user_attrs["examples_scored"] == 80 and len(t.user_attrs["examples"]) == 2 for t in whole)
    best = best_trial(study)
    assert not is_whole(stopped[0]) and is_whole(best) and best.number not in {t.number for t in stopped}
    validate_top(cfg, study, log=None)
    assert not {t.number for t in finalists(cfg, study)} & {t.number for t in stopped}
    assert exported_trial(cfg, study).number not in {t.number for t in stopped}
    portfolio = [t for t in complete_trials(study) if t.user_attrs.get("portfolio")]
    assert {t.user_attrs["baseline"] for t in portfolio} >= {"ties (defaults)", "dare_ties (defaults)"}
    assert all("cma:generation" not in str(t.system_attrs) for t in portfolio)  # never part of a sampler's state
    finals = {t.user_attrs.get("baseline") for t in finalists(cfg, study)}
    assert {"defaults", "only add", "only reverse", "ties (defaults)"} <= finals  # every baseline is validated
