"""Gradient refinement: the surrogate is the real merge at its starting point, its steps lower the loss inside the
bounds, and a search turns the path into trials scored like any other."""

from __future__ import annotations

import pytest
import torch

from evomerge.config import parse_config
from evomerge.errors import ConfigError
from evomerge.evaluator import Evaluator
from evomerge.scoring.tasks import TaskSpec
from evomerge.search import study as st
from evomerge.search.refine import Refiner
from evomerge.space import SearchSpace, load_space_spec, num_layers

SEARCH = [TaskSpec(name="zoo_add_greedy_search", subset=16), TaskSpec(name="zoo_reverse_search", subset=16)]


@pytest.fixture(scope="module")
def evaluator(tiny_zoo):
    return Evaluator([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base", {"search": SEARCH})


def refiner(zoo, evaluator, method: str) -> tuple[Refiner, SearchSpace, list[str]]:
    space = SearchSpace(load_space_spec(method), num_layers(zoo / "base"))
    models = [str(zoo / "add"), str(zoo / "reverse")]
    return (
        Refiner(evaluator.materializer, evaluator.scorer("search"), space, models, str(zoo / "base"), method),
        space,
        models,
    )


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_the_surrogate_at_its_start_is_the_merge(tiny_zoo, evaluator, method):
    ref, space, models = refiner(tiny_zoo, evaluator, method)
    # eighths of each range: exact in 4 significant digits, as the recipe a search merges keeps them
    point = {
        name: ps.low + (i % 5 + 1) / 8 * (ps.high - ps.low) for i, (name, ps) in enumerate(space.bounds(models).items())
    }
    surrogate = ref.surrogate(point)
    evaluator.load(space.to_recipe(point, models, str(tiny_zoo / "base"), method, seed=0))
    merged = evaluator.materializer.targets
    for name, tensor in surrogate.items():
        if method == "task_arithmetic":
            torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-6)
        else:  # TIES prunes by magnitude: the surrogate may keep another element only where magnitudes tie
            close = torch.isclose(tensor, merged[name], rtol=1e-5, atol=1e-6).float().mean().item()
            assert close > 0.995, f"{name}: only {close:.4f} of the elements agree"


def test_refine_lowers_the_surrogate_loss_inside_the_bounds(tiny_zoo, evaluator):
    ref, space, models = refiner(tiny_zoo, evaluator, "task_arithmetic")
    start = space.defaults(models)
    path = ref.run(start, steps=12, every=4, lr=0.05)
    assert [step for step, _, _ in path] == [0, 4, 8, 12]
    assert path[0][1] == start
    losses = [loss for _, _, loss in path]
    assert losses[-1] < losses[0]
    bounds = space.bounds(models)
    for _, point, _ in path:
        assert set(point) == set(bounds)
        assert all(bounds[k].low <= v <= bounds[k].high for k, v in point.items())
    assert path[-1][1] != start


def search_config(zoo, **changes):
    data = {
        "name": "refine",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "tasks": {"search": [t.model_dump() for t in SEARCH]},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 10},
        "workers": {"count": 0},
        "portfolio": False,
        "refine": {"at": [0.4], "steps": 6, "every": 2},
        **changes,
    }
    return parse_config(data)


def test_a_search_scores_the_refine_path_as_trials(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.search.driver import run_search

    monkeypatch.chdir(tmp_path)
    cfg = search_config(tiny_zoo)
    result = run_search(cfg, progress=False, log=None)
    assert result.n_complete == 10
    study = st.load_study(cfg.name, cfg.storage_url)
    refined = [t for t in study.trials if "refine_round" in t.user_attrs]
    assert [t.user_attrs["refine_step"] for t in refined] == [2, 4, 6]  # step 0 is the trial it started from
    assert all(t.state.name == "COMPLETE" and t.user_attrs["recipe"] for t in refined)
    start = study.trials[refined[0].user_attrs["refined_from"]]
    assert start.number < refined[0].number and start.state.name == "COMPLETE"
    before = [t for t in study.trials if t.number < refined[0].number and t.state.name == "COMPLETE"]
    assert st.objective_of(start) == max(st.objective_of(t) for t in before)  # from the best trial so far
    assert len(before) == 4  # the round starts at 0.4 of the budget


def test_refine_asked_for_on_a_method_without_a_weight_gradient_is_a_user_error(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.search.driver import check_tasks

    monkeypatch.chdir(tmp_path)
    models = {"models": [str(tiny_zoo / "add")], "method": "slerp", "search_space": "slerp"}
    with pytest.raises(ConfigError, match="refine: method 'slerp' has no weight gradient"):
        check_tasks(search_config(tiny_zoo, **models))
    quietly_off = parse_config({**search_config(tiny_zoo, **models).model_dump(mode="json", exclude={"refine"})})
    assert "refine" not in quietly_off.model_fields_set and quietly_off.refine is not None
    assert "no weight gradient" in check_tasks(quietly_off)["refine"]  # the default refinement: off, with the reason
