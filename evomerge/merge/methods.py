"""The merge methods evomerge runs (mergekit 0.1.5's, by name), and recipe checks against them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, close_matches

if TYPE_CHECKING:
    from mergekit.merge_methods import MergeMethod

    from evomerge.recipe import MergeGroup, Recipe

METHODS = (
    "linear",
    "slerp",
    "nuslerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "passthrough",
)
DTYPES = ("float32", "float16", "bfloat16", "float64")

# name -> (low, high, low_inclusive, high_inclusive); every other numeric parameter must be finite.
RANGES = {
    "density": (0.0, 1.0, False, True),
    "t": (0.0, 1.0, True, True),
    "gamma": (0.0, 1.0, True, False),
    "epsilon": (0.0, 1.0, True, False),
}


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise ConfigError(
            f"field merge_method: unknown method {name!r}{close_matches(name, METHODS)}; valid: {', '.join(METHODS)}"
        )
    from mergekit import merge_methods

    return merge_methods.get(name)


def check_recipe(recipe: Recipe) -> None:
    """Every semantic check mergekit would only hit mid-merge (or never): raise ConfigError naming the field."""
    method = get_method(recipe.merge_method)
    specs = {p.name: p for p in method.spec.parameters}
    scopes = [("parameters", recipe.parameters)]
    for group in recipe.groups():
        if group.parameters is not None:
            scopes.append((f"{group.where}.parameters", group.parameters))
        scopes += [(f"{group.fields[m]}.parameters", params) for m, params in group.own.items()]
    for where, params in scopes:
        for name, setting in (params or {}).items():
            if name not in specs:
                valid = ", ".join(specs) or "none"
                raise ConfigError(
                    f"field {where}.{name}: {recipe.merge_method} has no parameter "
                    f"{name!r}{close_matches(name, specs)}; valid: {valid}"
                )
            for leaf in _leaves(setting):
                _check_value(specs[name], leaf, f"{where}.{name}")
    for field in ("dtype", "out_dtype"):
        value = getattr(recipe, field)
        if value is not None and value not in DTYPES:
            raise ConfigError(f"field {field}: {value!r} is not a dtype; use one of {', '.join(DTYPES)}")
    for group in recipe.groups():
        inputs = list(group.inputs)
        if len(set(inputs)) != len(inputs):
            raise ConfigError(f"field {group.where}: a model is listed twice")
        try:
            method.validate_inputs(inputs, group.base_model)
        except ValueError as exc:
            if group.base_model is None and "requires a base" in str(exc):
                raise ConfigError(
                    f"field base_model: {recipe.merge_method} needs a base model (the one the others were fine-tuned "
                    "from); add `base_model: PATH`"
                ) from None
            hint = "; list base_model among each slice's sources" if recipe.slices is not None else ""
            raise ConfigError(
                f"field {group.where}: {recipe.merge_method}: {exc}; check base_model and the models listed{hint}"
            ) from None
        _check_required(recipe, group, method)
        _check_della(recipe, group)


def _leaves(setting: Any) -> Iterator[Any]:
    """Every scalar a setting can evaluate to (gradients interpolate between leaves, so ranges hold)."""
    from pydantic import BaseModel

    if isinstance(setting, BaseModel):  # a `{filter, value}` ConditionalParameter (recipe.py imports this module)
        yield from _leaves(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


def _check_value(spec: Any, value: Any, where: str) -> None:
    from pydantic import ValidationError

    try:
        value = spec.validate(value)
    except ValidationError:
        raise ConfigError(f"field {where}: {value!r} is not a valid {spec.name}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"field {where}: {spec.name} must be finite, got {value!r}")
    if spec.name in RANGES:
        low, high, low_in, high_in = RANGES[spec.name]
        ok = (low <= value if low_in else low < value) and (value <= high if high_in else value < high)
        if not ok:
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ConfigError(f"field {where}: {spec.name} must be in {interval}, got {value!r}")


def _check_required(recipe: Recipe, group: MergeGroup, method: MergeMethod) -> None:
    from mergekit.merge_methods.base import ParameterScope

    global_params = {**(recipe.parameters or {}), **(group.parameters or {})}
    for spec in method.spec.parameters:
        if not spec.required or spec.name in global_params:
            continue
        if spec.scope == ParameterScope.SHARED:
            raise ConfigError(f"field parameters.{spec.name}: {recipe.merge_method} requires it")
        for model in group.inputs:
            if spec.scope == ParameterScope.NON_BASE and model == group.base_model:
                continue
            if spec.name not in (group.own.get(model) or {}):
                raise ConfigError(
                    f"field parameters.{spec.name}: {recipe.merge_method} requires {spec.name} for {model}; "
                    f"set it under that model's parameters or globally"
                )


def _check_della(recipe: Recipe, group: MergeGroup) -> None:
    """DELLA samples keep-probabilities in density +/- epsilon, which must stay inside (0, 1)."""
    if recipe.merge_method not in ("della", "della_linear"):
        return
    shared = {**(recipe.parameters or {}), **(group.parameters or {})}
    for model, own in group.own.items():
        if model == group.base_model:
            continue
        params = {**shared, **(own or {})}
        d, e = params.get("density", 1.0), params.get("epsilon", 0.15)
        # gradients and filters are checked per tensor at merge time (the pairs depend on the layer)
        if isinstance(d, (int, float)) and isinstance(e, (int, float)) and d < 1 and not (0 < d - e and d + e < 1):
            raise ConfigError(
                f"field {group.fields[model]}.parameters: della needs density +/- epsilon inside (0, 1), "
                f"got density {d} and epsilon {e}; lower epsilon"
            )
