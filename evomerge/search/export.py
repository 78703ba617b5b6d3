"""Export a trial: its recipe with provenance, the checkpoint it was scored as, and a model card.

    evomerge export runs/demo                   # best trial -> runs/demo/best/{recipe.yaml,model/}
    evomerge export runs/demo --trial 12 --out /tmp/t12

The checkpoint is the trial's recipe merged by `export_recipe` (same kernels, same per-tensor seeds),
so its weights are the ones the trial was scored with. With `validation:` in the config, the top trials are
first re-scored on the validation tasks and the best there is exported (`evomerge.search.validate`).
OUT is published whole (`atomic_dir`): recipe.yaml, model/ and its README.md model card appear together, so
a killed export leaves the previous complete OUT, never a new model next to a stale or missing recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evomerge.errors import StudyError
from evomerge.search.config import SearchConfig, load_run_config


@dataclass
class ExportResult:
    trial: int
    objective: float
    recipe: Path
    model_dir: Path


def choose_trial(study, number: int | None = None, cfg: SearchConfig | None = None):
    """Trial `number` (must be COMPLETE), or the best one: best validation objective when `cfg` has validation
    results, else best search objective (weighted mean for multi-objective)."""
    import optuna

    from evomerge.search.study import best_trial
    from evomerge.search.validate import chosen_trial

    if number is None:
        best = chosen_trial(cfg, study) if cfg is not None else best_trial(study)
        if best is None:
            raise StudyError(f"study {study.study_name!r} has no COMPLETE trial yet; run `evomerge search` first")
        return best
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise StudyError(f"study {study.study_name!r} has no trial {number} (trials 0-{len(trials) - 1}); see `evomerge status`")
    trial = trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        why = trial.user_attrs.get("fail_reason", "")
        raise StudyError(f"trial {number} is {trial.state.name}{f' ({why})' if why else ''}; pick a COMPLETE trial")
    return trial


def _model_card(cfg: SearchConfig, recipe, trial, objective: float, validation=None) -> str:
    from evomerge import __version__

    scores = trial.user_attrs.get("scores", {})
    lines = [
        f"# {cfg.name}: trial {trial.number}",
        "",
        f"A `{recipe.merge_method}` merge of {len(cfg.models)} model(s) into `{Path(str(cfg.base_model)).name}`, "
        f"found by an evomerge {__version__} search (Optuna `{cfg.sampler.name}` sampler, study `{cfg.name}`).",
        "",
        "## Search scores",
        "",
        "Fixed seeded subsets of the search tasks (never the held-out data).",
        "",
        "| task | metric | weight | score |",
        "|---|---|---|---|",
    ]
    for t in cfg.tasks.search:
        value = scores.get(t.name, {}).get(t.metric)
        lines.append(f"| {t.name} | {t.metric} | {t.weight:g} | {'-' if value is None else f'{value:.4f}'} |")
    lines += ["", f"Objective (weighted mean): **{objective:.4f}**", ""]
    if validation is not None:
        lines += [
            "## Validation scores",
            "",
            f"The top {cfg.validation.top_k} trials by search objective and the default merge were re-scored on "
            "validation sets the search never saw; this one scored best there.",
            "",
            "| task | metric | weight | score |",
            "|---|---|---|---|",
        ]
        for t in cfg.validation.tasks:
            value = validation.scores.get(t.name, {}).get(t.metric)
            lines.append(f"| {t.name} | {t.metric} | {t.weight:g} | {'-' if value is None else f'{value:.4f}'} |")
        lines += ["", f"Validation objective (weighted mean): **{validation.objective:.4f}**", ""]
    lines += ["## Inputs", "", "Their sha256 are in `recipe.yaml` (`evomerge.inputs`).", ""]
    lines += [f"- `{m}`" for m in recipe.input_models()]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        "evomerge merge recipe.yaml --out OUT       # byte for byte, every method (the kernels it records)",
        "mergekit-yaml recipe.yaml OUT              # same tensors for non-sparsifying methods",
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def export_trial(
    run_dir: Path | str, out: Path | str | None = None, trial: int | None = None, log: Callable[[str], None] | None = print,
    kernels: str | None = None,
) -> ExportResult:
    """Write `OUT/recipe.yaml` and `OUT/model/` (default OUT: `RUN_DIR/best`) for the best or a chosen trial.

    The best trial is the best on the validation tasks when the config has `validation:` (the top_k trials
    are scored first, once), else the best search objective. `kernels` replaces the kernel set the trial
    was scored with (its weights then differ from the scored ones for the sparsifying methods).
    """
    import shutil

    from evomerge.io.atomic import atomic_dir
    from evomerge.io.export import export_recipe
    from evomerge.recipe import Recipe
    from evomerge.search.study import load_study, objective_of
    from evomerge.search.validate import stored, validate_top

    cfg = load_run_config(run_dir)
    study = load_study(cfg.name, cfg.storage_url)
    if study is None:
        raise StudyError(f"{run_dir}: study {cfg.name!r} is not in {cfg.storage_url}; run `evomerge search` first")
    if trial is None and cfg.validation is not None:
        choose_trial(study)  # a clear error before validating an empty study
        validate_top(cfg, study, log=log)
    chosen = choose_trial(study, trial, cfg)
    objective = objective_of(chosen)
    validation = stored(cfg, study).get(chosen.number)
    scores = chosen.user_attrs.get("scores", {})
    extra = {
        "objective": objective,
        "metrics": {t.name: t.metric for t in cfg.tasks.search},
        "task_seed": cfg.seed,
        "sampler": cfg.sampler.name,
        "sampler_seed": cfg.sampler_seed,
        "storage": cfg.storage_url,
    }
    if validation is not None:
        extra["validation"] = {
            "scores": validation.task_scores(cfg),
            "objective": validation.objective,
            "metrics": {t.name: t.metric for t in cfg.validation.tasks},
            "top_k": cfg.validation.top_k,
        }
    recipe = Recipe.from_yaml(chosen.user_attrs["recipe"], source=f"trial {chosen.number} recipe")
    if kernels is not None:
        recipe = recipe.with_provenance(kernels=kernels)
    recipe = recipe.with_provenance(
        study=cfg.name,
        trial=chosen.number,
        scores={t.name: scores[t.name][t.metric] for t in cfg.tasks.search if t.name in scores},
        extra=extra,
    )
    out = Path(out) if out is not None else Path(run_dir) / "best"
    if log:
        how = f", validation {validation.objective:.4f}" if validation is not None else ""
        log(f"exporting trial {chosen.number} (objective {objective:.4f}{how}) to {out}")
    card = _model_card(cfg, recipe, chosen, objective, validation)
    with atomic_dir(out) as tmp:  # recipe.yaml, model/ and its card are published together
        export_recipe(recipe, tmp / "model", seed=recipe.seed, extra_files={"README.md": card})
        shutil.copyfile(tmp / "model" / "recipe.yaml", tmp / "recipe.yaml")  # with the inputs' and outputs' sha256
    return ExportResult(chosen.number, objective, out / "recipe.yaml", out / "model")


__all__ = ["export_trial", "choose_trial", "ExportResult"]
