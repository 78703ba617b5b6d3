"""The overfitting guard: re-score the top trials on larger validation sets before export, export the best there.

    validation:                  # in the search config
      top_k: 3
      tasks: [{name: zoo_add_val, subset: 200}, {name: zoo_reverse_val, subset: 200}]

    from evomerge.search.validate import validate_top, chosen_trial
    validate_top(cfg, study)     # scores the top_k trials (by search objective) not scored yet
    chosen_trial(cfg, study)     # what `evomerge export` and `evomerge report` take: best validation objective

A sampler that ran for long on small search subsets finds recipes that fit those subsets' noise; a
second, larger sample the sampler never saw ranks the finalists honestly. The finalists always include
the default merge, so a search that found nothing better exports the defaults rather than its luckiest
trial. Results live in the study (user attr `validation:<trial>`, keyed by the validation tasks), so they
are computed once per trial and a changed `validation.tasks` re-scores. Export records them in the
recipe's provenance.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from evomerge.search.config import SearchConfig

PREFIX = "validation:"


class Validation(BaseModel):
    """One trial's validation scores ({task: {metric: value}}) and their weighted mean."""

    model_config = ConfigDict(frozen=True)

    trial: int
    search: float  # the trial's search objective, for comparison
    scores: dict[str, dict[str, float]]
    objective: float
    key: str  # which validation tasks (and subset seed) produced it

    def task_scores(self, cfg: SearchConfig) -> dict[str, float]:
        """{task: value of its metric}, as the provenance and the report show them."""
        return {t.name: self.scores[t.name][t.metric] for t in cfg.validation.tasks if t.name in self.scores}


def tasks_key(cfg: SearchConfig) -> str:
    tasks = [t.model_dump(mode="json") for t in cfg.validation.tasks] if cfg.validation else []
    text = json.dumps({"tasks": tasks, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stored(cfg: SearchConfig, study) -> dict[int, Validation]:
    """Validation results recorded in the study for the config's current validation tasks."""
    if cfg.validation is None:
        return {}
    key = tasks_key(cfg)
    out = {}
    for name, value in study.user_attrs.items():
        if name.startswith(PREFIX) and isinstance(value, dict) and value.get("key") == key:
            v = Validation.model_validate(value)
            out[v.trial] = v
    return out


def finalists(cfg: SearchConfig, study) -> list:
    """The candidates for validation: the top_k COMPLETE trials by search objective (best first), then the
    enqueued default merge if it is not among them, so export never takes a searched recipe that
    validation ranks below the defaults (on noisy search subsets the top trials often are)."""
    from evomerge.search.space import DEFAULTS_LABEL
    from evomerge.search.study import complete_trials, objective_of

    k = cfg.validation.top_k if cfg.validation else 1
    ranked = sorted(complete_trials(study), key=lambda t: (-objective_of(t), t.number))
    top = ranked[:k]
    if cfg.validation is not None:
        top += [t for t in ranked[k:] if t.user_attrs.get("baseline") == DEFAULTS_LABEL][:1]
    return top


class _Bench:
    """One resident model and one scorer for the validation tasks, built on first use."""

    def __init__(self, cfg: SearchConfig):
        from evomerge.merge.materialize import Materializer
        from evomerge.offline import go_offline
        from evomerge.scoring import Scorer, TaskSpec

        go_offline()
        tasks = [TaskSpec(**t.model_dump()) for t in cfg.validation.tasks]
        self.scorer = Scorer(tasks, [str(p) for p in cfg.tasks.include_paths], seed=cfg.seed)
        self.materializer = Materializer([str(m) for m in cfg.models], str(cfg.base_model), dtype=cfg.dtype)

    def __call__(self, recipe_yaml: str) -> tuple[dict[str, dict[str, float]], float]:
        from evomerge.recipe import Recipe

        self.materializer.apply(Recipe.from_yaml(recipe_yaml, source="trial recipe"))
        scores = self.scorer.score(self.materializer.model, self.materializer.tokenizer)
        return scores, float(self.scorer.objective(scores))


def validate_top(
    cfg: SearchConfig,
    study,
    *,
    log: Callable[[str], None] | None = print,
    score: Callable[[str], tuple[dict[str, dict[str, float]], float]] | None = None,
) -> dict[int, Validation]:
    """Score the finalists that have no validation result yet; {trial: Validation} of all finalists.

    `score(recipe_yaml) -> (scores, objective)` replaces the in-process scorer (tests).
    """
    from evomerge.search.study import objective_of

    if cfg.validation is None:
        return {}
    done = stored(cfg, study)
    todo = [t for t in finalists(cfg, study) if t.number not in done]
    if todo and log:
        log(f"validating the top {cfg.validation.top_k} trials on {', '.join(t.name for t in cfg.validation.tasks)}")
    by_recipe: dict[str, tuple[dict[str, dict[str, float]], float]] = {}
    for t in todo:
        text = t.user_attrs["recipe"]
        if text not in by_recipe:
            score = score or _Bench(cfg)
            by_recipe[text] = score(text)
        scores, objective = by_recipe[text]
        v = Validation(trial=t.number, search=objective_of(t), scores=scores, objective=objective, key=tasks_key(cfg))
        study.set_user_attr(f"{PREFIX}{t.number}", v.model_dump(mode="json"))
        done[t.number] = v
        if log:
            log(f"  trial {t.number}: search {v.search:.4f}, validation {v.objective:.4f}")
    return {t.number: done[t.number] for t in finalists(cfg, study)}


def chosen_trial(cfg: SearchConfig, study) -> Any:
    """The trial export takes: the best validation objective among the validated finalists (ties: the better
    search objective, then the earlier trial); without validation results, the best search objective."""
    from evomerge.search.study import best_trial, objective_of

    results = stored(cfg, study)
    trials = {t.number: t for t in finalists(cfg, study) if t.number in results}
    if not trials:
        return best_trial(study)
    number = max(trials, key=lambda n: (results[n].objective, objective_of(trials[n]), -n))
    return trials[number]


__all__ = ["Validation", "chosen_trial", "finalists", "stored", "tasks_key", "validate_top"]
