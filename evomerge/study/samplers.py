"""Samplers by name: the registry a config's `sampler.name` looks up, and the Optuna sampler it becomes.

    SAMPLERS["cmaes"].optuna_class                    # "CmaEsSampler"
    make_sampler("cmaes", seed=0, dim=28)             # popsize and sigma0 sized to 28 searched parameters
    sampler_for(cfg, space)                           # the config's sampler, warm-started when it says so

Samplers keep no state of their own: CMA-ES pickles its optimizer into the trials' system attrs, so a fresh sampler
on a resumed study continues where the storage left off. Options the config leaves out get defaults sized to the
search space (`auto_options`); `sampler.warm_start` starts CMA-ES from an earlier study's trials on the same models
and search space (Optuna's `source_trials`, WS-CMA-ES). The registry is data (a config validates against it without
importing Optuna); Optuna is imported where a sampler is built.

Adding a sampler: one `SAMPLERS` entry naming its Optuna class, whether it optimizes one objective per task, and
its keyword options (tests/test_search_samplers.py checks them against the class's signature).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, close_matches
from evomerge.study.record import TrialRecord

if TYPE_CHECKING:
    from evomerge.candidate.space import SearchSpace
    from evomerge.config.schema import SearchConfig


@dataclass(frozen=True)
class Sampler:
    """A sampler by name: its Optuna class, whether it optimizes one objective per task, its keyword options
    (tests check them against Optuna's signatures) and the defaults evomerge sets unless the config's options do."""

    optuna_class: str
    multi_objective: bool
    options: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, Sampler] = {
    "cmaes": Sampler("CmaEsSampler", False, (
        "x0", "sigma0", "n_startup_trials", "independent_sampler", "warn_independent_sampling",
        "consider_pruned_trials", "restart_strategy", "popsize", "inc_popsize", "use_separable_cma", "with_margin",
        "lr_adapt"), {"warn_independent_sampling": False}),
    "tpe": Sampler("TPESampler", False, (
        "consider_prior", "prior_weight", "consider_magic_clip", "consider_endpoints", "n_startup_trials",
        "n_ei_candidates", "gamma", "weights", "multivariate", "group", "warn_independent_sampling", "constant_liar",
        "constraints_func"), {"multivariate": True, "warn_independent_sampling": False}),
    "gp": Sampler("GPSampler", False, (
        "independent_sampler", "n_startup_trials", "deterministic_objective", "constraints_func",
        "warn_independent_sampling"), {"warn_independent_sampling": False}),
    "random": Sampler("RandomSampler", False, ()),
    "nsga2": Sampler("NSGAIISampler", True, (
        "population_size", "mutation", "mutation_prob", "crossover", "crossover_prob", "swapping_prob",
        "constraints_func", "elite_population_selection_strategy", "child_generation_strategy",
        "after_trial_strategy")),
}  # fmt: skip
# Options Optuna's warm-start CMA-ES derives from the source trials itself (it refuses them alongside).
WARM_EXCLUDES = ("x0", "sigma0", "use_separable_cma", "source_trials")
SEPARABLE_DIM = 40  # above this many searched parameters, CMA-ES adapts a diagonal covariance only


def check_sampler(name: str, options: dict[str, Any], warm_start: bool = False) -> None:
    """Raise ValueError (a pydantic field error where the config enters) for an unknown sampler or option name,
    or a misplaced warm start."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}{close_matches(name, SAMPLERS)}; use one of {', '.join(SAMPLERS)}")
    accepted = SAMPLERS[name].options
    for key in options:
        if key == "source_trials":
            raise ValueError("option 'source_trials' is set by `sampler.warm_start: RUN_DIR`; use that instead")
        if key not in accepted:
            raise ValueError(f"{SAMPLERS[name].optuna_class} has no option {key!r}{close_matches(key, accepted)}")
    if warm_start and name != "cmaes":
        raise ValueError(f"warm_start works with the cmaes sampler only, not {name!r}; remove warm_start or use cmaes")
    clash = [k for k in WARM_EXCLUDES if k in options]
    if warm_start and clash:
        raise ValueError(f"warm_start derives {', '.join(clash)} from the earlier trials; remove them from options")


def auto_options(name: str, dim: int, options: dict[str, Any], warm_start: bool = False) -> dict[str, Any]:
    """Defaults for the options the config leaves out, sized to a `dim`-parameter search space.

    CMA-ES: population 4 + 3 ln(dim) (Hansen's default), clipped to 6-12 so a 100-trial budget sees 8+
    generations; step size 0.25 of each parameter's range, where Optuna's 1/6 stays near the middle of the
    space in a short search (the earlier demo zoo, 100 trials: held-out 0.627 vs 0.617 for task arithmetic, 0.613
    vs 0.523 for TIES; the script that measured it is in git history before bench/search_suite.py replaced it); a
    diagonal covariance (separable CMA-ES) above SEPARABLE_DIM parameters, where a full covariance cannot be
    learned from a few hundred trials.
    """
    out: dict[str, Any] = {}
    if name == "cmaes" and dim > 0:
        out["popsize"] = min(12, max(6, 4 + int(3 * math.log(dim))))
        if not warm_start:
            out["sigma0"] = 0.25
            if dim > SEPARABLE_DIM:
                out["use_separable_cma"] = True
    return {k: v for k, v in out.items() if k not in options}


def make_sampler(
    name: str,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
    *,
    dim: int = 0,
    source_trials: list | None = None,
):
    """A fresh Optuna sampler (`SAMPLERS` by name); resuming a study with it continues where the storage left off.
    `dim`: the number of searched parameters (sizes the defaults); `source_trials`: CMA-ES warm start."""
    import optuna

    options = dict(options or {})
    warm = source_trials is not None
    try:
        check_sampler(name, options, warm_start=warm)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from None
    info = SAMPLERS[name]
    kwargs = {**info.defaults, **auto_options(name, dim, options, warm), **options}
    if warm:
        kwargs["source_trials"] = source_trials
    try:
        with warnings.catch_warnings():  # x0/sigma0 are deprecated (FutureWarning), warm start experimental
            warnings.simplefilter("ignore")
            return getattr(optuna.samplers, info.optuna_class)(seed=seed, **kwargs)
    except (TypeError, ValueError) as err:
        shown = {k: v for k, v in kwargs.items() if k != "source_trials"}
        raise ConfigError(f"sampler.options: {info.optuna_class} rejects {shown}: {err}") from None


def distributions(space: SearchSpace, models: list) -> dict[str, Any]:
    """{searched number: Optuna distribution} of a search space over `models`."""
    from optuna.distributions import FloatDistribution

    out = {}
    for name, ps in space.bounds(models).items():
        assert ps.low is not None and ps.high is not None, f"{name}: a searched number has bounds"
        out[name] = FloatDistribution(ps.low, ps.high, log=ps.log)
    return out


def warm_start_trials(cfg: SearchConfig, space: SearchSpace) -> list:
    """The COMPLETE trials of `sampler.warm_start` over exactly this search space (same names and bounds)."""
    from pathlib import Path

    from evomerge.study.record import StudyRecord
    from evomerge.study.storage import load_study
    from evomerge.study.trials import complete_trials

    name, storage, where = cfg.warm_start_source()
    if name == cfg.name and storage == cfg.storage_url:
        raise ConfigError(f"sampler.warm_start names this study itself ({where}); point it at an earlier study")
    study = load_study(name, storage)
    if study is None:
        raise ConfigError(f"sampler.warm_start: {where} does not exist; run that search first or fix the path")
    theirs = StudyRecord.from_study(study).config or {}
    ours = cfg.study_fields()
    same = [str(Path(p)) for p in [ours["base_model"], *ours["models"]]]
    if theirs and [str(Path(p)) for p in [theirs.get("base_model"), *theirs.get("models", [])]] != same:
        raise ConfigError(
            f"sampler.warm_start: {where} merged other models; warm-start from a study of the same models"
        )
    wanted = distributions(space, cfg.models)
    trials = [
        t
        for t in complete_trials(study)
        if t.distributions == wanted and t.values and len(t.values) == 1 and not TrialRecord.from_trial(t).portfolio
    ]
    if not trials:
        raise ConfigError(
            f"sampler.warm_start: {where} has no COMPLETE trial over this search space (same parameters and bounds); "
            "warm-start from a study with the same search space"
        )
    return trials


def sampler_for(cfg: SearchConfig, space: SearchSpace):
    """The config's sampler, its defaults sized to the space, warm-started when the config says so."""
    source = warm_start_trials(cfg, space) if cfg.sampler.warm_start is not None else None
    dim = len(space.bounds(cfg.models))
    return make_sampler(cfg.sampler.name, cfg.sampler_seed, cfg.sampler.options, dim=dim, source_trials=source)


__all__ = [
    "SAMPLERS",
    "SEPARABLE_DIM",
    "WARM_EXCLUDES",
    "Sampler",
    "auto_options",
    "check_sampler",
    "distributions",
    "make_sampler",
    "sampler_for",
    "warm_start_trials",
]
