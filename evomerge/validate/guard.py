"""The overfitting guard: re-score the top trials on larger validation sets before export, export the best there.

    validation:                  # in the search config
      top_k: 3
      tasks: [{name: zoo_add_val, subset: 200}, {name: zoo_reverse_val, subset: 200}]

    from evomerge.validate.guard import validate_top, exported_trial
    validate_top(cfg, study)     # scores the top_k trials (by search objective) not scored yet
    exported_trial(cfg, study)   # THE exported trial: what export, status and report (table and figure) show

A sampler that ran for long on small search subsets finds recipes that fit those subsets' noise; a second, larger
sample the sampler never saw ranks the finalists honestly. The finalists always include every baseline (the default
merge, each source alone, every other method's default merge), so a search that found nothing better exports the
best of those rather than its luckiest trial. Results live in the study (user attr `validation:<trial>`, keyed by
the validation tasks), so they are computed once per trial and a changed `validation.tasks` re-scores. The
finalists are scored through the search's kind of pool (`run.pool.open_pool`: Ray actors on the workers'
devices, or in this process when `workers.count` is 0). Export records the results in the recipe's provenance.

The finalists are scored best search objective first and, with `validation.early_stop` (on by default, with the
search's `early_stop` stages and z), in stages against the best finalist validated whole so far: one clearly worse
stops after a slice of the validation splits and keeps the paired estimate (`Validation.stopped`), so it can never
be exported. On a real model most finalists are default merges and sources far below the search's best, and the
guard's time falls with them; the finalist exported is the one a guard that scores everything whole exports, up to
the test's error rate (z = 2: about 2% for a finalist that in truth is as good as the best).

When a finalist is evomerge-only (per-row coefficients, or a method mergekit lacks), the guard also validates the
top_k portable trials (`evomerge.merge.portability`: plain mergekit YAML), so `portable_trial` (the best portable
trial, exported beside an evomerge-only winner) is chosen the same way as the exported one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict

from evomerge.study.record import StudyRecord, TrialRecord, write_validation
from evomerge.study.trials import best_trial, complete_trials, objective_of, ranked

if TYPE_CHECKING:
    from evomerge.config.schema import SearchConfig
    from evomerge.run.pool import Pool
    from evomerge.study.record import AnyTrial, FrozenTrial, Study


class Validation(BaseModel):
    """One trial's validation scores ({task: {metric: value}}) and their weighted mean."""

    model_config = ConfigDict(frozen=True)

    trial: int
    search: float  # the trial's search objective, for comparison
    scores: dict[str, dict[str, float]]
    objective: float  # exact when scored whole; for a finalist stopped early, the paired estimate
    key: str  # which validation tasks (and subset seed) produced it
    stopped: bool = False  # staged (validation.early_stop): clearly worse than a finalist validated whole
    n_examples: int = 0  # validation examples scored (staged scoring; 0: scored whole, count not kept)
    units: dict[str, dict[int, float]] | None = None  # per-example values of a whole staged score: an incumbent

    def task_scores(self, cfg: SearchConfig) -> dict[str, float]:
        """{task: value of its metric}, as the provenance and the report show them."""
        tasks = cfg.validation.tasks if cfg.validation is not None else []
        return {t.name: self.scores[t.name][t.metric] for t in tasks if t.name in self.scores}


def tasks_key(cfg: SearchConfig) -> str:
    tasks = [t.model_dump(mode="json") for t in cfg.validation.tasks] if cfg.validation else []
    text = json.dumps({"tasks": tasks, "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stored(cfg: SearchConfig, study: Study) -> dict[int, Validation]:
    """Validation results recorded in the study for the config's current validation tasks."""
    if cfg.validation is None:
        return {}
    key = tasks_key(cfg)
    out = {}
    for value in StudyRecord.from_study(study).validation.values():
        if value.get("key") == key:
            v = Validation.model_validate(value)
            out[v.trial] = v
    return out


def finalists(cfg: SearchConfig, study: Study) -> list:
    """The candidates for validation: the top_k COMPLETE trials by search objective (best first), then every
    baseline not among them (the method's default merge, each source model alone, and every other method's
    default merge from the portfolio), so export never takes a searched recipe that validation ranks below a
    default merge or a single source (on noisy search subsets the top trials often are); then every point of the
    gradient refinement not among them: it was trained on the search examples, so its search objective ranks the
    longest-trained points first, and validation chooses where along the path to stop."""
    k = cfg.validation.top_k if cfg.validation else 1
    order = ranked(complete_trials(study))
    top = order[:k]
    if cfg.validation is not None:
        labels = {TrialRecord.from_trial(t).baseline for t in top} - {None}
        for t in order[k:]:
            label = TrialRecord.from_trial(t).baseline
            if label is not None and label not in labels:
                labels.add(label)
                top.append(t)
        chosen = {t.number for t in top}
        top += [t for t in order if t.number not in chosen and TrialRecord.from_trial(t).refine_round is not None]
    return top


def validate_top(
    cfg: SearchConfig, study: Study, *, log: Callable[[str], None] | None = print, pool: Pool | None = None
) -> dict[int, Validation]:
    """Score the finalists that have no validation result yet; {trial: Validation} of all finalists.

    `pool` (with a "validation" task set) is used when given; otherwise one is opened for the config's
    workers, only if something needs scoring, and closed again.
    """
    from evomerge.run.pool import open_pool, run_jobs

    if cfg.validation is None:
        return {}
    done = stored(cfg, study)
    every = candidates(cfg, study)
    todo = ranked([t for t in every if t.number not in done])  # likely incumbents first
    if todo:
        if log:
            log(f"validating {_kinds(todo)} on {', '.join(t.name for t in cfg.validation.tasks)}")
        own = pool is None
        pool = pool or open_pool(cfg, {"validation": cfg.validation.tasks})
        try:
            jobs = [(cast(str, TrialRecord.from_trial(t).recipe), "validation") for t in todo]  # candidates have one
            options = _staging(cfg, done, todo, {t.number for t in every if is_portable(t)})
            for i, res in run_jobs(pool, jobs, [f"validating trial {t.number}" for t in todo], per_example=options):
                t = todo[i]
                v = Validation(
                    trial=t.number,
                    search=objective_of(t),
                    scores=res.scores,
                    objective=res.objective,
                    key=tasks_key(cfg),
                    stopped=res.stopped,
                    n_examples=res.n_examples,
                    units=res.examples if options is not None and not res.stopped else None,
                )
                write_validation(study, t.number, v.model_dump(mode="json"))
                done[t.number] = v
                if log:
                    how = f" (stopped after {v.n_examples} examples: clearly worse)" if v.stopped else ""
                    log(f"  trial {t.number}: search {v.search:.4f}, validation {v.objective:.4f}{how}")
        finally:
            if own:
                pool.close()
    return {t.number: done[t.number] for t in every}


def _staging(
    cfg: SearchConfig, done: dict[int, Validation], todo: list, portable: set[int]
) -> Callable[[int], dict[str, Any] | None] | None:
    """The guard's staged evaluation (`validation.early_stop`, with the search's `early_stop` stages and z): each
    finalist is scored in stages against the best finalist validated whole so far (`done`, which grows as results
    come in) and stops when clearly worse; a portable finalist against the best portable one, so the best portable
    trial (exported beside an evomerge-only winner) is always scored whole too. None: every finalist whole."""
    if cfg.validation is None or not cfg.validation.early_stop or cfg.early_stop is None:
        return None
    stages, z = cfg.early_stop.stages, cfg.early_stop.z

    def options(i: int) -> dict[str, Any]:
        among = [v for v in done.values() if v.units and not v.stopped]
        if todo[i].number in portable:
            among = [v for v in among if v.trial in portable]
        out: dict[str, Any] = {"seed": cfg.seed}
        if among:
            best = max(among, key=lambda v: v.objective)
            out.update(stages=stages, z=z, incumbent=best.units, incumbent_objective=best.objective)
        return out

    return options


def _kinds(trials: list) -> str:
    """'9 finalists (3 top trials, 6 baselines and default merges)': what the guard is about to score, and why."""
    records = [TrialRecord.from_trial(t) for t in trials]
    baselines = sum(r.baseline is not None for r in records)
    refined = sum(r.baseline is None and r.refine_round is not None for r in records)
    parts = [
        (len(records) - baselines - refined, "top trial", "top trials"),
        (baselines, "baseline", "baselines and default merges"),
        (refined, "refinement point", "refinement points"),
    ]
    said = ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in parts if n)
    return f"{len(records)} finalist{'s' * (len(records) != 1)} ({said})"


def pending(cfg: SearchConfig, study: Study) -> list[int]:
    """Finalists the guard has not scored yet (`validate_top` scores them; until then export would wait)."""
    if cfg.validation is None:
        return []
    done = stored(cfg, study)
    return [t.number for t in candidates(cfg, study) if t.number not in done]


def exported_trial(cfg: SearchConfig, study: Study) -> Any:
    """THE exported trial, used by export, status and report alike: the best validation objective among the
    validated finalists scored whole (ties: the better search objective, then the earlier trial; a finalist the
    staged guard stopped early is clearly worse than one scored whole, so never taken); without validation
    results, the best search objective (for multi-objective studies, the best weighted mean). None when the
    study has no COMPLETE trial. Call `validate_top` first for the guard's pick."""
    results = stored(cfg, study)
    trials = {t.number: t for t in finalists(cfg, study) if t.number in results}
    if not trials:
        return best_trial(study)
    number = max(trials, key=lambda n: (not results[n].stopped, results[n].objective, objective_of(trials[n]), -n))
    return trials[number]


def is_portable(trial: AnyTrial) -> bool:
    """Whether `mergekit-yaml` reproduces this trial's recipe (no coefficient file, a method mergekit has)."""
    from evomerge.merge.portability import portable_text

    record = TrialRecord.from_trial(trial)
    return record.coefficients is None and portable_text(record.recipe)


def candidates(cfg: SearchConfig, study: Study) -> list:
    """What the guard validates: the finalists, then, when one of them is evomerge-only (so may be exported), the
    top_k portable trials by search objective not among them (so the best portable trial is chosen on validation
    too, among them and the portable finalists)."""
    top = finalists(cfg, study)
    if cfg.validation is None or all(is_portable(t) for t in top):
        return top
    chosen = {t.number for t in top}
    portable = [t for t in ranked(complete_trials(study)) if is_portable(t)][: cfg.validation.top_k]
    return top + [t for t in portable if t.number not in chosen]


def portable_trial(cfg: SearchConfig, study: Study, exported: FrozenTrial | None = None) -> Any:
    """The best portable trial, exported beside `exported` (default: `exported_trial`) when that one is
    evomerge-only: the best validation objective among the validated portable candidates (ties as
    `exported_trial`), else the best portable search objective. None when `exported` is portable (or there is none)
    or no trial is portable."""
    exported = exported if exported is not None else exported_trial(cfg, study)
    if exported is None or is_portable(exported):
        return None
    results = stored(cfg, study)
    validated = {t.number: t for t in candidates(cfg, study) if t.number in results and is_portable(t)}
    if validated:
        number = max(
            validated, key=lambda n: (not results[n].stopped, results[n].objective, objective_of(validated[n]), -n)
        )
        return validated[number]
    return next((t for t in ranked(complete_trials(study)) if is_portable(t)), None)


__all__ = [
    "Validation",
    "candidates",
    "exported_trial",
    "finalists",
    "is_portable",
    "pending",
    "portable_trial",
    "stored",
    "tasks_key",
    "validate_top",
]
