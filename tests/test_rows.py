"""Per-row refinement: its merge is the real merge of the recipe with the coefficient file, its steps lower the loss
(likelihood and distillation), and a search scores its path as trials that export as evomerge-only recipes."""

from __future__ import annotations

import pytest
import torch

from evomerge.candidate.evaluator import Evaluator
from evomerge.candidate.space import SearchSpace, load_space_spec, num_layers
from evomerge.merge.coefficients import key, write_coefficients
from evomerge.merge.recipe import CoefficientFile
from evomerge.refine.rows import BOUNDS, SAMPLED_ROW_LR, RowRefiner, row_step
from evomerge.scoring.tasks import TaskSpec

SEARCH = [TaskSpec(name="zoo_add_greedy_search", subset=12), TaskSpec(name="zoo_reverse_greedy_search", subset=12)]


def _search_config(zoo, name: str, n_trials: int, refine: dict):
    """A small in-process search on the tiny zoo's two specialists with these refinement settings."""
    from evomerge.config.schema import parse_config

    return parse_config(
        {
            "name": name,
            "base_model": str(zoo / "base"),
            "models": [str(zoo / "add"), str(zoo / "reverse")],
            "method": "task_arithmetic",
            "tasks": {"search": [t.model_dump() for t in SEARCH]},
            "sampler": {"name": "random", "seed": 0},
            "budget": {"n_trials": n_trials},
            "workers": {"count": 0},
            "portfolio": False,
            "refine": refine,
        }
    )


@pytest.fixture(scope="module")
def evaluator(tiny_zoo):
    return Evaluator([tiny_zoo / "add", tiny_zoo / "reverse"], tiny_zoo / "base", {"search": SEARCH})


def _refiner(zoo, evaluator, loss="likelihood", method="task_arithmetic"):
    space = SearchSpace(load_space_spec(method), num_layers(zoo / "base"))
    models = [str(zoo / "add"), str(zoo / "reverse")]
    mat, scorer = evaluator.materializer, evaluator.scorer("search")
    return RowRefiner(mat, scorer, space, models, str(zoo / "base"), method, loss=loss), space, models


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_the_row_surrogate_is_the_merge_with_its_coefficient_file(tiny_zoo, evaluator, tmp_path, method):
    ref, space, models = _refiner(tiny_zoo, evaluator, method=method)
    point = {
        name: ps.low + (i % 5 + 1) / 8 * (ps.high - ps.low) for i, (name, ps) in enumerate(space.bounds(models).items())
    }
    g = torch.Generator().manual_seed(1)
    names = list(evaluator.materializer.targets)
    coefficients = {
        key(i, n): torch.rand(evaluator.materializer.targets[n].shape[0], generator=g) * 2
        for i in range(2)
        for n in names[::3]
    }
    ref.write(point, coefficients)
    surrogate = {n: t.clone() for n, t in evaluator.materializer.targets.items()}
    digest = write_coefficients(tmp_path / "c.safetensors", coefficients)
    recipe = space.to_recipe(point, models, str(tiny_zoo / "base"), method, seed=0)
    recipe = recipe.with_provenance(coefficients=CoefficientFile(file=str(tmp_path / "c.safetensors"), sha256=digest))
    evaluator.load(recipe)
    for name, tensor in evaluator.materializer.targets.items():
        if method == "task_arithmetic":
            torch.testing.assert_close(surrogate[name], tensor, rtol=1e-5, atol=1e-6)
        else:  # TIES prunes by magnitude: the surrogate may keep another element only where magnitudes tie
            close = torch.isclose(surrogate[name], tensor, rtol=1e-5, atol=1e-6).float().mean().item()
            assert close > 0.995, f"{name}: only {close:.4f} of the elements agree"


@pytest.mark.parametrize(
    "loss,method", [("likelihood", "task_arithmetic"), ("distill", "task_arithmetic"), ("likelihood", "ties")]
)
def test_a_row_refinement_lowers_its_loss_inside_the_bounds(tiny_zoo, evaluator, loss, method):
    ref, space, models = _refiner(tiny_zoo, evaluator, loss, method)
    start = space.defaults(models)
    path = ref.run(start, steps=8, every=4, lr=0.05)
    assert [step for step, *_ in path] == [0, 4, 8]
    assert all(point == start for _, point, _, _ in path)  # the recipe's own numbers stay; the rows move
    losses = [loss for _, _, loss, _ in path]
    assert losses[-1] < losses[0]
    first, last = path[0][3], path[-1][3]
    assert all(torch.equal(v, torch.ones_like(v)) for v in first.values())
    assert any(not torch.equal(v, torch.ones_like(v)) for v in last.values())
    assert all(BOUNDS[0] <= float(v.min()) and float(v.max()) <= BOUNDS[1] for v in last.values())
    # continued from its last coefficients, it starts where it stopped: the same merged model
    stopped = {name: t.detach().clone() for name, t in evaluator.materializer.targets.items()}
    again = ref.run(start, steps=0, every=1, lr=0.05, coefficients=last)
    assert [step for step, *_ in again] == [0]
    for name, tensor in evaluator.materializer.targets.items():
        torch.testing.assert_close(tensor, stopped[name], rtol=1e-6, atol=1e-7)


def test_a_search_scores_the_row_path_and_exports_it_as_an_evomerge_only_recipe(tiny_zoo, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from evomerge.cli import main
    from evomerge.merge.recipe import Recipe
    from evomerge.run.driver import run_search
    from evomerge.study.record import TrialRecord
    from evomerge.study.storage import load_study

    monkeypatch.chdir(tmp_path)
    cfg = _search_config(tiny_zoo, "rows", 9, {"at": [0.4], "steps": 6, "every": 2, "arms": ["distill"]})
    assert run_search(cfg, progress=False, log=None).n_complete == 9
    study = load_study(cfg.name, cfg.storage_url)
    refined = [t for t in study.trials if TrialRecord.from_trial(t).refine_round is not None]
    assert [TrialRecord.from_trial(t).refine_step for t in refined] == [2, 4, 6]
    for t in refined:
        record = TrialRecord.from_trial(t)
        assert t.state.name == "COMPLETE" and record.coefficients["file"].startswith(str(tmp_path / "runs" / "rows"))
        recipe = Recipe.from_yaml(record.recipe)
        assert recipe.evomerge_only and recipe.evomerge.coefficients.sha256 == record.coefficients["sha256"]
    assert len({TrialRecord.from_trial(t).coefficients["sha256"] for t in refined}) == 3  # the rows moved
    last = refined[-1]
    assert main(["export", str(cfg.run_dir), "--trial", str(last.number), "--out", str(tmp_path / "best")]) == 0
    exported = tmp_path / "best"
    recipe_path = exported / "recipe.yaml"
    assert Recipe.load(recipe_path).evomerge_only and (recipe_path.parent / "coefficients.safetensors").is_file()
    # the best portable trial of the search beside it, which mergekit-yaml reproduces
    portable = Recipe.load(exported / "portable" / "recipe.yaml")
    assert (
        not portable.evomerge_only
        and TrialRecord.from_trial(study.trials[portable.evomerge.trial]).coefficients is None
    )
    assert main(["merge", str(recipe_path), "--out", str(tmp_path / "again")]) == 0
    model_dir = exported / "model"
    a, b = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refinement_steps_scale_with_the_budget_when_auto():
    from pydantic import ValidationError

    from evomerge.config.schema import RefineConfig

    auto = RefineConfig(steps="auto", every="auto")
    assert [auto.schedule(n) for n in (10, 25, 100, 200)] == [(10, 1), (15, 2), (60, 10), (120, 20)]
    assert RefineConfig().schedule(200) == (60, 10)  # fixed numbers stay fixed
    with pytest.raises(ValidationError, match="positive number of steps"):
        RefineConfig(steps=0)


def test_the_guard_validates_every_point_of_the_refinement(tiny_zoo):
    """A refinement trains on the search examples, so its longest-trained points rank first on them: the guard
    scores every point of its path on validation, not only the top_k by search objective."""
    import optuna

    from evomerge.config.schema import parse_config
    from evomerge.study.record import trial_attrs
    from evomerge.validate.guard import finalists

    cfg = parse_config(
        {
            "name": "g",
            "base_model": str(tiny_zoo / "base"),
            "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
            "method": "task_arithmetic",
            "tasks": {"search": [t.model_dump() for t in SEARCH]},
            "validation": {"top_k": 1, "tasks": [{"name": "zoo_add_greedy_val"}]},
        }
    )
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    rows = [(0.2, {}), (0.95, {"refine_round": 0, "refine_step": 20}), (0.9, {"refine_round": 0, "refine_step": 10}),
            (0.5, {}), (0.97, {"refine_round": 1, "refine_step": 10})]  # fmt: skip
    for value, attrs in rows:
        record = trial_attrs(objective=value, **attrs)
        study.add_trial(
            optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=value, user_attrs=record)
        )
    assert [t.number for t in finalists(cfg, study)] == [4, 1, 2]  # the top one, then the path's others by rank
    no_guard = cfg.model_copy(update={"validation": None})
    assert [t.number for t in finalists(no_guard, study)] == [4]


def test_refinement_rounds_cycle_the_arms_and_scale_with_the_budget():
    from pydantic import ValidationError

    from evomerge.config.schema import RefineConfig

    auto = RefineConfig()
    assert auto.starts(25) == [12, 21] and auto.starts(50) == [25, 42]  # two rounds up to 74 trials
    assert auto.starts(100) == [50, 61, 73, 84]
    assert len(auto.starts(200)) == 8 and len(auto.starts(5000)) == 8  # one per 25 trials, at most 8
    assert [auto.arm(r) for r in range(5)] == ["tensor", "tensor", "rows", "distill", "tensor"]
    assert RefineConfig(at=[0.5]).starts(200) == [100]  # fixed fractions stay fixed
    with pytest.raises(ValidationError, match="became refine.arms: write `arms: \\[rows\\]`"):
        RefineConfig(grain="rows")


def test_default_per_row_arms_fall_back_to_per_tensor_rounds_where_a_method_has_none(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.config.resolve import runnable as _runnable
    from evomerge.config.schema import parse_config
    from evomerge.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    data = {
        "name": "arms",
        "base_model": str(tiny_zoo / "base"),
        "models": [str(tiny_zoo / "add"), str(tiny_zoo / "reverse")],
        "method": "dare_ties",
        "search_space": "dare_ties",
        "tasks": {"search": [t.model_dump() for t in SEARCH]},
        "workers": {"count": 0},
        "validation": {"tasks": [{"name": "zoo_add_greedy_val", "subset": 8}]},
        "budget": {"n_trials": 100},  # four rounds: tensor, tensor, rows, distill
    }
    lines = []
    cfg = _runnable(parse_config(data), lines.append)
    assert cfg.refine.arms == ["tensor"] * 4 and any("per-tensor rounds run instead" in line for line in lines)
    assert "no per-row surrogate" in lines[-1]
    with pytest.raises(ConfigError, match="refine.arms rows and distill: method 'dare_ties' has no per-row"):
        _runnable(parse_config({**data, "refine": {"arms": ["rows"]}}), lines.append)
    linear = {**data, "method": "task_arithmetic", "search_space": "task_arithmetic"}
    assert _runnable(parse_config(linear), lines.append).refine.arms == ["tensor", "tensor", "rows", "distill"]
    unguarded = {k: v for k, v in linear.items() if k != "validation"}  # nothing would choose among row points
    assert _runnable(parse_config(unguarded), lines.append).refine.arms == ["tensor"] * 4
    assert "without `validation:`" in lines[-1]
    asked = {**unguarded, "refine": {"arms": ["rows"]}}
    assert _runnable(parse_config(asked), lines.append).refine.arms == ["rows"]  # asked for: it runs
    n = len(lines)
    assert _runnable(parse_config({**unguarded, "budget": {"n_trials": 50}}), lines.append).refine.arms[2] == "rows"
    assert len(lines) == n  # two rounds, both per-tensor: nothing to switch off, no line


def test_a_per_tensor_round_after_a_per_row_one_starts_from_a_trial_without_coefficients(
    tiny_zoo, tmp_path, monkeypatch
):
    from evomerge.run.driver import run_search
    from evomerge.study.record import TrialRecord
    from evomerge.study.storage import load_study
    from evomerge.study.trials import objective_of

    monkeypatch.chdir(tmp_path)
    cfg = _search_config(tiny_zoo, "arms", 10, {"at": [0.2, 0.6], "steps": 4, "every": 2, "arms": ["rows", "tensor"]})
    assert run_search(cfg, progress=False, log=None).n_complete == 10
    trials = load_study(cfg.name, cfg.storage_url).trials
    records = [TrialRecord.from_trial(t) for t in trials]
    rows = [r for r in records if r.refine_round == 0]
    tensor = [t.number for t, r in zip(trials, records) if r.refine_round == 1]
    assert len(rows) == 2 and all(r.refine_arm == "rows" and r.coefficients for r in rows)
    assert len(tensor) == 2 and all(records[n].refine_arm == "tensor" and not records[n].coefficients for n in tensor)
    start = records[tensor[0]].refined_from
    assert records[start].coefficients is None and records[start].refine_round is None
    plain = [t for t in trials[: tensor[0]] if t.state.name == "COMPLETE" and records[t.number].coefficients is None]
    assert objective_of(trials[start]) == max(objective_of(t) for t in plain)  # the best of those


def test_the_row_step_is_smaller_on_a_capped_sample():
    assert row_step(0.05, None, sampled=False) == 0.05
    assert row_step(0.05, None, sampled=True) == pytest.approx(0.05 * SAMPLED_ROW_LR)
    assert row_step(0.05, 0.02, sampled=True) == row_step(0.05, 0.02, sampled=False) == 0.02
