"""Optuna samplers by name. Samplers keep no state of their own: the study storage holds it.

    sampler: {name: cmaes, seed: 0, options: {popsize: 8}}
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from evomerge.errors import ConfigError, close_matches

# name -> (optuna class path, multi-objective?, defaults we set unless the config's options say otherwise)
_SAMPLERS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "cmaes": ("CmaEsSampler", False, {"warn_independent_sampling": False}),
    "tpe": ("TPESampler", False, {"multivariate": True, "warn_independent_sampling": False}),
    "random": ("RandomSampler", False, {}),
    "nsga2": ("NSGAIISampler", True, {}),
}


def sampler_names() -> list[str]:
    return list(_SAMPLERS)


def is_multi_objective(name: str) -> bool:
    return _SAMPLERS[name][1]


def _cls(name: str) -> Callable:
    import optuna

    return getattr(optuna.samplers, _SAMPLERS[name][0])


def check_sampler(name: str, options: dict[str, Any]) -> None:
    """Raise (as a pydantic field error) for an unknown sampler or option name."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}{close_matches(name, _SAMPLERS)}; use one of {', '.join(_SAMPLERS)}")
    accepted = [p for p in inspect.signature(_cls(name)).parameters if p != "seed"]
    for key in options:
        if key not in accepted:
            raise ValueError(f"{_SAMPLERS[name][0]} has no option {key!r}{close_matches(key, accepted)}")


def make_sampler(name: str, seed: int | None = None, options: dict[str, Any] | None = None):
    """A fresh Optuna sampler; resuming a study with it continues where the storage left off."""
    try:
        check_sampler(name, options or {})
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from None
    kwargs = {**_SAMPLERS[name][2], **(options or {})}
    try:
        return _cls(name)(seed=seed, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sampler.options: {_SAMPLERS[name][0]} rejects {kwargs}: {err}") from None


__all__ = ["make_sampler", "sampler_names", "is_multi_objective", "check_sampler"]
