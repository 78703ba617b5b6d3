"""The overfitting guard: when the search subsets mislead, validation changes the exported trial, and export,
status and report (table and figure) all name that trial; export is atomic."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from evomerge.candidate.evaluator import Evaluator, alone
from evomerge.candidate.space import space_of
from evomerge.config.schema import parse_config, write_run_config
from evomerge.export.export import export_trial
from evomerge.io.verify import verify_checkpoint
from evomerge.merge.recipe import Recipe
from evomerge.study import study as st
from evomerge.study.samplers import distributions
from evomerge.study.storage import load_study
from evomerge.study.trials import best_trial, complete_trials
from evomerge.validate import guard as val

TASKS = Path(__file__).resolve().parents[1] / "eval_tasks" / "zoo"
SEARCH = [{"name": "zoo_add_search", "subset": 20}, {"name": "zoo_reverse_search", "subset": 20}]
VALIDATION = {"top_k": 3, "tasks": [{"name": "zoo_add_val"}, {"name": "zoo_reverse_val"}]}


def guard_config(zoo, validation=None, name="guard", include=()):
    data = {
        "name": name,
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "search_space": {
            "methods": ["task_arithmetic"],
            "parameters": {"weight": {"low": 0.0, "high": 1.0, "default": 0.5}},
        },
        "tasks": {"search": SEARCH, "heldout": ["zoo_add", "zoo_reverse"], "include_paths": [str(p) for p in include]},
        "budget": {"n_trials": 3},
        "workers": {"count": 0},  # the guard's pool runs in this process
    }
    if validation:
        data["validation"] = validation
    return parse_config(data)


def validation_evaluator(cfg) -> Evaluator:
    """An evaluator of its own for the validation tasks: the truth the guard's pool must reproduce."""
    return Evaluator.for_config(cfg, {"validation": cfg.validation.tasks})


def test_validation_overrides_a_misleading_search_score_and_export_stays_whole(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain, guarded = guard_config(tiny_zoo), guard_config(tiny_zoo, VALIDATION)
    assert plain.study_hash() == guarded.study_hash()  # validation is a runtime setting: same study
    space = space_of(plain)
    dists = distributions(space, plain.models)
    study = st.open_study(plain, space, log=None)

    # three real recipes; their true validation objectives, then search scores that rank the worst one first
    bench = validation_evaluator(guarded)
    recipes = [
        (label, p, space.to_recipe(p, plain.models, plain.base_model, plain.method, 0).to_yaml())
        for label, p in space.baselines(plain.models)
    ]
    truth = [bench.evaluate(text, "validation").objective for _, _, text in recipes]
    assert max(truth) > min(truth), "the three recipes score alike on validation; the test needs a difference"
    worst = truth.index(min(truth))
    search = [0.4, 0.5, 0.6]
    search[worst] = 0.9  # e.g. a tiny search subset that happens to favour it
    for (label, params, text), value in zip(recipes, search):
        scores = {t["name"]: {"acc": value} for t in SEARCH}
        attrs = {"recipe": text, "scores": scores, "objective": value, "baseline": label}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value, user_attrs=attrs))
    numbers = [t.number for t in complete_trials(study)]

    # without the guard: the best search objective, i.e. the worst recipe
    write_run_config(plain)
    first = export_trial(plain.run_dir, log=None)
    assert first.trial == numbers[worst] and first.objective == 0.9
    assert Recipe.load(first.recipe).evomerge.extra.get("validation") is None

    # with the guard: the top 3 are re-scored on the validation tasks, the best there is exported
    write_run_config(guarded)
    second = export_trial(guarded.run_dir, log=None)
    results = val.stored(guarded, load_study("guard", guarded.storage_url))
    assert sorted(results) == sorted(numbers)
    assert [results[n].objective for n in numbers] == pytest.approx(truth)  # recorded in the study
    assert second.trial != numbers[worst] and results[second.trial].objective == max(truth)
    prov = Recipe.load(second.recipe).evomerge
    assert prov.trial == second.trial and prov.extra["validation"]["objective"] == pytest.approx(max(truth))
    assert set(prov.extra["validation"]["scores"]) == {"zoo_add_val", "zoo_reverse_val"}
    card = (second.model_dir / "README.md").read_text()
    assert f"trial {second.trial}" in card and "## Validation scores" in card and f"{max(truth):.4f}" in card
    # the card is part of the atomic output (recorded and verified); best/recipe.yaml is model/recipe.yaml
    assert "README.md" in dict(verify_checkpoint(second.model_dir))
    assert second.recipe.read_text() == (second.model_dir / "recipe.yaml").read_text()

    # cached: exporting again scores nothing
    class NoScoring:
        def submit(self, *job):
            raise AssertionError("validated twice")

    assert val.validate_top(guarded, study, log=None, pool=NoScoring()).keys() == results.keys()

    # one exported trial: status and the report (its table, its evolved row and its recipe figure) name it too
    from evomerge.report import build_report
    from evomerge.report.status import status_text

    assert second.trial != best_trial(study).number, "the guard's pick must differ from the best search score"
    assert f"exported trial: {second.trial} " in status_text(guarded.run_dir)
    report = build_report(guarded.run_dir, subset=20, log=None)
    assert report.comparison.best_trial == second.trial
    assert f"trial {second.trial}" in report.comparison.row("evolved (best trial)").detail
    assert report.comparison.trials[0].number == numbers[worst] and report.comparison.trials[
        0
    ].validation == pytest.approx(min(truth))
    text = report.report.read_text()
    assert f"### Best recipe parameters (trial {second.trial})" in text and f"best trial {second.trial}." in text
    write_run_config(plain)  # without the guard: the best search score, everywhere
    assert f"exported trial: {numbers[worst]} " in status_text(plain.run_dir)

    # a killed export (here: interrupted mid-merge) leaves the previous complete best/, card and recipe alike
    import evomerge.export.export as io_export

    def killed(recipe, out_dir, **kwargs):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(io_export, "export_recipe", killed)
    with pytest.raises(KeyboardInterrupt):
        export_trial(plain.run_dir, trial=numbers[worst], log=None)
    assert Recipe.load(second.recipe).evomerge.trial == second.trial
    assert f"trial {second.trial}" in (second.model_dir / "README.md").read_text()
    assert [p.name for p in plain.run_dir.iterdir() if p.name.startswith(".best")] == []


def test_report_shows_search_validation_and_heldout_side_by_side():
    from evomerge.report.compare import Comparison, Row, TrialRow
    from evomerge.report.markdown import render

    rows = [
        Row(name="base", kind="source", scores={"zoo_add": 0.2}, mean=0.2),
        Row(name="routing oracle", kind="oracle", scores={"zoo_add": 0.2}, mean=0.2),
        Row(name="evolved (best trial)", kind="evolved", scores={"zoo_add": 0.3}, mean=0.3),
    ]
    trials = [
        TrialRow(number=7, search=0.9, heldout={"zoo_add": 0.1}, heldout_mean=0.1, validation=0.15),
        TrialRow(number=3, search=0.5, heldout={"zoo_add": 0.3}, heldout_mean=0.3, validation=0.35),
    ]
    c = Comparison(
        study="s",
        method="ties",
        sampler="cmaes",
        run_dir="r",
        n_complete=9,
        multi_objective=False,
        tasks=["zoo_add"],
        metrics={"zoo_add": "acc"},
        subset=None,
        rows=rows,
        trials=trials,
        best_trial=3,
    )
    text = render(c, {})
    assert "| trial | note | search objective | validation objective | held-out zoo_add |" in text
    assert "| 7 | - | 0.9000 | 0.1500 | 0.1000 |" in text and "| 3 | - | 0.5000 | 0.3500 | 0.3000 |" in text


def test_guard_exports_the_defaults_when_no_searched_trial_beats_them_on_validation(tmp_path, tiny_zoo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = guard_config(tiny_zoo, {**VALIDATION, "top_k": 1})
    space = space_of(cfg)
    dists = distributions(space, cfg.models)
    study = st.open_study(cfg, space, log=None)
    bench = validation_evaluator(cfg)
    recipes = [
        (label, p, space.to_recipe(p, cfg.models, cfg.base_model, cfg.method, 0).to_yaml())
        for label, p in space.baselines(cfg.models)
    ]
    truth = {label: bench.evaluate(text, "validation").objective for label, _, text in recipes}
    searched = min((label for label in truth if label != "defaults"), key=truth.get)
    assert truth["defaults"] > truth[searched], f"the default merge must beat a specialist alone on validation: {truth}"
    # the search ranks that worse recipe first and the defaults last: top_k=1 alone would validate only it
    search = {label: (0.9 if label == searched else 0.1 if label == "defaults" else 0.5) for label in truth}
    for label, params, text in recipes:
        value = search[label]
        attrs = {
            "recipe": text,
            "scores": {t["name"]: {"acc": value} for t in SEARCH},
            "objective": value,
            "baseline": label,
        }
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value, user_attrs=attrs))
    number = {t.user_attrs["baseline"]: t.number for t in complete_trials(study)}

    other = next(label for label in truth if label not in ("defaults", searched))
    # every baseline is a finalist, in search order after the top_k
    assert [t.number for t in val.finalists(cfg, study)] == [number[searched], number[other], number["defaults"]]
    write_run_config(cfg)
    out = export_trial(cfg.run_dir, log=None)
    best = max(truth, key=truth.get)
    assert best != searched and out.trial == number[best]
    assert Recipe.load(out.recipe).evomerge.extra["validation"]["objective"] == pytest.approx(truth[best])
    # without validation the defaults are not a finalist: the guard, not the ranking, brought them in
    assert [t.number for t in val.finalists(guard_config(tiny_zoo), study)] == [number[searched]]


def the_base_right(cfg, out: Path) -> dict:
    """Validation tasks of the examples the base answers right (zoo_add_val and zoo_reverse_val kept where the
    base's choice is the answer), written under `out`: the base scores 1 there and a broken merge near chance, a
    gap the tiny zoo's near-chance specialists do not give."""
    bench = validation_evaluator(cfg)
    right = bench.evaluate(alone(cfg.base_model, bench.inputs), "validation", examples=True).examples
    (out / "data").mkdir(parents=True)
    tasks = []
    for leaf, split in (("zoo_add_val", "add"), ("zoo_reverse_val", "reverse")):
        lines = (TASKS / "data" / f"{split}_validation.jsonl").read_text().splitlines()
        kept = [line for i, line in enumerate(lines) if right[leaf].get(i) == 1]
        (out / "data" / f"{split}.jsonl").write_text("\n".join(kept) + "\n")
        text = (TASKS / f"{leaf}.yaml").read_text().replace(f"task: {leaf}", f"task: right_{split}")
        (out / f"right_{split}.yaml").write_text(text.replace(f"data/{split}_validation.jsonl", f"data/{split}.jsonl"))
        tasks.append({"name": f"right_{split}"})
    return {"top_k": 3, "tasks": tasks}


def test_the_staged_guard_stops_a_clearly_worse_finalist_and_exports_the_same_trial(tmp_path, tiny_zoo, monkeypatch):
    """validation.early_stop (on by default): finalists are validated best search objective first, each in stages
    against the best one validated whole so far; one clearly worse stops early with a paired estimate below it.
    The whole ones keep their exact objectives and the exported trial is the one a whole guard exports."""
    monkeypatch.chdir(tmp_path)
    validation = the_base_right(guard_config(tiny_zoo, VALIDATION), tmp_path / "tasks")
    whole = guard_config(tiny_zoo, {**validation, "early_stop": False}, "whole", [tmp_path / "tasks"])
    staged = guard_config(tiny_zoo, validation, "staged", [tmp_path / "tasks"])
    space = space_of(whole)
    dists = distributions(space, whole.models)
    defaults = dict(space.baselines(whole.models))["defaults"]
    merged = space.to_recipe(defaults, whole.models, whole.base_model, whole.method, 0).to_yaml()
    assert "weight: 0.5" in merged
    recipes = {  # label: (search objective, recipe): the search ranks the base first, a broken merge last
        "base": (0.6, alone(whole.base_model, [whole.base_model, *whole.models]).to_yaml()),
        "defaults": (0.5, merged),
        "broken": (0.2, merged.replace("weight: 0.5", "weight: 6.0")),
    }
    truth = {
        label: validation_evaluator(whole).evaluate(text, "validation").objective
        for label, (_, text) in recipes.items()
    }
    assert truth["base"] == 1.0 and truth["broken"] < 0.5, truth
    results, exported, lines = {}, {}, []
    for cfg in (whole, staged):
        study = st.open_study(cfg, space, log=None)
        for label, (value, text) in recipes.items():
            scores = {t["name"]: {"acc": value} for t in SEARCH}
            attrs = {"recipe": text, "scores": scores, "objective": value, "baseline": label}
            study.add_trial(
                optuna.trial.create_trial(params=defaults, distributions=dists, value=value, user_attrs=attrs)
            )
        done = val.validate_top(cfg, study, log=lines.append)
        results[cfg.name] = {study.trials[n].user_attrs["baseline"]: v for n, v in done.items()}
        exported[cfg.name] = val.exported_trial(cfg, study).user_attrs["baseline"]
    assert not any(v.stopped for v in results["whole"].values())
    assert {k: v.objective for k, v in results["whole"].items()} == pytest.approx(truth)
    broken, base = results["staged"]["broken"], results["staged"]["base"]
    assert not base.stopped and base.units is not None and base.objective == 1.0
    assert broken.stopped and 0 < broken.n_examples < base.n_examples, (broken, base)
    assert broken.objective < 1.0 and any("stopped after" in line for line in lines)
    for label, v in results["staged"].items():
        if not v.stopped:
            assert v.objective == pytest.approx(truth[label])
    assert exported["staged"] == exported["whole"] == "base"


def test_a_portfolio_list_scores_only_the_default_merges_it_names(tmp_path, tiny_zoo, monkeypatch):
    """`portfolio: [ties]`: the search adds that one default merge (besides its own baselines), and its run config
    records the list."""
    from evomerge.config.schema import load_config
    from evomerge.run.driver import run_search
    from evomerge.study.record import TrialRecord

    monkeypatch.chdir(tmp_path)
    cfg = guard_config(tiny_zoo).model_copy(update={"portfolio": ["ties"], "refine": None})
    run_search(cfg, progress=False, log=None)
    study = load_study("guard", cfg.storage_url)
    added = [TrialRecord.from_trial(t) for t in complete_trials(study) if TrialRecord.from_trial(t).portfolio]
    assert [r.baseline.method for r in added] == ["ties"]
    assert load_config(cfg.run_dir / "config.yaml").portfolio == ["ties"]
