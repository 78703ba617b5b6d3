"""The held-out comparison: sources, default merges, the routing oracle and the searched recipes, scored alike.

    from evomerge.report.compare import compare_run
    comparison = compare_run("runs/demo")          # Comparison: rows (model -> per-task held-out score), top trials

Every row is a recipe scored by the candidate evaluator on the "heldout" task set, through the search's kind
of pool (`run.pool`: Ray actors on the workers' devices, or in this process when `workers.count` is 0),
nothing written to disk: a source model is `evaluator.alone` (its exact weights), a default merge its
method's space defaults, a trial its recorded recipe. The oracle row is computed from the source rows, never
scored. The evolved row is THE exported trial (`validate.guard.exported_trial`), validated first when the config
has `validation:`, so report, export and status name the same trial. When it is evomerge-only, the portable row
is the best trial `mergekit-yaml` reproduces (`validate.guard.portable_trial`), the one export writes beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from evomerge.config.rundir import RunDir
from evomerge.errors import ConfigError, StudyError
from evomerge.report.noise import Difference, paired_difference
from evomerge.study.record import TrialRecord
from evomerge.tables import text_table

Kind = Literal["source", "default", "oracle", "evolved", "portable"]


class Row(BaseModel):
    """One compared model: its held-out score per task (the task's metric) and their unweighted mean."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: Kind
    scores: dict[str, float]
    mean: float
    detail: str = ""
    examples: dict[str, list[float]] = {}  # task -> the metric on each held-out example (paired comparisons)


class TrialRow(BaseModel):
    """A top trial: its search objective (search subsets) next to its held-out scores."""

    model_config = ConfigDict(frozen=True)

    number: int
    note: str = ""
    search: float
    heldout: dict[str, float]
    heldout_mean: float
    validation: float | None = None  # validation objective, where the overfitting guard scored it


class Verdict(BaseModel):
    """The numbers behind the report's statement."""

    model_config = ConfigDict(frozen=True)

    evolved: Row
    best_default: Row | None
    best_source: Row
    oracle: Row
    margin: float | None  # evolved mean - best default mean
    beats_default: bool | None
    oracle_fraction: float | None  # evolved mean / oracle mean
    floor: Row  # the better of the best default merge and the best single source: what a search must beat
    room: float  # oracle mean - floor mean: what a merge could still gain
    room_share: float | None  # (evolved - floor) / room: the share of that room the evolved recipe captures
    vs_default: Difference | None = None  # evolved - best default, paired over the held-out examples
    vs_source: Difference | None = None  # evolved - best source
    portable: Row | None = None  # the best portable trial, when the evolved one is evomerge-only
    portable_trial: int | None = None  # its trial number
    vs_portable: Difference | None = None  # evolved - portable


class Comparison(BaseModel):
    model_config = ConfigDict(frozen=True)

    study: str
    method: str
    sampler: str
    run_dir: str
    n_complete: int
    multi_objective: bool
    tasks: list[str]  # held-out leaf tasks: the table's columns
    metrics: dict[str, str]  # task -> metric
    subset: int | None
    rows: list[Row]
    trials: list[TrialRow]
    best_trial: int
    skipped: dict[str, str] = {}  # method -> why it has no default row
    portable_trial: int | None = None  # the portable row's trial (the evolved one is evomerge-only), else None

    def rows_of(self, kind: Kind) -> list[Row]:
        return [r for r in self.rows if r.kind == kind]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def verdict(self) -> Verdict:
        evolved = self.rows_of("evolved")[0]
        oracle = self.rows_of("oracle")[0]
        defaults = self.rows_of("default")
        best_default = max(defaults, key=lambda r: r.mean) if defaults else None
        margin = evolved.mean - best_default.mean if best_default else None
        best_source = max(self.rows_of("source"), key=lambda r: r.mean)
        floor = max([best_source, *([best_default] if best_default else [])], key=lambda r: r.mean)
        room = oracle.mean - floor.mean
        portable = self.rows_of("portable")[0] if self.rows_of("portable") else None
        return Verdict(
            evolved=evolved,
            best_default=best_default,
            best_source=best_source,
            oracle=oracle,
            margin=margin,
            beats_default=None if margin is None else margin > 0,
            oracle_fraction=evolved.mean / oracle.mean if oracle.mean > 0 else None,
            floor=floor,
            room=room,
            room_share=(evolved.mean - floor.mean) / room if room > 0 else None,
            vs_default=paired_difference(evolved, best_default, self.tasks) if best_default else None,
            vs_source=paired_difference(evolved, best_source, self.tasks),
            portable=portable,
            portable_trial=self.portable_trial if portable else None,
            vs_portable=paired_difference(evolved, portable, self.tasks) if portable else None,
        )

    def drops(self, row: Row | None = None) -> list[tuple[str, Row, Difference]]:
        """(task, best source on it, row - that source) for each task where `row` (default: the evolved row)
        scores below its best source model by more than noise: the skills a merge lost."""
        row = row or self.rows_of("evolved")[0]
        sources = self.rows_of("source")
        out = []
        for t in self.tasks:
            best = max(sources, key=lambda r: r.scores[t])
            d = paired_difference(row, best, [t])
            if d.diff < 0 and not d.within_noise:
                out.append((t, best, d))
        return out


def heldout_metric(task: str, search_tasks: Sequence[Any]) -> str:
    """The metric of the search task this held-out task belongs to (`zoo_add` <- `zoo_add_search`), else
    the search tasks' common metric, else acc."""
    named = sorted((t for t in search_tasks if t.name.startswith(task)), key=lambda t: len(t.name))
    if named:
        return named[0].metric
    metrics = {t.metric for t in search_tasks}
    return metrics.pop() if len(metrics) == 1 else "acc"


def oracle_row(sources: Sequence[Row], tasks: Sequence[str]) -> Row:
    """Each task answered by its best source model: the per-task max over the sources."""
    best = {t: max(sources, key=lambda r: r.scores[t]) for t in tasks}
    scores = {t: best[t].scores[t] for t in tasks}
    detail = ", ".join(f"{t}: {best[t].name}" for t in tasks)
    examples = {t: best[t].examples[t] for t in tasks if t in best[t].examples}
    return Row(
        name="routing oracle", kind="oracle", scores=scores, mean=_mean(scores), detail=detail, examples=examples
    )


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def describe(recipe) -> str:
    """A default recipe's parameters in one line, as mergekit's resolver reads them (defaults are flat, so any
    tensor gives the same values): each parameter the recipe sets, globally or for its first model."""
    from evomerge.merge.plan import Plan

    resolved = Plan(recipe, num_layers=None).resolve("model.layers.0.mlp.down_proj.weight")
    seen: dict[str, Any] = {}
    for params, model in [(recipe.parameters, None), *((e.parameters, e.model) for e in recipe.models)]:
        for name in params or {}:
            if name not in seen:
                seen[name] = (
                    resolved.shared[name]
                    if name in resolved.shared
                    else resolved.per_input[model or recipe.models[0].model][name]
                )
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in seen.items())


def comparison_rows(c: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["model", *c.tasks, "mean"]
    return header, [[r.name, *(f"{r.scores[t]:.4f}" for t in c.tasks), f"{r.mean:.4f}"] for r in c.rows]


def text_comparison(c: Comparison) -> str:
    """The comparison as aligned plain text (for stdout)."""
    header, rows = comparison_rows(c)
    return text_table(header, rows, "l" + "r" * (len(header) - 1))


def stored_comparison(run_dir: Path | str) -> tuple[Comparison, float] | None:
    """The comparison `evomerge report` last wrote in the run directory and when (its mtime), or None when there is
    none or it does not read back."""
    path = RunDir.at(run_dir).comparison
    try:
        return Comparison.model_validate_json(path.read_text(encoding="utf-8")), path.stat().st_mtime
    except (OSError, ValueError):
        return None


def load_run(run_dir: Path | str):
    """(config, study, complete trials) of a run directory, or a StudyError saying what to run first."""
    from evomerge.study.study import open_run
    from evomerge.study.trials import complete_trials

    cfg, study = open_run(run_dir)
    done = complete_trials(study)
    if not done:
        raise StudyError(f"{run_dir}: study {cfg.name!r} has no COMPLETE trial yet; run `evomerge search` first")
    return cfg, study, done


def compare_run(
    run_dir: Path | str,
    *,
    top_k: int = 3,
    heldout: Sequence[str] | None = None,
    subset: int | None = None,
    log: Callable[[str], None] | None = print,
    run: tuple | None = None,
) -> Comparison:
    """Score sources, default merges and the top `top_k` trials (and the exported trial) on the held-out tasks.

    `heldout` overrides the config's `tasks.heldout`; `subset` scores a fixed seeded sample per task.
    `run` is `load_run(run_dir)` when the caller has it already.
    """
    from evomerge.candidate.portfolio import default_merges
    from evomerge.offline import go_offline
    from evomerge.run.pool import open_pool
    from evomerge.validate.guard import exported_trial, pending, portable_trial, stored, validate_top

    go_offline()
    log = log or (lambda _msg: None)
    cfg, study, done = run if run is not None else load_run(run_dir)
    task_sets = {"heldout": _heldout_tasks(cfg, run_dir, heldout, subset)}
    if pending(cfg, study):  # the guard has finalists to score first: the workers build those tasks too
        task_sets["validation"] = cfg.validation.tasks
    defaults, skipped = default_merges(cfg)
    pool = open_pool(cfg, task_sets)
    try:
        validate_top(cfg, study, log=log, pool=pool)  # the evolved row is what export takes
        best = exported_trial(cfg, study)
        portable = portable_trial(cfg, study, best)
        scored, failed = _score(pool, _entries(cfg, defaults, _top_trials(done, best, top_k, portable)), log)
    finally:
        pool.close()
    validated = stored(cfg, study)
    metrics = scored[0][1].metrics
    rows = [_row(e, res) for e, res in scored if e.kind != "trial"]
    rows.append(oracle_row([r for r in rows if r.kind == "source"], list(metrics)))
    trials = [_trial_row(e, res, validated) for e, res in scored if e.kind == "trial"]
    rows.append(_evolved_row(cfg, best, scored, trials, validated))
    if portable is not None:
        rows.append(_portable_row(portable, scored, trials))
    return Comparison(
        study=cfg.name,
        method=cfg.method,
        sampler=cfg.sampler.name,
        run_dir=str(run_dir),
        n_complete=len(done),
        multi_objective=len(study.directions) > 1,
        tasks=list(metrics),
        metrics=metrics,
        subset=subset,
        rows=rows,
        trials=trials,
        best_trial=best.number,
        skipped={**skipped, **failed},
        portable_trial=portable.number if portable is not None else None,
    )


@dataclass(frozen=True)
class _Entry:
    """One model the comparison scores: a source (its exact weights), a default merge, or a trial's recipe."""

    kind: Literal["source", "default", "trial"]
    name: str  # the row's name ("add", "ties (defaults)") or "trial N"
    recipe: str  # YAML
    detail: str = ""
    trial: Any = None


def _heldout_tasks(cfg, run_dir: Path | str, heldout: Sequence[str] | None, subset: int | None) -> list:
    """The held-out task specs: `heldout` or the config's `tasks.heldout`, each with its search task's metric."""
    from evomerge.scoring.tasks import TaskSpec

    names = list(heldout) if heldout else list(cfg.tasks.heldout)
    if not names:
        raise ConfigError(
            f"{RunDir.at(run_dir).config}: 'tasks.heldout' is empty; list held-out lm-eval tasks there "
            "(e.g. [zoo_add, zoo_reverse]) or pass --heldout A,B"
        )
    return [TaskSpec(name=n, metric=heldout_metric(n, cfg.tasks.search), subset=subset) for n in names]


def _top_trials(done: Sequence[Any], best: Any, top_k: int, portable: Any = None) -> list:
    """The top `top_k` trials by the guard's ranking (whole trials only), the exported one always among them, and
    the portable one (when there is one) after them."""
    from evomerge.study.trials import ranked

    top = ranked(done)[: max(top_k, 1)]
    top = top if best in top else [best, *top[:-1]]
    return top if portable is None or portable in top else [*top, portable]


def _entries(cfg, defaults, trials) -> list[_Entry]:
    """Every source model alone, every default merge, then the trials, in the table's order."""
    from evomerge.candidate.evaluator import alone
    from evomerge.candidate.space import model_keys

    sources = [str(cfg.base_model), *(str(m) for m in cfg.models)]
    out = [
        _Entry("source", key, alone(path, sources).to_yaml(), "base model" if path == sources[0] else "specialist")
        for key, path in zip(model_keys(sources), sources)
    ]
    out += [_Entry("default", label, recipe.to_yaml(), describe(recipe)) for label, recipe in defaults]
    out += [_Entry("trial", f"trial {t.number}", TrialRecord.from_trial(t).recipe, trial=t) for t in trials]
    return out


def _score(pool, entries: list[_Entry], log: Callable[[str], None]) -> tuple[list[tuple[_Entry, Any]], dict[str, str]]:
    """(entry, its held-out result) for every entry, in order, scored on the pool's workers as they come free; and
    {method: why} for the default merges that failed (mergekit's multislerp refuses a tensor that every model
    leaves as the base has it, as LoRA fine-tunes leave most: that method gets no row, as in the search's
    portfolio). A source or a trial that fails is an error naming it."""
    from evomerge.errors import CandidateError
    from evomerge.run.pool import run_jobs

    results: dict[int, Any] = {}
    failed: dict[str, str] = {}
    jobs = [(e.recipe, "heldout") for e in entries]
    for n, (i, res) in enumerate(run_jobs(pool, jobs, [e.name for e in entries], examples=True, failed_ok=True)):
        entry = entries[i]
        if not res.ok and entry.kind != "default":
            raise CandidateError(f"{entry.name}: {res.error}")
        if not res.ok:
            failed[getattr(entry.name, "method", str(entry.name))] = f"its default merge failed: {res.error}"
            log(f"[{n + 1}/{len(jobs)}] {entry.name}: failed ({res.error})")
            continue
        results[i] = res
        seconds = res.merge_s + res.eval_s
        log(f"[{n + 1}/{len(jobs)}] {entry.name}: mean {_mean(res.values()):.4f} ({seconds:.1f} s)")
    return [(e, results[i]) for i, e in enumerate(entries) if i in results], failed


def _examples(res) -> dict[str, list[float]]:
    """Per-example values in example order: both rows of a paired comparison were scored on the same examples."""
    return {t: [u[i] for i in sorted(u)] for t, u in res.examples.items()}


def _row(entry: _Entry, res) -> Row:
    scores = res.values()
    return Row(
        name=entry.name,
        kind=entry.kind,
        scores=scores,
        mean=_mean(scores),
        detail=entry.detail,
        examples=_examples(res),
    )


def _trial_row(entry: _Entry, res, validated: dict) -> TrialRow:
    from evomerge.study.trials import objective_of

    t, scores = entry.trial, res.values()
    note = TrialRecord.from_trial(t).baseline or ""
    if t.number in validated and validated[t.number].stopped:  # the staged guard's paired estimate, not a score
        note += ("; " if note else "") + "validation stopped early: an estimate"
    return TrialRow(
        number=t.number,
        note=note,
        search=objective_of(t),
        heldout=scores,
        heldout_mean=_mean(scores),
        validation=validated[t.number].objective if t.number in validated else None,
    )


def _evolved_row(cfg, best, scored: list[tuple[_Entry, Any]], trials: list[TrialRow], validated: dict) -> Row:
    """THE exported trial's row: its held-out scores and why it is the one."""
    top = next(r for r in trials if r.number == best.number)
    res = next(res for e, res in scored if e.trial is not None and e.trial.number == best.number)
    note = f"trial {best.number}" + (f", the enqueued baseline '{top.note}'" if top.note else "")
    if best.number in validated:
        note += f", best on validation of the top {cfg.validation.top_k} and the baselines"
    return Row(
        name="evolved (best trial)",
        kind="evolved",
        scores=top.heldout,
        mean=top.heldout_mean,
        detail=note,
        examples=_examples(res),
    )


def _portable_row(portable, scored: list[tuple[_Entry, Any]], trials: list[TrialRow]) -> Row:
    """The best portable trial's row: its held-out scores, and that `mergekit-yaml` reproduces it."""
    top = next(r for r in trials if r.number == portable.number)
    res = next(res for e, res in scored if e.trial is not None and e.trial.number == portable.number)
    note = f"trial {portable.number}" + (f", the enqueued baseline '{top.note}'" if top.note else "")
    return Row(
        name=f"portable (trial {portable.number})",
        kind="portable",
        scores=top.heldout,
        mean=top.heldout_mean,
        detail=note + ": the best trial `mergekit-yaml` reproduces, exported beside the evomerge-only one",
        examples=_examples(res),
    )


__all__ = [
    "Comparison",
    "stored_comparison",
    "Row",
    "TrialRow",
    "Verdict",
    "compare_run",
    "comparison_rows",
    "describe",
    "heldout_metric",
    "load_run",
    "oracle_row",
    "text_comparison",
]
