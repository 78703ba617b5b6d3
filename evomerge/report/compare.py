"""The held-out comparison: sources, default merges, the routing oracle and the searched recipes, scored alike.

    from evomerge.report.compare import compare_run
    comparison = compare_run("runs/demo")          # Comparison: rows (model -> per-task held-out score), top trials

Every merge goes through one Materializer (inputs loaded once, one resident model, nothing written to disk)
and one Scorer (held-out tasks built once); a source model is its checkpoint's tensors copied into the same
resident model. The oracle row is computed from the source rows, never scored.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict

from evomerge.errors import ConfigError, StudyError

Kind = Literal["source", "default", "oracle", "evolved"]


class Row(BaseModel):
    """One compared model: its held-out score per task (the task's metric) and their unweighted mean."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: Kind
    scores: dict[str, float]
    mean: float
    detail: str = ""


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
        return Verdict(
            evolved=evolved,
            best_default=best_default,
            best_source=max(self.rows_of("source"), key=lambda r: r.mean),
            oracle=oracle,
            margin=margin,
            beats_default=None if margin is None else margin > 0,
            oracle_fraction=evolved.mean / oracle.mean if oracle.mean > 0 else None,
        )


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
    return Row(name="routing oracle", kind="oracle", scores=scores, mean=_mean(scores), detail=detail)


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def _describe(recipe) -> str:
    """A default recipe's parameters in one line (each setting is one value: defaults are flat)."""
    from evomerge.search.space import resolve_setting

    seen: dict[str, Any] = {}
    settings = [recipe.parameters or {}] + [e.parameters or {} for e in recipe.models]
    for params in settings:
        for name, setting in params.items():
            seen.setdefault(name, resolve_setting(setting, "model.layers.0.mlp.down_proj.weight", 0.0))
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in seen.items())


class _Bench:
    """One Materializer and one Scorer; `score_*` returns {task: value} of the resident model's weights."""

    def __init__(self, cfg, specs, log: Callable[[str], None]):
        from evomerge.merge.materialize import Materializer
        from evomerge.scoring import Scorer

        self.scorer = Scorer(specs, [str(p) for p in cfg.tasks.include_paths], seed=cfg.seed)
        self.metric = {leaf: s.metric for s in self.scorer.specs for leaf in self.scorer.members[s.name]}
        self.materializer = Materializer([str(m) for m in cfg.models], str(cfg.base_model), dtype=cfg.dtype)
        self.log, self.n, self.total = log, 0, 0
        self._cache: dict[str, dict[str, float]] = {}

    def _score(self, label: str) -> dict[str, float]:
        start = time.perf_counter()
        raw = self.scorer.score(self.materializer.model, self.materializer.tokenizer)
        scores = {leaf: float(raw[leaf][m]) for leaf, m in self.metric.items()}
        self.n += 1
        self.log(f"[{self.n}/{self.total}] {label}: mean {_mean(scores):.4f} ({time.perf_counter() - start:.1f} s)")
        return scores

    def score_source(self, path: str, label: str) -> dict[str, float]:
        import torch

        key = Path(path).expanduser().resolve()
        ckpt = next(c for c in self.materializer.checkpoints if c.path.expanduser().resolve() == key)
        targets = self.materializer.model.state_dict()
        with torch.no_grad():
            for name in ckpt.tensor_names():
                targets[name].copy_(ckpt.get(name))
        return self._score(label)

    def score_recipe(self, recipe, label: str) -> dict[str, float]:
        text = recipe.to_yaml()
        if text not in self._cache:  # the "defaults" baseline trial is the default merge: scored once
            self.materializer.apply(recipe)
            self._cache[text] = self._score(label)
        return self._cache[text]


def _default_recipes(cfg) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """(method, recipe) for the study's method (its own space) and the common methods; skipped ones with why."""
    from evomerge.report.defaults import COMMON_METHODS, applies, default_recipe, space_for
    from evomerge.search.space import SpaceSpec

    out, skipped = [], {}
    for method in dict.fromkeys([cfg.method, *COMMON_METHODS]):
        spec = SpaceSpec.model_validate(cfg.search_space) if method == cfg.method else space_for(method)
        why = applies(spec, cfg.models)
        if why:
            skipped[method] = why
            continue
        recipe = default_recipe(method, cfg.base_model, cfg.models, cfg.seed, cfg.dtype, space=spec, kernels=cfg.kernels)
        out.append((method, recipe))
    return out, skipped


def load_run(run_dir: Path | str):
    """(config, study, complete trials) of a run directory, or a StudyError saying what to run first."""
    from evomerge.search.config import load_run_config
    from evomerge.search.study import complete_trials, load_study

    cfg = load_run_config(run_dir)
    study = load_study(cfg.name, cfg.storage_url)
    if study is None:
        raise StudyError(f"{run_dir}: study {cfg.name!r} is not in {cfg.storage_url}; run `evomerge search` first")
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
    """Score sources, default merges and the top `top_k` trials on the study's held-out tasks.

    `heldout` overrides the config's `tasks.heldout`; `subset` scores a fixed seeded sample per task.
    `run` is `load_run(run_dir)` when the caller has it already.
    """
    from evomerge.offline import go_offline
    from evomerge.recipe import Recipe
    from evomerge.scoring import TaskSpec
    from evomerge.search.space import model_keys
    from evomerge.search.study import objective_of
    from evomerge.search.validate import chosen_trial, stored

    go_offline()
    log = log or (lambda _msg: None)
    cfg, study, done = run if run is not None else load_run(run_dir)
    names = list(heldout) if heldout else list(cfg.tasks.heldout)
    if not names:
        raise ConfigError(
            f"{Path(run_dir) / 'config.yaml'}: 'tasks.heldout' is empty; list held-out lm-eval tasks there "
            "(e.g. [zoo_add, zoo_reverse]) or pass --heldout A,B"
        )
    specs = [TaskSpec(name=n, metric=heldout_metric(n, cfg.tasks.search), subset=subset) for n in names]
    bench = _Bench(cfg, specs, log)
    tasks = list(bench.metric)

    defaults, skipped = _default_recipes(cfg)
    best = chosen_trial(cfg, study)  # what export takes: the best on validation when the guard ran
    validated = stored(cfg, study)
    ranked = sorted(done, key=lambda t: (-objective_of(t), t.number))[: max(top_k, 1)]
    if best not in ranked:
        ranked = [best, *ranked[:-1]]
    sources = [str(cfg.base_model), *(str(m) for m in cfg.models)]
    bench.total = len(sources) + len(defaults) + len(ranked)

    rows: list[Row] = []
    for key, path in zip(model_keys(sources), sources):
        scores = bench.score_source(path, key)
        detail = "base model" if path == sources[0] else "specialist"
        rows.append(Row(name=key, kind="source", scores=scores, mean=_mean(scores), detail=detail))
    for method, recipe in defaults:
        scores = bench.score_recipe(recipe, f"{method} (defaults)")
        rows.append(Row(name=f"{method} (defaults)", kind="default", scores=scores, mean=_mean(scores), detail=_describe(recipe)))
    rows.append(oracle_row([r for r in rows if r.kind == "source"], tasks))

    trials: list[TrialRow] = []
    for t in ranked:
        recipe = Recipe.from_yaml(t.user_attrs["recipe"], source=f"trial {t.number} recipe")
        scores = bench.score_recipe(recipe, f"trial {t.number}")
        note = t.user_attrs.get("baseline", "")
        v = validated[t.number].objective if t.number in validated else None
        trials.append(
            TrialRow(number=t.number, note=note, search=objective_of(t), heldout=scores, heldout_mean=_mean(scores), validation=v)
        )
    top = next(r for r in trials if r.number == best.number)
    note = f"trial {best.number}" + (f", the enqueued baseline '{top.note}'" if top.note else "")
    if best.number in validated:
        note += f", best on validation of the top {cfg.validation.top_k} and the defaults"
    rows.append(Row(name="evolved (best trial)", kind="evolved", scores=top.heldout, mean=top.heldout_mean, detail=note))

    return Comparison(
        study=cfg.name,
        method=cfg.method,
        sampler=cfg.sampler.name,
        run_dir=str(run_dir),
        n_complete=len(done),
        multi_objective=len(study.directions) > 1,
        tasks=tasks,
        metrics=bench.metric,
        subset=subset,
        rows=rows,
        trials=trials,
        best_trial=best.number,
        skipped=skipped,
    )


__all__ = ["Comparison", "Row", "TrialRow", "Verdict", "compare_run", "heldout_metric", "load_run", "oracle_row"]
