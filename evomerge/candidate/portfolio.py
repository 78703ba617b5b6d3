"""The method portfolio: every method's default merge, what a search must beat and the report compares against.

    from evomerge.candidate.portfolio import default_recipe, default_merges
    recipe = default_recipe("ties", "zoo/base", ["zoo/add", "zoo/reverse"], seed=0)
    merges, skipped = default_merges(cfg)          # [("ties (defaults)", Recipe), ...], {"slerp": "why not"}

"Default" has one definition: the `default:` value of each parameter in the method's search space
(`search_spaces/<name>.yaml`, or the study's own space for the study's method). These are the values of the
"defaults" baseline trial the search enqueues first, so the report's default row and the study's first trial
are the same recipe. (mergekit itself has no default `weight`; the spaces pick one per method.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.candidate.baseline import BaselineLabel
from evomerge.candidate.space import SearchSpace, SpaceSpec, load_space_spec
from evomerge.errors import ConfigError
from evomerge.merge.recipe import Recipe
from evomerge.merge.registry import REGISTRY, names

# The methods whose default merges every search is measured against (the overfitting guard validates them beside
# the searched trials; the report scores them on held-out data), besides the study's own; slerp where it applies.
COMMON_METHODS = names(portfolio=True)  # merge/registry.py decides, per method


def space_for(method: str) -> SpaceSpec:
    """The method's default search space (its registry entry's `space`, `search_spaces/<space>.yaml`)."""
    info = REGISTRY.get(method)
    if info is None or info.space is None:
        why = info.no_space if info is not None else "it is not a registered method"
        raise ConfigError(
            f"method {method!r} has no search space ({why}), so it has no default merge; add a space to "
            "search_spaces/ with `methods: [{method}]` and a `default:` per parameter, and name it in "
            "merge/registry.py"
        )
    return load_space_spec(info.space)


def applies(spec: SpaceSpec, models: Sequence[Any]) -> str | None:
    """Why the space's method cannot merge these models (None if it can)."""
    if spec.max_models is not None and len(models) > spec.max_models:
        return f"merges base_model with at most {spec.max_models} model(s); this study merges {len(models)}"
    return None


def default_recipe(
    method: str,
    base: str | Path,
    models: Sequence[str | Path],
    seed: int = 0,
    dtype: str | None = None,
    space: SpaceSpec | dict | None = None,
    kernels: str | None = None,
) -> Recipe:
    """The method's default merge of `models` into `base` (every searched parameter at its space default)."""
    spec = (
        space_for(method)
        if space is None
        else (space if isinstance(space, SpaceSpec) else SpaceSpec.model_validate(space))
    )
    why = applies(spec, models)
    if why:
        raise ConfigError(f"method {method!r} {why}; pick another method")
    models = [str(m) for m in models]
    grid = SearchSpace.over(spec, base)
    return grid.to_recipe(grid.defaults(models), models, str(base), method, seed, dtype, kernels=kernels)


def portfolio_methods(cfg) -> tuple[str, ...]:
    """The other methods whose default merges a search scores (`portfolio`: true, every common one; a list, those;
    false, none), in registry order, the study's own method left out (its defaults are a baseline already)."""
    chosen = COMMON_METHODS if cfg.portfolio is True else tuple(cfg.portfolio or ())
    return tuple(m for m in COMMON_METHODS if m in chosen and m != cfg.method)


def portfolio_merges(cfg) -> list[tuple[BaselineLabel, Recipe]]:
    """The default merges a search adds to its study (`portfolio_methods`, those that can merge these models)."""
    return default_merges(cfg, portfolio_methods(cfg))[0]


def default_merges(
    cfg, methods: Sequence[str] | None = None
) -> tuple[list[tuple[BaselineLabel, Recipe]], dict[str, str]]:
    """("<method> (defaults)", recipe) for the study's method (its own space) and every common method that can
    merge these models (`methods`: only these); {method: why not} for the others."""
    out, skipped = [], {}
    for method in dict.fromkeys([cfg.method, *COMMON_METHODS] if methods is None else methods):
        spec = SpaceSpec.model_validate(cfg.search_space) if method == cfg.method else space_for(method)
        why = applies(spec, cfg.models)
        if why:
            skipped[method] = why
            continue
        recipe = default_recipe(
            method, cfg.base_model, cfg.models, cfg.seed, cfg.dtype, space=spec, kernels=cfg.kernels
        )
        out.append((BaselineLabel.of_method(method), recipe))
    return out, skipped


__all__ = [
    "COMMON_METHODS",
    "applies",
    "default_merges",
    "default_recipe",
    "portfolio_merges",
    "portfolio_methods",
    "space_for",
]
