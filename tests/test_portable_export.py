"""Every export is usable both ways: an evomerge-only winner is exported with the best portable trial beside it
(which `mergekit-yaml` reproduces, tensor for tensor), the report, the model card and `evomerge status` show both
held-out scores with the difference and its paired standard error, and `export --portable` swaps the two."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.config.schema import parse_config, write_run_config
from evomerge.merge.recipe import Recipe
from evomerge.study.record import trial_attrs

SEARCH = [{"name": "zoo_add_search", "subset": 20}, {"name": "zoo_reverse_search", "subset": 20}]


def _config(zoo, validation=None):
    data = {
        "name": "pair",
        "base_model": str(zoo / "base"),
        "models": [str(zoo / "add"), str(zoo / "reverse")],
        "method": "task_arithmetic",
        "tasks": {"search": SEARCH, "heldout": ["zoo_add", "zoo_reverse"]},
        "budget": {"n_trials": 5},
        "workers": {"count": 0},  # the report's pool runs in this process
        "portfolio": False,
    }
    if validation:
        data["validation"] = validation
    return parse_config(data)


def _coefficients(zoo, cfg) -> dict[str, str]:
    """A per-row coefficient file (as the rows arm writes one) that moves every layer's MLP rows."""
    from evomerge.config.rundir import RunDir
    from evomerge.merge.coefficients import key, write_coefficients

    weights = load_file(zoo / "add" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    rows = {
        key(i, name): 0.25 + 1.5 * torch.rand(t.shape[0], generator=g)
        for i in range(2)
        for name, t in weights.items()
        if "mlp" in name and t.dim() == 2
    }
    path = (RunDir(cfg.run_dir).coefficients / "rows.safetensors").resolve()
    return {"file": str(path), "sha256": write_coefficients(path, rows)}


def add_trials(study, cfg, zoo, space) -> dict[str, int]:
    """The baselines, a sampled portable recipe and the same recipe with per-row coefficients (evomerge-only), with
    search scores that rank the evomerge-only one first and the sampled one second: {label: trial number}."""
    from evomerge.refine.rows import with_coefficients
    from evomerge.study.samplers import distributions

    dists = distributions(space, cfg.models)
    sampled = {name: 0.8 for name in space.defaults(cfg.models)}
    plan = [(label, params, None, 0.3 if label.model else 0.5) for label, params in space.baselines(cfg.models)]
    plan += [(None, sampled, None, 0.6), (None, sampled, _coefficients(zoo, cfg), 0.8)]
    numbers = {}
    for label, params, coefficients, value in plan:
        recipe = with_coefficients(space.to_recipe(params, cfg.models, cfg.base_model, cfg.method, 0), coefficients)
        attrs = trial_attrs(
            recipe=recipe.to_yaml(),
            scores={t["name"]: {"acc": value} for t in SEARCH},
            objective=value,
            baseline=label,
            coefficients=coefficients,
        )
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value, user_attrs=attrs))
        numbers[str(label) if label else ("rows" if coefficients else "sampled")] = len(study.trials) - 1
    return numbers


@pytest.fixture(scope="module")
def pair_run(tiny_zoo, tmp_path_factory):
    """(run_dir, {label: trial}) of a study whose exported trial is evomerge-only, and its report."""
    from evomerge.candidate.space import space_of
    from evomerge.report import build_report
    from evomerge.study import study as st

    root = tmp_path_factory.mktemp("pair")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cfg = _config(tiny_zoo)
        space = space_of(cfg)
        study = st.open_study(cfg, space, log=None)
        numbers = add_trials(study, cfg, tiny_zoo, space)
        write_run_config(cfg)
        build_report(cfg.run_dir, subset=20, log=None)
    return root / cfg.run_dir, numbers


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    return code, out.getvalue()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_the_report_shows_both_recipes_and_their_paired_difference(pair_run):
    from evomerge.report.compare import Comparison
    from evomerge.report.noise import paired_difference

    run_dir, numbers = pair_run
    c = Comparison.model_validate_json((run_dir / "report" / "comparison.json").read_text())
    assert c.best_trial == numbers["rows"] and c.portable_trial == numbers["sampled"]
    evolved, portable = c.rows_of("evolved")[0], c.rows_of("portable")[0]
    assert portable.name == f"portable (trial {numbers['sampled']})" and evolved.scores != portable.scores
    v = c.verdict()
    assert v.vs_portable == paired_difference(evolved, portable, c.tasks) and v.vs_portable.se > 0
    text = (run_dir / "report" / "report.md").read_text()
    assert f"| portable (trial {numbers['sampled']}) |" in text  # a row of the held-out table ...
    assert f"| portable (trial {numbers['sampled']}) | {v.vs_portable.points().removesuffix(' points')} |" in text
    assert f"the evomerge-only recipe is {v.vs_portable.text()}" in text  # ... and the statement


def test_an_evomerge_only_winner_is_exported_with_the_portable_trial_that_mergekit_reproduces(pair_run, tmp_path):
    run_dir, numbers = pair_run
    code, out = _run(["export", str(run_dir)])
    best = run_dir / "best"
    assert code == 0 and f"beside it, the portable one: trial {numbers['sampled']} " in out
    main_recipe, portable_recipe = Recipe.load(best / "recipe.yaml"), Recipe.load(best / "portable" / "recipe.yaml")
    assert main_recipe.evomerge_only and main_recipe.evomerge.trial == numbers["rows"]
    assert (best / "coefficients.safetensors").is_file()
    assert not portable_recipe.evomerge_only and portable_recipe.evomerge.trial == numbers["sampled"]
    assert not (best / "portable" / "coefficients.safetensors").exists()
    # mergekit-yaml on the portable recipe gives the portable trial's checkpoint, tensor for tensor
    cli = Path(sys.executable).with_name("mergekit-yaml")
    args = ["--no-write-model-card", "--no-copy-tokenizer", "--quiet"]
    subprocess.run([str(cli), str(best / "portable" / "recipe.yaml"), str(tmp_path / "mk"), *args], check=True)
    ours, theirs = _tensors(best / "portable" / "model"), _tensors(tmp_path / "mk")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # and on the evomerge-only one it merges another model (it ignores the coefficients)
    subprocess.run([str(cli), str(best / "recipe.yaml"), str(tmp_path / "mk-rows"), *args], check=True)
    rows = _tensors(best / "model")
    assert any(not torch.equal(rows[k], t) for k, t in _tensors(tmp_path / "mk-rows").items())


def test_the_cards_say_which_recipe_mergekit_reproduces_and_show_both_scores(pair_run):
    from evomerge.report.compare import Comparison

    run_dir, numbers = pair_run
    assert _run(["export", str(run_dir)])[0] == 0
    c = Comparison.model_validate_json((run_dir / "report" / "comparison.json").read_text())
    v = c.verdict()
    main_card = (run_dir / "best" / "model" / "README.md").read_text()
    portable_card = (run_dir / "best" / "portable" / "model" / "README.md").read_text()
    assert "mergekit-yaml recipe.yaml OUT              # not this model: mergekit ignores its per-row" in main_card
    assert "mergekit-yaml recipe.yaml OUT              # the same tensors" in portable_card
    for card in (main_card, portable_card):
        assert "## Evomerge-only and portable recipes" in card
        assert f"Held-out, evomerge-only minus portable: {v.vs_portable.text()}." in card
        assert f"| {numbers['rows']} | `recipe.yaml` | `evomerge merge` only |" in card
        assert f"| {numbers['sampled']} | `portable/recipe.yaml` |" in card
        assert f"{v.evolved.mean:.4f}" in card and f"{v.portable.mean:.4f}" in card
    assert "| **evomerge-only (this one)** |" in main_card and "| **portable (this one)** |" in portable_card
    # each card's held-out table has its own trial as "this merge"
    assert f"| **this merge** | {v.portable.scores[c.tasks[0]]:.4f} |" in portable_card
    assert f"| **this merge** | {v.evolved.scores[c.tasks[0]]:.4f} |" in main_card


def test_status_shows_the_portable_trial_and_both_heldout_means(pair_run):
    from evomerge.report.compare import Comparison
    from evomerge.report.status import status_text

    run_dir, numbers = pair_run
    v = Comparison.model_validate_json((run_dir / "report" / "comparison.json").read_text()).verdict()
    text = status_text(run_dir)
    assert f"exported trial: {numbers['rows']} " in text
    assert f"portable trial: {numbers['sampled']} (objective 0.6000): trial {numbers['rows']} is evomerge-only" in text
    assert (
        f"held-out mean (evomerge report): evomerge-only {v.evolved.mean:.4f}, portable {v.portable.mean:.4f}; "
        f"evomerge-only - portable: {v.vs_portable.text()}"
    ) in text


def test_export_portable_swaps_the_two(pair_run, tmp_path):
    run_dir, numbers = pair_run
    out = tmp_path / "swapped"
    assert _run(["export", str(run_dir), "--portable", "--out", str(out)])[0] == 0
    main_recipe, other = Recipe.load(out / "recipe.yaml"), Recipe.load(out / "evomerge-only" / "recipe.yaml")
    assert not main_recipe.evomerge_only and main_recipe.evomerge.trial == numbers["sampled"]
    assert other.evomerge_only and other.evomerge.trial == numbers["rows"]
    assert not (out / "portable").exists() and not (out / "coefficients.safetensors").exists()
    card = (out / "model" / "README.md").read_text()
    assert "# the same tensors" in card and "| **portable (this one)** |" in card
    assert f"| {numbers['rows']} | `evomerge-only/recipe.yaml` |" in card
    # the evomerge-only recipe in its folder still reproduces its checkpoint (its coefficient file beside it)
    assert _run(["merge", str(out / "evomerge-only" / "recipe.yaml"), "--out", str(tmp_path / "again")])[0] == 0
    a, b = _tensors(out / "evomerge-only" / "model"), _tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_portable_winner_is_exported_alone(pair_run, tmp_path):
    run_dir, numbers = pair_run
    out = tmp_path / "plain"
    code, text = _run(["export", str(run_dir), "--trial", str(numbers["sampled"]), "--portable", "--out", str(out)])
    assert code == 0 and "beside it" not in text
    assert sorted(p.name for p in out.iterdir()) == ["model", "recipe.yaml"]
    card = (out / "model" / "README.md").read_text()
    assert "Evomerge-only and portable" not in card and "# the same tensors" in card


def test_the_guard_validates_the_portable_candidates_and_export_records_it(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.candidate.space import space_of
    from evomerge.study import study as st
    from evomerge.validate import guard

    monkeypatch.chdir(tmp_path)
    cfg = _config(tiny_zoo, {"top_k": 1, "tasks": [{"name": "zoo_add_val", "subset": 20}]})
    space = space_of(cfg)
    study = st.open_study(cfg, space, log=None)
    numbers = add_trials(study, cfg, tiny_zoo, space)
    write_run_config(cfg)
    res = export_trial_quietly(cfg.run_dir)
    results = guard.stored(cfg, study)
    # the finalists (the top trial, evomerge-only, and the baselines) and the top portable trial were validated
    assert set(results) == set(numbers.values())
    exported, portable = guard.exported_trial(cfg, study), guard.portable_trial(cfg, study)
    # on these 20 examples the evomerge-only trial ties the best baseline and wins on its search objective
    assert res.trial == exported.number == numbers["rows"] and not guard.is_portable(exported)
    candidates = [n for n in results if guard.is_portable(study.trials[n])]
    assert portable.number == max(candidates, key=lambda n: (results[n].objective, results[n].search, -n))
    prov = Recipe.load(res.beside.recipe).evomerge
    assert prov.trial == portable.number and prov.extra["validation"]["objective"] == results[portable.number].objective
    # each card says what it was best among
    assert "this one scored best there." in (res.model_dir / "README.md").read_text()
    assert "best there of those that `mergekit-yaml` reproduces" in (res.beside.model_dir / "README.md").read_text()


def export_trial_quietly(run_dir):
    from evomerge.export.export import export_trial

    return export_trial(run_dir, log=None)


# -- the guard's choice, on recorded scores (no scoring) -------------------------------------------------------------

ROWS_FILE = {"file": "/runs/x/coefficients/a.safetensors", "sha256": "0" * 64}


def _recipe(method: str = "task_arithmetic", coefficients: dict | None = None, **parameters: float) -> str:
    data = {"merge_method": method, "base_model": "b", "models": [{"model": "a"}], "parameters": {"weight": 1.0}}
    data["parameters"].update(parameters)
    if coefficients:
        data["evomerge"] = {"coefficients": coefficients}
    return yaml.safe_dump(data)


def test_the_guard_validates_the_top_portable_trials_and_picks_the_best_there(tiny_zoo):
    from evomerge.study.record import write_validation
    from evomerge.validate.guard import Validation, candidates, exported_trial, portable_trial, tasks_key

    cfg = _config(tiny_zoo, {"top_k": 1, "tasks": [{"name": "zoo_add_val"}]})
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    # portable: a baseline and a sampled trial; evomerge-only; a method mergekit lacks; a lower portable one
    rows = [(0.5, _recipe(), {"baseline": "defaults"}), (0.6, _recipe(), {}),
            (0.9, _recipe(coefficients=ROWS_FILE), {"coefficients": ROWS_FILE}),
            (0.7, _recipe("tsv_m"), {}), (0.55, _recipe(), {})]  # fmt: skip
    for value, recipe, attrs in rows:
        user_attrs = trial_attrs(objective=value, recipe=recipe, **attrs)
        study.add_trial(
            optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=value, user_attrs=user_attrs)
        )
    # finalists: the top one (evomerge-only) and the baseline; then the top portable trial by search objective
    assert [t.number for t in candidates(cfg, study)] == [2, 0, 1]
    assert portable_trial(cfg, study).number == 1  # nothing validated yet: the best portable search objective
    for trial, objective in [(2, 0.8), (0, 0.7), (1, 0.4)]:
        v = Validation(trial=trial, search=0, scores={}, objective=objective, key=tasks_key(cfg))
        write_validation(study, trial, v.model_dump(mode="json"))
    assert exported_trial(cfg, study).number == 2 and portable_trial(cfg, study).number == 0  # best on validation
    # a portable winner has no portable trial beside it, and the guard then validates only the finalists
    write_validation(
        study, 0, Validation(trial=0, search=0, scores={}, objective=0.95, key=tasks_key(cfg)).model_dump()
    )
    assert exported_trial(cfg, study).number == 0 and portable_trial(cfg, study) is None
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=0.99,
                                              user_attrs=trial_attrs(objective=0.99, recipe=_recipe())))  # fmt: skip
    assert [t.number for t in candidates(cfg, study)] == [5, 0]


def test_mergekit_methods_are_mergekits_and_the_card_line_marks_sparsifying_ones():
    from mergekit.merge_methods.registry import registered_methods

    from evomerge.merge.portability import MERGEKIT_METHODS, mergekit_line, portable

    assert {m.spec.name for m in registered_methods()} == MERGEKIT_METHODS
    ties = Recipe.from_yaml(_recipe("ties", density=0.5))
    assert portable(ties) and "the same model up to magnitude ties and random masks" in mergekit_line(ties)
    assert mergekit_line(Recipe.from_yaml(_recipe("linear"))) == "# the same tensors"
    rows = Recipe.from_yaml(_recipe(coefficients=ROWS_FILE))
    assert (
        not portable(rows) and mergekit_line(rows) == "# not this model: mergekit ignores its per-row coefficient file"
    )


def test_export_portable_without_a_portable_trial_exits_2_and_writes_nothing(tiny_zoo, tmp_path, monkeypatch):
    from evomerge.candidate.space import space_of
    from evomerge.study import study as st
    from evomerge.study.samplers import distributions

    monkeypatch.chdir(tmp_path)
    cfg = _config(tiny_zoo)
    space = space_of(cfg)
    study = st.open_study(cfg, space, log=None)  # its baselines wait: no portable trial is COMPLETE
    params = space.defaults(cfg.models)
    attrs = trial_attrs(recipe=_recipe(coefficients=ROWS_FILE), objective=0.5, coefficients=ROWS_FILE)
    dists = distributions(space, cfg.models)
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=0.5, user_attrs=attrs))
    write_run_config(cfg)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", str(cfg.run_dir), "--portable"])
    assert code == 2 and "--portable: study 'pair' has no trial that mergekit-yaml reproduces" in err.getvalue()
    assert not (cfg.run_dir / "best").exists()
