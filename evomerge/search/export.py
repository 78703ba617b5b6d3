"""Export a trial: its recipe with provenance, the checkpoint it was scored as, and a model card.

    evomerge export runs/demo                   # best trial -> runs/demo/best/{recipe.yaml,model/}
    evomerge export runs/demo --trial 12 --out /tmp/t12

The checkpoint is the trial's recipe merged by `export_recipe` (same kernels, same per-tensor seeds),
so its weights are the ones the trial was scored with.
"""
from __future__ import annotations

import os
import tempfile
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


def choose_trial(study, number: int | None = None):
    """Trial `number` (must be COMPLETE), or the best one (best weighted mean for multi-objective)."""
    import optuna

    from evomerge.search.study import best_trial

    if number is None:
        best = best_trial(study)
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


def _model_card(cfg: SearchConfig, recipe, trial, objective: float) -> str:
    from evomerge import __version__

    prov = recipe.evomerge
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
    lines += ["", f"Objective (weighted mean): **{objective:.4f}**", "", "## Inputs", "", "| model | sha256 |", "|---|---|"]
    lines += [f"| `{path}` | `{digest}` |" for path, digest in (prov.inputs if prov else {}).items()]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        "evomerge merge recipe.yaml --out OUT       # byte for byte, every method",
        "mergekit-yaml recipe.yaml OUT              # deterministic methods",
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


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def export_trial(
    run_dir: Path | str, out: Path | str | None = None, trial: int | None = None, log: Callable[[str], None] | None = print
) -> ExportResult:
    """Write `OUT/recipe.yaml` and `OUT/model/` (default OUT: `RUN_DIR/best`) for the best or a chosen trial."""
    from evomerge.io.export import export_recipe
    from evomerge.recipe import Recipe
    from evomerge.search.study import load_study, objective_of

    cfg = load_run_config(run_dir)
    study = load_study(cfg.name, cfg.storage_url)
    if study is None:
        raise StudyError(f"{run_dir}: study {cfg.name!r} is not in {cfg.storage_url}; run `evomerge search` first")
    chosen = choose_trial(study, trial)
    objective = objective_of(chosen)
    scores = chosen.user_attrs.get("scores", {})
    recipe = Recipe.from_yaml(chosen.user_attrs["recipe"], source=f"trial {chosen.number} recipe")
    recipe = recipe.with_provenance(
        study=cfg.name,
        trial=chosen.number,
        scores={t.name: scores[t.name][t.metric] for t in cfg.tasks.search if t.name in scores},
        extra={
            "objective": objective,
            "metrics": {t.name: t.metric for t in cfg.tasks.search},
            "task_seed": cfg.seed,
            "sampler": cfg.sampler.name,
            "sampler_seed": cfg.sampler_seed,
            "storage": cfg.storage_url,
        },
    )
    out = Path(out) if out is not None else Path(run_dir) / "best"
    model_dir = out / "model"
    if log:
        log(f"exporting trial {chosen.number} (objective {objective:.4f}) to {out}")
    export_recipe(recipe, model_dir, seed=recipe.seed)
    final = Recipe.load(model_dir / "recipe.yaml")  # with the input sha256 export_recipe recorded
    final.dump(out / "recipe.yaml")
    os.chmod(out / "recipe.yaml", 0o644)  # mkstemp made it owner-only
    _write_atomic(model_dir / "README.md", _model_card(cfg, final, chosen, objective))
    return ExportResult(chosen.number, objective, out / "recipe.yaml", model_dir)


__all__ = ["export_trial", "choose_trial", "ExportResult"]
