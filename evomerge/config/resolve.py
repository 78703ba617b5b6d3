"""The config as a study runs it, resolved once: `evomerge search`, `evomerge audit --plan` and the resource plan
all take this one.

    resolved = resolve_config(cfg)          # loads the tasks once; ConfigError (exit 2) for a bad task or setting
    for line in resolved.notes: print(line) # "gradient refinement is off for this study: ..."
    plan = plan_search(resolved.config, resolved.scorer)

`load_config` validates the file (pydantic, paths, the search space). Some features are on by default but cannot
run on every study: gradient refinement on a method without a weight gradient (slerp), staged evaluation with a
multi-objective sampler, per-row refinement rounds on a method without a per-row surrogate or without the
validation guard. Resolving loads the tasks as the workers will and switches such a default off (per-row rounds
become per-tensor ones, distillation rounds per-row likelihood ones), with a note saying why; the same reason is
a user error when the setting was asked for.

A setting counts as asked for when its value differs from the default, not when the file merely writes it: a copy
of configs/demo.yaml, which writes the defaults out, resolves as the config that leaves them out
(docs/config.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.config.schema import RefineConfig, SearchConfig
from evomerge.errors import ConfigError, TaskError

if TYPE_CHECKING:
    from evomerge.scoring.scorer import Scorer

FEATURES = {
    "refine": "gradient refinement",
    "early_stop": "staged evaluation (early_stop)",
    "refine.rows": "per-row refinement (refine.arms rows and distill; per-tensor rounds run instead)",
    "refine.distill": "distillation (refine.arms distill; per-row rounds of the likelihood run instead)",
    "validation.early_stop": "the guard's staged evaluation (validation.early_stop; each finalist is scored whole)",
}


@dataclass(frozen=True)
class ResolvedConfig:
    """The config as it runs (`config`), what was switched off and why (`off`, keyed as FEATURES), and the
    search tasks built once (`scorer`, for the resource plan)."""

    config: SearchConfig
    off: Mapping[str, str] = field(default_factory=dict)
    scorer: Scorer | None = None

    @property
    def notes(self) -> list[str]:
        """One line per feature switched off, saying why (the search logs them; runs/<name>/config.yaml records
        what ran)."""
        return [f"{FEATURES[k]} is off for this study: {why.removeprefix('refine: ')}" for k, why in self.off.items()]


def resolve_config(cfg: SearchConfig) -> ResolvedConfig:
    """The config as a study runs it (see the module docstring); ConfigError for a bad task or a setting asked for
    that cannot run."""
    built: dict[str, Any] = {}
    off = check_tasks(cfg, keep=built)
    update: dict[str, Any] = {name: None for name in off if name in ("refine", "early_stop")}
    if cfg.validation is not None and "validation.early_stop" in off:
        update["validation"] = cfg.validation.model_copy(update={"early_stop": False})
    if cfg.refine is not None and {"refine.rows", "refine.distill"} & off.keys():
        instead = {"rows": "tensor", "distill": "tensor"} if "refine.rows" in off else {"distill": "rows"}
        update["refine"] = cfg.refine.model_copy(update={"arms": [instead.get(a, a) for a in cfg.refine.arms]})
    return ResolvedConfig(cfg.model_copy(update=update), off, built.get("search"))


def runnable(cfg: SearchConfig, log: Callable[[str], None]) -> SearchConfig:
    """`resolve_config(cfg).config`, its notes logged."""
    resolved = resolve_config(cfg)
    for line in resolved.notes:
        log(line)
    return resolved.config


def asked(cfg: SearchConfig, name: str) -> bool:
    """Whether the config asks for a feature (`refine`, `early_stop`, `refine.arms`): its value is not the
    default's. A default written out in the file is still the default."""
    if name == "refine.arms":
        return cfg.refine is not None and cfg.refine.arms != RefineConfig.model_fields["arms"].default
    if name == "validation.early_stop":
        return False  # on by default, and only an economy: where it cannot run, the guard scores whole
    return getattr(cfg, name) != SearchConfig.model_fields[name].default


def check_tasks(cfg: SearchConfig, keep: dict[str, Any] | None = None) -> dict[str, str]:
    """Load the search (and validation) tasks once, as the workers will: a bad task name, metric, subset or
    task YAML fails here, before a study or run directory exists, naming the config file and field.

    Returns the features on by default that cannot run on this study, with why ({"refine": ..., "early_stop":
    ...}); asked for in the config (`asked`), the same reason is a user error instead. `keep`: receives the
    built search Scorer (`keep["search"]`), for the resource plan."""
    from evomerge.refine.tensor import check_refinable
    from evomerge.scoring.scorer import Scorer
    from evomerge.scoring.staged import check_per_example

    off: dict[str, str] = {}

    def check(field: str, test) -> None:
        try:
            test()
        except ConfigError as err:
            if asked(cfg, field):
                raise  # asked for in the config: it must apply
            off[field] = str(err)

    _check_one_objective(cfg, check)
    groups = [("tasks.search", cfg.tasks.search)]
    if cfg.validation is not None:
        groups.append(("validation.tasks", cfg.validation.tasks))
    for name, tasks in groups:
        try:
            scorer = Scorer(
                tasks,
                [str(p) for p in cfg.tasks.include_paths],
                seed=cfg.seed,
                include_defaults=cfg.tasks.include_defaults,
            )
            if name != "tasks.search":
                if cfg.early_stop is not None and cfg.validation is not None and cfg.validation.early_stop:
                    check("validation.early_stop", lambda: check_per_example(scorer))
                continue
            if keep is not None:
                keep["search"] = scorer
            if cfg.tasks.smooth > 0:
                check_per_example(scorer)
            if cfg.early_stop is not None and "early_stop" not in off:
                check("early_stop", lambda: check_per_example(scorer))
            if cfg.refine is not None:
                check("refine", lambda: check_refinable(scorer, cfg.method))
            if cfg.refine is not None and "refine" not in off and cfg.refine.arms_run(cfg.budget.n_trials) - {"tensor"}:
                _check_rows(cfg, scorer, off)
        except (TaskError, ConfigError) as err:
            raise ConfigError(f"{cfg._source}: {name!r}: {err}; fix the task entry or tasks.include_paths") from None
    return off


def _check_rows(cfg: SearchConfig, scorer: Scorer, off: dict[str, str]) -> None:
    """Per-row refinement and distillation where their arms apply; the default arms fall back (`off["refine.rows"]`:
    per-tensor rounds instead, also without the validation guard to choose among their points;
    `off["refine.distill"]`: per-row rounds of the likelihood instead), arms the config asks for must apply."""
    from evomerge.refine.distill import check_distillable
    from evomerge.refine.rows import check_rows

    if cfg.refine is None:
        return
    refine, wanted = cfg.refine, asked(cfg, "refine.arms")
    if cfg.validation is None and not wanted:
        off["refine.rows"] = (
            "per-row coefficients fit the search examples closely, and without `validation:` (the guard) nothing "
            "scores their points on other examples: add a validation block, or set refine.arms"
        )
        return
    checks = [("refine.rows", lambda: check_rows(cfg.method))]
    if "distill" in refine.arms_run(cfg.budget.n_trials):
        checks.append(("refine.distill", lambda: check_distillable(scorer)))
    for name, check in checks:
        try:
            check()
        except ConfigError as err:
            if wanted:
                raise
            off[name] = str(err)
            return


def _check_one_objective(cfg: SearchConfig, check: Callable[[str, Callable[[], None]], None]) -> None:
    """Smoothing and staged evaluation compare one objective; a multi-objective sampler has one per task
    (smoothing asked for: a user error; early_stop: `check`'s rule, off when only a default)."""

    def one_objective() -> None:
        if cfg.multi_objective:
            raise ConfigError(
                f"'early_stop' and 'tasks.smooth' need one objective; the {cfg.sampler.name} sampler "
                "has one per task: remove them or pick cmaes, gp, tpe or random"
            )

    try:
        if cfg.tasks.smooth > 0:
            one_objective()
        if cfg.early_stop is not None:
            check("early_stop", one_objective)
    except ConfigError as err:
        raise ConfigError(f"{cfg._source}: {err}") from None


__all__ = ["FEATURES", "ResolvedConfig", "asked", "check_tasks", "resolve_config", "runnable"]
