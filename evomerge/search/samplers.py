"""Optuna samplers by name. Samplers keep no state of their own: the study storage holds it.

    sampler: {name: cmaes, seed: 0, options: {popsize: 8}, warm_start: runs/earlier}

Options the config leaves out get defaults sized to the search space (`auto_options`): CMA-ES's population
and step size follow the number of searched parameters. `warm_start` (CMA-ES only) starts the optimizer
from an earlier study's trials on the same models and search space (Optuna's `source_trials`, WS-CMA-ES).
"""
from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from evomerge.errors import ConfigError, close_matches

if TYPE_CHECKING:
    from evomerge.search.config import SearchConfig
    from evomerge.search.space import SearchSpace

# name -> (optuna class path, multi-objective?, defaults we set unless the config's options say otherwise)
_SAMPLERS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "cmaes": ("CmaEsSampler", False, {"warn_independent_sampling": False}),
    "tpe": ("TPESampler", False, {"multivariate": True, "warn_independent_sampling": False}),
    "random": ("RandomSampler", False, {}),
    "nsga2": ("NSGAIISampler", True, {}),
}
# Options Optuna's warm-start CMA-ES derives from the source trials itself (it refuses them alongside).
_WARM_EXCLUDES = ("x0", "sigma0", "use_separable_cma", "source_trials")
SEPARABLE_DIM = 40  # above this many searched parameters, CMA-ES adapts a diagonal covariance only


def sampler_names() -> list[str]:
    return list(_SAMPLERS)


def is_multi_objective(name: str) -> bool:
    return _SAMPLERS[name][1]


def _cls(name: str) -> Callable:
    import optuna

    return getattr(optuna.samplers, _SAMPLERS[name][0])


def check_sampler(name: str, options: dict[str, Any], warm_start: bool = False) -> None:
    """Raise (as a pydantic field error) for an unknown sampler or option name, or a misplaced warm start."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}{close_matches(name, _SAMPLERS)}; use one of {', '.join(_SAMPLERS)}")
    accepted = [p for p in inspect.signature(_cls(name)).parameters if p not in ("seed", "source_trials")]
    for key in options:
        if key == "source_trials":
            raise ValueError("option 'source_trials' is set by `sampler.warm_start: RUN_DIR`; use that instead")
        if key not in accepted:
            raise ValueError(f"{_SAMPLERS[name][0]} has no option {key!r}{close_matches(key, accepted)}")
    if warm_start and name != "cmaes":
        raise ValueError(f"warm_start works with the cmaes sampler only, not {name!r}; remove warm_start or use cmaes")
    clash = [k for k in _WARM_EXCLUDES if k in options]
    if warm_start and clash:
        raise ValueError(f"warm_start derives {', '.join(clash)} from the earlier trials; remove them from options")


def auto_options(name: str, dim: int, options: dict[str, Any], warm_start: bool = False) -> dict[str, Any]:
    """Defaults for the options the config leaves out, sized to a `dim`-parameter search space.

    CMA-ES: population 4 + 3 ln(dim) (Hansen's default), clipped to 6-12 so a 100-trial budget sees 8+
    generations; step size 0.25 of each parameter's range, where Optuna's 1/6 stays near the middle of the
    space in a short search (demo zoo, 100 trials: held-out 0.627 vs 0.617 for task arithmetic, 0.613 vs
    0.523 for TIES; bench/search_defaults.py); a diagonal covariance (separable CMA-ES) above SEPARABLE_DIM
    parameters, where a full covariance cannot be learned from a few hundred trials.
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
    """A fresh Optuna sampler; resuming a study with it continues where the storage left off.

    `dim`: the number of searched parameters (sizes the defaults); `source_trials`: CMA-ES warm start.
    """
    options = dict(options or {})
    warm = source_trials is not None
    try:
        check_sampler(name, options, warm_start=warm)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from None
    kwargs = {**_SAMPLERS[name][2], **auto_options(name, dim, options, warm), **options}
    if warm:
        kwargs["source_trials"] = source_trials
    try:
        with warnings.catch_warnings():  # x0/sigma0 are deprecated (FutureWarning), warm start experimental
            warnings.simplefilter("ignore")
            return _cls(name)(seed=seed, **kwargs)
    except (TypeError, ValueError) as err:
        shown = {k: v for k, v in kwargs.items() if k != "source_trials"}
        raise ConfigError(f"sampler.options: {_SAMPLERS[name][0]} rejects {shown}: {err}") from None


def warm_start_trials(cfg: SearchConfig, space: SearchSpace) -> list:
    """The COMPLETE trials of `sampler.warm_start` over exactly this search space (same names and bounds)."""
    from evomerge.search.config import WarmStartConfig, load_run_config
    from evomerge.search.study import complete_trials, load_study

    ref = cfg.sampler.warm_start
    if isinstance(ref, WarmStartConfig):
        name, storage, where = ref.study, ref.storage, f"study {ref.study!r} in {ref.storage}"
    else:
        try:
            source = load_run_config(Path(str(ref)))
        except ConfigError as err:
            raise ConfigError(f"sampler.warm_start: {err}") from None
        name, storage, where = source.name, source.storage_url, f"run {ref} (study {source.name!r})"
    if name == cfg.name and storage == cfg.storage_url:
        raise ConfigError(f"sampler.warm_start names this study itself ({where}); point it at an earlier study")
    study = load_study(name, storage)
    if study is None:
        raise ConfigError(f"sampler.warm_start: {where} does not exist; run that search first or fix the path")
    theirs = study.user_attrs.get("config", {})
    ours = cfg.study_fields()
    same = [str(Path(p)) for p in [ours["base_model"], *ours["models"]]]
    if theirs and [str(Path(p)) for p in [theirs.get("base_model"), *theirs.get("models", [])]] != same:
        raise ConfigError(f"sampler.warm_start: {where} merged other models; warm-start from a study of the same models")
    wanted = space.distributions(cfg.models)
    trials = [t for t in complete_trials(study) if t.distributions == wanted and t.values and len(t.values) == 1]
    if not trials:
        raise ConfigError(
            f"sampler.warm_start: {where} has no COMPLETE trial over this search space (same parameters and bounds); "
            "warm-start from a study with the same search space"
        )
    return trials


def sampler_for(cfg: SearchConfig, space: SearchSpace):
    """The config's sampler, its defaults sized to the space, warm-started when the config says so."""
    source = warm_start_trials(cfg, space) if cfg.sampler.warm_start is not None else None
    dim = len(space.distributions(cfg.models))
    return make_sampler(cfg.sampler.name, cfg.sampler_seed, cfg.sampler.options, dim=dim, source_trials=source)


__all__ = ["auto_options", "check_sampler", "is_multi_objective", "make_sampler", "sampler_for", "sampler_names", "warm_start_trials"]
