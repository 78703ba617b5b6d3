"""The recipe search: a config, a search space, an Optuna study driven by ask/tell, Ray workers.

    from evomerge.search import load_config, run_search, export_trial
    cfg = load_config("configs/demo.yaml")
    result = run_search(cfg)                   # or resume: the same call continues the study
    export_trial(cfg.run_dir)                  # runs/<name>/best/{recipe.yaml,model/}

Optuna code lives in `study.py`, Ray code in `workers.py`; everything else knows neither.
"""
from __future__ import annotations

from evomerge.search.config import SearchConfig, load_config, load_run_config, parse_config
from evomerge.search.space import SearchSpace, SpaceSpec, load_space_spec

__all__ = [
    "SearchConfig",
    "SearchSpace",
    "SpaceSpec",
    "load_config",
    "load_run_config",
    "load_space_spec",
    "parse_config",
    "run_search",
    "export_trial",
]


def __getattr__(name: str):
    # the driver and export pull in optuna/ray lazily, so importing the config stays cheap
    if name == "run_search":
        from evomerge.search.driver import run_search

        return run_search
    if name == "export_trial":
        from evomerge.search.export import export_trial

        return export_trial
    raise AttributeError(name)
